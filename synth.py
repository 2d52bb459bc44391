"""Spatial mixtures exactly as the official synthesizers make them, and the datasets that feed training.

A scene is a metadata dict (SpAudSyn's format, or SpatialScaper's for 2025 files), the one record that flows from
the generator to the renderer. Mono events are peak-normalised, convolved with a 4-channel room impulse response
(RIR), scaled to ref_db + snr over the whole convolution and summed with a background; an event's dry target is the
source through the direct-path window of the reference channel, at the same scale.

    scene --Renderer.prepare--> the events' audio (DataLoader workers) --render_scenes--> mixtures, dry targets

GeneratedDataset draws training scenes (item i a pure function of (seed, i)), MetadataDataset reads JSON files.
An augmentation is three edits here: a SceneConfig field, its draw stored in the scene dict in
SceneGenerator.generate (so scene(i) keeps it), and its use in render_scenes.
"""
import collections
import dataclasses
import itertools
import json
import math
import random
import warnings
from pathlib import Path

import numpy as np
import scipy.fft
import torch

from devset import (NUM_SLOTS, SAMPLE_RATE, SILENCE, DataIndex, find_dev_set, label_vector, metadata_files, open_room,
                    read_audio, resolve)

ROOM_MODULE = "src.modules.spatial_audio_synthesizer.room"  # written into metadata for the official loader
WORKER_CACHE_MEGABYTES = 256  # RIR spectra a rendering DataLoader worker keeps (repeated positions skip read + FFT)


@dataclasses.dataclass
class SceneConfig:
    """Training scenes; defaults are the official 2026 separator values (tagger: nevent (0, 3))."""
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
    metadata_format: str = "spaudsyn"  # 'spaudsyn' (2026) or 'spatialscaper' (2025: its metadata and dry rule, the
    # short background's samples repeated, class files only directly in <Label>/)


# The official 2025 data (SemgSegScaper2): levels, 1-3 distinct targets, 1-2 interferers, slots in onset order.
SCENE_2025 = dict(ref_db=-50.0, nevent_range=(1, 3), dupse_rate=0.0, interference_range=(1, 2), shuffle_label=False,
                  metadata_format="spatialscaper")


# ---- Scene generation for training -------------------------------------------------------------------------------
def item_rng(seed, index):
    """The random.Random of one item: a pure function of (seed, index), independent of workers and machines."""
    state = np.random.SeedSequence([int(seed), int(index)]).generate_state(2, dtype=np.uint64)
    return random.Random((int(state[0]) << 64) | int(state[1]))


def unit(vectors):
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    return vectors / np.where(norms > 0, norms, 1.0)


class SceneGenerator:
    """Draws the SpAudSyn metadata of one training mixture from a DataIndex, as the official 'generate' mode."""

    def __init__(self, index: DataIndex, config: SceneConfig):
        self.index, self.config = index, config
        if not index.rooms or not index.labels:
            raise ValueError(f"{index.root}: no rooms or no sound events to generate scenes from")
        if config.metadata_format not in ("spaudsyn", "spatialscaper"):
            raise ValueError(f"metadata_format {config.metadata_format!r}: expected 'spaudsyn' or 'spatialscaper'")
        if config.metadata_format == "spatialscaper" and config.dupse_rate > 0:
            raise ValueError("2025 (spatialscaper) scenes have no same-class duplicates: set dupse_rate 0")
        # The files of each class: 2025 scenes draw only those directly in <Label>/, as SpatialScaper lists them.
        flat = config.metadata_format == "spatialscaper"
        self.pools = {kind: {label: [file for file in files if not flat or file[0].count("/") == 1]
                             for label, files in classes.items()}
                      for kind, classes in (("events", index.events), ("interference", index.interference))}
        if empty := [label for pool in self.pools.values() for label, files in pool.items() if not files]:
            raise ValueError(f"{index.root}: no .wav directly in the {', '.join(empty)} class folder(s) (2025 scenes "
                             "do not look into sub-folders)")
        if config.nevent_range[1] > min(NUM_SLOTS, len(index.labels)):
            raise ValueError(f"{index.root}: nevent_range {config.nevent_range}: at most {NUM_SLOTS} target events "
                             f"per mixture (the output slots), of distinct classes ({len(index.labels)} available)")

    def _event(self, rng, room, label, file, snr_range, role, position=None):
        relative, frames = file
        duration = frames / SAMPLE_RATE
        limit = min(self.config.max_event_duration, self.config.duration)  # an event never outlasts the scene
        source_time, event_duration = (rng.uniform(0, duration - limit), limit) if duration > limit else (0.0, duration)
        event_time = rng.uniform(0, self.config.duration - event_duration)
        position = rng.randrange(room.num_positions) if position is None else position
        spatialscaper = self.config.metadata_format == "spatialscaper"  # positions as stored, its extra keys
        return {"label": label, "source_file": relative, "source_time": source_time, "event_time": event_time,
                "event_duration": event_duration,
                "event_position": [(room.stored if spatialscaper else room.positions)[position].tolist()],
                "snr": rng.uniform(*snr_range)} | (
            {"role": "foreground", "pitch_shift": None, "time_stretch": None} if spatialscaper else {"role": role})

    def _duplicate(self, rng, room, events, base_labels):
        """One more source of a class already present, more than dupse_min_angle away, from another sub-folder."""
        config = self.config
        label = rng.choice(base_labels)
        same = [event for event in events if event["label"] == label]
        references = unit(np.array([event["event_position"][0] for event in same]))
        angles = np.degrees(np.arccos(np.clip(unit(room.positions) @ references.T, -1.0, 1.0)))  # (M, refs)
        candidates = np.flatnonzero(np.all(angles > config.dupse_min_angle, axis=1)).tolist()
        if not candidates:
            raise ValueError(f"{room.path}: no RIR position more than {config.dupse_min_angle} degrees away from "
                             f"the {len(same)} {label} source(s); the room needs positions at more angles")
        position = rng.choice(candidates)
        used = [event["source_file"] for event in same]
        depth = config.exclusion_folder_depth
        excluded = {Path(name).parts[1:-1][:depth] for name in used}
        files = [file for file in self.index.events[label] if file[0] not in used and
                 (len(Path(file[0]).parts) == 2 or depth == 0 or Path(file[0]).parts[1:-1][:depth] not in excluded)]
        if not files:
            raise ValueError(f"{self.index.folders['sound_event'] / label}: no file left for a duplicate after "
                             f"excluding {used} and their sub-folders")
        return self._event(rng, room, label, rng.choice(files), config.snr_range, "foreground", position)

    def generate(self, rng):
        """One scene as a SpAudSyn metadata dict, all randomness drawn from rng (a random.Random)."""
        config, index = self.config, self.index
        room = rng.choice(index.rooms)
        nevents = rng.randint(*config.nevent_range)
        n_duplicates = 0
        if nevents >= 2 and rng.random() <= config.dupse_rate:
            n_duplicates = rng.randint(1, min(nevents - 1, config.max_n_dupse))
        events = []
        for _ in range(nevents - n_duplicates):
            label = rng.choice([label for label in index.labels if label not in {e["label"] for e in events}])
            events.append(self._event(rng, room, label, rng.choice(self.pools["events"][label]), config.snr_range,
                                      "foreground"))
        base_labels = [event["label"] for event in events]
        for _ in range(n_duplicates):
            events.append(self._duplicate(rng, room, events, base_labels))
        interference = []
        if index.interference_labels:
            for _ in range(rng.randint(*config.interference_range)):
                label = rng.choice(index.interference_labels)
                interference.append(self._event(rng, room, label, rng.choice(self.pools["interference"][label]),
                                                config.interference_snr_range, "interference"))
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
        room_folder = index.metadata_folder("room_ir")
        events, interference = (sorted(drawn, key=lambda e: e["event_time"]) for drawn in (events, interference))
        if config.metadata_format == "spatialscaper":  # SemgSegScaper2.generate_metadata's layout
            return {"config": {**folders, "rir_dir": room_folder, "duration": config.duration, "sr": SAMPLE_RATE,
                               "max_event_overlap": 3, "ref_db": config.ref_db, "return_dry": True, "return_wet": False,
                               "return_ir": False, "return_background": False, "ref_channel": 0,
                               "spatialize_direct_path_time_ms": list(config.direct_range_ms),
                               "return_interference": False},
                    "fg_events": events, "int_events": interference,
                    "bg_events": [dict(event, pitch_shift=None, time_stretch=None) for event in background],
                    "room": room.path.relative_to(index.folders["room_ir"]).as_posix()}
        return {
            "config": {"duration": config.duration, "sr": SAMPLE_RATE, "max_event_overlap": 3,
                       "max_event_dur": config.max_event_duration, "ref_db": config.ref_db, **folders,
                       "room_config": {"module": ROOM_MODULE, "main": "SofaRoom", "args": {
                           "path": room_folder, "direct_range_ms": list(config.direct_range_ms)}},
                       "verbose": False},
            "fg_events": events,
            "int_events": interference,
            "bg_events": background,
            "room": {"module": ROOM_MODULE, "main": "SofaRoom.from_metadata", "args": {"metadata": {
                "sofa_path": f"{room_folder}/{room.path.relative_to(index.folders['room_ir']).as_posix()}",
                "sr": SAMPLE_RATE, "nchan": room.num_channels, "nrir": room.num_positions,
                "rir_len": room.rir_length, "direct_range_ms": list(config.direct_range_ms)}}},
        }


# ---- Reading a scene: its events' audio and the rules of its format ----------------------------------------------
def metadata_year(scene) -> int:
    """2025 for SpatialScaper metadata (the room by its file name), 2026 for SpAudSyn's (the room described)."""
    return 2025 if isinstance(scene.get("room"), str) else 2026


def scene_rules(scene):
    """(sofa path, positions as stored?, RIR rule, background stretch) of a scene's format. RIR rule (normalisation,
    dry channel, samples before / after the peak, signed peak): SpAudSyn keeps [argmax|h0| - 192, argmax|h0| + 1600]
    of the RMS-normalised IR, SpatialScaper [argmax h - a, argmax h + b) of ref_channel (-1: none), L2-normalised."""
    config, room = scene["config"], scene.get("room")
    if isinstance(room, dict) and isinstance(room.get("args", {}).get("metadata"), dict):  # SpAudSyn (2026)
        room = room["args"]["metadata"]
        before, after = room.get("direct_range_ms", (6, 50))
        return room["sofa_path"], False, ("rms", 0, int(before * SAMPLE_RATE / 1000),
                                          int(after * SAMPLE_RATE / 1000), False), "tile"
    if not isinstance(room, str):  # SpatialScaper (2025): the file name of a room in config.rir_dir
        raise ValueError("not a scene: expected a SpAudSyn ('room': {'args': {'metadata': ...}}) or SpatialScaper "
                         "('room': '<name>.sofa') metadata dict")
    before, after = config.get("spatialize_direct_path_time_ms") or (6, 50)
    channel = config.get("ref_channel")
    channel = None if channel is None or channel < 0 else int(channel)
    return (f"{config['rir_dir']}/{scene['room']}", True,
            ("l2", channel, int(before * SAMPLE_RATE / 1000), int(after * SAMPLE_RATE / 1000), True), "repeat")


class Renderer:
    """Scenes of one dev set: prepare() reads their audio (any process), render() and __call__ render on the device."""

    def __init__(self, dev_set="data/dev_set", device="cpu", megabytes=WORKER_CACHE_MEGABYTES):
        self.dev_set, self.device, self.megabytes = Path(dev_set), torch.device(device), megabytes
        self._spectra = None  # made on the first render, in the process that renders

    def __getstate__(self):  # each DataLoader worker keeps its own spectra
        return dict(self.__dict__, _spectra=None)

    @property
    def spectra(self):
        self._spectra = self._spectra or RirSpectra(self.device, self.megabytes)
        return self._spectra

    def prepare(self, scene, num_channels=None, dry=True):
        """The worker half of rendering (no FFT) -> a record for stack_scenes: per event its samples (SpAudSyn's
        int(time * sr) arithmetic, mono, peak-normalised), onset, dry slot (-1: none), level and RIR key; the
        background [C, L] at its level. num_channels: the first room channels kept (None = all)."""
        config = scene["config"]
        if int(config["sr"]) != SAMPLE_RATE:
            raise ValueError(f"metadata sr {config['sr']}, expected {SAMPLE_RATE}")
        length = int(config["duration"] * SAMPLE_RATE)
        sofa_path, stored, rule, stretch = scene_rules(scene)
        room = open_room(resolve(self.dev_set, sofa_path).resolve())
        channels = room.num_channels if num_channels is None else num_channels
        if not 1 <= channels <= room.num_channels:
            raise ValueError(f"{room.path}: {room.num_channels} RIR channels, {channels} requested")
        dry = dry and rule[1] is not None
        foreground, interference = (sorted(scene.get(key) or [], key=lambda event: event["event_time"])
                                    for key in ("fg_events", "int_events"))  # render order
        record = {key: [] for key in ("sources", "lengths", "onsets", "full_lengths", "slots", "levels", "rir_keys")}
        for number, (event, folder) in enumerate(itertools.chain(
                ((event, "foreground_dir") for event in foreground),
                ((event, "interference_dir") for event in interference))):
            if not 0 <= event["event_time"] < config["duration"]:
                raise ValueError(f"event {event['source_file']}: event_time {event['event_time']} s is outside the "
                                 f"{config['duration']} s mixture")
            audio = read_audio(resolve(self.dev_set, config[folder], event["source_file"]),
                               int(event["source_time"] * SAMPLE_RATE), int(event["event_duration"] * SAMPLE_RATE))
            source = audio[0] if len(audio) == 1 else audio.mean(axis=0)  # mono like librosa, a new array
            peak = max(source.max(), -source.min()) if source.size else 0.0
            record["sources"].append(np.divide(source, peak, out=source) if peak > 0 else source)
            try:
                position = room.find_position(event["event_position"], stored)
            except ValueError as error:
                raise ValueError(f"event {event['source_file']}: {error}") from None
            record["lengths"].append(len(source))
            record["onsets"].append(int(event["event_time"] * SAMPLE_RATE))
            record["full_lengths"].append(len(source) + room.rir_length - 1)
            record["slots"].append(number if number < len(foreground) and dry else -1)
            record["levels"].append(config["ref_db"] + event["snr"])
            record["rir_keys"].append((str(room.path), position, rule, record["slots"][-1] >= 0))
        background = np.zeros((channels, length), dtype=np.float32)
        for event in scene.get("bg_events") or []:
            audio, gain = self._background(config, event, room.num_channels, length, stretch)
            background += audio[:channels] * gain  # the level counts all channels; only the kept ones are scaled
        return dict(record, sources=np.concatenate(record["sources"] or [np.zeros(0, np.float32)]),
                    background=background, rir_length=room.rir_length, dry=dry, metadata=scene,
                    labels=[event["label"] for event in foreground])

    def _background(self, config, event, channels, length, stretch):
        """(float32 [C, L], gain to ref_db + snr); a short file is tiled (SpAudSyn) or each sample repeated (2025)."""
        path = resolve(self.dev_set, config["background_dir"], event["source_file"])
        if event.get("source_time") is not None:
            audio = read_audio(path, int(event["source_time"] * SAMPLE_RATE), length)
        else:
            audio = read_audio(path)
            if audio.shape[1] == 0:
                raise ValueError(f"{path}: empty background file")
            repeat = math.ceil(length / audio.shape[1])
            audio = (np.tile(audio, (1, repeat)) if stretch == "tile" else np.repeat(audio, repeat, axis=1))[:, :length]
        if len(audio) != channels:
            warnings.warn(f"{path}: {len(audio)}-channel background for a {channels}-channel room, skipped")
            return np.zeros((channels, length), np.float32), np.float32(0)
        if audio.shape[1] < length:
            audio = np.pad(audio, ((0, 0), (0, length - audio.shape[1])))
        # Mean square in float32 pairwise sums per channel (relative error ~1e-8), the channels added in float64.
        energy = float(np.square(audio).sum(axis=1).astype(np.float64).sum()) / audio.size
        if energy == 0:
            return audio, np.float32(1)
        return audio, np.float32(10 ** ((config["ref_db"] + event.get("snr", 0) - 10 * math.log10(energy)) / 20))

    def render(self, records):
        """Records of one batch -> (mixture float32 [B, C, L], dry float32 [B, S, 1, L] or None) on the device."""
        return render_scenes(to_device(stack_scenes(records), self.device), self.spectra)

    def __call__(self, batch):
        """A DataLoader batch on the device, its records ('scene') rendered into 'mixture' and 'dry_sources'."""
        batch = to_device(batch, self.device)
        scenes = batch.pop("scene", None)
        if scenes is not None:
            batch["mixture"], dry = render_scenes(scenes, self.spectra)
            if dry is not None:
                batch["dry_sources"] = dry
        return batch

    def render_scene(self, scene, num_channels=None, dry=True):
        """One scene dict -> (mixture float32 [C, L], dry targets float32 [E, 1, L] in event_time order, labels)."""
        record = self.prepare(scene, num_channels, dry)
        mixture, dry_sources = self.render([record])
        events = len(record["labels"])
        return mixture[0].cpu(), None if dry_sources is None else dry_sources[0, :events].cpu(), record["labels"]


def to_device(value, device):
    """Tensors (also inside dicts) moved to the device without waiting for it; anything else as it is."""
    if torch.is_tensor(value):
        return value.to(device, non_blocking=True)
    if isinstance(value, dict):
        return {key: to_device(item, device) for key, item in value.items()}
    return value


# ---- Rendering scene batches on any device -----------------------------------------------------------------------
def rfft(signal, length):
    """Real FFT of the last axis, zero-padded to `length` -> complex64 [..., length // 2 + 1] on signal's device.
    CPU tensors go through scipy's pocketfft (faster there than torch's at these lengths on one core, bench.py)."""
    if signal.device.type == "cpu":
        return torch.from_numpy(scipy.fft.rfft(signal.numpy(), length, axis=-1))
    return torch.fft.rfft(signal, length)


def irfft(spectrum, length):
    """Inverse of rfft -> float32 [..., length]; on the CPU it overwrites `spectrum`."""
    if spectrum.device.type == "cpu":
        return torch.from_numpy(scipy.fft.irfft(spectrum.numpy(), length, axis=-1, overwrite_x=True))
    return torch.fft.irfft(spectrum, length)


def host_tensor(values, dtype, device):
    """A host list as a tensor on `device`; on CUDA through pinned memory, so the copy does not wait for the GPU."""
    tensor = torch.tensor(values, dtype=dtype)
    return tensor.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else tensor.to(device)


Spectra = collections.namedtuple("Spectra", "channels power direct")  # [C, F], [F], [F] or None of one RIR


class RirSpectra:
    """RIR spectra on one device, least recently used out beyond `megabytes`: the rfft of the first C channels, the
    power per bin over all channels (for Parseval levels) and the direct-path window's rfft; misses in one call."""

    def __init__(self, device, megabytes):
        self.device, self.megabytes, self.bytes = torch.device(device), megabytes, 0
        self.entries = collections.OrderedDict()  # key -> Spectra, least recently used first

    def lookup(self, keys, fft_length, channels):
        """Spectra of each key (room path, position, rule, with direct path?) for this layout, in order."""
        # The DataLoader's pin_memory turns tuples into lists: keys are made hashable again here.
        keys = [(path, int(position), tuple(rule), bool(direct), fft_length, channels)
                for path, position, rule, direct in keys]
        missing = [key for key in dict.fromkeys(keys) if key not in self.entries]
        found = {key: self.entries[key] for key in keys if key in self.entries}
        for key in found:
            self.entries.move_to_end(key)
        if missing:
            found |= self._compute(missing)
            self.entries |= {key: found[key] for key in missing}
            self.bytes += sum(part.nbytes for key in missing for part in found[key] if part is not None)
        while self.bytes > self.megabytes * 2 ** 20:
            self.bytes -= sum(part.nbytes for part in self.entries.popitem(last=False)[1] if part is not None)
        return [found[key] for key in keys]

    def _compute(self, keys):
        reads = []  # per key: the normalised RIR [R, N] and the slice of its dry channel kept as direct path
        for path, position, (normalisation, channel, before, after, signed), _, _, channels in keys:
            room = open_room(Path(path))
            if channels > room.num_channels:
                raise ValueError(f"{path}: {room.num_channels} RIR channels, {channels} requested")
            response = room.rir(position, normalisation)
            reference = response[channel or 0]
            peak = int(np.argmax(reference if signed else np.abs(reference)))
            reads.append((response, slice(max(peak - before, 0), min(peak + after + (not signed), len(reference)))))
        fft_length = keys[0][4]
        sizes = [len(response) + key[3] for (response, _), key in zip(reads, keys)]
        stacked = np.zeros((sum(sizes), fft_length), np.float32)
        for start, (response, window), key in zip(np.cumsum([0] + sizes), reads, keys):
            stacked[start:start + len(response), :response.shape[-1]] = response
            if key[3]:  # the next row: the dry channel inside the direct-path window
                stacked[start + len(response), window] = response[key[2][1], window]
        transformed = rfft(torch.from_numpy(stacked).to(self.device), fft_length).split(sizes)
        spectra = {}
        for key, rows, (response, _) in zip(keys, transformed, reads):
            room_rows = rows[:len(response)]  # (R, F)
            # Copies: a view would keep all rows of the transform alive, uncounted.
            spectra[key] = Spectra(rows[:key[5]].clone(), (room_rows.real.square() + room_rows.imag.square()).mean(0),
                                   rows[len(response)].clone() if key[3] else None)
        return spectra


def stack_scenes(records):
    """Records (Renderer.prepare) of one batch -> render_scenes' input: sources [T] (all events concatenated),
    background [B, C, L], host lists per event, fft_length, dry_slots (0 = none) and the scenes' metadata."""
    shapes = sorted({record["background"].shape for record in records})
    if len(shapes) > 1:
        raise ValueError(f"the scenes of one batch differ in (channels, samples): {shapes}")
    length = shapes[0][1]
    batch = {key: [value for record in records for value in record[key]]
             for key in ("lengths", "onsets", "full_lengths", "slots", "levels", "rir_keys")}
    batch["items"] = [item for item, record in enumerate(records) for _ in record["lengths"]]
    span = max([length] + [onset + count for onset, count in zip(batch["onsets"], batch["lengths"])])
    dry_slots = max([NUM_SLOTS] + [len(record["labels"]) for record in records]) if records[0]["dry"] else 0
    return dict(batch, sources=torch.from_numpy(np.concatenate([record["sources"] for record in records])),
                background=torch.from_numpy(np.stack([record["background"] for record in records])),
                fft_length=scipy.fft.next_fast_len(span + max(r["rir_length"] for r in records) - 1, real=True),
                dry_slots=dry_slots, metadata=[record["metadata"] for record in records])


def render_scenes(scenes, spectra):
    """Render a scene batch (stack_scenes; tensors on one device) there -> (mixture float32 [B, C, L], dry float32
    [B, S, 1, L] or None): each source spectrum scaled to its level by Parseval, times each RIR channel, summed per
    mixture, one inverse FFT per output row; within 1e-4 of float64. A GPU is never waited for."""
    background, fft_length, dry_slots = scenes["background"], scenes["fft_length"], scenes["dry_slots"]
    (B, C, L), events, device = background.shape, len(scenes["lengths"]), background.device
    if device.type == "cpu" and torch.get_num_threads() > 1:
        # One thread, as in a loader worker: split over threads, elementwise complex products fall into vectorised
        # and scalar code differently and round differently, and a scene must give the same bits anywhere.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return render_scenes(scenes, spectra)
        finally:
            torch.set_num_threads(threads)
    mixture = background.clone()
    dry = background.new_zeros(B, dry_slots, 1, L) if dry_slots else None
    if events:
        rirs = spectra.lookup(scenes["rir_keys"], fft_length, C)
        placed = background.new_zeros(events, fft_length)  # (E, N): each source at its onset
        starts = itertools.accumulate(scenes["lengths"], initial=0)
        for event, (start, count, onset) in enumerate(zip(starts, scenes["lengths"], scenes["onsets"])):
            placed[event, onset:onset + count] = scenes["sources"][start:start + count]
        source = rfft(placed, fft_length)  # (E, F)
        weighted = (source.real.square() + source.imag.square()) * torch.stack([rir.power for rir in rirs])
        # Parseval for a real signal: every bin counts twice except DC and (for an even length) Nyquist.
        energy = 2 * weighted.sum(-1).double() - weighted[:, 0]
        if fft_length % 2 == 0:
            energy = energy - weighted[:, -1]
        energy = energy / (fft_length * host_tensor(scenes["full_lengths"], torch.float64, device))  # mean square
        target = 10 ** (host_tensor(scenes["levels"], torch.float64, device) / 20)
        gain = torch.where(energy > 0, target / energy.clamp(min=1e-300).sqrt(), 1.0)
        source *= gain.float()[:, None]
        foreground = [event for event, slot in enumerate(scenes["slots"]) if slot >= 0]
        outputs = torch.zeros(B * C + len(foreground), fft_length // 2 + 1, dtype=torch.complex64, device=device)
        for event, item in enumerate(scenes["items"]):
            outputs[item * C:(item + 1) * C].addcmul_(source[event], rirs[event].channels)  # (C, F)
        if foreground:  # (E_fg, F): the dry targets' spectra
            torch.mul(source[foreground], torch.stack([rirs[event].direct for event in foreground]),
                      out=outputs[B * C:])
        waves = irfft(outputs, fft_length)  # (rows, N)
        mixture += waves[:B * C, :L].view(B, C, L)
        if foreground:
            rows = host_tensor([scenes["items"][e] * dry_slots + scenes["slots"][e] for e in foreground],
                               torch.int64, device)
            dry.view(B * dry_slots, L)[rows] = waves[B * C:, :L]
    return mixture, dry


# ---- Datasets ----------------------------------------------------------------------------------------------------
def collate(items):
    """Batch dict: scene records by stack_scenes, tensors stacked along a new first dim, other values listed."""
    columns = {key: [item[key] for item in items] for key in items[0]}
    return {key: stack_scenes(values) if key == "scene" else torch.stack(values)
            if all(torch.is_tensor(value) for value in values) else values for key, values in columns.items()}


class SceneDataset(torch.utils.data.Dataset):
    """Items of scene dicts: 'label' (silence last), 'label_vector', 'soundscape', 'metadata' and 'mixture' [C, L] with
    'dry_sources' [S, 1, L], or with render=False the record under 'scene' (rendered by Renderer.__call__)."""

    def __init__(self, dev_set, label_vector_mode, silence_label_mode, return_sources, num_channels, render):
        self.renderer = Renderer(dev_set)
        self.modes = (label_vector_mode, silence_label_mode)
        self.return_sources, self.num_channels, self.render = return_sources, num_channels, render

    def item(self, scene, name, order=None):
        """The item of a scene; order: the foreground events (render order) of slots 0, 1, ..."""
        record = self.renderer.prepare(scene, self.num_channels, self.return_sources)
        order = list(range(len(record["labels"]))) if order is None else order
        slots = np.full(len(record["slots"]), -1)
        slots[order] = np.arange(len(order))
        record["slots"] = [int(slot) if old >= 0 else -1 for slot, old in zip(slots, record["slots"])]
        labels = [record["labels"][i] for i in order] + [SILENCE] * max(NUM_SLOTS - len(order), 0)
        item = {"label": labels, "label_vector": label_vector(labels, *self.modes), "soundscape": name,
                "metadata": scene}
        if not self.render:
            return item | {"scene": record}
        mixture, dry = self.renderer.render([record])
        return item | {"mixture": mixture[0]} | ({"dry_sources": dry[0]} if dry is not None else {})


class GeneratedDataset(SceneDataset):
    """Training mixtures generated from the `split` folders; item i is a pure function of (seed, i)."""

    def __init__(self, data_root, scene=None, length=1000, seed=0, label_vector_mode="stack",
                 silence_label_mode="zeros", return_sources=True, split="train", num_channels=None, render=True):
        super().__init__(data_root, label_vector_mode, silence_label_mode, return_sources, num_channels, render)
        self.index = DataIndex(data_root, split)  # listed once here; workers receive a copy
        self.scene_config = scene if scene is not None else SceneConfig()
        self.generator = SceneGenerator(self.index, self.scene_config)
        fewest = min(room.num_channels for room in self.index.rooms)
        if num_channels is not None and num_channels > fewest:
            raise ValueError(f"{num_channels} mixture channels requested, but the rooms of {data_root} have {fewest}")
        self.length, self.seed = length, seed

    def __len__(self):
        return self.length

    def scene(self, index, rng=None):
        """The metadata of item `index` (rendering it gives the same mixture)."""
        return self.generator.generate(rng or item_rng(self.seed, index))

    def __getitem__(self, index):
        rng = item_rng(self.seed, index)
        scene = self.scene(index, rng)
        order = list(range(len(scene["fg_events"])))
        if self.scene_config.shuffle_label:
            rng.shuffle(order)  # drawn after the scene, as the official shuffle after synthesis
        return self.item(scene, "soundscape_%08d" % index, order)


class MetadataDataset(SceneDataset):
    """Mixtures of metadata files (valid.json or a folder of *.json) in data_root (None: the one they lie in)."""

    def __init__(self, metadata_path, data_root=None, label_vector_mode="stack", silence_label_mode="zeros",
                 return_sources=True, num_channels=None, render=True):
        dev_set = data_root if data_root is not None else find_dev_set(metadata_path)
        super().__init__(dev_set, label_vector_mode, silence_label_mode, return_sources, num_channels, render)
        self.files = metadata_files(metadata_path)

    def __len__(self):
        return len(self.files)

    def __getitem__(self, index):
        path, entry = self.files[index]
        try:
            scene = json.loads(path.read_text())
            return self.item(scene, path.stem, slot_order(scene, entry["ref_event"]) if "ref_event" in entry else None)
        except (ValueError, KeyError, TypeError) as error:
            raise ValueError(f"{path}: {error!r}") from None


def slot_order(scene, ref_event):
    """The foreground events (render order) of slots 0, 1, ... as a 2025 valid.json entry's ref_event names them
    (3 labels padded with silence; its labels must be the events' labels, as the official code asserts)."""
    labels = [event["label"] for event in sorted(scene["fg_events"], key=lambda event: event["event_time"])]
    wanted = [label for label in ref_event if label != SILENCE]
    if sorted(wanted) != sorted(labels):
        raise ValueError(f"ref_event {ref_event} does not name the events' labels {labels}")
    order = []
    for label in wanted:  # the same class twice: its events in render order
        order.append(next(number for number, name in enumerate(labels) if name == label and number not in order))
    return order
