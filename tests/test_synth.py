"""Synthesis tests: levels and dry window against an exact float64 SpAudSyn computation, SOFA reading,
metadata round trip, determinism across DataLoader workers, duplicate constraints, device rendering, errors, and
an augmentation added in three edits of synth.py."""
import importlib.util
import json
import math
from pathlib import Path

import h5py
import numpy as np
import pytest
import scipy.signal
import soundfile
import torch

import data_prep
import devset
import evaluate
import synth

RATE = devset.SAMPLE_RATE


def write_room(path, taps=4000, positions=None, spherical=True, rate=RATE, seed=0):
    """A 4-mic SOFA room whose RIRs have a clear peak at a position-dependent tap."""
    rng = np.random.default_rng(seed)
    positions = np.array(positions if positions is not None else [[a, 0.0, 1.5] for a in range(0, 360, 45)], float)
    responses = 0.01 * rng.standard_normal((len(positions), 4, taps))
    for m in range(len(positions)):
        responses[m, :, 300 + 10 * m] = 1.0 + 0.1 * np.arange(4)
    if spherical:
        data_prep.write_sofa(path, responses, positions, rate)
    else:
        with h5py.File(path, "w") as file:
            file["Data.IR"] = responses
            file["Data.SamplingRate"] = [float(rate)]
            file["SourcePosition"] = positions
            file["SourcePosition"].attrs["Type"] = b"cartesian"
    return responses


def cartesian(spherical):
    az, el, r = np.deg2rad(spherical[0]), np.deg2rad(spherical[1]), spherical[2]
    return [r * math.cos(az) * math.cos(el), r * math.sin(az) * math.cos(el), r * math.sin(el)]


def reference_render(scene, root):
    """Exact float64 SpAudSyn computation (scipy.signal.fftconvolve), written independently of synth.py; for a
    SpatialScaper (2025) scene its rules: raw stored positions, L2 normalisation, the signed peak's window [peak - a,
    peak + b) of ref_channel, a short background's samples repeated."""
    config = scene["config"]
    spatialscaper = isinstance(scene["room"], str)
    room_path = root / (f"{config['rir_dir']}/{scene['room']}" if spatialscaper else
                        scene["room"]["args"]["metadata"]["sofa_path"])
    with h5py.File(room_path) as file:
        irs = np.asarray(file["Data.IR"], float)
        stored = np.asarray(file["SourcePosition"], float)
        kind = file["SourcePosition"].attrs["Type"]
        spherical = (kind.decode() if isinstance(kind, bytes) else kind) == "spherical"
        positions = np.array([cartesian(p) for p in stored]) if spherical and not spatialscaper else stored
    mixture = np.zeros((4, 320000))
    dry_sources, levels = [], []
    for key, folder in (("fg_events", "foreground_dir"), ("int_events", "interference_dir")):
        for event in sorted(scene[key], key=lambda e: e["event_time"]):
            x, _ = soundfile.read(root / config[folder] / event["source_file"], dtype="float32",
                                  start=int(event["source_time"] * RATE), frames=int(event["event_duration"] * RATE))
            x = (x / np.max(np.abs(x))).astype(np.float64)
            index = int(np.argmin(np.linalg.norm(positions - np.array(event["event_position"][0]), axis=1)))
            h = irs[index] / (np.mean(np.linalg.norm(irs[index], axis=-1)) if spatialscaper else
                              np.sqrt(np.mean(np.sum(irs[index] ** 2, axis=-1))))
            wet = scipy.signal.fftconvolve(x[None, :], h, mode="full", axes=1)
            scale = 10 ** ((config["ref_db"] + event["snr"] - 10 * np.log10(np.mean(wet ** 2))) / 20)
            wet *= scale
            levels.append(10 * np.log10(np.mean(wet ** 2)) - config["ref_db"] - event["snr"])
            onset = int(event["event_time"] * RATE)
            part = wet[:, :320000 - onset]
            mixture[:, onset:onset + part.shape[1]] += part
            if key == "fg_events":
                channel = config["ref_channel"] if spatialscaper else 0
                window = np.zeros_like(h[channel])
                if spatialscaper:
                    t0 = int(np.argmax(h[channel]))
                    before, after = (int(ms * RATE / 1000) for ms in config["spatialize_direct_path_time_ms"])
                    window[max(t0 - before, 0):t0 + after] = 1
                else:
                    t0 = int(np.argmax(np.abs(h[0])))
                    window[max(t0 - 192, 0):min(t0 + 1600, len(window) - 1) + 1] = 1
                dry = scipy.signal.fftconvolve(x, h[channel] * window) * scale
                placed = np.zeros(320000)
                part = dry[:320000 - onset]
                placed[onset:onset + len(part)] = part
                dry_sources.append(placed)
                levels.append(int(window.sum()))
    for event in scene["bg_events"]:
        noise, _ = soundfile.read(root / config["background_dir"] / event["source_file"], dtype="float32",
                                  always_2d=True)
        stretch = np.repeat if spatialscaper else lambda audio, count, axis: np.tile(audio, (1, count))
        noise = stretch(noise.T.astype(np.float64), -(-320000 // len(noise)), axis=1)[:, :320000]
        mixture += noise * 10 ** ((config["ref_db"] - 10 * np.log10(np.mean(noise ** 2))) / 20)
    return mixture, np.array(dry_sources), levels


@pytest.fixture()
def small_scene(tmp_path):
    """One foreground event at 9.0 s (cut at the end), one interference event, a short tiled background.

    The scene's paths are relative to the repository root tmp_path (the dev set would be tmp_path/data/dev_set).
    """
    rng = np.random.default_rng(1)
    (tmp_path / "fg" / "Speech").mkdir(parents=True)
    (tmp_path / "int" / "Hum").mkdir(parents=True)
    (tmp_path / "bg").mkdir()
    (tmp_path / "rooms").mkdir()
    soundfile.write(tmp_path / "fg" / "Speech" / "a.wav", rng.standard_normal(64002) * 0.1, RATE, subtype="FLOAT")
    soundfile.write(tmp_path / "int" / "Hum" / "b.wav", rng.standard_normal(40000) * 0.3, RATE)
    soundfile.write(tmp_path / "bg" / "n.wav", rng.standard_normal((50000, 4)) * 0.05, RATE)
    write_room(tmp_path / "rooms" / "r.sofa")
    position = cartesian([90.0, 0.0, 1.5])
    event = {"label": "Speech", "source_file": "Speech/a.wav", "source_time": 0, "event_time": 9.0,
             "event_duration": 64002 / RATE, "event_position": [position], "snr": 10.0, "role": "foreground"}
    interference = {"label": "Hum", "source_file": "Hum/b.wav", "source_time": 0.2, "event_time": 1.25,
                    "event_duration": 0.9, "event_position": [cartesian([180.0, 0.0, 1.5])], "snr": 3.0,
                    "role": "interference"}
    background = {"label": None, "source_file": "n.wav", "source_time": None, "event_time": 0,
                  "event_duration": 10, "event_position": None, "snr": 0, "role": "background"}
    scene = {"config": {"duration": 10.0, "sr": RATE, "ref_db": -55, "foreground_dir": "fg",
                        "interference_dir": "int", "background_dir": "bg"},
             "fg_events": [event], "int_events": [interference], "bg_events": [background],
             "room": {"module": "ignored", "main": "SofaRoom.from_metadata", "args": {"metadata": {
                 "sofa_path": "rooms/r.sofa", "direct_range_ms": [6, 50]}}}}
    return scene, tmp_path


def test_render_matches_exact_float64_levels_and_dry_window(small_scene):
    scene, root = small_scene
    mixture, dry, labels = synth.Renderer(root / "data" / "dev_set").render_scene(scene)
    expected, expected_dry, levels = reference_render(scene, root)
    assert abs(levels[0]) < 1e-9 and abs(levels[2]) < 1e-9  # event level = ref_db + snr over the full wet
    assert levels[1] == 1793  # direct-path window length
    assert mixture.dtype == torch.float32 and mixture.shape == (4, 320000)
    assert np.max(np.abs(mixture.numpy() - expected)) <= 1e-4 * np.max(np.abs(expected))
    assert np.max(np.abs(dry[:, 0].numpy() - expected_dry)) <= 1e-4 * np.max(np.abs(expected_dry))
    assert labels == ["Speech"]
    read = int(scene["fg_events"][0]["event_duration"] * RATE)
    assert read == 64001  # the official int(duration * sr) truncation loses the last sample


def test_spatialscaper_metadata_renders_by_its_rules_in_ref_event_order(small_scene):
    """A hand-made 2025 file: the room by name in rir_dir, raw spherical positions (nearest stored row), L2-normalised
    IRs, the dry window [peak - 192, peak + 1600) around the signed peak of ref_channel, a 50000-sample background
    with each sample repeated, and valid.json's ref_event fixing the slot order."""
    scene, root = small_scene
    write_room(root / "rooms" / "r.sofa", positions=[[a, 10.0, 1.5] for a in range(0, 360, 45)], seed=3)
    with h5py.File(root / "rooms" / "r.sofa", "r+") as file:  # the signed peak and the largest |h| differ
        file["Data.IR"][2, 1, 100] = -3.0
    second = dict(scene["fg_events"][0], label="Dishes", event_time=0.5, snr=4.0, event_position=[[91.0, 9.0, 1.4]])
    scene = {"config": dict(scene["config"], rir_dir="rooms", ref_channel=1, spatialize_direct_path_time_ms=[6, 50]),
             "fg_events": [dict(scene["fg_events"][0], event_position=[[268.0, 11.0, 1.5]]), second],
             "int_events": [dict(scene["int_events"][0], event_position=[[44.0, 10.0, 1.6]])],
             "bg_events": scene["bg_events"], "room": "r.sofa"}
    expected, expected_dry, levels = reference_render(scene, root)
    assert levels[1] == 1792 and abs(levels[0]) < 1e-9  # [peak - 192, peak + 1600)
    (root / "meta" / "valid").mkdir(parents=True)
    (root / "meta" / "valid" / "s.json").write_text(json.dumps(scene))
    (root / "meta" / "valid.json").write_text(json.dumps([{"metadata_path": "valid/s.json",
                                                           "ref_event": ["Speech", "Dishes", "silence"]}]))
    item = synth.MetadataDataset(root / "meta" / "valid.json", root / "data" / "dev_set")[0]
    assert item["label"] == ["Speech", "Dishes", "silence"]  # render order is Dishes (0.5 s), Speech (9.0 s)
    assert np.max(np.abs(item["mixture"].numpy() - expected)) <= 1e-4 * np.max(np.abs(expected))
    dry = item["dry_sources"][:, 0].numpy()
    assert np.max(np.abs(dry[:2] - expected_dry[::-1])) <= 1e-4 * np.max(np.abs(expected_dry)) and not dry[2].any()
    (root / "meta" / "valid.json").write_text(json.dumps([{"metadata_path": "valid/s.json",
                                                           "ref_event": ["Speech", "Blender", "silence"]}]))
    with pytest.raises(ValueError, match="ref_event .* does not name the events' labels"):
        synth.MetadataDataset(root / "meta" / "valid.json", root / "data" / "dev_set")[0]


def test_render_errors_name_the_file(small_scene, tmp_path):
    scene, root = small_scene
    renderer = synth.Renderer(root / "data" / "dev_set")
    bad = json.loads(json.dumps(scene))
    bad["fg_events"][0]["event_position"] = [[0.3, 0.3, 0.3]]
    with pytest.raises(ValueError, match="no RIR at position"):
        renderer.render_scene(bad)
    bad = json.loads(json.dumps(scene))
    bad["fg_events"][0]["source_file"] = "Speech/missing.wav"
    with pytest.raises(ValueError, match="missing.wav"):
        renderer.render_scene(bad)
    soundfile.write(root / "fg" / "Speech" / "a.wav", np.zeros(64002), 16000)
    with pytest.raises(ValueError, match="a.wav: sample rate 16000"):
        renderer.render_scene(scene)
    (root / "rooms" / "r.sofa").write_bytes(b"not hdf5")  # a changed file is opened again
    with pytest.raises(ValueError, match="r.sofa: unreadable SOFA"):
        renderer.render_scene(scene)
    with pytest.raises(ValueError, match="not a scene"):
        renderer.render_scene({"config": scene["config"], "room": 3})


def test_sofa_spherical_and_cartesian_positions(tmp_path):
    spherical = [[0.0, 0.0, 0.75], [90.0, 20.0, 1.5], [225.0, -10.0, 1.0]]
    write_room(tmp_path / "s.sofa", positions=spherical)
    write_room(tmp_path / "c.sofa", positions=[cartesian(p) for p in spherical], spherical=False)
    rooms = devset.SofaRoom(tmp_path / "s.sofa"), devset.SofaRoom(tmp_path / "c.sofa")
    np.testing.assert_allclose(rooms[0].positions, rooms[1].positions, atol=1e-12)
    assert rooms[0].find_position([[0.0, 1.5 * math.cos(math.radians(20)) + 0.0005, 1.5 * math.sin(math.radians(20))]]) == 1
    with pytest.raises(ValueError, match="tolerance 1 mm"):
        rooms[1].find_position([0.0, 0.0, 0.0])
    np.testing.assert_allclose(rooms[0].rir(2), rooms[1].rir(2))
    assert np.isclose(np.mean(np.sum(rooms[0].rir(0) ** 2, axis=-1)), 1.0)


def test_sofa_resampled_to_32k(tmp_path):
    write_room(tmp_path / "r.sofa", taps=2000, rate=16000)
    room = devset.SofaRoom(tmp_path / "r.sofa")
    assert room.rir_length == 4000 and room.rir(0).shape == (4, 4000)


def test_metadata_round_trip(demo_dev_set, tmp_path):
    dataset = synth.GeneratedDataset(demo_dev_set, length=6, seed=3)
    for index in range(6):
        item = dataset[index]
        path = tmp_path / f"scene_{index}.json"
        path.write_text(json.dumps(item["metadata"]))
        again = synth.MetadataDataset(tmp_path, data_root=demo_dev_set, return_sources=True)[index]
        assert torch.equal(item["mixture"], again["mixture"])
        assert sorted(item["label"]) == sorted(again["label"])
        for source in item["dry_sources"]:
            assert any(torch.equal(source, other) for other in again["dry_sources"])


def test_2025_scenes_are_spatialscaper_metadata_that_render_back_identically(demo_dev_set_2025, demo_dev_set):
    dataset = synth.GeneratedDataset(demo_dev_set_2025, synth.SceneConfig(**synth.SCENE_2025), length=4, seed=3)
    for index in range(4):
        item = dataset[index]
        scene = json.loads(json.dumps(item["metadata"]))  # as written to a file
        assert scene["config"]["rir_dir"] == "data/dev_set/room_ir/train" and scene["config"]["ref_channel"] == 0
        room = devset.open_room(demo_dev_set_2025 / "room_ir" / "train" / scene["room"])  # a name in rir_dir
        events = scene["fg_events"] + scene["int_events"]
        assert all(event["event_position"][0] in room.stored.tolist() for event in events)  # raw stored rows
        assert all(event["source_file"].count("/") == 1 and event["role"] == "foreground" for event in events)
        fields = {"label", "source_file", "source_time", "event_time", "event_duration", "snr", "role", "pitch_shift",
                  "time_stretch", "event_position"}  # the official Event namedtuple, built with Event(**event)
        assert all(set(event) == fields for event in events + scene["bg_events"]) and scene["bg_events"]
        labels = [event["label"] for event in scene["fg_events"]]
        assert 1 <= len(labels) == len(set(labels)) <= 3 and 1 <= len(scene["int_events"]) <= 2
        assert item["label"] == labels + ["silence"] * (3 - len(labels))  # slots in onset order
        mixture, dry, rendered = synth.Renderer(demo_dev_set_2025).render_scene(scene)
        assert rendered == labels and torch.equal(mixture, item["mixture"])
        assert torch.equal(dry, item["dry_sources"][:len(labels)])
    with pytest.raises(ValueError, match="no .wav directly in the .* class folder"):  # 2026 classes: sub-folders
        synth.GeneratedDataset(demo_dev_set, synth.SceneConfig(**synth.SCENE_2025), length=1)[0]


def test_same_items_for_0_and_2_workers(demo_dev_set):
    dataset = synth.GeneratedDataset(demo_dev_set, synth.SceneConfig(nevent_range=(0, 3)), length=4, seed=7,
                                     label_vector_mode="stack", silence_label_mode="onehot")
    batches = []
    for workers in (0, 2):
        loader = torch.utils.data.DataLoader(dataset, batch_size=2, num_workers=workers, collate_fn=synth.collate)
        batches.append(list(loader))
    for first, second in zip(*batches):
        assert torch.equal(first["mixture"], second["mixture"])
        assert torch.equal(first["dry_sources"], second["dry_sources"])
        assert first["label"] == second["label"] and first["metadata"] == second["metadata"]
    assert batches[0][0]["label_vector"].shape == (2, 3, 19)
    assert batches[0][0]["mixture"].shape == (2, 4, 320000)


def test_duplicate_constraints(demo_dev_set):
    config = synth.SceneConfig(nevent_range=(3, 3), dupse_rate=1.0, interference_range=(0, 0))
    dataset = synth.GeneratedDataset(demo_dev_set, config, length=40)
    duplicates = 0
    for index in range(40):
        events = dataset.scene(index)["fg_events"]
        for label in {event["label"] for event in events}:
            same = [event for event in events if event["label"] == label]
            if len(same) < 2:
                continue
            duplicates += 1
            folders = [event["source_file"].split("/")[1] for event in same]
            assert len(set(folders)) == len(folders)  # exclusion folder depth 1
            vectors = np.array([event["event_position"][0] for event in same])
            vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
            for a in range(len(same)):
                for b in range(a + 1, len(same)):
                    assert np.degrees(np.arccos(np.clip(vectors[a] @ vectors[b], -1, 1))) > 60
    assert duplicates == 40


def test_waveform_mode_names(demo_dev_set, tmp_path):
    test = demo_dev_set / "synthesized" / "test"
    item = evaluate.WaveformDataset(test / "soundscape", test / "oracle_target")[0]
    assert item["mixture"].shape == (4, 320000) and item["label_vector"].shape == (3, 18)
    assert item["dry_sources"].shape == (3, 1, 320000) and len(item["label"]) == 3
    (tmp_path / "mix").mkdir()
    (tmp_path / "est").mkdir()
    soundfile.write(tmp_path / "mix" / "s1.wav", np.zeros((100, 4)), RATE)
    soundfile.write(tmp_path / "est" / "s1_Speech.wav", np.full(100, 0.5), RATE)  # 2025 naming
    soundfile.write(tmp_path / "est" / "s1_0_Dishes.wav", np.full(100, 0.25), RATE)
    item = evaluate.WaveformDataset(tmp_path / "mix", estimate_dir=tmp_path / "est")[0]
    assert item["est_label"] == ["Dishes", "Speech", "silence"]
    assert item["est_dry_sources"][1, 0, 0] == 0.5 and item["est_dry_sources"][2].abs().sum() == 0
    assert devset.parse_source_name("s1", "s1_2_Speech.wav") == (2, "Speech")
    with pytest.raises(ValueError, match="unknown label"):
        devset.parse_source_name("s1", "s1_0_Dog.wav")


def test_label_vector_modes():
    labels = ["Speech", "Speech", devset.SILENCE]
    assert synth.label_vector(labels, "stack", "onehot").shape == (3, 19)
    assert synth.label_vector(labels, "concat", "zeros").shape == (54,)
    multihot = synth.label_vector(labels, "multihot", "onehot")
    assert multihot.shape == (19,) and multihot.sum() == 2 and multihot[15] == 1 and multihot[18] == 1
    assert synth.label_vector(labels, "stack", "zeros")[2].sum() == 0


def test_index_errors(tmp_path):
    (tmp_path / "sound_event" / "train" / "Speech").mkdir(parents=True)
    (tmp_path / "room_ir" / "train").mkdir(parents=True)
    write_room(tmp_path / "room_ir" / "train" / "r.sofa")
    with pytest.raises(ValueError, match="Speech: empty class folder"):
        devset.DataIndex(tmp_path)
    soundfile.write(tmp_path / "sound_event" / "train" / "Speech" / "x.wav", np.zeros((100, 2)), RATE)
    with pytest.raises(ValueError, match="x.wav: 2 channels, expected 1"):
        devset.DataIndex(tmp_path)


STYLES = {"tagger": (synth.SceneConfig(nevent_range=(0, 3)), dict(num_channels=1, return_sources=False)),
          "separator": (synth.SceneConfig(), {})}


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("torch_fft", [False, True])
def test_device_rendering_equals_worker_rendering(style, torch_fft, demo_dev_set, tmp_path, monkeypatch):
    """Workers read, the device renders the batch: the same mixtures, dry targets and labels as rendering per item,
    also with torch.fft (the back end of GPUs) on the CPU; a scene of the batch still renders back from its
    metadata."""
    scene, options = STYLES[style]
    workers = synth.GeneratedDataset(demo_dev_set, scene, length=6, seed=5, label_vector_mode="stack",
                                     silence_label_mode="onehot", **options)
    device = synth.GeneratedDataset(demo_dev_set, scene, length=6, seed=5, label_vector_mode="stack",
                                    silence_label_mode="onehot", render=False, **options)
    expected = synth.collate([workers[index] for index in range(6)])
    batch = synth.collate([device[index] for index in range(6)])
    assert "mixture" not in batch and batch["scene"]["background"].shape == expected["mixture"].shape
    # What the DataLoader's pin_memory (on CUDA) makes of the keys: tuples become lists.
    batch["scene"]["rir_keys"] = [[path, position, list(rule), direct]
                                  for path, position, rule, direct in batch["scene"]["rir_keys"]]
    if torch_fft:
        monkeypatch.setattr(synth, "rfft", lambda signal, length: torch.fft.rfft(signal, length))
        monkeypatch.setattr(synth, "irfft", lambda spectrum, length: torch.fft.irfft(spectrum, length))
    rendered = synth.Renderer(demo_dev_set, "cpu", 64)(batch)
    channels = 1 if style == "tagger" else 4
    assert rendered["mixture"].shape == (6, channels, 320000)
    peak = expected["mixture"].abs().max()
    assert (rendered["mixture"] - expected["mixture"]).abs().max() <= 1e-4 * peak
    assert torch.equal(rendered["mixture"], expected["mixture"]) or torch_fft  # the same code: the same bits
    assert rendered["label"] == expected["label"] and torch.equal(rendered["label_vector"], expected["label_vector"])
    if style == "tagger":
        assert "dry_sources" not in rendered and "dry_sources" not in expected
        full = synth.Renderer(demo_dev_set).render_scene(batch["metadata"][0])[0][0]  # the tagger reads channel 0
        assert (rendered["mixture"][0, 0] - full).abs().max() <= 1e-4 * full.abs().max()
    else:
        assert rendered["dry_sources"].shape == (6, 3, 1, 320000)
        dry_peak = expected["dry_sources"].abs().max()
        assert (rendered["dry_sources"] - expected["dry_sources"]).abs().max() <= 1e-4 * dry_peak
        for number in range(6):  # silence slots are all zeros, the others are real targets
            silent = [label == devset.SILENCE for label in rendered["label"][number]]
            assert [bool(source.abs().max() == 0) for source in rendered["dry_sources"][number]] == silent
    (tmp_path / "scene.json").write_text(json.dumps(batch["metadata"][1]))
    again = synth.MetadataDataset(tmp_path, data_root=demo_dev_set, num_channels=options.get("num_channels"))[0]
    assert (again["mixture"] - rendered["mixture"][1]).abs().max() <= 1e-4 * again["mixture"].abs().max()


def test_device_code_keeps_every_tensor_on_the_device(demo_dev_set):
    """Rendering run on the 'meta' device, where any tensor left on the CPU (or read back) is an error."""
    dataset = synth.GeneratedDataset(demo_dev_set, length=3, seed=2, render=False)
    rendered = synth.Renderer(demo_dev_set, "meta", 64)(synth.collate([dataset[index] for index in range(3)]))
    for key in ("mixture", "dry_sources", "label_vector"):
        assert rendered[key].device.type == "meta"
    assert rendered["mixture"].shape == (3, 4, 320000) and rendered["dry_sources"].shape == (3, 3, 1, 320000)


def test_rir_spectra_stay_within_their_bound_and_give_the_same_mixtures(demo_dev_set):
    dataset = synth.GeneratedDataset(demo_dev_set, length=8, seed=4, render=False)
    batches = [synth.collate([dataset[index] for index in range(first, first + 2)]) for first in range(0, 8, 2)]
    unbounded, bounded = synth.Renderer(demo_dev_set, "cpu", 1024), synth.Renderer(demo_dev_set, "cpu", 0)
    for batch in batches + batches:
        assert torch.equal(unbounded(batch)["mixture"], bounded(batch)["mixture"])
        assert not bounded.spectra.entries  # nothing is kept beyond the batch
    positions = {tuple(key[:2]) + (key[3],) for batch in batches for key in batch["scene"]["rir_keys"]}
    assert len(unbounded.spectra.entries) == len(positions)  # all kept, each read once


def test_a_per_channel_gain_takes_three_edits_of_synth_py(demo_dev_set, tmp_path):
    """The recipe of the README's "Where to hack", applied to a copy of synth.py: a random gain per microphone,
    a SceneConfig field, drawn with the scene and kept in it, applied where render_scenes finishes the mixtures.
    The targets stay as they were, and scene(i) still renders back to the same mixture."""
    edits = [  # (a line of synth.py, what it becomes)
        ("    direct_range_ms: tuple[float, float] = (6.0, 50.0)  # ms before / after the direct-path peak (dry target)\n",
         "    direct_range_ms: tuple[float, float] = (6.0, 50.0)  # ms before / after the direct-path peak (dry target)\n"
         "    channel_gain_db: float = 6.0  # dB, each microphone's gain is drawn from [-x, x]\n"),
        ('            "bg_events": background,\n',
         '            "bg_events": background,\n'
         '            "channel_gains": [rng.uniform(-config.channel_gain_db, config.channel_gain_db)\n'
         '                              for _ in range(room.num_channels)],  # dB per microphone\n'),
        ("    return mixture, dry\n",
         '    gains = host_tensor([scene["channel_gains"][:C] for scene in scenes["metadata"]], torch.float32, device)\n'
         "    mixture *= 10 ** (gains[:, :, None] / 20)  # (B, C, 1)\n"
         "    return mixture, dry\n"),
    ]
    source = Path(synth.__file__).read_text()
    for line, replacement in edits:
        assert source.count(line) == 1, line
        source = source.replace(line, replacement)
    (tmp_path / "augmented_synth.py").write_text(source)
    spec = importlib.util.spec_from_file_location("augmented_synth", tmp_path / "augmented_synth.py")
    augmented = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(augmented)

    plain = synth.GeneratedDataset(demo_dev_set, length=2, seed=9)[0]
    dataset = augmented.GeneratedDataset(demo_dev_set, augmented.SceneConfig(), length=2, seed=9)
    item = dataset[0]
    gains = np.array(item["metadata"]["channel_gains"])
    assert item["metadata"]["fg_events"] == plain["metadata"]["fg_events"] and np.abs(gains).max() > 0.5
    expected = plain["mixture"] * torch.tensor(10 ** (gains / 20), dtype=torch.float32)[:, None]
    assert (item["mixture"] - expected).abs().max() <= 1e-5 * expected.abs().max()
    assert torch.equal(item["dry_sources"], plain["dry_sources"])
    (tmp_path / "scene.json").write_text(json.dumps(dataset.scene(0)))
    assert torch.equal(augmented.MetadataDataset(tmp_path, data_root=demo_dev_set)[0]["mixture"], item["mixture"])
