"""Data tooling: a procedural demo dev set, a layout/format checker, the official add-data step and rendering
of SpAudSyn metadata to WAV files.

    python data_prep.py demo [--out data]                    # writes data/dev_set (seconds)
    python data_prep.py demo --out bench --rir_length 174763 --event_seconds_max 10   # dev-set-like rooms
    python data_prep.py verify [--data data/dev_set]         # lists every problem, exit 1 if any
    python data_prep.py add-data --semhear_path P --ears_path P [--data data/dev_set]
    python data_prep.py render --metadata data/dev_set/metadata/valid.json --out DIR [--data_root .]
"""
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import scipy.signal
import soundfile

from cli import StrictParser, add_config_flags, config_from_args
from synth import LABELS, SAMPLE_RATE, DataIndex, GeneratedDataset, Renderer, SceneConfig, metadata_files, parse_source_name

SPEED_OF_SOUND = 343.0  # m/s
MIC_POSITIONS = 0.042 * np.array([[1, 1, 1], [1, -1, -1], [-1, 1, -1], [-1, -1, 1]]) / np.sqrt(3)  # m, tetrahedron
INTERFERENCE_LABELS = ("Hum", "Rain", "Wind")  # demo interference classes (not target classes)


@dataclasses.dataclass
class DemoConfig:
    out: str = "data"  # the dev set is written to OUT/dev_set
    files_per_class: int = 6  # per target class, spread over 3 sub-folders
    event_seconds_min: float = 1.0  # s, shortest demo event file
    event_seconds_max: float = 4.0  # s, longest demo event file (10+ s files give random excerpts)
    num_rooms: int = 3  # SOFA rooms
    rir_length: int = 4096  # taps per RIR (the real dev set has 174763)
    num_valid: int = 16  # metadata/valid mixtures
    num_test: int = 24  # synthesized/test mixtures
    seed: int = 0  # everything in the demo is a function of this seed


@dataclasses.dataclass
class AddDataConfig:
    semhear_path: str = ""  # folder of the SemHear data (holds FSD50K/ and bg_scaper_fmt/)
    ears_path: str = ""  # folder of the EARS speech corpus
    data: str = "data/dev_set"  # dev set to add to (reads DATA/config/*_config.json)
    target_sr: int = 32000  # Hz, output rate
    amp_threshold: float = 0.02  # fraction of the file's peak below which leading/trailing frames are cut
    min_length: float = 0.1  # s, shorter results are dropped
    segment: float = 10.0  # s, longer recordings are cut into pieces of at most this length
    shift: float = 0.1  # s, frame length of the amplitude-threshold detector


# ----------------------------------------------------------------------------------------------------------
# Demo signals


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
        source = file.create_dataset("SourcePosition", data=spherical_positions)
        source.attrs.update({"Type": b"spherical", "Units": b"degree, degree, metre"})
        listener = file.create_dataset("ListenerPosition", data=np.zeros((1, 3)))
        listener.attrs.update({"Type": b"cartesian", "Units": b"metre"})
        receiver = file.create_dataset("ReceiverPosition", data=MIC_POSITIONS)
        receiver.attrs.update({"Type": b"cartesian", "Units": b"metre"})


def _write_wav(path, audio, subtype="PCM_16"):
    """Write [C, n] or [n] audio; an existing file with other content is an error, never overwritten."""
    path = Path(path)
    audio = np.asarray(audio)
    if path.exists():
        try:
            existing, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
        except Exception:
            existing, rate = None, None
        written = audio.T if audio.ndim == 2 else audio[:, None]
        if rate == SAMPLE_RATE and existing.shape == written.shape and np.allclose(existing, written, atol=1e-4):
            return False
        raise FileExistsError(f"{path}: exists with different content; remove it to regenerate")
    path.parent.mkdir(parents=True, exist_ok=True)
    soundfile.write(str(path), audio.T if audio.ndim == 2 else audio, SAMPLE_RATE, subtype=subtype)
    return True


# ----------------------------------------------------------------------------------------------------------
# Rendering metadata to files


def render_metadata(metadata_path, out_dir, data_root=".", subtype="FLOAT"):
    """Render every mixture of valid.json (or a folder of JSONs) to OUT/soundscape and OUT/oracle_target."""
    out_dir = Path(out_dir)
    files = metadata_files(metadata_path)
    renderer = Renderer([data_root, *Path(metadata_path).resolve().parents])
    for file in files:
        try:
            rendered = renderer.render(json.loads(file.read_text()))
        except (ValueError, KeyError, TypeError) as error:
            raise ValueError(f"{file}: {error}") from None
        _write_wav(out_dir / "soundscape" / f"{file.stem}.wav", rendered["mixture"], subtype)
        for slot, (label, dry) in enumerate(zip(rendered["labels"], rendered["dry_sources"])):
            _write_wav(out_dir / "oracle_target" / f"{file.stem}_{slot}_{label}.wav", dry[0], subtype)
    return len(files)


def _save_scenes(dataset, count, first_index, folder, dev_set):
    """Write count generated scenes as metadata JSONs with 'OUT_NAME/dev_set/...' paths (official style)."""
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for number in range(count):
        text = json.dumps(dataset.scene(first_index + number), indent=1)
        text = text.replace(json.dumps(dev_set.as_posix())[1:-1], f"{dev_set.resolve().parent.name}/dev_set")
        name = "soundscape_%04d" % number
        (folder / f"{name}.json").write_text(text)
        names.append(name)
    return names


def make_demo(out="data", config=None):
    """Write the procedural demo dev set to OUT/dev_set and return its path. Deterministic from config.seed."""
    config = dataclasses.replace(config or DemoConfig(), out=str(out))
    dev_set = Path(config.out) / "dev_set"
    if (dev_set / "sound_event").exists():
        raise FileExistsError(f"{dev_set}: already exists; remove it to rebuild the demo")
    rng = np.random.default_rng(config.seed)
    lengths = lambda: rng.uniform(config.event_seconds_min, config.event_seconds_max)
    for class_index, label in enumerate(LABELS):
        for number in range(config.files_per_class):
            path = dev_set / "sound_event" / label / f"take{number % 3}" / f"{label.lower()}_{number:02d}.wav"
            _write_wav(path, class_signal(class_index, lengths(), rng))
    for label in INTERFERENCE_LABELS:
        for number in range(4):
            _write_wav(dev_set / "interference" / label / f"{label.lower()}_{number:02d}.wav",
                       interference_signal(label, lengths(), rng))
    for number, seconds in enumerate((12.0, 15.5, 7.0)):  # the 7 s file is tiled, the others give excerpts
        common = rng.standard_normal(int(seconds * SAMPLE_RATE))
        noise = scipy.signal.lfilter([1.0], [1.0, -0.98], common + rng.standard_normal((4, len(common))), axis=-1)
        _write_wav(dev_set / "noise" / f"noise_{number:02d}.wav", 0.3 * noise / np.max(np.abs(noise)))
    (dev_set / "room_ir").mkdir(parents=True, exist_ok=True)
    for number in range(config.num_rooms):
        spherical = np.array([[azimuth, elevation, radius] for radius in (0.75, 1.5) for elevation in (0.0, 20.0)
                              for azimuth in range(0, 360, 30)], dtype=np.float64)
        azimuth, elevation = np.deg2rad(spherical[:, 0]), np.deg2rad(spherical[:, 1])
        cartesian = spherical[:, 2:] * np.stack([np.cos(azimuth) * np.cos(elevation),
                                                 np.sin(azimuth) * np.cos(elevation), np.sin(elevation)], axis=1)
        responses = room_responses(cartesian, config.rir_length, 0.25 + 0.2 * number, rng)
        write_sofa(dev_set / "room_ir" / f"room_{number:02d}.sofa", responses, spherical)
    validation = GeneratedDataset(dev_set, SceneConfig(), length=config.num_valid, seed=config.seed + 1)
    names = _save_scenes(validation, config.num_valid, 0, dev_set / "metadata" / "valid", dev_set)
    (dev_set / "metadata" / "valid.json").write_text(json.dumps(
        [{"metadata_path": f"valid/{name}.json"} for name in names], indent=1))
    test_metadata = dev_set / "synthesized" / "test" / "metadata"
    _save_scenes(GeneratedDataset(dev_set, SceneConfig(), length=config.num_test, seed=config.seed + 2),
                 config.num_test, 0, test_metadata, dev_set)
    render_metadata(test_metadata, dev_set / "synthesized" / "test", data_root=dev_set.resolve().parent.parent,
                    subtype="PCM_16")  # 16-bit like the official test set, half the size
    return dev_set


# ----------------------------------------------------------------------------------------------------------
# Verify


def verify(data):
    """Check a dev set; returns (summary lines, problems)."""
    data = Path(data)
    index = DataIndex(data, strict=False)
    problems = list(index.problems)
    summary = [f"sound_event: {len(index.labels)} classes, {sum(len(f) for f in index.events.values())} files",
               f"interference: {len(index.interference_labels)} classes, "
               f"{sum(len(f) for f in index.interference.values())} files",
               f"noise: {len(index.noise)} files",
               f"room_ir: {len(index.rooms)} rooms, {sum(room.num_positions for room in index.rooms)} positions"]
    missing = [label for label in LABELS if label not in index.events]
    if missing and index.events:
        problems.append(f"{index.folders['sound_event']}: no folder for classes {', '.join(missing)}")
    valid = data / "metadata" / "valid.json"
    if valid.exists():
        try:
            files = metadata_files(valid)
        except ValueError as error:
            problems.append(str(error))
            files = []
        renderer = Renderer([".", *valid.resolve().parents])
        for file in files:
            problems += _metadata_problems(file, renderer)
        summary.append(f"metadata: {len(files)} validation mixtures")
    else:
        problems.append(f"{valid}: missing validation metadata")
    test = data / "synthesized" / "test"
    if (test / "soundscape").is_dir():
        soundscapes = sorted((test / "soundscape").glob("*.wav"))
        names = {path.stem for path in soundscapes}
        for path in soundscapes:
            problems += _wav_problems(path, 4)
        targets = sorted((test / "oracle_target").glob("*.wav"))
        for path in targets:
            owners = [name for name in names if path.name.startswith(name + "_")]
            if not owners:
                problems.append(f"{path}: belongs to no soundscape in {test / 'soundscape'}")
                continue
            try:
                parse_source_name(max(owners, key=len), path.name)
            except ValueError as error:
                problems.append(f"{path.parent / str(error)}")
            problems += _wav_problems(path, 1)
        summary.append(f"synthesized/test: {len(soundscapes)} soundscapes, {len(targets)} oracle targets")
    return summary, problems


def _wav_problems(path, channels):
    try:
        info = soundfile.info(str(path))
    except Exception as error:
        return [f"{path}: unreadable audio file ({error})"]
    found = []
    if info.samplerate != SAMPLE_RATE:
        found.append(f"{path}: sample rate {info.samplerate} Hz, expected {SAMPLE_RATE} Hz")
    if info.channels != channels:
        found.append(f"{path}: {info.channels} channels, expected {channels}")
    return found


def _metadata_problems(file, renderer):
    """Every referenced file must exist (and be long enough), every position must be in its room."""
    try:
        scene = json.loads(file.read_text())
        config = scene["config"]
        room = renderer.room(scene["room"]["args"]["metadata"]["sofa_path"])
    except (ValueError, KeyError, TypeError) as error:
        return [f"{file}: {error}"]
    found = []
    for key, folder in (("fg_events", "foreground_dir"), ("int_events", "interference_dir"),
                        ("bg_events", "background_dir")):
        for event in scene.get(key) or []:
            try:
                path = renderer.resolve(config[folder], event["source_file"])
                info = soundfile.info(str(path))
                end = (event.get("source_time") or 0) + event["event_duration"]
                if key != "bg_events" and int(end * SAMPLE_RATE) > info.frames + 1:
                    found.append(f"{file}: {path} has {info.frames / SAMPLE_RATE:.3f} s, the event needs {end:.3f} s")
                if key != "bg_events":
                    room.find_position(event["event_position"])
            except (ValueError, KeyError, TypeError, RuntimeError) as error:
                found.append(f"{file}: {error}")
    return found


# ----------------------------------------------------------------------------------------------------------
# Add data (the official add_data.sh step)


def _active_span(audio, config):
    """(start, end) samples after cutting leading/trailing frames of `shift` s whose peak is below
    amp_threshold x the file's peak; (0, 0) for silence."""
    peak = np.max(np.abs(audio)) if audio.size else 0.0
    if peak == 0:
        return 0, 0
    frame = max(int(config.shift * config.target_sr), 1)
    frames = math.ceil(len(audio) / frame)
    padded = np.pad(np.abs(audio), (0, frames * frame - len(audio))).reshape(frames, frame)  # (frames, frame)
    active = np.flatnonzero(padded.max(axis=1) >= config.amp_threshold * peak)
    return int(active[0]) * frame, min(int(active[-1] + 1) * frame, len(audio))


def process_recording(path, config):
    """Read, mix to mono, resample to target_sr, trim, segment -> list of float32 pieces (maybe empty)."""
    try:
        audio, rate = soundfile.read(str(path), dtype="float64", always_2d=True)
    except Exception as error:
        raise ValueError(f"{path}: unreadable audio file ({error})") from None
    audio = audio.mean(axis=1)
    if rate != config.target_sr:
        divisor = math.gcd(config.target_sr, rate)
        audio = scipy.signal.resample_poly(audio, config.target_sr // divisor, rate // divisor)
    start, end = _active_span(audio, config)
    audio = audio[start:end]
    piece = int(config.segment * config.target_sr)
    pieces = [audio[first:first + piece] for first in range(0, len(audio), piece)]
    return [p.astype(np.float32) for p in pieces if len(p) >= config.min_length * config.target_sr]


def read_pickup_list(path):
    """A pick-up list: JSON object {destination: [source paths]}.

    destination = class folder relative to sound_event/ ('Speech' or 'train/Speech'; its last part must be one
    of LABELS); source paths are relative to the corpus folder (--semhear_path/FSD50K or --ears_path).
    """
    try:
        table = json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"{path}: unreadable pick-up list ({error})") from None
    if not isinstance(table, dict) or not all(isinstance(v, list) and all(isinstance(s, str) for s in v)
                                               for v in table.values()):
        raise ValueError(f"{path}: expected a JSON object {{class folder: [relative source paths]}}")
    for destination in table:
        if Path(destination).name not in LABELS:
            raise ValueError(f"{path}: {destination!r} does not end in a class name of LABELS")
    return table


def _add(source, destination_folder, config):
    """Process one recording into destination_folder/<stem>/<stem>_<k>.wav; returns (written, skipped)."""
    written = skipped = 0
    for number, piece in enumerate(process_recording(source, config)):
        path = destination_folder / source.stem / f"{source.stem}_{number:03d}.wav"
        if _write_wav(path, piece, "FLOAT"):
            written += 1
        else:
            skipped += 1
    return written, skipped


def add_data(config: AddDataConfig):
    """Add interference (SemHear bg_scaper_fmt, every file) and sound events (the two pick-up lists)."""
    data = Path(config.data)
    jobs = []  # (source file, destination folder)
    if config.semhear_path:
        interference = Path(config.semhear_path) / "bg_scaper_fmt"
        if not interference.is_dir():
            raise ValueError(f"{interference}: missing (expected SemHear's bg_scaper_fmt/<class>/**.wav)")
        for path in sorted(interference.rglob("*.wav")):
            jobs.append((path, data / "interference" / path.parent.relative_to(interference)))
    for corpus, pickup in ((Path(config.semhear_path) / "FSD50K" if config.semhear_path else None, "FSD50K"),
                           (Path(config.ears_path) if config.ears_path else None, "EARS")):
        if corpus is None:
            continue
        for destination, sources in read_pickup_list(data / "config" / f"{pickup}_config.json").items():
            for relative in sources:
                path = corpus / relative
                if not path.is_file():
                    raise ValueError(f"{path}: listed in {pickup}_config.json but not found")
                jobs.append((path, data / "sound_event" / destination / Path(relative).parent))
    written = skipped = 0
    for path, folder in jobs:
        counts = _add(path, folder, config)
        written, skipped = written + counts[0], skipped + counts[1]
    print(f"add-data: {len(jobs)} recordings, {written} files written, {skipped} already present")
    return written, skipped


# ----------------------------------------------------------------------------------------------------------
# Command line


def main():
    parser = StrictParser(description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    add_config_flags(commands.add_parser("demo", help="write the procedural demo dev set"), DemoConfig)
    commands.add_parser("verify", help="check a dev set").add_argument("--data", default="data/dev_set")
    add_config_flags(commands.add_parser("add-data", help="the official add_data.sh step"), AddDataConfig)
    render = commands.add_parser("render", help="render SpAudSyn metadata to WAV files")
    render.add_argument("--metadata", default="data/dev_set/metadata/valid.json", help="valid.json or a folder")
    render.add_argument("--out", required=True, help="writes OUT/soundscape and OUT/oracle_target")
    render.add_argument("--data_root", default=".", help="folder the metadata paths are relative to")
    arguments = parser.parse_args()
    if arguments.command == "demo":
        start = time.perf_counter()
        dev_set = make_demo(arguments.out, config_from_args(arguments, DemoConfig))
        size = sum(p.stat().st_size for p in dev_set.rglob("*") if p.is_file()) / 2 ** 20
        print(f"demo dev set written to {dev_set} ({size:.1f} MiB) in {time.perf_counter() - start:.1f} s")
    elif arguments.command == "verify":
        summary, problems = verify(arguments.data)
        print("\n".join(summary))
        if problems:
            print(f"{len(problems)} problem(s):\n  " + "\n  ".join(problems))
            sys.exit(1)
        print("ok")
    elif arguments.command == "add-data":
        add_data(config_from_args(arguments, AddDataConfig))
    else:
        count = render_metadata(arguments.metadata, arguments.out, arguments.data_root)
        print(f"rendered {count} mixtures to {arguments.out}")


if __name__ == "__main__":
    main()
