"""Scoring metrics (CAPI-SDRi, 2025 CA-SDRi, label accuracies) and the training losses: small pure functions of
tensors and label lists; nothing reads files. evaluate.py and train.py's validation share them, so a number printed
during training means the same as the one the scorer prints.

Conventions: S = estimate slots, R = reference slots, L = samples, B = batch; labels are names from devset.LABELS,
with devset.SILENCE for an empty slot; SNRs in dB. Metrics run in their inputs' dtype (float32 for WAV files, as
the official scorer; half precision is cast up to float32); losses are float64 (the official validation loss is,
because its dry targets are) with the float32 eps of the predictions.

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
    """Signal-to-noise ratio in dB along the last dim, as torchmetrics' signal_noise_ratio(zero_mean=False).

    preds, target: [..., L] of the same shape -> [...]. eps (default torch.finfo(preds.dtype).eps) is added to both
    energies, so 0/0 gives 0 dB; the output dtype follows type promotion of preds and target."""
    if preds.shape != target.shape:
        raise ValueError(f"snr: preds {tuple(preds.shape)} and target {tuple(target.shape)} must have the same shape")
    eps = torch.finfo(preds.dtype).eps if eps is None else eps
    return 10 * torch.log10((torch.sum(target**2, dim=-1) + eps) / (torch.sum((target - preds) ** 2, dim=-1) + eps))


def snr64(preds: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """snr in float64 with the eps of the predictions' own dtype, as the official losses, where float32
    predictions meet float64 dry targets."""
    return snr(preds.double(), targets.double(), torch.finfo(preds.dtype).eps)


def _metric_dtype(tensor: torch.Tensor) -> torch.Tensor:
    """Half-precision waveforms (autocast outputs) are scored in float32; other dtypes are kept."""
    return tensor.float() if tensor.dtype in (torch.float16, torch.bfloat16) else tensor


# ---- CAPI-SDRi (2026) and CA-SDRi (2025) -------------------------------------------------------------------------
def _group_by_class(labels: list[str], last_only: bool = False) -> dict[str, list[int]]:
    """Slot indices of each non-silence class, in slot order; last_only keeps only the last slot of a class
    (the 2025 scorer puts labels in a dict, so a duplicated label keeps its last waveform)."""
    groups: dict[str, list[int]] = {}
    for index, label in enumerate(labels):
        if label == SILENCE:
            continue
        if label not in LABELS:
            raise ValueError(f"unknown label {label!r}; expected one of {', '.join(LABELS)} or {SILENCE!r}")
        groups[label] = [index] if last_only else groups.get(label, []) + [index]
    return groups


def _classwise_improvement(est_groups, ref_groups, pair_snr, mixture_snr) -> tuple[float | None, list]:
    """Mean improvement of one mixture from precomputed SNRs (the CAPI-SDRi rules of the docstring below), and
    the matched pairs [(reference slot, estimate slot, SNR improvement in dB)].

    pair_snr[(r, s)] = SNR(estimate s, reference r); mixture_snr[r] = SNR(mixture, reference r); both only
    needed for classes present on both sides.
    """
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
    """Shared engine of capi_sdri / ca_sdri -> per item (value or None, matched pairs). Only the SNRs of same-class
    pairs are computed, and each reference's mixture SNR once."""
    est_waveforms, ref_waveforms, mixtures = map(_metric_dtype, (est_waveforms, ref_waveforms, mixtures))
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
              ref_waveforms: torch.Tensor, mixture: torch.Tensor) -> float | None:
    """CAPI-SDRi of one mixture (the 2026 official metric), in dB.

    est_labels: S labels for est_waveforms [S, L]; ref_labels: R labels for ref_waveforms [R, L] (silence rows
    may be zeros); mixture: [L] (mic channel 0) or [C, L] (channel 0 is used). float32 like the official scorer.
    Within each class the pairing of references and estimates is the one with the highest mean raw SNR; its SNR
    improvements over the mixture count, each surplus estimate or unmatched reference counts 0. Returns the mean
    over all counted values, or None when neither side has a non-silence label (excluded from dataset means).
    """
    mixture = mixture[None] if mixture.dim() == 1 else mixture[None, 0]
    return _score_batch([est_labels], est_waveforms[None], [ref_labels], ref_waveforms[None], mixture, False)[0][0]


def ca_sdri(est_labels: list[str], est_waveforms: torch.Tensor, ref_labels: list[str],
            ref_waveforms: torch.Tensor, mixture: torch.Tensor) -> float | None:
    """CA-SDRi of one mixture (the 2025 official metric), in dB; shapes as capi_sdri.

    Labels are collapsed per class (a duplicated label keeps its last slot); a class on both sides adds its SNR
    improvement, a class on one side only adds 0. None when neither side has a label (the official code returns
    NaN there, which would poison the dataset mean; here the mixture is left out of the mean instead).
    """
    mixture = mixture[None] if mixture.dim() == 1 else mixture[None, 0]
    return _score_batch([est_labels], est_waveforms[None], [ref_labels], ref_waveforms[None], mixture, True)[0][0]


# ---- Label metrics -----------------------------------------------------------------------------------------------
def label_counts(est_labels: list[str], ref_labels: list[str]) -> dict:
    """Multiset label counts of one mixture (2026 LabelMetric): {'acc': bool, 'tp', 'fp', 'fn': int}.

    Silence is ignored; acc is True when both multisets are equal (also when both are empty)."""
    estimated = collections.Counter(label for label in est_labels if label != SILENCE)
    reference = collections.Counter(label for label in ref_labels if label != SILENCE)
    true_positives = sum((estimated & reference).values())
    return {"acc": estimated == reference, "tp": true_positives,
            "fp": sum(estimated.values()) - true_positives, "fn": sum(reference.values()) - true_positives}


def label_accuracies(counts: list[dict]) -> tuple[float, float]:
    """(accuracy_mix, accuracy_src) in percent from label_counts dicts of all mixtures.

    accuracy_mix = share of mixtures with the exact label multiset; accuracy_src = tp / (tp + fp + fn) summed
    over mixtures (NaN when no mixture has any label on either side)."""
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
    """Collects per-mixture scores over batches, on any device; summary() gives the dataset numbers.

    metric: 'capi-sdri' (2026) or 'ca-sdri' (2025). update() takes
        est_labels: B lists of S labels, est_waveforms [B, S, L], ref_labels: B lists of R labels,
        ref_waveforms [B, R, L], mixtures [B, L] (channel 0) or [B, C, L], soundscapes: B names (optional)
    and returns the B per-mixture values (float or None). The per-mixture records stay in self.details; their
    'pairs' are the same-class (reference slot, estimate slot, SNR improvement in dB) pairs the metric matched.
    """

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
        """{'metric': printed name, 'mean': dB or None when no mixture counts, 'accuracy_mix', 'accuracy_src',
        'count': mixtures, 'scored': mixtures in the mean}; for 'ca-sdri' accuracy_mix is the 2025 set accuracy."""
        values = [item["value"] for item in self.details if item["value"] is not None]
        accuracy_mix, accuracy_src = label_accuracies([item["label_counts"] for item in self.details])
        return {"metric": METRIC_NAMES[self.metric], "mean": sum(values) / len(values) if values else None,
                "accuracy_mix": accuracy_mix, "accuracy_src": accuracy_src,
                "count": len(self.details), "scored": len(values)}


# ---- Training losses (all float64, differentiable) ---------------------------------------------------------------
_PERMUTATIONS = {}  # (slots, device) -> every permutation [P, S]; built once per device, never copied again


def _best_permutation(cost: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Exhaustive assignment search. cost [B, S, S] (rows = target slot, columns = prediction slot) ->
    (mean assigned cost of the best permutation [B], permutation [B, S] with permutation[b, i] = prediction slot
    matched to target slot i). Ties go to the first permutation in itertools order. No host-device
    synchronisation: the permutation table is cached per device (a copy from host lists would wait for the GPU)."""
    slots = cost.shape[-1]
    key = (slots, cost.device)
    if key not in _PERMUTATIONS:
        _PERMUTATIONS[key] = torch.tensor(list(itertools.permutations(range(slots))), device=cost.device)
    permutations = _PERMUTATIONS[key]  # (P, S)
    rows = torch.arange(slots, device=cost.device)
    scores = cost[:, rows[None, :], permutations].mean(-1)  # (B, P)
    best = scores.argmin(-1)  # argmin returns the first minimum
    return scores.gather(1, best[:, None])[:, 0], permutations[best]


def pit_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """2026 tagger loss (official label_loss.py): permutation-invariant cross-entropy with probability targets.

    logits [B, S, C] (S = 3 slots, C = 19 with silence), targets [B, S, C] one-hot (float).
    Pair cost M[b, t, p] = -sum_c targets[b, t, c] * log_softmax(logits[b, p])_c; the assignment minimising the
    mean cost is found exhaustively (the same optimum as scipy's linear_sum_assignment). Returns (loss = batch
    mean of the assigned mean cost, float64 scalar; permutation [B, S], prediction slot for each target slot).
    """
    if logits.shape != targets.shape or logits.dim() != 3:
        raise ValueError(f"pit_cross_entropy: logits {tuple(logits.shape)} and targets {tuple(targets.shape)} "
                         "must both be [B, S, C]")
    log_probabilities = F.log_softmax(logits.double(), dim=-1)
    cost = -torch.einsum("btc,bpc->btp", targets.double(), log_probabilities)  # (B, S_target, S_pred)
    best_cost, permutation = _best_permutation(cost)
    return best_cost.mean(), permutation


def class_aware_pit_snr_loss(preds: torch.Tensor, targets: torch.Tensor,
                             queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """2026 separator loss (official class_aware_pit.py): negative SNR under the best permutation among same-class slots.

    preds, targets: [B, S, L] or [B, S, 1, L]; queries: [B, S, 18] one-hot label queries (all-zero = silence) or
    the flat [B, S*18]. Only pairs of slots with identical non-silent queries may be matched (others cost 1e9);
    silent slots cost 0 on the diagonal but still count in the divisor S. Returns (loss = batch mean, float64
    scalar; permutation [B, S], prediction slot for each target slot).
    """
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


def snr_loss(preds: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """2025 ResUNet loss: -mean SNR. preds, targets [B, L] or [B, 1, L] -> float64 scalar."""
    if preds.shape != targets.shape:
        raise ValueError(f"preds {tuple(preds.shape)} and targets {tuple(targets.shape)} must match")
    return -snr64(preds, targets).mean()


def masked_snr_loss(preds: torch.Tensor, targets: torch.Tensor, source_mask: torch.Tensor) -> torch.Tensor:
    """2025 ResUNetK loss: -mean over all B*S slots of SNR * source_mask (masked slots count as 0).

    preds, targets [B, S, L] or [B, S, 1, L]; source_mask [B, S] (1 = real source, 0 = silence). No permutation.
    """
    if preds.shape != targets.shape:
        raise ValueError(f"preds {tuple(preds.shape)} and targets {tuple(targets.shape)} must match")
    value = snr64(preds, targets)  # (B, S) or (B, S, 1)
    mask = source_mask.double().reshape(source_mask.shape + (1,) * (value.dim() - source_mask.dim()))
    return -(value * mask).mean()


def binary_cross_entropy(probabilities: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """2025 tagger loss: mean binary cross-entropy of sigmoid probabilities [B, 18] against multi-hot
    targets [B, 18], float64. Written out (logs floored at -100 like torch) so it also runs inside autocast,
    where F.binary_cross_entropy refuses to."""
    probabilities, targets = probabilities.double(), targets.double()
    floor = math.exp(-100)  # clamping before the log keeps gradients finite at probabilities 0 and 1
    log_positive = torch.log(probabilities.clamp(min=floor))
    log_negative = torch.log((1 - probabilities).clamp(min=floor))
    return -(targets * log_positive + (1 - targets) * log_negative).mean()
