"""Spatial mixture synthesizer (SpAudSyn-compatible) and the datasets that feed training and evaluation.

Mixtures are built exactly like the official SpAudSyn synthesizer: mono events are peak-normalised, convolved
with a 4-channel room impulse response (RIR) read from a SOFA file, scaled to ref_db + snr over the whole
convolution, and summed with a background; the dry target of an event is the same source convolved with the
direct-path window of channel 0 at the same scale. Three dataset modes:

    GeneratedDataset   random training scenes, item i a pure function of (seed, i)
    MetadataDataset    scenes from SpAudSyn metadata JSON files (validation)
    WaveformDataset    pre-rendered soundscapes with oracle or estimated sources (test / evaluation)

The scenes are rendered by render.py (Renderer, BatchRenderer): in the DataLoader workers (render=True, the
default) or on the training device (render=False). The files they read (the shared constants, audio, SOFA rooms,
the dev-set index) are in devset.py.

    python synth.py --bench --data data/dev_set --device cpu    # worker ms per mixture, device mixtures/s
    python synth.py --bench --data data/dev_set --device cuda
"""
import dataclasses
import json
import math
import os
import random
import re
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import scipy.fft
import torch

import render
from cli import StrictParser, add_config_flags, config_from_args
from devset import LABELS, NUM_SLOTS, ROOM_MODULE, SAMPLE_RATE, SILENCE, TIMER, DataIndex, read_audio
from render import BatchRenderer, Renderer, new_tensor, stack_scenes


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
        if config.nevent_range[1] > NUM_SLOTS:
            raise ValueError(f"nevent_range {config.nevent_range}: at most {NUM_SLOTS} target events per mixture "
                             "(the output slots)")
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
    labels, vector, _ = _slots(labels, None, 0, modes)
    item = {"label": labels, "label_vector": vector, "soundscape": soundscape, "metadata": scene}
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
        if num_channels is not None and num_channels > min(room.num_channels for room in self.index.rooms):
            raise ValueError(f"{num_channels} mixture channels requested, but the rooms of {data_root} have "
                             f"{min(room.num_channels for room in self.index.rooms)}")
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
    worker_passes: int = 5  # passes over the same scenes for the worker-side time; the fastest is printed


def _breakdown(count, phases):
    return ", ".join(f"{phase} {TIMER.seconds[phase] * 1000 / count:.2f}" for phase in phases)


def _pinned(value):
    if torch.is_tensor(value):
        return value.pin_memory()
    return {key: _pinned(item) for key, item in value.items()} if isinstance(value, dict) else value


def bench(config: BenchConfig):
    """Print, for tagger-style and separator-style batches: worker ms per mixture (scene draw + reading), device
    mixtures/s with the breakdown, and ms per mixture when a worker renders one mixture at a time (CPU)."""
    try:
        device = torch.device(config.device)
        if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
            raise RuntimeError(f"{torch.cuda.device_count()} CUDA devices are visible")
    except RuntimeError as error:
        raise SystemExit(f"--device {config.device}: not usable here ({error}); expected 'cpu' or 'cuda'")
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
        passes = []  # (wall ms, CPU ms, breakdown) per pass over the same scenes; one pass varies by 10-30 %
        for _ in range(config.worker_passes):
            TIMER.seconds.clear()
            start, cpu_start = time.perf_counter(), time.process_time()
            batches = [collate([dataset[index] for index in range(first, min(first + batch_size, config.count))])
                       for first in range(0, config.count, batch_size)]
            passes.append(((time.perf_counter() - start) * 1000 / config.count,
                           (time.process_time() - cpu_start) * 1000 / config.count,  # less affected by other jobs
                           _breakdown(config.count, ("scene", "reading"))))
        total, cpu, breakdown = min(passes)
        median = float(np.median([wall for wall, _, _ in passes]))
        print(f"  worker: scene draw + reading + collate        {total:7.2f} ms/mixture  (fastest of "
              f"{config.worker_passes} passes, median {median:.2f}; CPU time {cpu:.2f}; {breakdown})")
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
            for label, megabytes, folder in ((f"memory cache {render.spectrum_cache_megabytes} MB",
                                              render.spectrum_cache_megabytes, None),
                                             ("disk cache (warm), memory 0 MB", 0, cache_dir)):
                rendering.renderer = Renderer(config.data, rendering.index.rooms, folder)
                saved, render.spectrum_cache_megabytes = render.spectrum_cache_megabytes, megabytes
                if folder is not None:
                    for index in range(config.count):  # fills the disk cache with the positions the scenes use
                        rendering[index]
                TIMER.seconds.clear()
                start = time.perf_counter()
                for index in range(config.count):
                    rendering[index]
                total = (time.perf_counter() - start) * 1000 / config.count
                render.spectrum_cache_megabytes = saved
                print(f"  workers mode, one mixture at a time, {label:<31} {total:7.2f} ms/mixture  "
                      f"({_breakdown(config.count, ('scene', 'reading', 'spectra', 'sources', 'mixing', 'inverse'))})")
        finally:
            shutil.rmtree(cache_dir, ignore_errors=True)


def main():
    parser = StrictParser(description=__doc__)
    parser.add_argument("--bench", action="store_true", help="run the synthesis benchmark")
    add_config_flags(parser, BenchConfig)
    arguments = parser.parse_args()
    if not arguments.bench:
        parser.error("nothing to do; use --bench")
    config = config_from_args(arguments, BenchConfig)
    for name in ("count", "tagger_batch", "separator_batch", "worker_passes"):
        if getattr(config, name) < 1:
            parser.error(f"--{name} {getattr(config, name)}: expected a positive number")
    bench(config)


if __name__ == "__main__":
    main()
