"""Data tooling: a procedural demo dev set, a checker, the official add-data step and metadata rendered to WAVs.

    python data_prep.py demo [--out data]                    # writes data/dev_set (seconds)
    python data_prep.py demo --out bench --rir_length 174763 --event_seconds_max 10   # dev-set-like rooms
    python data_prep.py verify [--data data/dev_set]         # lists every problem, exit 1 if any
    python data_prep.py add-data --semhear_path P --ears_path P [--data data/dev_set]
    python data_prep.py render --metadata data/dev_set/metadata/valid.json --out DIR [--data_root DIR]

The layout is the official one (REQUIRED_FOLDERS, the folders the official verify.py requires; devset.py).
"""
import collections
import dataclasses
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path, PurePosixPath

import h5py
import numpy as np
import scipy.signal
import soundfile
import torch
import torchaudio

from cli import StrictParser, add_config_flags, config_from_args
from devset import (LABELS, NUM_SLOTS, SAMPLE_RATE, SILENCE, SPLITS, DataIndex, find_dev_set, metadata_files,
                    resolve, write_audio)
from evaluate import check_inputs
from synth import SCENE_2025, GeneratedDataset, Renderer, SceneConfig, metadata_year

SPEED_OF_SOUND = 343.0  # m/s
MIC_POSITIONS = 0.042 * np.array([[1, 1, 1], [1, -1, -1], [-1, 1, -1], [-1, -1, 1]]) / np.sqrt(3)  # m, tetrahedron
INTERFERENCE_LABELS = ("Hum", "Rain", "Wind")  # demo interference classes (not target classes)
MIN_RIR_LENGTH = 1100  # taps; the latest early reflection of a demo room ends near tap 1025
REQUIRED_FOLDERS = (  # the folders the official verify.py requires in the dev set (and metadata/valid.json)
    "config", "interference/train", "interference/valid", "noise/train", "noise/valid", "room_ir/train",
    "room_ir/valid", "sound_event/train", "sound_event/valid", "metadata/valid",
)
TEST_FOLDERS = {2026: "synthesized/test", 2025: "test"}  # + /soundscape and /oracle_target
PICKUP_LISTS = ("FSD50K", "EARS")  # config/<name>_config.json: the sound events add-data takes from each corpus
PICKUP_KEYS = ("file_name", "t4_label", "convert_path")  # the keys of every pick-up list entry
SEMHEAR_SPLITS = (("train", "train"), ("val", "valid"))  # bg_scaper_fmt split -> interference split
INTERFERENCE_CLASSES = (  # the bg_scaper_fmt classes the official add_data.sh takes as interference (95)
    "Air conditioning", "Aircraft", "Bird flight, flapping wings", "Bleat", "Boiling", "Boom", "Burping, eructation",
    "Burst, pop", "Bus", "Camera", "Car passing by", "Cattle, bovinae", "Chainsaw", "Chewing, mastication",
    "Chink, clink", "Clip-clop", "Cluck", "Clunk", "Coin (dropping)", "Crack", "Crackle", "Creak", "Croak", "Crow",
    "Crumpling, crinkling", "Crushing", "Drill", "Drip", "Electric toothbrush", "Engine", "Fart", "Finger snapping",
    "Fire", "Fire alarm", "Firecracker", "Fireworks", "Fixed-wing aircraft, airplane", "Frog", "Gears", "Growling",
    "Gurgling", "Helicopter", "Hiss", "Hoot", "Howl", "Howl (wind)", "Jackhammer", "Keys jangling", "Lawn mower",
    "Light engine (high frequency)", "Microwave oven", "Moo", "Oink", "Packing tape, duct tape", "Pig", "Printer",
    "Purr", "Rain", "Rain on surface", "Raindrop", "Ratchet, pawl", "Rattle", "Sanding", "Sawing", "Scissors",
    "Screech", "Sheep", "Ship", "Shuffling cards", "Skateboard", "Slam", "Sliding door", "Sneeze", "Sniff",
    "Snoring", "Splinter", "Squeak", "Stream", "Subway, metro, underground", "Tap", "Tearing", "Thump, thud", "Tick",
    "Tick-tock", "Toothbrush", "Traffic noise, roadway noise", "Train", "Train horn",
    "Velcro, hook and loop fastener", "Waterfall", "Whoosh, swoosh, swish", "Wind", "Writing", "Zipper (clothing)",
)
RENDER_CACHE_MEGABYTES = 2048  # RIR spectra `render` keeps: a real room's 108 positions at 10 s take ~1.2 GB
# The official step resamples with librosa's default (soxr "HQ"). This windowed-sinc filter matches that output
# within about 60 dB SNR on white noise (measured for 8 to 96 kHz input: 59.7-61.8 dB), and far closer on
# real recordings, whose energy lies below the transition band.
RESAMPLE_FILTER = dict(resampling_method="sinc_interp_kaiser", lowpass_filter_width=128, rolloff=0.957, beta=24.0)


@dataclasses.dataclass
class DemoConfig:
    out: str = "data"  # the dev set is written to OUT/dev_set
    year: int = 2026  # 2026 (SpAudSyn metadata, synthesized/test) or 2025 (SpatialScaper, test/, flat classes)
    files_per_class: int = 6  # per target class in sound_event/train, spread over 3 sub-folders (2026)
    valid_files_per_class: int = 3  # per target class in sound_event/valid (3 sub-folders: duplicates need them)
    event_seconds_min: float = 1.0  # s, shortest demo event file
    event_seconds_max: float = 4.0  # s, longest demo event file (10+ s files give random excerpts)
    num_rooms: int = 3  # SOFA rooms in room_ir/train
    num_valid_rooms: int = 1  # SOFA rooms in room_ir/valid
    rir_length: int = 4096  # taps per RIR (the real dev set has 174763)
    valid_mixtures: int = 16  # metadata/valid mixtures (drawn from the valid folders)
    test_mixtures: int = 24  # test mixtures (drawn from the valid folders)
    seed: int = 0  # everything in the demo is a function of this seed


@dataclasses.dataclass
class AddDataConfig:
    semhear_path: str = ""  # Semantic Hearing data folder (BinauralCuratedDataset: holds bg_scaper_fmt/ and FSD50K/)
    ears_path: str = ""  # EARS speech corpus folder (holds p001/ ... p107/)
    data: str = "data/dev_set"  # dev set to add to; its config/{FSD50K,EARS}_config.json list the sound events
    amp_threshold: float = 0.02  # absolute peak below which a recording, or any of its windows, drops it
    min_length: float = 0.1  # s, shorter recordings (also after removing exact zeros at both ends) are dropped
    segment: float = 10.0  # s, length of the windows checked for silence (recordings are kept whole, never cut)
    shift: float = 0.1  # s, step between those windows


# ---- Demo signals ------------------------------------------------------------------------------------------------
def _bandpass(noise, low, high):
    sos = scipy.signal.butter(4, [low, min(high, 0.45 * SAMPLE_RATE)], btype="band", fs=SAMPLE_RATE, output="sos")
    return scipy.signal.sosfilt(sos, noise)


def class_signal(class_index, seconds, rng):
    """A demo event of target class class_index: 6 temporal patterns x 3 frequency registers, all distinct."""
    n = int(seconds * SAMPLE_RATE)
    t = np.arange(n) / SAMPLE_RATE
    pattern, register = class_index % 6, class_index // 6
    frequency = (300.0, 1100.0, 3800.0)[register] * (1 + 0.12 * pattern) * rng.uniform(0.97, 1.03)
    if pattern == 0:  # steady harmonic tone with vibrato
        phase = 2 * np.pi * frequency * (t + 0.002 * np.sin(2 * np.pi * 5 * t))
        signal = sum(np.sin(h * phase) / h for h in range(1, 5))
    elif pattern == 1:  # narrow noise band
        signal = _bandpass(rng.standard_normal(n), frequency / 1.15, frequency * 1.15)
    elif pattern == 2:  # beeps at 4 Hz
        signal = np.sin(2 * np.pi * frequency * t) * (np.sin(2 * np.pi * 4 * t) > 0)
    elif pattern == 3:  # rising sweeps, 0.4 s each
        local = t % 0.4
        signal = np.sin(2 * np.pi * frequency * (local + local ** 2 / 0.8))
    elif pattern == 4:  # click train at 9 Hz ringing at the class frequency
        clicks = np.zeros(n)
        clicks[:: SAMPLE_RATE // 9] = 1.0
        ring = np.sin(2 * np.pi * frequency * t[:640]) * np.exp(-t[:640] / 0.004)
        signal = np.convolve(clicks, ring)[:n]
    else:  # noise band with a slow 2 Hz tremolo
        signal = _bandpass(rng.standard_normal(n), frequency / 1.4, frequency * 1.4) * (1 + np.sin(2 * np.pi * 2 * t))
    fade = np.minimum(1.0, np.minimum(np.arange(n), np.arange(n)[::-1]) / (0.01 * SAMPLE_RATE))
    return 0.5 * signal * fade / max(np.max(np.abs(signal)), 1e-9)


def interference_signal(label, seconds, rng):
    n = int(seconds * SAMPLE_RATE)
    t = np.arange(n) / SAMPLE_RATE
    if label == "Hum":
        signal = sum(np.sin(2 * np.pi * 50 * h * t + rng.uniform(0, 6)) / h for h in range(1, 8))
    elif label == "Rain":
        signal = rng.standard_normal(n) * (rng.random(n) < 0.02)
    else:
        signal = scipy.signal.lfilter([1.0], [1.0, -0.995], rng.standard_normal(n))
    return 0.5 * signal / max(np.max(np.abs(signal)), 1e-9)


def room_responses(positions, length, decay_seconds, rng):
    """Simple 4-mic RIRs [M, 4, N]: fractional-delay direct path, early reflections, exponential tail."""
    responses = np.zeros((len(positions), len(MIC_POSITIONS), length))
    taps = np.arange(-16, 17)
    tail_start = 64 + int(0.004 * SAMPLE_RATE)
    tail = np.arange(length - tail_start)
    for m, position in enumerate(positions):
        reflections = [(rng.uniform(0.003, 0.025), rng.uniform(0.2, 0.5)) for _ in range(6)]
        for r, microphone in enumerate(MIC_POSITIONS):
            distance = np.linalg.norm(position - microphone)
            for extra, gain in [(0.0, 1.0)] + reflections:
                delay = 64 + (distance / SPEED_OF_SOUND + extra) * SAMPLE_RATE
                start = int(delay)
                kernel = np.sinc(taps - (delay - start)) * np.hanning(len(taps))
                responses[m, r, start - 16:start + 17] += gain / distance * kernel
            envelope = np.exp(-tail / (decay_seconds * SAMPLE_RATE / 6.9))  # 60 dB over decay_seconds
            responses[m, r, tail_start:] += 0.05 / distance * envelope * rng.standard_normal(len(tail))
    return responses


def write_sofa(path, responses, spherical_positions, sample_rate=SAMPLE_RATE):
    """A SOFA (netCDF-4/HDF5) SingleRoomSRIR file with spherical source positions."""
    with h5py.File(path, "w") as file:
        file.attrs.update({"Conventions": "SOFA", "Version": "2.1", "SOFAConventions": "SingleRoomSRIR",
                           "SOFAConventionsVersion": "1.1", "DataType": "FIR", "RoomType": "reverberant",
                           "Title": "nanoS5 demo room", "APIName": "nanoS5 data_prep.py"})
        sizes = {"M": responses.shape[0], "R": responses.shape[1], "N": responses.shape[2], "I": 1, "C": 3}
        for name, size in sizes.items():
            file.create_dataset(name, data=np.arange(size, dtype=np.float64)).make_scale(name)
        ir = file.create_dataset("Data.IR", data=responses.astype(np.float64))
        for axis, name in enumerate("MRN"):
            ir.dims[axis].attach_scale(file[name])
        file.create_dataset("Data.SamplingRate", data=[float(sample_rate)]).attrs["Units"] = b"hertz"
        file.create_dataset("Data.Delay", data=np.zeros((1, responses.shape[1])))
        positions = (("SourcePosition", spherical_positions, b"spherical", b"degree, degree, metre"),
                     ("ListenerPosition", np.zeros((1, 3)), b"cartesian", b"metre"),
                     ("ReceiverPosition", MIC_POSITIONS, b"cartesian", b"metre"))
        for name, values, kind, units in positions:
            file.create_dataset(name, data=values).attrs.update({"Type": kind, "Units": units})


# ---- Rendering metadata to files ---------------------------------------------------------------------------------
def render_metadata(metadata_path, out_dir, data_root=None, subtype="FLOAT", cache_megabytes=RENDER_CACHE_MEGABYTES):
    """Every mixture of metadata to OUT/soundscape/ and OUT/oracle_target/ (existing files checked first) -> count.
    Targets are named <name>_<slot>_<label>.wav, from 2025 (SpatialScaper) metadata <name>_<label>.wav."""
    out_dir = Path(out_dir)
    files = [path for path, _ in metadata_files(metadata_path)]
    renderer = Renderer(data_root if data_root is not None else find_dev_set(metadata_path), "cpu", cache_megabytes)
    files.sort(key=lambda file: not (out_dir / "soundscape" / f"{file.stem}.wav").exists())  # stable
    for file in files:
        try:
            scene = json.loads(file.read_text())
            mixture, dry, labels = renderer.render_scene(scene)
        except (ValueError, KeyError, TypeError) as error:
            raise ValueError(f"{file}: {error}") from None
        write_audio(out_dir / "soundscape" / f"{file.stem}.wav", mixture.numpy(), subtype)
        for slot, (label, source) in enumerate(zip(labels, dry)):
            name = f"{file.stem}_{label}.wav" if metadata_year(scene) == 2025 else f"{file.stem}_{slot}_{label}.wav"
            write_audio(out_dir / "oracle_target" / name, source[0].numpy(), subtype)
    return len(files)


# ---- Demo dev set ------------------------------------------------------------------------------------------------
def _save_scenes(dataset, count, folder):
    """Write count generated scenes as metadata JSONs soundscape_0000.json, ...; returns their names."""
    folder.mkdir(parents=True, exist_ok=True)
    names = ["soundscape_%04d" % number for number in range(count)]
    for number, name in enumerate(names):
        (folder / f"{name}.json").write_text(json.dumps(dataset.scene(number), indent=1))
    return names


def _write_rooms(folder, count, first_decay, config, rng):
    """count SOFA rooms of 48 positions (radius 0.75 / 1.5 m, elevation 0 / 20 degrees, every 30 degrees)."""
    folder.mkdir(parents=True, exist_ok=True)
    spherical = np.array([[azimuth, elevation, radius] for radius in (0.75, 1.5) for elevation in (0.0, 20.0)
                          for azimuth in range(0, 360, 30)], dtype=np.float64)
    azimuth, elevation = np.deg2rad(spherical[:, 0]), np.deg2rad(spherical[:, 1])
    positions = spherical[:, 2:] * np.stack([np.cos(azimuth) * np.cos(elevation), np.sin(azimuth) * np.cos(elevation),
                                             np.sin(elevation)], axis=1)
    for number in range(count):
        responses = room_responses(positions, config.rir_length, first_decay + 0.2 * number, rng)
        write_sofa(folder / f"room_{number:02d}.sofa", responses, spherical)


def _build_demo(dev_set, config):
    """Write every part of the demo set into the (new) folder dev_set."""
    rng = np.random.default_rng(config.seed)
    lengths = lambda: rng.uniform(config.event_seconds_min, config.event_seconds_max)  # noqa: E731
    for split, files_per_class, interference_files in (("train", config.files_per_class, 4),
                                                        ("valid", config.valid_files_per_class, 2)):
        for class_index, label in enumerate(LABELS):
            for number in range(files_per_class):
                name = f"take{number % 3}/" * (config.year == 2026) + f"{label.lower()}_{number:02d}.wav"  # 2026
                # duplicates avoid each other's sub-folders; 2025 draws only the files directly in <Label>/
                write_audio(dev_set / "sound_event" / split / label / name, class_signal(class_index, lengths(), rng))
        for label in INTERFERENCE_LABELS:
            for number in range(interference_files):
                write_audio(dev_set / "interference" / split / label / f"{label.lower()}_{number:02d}.wav",
                           interference_signal(label, lengths(), rng))
    for split, durations in (("train", (12.0, 15.5, 7.0)), ("valid", (13.0, 6.0))):  # short files are tiled
        for number, seconds in enumerate(durations):
            common = rng.standard_normal(int(seconds * SAMPLE_RATE))
            noise = scipy.signal.lfilter([1.0], [1.0, -0.98], common + rng.standard_normal((4, len(common))), axis=-1)
            write_audio(dev_set / "noise" / split / f"noise_{number:02d}.wav", 0.3 * noise / np.max(np.abs(noise)))
    _write_rooms(dev_set / "room_ir" / "train", config.num_rooms, 0.25, config, rng)
    _write_rooms(dev_set / "room_ir" / "valid", config.num_valid_rooms, 0.35, config, rng)
    (dev_set / "config").mkdir()
    for name in PICKUP_LISTS:  # official format; empty because the demo's sound events are procedural
        (dev_set / "config" / f"{name}_config.json").write_text("[]\n")
    scene = SceneConfig(**SCENE_2025) if config.year == 2025 else SceneConfig()
    validation = GeneratedDataset(dev_set, scene, length=config.valid_mixtures, seed=config.seed + 1, split="valid")
    names = _save_scenes(validation, config.valid_mixtures, dev_set / "metadata" / "valid")
    entries = [{"metadata_path": f"valid/{name}.json"} for name in names]
    if config.year == 2025:  # the slot order: the targets in onset order, padded with silence
        for number, entry in enumerate(entries):
            labels = [event["label"] for event in validation.scene(number)["fg_events"]]
            entry["ref_event"] = labels + [SILENCE] * (NUM_SLOTS - len(labels))
    (dev_set / "metadata" / "valid.json").write_text(json.dumps(entries, indent=1))
    test = dev_set / TEST_FOLDERS[config.year]
    _save_scenes(GeneratedDataset(dev_set, scene, length=config.test_mixtures, seed=config.seed + 2, split="valid"),
                 config.test_mixtures, test / "metadata")
    render_metadata(test / "metadata", test, data_root=dev_set, subtype="PCM_16")  # 16-bit like the official


def make_demo(out="data", config=None):
    """Write the demo dev set to OUT/dev_set (built next to it, renamed when complete) -> its path."""
    config = dataclasses.replace(config or DemoConfig(), out=str(out))
    if config.year not in TEST_FOLDERS:
        raise ValueError(f"--year {config.year}: expected 2025 or 2026")
    if config.rir_length < MIN_RIR_LENGTH:
        raise ValueError(f"--rir_length {config.rir_length}: expected at least {MIN_RIR_LENGTH} taps")
    dev_set = Path(config.out) / "dev_set"
    if dev_set.exists() and not (dev_set.is_dir() and not any(dev_set.iterdir())):
        raise FileExistsError(f"{dev_set}: already exists; remove it, or choose another --out, to build the demo")
    building = dev_set.with_name(f".dev_set.{os.getpid()}.partial")
    try:
        _build_demo(building, config)
        os.replace(building, dev_set)
    finally:
        shutil.rmtree(building, ignore_errors=True)
    return dev_set


# ---- Verify ------------------------------------------------------------------------------------------------------
def dev_set_year(data) -> int:
    """2025 for the 2025 layout (test/ and no synthesized/test/), else 2026."""
    return 2025 if (Path(data) / "test").is_dir() and not (Path(data) / TEST_FOLDERS[2026]).is_dir() else 2026


def verify(data, year=None):
    """(summary lines, problems) of a dev set: folders, file formats, pick-up lists, config/filelist.json, metadata
    references and format, test set. year: 2025 or 2026 (None: from the folders)."""
    data = Path(data)
    if not data.is_dir():
        return [], [f"{data}: not a folder (expected the dev set, e.g. data/dev_set)"]
    detected = dev_set_year(data)
    year = year or detected
    test_folder = TEST_FOLDERS[year]
    required = REQUIRED_FOLDERS + (f"{test_folder}/soundscape", f"{test_folder}/oracle_target")
    missing = [data / name for name in required if not (data / name).is_dir()]
    problems = [f"{folder}: missing folder" for folder in missing]
    summary = [f"{year} layout" + ("" if year == detected else f" (--year; the folders are of {detected})")]
    for split in SPLITS:
        index = DataIndex(data, split, strict=False)
        problems += [problem for problem in index.problems
                     if not any(problem.startswith(f"{folder}: ") for folder in missing)]
        summary += [f"{name}/{split}: {len(classes)} classes, {sum(map(len, classes.values()))} files"
                    for name, classes in (("sound_event", index.events), ("interference", index.interference))]
        summary += [f"noise/{split}: {len(index.noise)} files",
                    f"room_ir/{split}: {len(index.rooms)} rooms, "
                    f"{sum(room.num_positions for room in index.rooms)} positions"]
        if split == "train":  # what training draws from must not be empty
            absent = [label for label in LABELS if label not in index.events]
            if index.folders["sound_event"].is_dir() and absent:
                problems.append(f"{index.folders['sound_event']}: no files for the classes {', '.join(absent)}")
            if index.folders["interference"].is_dir() and not index.interference:
                problems.append(f"{index.folders['interference']}: no interference classes (add-data adds them)")
            if index.folders["noise"].is_dir() and not index.noise:
                problems.append(f"{index.folders['noise']}: no background noise files")
    for name in PICKUP_LISTS:
        path = data / "config" / f"{name}_config.json"
        if not path.is_file():
            problems.append(f"{path}: missing pick-up list (needed by add-data)")
            continue
        try:
            summary.append(f"config/{path.name}: {len(read_pickup_list(path))} sound events to add")
        except ValueError as error:
            problems.append(str(error))
    filelist = data / "config" / "filelist.json"
    if filelist.is_file():  # as the official 2025 verify.py --source_dir: paths from the repository root
        try:
            listed = json.loads(filelist.read_text())
            summary.append(f"config/filelist.json: {len(listed)} files listed")
            for path in listed:
                try:  # the metadata rule: 'data/dev_set/...' in this dev set, other paths from the repository root
                    resolve(data, path)
                except ValueError:
                    problems.append(f"{filelist}: lists {path}, which is missing")
        except (ValueError, TypeError) as error:
            problems.append(f"{filelist}: expected a JSON list of 'data/dev_set/...' paths ({error})")
    valid = data / "metadata" / "valid.json"
    if valid.is_file():
        try:
            files = [path for path, _ in metadata_files(valid)]
        except ValueError as error:
            problems.append(str(error))
            files = []
        renderer = Renderer(data)
        for file in files:  # every referenced file and position, read as rendering reads them
            try:
                scene = json.loads(file.read_text())
                if (found := metadata_year(scene)) != year:
                    raise ValueError(f"{'SpatialScaper (2025)' if found == 2025 else 'SpAudSyn (2026)'} metadata in "
                                     f"a {year} dev set")
                renderer.prepare(scene)
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
                problems.append(f"{file}: {error}")
        summary.append(f"metadata: {len(files)} validation mixtures")
    else:
        problems.append(f"{valid}: missing validation metadata")
    test = data / test_folder
    if (test / "soundscape").is_dir() and (test / "oracle_target").is_dir():
        try:  # what evaluate.py checks: names, rates, channels, lengths
            summary.append(f"{test_folder}: {len(check_inputs(test))} soundscapes")
        except ValueError as error:
            problems += [line.strip() for line in str(error).splitlines()[1:]] or [str(error)]
    return summary, problems


# ---- Add data (the official add_data.sh step) --------------------------------------------------------------------
def read_pickup_list(path):
    """A pick-up list in the official format: a JSON list of {"file_name": path relative to the corpus folder,
    "t4_label": target class, "convert_path": '<train|valid>/<t4_label>/<name>.wav' relative to sound_event/}."""
    expected = 'a JSON list of {"file_name", "t4_label", "convert_path"} objects'
    try:
        entries = json.loads(Path(path).read_text())
    except OSError as error:
        raise ValueError(f"{path}: cannot read the pick-up list ({error.strerror})") from None
    except ValueError as error:
        raise ValueError(f"{path}: not valid JSON ({error}); expected {expected}") from None
    if not isinstance(entries, list):
        raise ValueError(f"{path}: a JSON {type(entries).__name__}, expected {expected}")
    targets = set()
    for number, entry in enumerate(entries):
        if not isinstance(entry, dict) or not all(isinstance(entry.get(key), str) for key in PICKUP_KEYS):
            raise ValueError(f"{path}: entry {number} is {json.dumps(entry)[:80]}, expected {expected}")
        label = entry["t4_label"]
        source, target = PurePosixPath(entry["file_name"]), PurePosixPath(entry["convert_path"])
        if label not in LABELS:
            raise ValueError(f"{path}: entry {number}: t4_label {label!r} is not one of the 18 target classes")
        if target.is_absolute() or ".." in target.parts or len(target.parts) < 3 or target.parts[0] not in SPLITS \
                or target.parts[1] != label or target.suffix != ".wav":
            raise ValueError(f"{path}: entry {number}: convert_path {str(target)!r}, expected "
                             f"'<train|valid>/{label}/<name>.wav'")
        if source.is_absolute() or ".." in source.parts:
            raise ValueError(f"{path}: entry {number}: file_name {str(source)!r} must lie inside the corpus folder")
        if target in targets:
            raise ValueError(f"{path}: convert_path {str(target)!r} is listed twice")
        targets.add(target)
    return entries


def resample(audio, rate):
    """float32 [n] at `rate` Hz -> float32 [ceil(n * SAMPLE_RATE / rate)] at SAMPLE_RATE (librosa's length)."""
    resampled = torchaudio.functional.resample(torch.from_numpy(audio.astype(np.float64)), int(rate), SAMPLE_RATE,
                                               **RESAMPLE_FILTER).numpy()
    length = math.ceil(len(audio) * (SAMPLE_RATE / rate))
    result = np.zeros(length, dtype=np.float32)
    result[:min(length, len(resampled))] = resampled[:length]
    return result


def _has_quiet_window(audio, window, step, threshold):
    """True when a window [start, start + window) with start = 0, step, 2 step, ... and start + window <= n holds
    no sample with |x| >= threshold. Found from the positions of the loud samples: O(n), not O(n x window)."""
    if len(audio) < window:
        return False
    starts = np.arange(0, len(audio) - window + 1, step)
    loud = np.flatnonzero(np.abs(audio) >= threshold)
    next_loud = np.append(loud, len(audio) + window)[np.searchsorted(loud, starts)]  # first loud at or after start
    return bool(np.any(next_loud >= starts + window))


def process_recording(path, config):
    """One recording by the official add_data.sh rules -> (float32 [n] at SAMPLE_RATE, None) or (None, reason): dropped
    for a low peak, for being short (also after trimming zeros) or for a quiet window; else kept whole, resampled."""
    try:
        audio, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    except Exception as error:  # soundfile raises several types for broken files
        raise ValueError(f"{path}: unreadable audio file ({error})") from None
    audio = audio.mean(axis=1)  # (n,) float32, like librosa.load(mono=True)
    threshold = np.float32(config.amp_threshold)  # compared in float32, as numpy 2 compares a float32 peak
    if len(audio) == 0:
        return None, "too short"
    if np.max(np.abs(audio)) < threshold:
        return None, "low amplitude"
    if len(audio) < config.min_length * rate:
        return None, "too short"
    audio = np.trim_zeros(audio)
    if len(audio) < int(config.min_length * rate):
        return None, "too short after removing zeros"
    if _has_quiet_window(audio, max(1, int(config.segment * rate)), max(1, int(config.shift * rate)), threshold):
        return None, f"contains a quiet {config.segment:g} s window"
    if rate != SAMPLE_RATE:
        audio = resample(audio, rate)
    return audio, None


def _interference_jobs(bg_scaper_fmt, output):
    """(source, target) of every bg_scaper_fmt/{train,val}/<class>/*.wav of the 95 classes (not recursive)."""
    if not bg_scaper_fmt.is_dir():
        raise ValueError(f"{bg_scaper_fmt}: not found (expected SemHear's bg_scaper_fmt/{{train,val}}/<class>/*.wav)")
    jobs, missing = [], []
    for split, output_split in SEMHEAR_SPLITS:
        for name in INTERFERENCE_CLASSES:
            folder = bg_scaper_fmt / split / name
            if not folder.is_dir():
                missing.append(folder)
                continue
            jobs += [(folder / entry, output / output_split / name / entry) for entry in sorted(os.listdir(folder))
                     if entry.endswith(".wav") and (folder / entry).is_file()]
    if missing:
        more = f" (and {len(missing) - 1} more of the 95 interference classes)" if len(missing) > 1 else ""
        raise ValueError(f"{missing[0]}: class folder not found{more}")
    return jobs


def _pickup_jobs(corpus, pickup_list, output):
    """(source, target) of every entry of a pick-up list; every listed file must exist."""
    if not corpus.is_dir():
        raise ValueError(f"{corpus}: corpus folder not found (needed by {pickup_list})")
    jobs, missing = [], []
    for entry in read_pickup_list(pickup_list):
        source = corpus / entry["file_name"]
        if not source.is_file():
            missing.append(source)
        jobs.append((source, output / entry["convert_path"]))
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ValueError(f"{missing[0]}: listed in {pickup_list} but not found{more}")
    return jobs


def add_data(config: AddDataConfig):
    """The official add_data.sh step: interference of the 95 bg_scaper_fmt classes (val -> valid) and the pick-up lists'
    sound events as 16-bit PCM, all inputs checked before the first write -> counts by outcome."""
    if not config.semhear_path and not config.ears_path:
        raise ValueError("nothing to add: give --semhear_path and/or --ears_path")
    for name in ("amp_threshold", "min_length", "segment", "shift"):
        if not getattr(config, name) > 0:
            raise ValueError(f"--{name} {getattr(config, name)}: expected a positive value")
    data = Path(config.data)
    if not data.is_dir():
        raise ValueError(f"--data {data}: not a folder (expected the dev set, e.g. data/dev_set)")
    for flag in ("semhear_path", "ears_path"):
        if getattr(config, flag) and not Path(getattr(config, flag)).is_dir():
            raise ValueError(f"--{flag} {getattr(config, flag)}: folder not found")
    jobs = []  # (source recording, target file)
    if config.semhear_path:
        semhear = Path(config.semhear_path)
        jobs += _interference_jobs(semhear / "bg_scaper_fmt", data / "interference")
        jobs += _pickup_jobs(semhear / "FSD50K", data / "config" / "FSD50K_config.json", data / "sound_event")
    if config.ears_path:
        jobs += _pickup_jobs(Path(config.ears_path), data / "config" / "EARS_config.json", data / "sound_event")
    sources_of = collections.defaultdict(list)  # e.g. the FSD50K and EARS lists naming the same convert_path
    for source, target in jobs:
        sources_of[target].append(source)
    for target, sources in sources_of.items():
        if len(sources) > 1:
            raise ValueError(f"{target}: the target of both {sources[0]} and {sources[1]}; each dev-set file comes "
                             "from one recording")
    jobs.sort(key=lambda job: not job[1].exists())  # finished targets first: a conflict stops before any write
    counts = collections.Counter()
    for number, (source, target) in enumerate(jobs):
        audio, reason = process_recording(source, config)
        if audio is None:
            if target.exists():
                raise FileExistsError(f"{target}: exists, but its source {source} is dropped ({reason})")
            counts[f"dropped: {reason}"] += 1
        else:
            counts["written" if write_audio(target, audio, "PCM_16") else "already present"] += 1
        if (number + 1) % 1000 == 0:
            print(f"add-data: {number + 1}/{len(jobs)} recordings processed", flush=True)
    print(f"add-data: {len(jobs)} recordings: " + ", ".join(f"{count} {outcome}" for outcome, count in
                                                           sorted(counts.items())))
    return counts


# ---- Command line ------------------------------------------------------------------------------------------------
def main():
    parser = StrictParser(description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    add_config_flags(commands.add_parser("demo", help="write the procedural demo dev set"), DemoConfig)
    verify_parser = commands.add_parser("verify", help="check a dev set")
    verify_parser.add_argument("--data", default="data/dev_set", help="the dev-set folder")
    verify_parser.add_argument("--year", type=int, choices=(2025, 2026), help="its layout (default: from the folders)")
    add_config_flags(commands.add_parser("add-data", help="the official add_data.sh step"), AddDataConfig)
    render = commands.add_parser("render", help="render SpAudSyn metadata to WAV files")
    render.add_argument("--metadata", default="data/dev_set/metadata/valid.json", help="valid.json or a folder")
    render.add_argument("--out", required=True, help="writes OUT/soundscape and OUT/oracle_target")
    render.add_argument("--data_root", default="", help="the dev set the metadata paths refer to "
                                                        "(default: the dev set holding --metadata)")
    arguments = parser.parse_args()
    try:
        run(arguments)
    except (ValueError, OSError) as error:  # bad input: one line naming the file or flag, no traceback
        raise SystemExit(f"data_prep.py {arguments.command}: {error}") from None


def run(arguments):
    if arguments.command == "demo":
        start = time.perf_counter()
        dev_set = make_demo(arguments.out, config_from_args(arguments, DemoConfig))
        size = sum(p.stat().st_size for p in dev_set.rglob("*") if p.is_file()) / 2 ** 20
        print(f"demo dev set written to {dev_set} ({size:.1f} MiB) in {time.perf_counter() - start:.1f} s")
    elif arguments.command == "verify":
        summary, problems = verify(arguments.data, arguments.year)
        print("\n".join(summary + [f"{len(problems)} problem(s):\n  " + "\n  ".join(problems) if problems else "ok"]))
        sys.exit(1 if problems else 0)
    elif arguments.command == "add-data":
        add_data(config_from_args(arguments, AddDataConfig))
    else:
        count = render_metadata(arguments.metadata, arguments.out, arguments.data_root or None)
        print(f"rendered {count} mixtures to {arguments.out}")


if __name__ == "__main__":
    main()
