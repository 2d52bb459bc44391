"""Spatial mixture synthesizer (SpAudSyn-compatible) and the datasets that feed training and evaluation.

Mixtures are built exactly like the official SpAudSyn synthesizer: mono events are peak-normalised, convolved
with a 4-channel room impulse response (RIR) read from a SOFA file, scaled to ref_db + snr over the whole
convolution, and summed with a background; the dry target of an event is the same source convolved with the
direct-path window of channel 0 at the same scale. Three dataset modes:

    GeneratedDataset   random training scenes, item i a pure function of (seed, i)
    MetadataDataset    scenes from SpAudSyn metadata JSON files (validation)
    WaveformDataset    pre-rendered soundscapes with oracle or estimated sources (test / evaluation)

Rendering has two halves. Renderer.prepare (cheap, in DataLoader workers) reads and peak-normalises the events and
the background of a scene into a compact record; render_scenes (the FFT math, written once in torch) renders a
whole batch of records on any device: the worker's CPU (datasets with render=True, the default) or the training
GPU (render=False; train.py --render_on device calls BatchRenderer once per step).

    python synth.py --bench --data data/dev_set --device cpu    # worker ms per mixture, device mixtures/s
    python synth.py --bench --data data/dev_set --device cuda

Speed: RIR spectra are kept per device (RirSpectra: bounded in bytes) and, with spectrum_cache_dir, also in .npy
files there shared by all processes and runs (10 MB per RIR position of the dev set).
"""
import argparse
import collections
import contextlib
import ctypes
import dataclasses
import hashlib
import json
import math
import os
import random
import re
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

import h5py
import numpy as np
import scipy.fft
import scipy.signal
import soundfile
import torch

from cli import add_config_flags, config_from_args

# Constants owned by the data side; every other file imports them from here.
SAMPLE_RATE = 32000  # Hz, the only rate the dev set and the models use
NUM_SLOTS = 3  # output slots per mixture (up to three target events)
SILENCE = "silence"  # label of an empty slot
LABELS = (  # the 18 target classes, in the official index order
    "AlarmClock", "BicycleBell", "Blender", "Buzzer", "Clapping", "Cough", "CupboardOpenClose", "Dishes",
    "Doorbell", "FootSteps", "HairDryer", "MechanicalFans", "MusicalKeyboard", "Percussion", "Pour", "Speech",
    "Typing", "VacuumCleaner",
)
POSITION_TOLERANCE = 1e-3  # m, a metadata position must lie this close to a stored RIR position
ROOM_MODULE = "src.modules.spatial_audio_synthesizer.room"  # written into metadata for the official loader
SOURCE_FOLDERS = ("sound_event", "interference", "noise", "room_ir")  # dev-set folders, each split in SPLITS
SPLITS = ("train", "valid")  # training draws from train; the validation metadata reference valid
OFFICIAL_PREFIX = "data/dev_set/"  # the dev set in metadata paths (relative to the official repository root)
HEAP_KEEP_MEGABYTES = 128  # freed memory glibc keeps for reuse instead of returning it (see keep_heap_memory)
spectrum_cache_megabytes = 256  # per worker process; RIR spectra kept so that repeated positions skip the read + FFT
CPU_KERNELS = True  # CPU tensors use scipy.fft and a copy per event (faster there); False runs the GPU code (tests)


@dataclasses.dataclass
class SceneConfig:
    """Training-scene generation; defaults are the official 2026 separator values (tagger: nevent (0, 3))."""
    duration: float = 10.0  # s, mixture length
    ref_db: float = -55.0  # dB, reference level (mean square over channels and samples)
    nevent_range: tuple[int, int] = (1, 3)  # target events per mixture, inclusive
    snr_range: tuple[float, float] = (5.0, 20.0)  # dB above ref_db for target events
    dupse_rate: float = 0.5  # probability of same-class duplicates when there are >= 2 events
    dupse_min_angle: float = 60.0  # degrees, minimum angle between same-class sources
    max_n_dupse: int = 2  # at most this many duplicate events
    exclusion_folder_depth: int = 1  # a duplicate avoids files sharing this many sub-folder levels
    interference_range: tuple[int, int] = (0, 2)  # interference events per mixture, inclusive
    interference_snr_range: tuple[float, float] = (0.0, 15.0)  # dB above ref_db for interference
    shuffle_label: bool = True  # shuffle the order of the target events (silence stays last)
    max_event_duration: float = 10.0  # s, longer files contribute a random excerpt of this length
    direct_range_ms: tuple[float, float] = (6.0, 50.0)  # ms before / after the direct-path peak (dry target)


# ----------------------------------------------------------------------------------------------------------
# Audio files and timing


class PhaseTimer:
    """Accumulates wall time per phase ('reading', 'sources', ...) for the benchmark; costs ~1 us per call.

    With `device` set to a CUDA device, each phase first waits for the work queued on it: a correct breakdown for
    the benchmark, and a stall anywhere else (the default None never waits).
    """

    def __init__(self):
        self.seconds = collections.Counter()
        self.device = None

    @contextlib.contextmanager
    def __call__(self, phase):
        if self.device is not None:
            torch.cuda.synchronize(self.device)
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.device is not None:
                torch.cuda.synchronize(self.device)
            self.seconds[phase] += time.perf_counter() - start


TIMER = PhaseTimer()
_HEAP_TUNED = {}  # process id -> megabytes of free heap glibc was told to keep


def keep_heap_memory(megabytes=HEAP_KEEP_MEGABYTES):
    """Let glibc keep up to `megabytes` of freed memory in the heap (Linux only; a larger call wins).

    A render allocates and frees ~40 MB of FFT buffers (scipy.fft allocates its outputs and work arrays), and a
    CPU training step frees its activations. With glibc's default thresholds that memory goes back to the kernel
    every time and each reuse pays page faults (about 20 ms per mixture, 20 % of a demo training step). Arrays
    up to half of `megabytes` then come from the heap, and up to `megabytes` of free heap stays mapped for the
    next use. mallopt takes a C int: at most 2047 MB.
    """
    if _HEAP_TUNED.get(os.getpid(), 0) >= megabytes or not sys.platform.startswith("linux"):
        return
    _HEAP_TUNED[os.getpid()] = megabytes
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl): nothing to tune
        return
    megabytes = min(megabytes, 2047)
    mallopt(-3, megabytes // 2 * 2 ** 20)  # M_MMAP_THRESHOLD
    mallopt(-1, megabytes * 2 ** 20)  # M_TRIM_THRESHOLD


def audio_info(path):
    """soundfile.info of a WAV, with an error that names the file."""
    try:
        return soundfile.info(str(path))
    except Exception as error:  # soundfile raises several types for broken or missing files
        raise ValueError(f"{path}: unreadable audio file ({error})") from None


def read_audio(path, start=0, frames=-1):
    """Read frames [start, start + frames) as float32 [C, n]; the file must be at SAMPLE_RATE."""
    with TIMER("reading"):
        try:
            with soundfile.SoundFile(str(path)) as file:
                if file.samplerate != SAMPLE_RATE:
                    raise ValueError(f"{path}: sample rate {file.samplerate} Hz, expected {SAMPLE_RATE} Hz")
                file.seek(start)
                audio = file.read(frames, dtype="float32", always_2d=True)
        except (RuntimeError, soundfile.LibsndfileError) as error:
            raise ValueError(f"{path}: unreadable audio file ({error})") from None
    return np.ascontiguousarray(audio.T)


# ----------------------------------------------------------------------------------------------------------
# Rooms (SOFA files read with h5py)


class SofaRoom:
    """One SOFA room: cartesian positions in memory, RIRs read per position from a per-process h5py handle."""

    def __init__(self, path):
        self.path = Path(path)
        try:
            with h5py.File(self.path, "r") as file:
                for key in ("Data.IR", "Data.SamplingRate", "SourcePosition"):
                    if key not in file:
                        raise ValueError(f"{self.path}: not a SOFA room file, dataset {key!r} is missing")
                shape = file["Data.IR"].shape
                if len(shape) != 3:
                    raise ValueError(f"{self.path}: Data.IR has shape {shape}, expected (M, R, N)")
                self.native_rate = float(np.asarray(file["Data.SamplingRate"]).ravel()[0])
                source = file["SourcePosition"]
                positions = np.asarray(source, dtype=np.float64).reshape(-1, 3)
                kind = source.attrs.get("Type", b"cartesian")
                kind = (kind.decode() if isinstance(kind, bytes) else str(kind)).lower()
        except OSError as error:
            raise ValueError(f"{self.path}: unreadable SOFA file ({error})") from None
        self.num_positions, self.num_channels, self.native_length = shape
        if kind == "spherical":  # degrees, degrees, metres, converted like python-sofa
            azimuth, elevation, radius = np.deg2rad(positions[:, 0]), np.deg2rad(positions[:, 1]), positions[:, 2]
            positions = np.stack([radius * np.cos(azimuth) * np.cos(elevation),
                                  radius * np.sin(azimuth) * np.cos(elevation),
                                  radius * np.sin(elevation)], axis=1)
        elif kind != "cartesian":
            raise ValueError(f"{self.path}: SourcePosition Type {kind!r}, expected 'cartesian' or 'spherical'")
        if len(positions) == 1:  # one position shared by all measurements (dimension I)
            positions = np.repeat(positions, self.num_positions, axis=0)
        if len(positions) != self.num_positions:
            raise ValueError(f"{self.path}: {len(positions)} source positions for {self.num_positions} RIRs")
        self.positions = positions  # (M, 3) metres, cartesian
        self.rir_length = self.native_length  # after resampling to SAMPLE_RATE
        if self.native_rate != SAMPLE_RATE:
            self.rir_length = math.ceil(self.native_length * SAMPLE_RATE / self.native_rate)
        self._file = None
        self._pid = None

    def __getstate__(self):  # DataLoader workers open their own handle
        state = dict(self.__dict__)
        state["_file"] = None
        return state

    def metadata(self, sofa_path, direct_range_ms):
        """The `room` entry of a SpAudSyn metadata file."""
        return {"module": ROOM_MODULE, "main": "SofaRoom.from_metadata", "args": {"metadata": {
            "sofa_path": sofa_path, "sr": SAMPLE_RATE, "nchan": self.num_channels, "nrir": self.num_positions,
            "rir_len": self.rir_length, "direct_range_ms": list(direct_range_ms)}}}

    def find_position(self, position):
        """Index of the stored position nearest to a cartesian [x, y, z] (or [[x, y, z]]); within 1 mm."""
        target = np.asarray(position, dtype=np.float64).reshape(-1)
        if target.shape != (3,):
            raise ValueError(f"{self.path}: event_position {position!r} is not one [x, y, z] point")
        distances = np.linalg.norm(self.positions - target, axis=1)
        index = int(np.argmin(distances))
        if distances[index] > POSITION_TOLERANCE:
            raise ValueError(f"{self.path}: no RIR at position {target.tolist()} (nearest is "
                             f"{distances[index] * 1000:.1f} mm away, tolerance {POSITION_TOLERANCE * 1000:g} mm)")
        return index

    def rir(self, index):
        """Normalised RIR float64 [R, N] of one position (RMS over channels of the per-channel energies = 1)."""
        with TIMER("reading"):
            if self._file is None or self._pid != os.getpid():
                self._file, self._pid = h5py.File(self.path, "r"), os.getpid()
            response = np.empty((self.num_channels, self.native_length), dtype=np.float64)
            self._file["Data.IR"].read_direct(response, np.s_[index])
        if self.native_rate != SAMPLE_RATE:
            divisor = math.gcd(SAMPLE_RATE, int(round(self.native_rate)))
            response = scipy.signal.resample_poly(response, SAMPLE_RATE // divisor,
                                                  int(round(self.native_rate)) // divisor, axis=-1)
        norm = math.sqrt(float(np.mean(np.einsum("ij,ij->i", response, response))))
        if norm > 0:
            response /= norm
        return response


def _save_atomically(path, array):
    """np.save to a temporary name in the same folder, then rename: readers never see a partial file."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(temporary, "wb") as file:
        np.save(file, array)
    os.replace(temporary, path)


# ----------------------------------------------------------------------------------------------------------
# File index of one data root


def _sorted_wavs(folder):
    """All .wav files under folder, recursively, in a machine-independent order; hidden entries skipped."""
    found = []
    for directory, subdirectories, files in os.walk(folder):
        subdirectories[:] = sorted(name for name in subdirectories if not name.startswith("."))
        found += [Path(directory) / name for name in sorted(files)
                  if name.lower().endswith(".wav") and not name.startswith(".")]
    return sorted(found, key=lambda path: path.relative_to(folder).parts)


class DataIndex:
    """Sorted listing of one split of a dev set (sound_event/, interference/, noise/, room_ir/) with file lengths.

    The layout is the official one: every source folder has a `train` and a `valid` split
    (sound_event/train/<Label>/**.wav, interference/train/<class>/**.wav, noise/train/**.wav,
    room_ir/train/*.sofa); training draws from `train`, the validation metadata reference `valid`. Built once
    per dataset (and so once per process); generation never lists folders again. Problems (wrong rate,
    channels, empty folders, unreadable files) raise one ValueError listing all of them, or are collected in
    `problems` when strict is False.
    """

    def __init__(self, data_root, split="train", strict=True):
        if split not in SPLITS:
            raise ValueError(f"split {split!r}, expected one of {', '.join(SPLITS)}")
        self.root, self.split = Path(data_root), split
        self.folders = {name: self.root / name / split for name in SOURCE_FOLDERS}
        self.problems = []
        self.rooms = []
        if not self.folders["room_ir"].is_dir():
            self.problems.append(f"{self.folders['room_ir']}: missing folder of .sofa rooms")
        else:
            for path in sorted(self.folders["room_ir"].rglob("*.sofa")):
                try:
                    self.rooms.append(SofaRoom(path))
                except ValueError as error:
                    self.problems.append(str(error))
            if not self.rooms and not self.problems:
                self.problems.append(f"{self.folders['room_ir']}: no .sofa room files")
        channels = {room.num_channels for room in self.rooms}
        self.events = self._classes(self.folders["sound_event"], required=True)
        unknown = sorted(set(self.events) - set(LABELS))
        for label in unknown:
            self.problems.append(f"{self.folders['sound_event'] / label}: unknown class; expected one of LABELS")
        self.labels = [label for label in LABELS if label in self.events]  # official index order
        self.interference = self._classes(self.folders["interference"], required=False)
        self.interference_labels = sorted(self.interference)
        self.noise = []
        if self.folders["noise"].is_dir():
            for path in _sorted_wavs(self.folders["noise"]):
                info = self._check(path, None)
                if info is not None:
                    if channels and info.channels not in channels:
                        self.problems.append(f"{path}: {info.channels} channels, expected {sorted(channels)} "
                                             f"like the rooms")
                    self.noise.append((path.relative_to(self.folders["noise"]).as_posix(), info.frames,
                                       info.channels))
        if strict and self.problems:
            raise ValueError("data problems:\n  " + "\n  ".join(self.problems))

    def metadata_folder(self, name):
        """Official metadata form of one source folder of this split, e.g. 'data/dev_set/sound_event/train'."""
        return f"{OFFICIAL_PREFIX}{name}/{self.split}"

    def _check(self, path, channels):
        try:
            info = audio_info(path)
        except ValueError as error:
            self.problems.append(str(error))
            return None
        if info.samplerate != SAMPLE_RATE:
            self.problems.append(f"{path}: sample rate {info.samplerate} Hz, expected {SAMPLE_RATE} Hz")
            return None
        if channels is not None and info.channels != channels:
            self.problems.append(f"{path}: {info.channels} channels, expected {channels}")
            return None
        return info

    def _classes(self, folder, required):
        """{label: [(path relative to folder, frames)]} for folder/<label>/**.wav (mono files)."""
        if not folder.is_dir():
            if required:
                self.problems.append(f"{folder}: missing folder of class sub-folders")
            return {}
        classes = {}
        for class_folder in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
            files = []
            for path in _sorted_wavs(class_folder):
                info = self._check(path, 1)
                if info is not None:
                    files.append((path.relative_to(folder).as_posix(), info.frames))
            if files:
                classes[class_folder.name] = files
            else:
                self.problems.append(f"{class_folder}: empty class folder (no readable 32 kHz mono .wav)")
        return classes


# ----------------------------------------------------------------------------------------------------------
# Rendering SpAudSyn metadata


class Renderer:
    """Renders SpAudSyn metadata dicts; keeps each room open once per process.

    Paths in metadata (the three source directories and sofa_path) are relative to the official repository
    root, where the dev set is data/dev_set. They are resolved against the dev-set folder `dev_set`, wherever it
    lives: 'data/dev_set/<rest>' -> <dev_set>/<rest>; any other relative path -> relative to the folder two
    levels above the dev set (the repository root when the dev set is <repository>/data/dev_set); absolute
    paths are used as they are. The current directory is never consulted.
    """

    def __init__(self, dev_set="data/dev_set", rooms=(), cache_dir=None):
        self.dev_set = Path(os.path.abspath(dev_set))  # not resolve(): a symlinked data/dev_set keeps its parents
        self.rooms = {room.path.resolve(): room for room in rooms}
        self.cache_dir = cache_dir  # optional folder of RIR spectra shared by processes (RirSpectra)
        self._spectra = None  # this process's RirSpectra on the CPU, made on the first render

    def __getstate__(self):  # each DataLoader worker keeps its own spectra
        state = dict(self.__dict__)
        state["_spectra"] = None
        return state

    def resolve(self, *parts):
        """The file a metadata path names (joined from parts, e.g. a source directory and a source_file)."""
        relative = Path(*parts)
        posix = relative.as_posix()
        if relative.is_absolute():
            path = relative
        elif posix.startswith(OFFICIAL_PREFIX):
            path = self.dev_set / posix[len(OFFICIAL_PREFIX):]
        else:
            path = self.dev_set.parent.parent / relative
        if not path.exists():
            raise ValueError(f"{posix}: file referenced by the metadata not found at {path} (metadata paths starting "
                             f"with {OFFICIAL_PREFIX} are looked up in the dev set {self.dev_set})")
        return path

    def room(self, sofa_path):
        path = self.resolve(sofa_path).resolve()
        if path not in self.rooms:
            self.rooms[path] = SofaRoom(path)
        return self.rooms[path]

    def prepare(self, scene, num_channels=None, dry=True):
        """The worker half of rendering a metadata dict: read, peak-normalise and locate the events, no FFT.

        Returns a scene record for stack_scenes. Events E = foreground in event_time order, then interference:
        sources float32 [T] (their samples, concatenated), source_lengths, onsets (samples), full_lengths (samples
        of the full convolution, the level's denominator), slots (the dry target's slot of a foreground event,
        -1 for interference) int64 [E], target_db float64 [E] (ref_db + snr), rir_keys [(sofa path, position,
        direct range)] * E, rir_length, background float32 [num_channels, L] (at its level; zeros without one),
        dry and labels (foreground, event_time order). Follows SpAudSyn: int(time * sr) sample arithmetic, peak
        normalisation, multichannel files averaged to mono. num_channels: the first channels of the room that the
        mixture keeps (None = all); dry: whether dry targets are rendered.
        """
        keep_heap_memory()
        config = scene["config"]
        if int(config["sr"]) != SAMPLE_RATE:
            raise ValueError(f"metadata sr {config['sr']}, expected {SAMPLE_RATE}")
        length = int(config["duration"] * SAMPLE_RATE)
        room_metadata = scene["room"]["args"]["metadata"]
        room = self.room(room_metadata["sofa_path"])
        channels = room.num_channels if num_channels is None else num_channels
        if not 1 <= channels <= room.num_channels:
            raise ValueError(f"{room.path}: {room.num_channels} RIR channels, {channels} requested")
        direct_range = tuple(room_metadata.get("direct_range_ms", (6, 50)))
        foreground = sorted(scene.get("fg_events") or [], key=lambda event: event["event_time"])
        interference = sorted(scene.get("int_events") or [], key=lambda event: event["event_time"])
        sources, onsets, slots, target_db, rir_keys = [], [], [], [], []
        for event_list, folder_key, is_foreground in ((foreground, "foreground_dir", True),
                                                      (interference, "interference_dir", False)):
            for number, event in enumerate(event_list):
                if not 0 <= event["event_time"] < config["duration"]:
                    raise ValueError(f"event {event['source_file']}: event_time {event['event_time']} s is outside "
                                     f"the {config['duration']} s mixture")
                path = self.resolve(config[folder_key], event["source_file"])
                audio = read_audio(path, int(event["source_time"] * SAMPLE_RATE),
                                   int(event["event_duration"] * SAMPLE_RATE))
                source = audio[0] if len(audio) == 1 else audio.mean(axis=0)  # mono like librosa, a new array
                peak = max(source.max(), -source.min()) if source.size else 0.0
                sources.append(np.divide(source, peak, out=source) if peak > 0 else source)
                try:
                    position = room.find_position(event["event_position"])
                except ValueError as error:
                    raise ValueError(f"event {event['source_file']}: {error}") from None
                onsets.append(int(event["event_time"] * SAMPLE_RATE))
                slots.append(number if is_foreground else -1)
                target_db.append(config["ref_db"] + event["snr"])
                rir_keys.append((str(room.path), position, direct_range))
        background = np.zeros((channels, length), dtype=np.float32)
        for event in scene.get("bg_events") or []:
            audio, gain = self._background(config, event, room.num_channels, length)
            background += audio[:channels] * gain  # the level counts all channels; only the kept ones are scaled
        source_lengths = np.array([len(source) for source in sources], dtype=np.int64)
        return {"sources": np.concatenate(sources).astype(np.float32) if sources else np.zeros(0, np.float32),
                "source_lengths": source_lengths, "onsets": np.array(onsets, dtype=np.int64),
                "full_lengths": source_lengths + room.rir_length - 1, "slots": np.array(slots, dtype=np.int64),
                "target_db": np.array(target_db, dtype=np.float64), "rir_keys": rir_keys,
                "rir_length": room.rir_length, "background": background, "dry": dry,
                "labels": [event["label"] for event in foreground]}

    def render_record(self, record):
        """render_scenes of one scene record on the CPU -> (mixture float32 [C, L], dry [S, 1, L] or None)."""
        if self._spectra is None:
            self._spectra = RirSpectra("cpu", spectrum_cache_megabytes, self.cache_dir)
        mixture, dry = render_scenes(stack_scenes([record]), self._spectra)
        return mixture[0], None if dry is None else dry[0]

    def render(self, scene):
        """Metadata dict -> {'mixture' float32 [C, L], 'dry_sources' float32 [E, 1, L], 'labels' [E]} (numpy).

        E = foreground events in event_time order; all channels of the room and the dry targets are rendered.
        """
        record = self.prepare(scene)
        mixture, dry = self.render_record(record)
        return {"mixture": mixture.numpy(), "dry_sources": dry[:len(record["labels"])].numpy(),
                "labels": record["labels"]}

    def _background(self, config, event, channels, length):
        """(background float32 [channels, L], float32 gain to ref_db (+ its snr, 0) over all channels and samples);
        tiled when short; a zero gain (with a warning) when its channel count differs from the room's."""
        path = self.resolve(config["background_dir"], event["source_file"])
        if event.get("source_time") is not None:
            audio = read_audio(path, int(event["source_time"] * SAMPLE_RATE), length)
        else:
            audio = read_audio(path)
            if audio.shape[1] == 0:
                raise ValueError(f"{path}: empty background file")
            audio = np.tile(audio, (1, math.ceil(length / audio.shape[1])))[:, :length]
        if len(audio) != channels:
            warnings.warn(f"{path}: {len(audio)}-channel background for a {channels}-channel room, skipped")
            return np.zeros((channels, length), dtype=np.float32), np.float32(0)
        if audio.shape[1] < length:
            audio = np.pad(audio, ((0, 0), (0, length - audio.shape[1])))
        # Mean square in float32 pairwise sums per channel (relative error ~1e-8), the channels added in float64.
        energy = float(np.square(audio).sum(axis=1).astype(np.float64).sum()) / audio.size
        if energy == 0:
            return audio, np.float32(1)
        return audio, np.float32(10 ** ((config["ref_db"] + event.get("snr", 0) - 10 * math.log10(energy)) / 20))


# ----------------------------------------------------------------------------------------------------------
# Rendering scene batches, on the worker's CPU or on the training device


def rfft(signal, length):
    """Real FFT of the last axis, zero-padded to `length` -> complex64 [..., length // 2 + 1], on signal's device.

    CPU tensors go through scipy.fft (pocketfft: 1.2-1.8x faster than torch's CPU FFT at these lengths on one core),
    other devices through torch.fft: the back end is the only thing that differs between the two.
    """
    if signal.device.type == "cpu" and CPU_KERNELS:
        return torch.from_numpy(scipy.fft.rfft(signal.numpy(), length, axis=-1, workers=torch.get_num_threads()))
    return torch.fft.rfft(signal, length)


def irfft(spectrum, length):
    """Inverse of rfft -> float32 [..., length]; on the CPU it overwrites `spectrum`."""
    if spectrum.device.type == "cpu" and CPU_KERNELS:
        return torch.from_numpy(scipy.fft.irfft(spectrum.numpy(), length, axis=-1, overwrite_x=True,
                                                workers=torch.get_num_threads()))
    return torch.fft.irfft(spectrum, length)


def fft_rows(count):
    """Rows to transform for `count` signals: pocketfft does 4 rows at once for about 1.6 times the price of one, so
    a remainder of 2 or 3 rows is padded to 4 with zero rows (on a GPU the few extra rows cost nothing)."""
    return count + (4 - count % 4) % 4 if count % 4 >= 2 else count


def place_sources(sources, lengths, onsets, rows, fft_length):
    """Zeros float32 [rows, fft_length] with event e's samples (flat `sources`, `lengths` [E]) from onsets[e] on.

    On the CPU a copy per event is fastest (one indexed copy of all samples costs 30x more there); on a GPU one
    indexed copy replaces a kernel launch per event and reads the sizes from shapes only (no synchronisation).
    """
    placed = sources.new_zeros(rows, fft_length)
    if sources.device.type == "cpu" and CPU_KERNELS:
        start = 0
        for event, (count, onset) in enumerate(zip(lengths.tolist(), onsets.tolist())):
            placed[event, onset:onset + count] = sources[start:start + count]
            start += count
        return placed
    events = torch.arange(len(lengths), device=sources.device)
    event = torch.repeat_interleave(events, lengths, output_size=len(sources))  # (T,) event of each sample
    first = torch.cumsum(lengths, 0) - lengths  # (E,) where each event starts in `sources`
    target = torch.arange(len(sources), device=sources.device) - first[event] + onsets[event] + event * fft_length
    placed.view(-1)[target] = sources
    return placed


class RirSpectra:
    """RIR spectra on one device for render_scenes; least recently used ones go beyond `megabytes`.

    For one layout (FFT length, mixture channels C, dry targets or not) and per (room file, position, direct-path
    window) it keeps: the rfft of the RIR's first C channels (complex64 [C, F]), the RIR power per bin averaged over
    all channels (float32 [F]: an event's level by Parseval needs nothing else, so the 1-channel tagger never
    multiplies the other channels), and with dry targets the rfft of the channel-0 direct-path window (complex64
    [F]). The rows live in tables indexed by slot, so a batch gathers them with one index operation. A miss reads
    the RIR (SofaRoom.rir) in this process and transforms it on the device. The tables never shrink below what one
    batch needs. With cache_dir, the transforms of all channels and the window are also stored there as .npy files
    (written once, atomically; keyed by the SOFA file's size and mtime, the FFT length and the window) that later
    processes and runs read instead of the SOFA file.
    """

    def __init__(self, device, megabytes, cache_dir=None):
        self.device, self.megabytes, self.cache_dir = torch.device(device), megabytes, cache_dir
        self.layout = None  # (fft length, channels, dry) of the tables
        self.slots = collections.OrderedDict()  # (sofa path, position, direct range) -> table row, least recent first
        self.rooms = {}  # sofa path -> SofaRoom, opened on its first miss
        self.spectra = self.power = self.direct = None

    def lookup(self, keys, fft_length, channels, dry):
        """Table rows (int64 [E], on the device) holding the spectra of `keys`; missing ones are computed first."""
        # The DataLoader's pin_memory turns tuples into lists: keys are made hashable again here.
        keys = [(path, int(position), tuple(direct_range)) for path, position, direct_range in keys]
        if (fft_length, channels, dry) != self.layout:
            self.layout, self.slots = (fft_length, channels, dry), collections.OrderedDict()
            self._resize(0)
        wanted = list(dict.fromkeys(keys))
        for key in wanted:
            if key in self.slots:
                self.slots.move_to_end(key)
        missing = [key for key in wanted if key not in self.slots]
        keep = self.megabytes * 2 ** 20 // self.entry_bytes(fft_length, channels, dry)  # entries
        if missing:
            limit = max(keep, len(wanted))  # a batch's own RIRs are always held
            self._forget(len(self.slots) + len(missing) - limit)  # this batch's keys are the most recent
            if len(self.power) < len(self.slots) + len(missing):
                self._resize(min(max(2 * len(self.power), len(self.slots) + len(missing)), limit))
            used = set(self.slots.values())
            free = [row for row in range(len(self.power)) if row not in used]
            self._compute(missing, free)
            self.slots.update(zip(missing, free))
        rows = torch.tensor([self.slots[key] for key in keys], dtype=torch.int64)
        self._forget(len(self.slots) - keep)  # their rows stay valid until the next lookup overwrites them
        if self.device.type == "cuda":  # a copy from pinned memory does not wait for the queued GPU work
            return rows.pin_memory().to(self.device, non_blocking=True)
        return rows.to(self.device)

    @staticmethod
    def entry_bytes(fft_length, channels, dry):
        """Bytes of one RIR position: C channel spectra, the power and (with dry targets) the window spectrum."""
        return (fft_length // 2 + 1) * (8 * channels + 4 + 8 * dry)

    def _forget(self, count):
        """Drop the `count` least recently used entries (their rows become free)."""
        for key in list(self.slots)[:max(count, 0)]:
            del self.slots[key]

    def _resize(self, capacity):
        """Tables with `capacity` rows, keeping the rows in use."""
        bins, channels, dry = self.layout[0] // 2 + 1, self.layout[1], self.layout[2]
        old = self.spectra, self.power, self.direct
        self.spectra = torch.empty(capacity, channels, bins, dtype=torch.complex64, device=self.device)
        self.power = torch.empty(capacity, bins, dtype=torch.float32, device=self.device)
        self.direct = torch.empty(capacity if dry else 0, bins, dtype=torch.complex64, device=self.device)
        if self.slots:  # only a growth keeps rows: a new layout starts empty
            kept = len(old[1])
            self.spectra[:kept], self.power[:kept], self.direct[:len(old[2])] = old

    def _compute(self, keys, rows):
        """Fill table rows with the spectra of keys: from the disk cache, or read and transformed in one call."""
        fft_length, channels, dry = self.layout
        with_window = dry or self.cache_dir is not None
        found, reads = [], []  # (row, room, spectra [R + 1, F] or None, cache file); (RIR [R, N], window)
        for key, row in zip(keys, rows):
            path, position, direct_range = key
            room = self.rooms.get(path) or self.rooms.setdefault(path, SofaRoom(path))
            if channels > room.num_channels:
                raise ValueError(f"{path}: {room.num_channels} RIR channels, {channels} requested")
            spectra = cache_file = None
            if self.cache_dir is not None:
                status = room.path.stat()
                text = (f"{room.path.resolve()}|{status.st_size}|{status.st_mtime_ns}|{fft_length}|{list(direct_range)}"
                        "|channels and window")  # the file layout: folders of earlier layouts are not read
                cache_file = (Path(self.cache_dir) / f"{room.path.stem}-{hashlib.sha1(text.encode()).hexdigest()[:16]}"
                              / f"{position}.npy")
                if cache_file.is_file():
                    with TIMER("reading"):
                        stored = np.load(cache_file)
                    shape = (room.num_channels + 1, fft_length // 2 + 1)
                    if stored.shape != shape or stored.dtype != np.complex64:
                        raise ValueError(f"{cache_file}: {stored.shape} {stored.dtype}, expected {shape} complex64; "
                                         "delete the folder")
                    spectra = torch.from_numpy(stored).to(self.device)
            if spectra is None:
                response = room.rir(position)  # float64 [R, N]
                peak = int(np.argmax(np.abs(response[0])))
                first = max(peak - int(direct_range[0] * SAMPLE_RATE / 1000), 0)
                last = min(peak + int(direct_range[1] * SAMPLE_RATE / 1000), response.shape[-1] - 1)
                reads.append((response, slice(first, last + 1)))
            found.append((row, room, spectra, cache_file))
        if reads:  # all reads in one transform: whole groups of 4 rows for pocketfft, one launch on a GPU
            sizes = [len(response) + with_window for response, _ in reads]
            stacked = np.zeros((fft_rows(sum(sizes)), fft_length), np.float32)  # padded here: one copy, not two
            for start, (response, window) in zip(np.cumsum([0] + sizes), reads):
                stacked[start:start + len(response), :response.shape[-1]] = response
                if with_window:  # the next row: channel 0 inside the direct-path window
                    stacked[start + len(response), window] = response[0, window]
            transformed = iter(rfft(torch.from_numpy(stacked).to(self.device), fft_length)[:sum(sizes)].split(sizes))
        for row, room, spectra, cache_file in found:
            if spectra is None:
                spectra = next(transformed)  # (R [+ 1], F)
                if cache_file is not None:
                    cache_file.parent.mkdir(parents=True, exist_ok=True)
                    _save_atomically(cache_file, spectra.cpu().numpy())
            channel_spectra = spectra[:room.num_channels]  # (R, F)
            self.power[row] = (channel_spectra.real.square() + channel_spectra.imag.square()).mean(0)
            self.spectra[row] = spectra[:channels]
            if dry:
                self.direct[row] = spectra[room.num_channels]


def spectra_megabytes(rooms, duration, channels=None, dry=True):
    """Megabytes RirSpectra takes to keep every position of `rooms` for scenes of `duration` s (channels None =
    all of the rooms')."""
    fft_length = scipy.fft.next_fast_len(int(duration * SAMPLE_RATE) + max(room.rir_length for room in rooms) - 1,
                                         real=True)
    entry = RirSpectra.entry_bytes(fft_length, channels or max(room.num_channels for room in rooms), dry)
    return sum(room.num_positions for room in rooms) * entry / 2 ** 20


def new_tensor(shape, dtype, shared=False):
    """torch.empty, or in shared memory: a batch made inside a DataLoader worker then reaches the training process
    without another copy (the queue would otherwise copy every tensor into shared memory)."""
    if not shared:
        return torch.empty(shape, dtype=dtype)
    storage = torch.UntypedStorage._new_shared(math.prod(shape) * dtype.itemsize)
    return torch.empty(0, dtype=dtype).set_(storage, 0, shape)


def stack_scenes(records, shared=False):
    """Scene records (Renderer.prepare) of one batch -> the scene batch that render_scenes takes.

    The E events of all B mixtures are listed together and their sources concatenated (T samples), so only real
    samples cross between processes. Tensors: sources float32 [T], source_lengths, onsets, full_lengths int64 [E],
    target_db float64 [E], event_items [E] (the mixture of each event), event_table [B, K] (the events of each
    mixture; E where it has fewer than K), foreground [E_fg] (events with a dry target) and dry_index [E_fg]
    (mixture * S + slot), background float32 [B, C, L]. Plain values: rir_keys [E], fft_length, dry_slots S (0 = no
    dry targets). shared: tensors in shared memory (set by collate inside a DataLoader worker).
    """
    shapes = sorted({record["background"].shape for record in records})
    if len(shapes) > 1:
        raise ValueError(f"the scenes of one batch differ in (channels, samples): {shapes}")
    channels, length = shapes[0]
    counts = [len(record["source_lengths"]) for record in records]
    events = sum(counts)
    dry_slots = max([NUM_SLOTS] + [len(record["labels"]) for record in records]) if records[0]["dry"] else 0
    event_table = np.full((len(records), max(counts + [1])), events, dtype=np.int64)
    event_items = np.repeat(np.arange(len(records)), counts)
    foreground, dry_index = [], []
    offset = 0
    for number, (record, count) in enumerate(zip(records, counts)):
        event_table[number, :count] = np.arange(offset, offset + count)
        if dry_slots:
            foreground += (offset + np.flatnonzero(record["slots"] >= 0)).tolist()
            dry_index += (number * dry_slots + record["slots"][record["slots"] >= 0]).tolist()
        offset += count
    span = max([length] + [int(np.max(record["onsets"] + record["source_lengths"])) for record in records if
                           len(record["onsets"])])
    fft_length = scipy.fft.next_fast_len(span + max(record["rir_length"] for record in records) - 1, real=True)

    def tensor(arrays, dtype):
        arrays = [np.asarray(array) for array in arrays]
        out = new_tensor((sum(len(array) for array in arrays), *arrays[0].shape[1:]), dtype, shared)
        np.concatenate(arrays, out=out.numpy(), casting="unsafe")
        return out

    background = new_tensor((len(records), channels, length), torch.float32, shared)
    np.stack([record["background"] for record in records], out=background.numpy())
    return {"sources": tensor([record["sources"] for record in records], torch.float32),
            **{key: tensor([record[key] for record in records], torch.int64)
               for key in ("source_lengths", "onsets", "full_lengths")},
            "target_db": tensor([record["target_db"] for record in records], torch.float64),
            "event_items": tensor([event_items], torch.int64), "event_table": tensor([event_table], torch.int64),
            "foreground": tensor([foreground], torch.int64), "dry_index": tensor([dry_index], torch.int64),
            "background": background, "rir_keys": [key for record in records for key in record["rir_keys"]],
            "fft_length": fft_length, "dry_slots": dry_slots}


def mix_events(mixture_spectra, scaled, table, slots, scenes):
    """mixture_spectra [B, C, F] += the scaled source spectra [E, F] times their RIR spectra (table[slots]).

    On the CPU one in-place multiply-add per event is fastest (memory traffic decides there); on a GPU the k-th
    events of all mixtures go at once (K steps, a fixed summation order: deterministic, unlike atomic adds).
    """
    if scaled.device.type == "cpu" and CPU_KERNELS:
        for event, (item, slot) in enumerate(zip(scenes["event_items"].tolist(), slots.tolist())):
            mixture_spectra[item].addcmul_(scaled[event], table[slot])  # (C, F)
        return
    scaled_or_zero = torch.cat([scaled, scaled.new_zeros(1, scaled.shape[-1])])  # (E + 1, F), row E: no event
    slots_or_any = torch.cat([slots, slots[:1]])  # (E + 1,)
    event_table = scenes["event_table"]  # (B, K)
    for k in range(event_table.shape[1]):
        column = event_table[:, k]  # (B,)
        mixture_spectra.addcmul_(scaled_or_zero[column][:, None], table[slots_or_any[column]])  # (B, C, F)


def render_scenes(scenes, spectra):
    """Render a scene batch (stack_scenes; its tensors on one device) there -> (mixture, dry).

    mixture float32 [B, C, L]; dry float32 [B, S, 1, L] (None without dry targets). Each event's source spectrum
    is scaled to the event level ref_db + snr, measured over all RIR channels and the whole convolution by Parseval
    from the cached RIR power (no inverse FFT); the scaled spectra times each RIR channel are summed per mixture;
    then one inverse FFT per mixture channel and per dry target (the source through the channel-0 direct-path
    window at the same gain), cut to L; the background is added last. Equal to the exact float64 computation within
    1e-4 of the peak.
    """
    background, fft_length, dry_slots = scenes["background"], scenes["fft_length"], scenes["dry_slots"]
    (B, C, L), events, bins = background.shape, len(scenes["rir_keys"]), fft_length // 2 + 1
    if not events:
        return background.clone(), background.new_zeros(B, dry_slots, 1, L) if dry_slots else None
    with TIMER("spectra"):
        slots = spectra.lookup(scenes["rir_keys"], fft_length, C, dry_slots > 0)  # (E,) table rows
    foreground = scenes["foreground"]  # (E_fg,)
    with TIMER("sources"):
        placed = place_sources(scenes["sources"], scenes["source_lengths"], scenes["onsets"], fft_rows(events),
                               fft_length)  # (rows, N)
        source_spectra = rfft(placed, fft_length)[:events]  # (E, F)
    with TIMER("mixing"):
        weighted = (source_spectra.real.square() + source_spectra.imag.square()) * spectra.power[slots]  # (E, F)
        # Parseval for a real signal: every bin counts twice except DC and (for an even length) Nyquist.
        energy = 2 * weighted.sum(-1).double() - weighted[:, 0]
        if fft_length % 2 == 0:
            energy = energy - weighted[:, -1]
        energy = energy / (fft_length * scenes["full_lengths"])  # mean square over channels and samples
        gain = torch.where(energy > 0, 10 ** (scenes["target_db"] / 20) / energy.clamp(min=1e-300).sqrt(), 1.0)
        scaled = source_spectra * gain.float()[:, None]  # (E, F)
        outputs = torch.zeros(fft_rows(B * C + len(foreground)), bins, dtype=torch.complex64, device=background.device)
        mix_events(outputs[:B * C].view(B, C, bins), scaled, spectra.spectra, slots, scenes)
        if len(foreground):
            torch.mul(scaled[foreground], spectra.direct[slots[foreground]],
                      out=outputs[B * C:B * C + len(foreground)])  # (E_fg, F)
    with TIMER("inverse"):
        waves = irfft(outputs, fft_length)  # (rows, N)
        mixture = waves[:B * C, :L].reshape(B, C, L) + background
        dry = None
        if dry_slots:
            dry = background.new_zeros(B * dry_slots, L)
            dry[scenes["dry_index"]] = waves[B * C:B * C + len(foreground), :L]
            dry = dry.view(B, dry_slots, 1, L)
    return mixture, dry


def _to_device(value, device):
    if torch.is_tensor(value):
        return value.to(device, non_blocking=True)
    if isinstance(value, dict):
        return {key: _to_device(item, device) for key, item in value.items()}
    return value


class BatchRenderer:
    """A DataLoader batch -> the same batch on `device`, with its scene records (key 'scene') rendered there into
    'mixture' [B, C, L] and 'dry_sources' [B, S, 1, L]; batches the workers rendered are only moved.

    Copies are non-blocking (from pinned memory when the DataLoader pins) and rendering only queues device work, so
    a training step never waits for the device here. RIR spectra stay on the device (RirSpectra, `megabytes`).
    """

    def __init__(self, device, megabytes, cache_dir=None):
        self.device = torch.device(device)
        self.spectra = RirSpectra(self.device, megabytes, cache_dir)

    def __call__(self, batch):
        batch = _to_device(batch, self.device)
        scenes = batch.pop("scene", None)
        if scenes is not None:
            batch["mixture"], dry = render_scenes(scenes, self.spectra)
            if dry is not None:
                batch["dry_sources"] = dry
        return batch


# ----------------------------------------------------------------------------------------------------------
# Scene generation for training


def item_rng(seed, index):
    """The random.Random of one item: a pure function of (seed, index), independent of workers and machines."""
    state = np.random.SeedSequence([int(seed), int(index)]).generate_state(2, dtype=np.uint64)
    return random.Random((int(state[0]) << 64) | int(state[1]))


def _unit(vectors):
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    return vectors / np.where(norms > 0, norms, 1.0)


class SceneGenerator:
    """Draws SpAudSyn metadata for one training mixture from a DataIndex, as the official 'generate' mode."""

    def __init__(self, index: DataIndex, config: SceneConfig):
        self.index, self.config = index, config
        if not index.rooms or not index.labels:
            raise ValueError(f"{index.root}: no rooms or no sound events to generate scenes from")
        if config.nevent_range[1] > len(index.labels):
            raise ValueError(f"{index.root}: nevent_range {config.nevent_range} needs more distinct classes than "
                             f"the {len(index.labels)} available")

    def _event(self, rng, room, label, file, folder, snr_range, role, position=None):
        relative, frames = file
        duration = frames / SAMPLE_RATE
        limit = min(self.config.max_event_duration, self.config.duration)  # an event never outlasts the scene
        source_time, event_duration = (rng.uniform(0, duration - limit), limit) if duration > limit else (0.0, duration)
        event_time = rng.uniform(0, self.config.duration - event_duration)
        position = rng.randrange(room.num_positions) if position is None else position
        return {"label": label, "source_file": relative, "source_time": source_time, "event_time": event_time,
                "event_duration": event_duration, "event_position": [room.positions[position].tolist()],
                "snr": rng.uniform(*snr_range), "role": role}

    def _duplicate(self, rng, room, events, base_labels):
        config = self.config
        label = rng.choice(base_labels)
        same = [event for event in events if event["label"] == label]
        references = _unit(np.array([event["event_position"][0] for event in same]))
        angles = np.degrees(np.arccos(np.clip(_unit(room.positions) @ references.T, -1.0, 1.0)))  # (M, refs)
        candidates = np.flatnonzero(np.all(angles > config.dupse_min_angle, axis=1)).tolist()
        if not candidates:
            raise ValueError(f"{room.path}: no RIR position more than {config.dupse_min_angle} degrees away from "
                             f"the {len(same)} {label} source(s); the room needs positions at more angles")
        position = rng.choice(candidates)
        used = [event["source_file"] for event in same]
        excluded = {tuple(Path(name).parts[1:-1][:config.exclusion_folder_depth]) for name in used}
        files = [file for file in self.index.events[label] if file[0] not in used
                 and (len(Path(file[0]).parts) == 2
                      or tuple(Path(file[0]).parts[1:-1][:config.exclusion_folder_depth]) not in excluded
                      or config.exclusion_folder_depth == 0)]
        if not files:
            raise ValueError(f"{self.index.folders['sound_event'] / label}: no file left for a duplicate after "
                             f"excluding {used} and their sub-folders")
        return self._event(rng, room, label, rng.choice(files), "foreground", config.snr_range, "foreground",
                           position)

    def generate(self, rng):
        """One scene as a SpAudSyn metadata dict, all randomness drawn from rng (a random.Random)."""
        config, index = self.config, self.index
        room = rng.choice(index.rooms)
        nevents = rng.randint(*config.nevent_range)
        events = []
        n_duplicates = 0
        if nevents >= 2 and rng.random() <= config.dupse_rate:
            n_duplicates = rng.randint(1, min(nevents - 1, config.max_n_dupse))
        for _ in range(nevents - n_duplicates):
            label = rng.choice([label for label in index.labels if label not in {e["label"] for e in events}])
            events.append(self._event(rng, room, label, rng.choice(index.events[label]), "foreground",
                                      config.snr_range, "foreground"))
        base_labels = [event["label"] for event in events]
        for _ in range(n_duplicates):
            events.append(self._duplicate(rng, room, events, base_labels))
        interference = []
        if index.interference_labels:
            for _ in range(rng.randint(*config.interference_range)):
                label = rng.choice(index.interference_labels)
                interference.append(self._event(rng, room, label, rng.choice(index.interference[label]),
                                                "interference", config.interference_snr_range, "interference"))
        background = []
        if index.noise:
            relative, frames, _ = rng.choice(index.noise)
            duration = frames / SAMPLE_RATE
            source_time = math.floor(rng.uniform(0, duration - config.duration)) if duration > config.duration else None
            background.append({"label": None, "source_file": relative, "source_time": source_time, "event_time": 0,
                               "event_duration": config.duration, "event_position": None, "snr": 0,
                               "role": "background"})
        # Paths in the official form ('data/dev_set/sound_event/train'), so the official code reads the metadata too.
        folders = {key: index.metadata_folder(name) for key, name in (
            ("foreground_dir", "sound_event"), ("background_dir", "noise"), ("interference_dir", "interference"))}
        return {
            "config": {"duration": config.duration, "sr": SAMPLE_RATE, "max_event_overlap": 3,
                       "max_event_dur": config.max_event_duration, "ref_db": config.ref_db, **folders,
                       "room_config": {"module": ROOM_MODULE, "main": "SofaRoom", "args": {
                           "path": index.metadata_folder("room_ir"),
                           "direct_range_ms": list(config.direct_range_ms)}},
                       "verbose": False},
            "fg_events": sorted(events, key=lambda event: event["event_time"]),
            "int_events": sorted(interference, key=lambda event: event["event_time"]),
            "bg_events": background,
            "room": room.metadata(f"{index.metadata_folder('room_ir')}/"
                                  f"{room.path.relative_to(index.folders['room_ir']).as_posix()}",
                                  config.direct_range_ms),
        }


# ----------------------------------------------------------------------------------------------------------
# Datasets


def label_vector(labels, mode="stack", silence_mode="zeros"):
    """Label list -> float32 tensor: 'stack' [n, C], 'concat' [n * C], 'multihot' [C]; C = 18 ('zeros': silence
    is an all-zero row) or 19 ('onehot': silence is class 18)."""
    if silence_mode not in ("zeros", "onehot"):
        raise ValueError(f"silence_label_mode {silence_mode!r}, expected 'zeros' or 'onehot'")
    rows = torch.zeros(len(labels), len(LABELS) + (silence_mode == "onehot"))
    for row, label in enumerate(labels):
        if label == SILENCE:
            if silence_mode == "onehot":
                rows[row, len(LABELS)] = 1.0
        elif label in LABELS:
            rows[row, LABELS.index(label)] = 1.0
        else:
            raise ValueError(f"unknown label {label!r}; expected one of LABELS or {SILENCE!r}")
    if mode == "stack":
        return rows
    if mode == "concat":
        return rows.reshape(-1)  # (n * C,)
    if mode == "multihot":
        return rows.amax(dim=0) if len(labels) else rows.sum(dim=0)
    raise ValueError(f"label_vector_mode {mode!r}, expected 'stack', 'concat' or 'multihot'")


def collate(items):
    """Batch dict: tensors stacked along a new first dim, scene records by stack_scenes, anything else a list per
    key. Inside a DataLoader worker the tensors are made in shared memory, so the batch is not copied again on its
    way to the training process."""
    shared = torch.utils.data.get_worker_info() is not None
    batch = {}
    for key in items[0]:
        values = [item[key] for item in items]
        if key == "scene":
            batch[key] = stack_scenes(values, shared)
        elif all(isinstance(value, torch.Tensor) for value in values):
            batch[key] = torch.stack(values, out=new_tensor((len(values), *values[0].shape), values[0].dtype, shared))
        else:
            batch[key] = values
    return batch


def _slots(labels, sources, length, modes):
    """Pad labels with silence (and sources [E, 1, L] with zeros) to NUM_SLOTS -> (labels, vector, sources)."""
    padding = max(NUM_SLOTS - len(labels), 0)
    labels = list(labels) + [SILENCE] * padding
    if sources is not None:
        sources = np.concatenate([sources, np.zeros((padding, 1, length), dtype=np.float32)])
        sources = torch.from_numpy(np.ascontiguousarray(sources, dtype=np.float32))  # (3, 1, L)
    return labels, label_vector(labels, *modes), sources


def _scene_item(renderer, record, labels, soundscape, scene, modes, render):
    """The dataset item of one scene: rendered here ('mixture' [C, L], 'dry_sources' [S, 1, L] with dry targets)
    or, with render False, its record under 'scene' for a batched render (BatchRenderer)."""
    labels = list(labels) + [SILENCE] * max(NUM_SLOTS - len(labels), 0)
    item = {"label": labels, "label_vector": label_vector(labels, *modes), "soundscape": soundscape,
            "metadata": scene}
    if not render:
        item["scene"] = record
        return item
    item["mixture"], dry = renderer.render_record(record)
    if dry is not None:
        item["dry_sources"] = dry
    return item


class GeneratedDataset(torch.utils.data.Dataset):
    """Training mixtures generated on the fly; item i is a pure function of (seed, i).

    data_root: the dev-set folder; split: the folders the scenes draw from ('train'; the demo's validation and
    test mixtures use 'valid'). spectrum_cache_dir: optional folder where RIR spectra are stored once and shared
    by all workers and runs (10 MB per RIR position for 4 x 174763 taps; see RirSpectra). num_channels: the first
    mixture channels to render (None = all; 1 for the 1-channel tagger); return_sources: render dry targets.
    render=False: items carry the prepared scene under 'scene' instead of 'mixture' / 'dry_sources', for
    BatchRenderer.
    """

    def __init__(self, data_root, scene=None, length=1000, seed=0, label_vector_mode="stack",
                 silence_label_mode="zeros", return_sources=True, split="train", spectrum_cache_dir=None,
                 num_channels=None, render=True):
        self.index = DataIndex(data_root, split)  # listed once here; workers receive a copy
        self.scene_config = scene if scene is not None else SceneConfig()
        self.generator = SceneGenerator(self.index, self.scene_config)
        self.renderer = Renderer(data_root, self.index.rooms, spectrum_cache_dir)
        self.length, self.seed = length, seed
        self.modes = (label_vector_mode, silence_label_mode)
        self.return_sources, self.num_channels, self.render = return_sources, num_channels, render

    def __len__(self):
        return self.length

    def scene(self, index):
        """The SpAudSyn metadata of item `index` (rendering it gives the same mixture)."""
        return self.generator.generate(item_rng(self.seed, index))

    def __getitem__(self, index):
        rng = item_rng(self.seed, index)
        with TIMER("scene"):
            scene = self.generator.generate(rng)
        record = self.renderer.prepare(scene, self.num_channels, self.return_sources)
        order = list(range(len(record["labels"])))
        if self.scene_config.shuffle_label:
            rng.shuffle(order)
        record["slots"][order] = np.arange(len(order))  # foreground events come first: event order[j] -> slot j
        return _scene_item(self.renderer, record, [record["labels"][i] for i in order], "soundscape_%08d" % index,
                           scene, self.modes, self.render)


def metadata_files(metadata_path):
    """valid.json (list of {'metadata_path': relative to its folder}) or a folder of *.json -> sorted paths."""
    path = Path(metadata_path)
    if path.is_dir():
        files = sorted(path.glob("*.json"))
    elif not path.is_file():
        raise ValueError(f"{path}: not found (expected valid.json or a folder of metadata JSON files)")
    else:
        try:
            entries = json.loads(path.read_text())
            files = [path.parent / entry["metadata_path"] for entry in entries]
        except (OSError, ValueError, TypeError, KeyError) as error:
            raise ValueError(f"{path}: expected a JSON list of {{'metadata_path': ...}} entries ({error})") from None
    missing = [str(file) for file in files if not file.is_file()]
    if missing:
        raise ValueError(f"{path}: metadata files not found: {', '.join(missing)}")
    if not files:
        raise ValueError(f"{path}: no metadata files")
    return files


def find_dev_set(metadata_path):
    """The dev set a metadata file or folder lies in: its nearest ancestor holding sound_event/ and room_ir/
    (DIR/metadata/valid.json -> DIR). Raises ValueError when there is none."""
    path = Path(os.path.abspath(metadata_path))
    for folder in (path, *path.parents):
        if (folder / "sound_event").is_dir() and (folder / "room_ir").is_dir():
            return folder
    raise ValueError(f"{metadata_path}: lies in no dev set (no folder above it holds sound_event/ and room_ir/); "
                     "name the dev set explicitly (data_root, --data_root)")


class MetadataDataset(torch.utils.data.Dataset):
    """Mixtures rendered from SpAudSyn metadata JSON files; name = the JSON file stem (spectrum_cache_dir,
    num_channels, render as in GeneratedDataset).

    data_root: the dev-set folder the metadata paths refer to (see Renderer); None = the dev set the metadata
    lies in (find_dev_set).
    """

    def __init__(self, metadata_path, data_root=None, label_vector_mode="stack", silence_label_mode="zeros",
                 return_sources=True, spectrum_cache_dir=None, num_channels=None, render=True):
        self.files = metadata_files(metadata_path)
        dev_set = data_root if data_root is not None else find_dev_set(metadata_path)
        self.renderer = Renderer(dev_set, (), spectrum_cache_dir)
        self.modes = (label_vector_mode, silence_label_mode)
        self.return_sources, self.num_channels, self.render = return_sources, num_channels, render

    def __len__(self):
        return len(self.files)

    def __getitem__(self, index):
        try:
            scene = json.loads(self.files[index].read_text())
            record = self.renderer.prepare(scene, self.num_channels, self.return_sources)
            return _scene_item(self.renderer, record, record["labels"], self.files[index].stem, scene, self.modes,
                               self.render)
        except (ValueError, KeyError, TypeError) as error:
            raise ValueError(f"{self.files[index]}: {error!r}") from None


def index_sources(folder, soundscapes):
    """Map each soundscape name to its source files [(path, label)] in folder, sorted by file name (the official
    loader's order). Returns (index, problems): a problem for every WAV whose name matches no soundscape, fits
    several, or carries an unknown label. Entries that are not WAV files are warned about and ignored.
    """
    folder = Path(folder)
    known = set(soundscapes)
    index = {name: [] for name in soundscapes}
    problems, ignored = [], []
    for path in sorted(folder.iterdir()):
        if path.suffix != ".wav" or not path.is_file():
            ignored.append(path.name)
            continue
        # A soundscape name is a prefix of the file name ending just before an underscore.
        candidates = [path.name[:position] for position, character in enumerate(path.name)
                      if character == "_" and path.name[:position] in known]
        parsed, errors = [], []
        for soundscape in candidates:
            try:
                parsed.append((soundscape, parse_source_name(soundscape, path.name)[1]))
            except ValueError as error:
                errors.append(str(error))
        if not candidates:
            problems.append(f"{path}: name matches no soundscape in the data folder")
        elif not parsed:
            problems.append(f"{path}: {errors[-1].split(': ', 1)[-1]}")
        elif len(parsed) > 1:
            problems.append(f"{path}: name fits several soundscapes ({', '.join(name for name, _ in parsed)})")
        else:
            soundscape, label = parsed[0]
            index[soundscape].append((path, label))
    if ignored:  # a warning (shown once per process), since callers may index the same folder twice
        warnings.warn(f"ignoring {len(ignored)} non-WAV entries in {folder}: {', '.join(ignored[:5])}"
                      + (" ..." if len(ignored) > 5 else ""))
    return index, problems


class WaveformDataset(torch.utils.data.Dataset):
    """Pre-rendered soundscapes (<soundscape_dir>/*.wav) with sources named '<soundscape>_<n>_<label>.wav'.

    target_dir gives 'label', 'label_vector', 'dry_sources'; estimate_dir gives the same keys prefixed 'est_'.
    More than NUM_SLOTS sources of one soundscape are all kept; fewer are padded with silence.
    """

    def __init__(self, soundscape_dir, target_dir=None, label_vector_mode="stack", silence_label_mode="zeros",
                 estimate_dir=None):
        self.files = sorted(Path(soundscape_dir).glob("*.wav"))
        if not self.files:
            raise ValueError(f"{soundscape_dir}: no .wav soundscapes")
        self.sources, problems = {}, []  # prefix -> {soundscape: [(path, label)]}
        for prefix, folder in (("", target_dir), ("est_", estimate_dir)):
            if folder is not None:
                self.sources[prefix], found = index_sources(folder, [path.stem for path in self.files])
                problems += found
        if problems:
            raise ValueError(f"{len(problems)} bad source file name(s):\n" + "\n".join(problems))
        self.modes = (label_vector_mode, silence_label_mode)

    def __len__(self):
        return len(self.files)

    def __getitem__(self, index):
        path = self.files[index]
        mixture = read_audio(path)
        item = {"mixture": torch.from_numpy(mixture), "soundscape": path.stem}
        for prefix, sources_of in self.sources.items():
            labels, sources = [], []
            for source_path, label in sources_of[path.stem]:
                source = read_audio(source_path)
                if len(source) != 1 or source.shape[1] != mixture.shape[1]:
                    raise ValueError(f"{source_path}: shape {source.shape}, expected mono of {mixture.shape[1]} "
                                     "samples")
                labels.append(label)
                sources.append(source)
            sources = np.stack(sources) if sources else np.zeros((0, 1, mixture.shape[1]), dtype=np.float32)
            labels, vector, sources = _slots(labels, sources, mixture.shape[1], self.modes)
            item.update({prefix + "label": labels, prefix + "label_vector": vector, prefix + "dry_sources": sources})
        return item


def parse_source_name(soundscape: str, filename: str) -> tuple[int | None, str]:
    """Split a source file name '<soundscape>_<n>_<label>.wav' or '<soundscape>_<label>.wav' into (n, label).

    n is None for the 2025 naming without slot index. Raises ValueError when the name does not belong to the
    soundscape or the label is not one of LABELS.
    """
    match = re.fullmatch(re.escape(soundscape) + r"(?:_(\d+))?_(.+)\.wav", filename)
    if match is None:
        raise ValueError(f"{filename}: expected '{soundscape}_<n>_<label>.wav' or '{soundscape}_<label>.wav'")
    index, label = match.groups()
    if label not in LABELS:
        raise ValueError(f"{filename}: unknown label {label!r}; expected one of {', '.join(LABELS)}")
    return (int(index) if index is not None else None), label


# ----------------------------------------------------------------------------------------------------------
# Benchmark


@dataclasses.dataclass
class BenchConfig:
    data: str = "data/dev_set"  # data root to generate from
    device: str = "cpu"  # where batches are rendered: 'cpu' or 'cuda'
    count: int = 64  # mixtures per measurement
    seed: int = 0  # generation seed
    tagger_batch: int = 32  # mixtures per tagger-style batch (official 1-channel recipe: 32 per GPU)
    separator_batch: int = 4  # mixtures per separator-style batch (official recipe: 4 per GPU)
    cache_megabytes: int = 4096  # RIR spectra kept on the device (train.py --rir_cache_megabytes)


def _breakdown(count, phases):
    return ", ".join(f"{phase} {TIMER.seconds[phase] * 1000 / count:.2f}" for phase in phases)


def _pinned(value):
    if torch.is_tensor(value):
        return value.pin_memory()
    return {key: _pinned(item) for key, item in value.items()} if isinstance(value, dict) else value


def bench(config: BenchConfig):
    """Print, for tagger-style and separator-style batches: worker ms per mixture (scene draw + reading), device
    mixtures/s with the breakdown, and ms per mixture when a worker renders one mixture at a time (CPU)."""
    global spectrum_cache_megabytes
    device = torch.device(config.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible")
    synchronize = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    start = time.perf_counter()
    try:
        rooms = DataIndex(config.data).rooms
    except ValueError as error:  # one line listing every problem
        raise SystemExit(f"--data {config.data}: not a usable dev set: "
                         f"{'; '.join(line.strip() for line in str(error).splitlines()[1:]) or error}")
    print(f"data {config.data}: {len(rooms)} rooms, {sum(r.num_positions for r in rooms)} positions, "
          f"{rooms[0].num_channels} channels x {rooms[0].rir_length} taps; index built in "
          f"{time.perf_counter() - start:.2f} s; torch threads {torch.get_num_threads()}; device {device}"
          f"{f' ({torch.cuda.get_device_name(device)})' if device.type == 'cuda' else ''}")
    fft_length = scipy.fft.next_fast_len(round(SceneConfig().duration * SAMPLE_RATE) + rooms[0].rir_length - 1,
                                         real=True)
    signal = np.random.default_rng(0).standard_normal(fft_length).astype(np.float32)
    timings = []
    for _ in range(20):
        start = time.perf_counter()
        scipy.fft.rfft(signal)
        timings.append(time.perf_counter() - start)
    print(f"machine load check: one float32 rfft of {fft_length} samples takes {min(timings) * 1000:.2f} ms "
          f"(median {np.median(timings) * 1000:.2f} ms)")
    styles = (("tagger-style: 1 channel, no dry targets", SceneConfig(nevent_range=(0, 3)),
               dict(num_channels=1, return_sources=False), config.tagger_batch),
              ("separator-style: 4 channels + dry targets", SceneConfig(), {}, config.separator_batch))
    for title, scene, options, batch_size in styles:
        print(f"\n{title}, {batch_size} mixtures per batch, {config.count} mixtures")
        dataset = GeneratedDataset(config.data, scene, length=config.count, seed=config.seed, render=False, **options)
        for index in range(config.count):  # brings the files of these scenes into the page cache
            dataset[index]
        TIMER.seconds.clear()
        start, cpu_start = time.perf_counter(), time.process_time()
        batches = [collate([dataset[index] for index in range(first, min(first + batch_size, config.count))])
                   for first in range(0, config.count, batch_size)]
        total = (time.perf_counter() - start) * 1000 / config.count
        cpu = (time.process_time() - cpu_start) * 1000 / config.count  # less affected by other jobs on the machine
        print(f"  worker: scene draw + reading + collate        {total:7.2f} ms/mixture  (CPU time {cpu:.2f}; "
              f"{_breakdown(config.count, ('scene', 'reading'))})")
        if device.type == "cuda":
            batches = [_pinned(batch) for batch in batches]
        renderer = BatchRenderer(device, config.cache_megabytes)
        for label in ("first pass (RIR spectra read + FFT)", "RIR spectra cached"):
            TIMER.seconds.clear()
            synchronize()
            start = time.perf_counter()
            for batch in batches:
                renderer(batch)
            synchronize()
            seconds = time.perf_counter() - start
            line = f"  device {device.type}, {label:<36} {config.count / seconds:8.1f} mixtures/s"
            if label == "RIR spectra cached":  # a second pass with a wait per phase gives the breakdown
                TIMER.seconds.clear()
                TIMER.device = device if device.type == "cuda" else None
                for batch in batches:
                    renderer(batch)
                TIMER.device = None
                line += f"  (ms/mixture: {_breakdown(config.count, ('spectra', 'sources', 'mixing', 'inverse'))})"
            print(line)
        rendering = GeneratedDataset(config.data, scene, length=config.count, seed=config.seed, **options)
        cache_dir = tempfile.mkdtemp(prefix="spectra-")
        try:
            for label, megabytes, folder in ((f"memory cache {spectrum_cache_megabytes} MB", spectrum_cache_megabytes,
                                              None), ("disk cache (warm), memory 0 MB", 0, cache_dir)):
                rendering.renderer = Renderer(config.data, rendering.index.rooms, folder)
                saved, spectrum_cache_megabytes = spectrum_cache_megabytes, megabytes
                if folder is not None:
                    for index in range(config.count):  # fills the disk cache with the positions the scenes use
                        rendering[index]
                TIMER.seconds.clear()
                start = time.perf_counter()
                for index in range(config.count):
                    rendering[index]
                total = (time.perf_counter() - start) * 1000 / config.count
                spectrum_cache_megabytes = saved
                print(f"  workers mode, one mixture at a time, {label:<31} {total:7.2f} ms/mixture  "
                      f"({_breakdown(config.count, ('scene', 'reading', 'spectra', 'sources', 'mixing', 'inverse'))})")
        finally:
            shutil.rmtree(cache_dir, ignore_errors=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bench", action="store_true", help="run the synthesis benchmark")
    add_config_flags(parser, BenchConfig)
    arguments = parser.parse_args()
    if not arguments.bench:
        parser.error("nothing to do; use --bench")
    bench(config_from_args(arguments, BenchConfig))


if __name__ == "__main__":
    main()
