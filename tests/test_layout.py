"""Dev-set layout and metadata paths: 'data/dev_set/...' resolves against the dev set given (or the one holding the
metadata), other relative paths against the folder two levels above it, never against the current directory;
everything works from a directory that holds a different data/dev_set (the state after the Quickstart)."""
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import data_prep
import devset
import model
import synth
import train

ROOT = Path(__file__).resolve().parents[1]


def test_metadata_paths_resolve_against_the_dev_set(tmp_path):
    dev_set = tmp_path / "datasets" / "dcase" / "dev_set"
    (dev_set / "sound_event" / "valid" / "Speech").mkdir(parents=True)
    (dev_set / "sound_event" / "valid" / "Speech" / "a.wav").write_bytes(b"")
    (tmp_path / "datasets" / "extra.wav").write_bytes(b"")
    found = devset.resolve(dev_set, "data/dev_set/sound_event/valid", "Speech/a.wav")
    assert found == dev_set / "sound_event/valid/Speech/a.wav"
    assert devset.resolve(dev_set, "extra.wav") == tmp_path / "datasets" / "extra.wav"  # repository root = ../..
    assert devset.resolve(dev_set, str(dev_set / "sound_event")) == dev_set / "sound_event"  # absolute: as it is
    with pytest.raises(ValueError) as error:
        devset.resolve(dev_set, "data/dev_set/sound_event/valid", "Speech/gone.wav")
    message = str(error.value)
    assert "\n" not in message and "data/dev_set/sound_event/valid/Speech/gone.wav: " in message
    assert f"not found at {dev_set}/sound_event/valid/Speech/gone.wav" in message and f"dev set {dev_set}" in message


def test_find_dev_set(demo_dev_set, tmp_path):
    assert devset.find_dev_set(demo_dev_set / "metadata" / "valid.json") == demo_dev_set
    assert devset.find_dev_set(demo_dev_set / "metadata" / "valid") == demo_dev_set
    assert devset.find_dev_set(demo_dev_set / "synthesized" / "test" / "metadata") == demo_dev_set
    with pytest.raises(ValueError, match="lies in no dev set"):
        devset.find_dev_set(tmp_path / "scenes")


def test_generated_scenes_use_the_train_folders_in_the_official_form(demo_dev_set):
    dataset = synth.GeneratedDataset(demo_dev_set, synth.SceneConfig(interference_range=(2, 2)), length=2)
    scene = dataset.scene(0)
    assert scene["config"]["foreground_dir"] == "data/dev_set/sound_event/train"
    assert scene["config"]["interference_dir"] == "data/dev_set/interference/train"
    assert scene["config"]["background_dir"] == "data/dev_set/noise/train"
    assert scene["room"]["args"]["metadata"]["sofa_path"].startswith("data/dev_set/room_ir/train/room_")
    with pytest.raises(ValueError, match="split 'test'"):
        devset.DataIndex(demo_dev_set, "test")


@pytest.fixture()
def other_dev_set_directory(tmp_path_factory):
    """A folder holding a different demo set in data/dev_set, with the same file names but other content, as the
    repository root does after the Quickstart's first block."""
    root = tmp_path_factory.mktemp("quickstart")
    config = data_prep.DemoConfig(files_per_class=3, num_rooms=1, rir_length=1100, valid_mixtures=2, test_mixtures=1,
                                  seed=5, event_seconds_max=3.5)
    data_prep.make_demo(root / "data", config)
    return root


def test_everything_works_from_a_folder_holding_another_dev_set(demo_dev_set, other_dev_set_directory, tmp_path,
                                                                 monkeypatch):
    valid = demo_dev_set / "metadata" / "valid.json"
    expected = synth.MetadataDataset(valid)[0]
    generated = synth.GeneratedDataset(demo_dev_set, length=1, seed=3)[0]
    monkeypatch.chdir(other_dev_set_directory)
    assert Path("data/dev_set/metadata/valid.json").is_file()  # a different dev set where 'data/dev_set' points
    assert data_prep.verify(demo_dev_set)[1] == []
    for item in (synth.MetadataDataset(valid)[0], synth.MetadataDataset(valid, data_root=demo_dev_set)[0]):
        assert torch.equal(item["mixture"], expected["mixture"]) and item["label"] == expected["label"]
    assert torch.equal(synth.GeneratedDataset(demo_dev_set, length=1, seed=3)[0]["mixture"], generated["mixture"])
    assert data_prep.render_metadata(valid, tmp_path / "rendered") == 4
    train.check_data_root(demo_dev_set, synth.SceneConfig())
    result = subprocess.run([sys.executable, str(Path(data_prep.__file__).resolve()), "verify", "--data",
                             str(demo_dev_set)], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.endswith("ok\n"), result.stdout + result.stderr


def test_training_check_names_the_split_layout(demo_dev_set, tmp_path):
    unsplit = tmp_path / "dev_set"
    for name in ("sound_event", "noise", "room_ir", "interference", "metadata"):
        (unsplit / name).mkdir(parents=True)
    with pytest.raises(SystemExit) as error:
        train.check_data_root(unsplit, synth.SceneConfig())
    message = str(error.value)
    assert f"{unsplit / 'sound_event/train'} is missing (the official layout splits" in message
    assert "python data_prep.py demo" in message


def test_bad_channel_and_event_settings_are_one_line_errors(demo_dev_set, tmp_path):
    """Settings that would otherwise fail inside a DataLoader worker mid-run are refused up front."""
    with pytest.raises(ValueError, match=r"nevent_range \(1, 4\): at most 3 target events"):
        synth.GeneratedDataset(demo_dev_set, synth.SceneConfig(nevent_range=(1, 4)))
    with pytest.raises(ValueError, match="5 mixture channels requested, but the rooms .* have 4"):
        synth.GeneratedDataset(demo_dev_set, num_channels=5)
    with pytest.raises(ValueError, match="TaggerConfig.ref_channel=4: expected 0-3"):
        model.TaggerConfig(ref_channel=4)
    copy = tmp_path / "dev_set"
    shutil.copytree(demo_dev_set, copy)
    responses = np.zeros((2, 2, 64))  # 2 positions x 2 channels: a room unlike the 4-channel ones
    responses[:, :, 0] = 1.0
    data_prep.write_sofa(copy / "room_ir/train/two_channels.sofa", responses, np.array([[0, 0, 1.0], [90, 0, 1.0]]))
    with pytest.raises(ValueError, match=r"room_ir/train: rooms with different channel counts \(.*two_channels.sofa: "
                                         r"2"):
        devset.DataIndex(copy, "train")


def test_bench_refuses_bad_flags_in_one_line():
    for arguments, expected in ((["--device", "gpu"], "--device gpu: expected auto, cpu or cuda"),
                                (["--only", "models,speed"], "--only models,speed: unknown sections speed"),
                                (["--quik"], "--quik (did you mean --quick?)")):
        result = subprocess.run([sys.executable, "bench.py", *arguments], cwd=ROOT, capture_output=True, text=True,
                                timeout=120)
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
        assert expected in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
