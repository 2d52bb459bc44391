"""data_prep tests: the demo set passes verify, verify lists each bad-input case, render is idempotent and equals
MetadataDataset, add-data follows the official add_data.sh rules (every keep/drop rule, checked against an
independent librosa implementation), re-runs and conflicts, and every bad input of the command line ends in a
one-line error that changes nothing on disk."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile

import data_prep
import devset
import synth

RATE = devset.SAMPLE_RATE
SCRIPT = Path(data_prep.__file__).resolve()


def snapshot(folder):
    """{relative path: (size, mtime)} of every file under folder: equal snapshots = nothing changed on disk."""
    return {path.relative_to(folder).as_posix(): (path.stat().st_size, path.stat().st_mtime_ns)
            for path in sorted(Path(folder).rglob("*")) if path.is_file()}


def test_demo_passes_verify(demo_dev_set):
    summary, problems = data_prep.verify(demo_dev_set)
    assert problems == []
    assert summary[:2] == ["2026 layout", "sound_event/train: 18 classes, 54 files"]
    assert "sound_event/valid: 18 classes, 54 files" in summary
    for name in data_prep.REQUIRED_FOLDERS:  # every folder the official verify.py requires
        assert (demo_dev_set / name).is_dir(), name
    for name in data_prep.PICKUP_LISTS:
        assert data_prep.read_pickup_list(demo_dev_set / "config" / f"{name}_config.json") == []
    assert len(list((demo_dev_set / "synthesized" / "test" / "soundscape").glob("*.wav"))) == 4
    scene = json.loads((demo_dev_set / "metadata" / "valid" / "soundscape_0000.json").read_text())
    assert scene["config"]["foreground_dir"] == "data/dev_set/sound_event/valid"  # official form, valid folders
    assert scene["room"]["args"]["metadata"]["sofa_path"].startswith("data/dev_set/room_ir/valid/")


def test_demo_is_written_whole_or_not_at_all(tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise ValueError("stopped while rendering the test set")

    monkeypatch.setattr(data_prep, "render_metadata", fail)
    config = data_prep.DemoConfig(files_per_class=3, num_rooms=1, rir_length=1100, valid_mixtures=1, test_mixtures=1)
    with pytest.raises(ValueError, match="stopped"):
        data_prep.make_demo(tmp_path, config)
    assert list(tmp_path.iterdir()) == []


def test_verify_lists_every_problem(demo_dev_set, tmp_path):
    data = tmp_path / "copy"  # anywhere: the metadata's data/dev_set/ paths refer to the folder given
    shutil.copytree(demo_dev_set, data)
    events = data / "sound_event" / "train"
    soundfile.write(events / "Speech" / "rate.wav", np.zeros(1000), 16000)
    soundfile.write(events / "Speech" / "stereo.wav", np.zeros((1000, 2)), RATE)
    (events / "Speech" / "broken.wav").write_bytes(b"RIFF nonsense")
    shutil.rmtree(events / "Typing")
    (events / "Typing").mkdir()
    soundfile.write(data / "noise" / "train" / "mono_noise.wav", np.zeros(1000), RATE)
    (data / "room_ir" / "train" / "broken.sofa").write_bytes(b"nonsense")
    shutil.rmtree(data / "synthesized" / "test" / "oracle_target")
    shutil.rmtree(data / "interference" / "train")
    (data / "interference" / "train").mkdir()
    (data / "config" / "EARS_config.json").write_text(json.dumps({"Speech": ["p001/a.wav"]}))  # not the official format
    for number, scene_path in enumerate(sorted((data / "metadata" / "valid").glob("*.json"))[:2]):
        scene = json.loads(scene_path.read_text())
        if number == 0:
            scene["fg_events"][0]["source_file"] = "Speech/gone.wav"
        else:
            scene["fg_events"][-1]["event_position"] = [[0.01, 0.02, 0.03]]
        scene_path.write_text(json.dumps(scene))
    _, problems = data_prep.verify(data)
    text = "\n".join(problems)
    for expected in ("rate.wav: sample rate 16000", "stereo.wav: 2 channels, expected 1", "broken.wav: unreadable",
                     "Typing: empty class folder", "mono_noise.wav: 1 channels, expected [4]",
                     "broken.sofa: unreadable SOFA", "Speech/gone.wav: file referenced by the metadata not found",
                     "no RIR at position", "oracle_target: missing folder", "EARS_config.json: a JSON dict",
                     "interference/train: no interference classes"):
        assert expected in text, expected
    result = subprocess.run([sys.executable, str(SCRIPT), "verify", "--data", str(data)], capture_output=True,
                            text=True, cwd=tmp_path)
    assert result.returncode == 1 and "problem(s)" in result.stdout


def test_verify_recognises_the_2025_layout_and_the_metadata_format(demo_dev_set, demo_dev_set_2025, tmp_path):
    summary, problems = data_prep.verify(demo_dev_set_2025)
    assert problems == [] and summary[0] == "2025 layout" and "test: 4 soundscapes" in summary
    assert sorted(path.name for path in (demo_dev_set_2025 / "test" / "oracle_target").iterdir())[0].count("_") == 2
    data = tmp_path / "dev_set"
    shutil.copytree(demo_dev_set, data)
    shutil.move(data / "synthesized" / "test", data / "test")  # the 2025 test set
    (data / "synthesized").rmdir()
    noise = sorted((data / "noise" / "train").glob("*.wav"))[0].name
    (data / "config" / "filelist.json").write_text(json.dumps([f"data/dev_set/noise/train/{noise}",
                                                               "data/dev_set/noise/train/gone.wav"]))
    summary, problems = data_prep.verify(data)
    assert summary[0] == "2025 layout" and "test: 4 soundscapes" in summary
    assert "config/filelist.json: 2 files listed" in summary
    assert problems == [f"{data / 'config' / 'filelist.json'}: lists data/dev_set/noise/train/gone.wav, which is "
                        "missing"] + [f"{path}: SpAudSyn (2026) metadata in a 2025 dev set"  # one line per file
                                      for path in sorted((data / "metadata" / "valid").glob("*.json"))]
    summary, problems = data_prep.verify(data, 2026)
    assert summary[0] == "2026 layout (--year; the folders are of 2025)"
    assert f"{data / 'synthesized' / 'test' / 'soundscape'}: missing folder" in problems


def test_render_equals_dataset_and_is_idempotent(demo_dev_set, tmp_path):
    valid = demo_dev_set / "metadata" / "valid.json"
    assert data_prep.render_metadata(valid, tmp_path) == 4  # the dev set is found from valid.json's location
    dataset = synth.MetadataDataset(valid)
    item = dataset[1]
    mixture, rate = soundfile.read(tmp_path / "soundscape" / f"{item['soundscape']}.wav", dtype="float32")
    assert rate == RATE and np.array_equal(mixture.T, item["mixture"].numpy())
    labels = [label for label in item["label"] if label != devset.SILENCE]
    for slot, label in enumerate(labels):
        dry, _ = soundfile.read(tmp_path / "oracle_target" / f"{item['soundscape']}_{slot}_{label}.wav", dtype="float32")
        assert np.array_equal(dry, item["dry_sources"][slot, 0].numpy())
    before = snapshot(tmp_path)
    data_prep.render_metadata(valid, tmp_path)  # same content: every file kept as it is
    assert snapshot(tmp_path) == before
    target = tmp_path / "soundscape" / f"{item['soundscape']}.wav"
    soundfile.write(target, np.zeros((320000, 4)), RATE)
    with pytest.raises(FileExistsError, match="different content"):
        data_prep.render_metadata(valid, tmp_path)


# ----------------------------------------------------------------------------------------------------------
# add-data


def official_rules(path):
    """Independent reference of the official add_data.sh processing of one file (librosa, as the official script):
    the float32 audio it writes at 32 kHz, or None when it drops the file."""
    import librosa

    audio, rate = librosa.load(path, sr=None)  # native rate, channels averaged
    if np.max(np.abs(audio)) < 0.02 or len(audio) < 0.1 * rate:
        return None
    audio = np.trim_zeros(audio)
    if len(audio) < int(0.1 * rate):
        return None
    window, step = int(10 * rate), int(0.1 * rate)
    if any(np.max(np.abs(audio[start:start + window])) < 0.02 for start in range(0, len(audio) - window + 1, step)):
        return None
    return librosa.resample(audio, orig_sr=rate, target_sr=RATE) if rate != RATE else audio


def as_16_bit(audio, tmp_path):
    """audio as soundfile writes it by default (16-bit PCM), read back as float32."""
    soundfile.write(tmp_path / "quantised.wav", audio, RATE)
    return soundfile.read(tmp_path / "quantised.wav", dtype="float32")[0]


@pytest.fixture()
def corpora(tmp_path):
    """Small fake SemHear (bg_scaper_fmt/{train,val}/<class>, FSD50K/) and EARS trees, a dev set with official
    pick-up lists; returns (AddDataConfig, {source: target or None when the official rules drop it})."""
    rng = np.random.default_rng(0)
    semhear, ears, data = tmp_path / "SemHear", tmp_path / "EARS", tmp_path / "dev_set"
    for split in ("train", "val"):
        for name in data_prep.INTERFERENCE_CLASSES:
            (semhear / "bg_scaper_fmt" / split / name).mkdir(parents=True)
    (semhear / "bg_scaper_fmt" / "train" / "Dog").mkdir()  # not one of the 95: ignored
    (semhear / "FSD50K" / "FSD50K.dev_audio").mkdir(parents=True)
    for folder in (ears / "p001", ears / "p002", data / "config"):
        folder.mkdir(parents=True)
    loud = lambda seconds, rate=RATE: rng.uniform(-0.5, 0.5, int(seconds * rate))  # noqa: E731
    quiet = lambda seconds, rate=RATE: rng.uniform(-0.01, 0.01, int(seconds * rate))  # noqa: E731
    zeros = lambda seconds: np.zeros(int(seconds * RATE))  # noqa: E731
    bg, fsd = semhear / "bg_scaper_fmt", semhear / "FSD50K" / "FSD50K.dev_audio"
    sources = {  # path: (audio [n] or [n, C], rate, kept)
        bg / "train" / "Rain" / "rain.wav": (loud(1.0), RATE, True),
        bg / "train" / "Rain" / "faint.wav": (0.019 * np.sign(loud(1.0)), RATE, False),  # peak below 0.02
        bg / "train" / "Rain" / "nested" / "deep.wav": (loud(1.0), RATE, None),  # not recursive: ignored
        bg / "train" / "Dog" / "bark.wav": (loud(1.0), RATE, None),  # class not selected: ignored
        bg / "val" / "Howl (wind)" / "howl.wav": (np.stack([loud(2.0, 44100), loud(2.0, 44100)], 1), 44100, True),
        bg / "val" / "Coin (dropping)" / "coin.wav": (np.concatenate([zeros(0.2), loud(0.5), zeros(0.1)]), RATE, True),
        fsd / "100.wav": (loud(12.0, 44100), 44100, True),  # longer than 10 s: kept whole, not cut
        fsd / "101.wav": (loud(0.09), RATE, False),  # shorter than 0.1 s
        fsd / "102.wav": (np.concatenate([zeros(0.4), loud(0.09), zeros(0.5)]), RATE, False),  # short without zeros
        fsd / "103.wav": (np.concatenate([loud(1.0), quiet(10.05), loud(0.95)]), RATE, False),  # a quiet 10 s window
        # 10.03 s quiet from 1.05 s: no window starting at a multiple of 0.1 s fits inside, so it is kept
        fsd / "104.wav": (np.concatenate([loud(1.05), quiet(10.03), loud(0.92)]), RATE, True),
        fsd / "105.wav": (np.concatenate([loud(0.3), quiet(5.0)]), RATE, True),  # shorter than 10 s: no window
        ears / "p001" / "read.wav": (loud(3.0, 48000), 48000, True),
        ears / "p002" / "quiet.wav": (quiet(3.0, 48000), 48000, False),
    }
    for path, (audio, rate, _) in sources.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        soundfile.write(path, audio, rate, subtype="FLOAT")
    (bg / "train" / "Rain" / "notes.txt").write_text("not audio")
    fsd_list = [("100", "Dishes", "train"), ("101", "Dishes", "train"), ("102", "Cough", "valid"),
                ("103", "Typing", "train"), ("104", "Typing", "train"), ("105", "Pour", "valid")]
    (data / "config" / "FSD50K_config.json").write_text(json.dumps(
        [{"file_name": f"FSD50K.dev_audio/{name}.wav", "t4_label": label, "convert_path": f"{split}/{label}/{name}.wav"}
         for name, label, split in fsd_list]))
    (data / "config" / "EARS_config.json").write_text(json.dumps(
        [{"file_name": f"{speaker}/{name}.wav", "t4_label": "Speech",
          "convert_path": f"train/Speech/{speaker}_{name}.wav"}
         for speaker, name in (("p001", "read"), ("p002", "quiet"))]))
    targets = {bg / "train" / "Rain" / "rain.wav": data / "interference/train/Rain/rain.wav",
               bg / "train" / "Rain" / "faint.wav": data / "interference/train/Rain/faint.wav",
               bg / "val" / "Howl (wind)" / "howl.wav": data / "interference/valid/Howl (wind)/howl.wav",
               bg / "val" / "Coin (dropping)" / "coin.wav": data / "interference/valid/Coin (dropping)/coin.wav",
               ears / "p001" / "read.wav": data / "sound_event/train/Speech/p001_read.wav",
               ears / "p002" / "quiet.wav": data / "sound_event/train/Speech/p002_quiet.wav"}
    targets.update({fsd / f"{name}.wav": data / "sound_event" / split / label / f"{name}.wav"
                    for name, label, split in fsd_list})
    expected = {source: (targets[source] if kept else None) for source, (_, _, kept) in sources.items()
                if kept is not None}
    return data_prep.AddDataConfig(semhear_path=str(semhear), ears_path=str(ears), data=str(data)), expected


def test_add_data_follows_the_official_rules(corpora, tmp_path):
    config, expected = corpora
    data = Path(config.data)
    counts = data_prep.add_data(config)
    assert counts == {"written": 7, "dropped: low amplitude": 2, "dropped: too short": 1,
                      "dropped: too short after removing zeros": 1, "dropped: contains a quiet 10 s window": 1}
    written = {path for path in data.rglob("*.wav")}
    assert written == {target for target in expected.values() if target is not None}
    for source, target in expected.items():
        reference = official_rules(source)
        assert (reference is None) == (target is None), source.name
        if target is None:
            continue
        audio, rate = soundfile.read(target, dtype="float32")
        assert rate == RATE and audio.ndim == 1 and soundfile.info(target).subtype == "PCM_16"
        assert len(audio) == len(reference), source.name  # whole recording (zero-trimmed), librosa's length
        if soundfile.info(source).samplerate == RATE:  # not resampled: the same 16-bit samples
            np.testing.assert_array_equal(audio, as_16_bit(reference, tmp_path))
        else:  # resampled: within 30 dB SNR of the official soxr output
            snr = 10 * np.log10(np.sum(reference ** 2) / np.sum((reference - audio) ** 2))
            assert snr > 30, (source.name, snr)
    coin = soundfile.read(data / "interference/valid/Coin (dropping)/coin.wav")[0]
    assert len(coin) == int(0.5 * RATE)  # exact zeros at both ends removed


def test_add_data_rerun_keeps_finished_files_and_refuses_other_content(corpora):
    config, expected = corpora
    data = Path(config.data)
    data_prep.add_data(config)
    before = snapshot(data)
    counts = data_prep.add_data(config)
    assert counts["already present"] == 7 and "written" not in counts and snapshot(data) == before
    changed = data / "sound_event/train/Typing/104.wav"
    soundfile.write(changed, np.zeros(100), RATE)
    new_source = Path(config.semhear_path) / "bg_scaper_fmt/train/Rain/later.wav"
    soundfile.write(new_source, np.full(RATE, 0.5), RATE)
    before = snapshot(data)
    with pytest.raises(FileExistsError, match="104.wav: exists with different content"):
        data_prep.add_data(config)
    assert snapshot(data) == before  # finished files are checked first: nothing new was written
    changed.unlink()
    soundfile.write(data / "sound_event/train/Dishes/101.wav", np.zeros(100), RATE)  # its source is dropped
    with pytest.raises(FileExistsError, match="101.wav: exists, but its source .* is dropped"):
        data_prep.add_data(config)


def test_add_data_input_errors_name_the_input(corpora):
    config, _ = corpora
    data, semhear, ears = Path(config.data), Path(config.semhear_path), Path(config.ears_path)
    fsd_list = data / "config" / "FSD50K_config.json"
    entries = json.loads(fsd_list.read_text())
    write = lambda value: fsd_list.write_text(value if isinstance(value, str) else json.dumps(value))  # noqa: E731
    gone = dict(entries[0], file_name="gone.wav", convert_path="train/Dishes/gone.wav")
    cases = [
        (lambda: shutil.rmtree(semhear / "bg_scaper_fmt/val/Zipper (clothing)"),
         r"Zipper \(clothing\): class folder not found"),
        (lambda: write(entries + [gone]), r"FSD50K/gone.wav: listed in .*FSD50K_config.json but not found"),
        (lambda: write("[{"), r"FSD50K_config.json: not valid JSON"),
        (lambda: write({"Dishes": ["100.wav"]}), r"FSD50K_config.json: a JSON dict, expected a JSON list"),
        (lambda: write([dict(entries[0], t4_label="Dog")]), r"entry 0: t4_label 'Dog'"),
        (lambda: write([dict(entries[0], convert_path="Dishes/100.wav")]), r"entry 0: convert_path"),
        (lambda: write(entries + entries[:1]), r"listed twice"),
        (fsd_list.unlink, r"FSD50K_config.json: cannot read the pick-up list"),
        (lambda: shutil.rmtree(ears), r"--ears_path .*EARS: folder not found"),
    ]
    ears_list = data / "config" / "EARS_config.json"
    ears_entries = json.loads(ears_list.read_text())
    clash = dict(ears_entries[0], convert_path=entries[0]["convert_path"], t4_label=entries[0]["t4_label"])
    ears_list.write_text(json.dumps([clash]))
    before = snapshot(data)
    with pytest.raises(ValueError, match=rf"{entries[0]['convert_path']}: the target of both .*FSD50K.* and .*EARS"):
        data_prep.add_data(config)  # two pick-up lists naming one target
    assert snapshot(data) == before
    ears_list.write_text(json.dumps(ears_entries))
    saved = fsd_list.read_text()
    for damage, message in cases:
        damage()
        before = snapshot(data)
        with pytest.raises(ValueError, match=message):
            data_prep.add_data(config)
        assert snapshot(data) == before
        fsd_list.write_text(saved)
        (semhear / "bg_scaper_fmt/val/Zipper (clothing)").mkdir(exist_ok=True)
    with pytest.raises(ValueError, match="nothing to add"):
        data_prep.add_data(data_prep.AddDataConfig(data=str(data)))


# ----------------------------------------------------------------------------------------------------------
# Command line: bad input ends in one line naming it, with nothing changed on disk


def run_command_line(arguments, monkeypatch, capsys):
    """data_prep.main() as the shell runs it -> (exit status, what the terminal shows). Python prints a SystemExit
    message to stderr and exits with 1; any other exception would fail the test with its traceback."""
    monkeypatch.setattr(sys, "argv", ["data_prep.py", *arguments])
    with pytest.raises(SystemExit) as stop:
        data_prep.main()
    printed = capsys.readouterr()
    code = stop.value.code
    return (1, printed.out + printed.err + code) if isinstance(code, str) else (code, printed.out + printed.err)


def test_command_line_errors_are_one_line_and_change_nothing(demo_dev_set, tmp_path, monkeypatch, capsys):
    rendered = tmp_path / "rendered"
    data_prep.render_metadata(demo_dev_set / "metadata" / "valid.json", rendered)
    changed = sorted((rendered / "oracle_target").glob("*.wav"))[0]
    soundfile.write(changed, np.zeros(10), RATE)
    cases = [  # arguments, what the message must name
        (["demo", "--out", str(demo_dev_set.parent)], f"{demo_dev_set}: already exists"),
        (["render", "--metadata", str(demo_dev_set / "metadata" / "valid.json"), "--out", str(rendered)],
         f"{changed}: exists with different content"),
        (["render", "--metadata", str(tmp_path / "absent.json"), "--out", str(tmp_path / "out")],
         f"{tmp_path / 'absent.json'}: not found"),
        (["add-data", "--semhear_path", str(tmp_path / "no_semhear"), "--data", str(demo_dev_set)],
         f"--semhear_path {tmp_path / 'no_semhear'}: folder not found"),
        (["add-data", "--data", str(demo_dev_set)], "nothing to add: give --semhear_path and/or --ears_path"),
    ]
    for arguments, message in cases:
        before = snapshot(tmp_path), snapshot(demo_dev_set)
        status, output = run_command_line(arguments, monkeypatch, capsys)
        assert status != 0 and message in output and len(output.strip().splitlines()) == 1, output
        assert (snapshot(tmp_path), snapshot(demo_dev_set)) == before, arguments
    # One case end to end in a fresh interpreter: the terminal shows that line and no traceback.
    result = subprocess.run([sys.executable, str(SCRIPT), *cases[2][0]], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr and result.stdout == ""
    assert result.stderr.strip() == (f"data_prep.py render: {tmp_path / 'absent.json'}: not found (expected "
                                     "valid.json or a folder of metadata JSON files)")
