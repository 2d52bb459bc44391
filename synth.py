"""Spatial mixture synthesizer (SpAudSyn-compatible) and the datasets that feed training and evaluation.

Mixtures are built exactly like the official SpAudSyn synthesizer: mono events are peak-normalised, convolved
with a 4-channel room impulse response (RIR) read from a SOFA file, scaled to ref_db + snr over the whole
convolution, and summed with a background; the dry target of an event is the same source convolved with the
direct-path window of channel 0 at the same scale. Three dataset modes:

    GeneratedDataset   random training scenes, item i a pure function of (seed, i)
    MetadataDataset    scenes from SpAudSyn metadata JSON files (validation)
    WaveformDataset    pre-rendered soundscapes with oracle or estimated sources (test / evaluation)

    python synth.py --bench --data data/dev_set     # ms per generated training mixture, with a breakdown

Speed: RIR spectra are kept in a per-process memory cache (spectrum_cache_megabytes) and, when a dataset gets
spectrum_cache_dir, in .npy files there shared by all workers and runs (8 MB per RIR position of the dev set).
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
spectrum_cache_megabytes = 256  # per process; RIR spectra kept so that repeated positions skip the read + FFT
_SPECTRA = collections.OrderedDict()  # (sofa path, position, fft length, window) -> spectra, least recent first


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
    """Accumulates wall time per phase ('reading', 'convolution') for the benchmark; costs ~1 us per call."""

    def __init__(self):
        self.seconds = collections.Counter()

    @contextlib.contextmanager
    def __call__(self, phase):
        start = time.perf_counter()
        try:
            yield
        finally:
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
        self._padded = {}  # fft length -> float32 [R, fft length] work buffer with a zero tail

    def __getstate__(self):  # DataLoader workers open their own handle and buffers
        state = dict(self.__dict__)
        state["_file"], state["_padded"] = None, {}
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

    def _cache_folder(self, cache_dir, fft_length, direct_range_ms):
        """Disk-cache folder of this room: keyed by the file (path, size, mtime), the FFT length, the window."""
        status = self.path.stat()
        key = f"{self.path.resolve()}|{status.st_size}|{status.st_mtime_ns}|{fft_length}|{list(direct_range_ms)}"
        return Path(cache_dir) / f"{self.path.stem}-{hashlib.sha1(key.encode()).hexdigest()[:16]}"

    def _compute_spectra(self, index, fft_length, direct_range_ms):
        response = self.rir(index)
        peak = int(np.argmax(np.abs(response[0])))
        first = max(peak - int(direct_range_ms[0] * SAMPLE_RATE / 1000), 0)
        last = min(peak + int(direct_range_ms[1] * SAMPLE_RATE / 1000), response.shape[-1] - 1)
        with TIMER("convolution"):
            padded = self._padded.get(fft_length)
            if padded is None:  # zero tail written once; each RIR only overwrites the head
                self._padded = {fft_length: np.zeros((self.num_channels, fft_length), dtype=np.float32)}
                padded = self._padded[fft_length]
            padded[:, :response.shape[-1]] = response
            spectrum = scipy.fft.rfft(padded, axis=-1)
        return spectrum, response[0, first:last + 1].astype(np.float32), first

    def spectra(self, index, fft_length, direct_range_ms, cache_dir=None):
        """(rfft of the normalised RIR, complex64 [R, F]; channel-0 direct-path taps float32 [D]; first tap).

        The direct path is [argmax|h0| - before, argmax|h0| + after] inclusive, clipped to the RIR. Results are
        kept in a per-process LRU cache of `spectrum_cache_megabytes`. With cache_dir, they are also stored
        there as .npy files (written once, atomically; keyed by the SOFA file's size and mtime, the FFT length
        and the window), so that later processes and runs copy them instead of reading and transforming.
        """
        key = (str(self.path), index, fft_length, tuple(direct_range_ms))
        if key in _SPECTRA:
            _SPECTRA.move_to_end(key)
            return _SPECTRA[key]
        value = None
        if cache_dir is not None:
            folder = self._cache_folder(cache_dir, fft_length, direct_range_ms)
            spectrum_path, direct_path = folder / f"{index}.npy", folder / f"{index}.direct.npy"
            if spectrum_path.is_file():  # written last, so the direct window is complete too
                with TIMER("reading"):
                    direct = np.load(direct_path)
                    value = (np.load(spectrum_path), direct[1:].astype(np.float32), int(direct[0]))
                if value[0].shape != (self.num_channels, fft_length // 2 + 1) or value[0].dtype != np.complex64:
                    raise ValueError(f"{spectrum_path}: shape {value[0].shape} {value[0].dtype}, expected "
                                     f"({self.num_channels}, {fft_length // 2 + 1}) complex64; delete the folder")
        if value is None:
            value = self._compute_spectra(index, fft_length, direct_range_ms)
            if cache_dir is not None:
                folder.mkdir(parents=True, exist_ok=True)
                _save_atomically(direct_path, np.concatenate([[value[2]], value[1]]).astype(np.float64))
                _save_atomically(spectrum_path, value[0])
        limit = spectrum_cache_megabytes * 2 ** 20
        if value[0].nbytes <= limit:
            _SPECTRA[key] = value
            while sum(cached[0].nbytes for cached in _SPECTRA.values()) > limit:
                _SPECTRA.popitem(last=False)
        return value


def _save_atomically(path, array):
    """np.save to a temporary name in the same folder, then rename: readers never see a partial file."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(temporary, "wb") as file:
        np.save(file, array)
    os.replace(temporary, path)


def spectrum_energy(spectrum, fft_length):
    """Sum of squares of irfft(spectrum, fft_length) over all axes, by Parseval, without the inverse FFT."""
    flat = spectrum.reshape(-1, spectrum.shape[-1])
    total = 2.0 * float(np.vdot(flat, flat).real) - float(np.vdot(flat[:, 0], flat[:, 0]).real)
    if fft_length % 2 == 0:  # the Nyquist bin appears once in the full spectrum
        total -= float(np.vdot(flat[:, -1], flat[:, -1]).real)
    return total / fft_length


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
        self.cache_dir = cache_dir  # optional folder of RIR spectra shared by processes (SofaRoom.spectra)
        self._buffers = {}  # work arrays by (shape, dtype), allocated once per process

    def __getstate__(self):  # work arrays are not sent to DataLoader workers
        state = dict(self.__dict__)
        state["_buffers"] = {}
        return state

    def _work(self, name, shape, dtype=np.complex64, zero=False):
        """A reusable work array: large temporaries allocated per call cost page faults and memory traffic."""
        key = (name, tuple(shape), np.dtype(dtype))
        if key not in self._buffers:
            self._buffers[key] = np.zeros(shape, dtype=dtype)
        elif zero:
            self._buffers[key].fill(0)
        return self._buffers[key]

    def _source_spectra(self, placed, fft_length):
        """rfft of every (source, onset) zero-padded to fft_length and shifted by its onset -> complex64 [E, F].

        The transforms run as one call on a multiple of 4 rows: pocketfft vectorises 4 rows for the price of ~1.3.
        """
        if not placed:
            return None
        with TIMER("convolution"):
            rows = -(-len(placed) // 4) * 4
            padded = self._work("sources", (rows, fft_length), np.float32, zero=True)
            for row, (source, onset) in enumerate(placed):
                padded[row, onset:onset + len(source)] = source
            return scipy.fft.rfft(padded, axis=-1)

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

    def render(self, scene):
        """Metadata dict -> {'mixture' float32 [C, L], 'dry_sources' float32 [E, 1, L], 'labels' [E]}.

        E = foreground events in event_time order. Follows SpAudSyn: int(time * sr) sample arithmetic, peak
        normalisation, level over all channels and the whole convolution, dry = channel-0 direct path.
        """
        keep_heap_memory()
        config = scene["config"]
        if int(config["sr"]) != SAMPLE_RATE:
            raise ValueError(f"metadata sr {config['sr']}, expected {SAMPLE_RATE}")
        length = int(config["duration"] * SAMPLE_RATE)
        room_metadata = scene["room"]["args"]["metadata"]
        room = self.room(room_metadata["sofa_path"])
        direct_range = tuple(room_metadata.get("direct_range_ms", (6, 50)))
        foreground = sorted(scene.get("fg_events") or [], key=lambda event: event["event_time"])
        interference = sorted(scene.get("int_events") or [], key=lambda event: event["event_time"])
        events = []  # (event, peak-normalised source, onset, position index, is foreground)
        for event_list, folder_key, is_foreground in ((foreground, "foreground_dir", True),
                                                      (interference, "interference_dir", False)):
            for event in event_list:
                if not 0 <= event["event_time"] < config["duration"]:
                    raise ValueError(f"event {event['source_file']}: event_time {event['event_time']} s is outside "
                                     f"the {config['duration']} s mixture")
                path = self.resolve(config[folder_key], event["source_file"])
                audio = read_audio(path, int(event["source_time"] * SAMPLE_RATE),
                                   int(event["event_duration"] * SAMPLE_RATE))
                source = audio[0] if len(audio) == 1 else audio.mean(axis=0)  # mono like librosa
                peak = np.max(np.abs(source)) if source.size else 0.0
                if peak > 0:
                    source = source / peak
                try:
                    position = room.find_position(event["event_position"])
                except ValueError as error:
                    raise ValueError(f"event {event['source_file']}: {error}") from None
                events.append((event, source, int(event["event_time"] * SAMPLE_RATE), position, is_foreground))
        span = max([length] + [onset + len(source) for _, source, onset, _, _ in events])
        fft_length = scipy.fft.next_fast_len(span + room.rir_length - 1, real=True)
        source_spectra = self._source_spectra([(source, onset) for _, source, onset, _, _ in events], fft_length)
        total = None  # (C, F) complex64 sum of the scaled wet spectra
        dry_sources = []
        for number, (event, source, onset, position, is_foreground) in enumerate(events):
            room_spectrum, direct, first = room.spectra(position, fft_length, direct_range, self.cache_dir)
            with TIMER("convolution"):
                wet = np.multiply(room_spectrum, source_spectra[number], out=self._work("wet", room_spectrum.shape))
                energy = spectrum_energy(wet, fft_length) / (room.num_channels * (len(source) + room.rir_length - 1))
                gain = 10 ** ((config["ref_db"] + event["snr"] - 10 * math.log10(energy)) / 20) if energy > 0 else 1.0
                if total is None:
                    total = np.multiply(wet, np.float32(gain), out=self._work("total", wet.shape))
                else:
                    wet *= np.float32(gain)
                    total += wet
                if is_foreground:  # the direct path is short: a direct convolution beats another long FFT
                    dry = np.zeros(length, dtype=np.float32)
                    start = onset + first
                    if start < length and len(source):
                        part = scipy.signal.oaconvolve(source[:length - start], direct)[:length - start]
                        dry[start:start + len(part)] = part * np.float32(gain)
                    dry_sources.append(dry)
        with TIMER("convolution"):
            if total is None:
                mixture = np.zeros((room.num_channels, length), dtype=np.float32)
            else:
                mixture = scipy.fft.irfft(total, fft_length, axis=-1, overwrite_x=True)[:, :length]
        for event in scene.get("bg_events") or []:
            mixture += self._background(config, event, room.num_channels, length)
        dry = np.stack(dry_sources)[:, None] if dry_sources else np.zeros((0, 1, length), dtype=np.float32)
        return {"mixture": np.ascontiguousarray(mixture, dtype=np.float32), "dry_sources": dry.astype(np.float32),
                "labels": [event["label"] for event in foreground]}

    def _background(self, config, event, channels, length):
        """Background scaled to ref_db (+ its snr, 0) over all channels and samples; tiled when short."""
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
            return 0.0
        if audio.shape[1] < length:
            audio = np.pad(audio, ((0, 0), (0, length - audio.shape[1])))
        energy = float(np.mean(audio.astype(np.float64) ** 2))
        if energy == 0:
            return audio
        return audio * np.float32(10 ** ((config["ref_db"] + event.get("snr", 0) - 10 * math.log10(energy)) / 20))


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
    """Batch dict: tensors stacked along a new first dim, everything else a list per key."""
    batch = {}
    for key in items[0]:
        values = [item[key] for item in items]
        batch[key] = torch.stack(values) if all(isinstance(v, torch.Tensor) for v in values) else values
    return batch


def _slots(labels, sources, length, modes):
    """Pad labels with silence (and sources [E, 1, L] with zeros) to NUM_SLOTS -> (labels, vector, sources)."""
    padding = max(NUM_SLOTS - len(labels), 0)
    labels = list(labels) + [SILENCE] * padding
    if sources is not None:
        sources = np.concatenate([sources, np.zeros((padding, 1, length), dtype=np.float32)])
        sources = torch.from_numpy(np.ascontiguousarray(sources, dtype=np.float32))  # (3, 1, L)
    return labels, label_vector(labels, *modes), sources


def _make_item(mixture, labels, sources, soundscape, modes):
    labels, vector, sources = _slots(labels, sources, mixture.shape[-1], modes)
    item = {"mixture": torch.from_numpy(np.ascontiguousarray(mixture, dtype=np.float32)), "label": labels,
            "label_vector": vector, "soundscape": soundscape}
    if sources is not None:
        item["dry_sources"] = sources
    return item


class GeneratedDataset(torch.utils.data.Dataset):
    """Training mixtures generated on the fly; item i is a pure function of (seed, i).

    data_root: the dev-set folder; split: the folders the scenes draw from ('train'; the demo's validation and
    test mixtures use 'valid'). spectrum_cache_dir: optional folder where RIR spectra are stored once and shared
    by all workers and runs (8 MB per RIR position for 4 x 174763 taps; see SofaRoom.spectra). It roughly halves
    the time per mixture.
    """

    def __init__(self, data_root, scene=None, length=1000, seed=0, label_vector_mode="stack",
                 silence_label_mode="zeros", return_sources=True, split="train", spectrum_cache_dir=None):
        self.index = DataIndex(data_root, split)  # listed once here; workers receive a copy
        self.scene_config = scene if scene is not None else SceneConfig()
        self.generator = SceneGenerator(self.index, self.scene_config)
        self.renderer = Renderer(data_root, self.index.rooms, spectrum_cache_dir)
        self.length, self.seed = length, seed
        self.modes = (label_vector_mode, silence_label_mode)
        self.return_sources = return_sources

    def __len__(self):
        return self.length

    def scene(self, index):
        """The SpAudSyn metadata of item `index` (rendering it gives the same mixture)."""
        return self.generator.generate(item_rng(self.seed, index))

    def __getitem__(self, index):
        rng = item_rng(self.seed, index)
        scene = self.generator.generate(rng)
        rendered = self.renderer.render(scene)
        order = list(range(len(rendered["labels"])))
        if self.scene_config.shuffle_label:
            rng.shuffle(order)
        item = _make_item(rendered["mixture"], [rendered["labels"][i] for i in order],
                          rendered["dry_sources"][order] if self.return_sources else None,
                          "soundscape_%08d" % index, self.modes)
        item["metadata"] = scene
        return item


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
    """Mixtures rendered from SpAudSyn metadata JSON files; name = the JSON file stem (spectrum_cache_dir as in
    GeneratedDataset).

    data_root: the dev-set folder the metadata paths refer to (see Renderer); None = the dev set the metadata
    lies in (find_dev_set).
    """

    def __init__(self, metadata_path, data_root=None, label_vector_mode="stack", silence_label_mode="zeros",
                 return_sources=True, spectrum_cache_dir=None):
        self.files = metadata_files(metadata_path)
        dev_set = data_root if data_root is not None else find_dev_set(metadata_path)
        self.renderer = Renderer(dev_set, (), spectrum_cache_dir)
        self.modes = (label_vector_mode, silence_label_mode)
        self.return_sources = return_sources

    def __len__(self):
        return len(self.files)

    def __getitem__(self, index):
        try:
            scene = json.loads(self.files[index].read_text())
            rendered = self.renderer.render(scene)
        except (ValueError, KeyError, TypeError) as error:
            raise ValueError(f"{self.files[index]}: {error!r}") from None
        item = _make_item(rendered["mixture"], rendered["labels"],
                          rendered["dry_sources"] if self.return_sources else None, self.files[index].stem,
                          self.modes)
        item["metadata"] = scene
        return item


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
    count: int = 40  # mixtures timed per measurement
    seed: int = 0  # generation seed
    cache_megabytes: int = 256  # RIR spectrum cache per process (the measurement is also repeated with 0)
    cache_dir: str = ""  # folder for the on-disk spectrum cache measurement ('' = a temporary folder, removed)


def _measure(label, count, work):
    TIMER.seconds.clear()
    start = time.perf_counter()
    for index in range(count):
        work(index)
    total = (time.perf_counter() - start) * 1000 / count
    reading, convolution = (TIMER.seconds[key] * 1000 / count for key in ("reading", "convolution"))
    print(f"{label:<52} {total:7.1f} ms/mixture  (reading {reading:6.1f}, convolution {convolution:6.1f}, "
          f"rest {total - reading - convolution:6.1f})")


def bench(config: BenchConfig):
    """Print ms per generated training mixture and per metadata render (one process), with the breakdown."""
    global spectrum_cache_megabytes
    start = time.perf_counter()
    dataset = GeneratedDataset(config.data, SceneConfig(), length=config.count, seed=config.seed)
    rooms = dataset.index.rooms
    print(f"data {config.data}: {len(rooms)} rooms, {sum(r.num_positions for r in rooms)} positions, "
          f"{rooms[0].num_channels} channels x {rooms[0].rir_length} taps; "
          f"index built in {time.perf_counter() - start:.2f} s; torch threads {torch.get_num_threads()}")
    scenes = [dataset.scene(index) for index in range(config.count)]
    dataset[0]  # opens the room files
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
    render = lambda index: dataset.renderer.render(scenes[index])  # noqa: E731
    spectrum_cache_megabytes = 0
    start = time.perf_counter()
    for index in range(config.count):  # brings the RIRs of these scenes into the page cache
        render(index)
    print(f"warm-up render of the {config.count} scenes: {time.perf_counter() - start:.1f} s")
    for megabytes in (config.cache_megabytes, 0):
        spectrum_cache_megabytes = megabytes
        _SPECTRA.clear()
        _measure(f"generate + render, memory cache {megabytes} MB", config.count, dataset.__getitem__)
        _SPECTRA.clear()
        _measure(f"render from metadata, memory cache {megabytes} MB", config.count, render)
    cache_dir = config.cache_dir or tempfile.mkdtemp(prefix="spectra-")
    try:
        dataset.renderer.cache_dir = cache_dir
        start = time.perf_counter()
        for index in range(config.count):  # fills the disk cache with the positions the scenes use
            render(index)
        print(f"disk cache {cache_dir}: filled in {time.perf_counter() - start:.1f} s")
        _measure("generate + render, disk cache (warm), memory 0 MB", config.count, dataset.__getitem__)
        _measure("render from metadata, disk cache (warm), memory 0 MB", config.count, render)
    finally:
        dataset.renderer.cache_dir = None
        if not config.cache_dir:
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
