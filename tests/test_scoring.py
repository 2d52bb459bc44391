"""End to end: `python evaluate.py --estimates` on a small folder of WAVs written here."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch

import evaluate as evaluate_module
import metrics
from devset import SAMPLE_RATE, SILENCE

REPOSITORY = Path(__file__).resolve().parent.parent
LENGTH = SAMPLE_RATE // 4  # 0.25 s mixtures keep the test fast

# soundscape -> (reference labels, estimate files as (name suffix, label, source index or None for noise))
SCENES = {
    "soundscape_0000": (["Speech", "Dishes"], [("0_Speech", 0), ("1_Dishes", 1)]),
    "soundscape_0001": (["Speech", "Speech", "Pour"], [("0_Speech", 1), ("1_Speech", 0), ("2_Blender", None)]),
    "soundscape_0002": (["Cough"], []),  # no estimate files: predicted silence, scores 0
    "soundscape_0003": ([], []),  # silence on both sides: left out of the mean
    "soundscape_0004": (["Typing"], [("Typing", 0)]),  # 2025 naming without slot index
}


def write(path: Path, audio: np.ndarray, sample_rate: int = SAMPLE_RATE):
    path.parent.mkdir(parents=True, exist_ok=True)
    soundfile.write(str(path), audio, sample_rate)  # 16-bit PCM, like the official outputs


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("scoring")
    data, estimates = root / "data", root / "estimates"
    rng = np.random.default_rng(0)
    for name, (ref_labels, estimate_files) in SCENES.items():
        sources = [0.1 * rng.standard_normal(LENGTH) for _ in ref_labels]
        mixture = 0.01 * rng.standard_normal((LENGTH, 4)) + (sum(sources)[:, None] if sources else 0.0)
        write(data / "soundscape" / f"{name}.wav", mixture)
        for index, (label, source) in enumerate(zip(ref_labels, sources)):
            write(data / "oracle_target" / f"{name}_{index}_{label}.wav", source)
        for suffix, source_index in estimate_files:
            noise = 0.05 * rng.standard_normal(LENGTH)
            write(estimates / f"{name}_{suffix}.wav", noise + (sources[source_index] if source_index is not None else 0))
    estimates.mkdir(exist_ok=True)
    return data, estimates


def evaluate(*arguments) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "evaluate.py", *map(str, arguments)], cwd=REPOSITORY,
                          capture_output=True, text=True, timeout=120)


def read(path: Path) -> torch.Tensor:
    return torch.from_numpy(soundfile.read(str(path), dtype="float32")[0])


def expected_scores(data: Path, estimates: Path, function):
    """Per-soundscape values computed directly with metrics.py from the files (the official loader's rules)."""
    values, counts = [], []
    for name in SCENES:
        mixture = read(data / "soundscape" / f"{name}.wav")[:, 0]
        sides = []
        for folder in (estimates, data / "oracle_target"):
            files = sorted(folder.glob(f"{name}_*.wav"))
            labels = [path.stem.rsplit("_", 1)[-1] for path in files] + [SILENCE] * (3 - len(files))
            waveforms = torch.zeros(len(labels), LENGTH)
            for slot, path in enumerate(files):
                waveforms[slot] = read(path)
            sides.append((labels, waveforms))
        (est_labels, est), (ref_labels, ref) = sides
        values.append(function(est_labels, est, ref_labels, ref, mixture))
        counts.append(metrics.label_counts(est_labels, ref_labels))
    return values, counts


def printed(stdout: str) -> dict:
    return dict(line.split(":", 1) for line in stdout.splitlines() if ":" in line)


def test_capi_sdri_scoring_end_to_end(dataset, tmp_path):
    data, estimates = dataset
    result = evaluate("--estimates", estimates, "--data", data, "--out", tmp_path, "--report")
    assert result.returncode == 0, result.stderr
    values, counts = expected_scores(data, estimates, metrics.capi_sdri)
    assert values[2] == 0.0 and values[3] is None and all(value is not None for value in values[:2] + values[4:])
    mean = np.mean([value for value in values if value is not None])
    accuracy_mix, accuracy_src = metrics.label_accuracies(counts)
    lines = result.stdout.splitlines()
    assert lines[0] == f"CAPI-SDRi: {mean:.3f}"
    assert lines[1] == f"Accuracy (mixture): {accuracy_mix:.3f}"
    assert lines[2] == f"Accuracy (source) : {accuracy_src:.3f}"
    assert round(accuracy_mix, 3) == 60.0  # 0000, 0003, 0004 right; 0001 has a false positive, 0002 a miss
    assert "ms per mixture" in printed(result.stdout)["Metric computation"]

    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results) == {"CAPI-SDRi", "label_metrics", "details", "config"}
    assert results["CAPI-SDRi"]["mean"] == pytest.approx(mean, abs=1e-9)
    assert results["label_metrics"] == pytest.approx({"accuracy_mix": accuracy_mix, "accuracy_src": accuracy_src})
    assert [item["soundscape"] for item in results["details"]] == list(SCENES)
    first = results["details"][1]
    assert first["ref_labels"] == ["Speech", "Speech", "Pour"]
    assert first["est_labels"] == ["Speech", "Speech", "Blender"]
    assert first["metrics"][0] == {"metric": "CAPI-SDRi", "value": pytest.approx(values[1], abs=1e-9)}
    assert first["metrics"][1] == {"metric": "label_metrics", "value": {"acc": False, "tp": 2, "fp": 1, "fn": 1}}
    assert results["details"][3]["metrics"][0]["value"] is None
    assert results["details"][2]["est_labels"] == [SILENCE] * 3
    assert results["config"]["metric"] == "capi-sdri"
    assert [(pair["reference"], pair["estimate"]) for pair in first["sources"]] == [
        ("Speech", "Speech"), ("Speech", "Speech"), ("Pour", "Blender")]  # the Blender estimate was meant for Pour
    assert first["sources"][2]["sdri"] is None  # divisor 4: two Speech pairs, the Pour miss, the Blender estimate
    assert (first["sources"][0]["sdri"] + first["sources"][1]["sdri"]) / 4 == pytest.approx(values[1], abs=1e-9)

    # The report: buckets by reference count (0003: 0, 0002 and 0004: 1, 0000: 2, 0001: 3 with a duplicate).
    written = json.loads((tmp_path / "report" / "report.json").read_text())
    rows = {row["bucket"]: row for row in written["buckets"]}
    assert [f"{rows['all'][key]:.3f}" for key in ("sdri", "accuracy_mix", "accuracy_src")] == [
        line.split(": ")[1] for line in lines[:3]]
    expected = {"0 targets": (1, 0, None), "1 target": (2, 2, (values[2] + values[4]) / 2),
                "2 targets": (1, 1, values[0]), "3 targets": (1, 1, values[1]),
                "same-class duplicate": (1, 1, values[1]),
                "no duplicate": (4, 3, (values[0] + values[2] + values[4]) / 3)}
    for name, (mixtures, scored, sdri) in expected.items():
        assert (rows[name]["mixtures"], rows[name]["scored"]) == (mixtures, scored), name
        assert rows[name]["sdri"] == (None if sdri is None else pytest.approx(sdri, abs=1e-9)), name
    assert written["silence_answers"] == {"mixtures": 1, "correct": 1} and written["split"] is None
    assert written["system"] == {"estimates": str(estimates)} and written["mixtures"] == 5
    assert "(5 mixtures)" in (tmp_path / "report" / "report.md").read_text()

    # An existing results.json is never replaced silently.
    again = evaluate("--estimates", estimates, "--data", data, "--out", tmp_path)
    assert again.returncode != 0 and "--overwrite" in again.stderr
    assert evaluate("--estimates", estimates, "--data", data, "--out", tmp_path, "--overwrite").returncode == 0


def compare(monkeypatch, capsys, folder_a: Path, folder_b: Path) -> tuple[int, str, str]:
    """evaluate.py --compare A B in this process (reading JSON needs no fresh interpreter) -> (exit, out, err)."""
    monkeypatch.setattr(sys, "argv", ["evaluate.py", "--compare", str(folder_a), str(folder_b)])
    code = 0
    try:
        evaluate_module.main()
    except SystemExit as exit_info:
        code = exit_info.code
    output = capsys.readouterr()
    return code, output.out, output.err


def test_compare_result_folders(dataset, tmp_path, monkeypatch, capsys):
    data, estimates = dataset
    (tmp_path / "silent").mkdir()
    for name, folder in (("a", estimates), ("b", tmp_path / "silent")):
        assert evaluate("--estimates", folder, "--data", data, "--out", tmp_path / name).returncode == 0
    values, _ = expected_scores(data, estimates, metrics.capi_sdri)
    mean = np.mean([value for value in values if value is not None])

    code, output, _ = compare(monkeypatch, capsys, tmp_path / "a", tmp_path / "a")
    assert code == 0 and "B - A on 5 mixtures" in output and "10,000 resamples" in output
    assert f"| all | 5 | {mean:.3f} | {mean:.3f} | +0.000 | [+0.000, +0.000] |" in output
    assert "No mixture changed" in output

    code, output, _ = compare(monkeypatch, capsys, tmp_path / "a", tmp_path / "b")  # B: silence everywhere, 0 dB
    assert code == 0 and f"| all | 5 | {mean:.3f} | 0.000 | {-mean:+.3f} |" in output
    assert "Mixtures that changed most (3 changed;" in output  # 0002 and 0003 were silent already

    ca = evaluate("--estimates", estimates, "--data", data, "--out", tmp_path / "ca", "--metric", "ca-sdri")
    assert ca.returncode == 0
    code, _, error = compare(monkeypatch, capsys, tmp_path / "a", tmp_path / "ca" / "results.json")
    assert code != 0 and "CAPI-SDRi" in error and "CA-SDRi" in error
    assert len(error.strip().splitlines()) == 1 and "Traceback" not in error


def test_ca_sdri_scoring(dataset, tmp_path):
    data, estimates = dataset
    result = evaluate("--estimates", estimates, "--data", data, "--out", tmp_path, "--metric", "ca-sdri")
    assert result.returncode == 0, result.stderr
    values, _ = expected_scores(data, estimates, metrics.ca_sdri)
    mean = np.mean([value for value in values if value is not None])
    lines = result.stdout.splitlines()
    assert lines[0] == f"CA-SDRi: {mean:.3f}"
    assert lines[1] == "Label prediction accuracy: 60.00"  # sets: 0001 {Speech, Blender} vs {Speech, Pour}; 0002 miss
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["CA-SDRi"]["mean"] == pytest.approx(mean, abs=1e-9)
    assert results["details"][0]["metrics"][0]["metric"] == "CA-SDRi"


def test_bad_inputs_are_all_listed(dataset, tmp_path):
    data, good = dataset
    estimates = tmp_path / "estimates"
    for path in good.iterdir():
        (estimates / path.name).parent.mkdir(exist_ok=True)
        (estimates / path.name).write_bytes(path.read_bytes())
    noise = 0.1 * np.random.default_rng(1).standard_normal(LENGTH)
    bad = {
        "soundscape_0000_2_Speach.wav": (noise, SAMPLE_RATE),  # unknown label
        "soundscape_0001_3_Pour.wav": (noise[: LENGTH // 2], SAMPLE_RATE // 2),  # 16 kHz
        "soundscape_0002_0_Cough.wav": (noise[:-10], SAMPLE_RATE),  # shorter than the mixture
        "soundscape_9999_0_Speech.wav": (noise, SAMPLE_RATE),  # no such soundscape
        "other_Speech.wav": (noise, SAMPLE_RATE),  # no such soundscape
    }
    for name, (audio, sample_rate) in bad.items():
        write(estimates / name, audio, sample_rate)
    (estimates / "notes.txt").write_text("not audio")
    result = evaluate("--estimates", estimates, "--data", data, "--out", tmp_path / "out")
    assert result.returncode != 0
    for name in bad:
        assert name in result.stderr
    assert "Speach" in result.stderr and "16000 Hz" in result.stderr and f"expected {LENGTH}" in result.stderr
    assert "matches no soundscape" in result.stderr and "notes.txt" in result.stderr  # ignored, but said so
    assert not (tmp_path / "out" / "results.json").exists()

    missing = evaluate("--estimates", good, "--data", tmp_path / "nowhere")
    assert missing.returncode != 0 and "nowhere" in missing.stderr
    no_estimates = evaluate("--estimates", tmp_path / "absent", "--data", data)
    assert no_estimates.returncode != 0 and "absent" in no_estimates.stderr


def test_empty_estimate_folder_is_predicted_silence(dataset, tmp_path):
    data, _ = dataset
    (tmp_path / "empty").mkdir()
    result = evaluate("--estimates", tmp_path / "empty", "--data", data)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0] == "CAPI-SDRi: 0.000"  # every non-empty mixture scores 0
    assert "predicted silence" in result.stderr
