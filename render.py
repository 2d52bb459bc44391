"""SpAudSyn-exact rendering of scenes: SpAudSyn metadata in, mixtures and dry targets out, on any device (the
mixtures are described in synth.py, the computation in render_scenes).

Rendering has two halves. Renderer.prepare (cheap, in DataLoader workers) reads and peak-normalises the events and
the background of a scene into a compact record; render_scenes (the FFT math, written once in torch) renders a
whole batch of records on any device: the worker's CPU (datasets with render=True, the default) or the training
GPU (render=False; train.py --render_on device calls BatchRenderer once per step).

Speed: RIR spectra are kept per device (RirSpectra: bounded in bytes) and, with spectrum_cache_dir, also in .npy
files there shared by all processes and runs (10 MB per RIR position of the dev set). Measured by
`python synth.py --bench` (worker ms per mixture, device mixtures/s with the breakdown).
"""
import collections
import ctypes
import hashlib
import math
import os
import sys
import warnings
from pathlib import Path

import numpy as np
import scipy.fft
import torch

from devset import NUM_SLOTS, OFFICIAL_PREFIX, SAMPLE_RATE, TIMER, SofaRoom, read_audio

HEAP_KEEP_MEGABYTES = 128  # freed memory glibc keeps for reuse instead of returning it (see keep_heap_memory)
spectrum_cache_megabytes = 256  # per worker process; RIR spectra kept so that repeated positions skip the read + FFT
CPU_KERNELS = True  # CPU tensors use scipy.fft and a copy per event (faster there); False runs the GPU code (tests)
_HEAP_TUNED = {}  # process id -> megabytes of free heap glibc was told to keep


# ----------------------------------------------------------------------------------------------------------
# Heap memory and cache files


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


def _save_atomically(path, array):
    """np.save to a temporary name in the same folder, then rename: readers never see a partial file."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(temporary, "wb") as file:
        np.save(file, array)
    os.replace(temporary, path)


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
        return {"sources": np.concatenate(sources) if sources else np.zeros(0, np.float32),  # float32 already
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
    if scenes["background"].device.type == "cpu" and torch.get_num_threads() > 1:
        # One thread, as in a loader worker: split over threads, elementwise complex products and FFT rows fall
        # into vectorised and scalar code differently and round differently, and a scene must give the same bits
        # wherever it is rendered.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return render_scenes(scenes, spectra)
        finally:
            torch.set_num_threads(threads)
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

