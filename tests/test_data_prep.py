"""data_prep tests: demo set passes verify, verify lists each bad-input case, render is idempotent and equals
MetadataDataset, add-data trims/segments/resamples and refuses to overwrite different content."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile

import data_prep
import synth

RATE = synth.SAMPLE_RATE


def test_demo_passes_verify(demo_dev_set):
    summary, problems = data_prep.verify(demo_dev_set)
    assert problems == []
    assert summary[0] == "sound_event: 18 classes, 54 files"
    assert len(list((demo_dev_set / "synthesized" / "test" / "soundscape").glob("*.wav"))) == 4


def test_verify_lists_every_problem(demo_dev_set, tmp_path):
    data = tmp_path / "data" / "dev_set"  # metadata paths are 'data/dev_set/...'
    shutil.copytree(demo_dev_set, data)
    events = data / "sound_event"
    soundfile.write(events / "Speech" / "rate.wav", np.zeros(1000), 16000)
    soundfile.write(events / "Speech" / "stereo.wav", np.zeros((1000, 2)), RATE)
    (events / "Speech" / "broken.wav").write_bytes(b"RIFF nonsense")
    shutil.rmtree(events / "Typing")
    (events / "Typing").mkdir()
    soundfile.write(data / "noise" / "mono_noise.wav", np.zeros(1000), RATE)
    (data / "room_ir" / "broken.sofa").write_bytes(b"nonsense")
    scene_path = sorted((data / "metadata" / "valid").glob("*.json"))[0]
    scene = json.loads(scene_path.read_text())
    scene["fg_events"][0]["source_file"] = "Speech/gone.wav"
    scene["fg_events"][-1]["event_position"] = [[0.01, 0.02, 0.03]]
    scene_path.write_text(json.dumps(scene))
    _, problems = data_prep.verify(data)
    text = "\n".join(problems)
    for expected in ("rate.wav: sample rate 16000", "stereo.wav: 2 channels, expected 1", "broken.wav: unreadable",
                     "Typing: empty class folder", "mono_noise.wav: 1 channels, expected [4]",
                     "broken.sofa: unreadable SOFA", "gone.wav", "no RIR at position"):
        assert expected in text, expected
    result = subprocess.run([sys.executable, "data_prep.py", "verify", "--data", str(data)], capture_output=True,
                            text=True, cwd=Path(data_prep.__file__).parent)
    assert result.returncode == 1 and "problem(s)" in result.stdout


def test_render_equals_dataset_and_is_idempotent(demo_dev_set, tmp_path):
    valid = demo_dev_set / "metadata" / "valid.json"
    assert data_prep.render_metadata(valid, tmp_path) == 4
    dataset = synth.MetadataDataset(valid)
    item = dataset[1]
    mixture, rate = soundfile.read(tmp_path / "soundscape" / f"{item['soundscape']}.wav", dtype="float32")
    assert rate == RATE and np.array_equal(mixture.T, item["mixture"].numpy())
    labels = [label for label in item["label"] if label != synth.SILENCE]
    for slot, label in enumerate(labels):
        dry, _ = soundfile.read(tmp_path / "oracle_target" / f"{item['soundscape']}_{slot}_{label}.wav", dtype="float32")
        assert np.array_equal(dry, item["dry_sources"][slot, 0].numpy())
    data_prep.render_metadata(valid, tmp_path)  # same content: skipped
    target = tmp_path / "soundscape" / f"{item['soundscape']}.wav"
    soundfile.write(target, np.zeros((320000, 4)), RATE)
    with pytest.raises(FileExistsError, match="different content"):
        data_prep.render_metadata(valid, tmp_path)


def test_add_data(tmp_path):
    rng = np.random.default_rng(0)
    semhear, ears, data = tmp_path / "semhear", tmp_path / "ears", tmp_path / "dev_set"
    for folder in (semhear / "FSD50K", semhear / "bg_scaper_fmt" / "Hum", ears / "p001", data / "config"):
        folder.mkdir(parents=True)
    quiet = np.zeros(44100)  # 1 s of silence around 25 s of sound at 44.1 kHz, stereo
    long = np.concatenate([quiet, 0.5 * rng.standard_normal(25 * 44100), quiet])
    soundfile.write(semhear / "FSD50K" / "123.wav", np.stack([long, long], axis=1), 44100)
    soundfile.write(semhear / "FSD50K" / "tiny.wav", 0.5 * rng.standard_normal(1000), 44100)
    soundfile.write(semhear / "bg_scaper_fmt" / "Hum" / "h.wav", 0.5 * rng.standard_normal(RATE), RATE)
    soundfile.write(ears / "p001" / "read.wav", 0.5 * rng.standard_normal(48000 * 3), 48000)
    (data / "config" / "FSD50K_config.json").write_text(json.dumps({"Dishes": ["123.wav", "tiny.wav"]}))
    (data / "config" / "EARS_config.json").write_text(json.dumps({"Speech": ["p001/read.wav"]}))
    config = data_prep.AddDataConfig(semhear_path=str(semhear), ears_path=str(ears), data=str(data))
    assert data_prep.add_data(config) == (5, 0)  # 3 pieces of 123.wav, 1 speech, 1 interference; tiny dropped
    pieces = sorted((data / "sound_event" / "Dishes" / "123").glob("*.wav"))
    lengths = [soundfile.info(path).frames for path in pieces]
    assert lengths[:2] == [10 * RATE, 10 * RATE] and abs(lengths[2] - 5 * RATE) <= 0.2 * RATE  # +- one 0.1 s frame each side
    info = soundfile.info(data / "sound_event" / "Speech" / "p001" / "read" / "read_000.wav")
    assert info.samplerate == RATE and info.channels == 1
    assert (data / "interference" / "Hum" / "h" / "h_000.wav").exists()
    assert data_prep.add_data(config) == (0, 5)  # idempotent
    soundfile.write(pieces[0], np.zeros(100), RATE)
    with pytest.raises(FileExistsError, match="different content"):
        data_prep.add_data(config)
    (data / "config" / "EARS_config.json").write_text(json.dumps({"Dog": ["p001/read.wav"]}))
    with pytest.raises(ValueError, match="class name"):
        data_prep.read_pickup_list(data / "config" / "EARS_config.json")
