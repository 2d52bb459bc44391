"""The development set on disk: the constants every file shares (sample rate, the 18 labels, output slots), audio
file reading, SOFA rooms (read with h5py) and the sorted file index of one split of a dev set (DataIndex).

The layout is the official one: every source folder has a `train` and a `valid` split (sound_event/<split>/<Label>/
**.wav, interference/<split>/<class>/**.wav, noise/<split>/**.wav, room_ir/<split>/*.sofa). Nothing here renders
or generates: render.py renders scenes from these files, synth.py draws the scenes and builds the datasets.

    python data_prep.py verify --data data/dev_set    # lists every problem DataIndex finds in a dev set
"""
import collections
import contextlib
import math
import os
import time
from pathlib import Path

import h5py
import numpy as np
import scipy.signal
import soundfile
import torch

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
        if len(channels) > 1:  # the mixtures of one batch must have one channel count
            self.problems.append(f"{self.folders['room_ir']}: rooms with different channel counts "
                                 f"({', '.join(f'{room.path.name}: {room.num_channels}' for room in self.rooms)})")
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
