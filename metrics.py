"""Scoring metrics (CAPI-SDRi, 2025 CA-SDRi, label accuracies) and the training losses: small pure functions that
evaluate.py and train.py's validation share. S = estimate slots, R = reference slots, L = samples, B = batch.
Metrics run in their inputs' dtype (float32, as the official scorer); losses in float64 with the eps of float32.

    python bench.py --only metric      # ms of CAPI-SDRi per 10 s mixture
"""
import collections
import itertools
import math

import torch
import torch.nn.functional as F

from devset import LABELS, SILENCE

INVALID_COST = 1e9  # class-aware PIT cost of pairing slots of different classes; never chosen
METRIC_NAMES = {"capi-sdri": "CAPI-SDRi", "ca-sdri": "CA-SDRi"}  # --metric value -> name printed / in JSON


# ---- SNR ---------------------------------------------------------------------------------------------------------
def snr(preds: torch.Tensor, target: torch.Tensor, eps: float | None = None) -> torch.Tensor:
    """SNR in dB along the last dim, as torchmetrics' signal_noise_ratio(zero_mean=False): preds, target [..., L] ->
    [...]. eps (default: of preds' dtype) is added to both energies, so 0/0 gives 0 dB."""
    if preds.shape != target.shape:
        raise ValueError(f"snr: preds {tuple(preds.shape)} and target {tuple(target.shape)} must have the same shape")
    eps = torch.finfo(preds.dtype).eps if eps is None else eps
    return 10 * torch.log10((torch.sum(target**2, dim=-1) + eps) / (torch.sum((target - preds) ** 2, dim=-1) + eps))


def snr64(preds: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """snr in float64 with the eps of the predictions' dtype, as the official losses (float32 meets float64)."""
    return snr(preds.double(), targets.double(), torch.finfo(preds.dtype).eps)


# ---- CAPI-SDRi (2026) and CA-SDRi (2025) -------------------------------------------------------------------------
def _group_by_class(labels: list[str], last_only: bool = False) -> dict[str, list[int]]:
    """Slot indices of each non-silence class; last_only keeps a class's last slot (the 2025 scorer's dict does)."""
    groups: dict[str, list[int]] = {}
    for index, label in enumerate(labels):
        if label == SILENCE:
            continue
        if label not in LABELS:
            raise ValueError(f"unknown label {label!r}; expected one of {', '.join(LABELS)} or {SILENCE!r}")
        groups[label] = [index] if last_only else groups.get(label, []) + [index]
    return groups


def _classwise_improvement(est_groups, ref_groups, pair_snr, mixture_snr) -> tuple[float | None, list]:
    """(Mean improvement by the rules of capi_sdri, matched pairs [(reference slot, estimate slot, improvement)])."""
    classes = est_groups.keys() | ref_groups.keys()
    if not classes:
        return None, []
    values, matched_pairs = [], []
    for label in classes:
        estimates, references = est_groups.get(label, []), ref_groups.get(label, [])
        matched = min(len(estimates), len(references))
        if matched:
            best_score, best_pairs = -math.inf, None
            for chosen_refs in itertools.combinations(references, matched):
                for chosen_ests in itertools.permutations(estimates, matched):
                    pairs = list(zip(chosen_refs, chosen_ests))
                    score = sum(pair_snr[pair] for pair in pairs) / matched  # raw SNR picks, not improvement
                    if best_pairs is None or score > best_score:  # first maximum in enumeration order
                        best_score, best_pairs = score, pairs
            improvements = [(r, s, pair_snr[(r, s)] - mixture_snr[r]) for r, s in best_pairs]
            matched_pairs += improvements
            values += [improvement for _, _, improvement in improvements]
        values += [0.0] * (max(len(estimates), len(references)) - matched)  # misses or false positives
    return sum(values) / len(values), matched_pairs


def _score_batch(est_labels, est_waveforms, ref_labels, ref_waveforms, mixtures, last_only) -> list[tuple]:
    """capi_sdri / ca_sdri of a batch: est_waveforms [B, S, L], ref_waveforms [B, R, L], mixtures [B, L] or [B, C, L]
    -> per item (value or None, matched pairs). Only same-class pairs get an SNR."""
    # Half-precision waveforms (autocast outputs) are scored in float32; other dtypes are kept.
    est_waveforms, ref_waveforms, mixtures = (tensor.float() if tensor.dtype in (torch.float16, torch.bfloat16)
                                              else tensor for tensor in (est_waveforms, ref_waveforms, mixtures))
    if mixtures.dim() == 3:
        mixtures = mixtures[:, 0]  # (B, L): the improvement is measured against mic channel 0
    if not (len(est_labels) == len(ref_labels) == est_waveforms.shape[0] == ref_waveforms.shape[0]
            == mixtures.shape[0]):
        raise ValueError("label lists, estimates, references and mixtures must have the same batch size")
    if not (est_waveforms.shape[-1] == ref_waveforms.shape[-1] == mixtures.shape[-1]):
        raise ValueError(f"length mismatch: estimates {tuple(est_waveforms.shape)}, references "
                         f"{tuple(ref_waveforms.shape)}, mixtures {tuple(mixtures.shape)}")
    scores = []
    for b, (estimated, reference) in enumerate(zip(est_labels, ref_labels)):
        if len(estimated) != est_waveforms.shape[1] or len(reference) != ref_waveforms.shape[1]:
            raise ValueError(f"item {b}: {len(estimated)} estimate labels for {est_waveforms.shape[1]} slots, "
                             f"{len(reference)} reference labels for {ref_waveforms.shape[1]} slots")
        est_groups, ref_groups = _group_by_class(estimated, last_only), _group_by_class(reference, last_only)
        pair_snr, mixture_snr = {}, {}
        for label in est_groups.keys() & ref_groups.keys():
            for r in ref_groups[label]:
                mixture_snr[r] = snr(mixtures[b], ref_waveforms[b, r]).item()
                for s in est_groups[label]:
                    pair_snr[r, s] = snr(est_waveforms[b, s], ref_waveforms[b, r]).item()
        scores.append(_classwise_improvement(est_groups, ref_groups, pair_snr, mixture_snr))
    return scores


def capi_sdri(est_labels: list[str], est_waveforms: torch.Tensor, ref_labels: list[str],
              ref_waveforms: torch.Tensor, mixture: torch.Tensor, last_only: bool = False) -> float | None:
    """CAPI-SDRi of one mixture (the 2026 official metric), in dB: est_labels for est_waveforms [S, L], ref_labels
    for ref_waveforms [R, L], mixture [L] or [C, L] (channel 0). Within each class the pairing with the highest mean
    raw SNR counts with its SNR improvements, each surplus estimate or unmatched reference with 0; the mean of all,
    or None when neither side has a label (left out of dataset means)."""
    mixture = mixture[None] if mixture.dim() == 1 else mixture[None, 0]
    return _score_batch([est_labels], est_waveforms[None], [ref_labels], ref_waveforms[None], mixture, last_only)[0][0]


def ca_sdri(est_labels, est_waveforms, ref_labels, ref_waveforms, mixture) -> float | None:
    """CA-SDRi (the 2025 official metric): capi_sdri where a duplicated label keeps its last slot only."""
    return capi_sdri(est_labels, est_waveforms, ref_labels, ref_waveforms, mixture, last_only=True)


# ---- Label metrics -----------------------------------------------------------------------------------------------
def label_counts(est_labels: list[str], ref_labels: list[str]) -> dict:
    """Multiset label counts of one mixture without silence (2026 LabelMetric): {'acc': equal, 'tp', 'fp', 'fn'}."""
    estimated = collections.Counter(label for label in est_labels if label != SILENCE)
    reference = collections.Counter(label for label in ref_labels if label != SILENCE)
    true_positives = sum((estimated & reference).values())
    return {"acc": estimated == reference, "tp": true_positives,
            "fp": sum(estimated.values()) - true_positives, "fn": sum(reference.values()) - true_positives}


def label_accuracies(counts: list[dict]) -> tuple[float, float]:
    """(accuracy_mix, accuracy_src) in percent from label_counts dicts: the share of mixtures with the exact label
    multiset, and tp / (tp + fp + fn) summed over mixtures (NaN when no mixture has any label on either side)."""
    if not counts:
        raise ValueError("label_accuracies: no mixtures")
    accuracy_mix = 100.0 * sum(bool(count["acc"]) for count in counts) / len(counts)
    tp = sum(count["tp"] for count in counts)
    total = tp + sum(count["fp"] + count["fn"] for count in counts)
    return accuracy_mix, (100.0 * tp / total if total else math.nan)


def label_set_match(est_labels: list[str], ref_labels: list[str]) -> bool:
    """2025 label accuracy of one mixture: the sets of non-silence labels are equal (duplicates ignored)."""
    return set(est_labels) - {SILENCE} == set(ref_labels) - {SILENCE}


# ---- Accumulator for evaluate.py and train.py validation ---------------------------------------------------------
class MetricAccumulator:
    """Per-mixture scores of 'capi-sdri' (2026) or 'ca-sdri' (2025) over batches (update: shapes as _score_batch,
    returns the B values; details: each mixture's record); summary() gives the dataset numbers."""

    def __init__(self, metric: str = "capi-sdri"):
        if metric not in METRIC_NAMES:
            raise ValueError(f"metric {metric!r}: expected one of {', '.join(METRIC_NAMES)}")
        self.metric = metric
        self.details: list[dict] = []  # {'soundscape', 'est_labels', 'ref_labels', 'value', 'label_counts', 'pairs'}

    def update(self, est_labels, est_waveforms, ref_labels, ref_waveforms, mixtures, soundscapes=None):
        with torch.no_grad():
            scores = _score_batch(est_labels, est_waveforms, ref_labels, ref_waveforms, mixtures,
                                  last_only=self.metric == "ca-sdri")
        for b, (value, pairs) in enumerate(scores):
            counts = label_counts(est_labels[b], ref_labels[b])
            if self.metric == "ca-sdri":
                counts["acc"] = label_set_match(est_labels[b], ref_labels[b])
            self.details.append({"soundscape": soundscapes[b] if soundscapes else f"item_{len(self.details)}",
                                 "est_labels": list(est_labels[b]), "ref_labels": list(ref_labels[b]),
                                 "value": value, "label_counts": counts, "pairs": pairs})
        return [value for value, _ in scores]

    def summary(self) -> dict:
        """{'metric', 'mean' (None if nothing is scored), 'accuracy_mix' (2025: set accuracy), 'accuracy_src', ...}."""
        values = [item["value"] for item in self.details if item["value"] is not None]
        accuracy_mix, accuracy_src = label_accuracies([item["label_counts"] for item in self.details])
        return {"metric": METRIC_NAMES[self.metric], "mean": sum(values) / len(values) if values else None,
                "accuracy_mix": accuracy_mix, "accuracy_src": accuracy_src,
                "count": len(self.details), "scored": len(values)}


# ---- Training losses (all float64, differentiable) ---------------------------------------------------------------
_PERMUTATIONS = {}  # (slots, device) -> every permutation [P, S]; built once per device, never copied again


def _best_permutation(cost: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cost [B, S, S] (rows = target slot, columns = prediction slot) -> (mean cost of the best permutation [B],
    permutation [B, S]: prediction slot of each target slot), by exhaustive search; ties go to the first permutation
    in itertools order. The table is cached per device: a copy from host lists would wait for the GPU."""
    slots = cost.shape[-1]
    if (slots, cost.device) not in _PERMUTATIONS:
        _PERMUTATIONS[slots, cost.device] = torch.tensor(list(itertools.permutations(range(slots))), device=cost.device)
    permutations = _PERMUTATIONS[slots, cost.device]  # (P, S)
    rows = torch.arange(slots, device=cost.device)
    scores = cost[:, rows[None, :], permutations].mean(-1)  # (B, P)
    best = scores.argmin(-1)  # argmin returns the first minimum
    return scores.gather(1, best[:, None])[:, 0], permutations[best]


def pit_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """2026 tagger loss (official label_loss.py): permutation-invariant cross-entropy. logits [B, S, C] (C = 19
    with silence), targets [B, S, C] one-hot; pair cost -sum_c targets[t, c] log_softmax(logits[p])_c, best
    assignment found exhaustively -> (batch mean of its mean cost, float64; permutation [B, S])."""
    if logits.shape != targets.shape or logits.dim() != 3:
        raise ValueError(f"pit_cross_entropy: logits {tuple(logits.shape)} and targets {tuple(targets.shape)} "
                         "must both be [B, S, C]")
    log_probabilities = F.log_softmax(logits.double(), dim=-1)
    cost = -torch.einsum("btc,bpc->btp", targets.double(), log_probabilities)  # (B, S_target, S_pred)
    best_cost, permutation = _best_permutation(cost)
    return best_cost.mean(), permutation


def class_aware_pit_snr_loss(preds: torch.Tensor, targets: torch.Tensor,
                             queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """2026 separator loss (official class_aware_pit.py): -SNR under the best permutation among same-class slots.
    preds, targets [B, S, L] or [B, S, 1, L]; queries [B, S, 18] (all-zero = silence). Silent slots cost 0 but
    count in the divisor S -> (batch mean, float64; permutation [B, S])."""
    if preds.shape != targets.shape:
        raise ValueError(f"preds {tuple(preds.shape)} and targets {tuple(targets.shape)} must match")
    batch, slots = preds.shape[:2]
    queries = queries.reshape(batch, slots, -1)  # (B, S, 18)
    is_silence = (queries == 0).all(-1)  # (B, S)
    same_class = (queries[:, :, None, :] == queries[:, None, :, :]).all(-1)  # (B, S_target, S_pred)
    valid = same_class & ~is_silence[:, :, None] & ~is_silence[:, None, :]
    cost = torch.full((batch, slots, slots), INVALID_COST, dtype=torch.float64, device=preds.device)
    diagonal = torch.arange(slots, device=preds.device)
    cost[:, diagonal, diagonal] = torch.where(is_silence, 0.0, INVALID_COST).double()
    for target_slot in range(slots):
        for pred_slot in range(slots):
            pair_snr = snr64(preds[:, pred_slot], targets[:, target_slot])  # (B,) or (B, 1) with a channel dim
            pair_cost = -pair_snr.reshape(batch, -1).mean(-1)  # (B,)
            cost[:, target_slot, pred_slot] = torch.where(valid[:, target_slot, pred_slot], pair_cost,
                                                          cost[:, target_slot, pred_slot])
    best_cost, permutation = _best_permutation(cost)
    return best_cost.mean(), permutation


def masked_snr_loss(preds: torch.Tensor, targets: torch.Tensor, source_mask: torch.Tensor) -> torch.Tensor:
    """2025 ResUNetK loss: -mean over all slots of SNR * source_mask [B, S] (0 = silence), no permutation."""
    if preds.shape != targets.shape:
        raise ValueError(f"preds {tuple(preds.shape)} and targets {tuple(targets.shape)} must match")
    value = snr64(preds, targets)  # (B, S) or (B, S, 1)
    mask = source_mask.double().reshape(source_mask.shape + (1,) * (value.dim() - source_mask.dim()))
    return -(value * mask).mean()


def binary_cross_entropy(probabilities: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """2025 tagger loss: mean binary cross-entropy of probabilities [B, 18] against multi-hot targets [B, 18], float64;
    written out (logs floored at -100 like torch) as F.binary_cross_entropy refuses to run inside autocast."""
    probabilities, targets = probabilities.double(), targets.double()
    floor = math.exp(-100)  # clamping before the log keeps gradients finite at probabilities 0 and 1
    log_positive = torch.log(probabilities.clamp(min=floor))
    log_negative = torch.log((1 - probabilities).clamp(min=floor))
    return -(targets * log_positive + (1 - targets) * log_negative).mean()
