"""End to end: `python evaluate.py` inference, waveforms, plots and submission with tiny random-weight checkpoints.

The checkpoints are written here in our own format; the soundscapes are 1 s, 4-channel, 16-bit like the dev set.
The tagger's silence logits are biased so that slot 0 is always silent (it must be sorted last) and slot 1 never.
"""
import dataclasses
import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch

import data_prep
import evaluate
import metrics
import model
import synth
from devset import LABELS, SAMPLE_RATE, SILENCE, read_audio
from devset import parse_source_name

REPOSITORY = Path(__file__).resolve().parent.parent
LENGTH = SAMPLE_RATE  # 1 s mixtures keep each run to seconds
# soundscape -> reference labels (the last one has no target sources)
SCENES = {"soundscape_0000": ["Speech", "Dishes"], "soundscape_0001": ["Pour", "Pour", "Cough"],
          "soundscape_0002": ["Blender"], "soundscape_0003": []}
TAGGER = model.TaggerConfig(embed_dim=32, depth=1, num_heads=2, track_input_dim=16, track_hidden_dim=16)
SEPARATOR = model.SeparatorConfig(base_channels=2, condition_dim=16)
FAST = ("--device", "cpu", "--num_workers", "1")


def write_wav(path: Path, audio: np.ndarray, sample_rate: int = SAMPLE_RATE):
    path.parent.mkdir(parents=True, exist_ok=True)
    soundfile.write(str(path), audio, sample_rate, subtype="PCM_16")


def write_soundscapes(folder: Path, names, seed: int, sample_rate: int = SAMPLE_RATE, references: bool = True):
    """FOLDER/soundscape/<name>.wav and (with references) FOLDER/oracle_target/<name>_<i>_<label>.wav."""
    rng = np.random.default_rng(seed)
    for name in names:
        labels = SCENES.get(name, ["Speech"])
        sources = [0.1 * rng.standard_normal(LENGTH) for _ in labels]
        mixture = 0.01 * rng.standard_normal((LENGTH, 4)) + (sum(sources)[:, None] if sources else 0.0)
        write_wav(folder / "soundscape" / f"{name}.wav", mixture, sample_rate)
        for index, (label, source) in enumerate(zip(labels, sources)):
            if references:
                write_wav(folder / "oracle_target" / f"{name}_{index}_{label}.wav", source, sample_rate)
    return folder


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    folder = tmp_path_factory.mktemp("checkpoints")
    torch.manual_seed(0)
    tagger, separator = model.build_tagger(TAGGER), model.Separator(SEPARATOR)
    with torch.no_grad():
        tagger.head.tracks[0][3].bias[len(LABELS)] = 50.0  # slot 0: always silence
        tagger.head.tracks[1][3].bias[len(LABELS)] = -50.0  # slot 1: never silence
    for name, module, config in (("tagger", tagger, TAGGER), ("separator", separator, SEPARATOR)):
        torch.save({"kind": name, "model_config": dataclasses.asdict(config), "model": module.state_dict()},
                   folder / f"{name}.pt")
    return folder / "tagger.pt", folder / "separator.pt"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_soundscapes(tmp_path_factory.mktemp("dev") / "test", SCENES, seed=0)


def run(*arguments, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "evaluate.py", *map(str, arguments)], cwd=REPOSITORY, env=env,
                          capture_output=True, text=True, timeout=300)


def fail(monkeypatch, capsys, *arguments) -> str:
    """Runs evaluate.main() in this process (no torch start-up per call) expecting an error exit -> stderr."""
    monkeypatch.setattr(sys, "argv", ["evaluate.py", *map(str, arguments)])
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main()
    assert exit_info.value.code != 0
    return capsys.readouterr().err


def system_arguments(checkpoints, data):
    return ("--tagger", checkpoints[0], "--separator", checkpoints[1], "--data", data, *FAST)


def expected_outputs(checkpoints, data):
    """Labels and probabilities computed here with model.S5 on the same files."""
    system = model.S5(model.load_tagger(str(checkpoints[0])), model.load_separator(str(checkpoints[1])))
    mixtures = torch.stack([torch.from_numpy(read_audio(data / "soundscape" / f"{name}.wav")) for name in SCENES])
    output = system(mixtures)
    return output["label"], output["probabilities"], model.count_parameters(system)


def check_waveform_files(folder: Path, details: list[dict], subtype: str):
    """One file per non-silent slot, named after the sorted slot, mono 32 kHz of the mixture's length."""
    expected = sorted(f"{item['soundscape']}_{slot}_{label}.wav"
                      for item in details for slot, label in enumerate(item["est_labels"]) if label != SILENCE)
    names = sorted(path.name for path in folder.iterdir())
    assert names == expected and len(names) >= len(details)  # slot 1 is never silent
    for name in names:
        soundscape = name[:len("soundscape_0000")]
        slot, _ = parse_source_name(soundscape, name)
        assert slot in (0, 1)  # the always-silent slot 0 was sorted last
        info = soundfile.info(str(folder / name))
        assert (info.samplerate, info.channels, info.frames, info.subtype) == (SAMPLE_RATE, 1, LENGTH, subtype)


def oracle_capi_sdri(checkpoints, data) -> float:
    """Mean CAPI-SDRi of the separator queried with the reference labels, computed here file by file."""
    separator = model.load_separator(str(checkpoints[1]))
    values = []
    for name, labels in SCENES.items():
        mixture = torch.from_numpy(read_audio(data / "soundscape" / f"{name}.wav"))
        labels = labels + [SILENCE] * (3 - len(labels))
        references = torch.stack([torch.zeros(LENGTH) if label == SILENCE else torch.from_numpy(
            read_audio(data / "oracle_target" / f"{name}_{slot}_{label}.wav"))[0] for slot, label in enumerate(labels)])
        queries = torch.stack([synth.label_vector(labels)])  # (1, 3, 18)
        with torch.no_grad():
            estimates = separator(mixture[None], queries)[0]  # (3, L)
        values.append(metrics.capi_sdri(labels, estimates, labels, references, mixture[0]))
    scored = [value for value in values if value is not None]
    return sum(scored) / len(scored)


def test_inference_end_to_end(checkpoints, data, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    result = run(*system_arguments(checkpoints, data), "--out", out, "--save_waveforms", "--batch_size", 3,
                 "--report")
    assert result.returncode == 0, result.stderr
    labels, probabilities, nparams = expected_outputs(checkpoints, data)
    lines = result.stdout.splitlines()
    assert lines[0].startswith("CAPI-SDRi: ") and lines[1].startswith("Accuracy (mixture): ")
    assert lines[2].startswith("Accuracy (source) : ") and lines[3] == f"Total parameters: {nparams:,}"
    assert "Inference speed: " in result.stderr and "soundscapes/s in the networks" in result.stderr

    results = json.loads((out / "results.json").read_text())
    assert list(results) == ["CAPI-SDRi", "label_metrics", "nparams", "details", "config"]
    assert results["nparams"] == nparams and set(results["label_metrics"]) == {"accuracy_mix", "accuracy_src"}
    assert f"{results['CAPI-SDRi']['mean']:.3f}" == lines[0].split(": ")[1]
    details = results["details"]
    assert [item["soundscape"] for item in details] == list(SCENES)
    for item, expected_labels, expected_probabilities, references in zip(details, labels, probabilities,
                                                                           SCENES.values()):
        assert list(item) == ["soundscape", "ref_labels", "est_labels", "est_label_probabilities", "metrics",
                              "sources"]
        assert item["est_labels"] == expected_labels and item["est_labels"][-1] == SILENCE  # slot 0 sorted last
        assert item["est_label_probabilities"] == pytest.approx(expected_probabilities.tolist(), abs=1e-5)
        paired = sorted((pair["reference"], pair["estimate"]) for pair in item["sources"])
        assert [reference for reference, _ in paired if reference != SILENCE] == sorted(references)
        assert sorted(estimate for _, estimate in paired if estimate != SILENCE) == sorted(
            label for label in item["est_labels"] if label != SILENCE)
        assert item["ref_labels"] == references + [SILENCE] * (3 - len(references))
        assert [metric["metric"] for metric in item["metrics"]] == ["CAPI-SDRi", "label_metrics"]
        assert set(item["metrics"][1]["value"]) == {"acc", "tp", "fp", "fn"}
    assert details[-1]["metrics"][1]["value"]["fp"] > 0 and details[-1]["metrics"][0]["value"] == 0.0
    assert results["config"]["models"]["separator_config"]["base_channels"] == SEPARATOR.base_channels
    check_waveform_files(out / "waveforms", details, "PCM_16")

    # The report: its overall row is the printed summary; the oracle-label split matches a run done here.
    written = json.loads((out / "report" / "report.json").read_text())
    overall = written["buckets"][0]
    assert (overall["bucket"], overall["mixtures"], written["mixtures"]) == ("all", 4, 4)
    assert [f"{overall[key]:.3f}" for key in ("sdri", "accuracy_mix", "accuracy_src")] == [
        line.split(": ")[1] for line in lines[:3]]
    assert [row["mixtures"] for row in written["buckets"][1:5]] == [1, 1, 1, 1]  # 0, 1, 2 and 3 targets
    assert written["split"]["oracle"] == pytest.approx(oracle_capi_sdri(checkpoints, data), abs=1e-3)
    assert written["split"]["tagger_cost"] == pytest.approx(written["split"]["oracle"] - overall["sdri"])
    assert written["system"] == {"tagger": str(checkpoints[0]), "separator": str(checkpoints[1])}
    markdown = (out / "report" / "report.md").read_text()
    assert f"tagger `{checkpoints[0]}`" in markdown and f"`{data}` (4 mixtures)" in markdown
    assert "what the tagger costs" in markdown

    error = fail(monkeypatch, capsys, *system_arguments(checkpoints, data), "--out", out, "--save_waveforms")
    assert "results.json already exists" in error and "--overwrite" in error  # nothing replaced silently
    (out / "results.json").unlink()
    error = fail(monkeypatch, capsys, *system_arguments(checkpoints, data), "--out", out, "--save_waveforms")
    assert "waveforms already hold files" in error and "--overwrite" in error


def test_float_waveforms_rescore_to_the_same_numbers(checkpoints, data, tmp_path):
    """Scoring the written float WAVs with --estimates reproduces the inference numbers."""
    out = tmp_path / "out"
    result = run(*system_arguments(checkpoints, data), "--out", out, "--save_waveforms", "--float_wav",
                 "--batch_size", 1)
    assert result.returncode == 0, result.stderr
    results = json.loads((out / "results.json").read_text())
    check_waveform_files(out / "waveforms", results["details"], "FLOAT")
    rescored = run("--estimates", out / "waveforms", "--data", data, "--out", tmp_path / "rescored")
    assert rescored.returncode == 0, rescored.stderr
    assert rescored.stdout.splitlines()[:3] == result.stdout.splitlines()[:3]
    again = json.loads((tmp_path / "rescored" / "results.json").read_text())
    for first, second in zip(results["details"], again["details"]):
        assert first["est_labels"] == second["est_labels"]
        value, rescored_value = first["metrics"][0]["value"], second["metrics"][0]["value"]
        assert (value is None and rescored_value is None) or value == pytest.approx(rescored_value, abs=1e-4)


def test_submission_package(checkpoints, data, tmp_path, monkeypatch, capsys):
    eval_root = write_soundscapes(tmp_path / "eval_set" / "eval", ["eval_0000", "eval_0001", "eval_0002"], seed=1,
                                  references=False)
    name = "Doe_Lab_task4_2"
    arguments = (*system_arguments(checkpoints, data), "--submission", "--author", "Doe", "--affiliation", "Lab",
                 "--number", 2, "--eval_data", eval_root, "--out", tmp_path / "submission")
    result = run(*arguments)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0].startswith("CAPI-SDRi: ")
    folder = tmp_path / "submission" / name

    dev = json.loads((folder / "dev_set_test_results.json").read_text())
    assert [item["soundscape"] for item in dev["details"]] == list(SCENES) and "nparams" in dev
    assert all(list(item) == ["soundscape", "ref_labels", "est_labels", "probabilities", "metrics"]
               for item in dev["details"])  # the official layout, key names included
    results = json.loads((folder / "eval_results.json").read_text())
    assert list(results) == ["nparams", "probabilities", "config"] and results["nparams"] == dev["nparams"]
    assert [entry["soundscape"] for entry in results["probabilities"]] == ["eval_0000", "eval_0001", "eval_0002"]
    written = sorted(path.name for path in (folder / "eval_out").iterdir())
    listed = [estimate for entry in results["probabilities"] for estimate in entry["estimate"]]
    assert sorted(estimate["filename"] for estimate in listed) == written and len(written) >= 3
    for entry in results["probabilities"]:
        for estimate in entry["estimate"]:
            slot, label = parse_source_name(entry["soundscape"], estimate["filename"])
            assert slot in (0, 1) and label == estimate["label"] and 0.0 < estimate["probability"] <= 1.0
            info = soundfile.info(str(folder / "eval_out" / estimate["filename"]))
            assert (info.samplerate, info.channels, info.subtype, info.frames) == (SAMPLE_RATE, 1, "PCM_16", LENGTH)

    with zipfile.ZipFile(tmp_path / "submission" / f"{name}.zip") as archive:
        expected = [f"{name}/eval_out/{file}" for file in written]
        expected += [f"{name}/eval_results.json", f"{name}/dev_set_test_results.json"]
        assert sorted(archive.namelist()) == sorted(expected)
    error = fail(monkeypatch, capsys, *arguments)  # an existing submission is never replaced
    assert "eval_out exists and is not empty" in error


def test_2025_test_set_scores_ca_sdri_and_writes_the_2025_names_and_package(tmp_path):
    """A 2025 test set (references <soundscape>_<label>.wav) with a 2025 tagger: CA-SDRi and set accuracy by default,
    printed as the official lines; waveforms and the submission (N_out/eval_out, N_out.zip) without slot numbers."""
    torch.manual_seed(0)
    tagger, separator = model.build_tagger(dataclasses.replace(TAGGER, head="linear")), model.Separator(SEPARATOR)
    for name, module in (("tagger", tagger), ("separator", separator)):
        torch.save({"kind": name, "model_config": dataclasses.asdict(module.config), "model": module.state_dict()},
                   tmp_path / f"{name}.pt")
    data = tmp_path / "dev_set" / "test"
    write_soundscapes(data, ["soundscape_0000", "soundscape_0002"], seed=2)
    for path in (data / "oracle_target").iterdir():  # the 2025 names
        soundscape = path.name[:len("soundscape_0000")]
        path.rename(path.with_name(f"{soundscape}_{parse_source_name(soundscape, path.name)[1]}.wav"))
    system = ("--tagger", tmp_path / "tagger.pt", "--separator", tmp_path / "separator.pt", "--data", data, *FAST)
    result = run(*system, "--out", tmp_path / "out", "--save_waveforms")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("CA-SDRi: ") and lines[1].startswith("Label prediction accuracy: ")
    assert len(lines[1].split(": ")[1].split(".")[1]) == 2
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["config"]["metric"] == "ca-sdri" and list(results["label_metrics"]) == ["accuracy"]
    expected = sorted(f"{item['soundscape']}_{label}.wav" for item in results["details"]
                      for label in item["est_labels"] if label != SILENCE)
    assert sorted(path.name for path in (tmp_path / "out" / "waveforms").iterdir()) == expected and expected

    eval_root = write_soundscapes(tmp_path / "eval_set", ["eval_0000", "eval_0001"], seed=3, references=False)
    result = run(*system, "--submission", "--author", "Doe", "--affiliation", "Lab", "--eval_data",
                 eval_root / "soundscape", "--out", tmp_path / "submission")
    assert result.returncode == 0, result.stderr
    folder = tmp_path / "submission" / "Doe_Lab_task4_1_out"
    written = sorted(path.name for path in (folder / "eval_out").iterdir())
    assert written and all(parse_source_name(name[:len("eval_0000")], name)[0] is None for name in written)
    with zipfile.ZipFile(tmp_path / "submission" / "Doe_Lab_task4_1_out.zip") as archive:
        assert sorted(archive.namelist()) == [f"Doe_Lab_task4_1_out/eval_out/{name}" for name in written]


def test_tuned_thresholds_recover_a_planted_offset(checkpoints, data, demo_dev_set, tmp_path, monkeypatch, capsys):
    """Logits whose Dishes logit is 2 too low where Dishes is present: the tuning raises that class alone; the file
    is written by --tune_thresholds, read by --thresholds, and refused for another label set."""
    tagger, generator = model.build_tagger(TAGGER), torch.Generator().manual_seed(0)
    dishes, silence = LABELS.index("Dishes"), len(LABELS)
    logits, references = 0.1 * torch.randn(40, 3, len(LABELS) + 1, generator=generator), []
    for n in range(40):
        truth = [dishes if n % 2 == 0 else (n + 1) % len(LABELS), (3 * n + 5) % len(LABELS), silence]
        truth = [label if label != dishes or slot == 0 else silence for slot, label in enumerate(truth)]
        for slot, label in enumerate(truth):
            logits[n, slot, label] += 3.0 - 2.0 * (label == dishes)
            logits[n, slot, (label + 7) % len(LABELS) if (label + 7) % len(LABELS) != dishes else 0] += 2.0
        references.append([(LABELS + (SILENCE,))[label] for label in truth])
    offsets, before, after = evaluate.tune_thresholds(tagger, logits, references)
    assert 1.0 < offsets[dishes] <= 2.5 and offsets.abs().sum() == offsets[dishes] and tagger.label_offsets is None
    assert before[0] <= 50.0 and after == (100.0, 100.0)

    result = run("--tune_thresholds", "--tagger", checkpoints[0], "--valid_metadata",
                 demo_dev_set / "metadata" / "valid.json", *FAST)
    written = checkpoints[0].with_name("thresholds.json")
    assert result.returncode == 0 and "validation (4 mixtures)" in result.stdout, result.stderr
    assert json.loads(written.read_text())["labels"] == [*LABELS, SILENCE]
    result = run(*system_arguments(checkpoints, data), "--thresholds", written, "--out", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "out" / "results.json").read_text())["config"]["models"]["thresholds"] == str(written)
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"labels": [*LABELS[::-1], SILENCE], "offsets": [0.0] * 19}))
    error = fail(monkeypatch, capsys, *system_arguments(checkpoints, data), "--thresholds", other)
    assert "thresholds for another label set" in error and len(error.strip().splitlines()) == 1
    broken = demo_dev_set / "metadata" / f"broken_{tmp_path.name}"  # metadata lies inside its dev set
    broken.mkdir()
    scene = next(scene for path in sorted((demo_dev_set / "metadata" / "valid").glob("*.json"))
                 if (scene := json.loads(path.read_text()))["fg_events"])
    scene["fg_events"][0]["source_file"] = "Speech/missing.wav"
    (broken / "soundscape_0000.json").write_text(json.dumps(scene))
    try:  # the file is read in a DataLoader worker: still one line
        error = fail(monkeypatch, capsys, "--tune_thresholds", "--tagger", checkpoints[0], "--valid_metadata", broken,
                     "--overwrite", *FAST)
    finally:
        shutil.rmtree(broken)
    assert "missing.wav" in error and len(error.strip().splitlines()) == 1 and "Traceback" not in error


def test_bad_input_gives_clear_errors(checkpoints, data, tmp_path, monkeypatch, capsys):
    tagger, separator = checkpoints
    common = ("--data", data, *FAST)
    error = fail(monkeypatch, capsys, "--tagger", tmp_path / "absent.pt", "--separator", separator, *common)
    assert "absent.pt" in error and "not found" in error
    error = fail(monkeypatch, capsys, "--tagger", tagger, "--separator", tagger, *common)
    assert "tagger.pt: this is a tagger checkpoint, expected a separator" in error
    (tmp_path / "notes.pt").write_text("not a checkpoint")
    error = fail(monkeypatch, capsys, "--tagger", tagger, "--separator", tmp_path / "notes.pt", *common)
    assert "notes.pt: cannot read it as a separator checkpoint" in error

    (tmp_path / "empty" / "soundscape").mkdir(parents=True)
    (tmp_path / "empty" / "oracle_target").mkdir()
    error = fail(monkeypatch, capsys, "--tagger", tagger, "--separator", separator, "--data", tmp_path / "empty")
    assert f"no .wav mixtures in {tmp_path / 'empty' / 'soundscape'}" in error

    write_soundscapes(tmp_path / "slow", ["soundscape_0000"], seed=0, sample_rate=16000)
    error = fail(monkeypatch, capsys, "--tagger", tagger, "--separator", separator, "--data", tmp_path / "slow")
    assert "soundscape_0000.wav: 16000 Hz, 4 channels; expected 32000 Hz" in error
    assert "soundscape_0000_0_Speech.wav: sample rate 16000 Hz, expected 32000 Hz" in error
    (tmp_path / "slow" / "soundscape" / "soundscape_0000.wav").write_text("not audio")
    error = fail(monkeypatch, capsys, "--tagger", tagger, "--separator", separator, "--data", tmp_path / "slow")
    assert "soundscape_0000.wav: not a readable WAV" in error

    error = fail(monkeypatch, capsys, "--estimates", tmp_path, "--tagger", tagger, "--separator", separator)
    assert "--estimates" in error and "--tagger" in error
    error = fail(monkeypatch, capsys, "--tagger", tagger, *common)
    assert "--separator is missing" in error
    error = fail(monkeypatch, capsys, "--tagger", tagger, "--separator", separator, *common, "--submission",
                 "--author", "Do_e", "--affiliation", "Lab", "--out", tmp_path / "submission")
    assert "--author" in error and "Do_e" in error
    error = fail(monkeypatch, capsys, "--tagger", tagger, "--separator", separator, *common, "--submission",
                 "--author", "Doe", "--affiliation", "Lab", "--out", tmp_path / "submission",
                 "--eval_data", tmp_path / "no_eval")
    assert f"{tmp_path / 'no_eval'}" in error and "DATA/soundscape" in error
    assert not (tmp_path / "submission").exists()


def test_eval_data_may_name_the_soundscape_folder(tmp_path):
    (tmp_path / "eval" / "soundscape").mkdir(parents=True)
    assert evaluate.soundscape_root(tmp_path / "eval") == tmp_path / "eval"
    assert evaluate.soundscape_root(tmp_path / "eval" / "soundscape") == tmp_path / "eval"


def snapshot(*folders: Path) -> dict:
    return {path: (path.stat().st_size, path.stat().st_mtime_ns) for folder in folders for path in folder.rglob("*")}


def rewrite(path: Path, frames: int | None = None, channels: int | None = None):
    """Rewrites a WAV with its first `frames` samples and / or its first `channels` channels."""
    audio, sample_rate = soundfile.read(str(path), always_2d=True)
    write_wav(path, audio[:frames, :channels], sample_rate)


def test_user_errors_are_one_line_and_change_nothing(checkpoints, data, tmp_path, monkeypatch, capsys):
    """Each bad flag or file: a non-zero exit, a short message naming the culprit, nothing written or changed."""
    copies = {}
    for name in ("truncated", "stereo", "lengths"):
        copies[name] = tmp_path / name
        for path in data.rglob("*.wav"):
            (copies[name] / path.relative_to(data)).parent.mkdir(parents=True, exist_ok=True)
            (copies[name] / path.relative_to(data)).write_bytes(path.read_bytes())
    rewrite(copies["truncated"] / "soundscape" / "soundscape_0001.wav", frames=LENGTH // 2)  # 3 good references
    rewrite(copies["stereo"] / "soundscape" / "soundscape_0002.wav", channels=2)
    for path in (copies["lengths"]).rglob("soundscape_0002*.wav"):  # a shorter mixture, with shorter references
        rewrite(path, frames=LENGTH // 2)
    system = ("--tagger", checkpoints[0], "--separator", checkpoints[1], *FAST)
    out = tmp_path / "out"
    cases = [  # (arguments, what the message must say, what it must not say)
        (("--sep", checkpoints[1], "--tagger", checkpoints[0]), ["--sep (did you mean --separator?)"], []),
        ((*system, "--data", data, "--save_waveform", "--out", out), ["--save_waveform (did you mean "
                                                                      "--save_waveforms?)"], []),
        (("--estimates", data, "--qqqqqq"), ["--qqqqqq (no valid flag is close to it"], ["did you mean"]),
        (("--compare", tmp_path / "nowhere", out), ["--compare", "nowhere", "no results.json"], []),
        ((*system, "--data", copies["truncated"], "--batch_size", 2, "--out", out),
         ["soundscape_0001.wav: shorter than its reference files"], ["oracle_target", "--batch_size"]),
        (("--estimates", copies["truncated"] / "oracle_target", "--data", copies["truncated"], "--out", out),
         ["soundscape_0001.wav: shorter than its reference files"], ["oracle_target"]),
        (("--estimates", copies["stereo"] / "oracle_target", "--data", copies["stereo"], "--out", out),
         ["soundscape_0002.wav: 32000 Hz, 2 channels"], ["oracle_target"]),
        ((*system, "--data", copies["lengths"], "--batch_size", 2, "--out", out),
         ["mixtures of different lengths", "use --batch_size 1"], ["oracle_target"]),
        ((*system, "--data", data, "--iterations", 3, "--out", out), ["--iterations 3", "separator.pt", "trained with "
                                                                      "iterations 1"], []),
        ((*system, "--data", data, "--relabel_confidence", 0.9), ["--relabel_confidence 0.9", "--second_look"], []),
    ]
    before = snapshot(tmp_path, data)
    for arguments, expected, unexpected in cases:
        error = fail(monkeypatch, capsys, *arguments)
        lines = error.strip().splitlines()
        assert 1 <= len(lines) <= 2 and "Traceback" not in error, error  # a title line and one problem at most
        for text in expected:
            assert text in error, (arguments, error)
        for text in unexpected:
            assert text not in error, (arguments, error)
    assert snapshot(tmp_path, data) == before and not out.exists()

    monkeypatch.setattr(sys, "argv", ["data_prep.py", "demo", "--ou", str(out)])
    with pytest.raises(SystemExit) as exit_info:
        data_prep.main()
    error = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert error.strip() == "data_prep.py: error: unknown argument: --ou (did you mean --out?)"
    assert not out.exists()
