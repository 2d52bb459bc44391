"""report.py on hand-built results: every table number and the bootstrap interval against a computation here."""
import json
import math

import numpy as np
import pytest
import torch

import metrics
import report
from devset import LABELS, SILENCE

# Six mixtures: (reference labels, estimate labels, CAPI-SDRi value, source pairs (reference, estimate, sdri)).
CASES = {
    "m0": ([], [], None, []),  # correct all-silence answer: left out of the mean
    "m1": ([], ["Cough"], 0.0, [(SILENCE, "Cough", None)]),
    "m2": (["Speech"], ["Speech", "Speech"], 5.0, [("Speech", "Speech", 10.0), (SILENCE, "Speech", None)]),
    "m3": (["Speech", "Dishes"], ["Speech", "Blender"], 3.0, [("Speech", "Speech", 6.0), ("Dishes", "Blender", None)]),
    "m4": (["Pour", "Pour", "Cough"], ["Pour", "Pour", "Cough"], 14 / 3,
           [("Pour", "Pour", 4.0), ("Pour", "Pour", 8.0), ("Cough", "Cough", 2.0)]),
    "m5": (["Pour", "Pour", "Dishes"], ["Pour", "Dishes"], 4.0,
           [("Pour", "Pour", 5.0), ("Dishes", "Dishes", 7.0), ("Pour", SILENCE, None)]),
}
ORACLE_VALUES = {"m0": None, "m1": None, "m2": 12.0, "m3": 6.0, "m4": 5.0, "m5": 6.0}


def padded(labels: list[str]) -> list[str]:
    return labels + [SILENCE] * (3 - len(labels))


def detail(soundscape: str, ref_labels, est_labels, value, sources) -> dict:
    """One results.json detail as evaluate.py writes it."""
    return {"soundscape": soundscape, "ref_labels": padded(ref_labels), "est_labels": padded(est_labels),
            "metrics": [{"metric": "CAPI-SDRi", "value": value},
                        {"metric": "label_metrics", "value": metrics.label_counts(est_labels, ref_labels)}],
            "sources": [{"reference": reference, "estimate": estimate, "sdri": sdri}
                        for reference, estimate, sdri in sources]}


def results(details: list[dict]) -> dict:
    return {"CAPI-SDRi": {"mean": None}, "label_metrics": {}, "details": details, "config": {}}


def system_results() -> dict:
    return results([detail(name, *case) for name, case in CASES.items()])


def oracle_results() -> dict:
    return results([detail(name, ref, ref, ORACLE_VALUES[name], [(label, label, 1.0) for label in ref])
                    for name, (ref, *_) in CASES.items()])


def test_buckets_and_split():
    built = report.build_report(system_results(), oracle_results(), {"tagger": "t.pt", "separator": "s.pt"}, "dev")
    rows = {row["bucket"]: row for row in built["buckets"]}
    assert list(rows) == ["all", "0 targets", "1 target", "2 targets", "3 targets", "same-class duplicate",
                          "no duplicate"]
    # tp / (fp + fn) per mixture: m0 0/0, m1 0/1, m2 1/1, m3 1/2, m4 3/0, m5 2/1
    expected = {  # bucket: (mixtures, scored, sdri, accuracy_mix, accuracy_src, oracle_sdri)
        "all": (6, 5, (0 + 5 + 3 + 14 / 3 + 4) / 5, 100 * 2 / 6, 100 * 7 / 12, (12 + 6 + 5 + 6) / 4),
        "0 targets": (2, 1, 0.0, 50.0, 0.0, None),
        "1 target": (1, 1, 5.0, 0.0, 50.0, 12.0),
        "2 targets": (1, 1, 3.0, 0.0, 100 / 3, 6.0),
        "3 targets": (2, 2, (14 / 3 + 4) / 2, 50.0, 100 * 5 / 6, 5.5),
        "same-class duplicate": (2, 2, (14 / 3 + 4) / 2, 50.0, 100 * 5 / 6, 5.5),
        "no duplicate": (4, 3, (0 + 5 + 3) / 3, 25.0, 100 * 2 / 6, 9.0),
    }
    for name, (mixtures, scored, sdri, accuracy_mix, accuracy_src, oracle) in expected.items():
        row = rows[name]
        assert (row["mixtures"], row["scored"]) == (mixtures, scored), name
        assert row["sdri"] == pytest.approx(sdri) and row["oracle_sdri"] == pytest.approx(oracle), name
        assert row["accuracy_mix"] == pytest.approx(accuracy_mix) and row["accuracy_src"] == pytest.approx(accuracy_src)
    assert sum(rows[f"{count} target{'' if count == 1 else 's'}"]["mixtures"] for count in range(4)) == 6
    assert rows["same-class duplicate"]["mixtures"] + rows["no duplicate"]["mixtures"] == 6
    assert built["silence_answers"] == {"mixtures": 2, "correct": 1}
    system, oracle = expected["all"][2], expected["all"][5]
    assert built["split"] == pytest.approx({"system": system, "oracle": oracle, "tagger_cost": oracle - system})
    assert built["mixtures"] == 6 and built["data"] == "dev" and built["metric"] == "CAPI-SDRi"


def test_tagging_tables_and_confusion():
    built = report.build_report(system_results(), None, {"estimates": "est"}, "dev")
    assert built["split"] is None
    classes = {row["class"]: row for row in built["classes"]}
    assert list(classes) == list(LABELS)
    expected = {  # class: (references, estimates, correct, precision, recall, F1)
        "Speech": (2, 3, 2, 200 / 3, 100.0, 80.0), "Dishes": (2, 1, 1, 100.0, 50.0, 200 / 3),
        "Blender": (0, 1, 0, 0.0, None, 0.0), "Cough": (1, 2, 1, 50.0, 100.0, 200 / 3),
        "Pour": (4, 3, 3, 100.0, 75.0, 600 / 7), "Typing": (0, 0, 0, None, None, None),
    }
    for label, (references, estimates, tp, precision, recall, f1) in expected.items():
        row = classes[label]
        assert (row["references"], row["estimates"], row["tp"]) == (references, estimates, tp), label
        for key, value in (("precision", precision), ("recall", recall), ("f1", f1)):
            assert row[key] == (None if value is None else pytest.approx(value)), (label, key)
    assert built["micro"] == pytest.approx({"references": 9, "estimates": 10, "tp": 7, "precision": 70.0,
                                            "recall": 700 / 9, "f1": 1400 / 19})
    assert built["macro_f1"] == pytest.approx((80 + 200 / 3 + 0 + 200 / 3 + 600 / 7) / 5)
    # Pour twice in m4 (both found) and m5 (one found); m2 predicts Speech twice for one Speech.
    assert built["duplicates"] == {"groups": 2, "all_found": 1, "some_found": 1, "none_found": 0, "spurious": 1,
                                   "recall": 50.0}

    counts = np.array(built["confusion"]["counts"])
    index = {label: position for position, label in enumerate(built["confusion"]["labels"])}
    assert built["confusion"]["labels"][-1] == SILENCE and counts.sum() == 6 * 3  # every output slot once
    expected_cells = {("Speech", "Speech"): 2, (SILENCE, "Speech"): 1, (SILENCE, "Cough"): 1, ("Dishes", "Blender"): 1,
                      ("Pour", "Pour"): 3, ("Cough", "Cough"): 1, ("Dishes", "Dishes"): 1, ("Pour", SILENCE): 1,
                      (SILENCE, SILENCE): 3 + 2 + 1 + 1}  # silent slots on both sides: m0 3, m1 2, m2 1, m3 1
    for (reference, estimate), count in expected_cells.items():
        assert counts[index[reference], index[estimate]] == count, (reference, estimate)
    assert counts.sum() == sum(expected_cells.values())

    sdri = {row["class"]: row for row in built["sdri_by_class"]}
    assert sdri["Pour"] == {"class": "Pour", "sources": 3, "q1": 4.5, "median": 5.0, "q3": 6.5}  # of 4, 5, 8
    assert sdri["all"] == {"class": "all", "sources": 7, "q1": 4.5, "median": 6.0, "q3": 7.5}  # 2 4 5 6 7 8 10
    assert sdri["Blender"]["sources"] == 0 and sdri["Blender"]["median"] is None


def test_markdown_tables(tmp_path):
    written = report.write_report(tmp_path / "plain", system_results(), oracle_results(), {"estimates": "est"}, "d")
    assert sorted(path.name for path in written) == ["report.json", "report.md"]
    assert sorted(path.name for path in (tmp_path / "plain").iterdir()) == ["report.json", "report.md"]
    markdown = (tmp_path / "plain" / "report.md").read_text()
    assert "| all | 6 | 5 | 3.333 | 7.250 | 33.333 | 58.333 |" in markdown  # (0+5+3+14/3+4)/5 = 3.333
    assert "| oracle - system: what the tagger costs | 3.917 |" in markdown
    assert "| Pour | 4 | 3 | 3 | 100.0 | 75.0 | 85.7 |" in markdown
    saved = json.loads((tmp_path / "plain" / "report.json").read_text())
    assert saved["buckets"][0]["mixtures"] == 6


def test_pair_sources_names_each_confusion_by_the_closest_waveform():
    generator = torch.Generator().manual_seed(0)
    speech, dishes, pour = torch.randn(3, 4000, generator=generator)
    noise = 0.1 * torch.randn(3, 4000, generator=generator)
    ref_labels = ["Speech", "Dishes", "Pour"]
    references = torch.stack([speech, dishes, pour])
    # The Blender estimate sounds like Pour and the Cough estimate like Dishes: slot order would pair them wrongly.
    est_labels = ["Speech", "Blender", "Cough"]
    estimates = torch.stack([speech, pour, dishes]) + noise
    mixture = references.sum(0)
    accumulator = metrics.MetricAccumulator()
    accumulator.update([est_labels], estimates[None], [ref_labels], references[None], mixture[None])
    pairs = accumulator.details[0]["pairs"]
    improvement = float(metrics.snr(estimates[0], speech) - metrics.snr(mixture, speech))
    assert pairs == [(0, 0, pytest.approx(improvement))]
    paired = report.pair_sources(est_labels, estimates, ref_labels, references, pairs)
    assert paired == [{"reference": "Speech", "estimate": "Speech", "sdri": pytest.approx(improvement)},
                      {"reference": "Dishes", "estimate": "Cough", "sdri": None},
                      {"reference": "Pour", "estimate": "Blender", "sdri": None}]
    # A surplus estimate pairs with silence, an unmatched reference with a silent slot.
    paired = report.pair_sources(["Speech", "Blender", SILENCE], estimates, ["Speech", SILENCE, SILENCE],
                                 references, [(0, 0, 1.0)])
    assert paired[1:] == [{"reference": SILENCE, "estimate": "Blender", "sdri": None}]
    paired = report.pair_sources([SILENCE] * 3, estimates, ["Pour", SILENCE, SILENCE], references, [])
    assert paired == [{"reference": "Pour", "estimate": SILENCE, "sdri": None}]


def shifted_results(count: int, seed: int, shift: float, spread: float) -> tuple[dict, dict, np.ndarray, np.ndarray]:
    """Two systems on `count` mixtures with 1-3 targets: B = A + shift + spread * noise per mixture."""
    rng = np.random.default_rng(seed)
    values_a = rng.normal(5.0, 3.0, count)
    values_b = values_a + shift + spread * rng.normal(size=count)
    details = {"a": [], "b": []}
    for index in range(count):
        targets = ["Speech", "Dishes", "Pour"][:1 + index % 3]
        for name, values, estimate in (("a", values_a, targets[:-1] if index % 4 == 0 else targets),
                                       ("b", values_b, targets)):
            details[name].append(detail(f"s{index:04d}", targets, estimate, float(values[index]), []))
    return results(details["a"]), results(details["b"]), values_a, values_b


def expected_interval(values_a: np.ndarray, values_b: np.ndarray) -> np.ndarray:
    """The paired percentile bootstrap written out: resample the mixtures, difference of the means."""
    rng = np.random.default_rng(report.BOOTSTRAP_SEED)
    index = rng.integers(0, len(values_a), size=(report.BOOTSTRAP_RESAMPLES, len(values_a)))
    differences = [values_b[row].mean() - values_a[row].mean() for row in index]
    return np.percentile(differences, [2.5, 97.5])


def test_bootstrap_interval_of_a_known_shift():
    results_a, results_b, values_a, values_b = shifted_results(240, seed=1, shift=0.4, spread=1.0)
    comparison = report.compare_results(results_a, results_b, "A", "B")
    assert comparison["mixtures"] == 240 and comparison["resamples"] == 10_000
    overall = comparison["buckets"][0]
    assert overall["bucket"] == "all" and overall["mixtures"] == 240
    sdri = overall["sdri"]
    assert sdri["difference"] == pytest.approx(values_b.mean() - values_a.mean(), abs=1e-12)
    assert sdri["interval"] == pytest.approx(expected_interval(values_a, values_b), abs=1e-12)
    # The percentile interval agrees with the normal approximation mean +- 1.96 standard errors.
    standard_error = np.std(values_b - values_a, ddof=1) / math.sqrt(240)
    assert sdri["interval"] == pytest.approx([sdri["difference"] - 1.96 * standard_error,
                                              sdri["difference"] + 1.96 * standard_error], abs=0.25 * standard_error)
    # A bucket is resampled within itself: the 2-target mixtures are every third one from index 1.
    two = next(row for row in comparison["buckets"] if row["bucket"] == "2 targets")
    assert two["mixtures"] == 80
    assert two["sdri"]["interval"] == pytest.approx(expected_interval(values_a[1::3], values_b[1::3]), abs=1e-12)
    # Every fourth mixture of A misses its last label; B gets all right.
    missed = np.arange(240) % 4 == 0
    assert overall["accuracy_mix"]["a"] == pytest.approx(100 * (1 - missed.mean()))
    assert overall["accuracy_mix"]["difference"] == pytest.approx(100 * missed.mean())
    targets = 1 + np.arange(240) % 3
    assert overall["accuracy_src"]["a"] == pytest.approx(100 * (targets.sum() - missed.sum()) / targets.sum())
    assert overall["accuracy_src"]["b"] == 100.0

    # A constant shift has no spread: the interval collapses onto it.
    _, results_b, values_a, values_b = shifted_results(240, seed=1, shift=0.5, spread=0.0)
    interval = report.compare_results(results_a, results_b, "A", "B")["buckets"][0]["sdri"]["interval"]
    assert interval == pytest.approx([0.5, 0.5], abs=1e-9)


def test_identical_results_give_exact_zeros():
    results_a = system_results()
    comparison = report.compare_results(results_a, json.loads(json.dumps(results_a)), "A", "B")
    for row in comparison["buckets"]:
        for key in report.STATISTICS:
            if row[key]["difference"] is not None:
                assert row[key]["difference"] == 0.0 and row[key]["interval"] == [0.0, 0.0]
    assert comparison["changed"] == []
    text = report.format_comparison(comparison)
    assert "on 6 mixtures" in text and "10,000 resamples" in text and "No mixture changed" in text


def test_changed_most_and_mismatches():
    results_a = system_results()
    results_b = json.loads(json.dumps(results_a))
    results_b["details"][2]["metrics"][0]["value"] = 9.0  # m2: 5 -> 9
    results_b["details"][5]["metrics"][0]["value"] = 3.0  # m5: 4 -> 3
    comparison = report.compare_results(results_a, results_b, "A", "B")
    assert [(change["soundscape"], change["difference"]) for change in comparison["changed"]] == [("m2", 4.0),
                                                                                                 ("m5", -1.0)]
    assert comparison["buckets"][0]["sdri"]["difference"] == pytest.approx(3 / 5)

    other = json.loads(json.dumps(results_a))
    other["details"][0]["soundscape"] = "m9"
    with pytest.raises(ValueError, match="only in A: m0; only in B: m9"):
        report.compare_results(results_a, other, "A", "B")
    other = json.loads(json.dumps(results_a))
    other["details"][3]["ref_labels"] = ["Speech", "Pour", SILENCE]
    with pytest.raises(ValueError, match="reference labels differ for m3"):
        report.compare_results(results_a, other, "A", "B")
    with pytest.raises(ValueError, match="B: not a results file"):
        report.compare_results(results_a, {"details": []}, "A", "B")
