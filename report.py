"""Where a system loses its decibels, and whether a change really helped: evaluate.py's --report and --compare.

    python evaluate.py --tagger T.ckpt --separator S.ckpt --data DATA --out OUT --report   # adds oracle labels
    python evaluate.py --compare OUT_A OUT_B

--report writes OUT/report/report.md and report.json: the metric and the label accuracies by kind of mixture,
per-class tagging scores with the confusion matrix, per-class SDRi and (from checkpoints) the separator queried
with the reference labels, which splits the loss between tagger and separator. --compare prints B - A per kind of
mixture with 95 % paired bootstrap intervals, and the mixtures that changed most. Everything works on the
results.json dicts evaluate.py writes; nothing reads audio.
"""
import collections
import json
from pathlib import Path

import numpy as np
import scipy.optimize
import torch

from devset import LABELS, NUM_SLOTS, SILENCE
from metrics import METRIC_NAMES, snr

TARGET_COUNTS = (0, 1, 2, 3)  # bucket rows always shown; a larger count gets its own row when it occurs
CONFUSION_LABELS = LABELS + (SILENCE,)  # rows (references) and columns (estimates) of the confusion matrix
BOOTSTRAP_RESAMPLES = 10_000  # resamples of the paired bootstrap
BOOTSTRAP_SEED = 0  # every bucket row draws its resamples from a fresh generator with this seed
BOOTSTRAP_CHUNK = 1000  # resamples evaluated at once (bounds the memory, not the result)
INTERVAL_PERCENTILES = (2.5, 97.5)  # the 95 % percentile interval
CHANGED_MOST = 10  # mixtures listed by --compare
STATISTICS = {"sdri": "{metric} (dB)", "accuracy_mix": "Mixture accuracy (%)", "accuracy_src": "Source accuracy (%)"}


# ---- Pairing estimates with references (called by evaluate.py while the waveforms are in memory) -----------------
def pair_sources(est_labels: list[str], est_waveforms: torch.Tensor, ref_labels: list[str],
                 ref_waveforms: torch.Tensor, matched_pairs: list[tuple[int, int, float]]) -> list[dict]:
    """Every non-silent estimate [S, L] and reference [R, L] of one mixture, paired -> [{'reference', 'estimate',
    'sdri'}]: the metric's same-class pairs first, the tagger's confusions by the highest total SNR (the estimate that
    sounds most like a reference is the one the tagger misnamed), the rest with silence."""
    pairs = [{"reference": ref_labels[r], "estimate": est_labels[s], "sdri": improvement}
             for r, s, improvement in matched_pairs]
    matched_references, matched_estimates = {r for r, _, _ in matched_pairs}, {s for _, s, _ in matched_pairs}
    free_references = [r for r, label in enumerate(ref_labels) if label != SILENCE and r not in matched_references]
    free_estimates = [s for s, label in enumerate(est_labels) if label != SILENCE and s not in matched_estimates]
    for r in list(free_references):  # same class but unmatched: the 2025 CA-SDRi keeps one slot per class
        s = next((s for s in free_estimates if est_labels[s] == ref_labels[r]), None)
        if s is not None:
            pairs.append({"reference": ref_labels[r], "estimate": est_labels[s], "sdri": None})
            free_references.remove(r)
            free_estimates.remove(s)
    if free_references and free_estimates:
        references = ref_waveforms[free_references].float()[:, None]  # (R', 1, L)
        estimates = est_waveforms[free_estimates].float()[None]  # (1, E', L)
        scores = snr(estimates.expand(len(free_references), -1, -1), references.expand(-1, len(free_estimates), -1))
        rows, columns = scipy.optimize.linear_sum_assignment(scores.double().cpu().numpy(), maximize=True)
        pairs += [{"reference": ref_labels[free_references[i]], "estimate": est_labels[free_estimates[j]],
                   "sdri": None} for i, j in zip(rows, columns)]
        free_references = [r for i, r in enumerate(free_references) if i not in rows]
        free_estimates = [s for j, s in enumerate(free_estimates) if j not in columns]
    pairs += [{"reference": ref_labels[r], "estimate": SILENCE, "sdri": None} for r in free_references]
    pairs += [{"reference": SILENCE, "estimate": est_labels[s], "sdri": None} for s in free_estimates]
    return pairs


# ---- Per-mixture records, buckets and the dataset numbers --------------------------------------------------------
def metric_name(results: dict) -> str:
    return next(key for key in results if key in METRIC_NAMES.values())  # 'CAPI-SDRi' or 'CA-SDRi'


def mixture_records(results: dict, origin: str) -> list[dict]:
    """results.json dict -> per mixture {'soundscape', 'ref_labels', 'est_labels', 'value', 'acc', 'tp', 'fp', 'fn',
    'sources'}; a ValueError naming origin when the layout is not evaluate.py's."""
    try:
        name = metric_name(results)
        records = []
        for detail in results["details"]:
            values = {entry["metric"]: entry["value"] for entry in detail["metrics"]}
            counts = values["label_metrics"]
            records.append({"soundscape": detail["soundscape"], "ref_labels": detail["ref_labels"],
                            "est_labels": detail["est_labels"], "value": values[name],
                            **{key: counts[key] for key in ("acc", "tp", "fp", "fn")},
                            "sources": detail.get("sources", [])})
    except (KeyError, TypeError, StopIteration, AttributeError) as error:
        raise ValueError(f"{origin}: not a results file written by evaluate.py ({type(error).__name__}: "
                         f"{error})") from None
    if not records:
        raise ValueError(f"{origin}: holds no mixtures")
    return records


def columns(records: list[dict]) -> dict[str, np.ndarray]:
    """Per-mixture arrays [n]: 'value' (NaN = not scored), 'acc' (0/1), 'tp', 'errors' (fp + fn)."""
    return {"value": np.array([np.nan if record["value"] is None else record["value"] for record in records],
                              dtype=np.float64),
            "acc": np.array([float(record["acc"]) for record in records]),
            "tp": np.array([record["tp"] for record in records], dtype=np.float64),
            "errors": np.array([record["fp"] + record["fn"] for record in records], dtype=np.float64)}


def statistics(data: dict[str, np.ndarray], index: np.ndarray) -> dict[str, np.ndarray]:
    """The dataset numbers (the official summary's rules) of the mixtures in each row of index [R, n] -> {'sdri',
    'accuracy_mix', 'accuracy_src'}, each [R]; NaN where a row has nothing to average."""
    value = data["value"][index]  # (R, n)
    scored = ~np.isnan(value)
    tp = data["tp"][index].sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return {"sdri": np.where(scored, value, 0.0).sum(-1) / scored.sum(-1),
                "accuracy_mix": 100.0 * data["acc"][index].mean(-1),
                "accuracy_src": 100.0 * tp / (tp + data["errors"][index].sum(-1))}


def _number(value) -> float | None:
    return None if np.isnan(value) else float(value)  # NaN -> None (JSON null, '-' in tables)


def target_count(labels: list[str]) -> int:
    return sum(label != SILENCE for label in labels)


def buckets(records: list[dict]) -> list[tuple[str, np.ndarray]]:
    """(name, indices of its mixtures): all, by number of reference targets, with / without a same-class duplicate."""
    counts = np.array([target_count(record["ref_labels"]) for record in records])
    duplicate = np.array([target_count(set(record["ref_labels"])) < target_count(record["ref_labels"])
                          for record in records])
    return ([("all", np.arange(len(records)))]
            + [(f"{count} target{'' if count == 1 else 's'}", np.flatnonzero(counts == count))
               for count in sorted(set(TARGET_COUNTS) | set(counts.tolist()))]
            + [("same-class duplicate", np.flatnonzero(duplicate)), ("no duplicate", np.flatnonzero(~duplicate))])


# ---- --report: the tables ----------------------------------------------------------------------------------------
def bucket_table(records: list[dict], oracle_records: list[dict] | None) -> list[dict]:
    """Per bucket: mixtures, scored (in the mean), sdri, accuracy_mix, accuracy_src (and oracle_sdri)."""
    data = columns(records)
    oracle = columns(oracle_records) if oracle_records is not None else None
    rows = []
    for name, members in buckets(records):
        numbers = statistics(data, members[None]) if len(members) else dict.fromkeys(STATISTICS, [np.nan])
        rows.append({"bucket": name, "mixtures": len(members), "scored": int((~np.isnan(data["value"][members])).sum())}
                    | {key: _number(numbers[key][0]) for key in STATISTICS})
        if oracle is not None:
            rows[-1]["oracle_sdri"] = _number(statistics(oracle, members[None])["sdri"][0]) if len(members) else None
    return rows


def tagging_tables(records: list[dict]) -> dict:
    """Per-class and overall precision / recall / F1 in percent (multiset counts) and the duplicate statistics."""
    references, estimates, true_positives, duplicates = (collections.Counter() for _ in range(4))
    for record in records:
        estimated = collections.Counter(label for label in record["est_labels"] if label != SILENCE)
        reference = collections.Counter(label for label in record["ref_labels"] if label != SILENCE)
        references.update(reference)
        estimates.update(estimated)
        true_positives.update(estimated & reference)
        for label, count in reference.items():
            if count > 1:
                found = min(estimated[label], count)
                duplicates["groups"] += 1
                duplicates["all_found" if found == count else "some_found" if found else "none_found"] += 1
        duplicates["spurious"] += sum(count > 1 and reference[label] < 2 for label, count in estimated.items())

    def scores(tp: int, reference: int, estimate: int) -> dict:
        return {"references": reference, "estimates": estimate, "tp": tp,
                "precision": 100.0 * tp / estimate if estimate else None,
                "recall": 100.0 * tp / reference if reference else None,
                "f1": 200.0 * tp / (reference + estimate) if reference + estimate else None}

    classes = [{"class": label} | scores(true_positives[label], references[label], estimates[label])
               for label in LABELS]
    f1_values = [row["f1"] for row in classes if row["f1"] is not None]
    return {"classes": classes,
            "micro": scores(sum(true_positives.values()), sum(references.values()), sum(estimates.values())),
            "macro_f1": sum(f1_values) / len(f1_values) if f1_values else None,
            "duplicates": {key: duplicates[key] for key in ("groups", "all_found", "some_found", "none_found",
                                                            "spurious")}
            | {"recall": 100.0 * duplicates["all_found"] / duplicates["groups"] if duplicates["groups"] else None}}


def class_sdri(records: list[dict]) -> dict[str, list[float]]:
    """SNR improvements (dB) of the correctly labelled sources, per class and under 'all'."""
    values = {label: [] for label in LABELS}
    for record in records:
        for pair in record["sources"]:
            if pair["reference"] == pair["estimate"] and pair["sdri"] is not None:
                values[pair["reference"]].append(pair["sdri"])
    return values | {"all": sum(values.values(), [])}


def quartiles(values: list[float]) -> dict:
    """{'sources', 'q1', 'median', 'q3'} (linear interpolation; None without values)."""
    q1, median, q3 = np.percentile(values, [25, 50, 75]).tolist() if values else (None, None, None)
    return {"sources": len(values), "q1": q1, "median": median, "q3": q3}


def build_report(results: dict, oracle_results: dict | None, system: dict, data: str) -> dict:
    """All report tables from the run's results dict (and the oracle-label run's); system: what was evaluated."""
    records = mixture_records(results, "results")
    oracle_records = mixture_records(oracle_results, "oracle results") if oracle_results is not None else None
    if oracle_records is not None and [r["soundscape"] for r in oracle_records] != [r["soundscape"] for r in records]:
        raise ValueError("the oracle-label run scored other mixtures than the system run")
    rows = bucket_table(records, oracle_records)
    silent = [record for record in records if target_count(record["ref_labels"]) == 0]
    report = {"system": system, "data": data, "mixtures": len(records), "metric": metric_name(results),
              "buckets": rows, "split": None,
              "silence_answers": {"mixtures": len(silent), "correct": sum(bool(r["acc"]) for r in silent)}}
    if oracle_records is not None:
        system_sdri, oracle_sdri = rows[0]["sdri"], rows[0]["oracle_sdri"]
        report["split"] = {"system": system_sdri, "oracle": oracle_sdri,
                           "tagger_cost": None if None in (system_sdri, oracle_sdri) else oracle_sdri - system_sdri}
    report |= tagging_tables(records)
    # [19, 19] counts of (reference, estimate) label pairs; output slots silent on both sides are (silence, silence)
    counts = np.zeros((len(CONFUSION_LABELS), len(CONFUSION_LABELS)), dtype=np.int64)
    for record in records:
        for pair in record["sources"]:
            counts[CONFUSION_LABELS.index(pair["reference"]), CONFUSION_LABELS.index(pair["estimate"])] += 1
        counts[-1, -1] += max(0, NUM_SLOTS - len(record["sources"]))
    report["confusion"] = {"labels": list(CONFUSION_LABELS), "counts": counts.tolist()}
    values = class_sdri(records)
    oracle_values = class_sdri(oracle_records) if oracle_records is not None else None
    report["sdri_by_class"] = []
    for label in values:
        row = {"class": label} | quartiles(values[label])
        if oracle_values is not None:
            oracle = quartiles(oracle_values[label])
            row |= {"oracle_sources": oracle["sources"], "oracle_median": oracle["median"]}
        report["sdri_by_class"].append(row)
    return report


# ---- --report: markdown ------------------------------------------------------------------------------------------
def _cell(value, digits: int = 3, sign: bool = False) -> str:
    return "-" if value is None else f"{value:+.{digits}f}" if sign else f"{value:.{digits}f}"


def _table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]


def render_markdown(report: dict) -> str:
    """report.md: the tables of build_report."""
    metric, oracle = report["metric"], report["split"] is not None
    system = ", ".join(f"{key} `{value}`" for key, value in report["system"].items())
    lines = ["# Evaluation report", "", f"System: {system}  ", f"Data: `{report['data']}` ({report['mixtures']} "
             f"mixtures)  ", f"Metric: {metric} in dB, accuracies in %; '-' = nothing to average.", "",
             "## By kind of mixture", ""]
    header = ["mixtures", "count", f"scored in {metric}", metric] + (["with oracle labels"] if oracle else [])
    header += ["mixture accuracy", "source accuracy"]
    rows = [[row["bucket"], row["mixtures"], row["scored"], _cell(row["sdri"])]
            + ([_cell(row["oracle_sdri"])] if oracle else []) + [_cell(row["accuracy_mix"]), _cell(row["accuracy_src"])]
            for row in report["buckets"]]
    lines += _table(header, rows)
    silence = report["silence_answers"]
    if silence["mixtures"]:
        lines += ["", f"Mixtures without targets answered with all silence: {silence['correct']} of "
                      f"{silence['mixtures']} ({100.0 * silence['correct'] / silence['mixtures']:.1f} %)."]

    if oracle:
        split = report["split"]
        lines += ["", "## Tagger or separator", "",
                  "The separator run once more with the reference labels as queries (oracle labels):", ""]
        rows = (("system (tagger + separator)", "system"),
                ("separator with oracle labels: what the separator delivers", "oracle"),
                ("oracle - system: what the tagger costs", "tagger_cost"))
        lines += _table(["", metric], [[name, _cell(split[key])] for name, key in rows])
    else:
        lines += ["", "(The oracle-label split needs the system itself: evaluate with --tagger/--separator.)"]

    lines += ["", "## Tagging", ""]
    rows = [[row["class"], row["references"], row["estimates"], row["tp"], _cell(row["precision"], 1),
             _cell(row["recall"], 1), _cell(row["f1"], 1)] for row in report["classes"] + [
                 report["micro"] | {"class": "all (micro)"}]]
    lines += _table(["class", "references", "estimates", "correct", "precision", "recall", "F1"], rows)
    lines += ["", f"Macro F1 over the classes present: {_cell(report['macro_f1'], 1)}."]
    duplicates = report["duplicates"]
    lines += [f"Same-class duplicates in the references: {duplicates['groups']}; all copies found in "
              f"{duplicates['all_found']} (duplicate recall {_cell(duplicates['recall'], 1)} %), some in "
              f"{duplicates['some_found']}, none in {duplicates['none_found']}."
              if duplicates["groups"] else "No reference holds a same-class duplicate."]
    lines += [f"Duplicates predicted where the reference has at most one source of the class: "
              f"{duplicates['spurious']}."]

    lines += ["", "### Confusion matrix", "",
              "Rows: reference label, columns: estimate label. Same-class pairs are the metric's; the remaining "
              "estimates and references are paired by the highest SNR; the rest pair with silence (a miss or a "
              "false positive).", ""]
    counts = np.array(report["confusion"]["counts"])
    used = [index for index in range(len(CONFUSION_LABELS)) if counts[index].any() or counts[:, index].any()]
    names = [CONFUSION_LABELS[index] for index in used]
    lines += _table(["reference \\ estimate"] + names,
                    [[name] + [int(counts[row, column]) or "." for column in used] for name, row in zip(names, used)])

    lines += ["", "## Separation", "", "SNR improvement (dB) of the correctly labelled sources"
              + (", and with oracle labels" if oracle else "") + ":", ""]
    header = ["class", "sources", "median", "25 %", "75 %"] + (["oracle sources", "oracle median"] if oracle else [])
    rows = [[row["class"], row["sources"], _cell(row["median"], 2), _cell(row["q1"], 2), _cell(row["q3"], 2)]
            + ([row["oracle_sources"], _cell(row["oracle_median"], 2)] if oracle else [])
            for row in report["sdri_by_class"] if row["sources"] or row.get("oracle_sources")]
    lines += _table(header, rows)
    return "\n".join(lines) + "\n"


def write_report(folder: Path, results: dict, oracle_results: dict | None, system: dict, data: str) -> list[Path]:
    """FOLDER/report.md and report.json -> their paths (the caller made sure no earlier report is in the way)."""
    report = build_report(results, oracle_results, system, data)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "report.md").write_text(render_markdown(report))
    (folder / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    return [folder / "report.md", folder / "report.json"]


# ---- --compare: paired differences with bootstrap intervals ------------------------------------------------------
def bootstrap_differences(data_a: dict, data_b: dict, members: np.ndarray) -> dict[str, np.ndarray]:
    """B - A of each statistic on paired resamples of `members` from a fresh generator (the same every run)."""
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    index = rng.integers(0, len(members), size=(BOOTSTRAP_RESAMPLES, len(members)))
    differences = {key: [] for key in STATISTICS}
    for start in range(0, BOOTSTRAP_RESAMPLES, BOOTSTRAP_CHUNK):
        rows = members[index[start:start + BOOTSTRAP_CHUNK]]  # (chunk, n) mixture indices
        a, b = statistics(data_a, rows), statistics(data_b, rows)
        for key in STATISTICS:
            differences[key].append(b[key] - a[key])
    return {key: np.concatenate(parts) for key, parts in differences.items()}


def _preview(names: list[str], count: int = 5) -> str:
    return ", ".join(names[:count]) + (f" (+{len(names) - count} more)" if len(names) > count else "")


def paired_records(results_a: dict, results_b: dict, name_a: str, name_b: str) -> tuple[list[dict], list[dict]]:
    """The records of both results in A's order; a ValueError unless both scored the same data with one metric."""
    records = {}
    for name, results in ((name_a, results_a), (name_b, results_b)):
        records[name] = mixture_records(results, name)
        if len({record["soundscape"] for record in records[name]}) < len(records[name]):
            raise ValueError(f"{name}: lists a soundscape more than once")
    metrics = metric_name(results_a), metric_name(results_b)
    if metrics[0] != metrics[1]:
        raise ValueError(f"{name_a} holds {metrics[0]}, {name_b} {metrics[1]}; compare results of one metric")
    names_a, names_b = ({record["soundscape"] for record in records[name]} for name in (name_a, name_b))
    if names_a != names_b:
        raise ValueError(f"the results hold different mixtures: only in {name_a}: "
                         f"{_preview(sorted(names_a - names_b)) or 'none'}; only in {name_b}: "
                         f"{_preview(sorted(names_b - names_a)) or 'none'}; compare evaluations of the same data")
    by_name = {record["soundscape"]: record for record in records[name_b]}
    records_a = records[name_a]
    records_b = [by_name[record["soundscape"]] for record in records_a]
    # Compared without silence: the padding may differ between modes and batch sizes.
    targets = [[sorted(label for label in record["ref_labels"] if label != SILENCE) for record in rows]
               for rows in (records_a, records_b)]
    differing = [a["soundscape"] for a, ta, tb in zip(records_a, *targets) if ta != tb]
    if differing:
        raise ValueError(f"the reference labels differ for {_preview(differing)}: {name_a} and {name_b} were "
                         "evaluated on different data")
    return records_a, records_b


def compare_results(results_a: dict, results_b: dict, name_a: str, name_b: str) -> dict:
    """Paired comparison B - A: per bucket and statistic {'a', 'b', 'difference', 'interval'}, and what changed most."""
    records_a, records_b = paired_records(results_a, results_b, name_a, name_b)
    data_a, data_b = columns(records_a), columns(records_b)
    rows = []
    for bucket, members in buckets(records_a):
        row = {"bucket": bucket, "mixtures": len(members)}
        if len(members):
            a, b = statistics(data_a, members[None]), statistics(data_b, members[None])
            # The 95 % interval of the resamples that are defined (one without a scored mixture has no mean).
            defined = {key: values[~np.isnan(values)] for key, values in
                       bootstrap_differences(data_a, data_b, members).items()}
            row |= {key: {"a": _number(a[key][0]), "b": _number(b[key][0]),
                          "difference": _number(b[key][0] - a[key][0]),
                          "interval": np.percentile(defined[key], INTERVAL_PERCENTILES).tolist()
                          if len(defined[key]) else None} for key in STATISTICS}
        rows.append(row)
    changed = []
    for a, b in zip(records_a, records_b):
        # A mixture left out of the mean (silence on both sides) ranks as 0 dB, like a miss or false positive.
        difference = (b["value"] or 0.0) - (a["value"] or 0.0)
        if difference or a["est_labels"] != b["est_labels"]:
            changed.append({"soundscape": a["soundscape"], "difference": difference,
                            "ref_labels": a["ref_labels"], "a": {key: a[key] for key in ("est_labels", "value")},
                            "b": {key: b[key] for key in ("est_labels", "value")}})
    changed.sort(key=lambda change: (-abs(change["difference"]), change["soundscape"]))
    return {"metric": metric_name(results_a), "a": name_a, "b": name_b, "mixtures": len(records_a),
            "resamples": BOOTSTRAP_RESAMPLES, "seed": BOOTSTRAP_SEED, "buckets": rows,
            "changed": changed[:CHANGED_MOST], "changed_count": len(changed)}


def format_comparison(comparison: dict) -> str:
    """The printed comparison: one table per statistic, then the mixtures that changed most."""
    metric = comparison["metric"]
    lines = [f"Paired comparison B - A on {comparison['mixtures']} mixtures; 95 % paired bootstrap intervals from "
             f"{comparison['resamples']:,} resamples (seed {comparison['seed']})",
             f"A: {comparison['a']}", f"B: {comparison['b']}"]
    for key, title in STATISTICS.items():
        rows = [[row["bucket"], 0, "-", "-", "-", "-"] if not row["mixtures"] else
                [row["bucket"], row["mixtures"], _cell(row[key]["a"]), _cell(row[key]["b"]),
                 _cell(row[key]["difference"], sign=True),
                 "-" if row[key]["interval"] is None else "[{:+.3f}, {:+.3f}]".format(*row[key]["interval"])]
                for row in comparison["buckets"]]
        lines += ["", title.format(metric=metric)] + _table(["mixtures", "count", "A", "B", "B - A",
                                                             "95 % interval"], rows)
    lines.append("")
    if not comparison["changed"]:
        lines.append("No mixture changed: B has the same labels and values as A on every mixture.")
        return "\n".join(lines)
    lines.append(f"Mixtures that changed most ({comparison['changed_count']} changed; {metric} B - A, "
                 "'-' = silence on both sides, left out of the mean):")
    labels = [[", ".join(name for name in names if name != SILENCE) or SILENCE for names in
               (change["ref_labels"], change["a"]["est_labels"], change["b"]["est_labels"])]
              for change in comparison["changed"]]
    rows = [[change["soundscape"], reference, labels_a, _cell(change["a"]["value"]), labels_b,
             _cell(change["b"]["value"]), _cell(change["difference"], sign=True)]
            for change, (reference, labels_a, labels_b) in zip(comparison["changed"], labels)]
    lines += _table(["soundscape", "reference", "A labels", "A", "B labels", "B", "B - A"], rows)
    return "\n".join(lines)
