"""The development set on disk: the constants every file shares, audio files, SOFA rooms, the file index of one
split, the paths inside metadata and the names of source files (synth.py renders, data_prep.py builds and checks).

Layout (the official one): sound_event/<split>/<Label>/**.wav, interference/<split>/<class>/**.wav,
noise/<split>/**.wav, room_ir/<split>/*.sofa with split train | valid, metadata/valid.json and metadata/valid/,
and the test set synthesized/test/{soundscape,oracle_target}.
"""
import functools
import json
import math
import os
import re
from pathlib import Path

import h5py
import numpy as np
import scipy.signal
import soundfile
import torch

from cli import atomic_path

SAMPLE_RATE = 32000  # Hz, the only rate of the dev set and the models
NUM_SLOTS = 3  # output slots per mixture (up to three target events)
SILENCE = "silence"  # label of an empty slot
LABELS = (  # the 18 target classes, in the official index order
    "AlarmClock", "BicycleBell", "Blender", "Buzzer", "Clapping", "Cough", "CupboardOpenClose", "Dishes",
    "Doorbell", "FootSteps", "HairDryer", "MechanicalFans", "MusicalKeyboard", "Percussion", "Pour", "Speech",
    "Typing", "VacuumCleaner",
)
SPLITS = ("train", "valid")  # training draws from train; the validation metadata reference valid
SOURCE_FOLDERS = ("sound_event", "interference", "noise", "room_ir")  # each split into SPLITS
OFFICIAL_PREFIX = "data/dev_set/"  # the dev set in metadata paths (relative to the official repository root)
POSITION_TOLERANCE = 1e-3  # m, a SpAudSyn event position must lie this close to a stored RIR position


def label_vector(labels, mode="stack", silence_mode="zeros"):
    """Labels -> 'stack' [n, K], 'concat' [n * K] or 'multihot' [K]; K = 18 ('zeros') or 19 ('onehot': 18 = silence)."""
    if silence_mode not in ("zeros", "onehot") or mode not in ("stack", "concat", "multihot"):
        raise ValueError(f"label_vector_mode {mode!r}, silence_label_mode {silence_mode!r}: expected 'stack', "
                         "'concat' or 'multihot', and 'zeros' or 'onehot'")
    names = LABELS + ((SILENCE,) if silence_mode == "onehot" else ())
    rows = torch.zeros(len(labels), len(names))
    for row, label in enumerate(labels):
        if label not in names and label != SILENCE:
            raise ValueError(f"unknown label {label!r}; expected one of LABELS or {SILENCE!r}")
        if label in names:
            rows[row, names.index(label)] = 1.0
    return {"stack": rows, "concat": rows.reshape(-1), "multihot": rows.sum(0).clamp(max=1)}[mode]


# ---- Audio files, SOFA rooms (netCDF-4 / HDF5, read with h5py) ---------------------------------------------------
def audio_info(path):
    """soundfile.info of a WAV; a ValueError naming the file."""
    try:
        return soundfile.info(str(path))
    except Exception as error:  # soundfile raises several types for broken or missing files
        raise ValueError(f"{path}: unreadable audio file ({error})") from None


def read_audio(path, start=0, frames=-1):
    """Frames [start, start + frames) as float32 [C, n]; the file must be at SAMPLE_RATE."""
    try:
        with soundfile.SoundFile(str(path)) as file:
            if file.samplerate != SAMPLE_RATE:
                raise ValueError(f"{path}: sample rate {file.samplerate} Hz, expected {SAMPLE_RATE} Hz")
            file.seek(start)
            audio = file.read(frames, dtype="float32", always_2d=True)
    except (RuntimeError, soundfile.LibsndfileError) as error:
        raise ValueError(f"{path}: unreadable audio file ({error})") from None
    return np.ascontiguousarray(audio.T)


def write_audio(path, audio, subtype="PCM_16") -> bool:
    """Write [C, n] or [n] audio atomically -> False when the file holds it already; other audio there is an error."""
    path, frames = Path(path), np.asarray(audio, dtype=np.float32)
    frames = frames.T if frames.ndim == 2 else frames[:, None]  # (n, C)
    if path.exists():
        try:
            existing, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
        except Exception:  # soundfile raises several types for broken files: then it is other content
            existing, rate = np.zeros(0), None
        held = np.clip(frames, -1.0, 32767 / 32768) if subtype == "PCM_16" else frames  # libsndfile clips at 1
        if rate == SAMPLE_RATE and existing.shape == frames.shape and np.allclose(existing, held, 0, 1.01 / 32768):
            return False
        raise FileExistsError(f"{path}: exists with different content; remove it to write it again")
    with atomic_path(path) as temporary:
        soundfile.write(str(temporary), frames, SAMPLE_RATE, subtype=subtype, format="WAV")
    return True


class SofaRoom:
    """One SOFA room: positions in memory, RIRs read per position through a per-process h5py handle."""

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
                stored = np.asarray(file["SourcePosition"], dtype=np.float64).reshape(-1, 3)
                kind = file["SourcePosition"].attrs.get("Type", b"cartesian")
                kind = (kind.decode() if isinstance(kind, bytes) else str(kind)).lower()
        except OSError as error:
            raise ValueError(f"{self.path}: unreadable SOFA file ({error})") from None
        self.num_positions, self.num_channels, self.native_length = shape
        if len(stored) == 1:  # one position shared by all measurements (dimension I)
            stored = np.repeat(stored, self.num_positions, axis=0)
        if len(stored) != self.num_positions:
            raise ValueError(f"{self.path}: {len(stored)} source positions for {self.num_positions} RIRs")
        self.stored = stored  # (M, 3) as written in the file: what SpatialScaper (2025) metadata holds
        if kind not in ("spherical", "cartesian"):
            raise ValueError(f"{self.path}: SourcePosition Type {kind!r}, expected 'cartesian' or 'spherical'")
        self.positions = stored  # cartesian: what SpAudSyn metadata holds
        if kind == "spherical":  # degrees, degrees, metres, converted as python-sofa does (its float order)
            azimuth, elevation, radius = np.deg2rad(stored[:, 0]), np.deg2rad(stored[:, 1]), stored[:, 2]
            self.positions = np.stack([radius * np.cos(azimuth) * np.cos(elevation),
                                       radius * np.sin(azimuth) * np.cos(elevation), radius * np.sin(elevation)], 1)
        self.rir_length = math.ceil(self.native_length * SAMPLE_RATE / self.native_rate)  # after resampling
        self._file, self._pid = None, None

    def __getstate__(self):  # DataLoader workers open their own handle
        return dict(self.__dict__, _file=None)

    def find_position(self, position, stored=False):
        """Index of the RIR at [x, y, z] within 1 mm (SpAudSyn), or of the nearest stored row (SpatialScaper)."""
        target = np.asarray(position, dtype=np.float64).reshape(-1)
        if target.shape != (3,):
            raise ValueError(f"{self.path}: event_position {position!r} is not one [x, y, z] point")
        distances = np.linalg.norm((self.stored if stored else self.positions) - target, axis=1)
        index = int(np.argmin(distances))
        if not stored and distances[index] > POSITION_TOLERANCE:
            raise ValueError(f"{self.path}: no RIR at position {target.tolist()} (nearest is "
                             f"{distances[index] * 1000:.1f} mm away, tolerance {POSITION_TOLERANCE * 1000:g} mm)")
        return index

    def rir(self, index, normalisation="rms"):
        """Normalised RIR float64 [R, N] of one position: 'rms' (SpAudSyn) divides by the RMS over channels of the
        per-channel energies, 'l2' (SpatialScaper) by the mean over channels of the per-channel L2 norms."""
        if self._file is None or self._pid != os.getpid():
            self._file, self._pid = h5py.File(self.path, "r"), os.getpid()
        response = np.empty((self.num_channels, self.native_length), dtype=np.float64)
        self._file["Data.IR"].read_direct(response, np.s_[index])
        if self.native_rate != SAMPLE_RATE:
            divisor = math.gcd(SAMPLE_RATE, int(round(self.native_rate)))
            response = scipy.signal.resample_poly(response, SAMPLE_RATE // divisor,
                                                  int(round(self.native_rate)) // divisor, axis=-1)
        energies = np.einsum("ij,ij->i", response, response)
        norm = math.sqrt(float(np.mean(energies))) if normalisation == "rms" else float(np.mean(np.sqrt(energies)))
        return response / norm if norm > 0 else response


def open_room(path) -> SofaRoom:
    """The SofaRoom of a file, opened once per process (and again when the file changes)."""
    try:
        status = Path(path).stat()
    except OSError as error:
        raise ValueError(f"{path}: unreadable SOFA file ({error.strerror})") from None
    return _room(Path(path), status.st_mtime_ns, status.st_size)


@functools.lru_cache(maxsize=None)
def _room(path, modified, size):
    return SofaRoom(path)


# ---- The file index of one split ---------------------------------------------------------------------------------
def sorted_wavs(folder):
    """The .wav files under folder, recursively, in a machine-independent order; hidden entries skipped."""
    found = []
    for directory, subdirectories, files in os.walk(folder):
        subdirectories[:] = [name for name in subdirectories if not name.startswith(".")]
        found += [Path(directory) / name for name in files if name.lower().endswith(".wav")
                  and not name.startswith(".")]
    return sorted(found, key=lambda path: path.relative_to(folder).parts)


class DataIndex:
    """Sorted listing of one split with file lengths, built once per dataset. Problems (rate, channels, empty folders,
    unreadable files) raise one ValueError listing all, or are kept in `problems` with strict=False."""

    def __init__(self, data_root, split="train", strict=True):
        if split not in SPLITS:
            raise ValueError(f"split {split!r}, expected one of {', '.join(SPLITS)}")
        self.root, self.split = Path(data_root), split
        self.folders = {name: self.root / name / split for name in SOURCE_FOLDERS}
        self.problems, self.rooms = [], []
        if not self.folders["room_ir"].is_dir():
            self.problems.append(f"{self.folders['room_ir']}: missing folder of .sofa rooms")
        else:
            for path in sorted(self.folders["room_ir"].rglob("*.sofa")):
                try:
                    self.rooms.append(open_room(path))
                except ValueError as error:
                    self.problems.append(str(error))
            if not self.rooms and not self.problems:
                self.problems.append(f"{self.folders['room_ir']}: no .sofa room files")
        channels = {room.num_channels for room in self.rooms}
        if len(channels) > 1:  # the mixtures of one batch must have one channel count
            self.problems.append(f"{self.folders['room_ir']}: rooms with different channel counts "
                                 f"({', '.join(f'{room.path.name}: {room.num_channels}' for room in self.rooms)})")
        self.events = self._classes(self.folders["sound_event"], required=True)
        for label in sorted(set(self.events) - set(LABELS)):
            self.problems.append(f"{self.folders['sound_event'] / label}: unknown class; expected one of LABELS")
        self.labels = [label for label in LABELS if label in self.events]  # official index order
        self.interference = self._classes(self.folders["interference"], required=False)
        self.interference_labels = sorted(self.interference)
        self.noise = []  # (path relative to the noise folder, frames, channels)
        if self.folders["noise"].is_dir():
            for path in sorted_wavs(self.folders["noise"]):
                info = self._check(path, None)
                if info is not None and channels and info.channels not in channels:
                    self.problems.append(f"{path}: {info.channels} channels, expected {sorted(channels)} like the "
                                         "rooms")
                elif info is not None:
                    self.noise.append((path.relative_to(self.folders["noise"]).as_posix(), info.frames,
                                       info.channels))
        if strict and self.problems:
            raise ValueError("data problems:\n  " + "\n  ".join(self.problems))

    def metadata_folder(self, name):
        """Official metadata form of a source folder of this split, e.g. 'data/dev_set/sound_event/train'."""
        return f"{OFFICIAL_PREFIX}{name}/{self.split}"

    def _check(self, path, channels):
        """audio_info of a SAMPLE_RATE file with `channels` channels (None: any); else None, the problem noted."""
        try:
            info = audio_info(path)
        except ValueError as error:
            self.problems.append(str(error))
            return None
        wrong = (f"sample rate {info.samplerate} Hz, expected {SAMPLE_RATE} Hz" if info.samplerate != SAMPLE_RATE else
                 f"{info.channels} channels, expected {channels}" if channels not in (None, info.channels) else "")
        self.problems += [f"{path}: {wrong}"] * bool(wrong)
        return None if wrong else info

    def _classes(self, folder, required):
        """{label: [(path relative to folder, frames)]} of the mono files in folder/<label>/."""
        if not folder.is_dir():
            if required:
                self.problems.append(f"{folder}: missing folder of class sub-folders")
            return {}
        classes = {}
        for class_folder in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
            files = [(path.relative_to(folder).as_posix(), info.frames)
                     for path in sorted_wavs(class_folder)
                     if (info := self._check(path, 1)) is not None]
            if files:
                classes[class_folder.name] = files
            else:
                self.problems.append(f"{class_folder}: empty class folder (no readable 32 kHz mono .wav)")
        return classes


# ---- Paths inside metadata, metadata lists, names of source files ------------------------------------------------
def resolve(dev_set, *parts):
    """The file a metadata path names (joined from parts). Metadata paths are relative to the official repository
    root: 'data/dev_set/<rest>' is <dev_set>/<rest>, another relative path is taken from two levels above the dev
    set, an absolute path as it is; the current directory is never used."""
    dev_set = Path(os.path.abspath(dev_set))  # not resolve(): a symlinked data/dev_set keeps its parents
    relative = Path(*parts)
    posix = relative.as_posix()
    if relative.is_absolute():
        path = relative
    elif posix.startswith(OFFICIAL_PREFIX):
        path = dev_set / posix[len(OFFICIAL_PREFIX):]
    else:
        path = dev_set.parent.parent / relative
    if not path.exists():
        raise ValueError(f"{posix}: file referenced by the metadata not found at {path} (metadata paths starting "
                         f"with {OFFICIAL_PREFIX} are looked up in the dev set {dev_set})")
    return path


def find_dev_set(metadata_path):
    """The dev set a metadata file or folder lies in: its nearest ancestor holding sound_event/ and room_ir/."""
    path = Path(os.path.abspath(metadata_path))
    for folder in (path, *path.parents):
        if (folder / "sound_event").is_dir() and (folder / "room_ir").is_dir():
            return folder
    raise ValueError(f"{metadata_path}: lies in no dev set (no folder above it holds sound_event/ and room_ir/); "
                     "keep it inside its dev set, or name the dev set (data_prep.py render --data_root)")


def metadata_files(metadata_path):
    """valid.json (a list of {'metadata_path': relative to its folder}) or a folder of *.json -> [(path, entry)]."""
    path = Path(metadata_path)
    if path.is_dir():
        files = [(file, {}) for file in sorted(path.glob("*.json"))]
    elif not path.is_file():
        raise ValueError(f"{path}: not found (expected valid.json or a folder of metadata JSON files)")
    else:
        try:
            files = [(path.parent / entry["metadata_path"], entry) for entry in json.loads(path.read_text())]
        except (OSError, ValueError, TypeError, KeyError) as error:
            raise ValueError(f"{path}: expected a JSON list of {{'metadata_path': ...}} entries ({error})") from None
    missing = [str(file) for file, _ in files if not file.is_file()]
    if missing:
        raise ValueError(f"{path}: metadata files not found: {', '.join(missing)}")
    if not files:
        raise ValueError(f"{path}: no metadata files")
    return files


def parse_source_name(soundscape: str, filename: str) -> tuple[int | None, str]:
    """'<soundscape>_<n>_<label>.wav' (2026) or '<soundscape>_<label>.wav' (2025) -> (n or None, label)."""
    match = re.fullmatch(re.escape(soundscape) + r"(?:_(\d+))?_(.+)\.wav", filename)
    if match is None:
        raise ValueError(f"{filename}: expected '{soundscape}_<n>_<label>.wav' or '{soundscape}_<label>.wav'")
    index, label = match.groups()
    if label not in LABELS:
        raise ValueError(f"{filename}: unknown label {label!r}; expected one of {', '.join(LABELS)}")
    return (int(index) if index is not None else None), label


def index_sources(folder, soundscapes):
    """({soundscape: [(path, label)]} of the source WAVs in folder sorted by name as the official loader, problems:
    names that match no soundscape, several, or an unknown label, the other entries of the folder)."""
    known = set(soundscapes)
    index, problems, ignored = {name: [] for name in soundscapes}, [], []
    for path in sorted(Path(folder).iterdir()):
        if path.suffix != ".wav" or not path.is_file():
            ignored.append(path.name)
            continue
        # A soundscape name is a prefix of the file name that ends just before an underscore.
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
            index[parsed[0][0]].append((path, parsed[0][1]))
    return index, problems, ignored
