"""Metric and loss values against hand computations (numpy, float64) and torchmetrics."""
import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import metrics
from devset import SILENCE

FLOAT32_EPS = float(np.finfo(np.float32).eps)


def snr_numpy(preds, target, eps=FLOAT32_EPS):
    """Independent SNR in float64 (the torchmetrics formula)."""
    preds, target = np.asarray(preds, np.float64), np.asarray(target, np.float64)
    return 10 * np.log10((np.sum(target**2) + eps) / (np.sum((target - preds) ** 2) + eps))


@pytest.fixture
def scene():
    """3 random references, mixture = sum + noise, estimates = references + noise, float32."""
    rng = np.random.default_rng(0)
    length = 4000
    references = rng.standard_normal((3, length)).astype(np.float32)
    estimates = (references + 0.3 * rng.standard_normal((3, length))).astype(np.float32)
    mixture = (references.sum(0) + 0.1 * rng.standard_normal(length)).astype(np.float32)
    improvement = [snr_numpy(estimates[i], references[i]) - snr_numpy(mixture, references[i]) for i in range(3)]
    return torch.from_numpy(references), torch.from_numpy(estimates), torch.from_numpy(mixture), improvement


# ---------------------------------------------------------------------------------------------------------- snr
def test_snr_matches_torchmetrics_float32_and_mixed():
    from torchmetrics.functional.audio import signal_noise_ratio

    generator = torch.Generator().manual_seed(0)
    target = torch.randn(2, 3, 8000, generator=generator)
    preds = target + 0.5 * torch.randn(2, 3, 8000, generator=generator)
    for p, t in [(preds, target), (preds, target.double()), (preds.double(), target)]:
        ours, reference = metrics.snr(p, t), signal_noise_ratio(p, t)
        assert ours.shape == (2, 3) and ours.dtype == reference.dtype
        assert (ours.double() - reference.double()).abs().max() <= 1e-6


def test_snr_hand_values():
    target = torch.tensor([3.0, -0.5, 2.0, 7.0])
    preds = torch.tensor([2.5, 0.0, 2.0, 8.0])
    assert metrics.snr(preds, target).item() == pytest.approx(snr_numpy(preds, target), abs=1e-5)
    assert metrics.snr(preds, target).item() == pytest.approx(16.1805, abs=1e-4)  # torchmetrics' docstring value
    assert metrics.snr(torch.zeros(5), torch.zeros(5)).item() == 0.0  # zero / zero
    with pytest.raises(ValueError, match="same shape"):
        metrics.snr(torch.zeros(5), torch.zeros(4))


# ---------------------------------------------------------------------------------------------------------- CAPI
def test_capi_relations(scene):
    references, estimates, mixture, improvement = scene
    silent = torch.zeros_like(references[0])
    ref_labels = ["Speech", "Dishes", SILENCE]
    ref = torch.stack([references[0], references[1], silent])
    perfect = metrics.capi_sdri(["Speech", "Dishes", SILENCE], torch.stack([estimates[0], estimates[1], silent]),
                                ref_labels, ref, mixture)
    assert perfect == pytest.approx((improvement[0] + improvement[1]) / 2, abs=1e-4)
    false_positive = metrics.capi_sdri(["Speech", "Dishes", "Pour"], estimates, ref_labels, ref, mixture)
    assert false_positive == pytest.approx(2 / 3 * perfect, abs=1e-4)
    missed = metrics.capi_sdri(["Speech", SILENCE, SILENCE], torch.stack([estimates[0], silent, silent]),
                               ref_labels, ref, mixture)
    assert missed == pytest.approx(improvement[0] / 2, abs=1e-4)
    # The second Speech estimate (a copy of the Dishes estimate) is a surplus estimate: it scores 0.
    duplicated = metrics.capi_sdri(["Speech", "Speech", SILENCE], torch.stack([estimates[0], estimates[1], silent]),
                                   ref_labels, ref, mixture)
    assert duplicated == pytest.approx(improvement[0] / 3, abs=1e-4)
    # Silence on both sides -> None; an empty prediction for a non-empty mixture -> 0.
    all_silent = torch.zeros(3, references.shape[1])
    assert metrics.capi_sdri([SILENCE] * 3, all_silent, [SILENCE] * 3, all_silent, mixture) is None
    assert metrics.capi_sdri([SILENCE] * 3, all_silent, ref_labels, ref, mixture) == 0.0
    # A mixture given as [C, L] is measured on channel 0.
    multichannel = torch.stack([mixture, torch.zeros_like(mixture)])
    assert metrics.capi_sdri(["Speech", "Dishes", "Pour"], estimates, ref_labels, ref, multichannel) == false_positive


def test_capi_duplicated_class_swapped_estimates(scene):
    references, estimates, mixture, improvement = scene
    labels = ["Speech", "Speech", "Dishes"]
    in_order = metrics.capi_sdri(labels, estimates, labels, references, mixture)
    swapped = metrics.capi_sdri(labels, estimates[[1, 0, 2]], labels, references, mixture)
    assert in_order == pytest.approx(sum(improvement) / 3, abs=1e-4)
    assert swapped == pytest.approx(in_order, abs=1e-6)


def test_capi_pairing_chosen_by_raw_snr_not_improvement():
    # Two references of one class, one estimate. Reference 0 is loud in the mixture (small improvement possible),
    # reference 1 quiet (large improvement). The estimate is closer to reference 0 in raw SNR, so reference 0 is
    # paired although pairing reference 1 would give the larger improvement.
    rng = np.random.default_rng(1)
    length = 2000
    loud = rng.standard_normal(length)
    quiet = 0.05 * rng.standard_normal(length)
    mixture = loud + quiet
    estimate = loud + 0.3 * rng.standard_normal(length) + quiet
    raw = [snr_numpy(estimate, loud), snr_numpy(estimate, quiet)]
    gain = [raw[0] - snr_numpy(mixture, loud), raw[1] - snr_numpy(mixture, quiet)]
    assert raw[0] > raw[1] and gain[1] > gain[0]  # the case really separates the two rules
    value = metrics.capi_sdri(["Blender"], torch.tensor(estimate[None], dtype=torch.float32), ["Blender", "Blender"],
                              torch.tensor(np.stack([loud, quiet]), dtype=torch.float32),
                              torch.tensor(mixture, dtype=torch.float32))
    assert value == pytest.approx(gain[0] / 2, abs=1e-4)


def test_capi_hand_computed_tiny():
    reference = torch.tensor([[3.0, -0.5, 2.0, 7.0], [0.0, 0.0, 0.0, 0.0]])
    estimate = torch.tensor([[2.5, 0.0, 2.0, 8.0], [1.0, 1.0, 1.0, 1.0]])
    mixture = torch.tensor([4.0, 0.5, 1.0, 6.0])
    expected = (snr_numpy([2.5, 0.0, 2.0, 8.0], [3, -0.5, 2, 7]) - snr_numpy([4, 0.5, 1, 6], [3, -0.5, 2, 7])) / 2
    value = metrics.capi_sdri(["Cough", "Typing"], estimate, ["Cough", SILENCE], reference, mixture)
    assert value == pytest.approx(expected, abs=1e-5)


def test_unknown_label_and_bad_shapes_are_errors(scene):
    references, estimates, mixture, _ = scene
    with pytest.raises(ValueError, match="Speach"):
        metrics.capi_sdri(["Speach", SILENCE, SILENCE], estimates, ["Speech"] * 3, references, mixture)
    with pytest.raises(ValueError, match="labels"):
        metrics.capi_sdri(["Speech"], estimates, ["Speech"] * 3, references, mixture)


# ---------------------------------------------------------------------------------------------------------- 2025
def test_ca_sdri_collapses_duplicates(scene):
    references, estimates, mixture, improvement = scene
    ref = torch.stack([references[0], references[1], torch.zeros_like(mixture)])
    ref_labels = ["Speech", "Dishes", SILENCE]
    # Two Speech estimates: the 2025 dict keeps the last one (estimate 1, which is poor for reference 0).
    est = torch.stack([estimates[0], estimates[1], torch.zeros_like(mixture)])
    est_labels = ["Speech", "Speech", SILENCE]
    last_gain = snr_numpy(estimates[1], references[0]) - snr_numpy(mixture, references[0])
    assert metrics.ca_sdri(est_labels, est, ref_labels, ref, mixture) == pytest.approx(last_gain / 2, abs=1e-4)
    assert metrics.capi_sdri(est_labels, est, ref_labels, ref, mixture) == pytest.approx(improvement[0] / 3, abs=1e-4)
    # Duplicated references collapse too: (Speech, Speech) counts once, against the last reference.
    value = metrics.ca_sdri(["Speech", SILENCE, SILENCE], est, ["Speech", "Speech", SILENCE],
                            torch.stack([references[1], references[0], ref[2]]), mixture)
    assert value == pytest.approx(improvement[0], abs=1e-4)
    silent = torch.zeros(3, mixture.shape[0])
    assert metrics.ca_sdri([SILENCE] * 3, silent, [SILENCE] * 3, silent, mixture) is None
    assert metrics.label_set_match(["Speech", "Speech", SILENCE], ["Speech", SILENCE, SILENCE])
    assert not metrics.label_set_match(["Speech", SILENCE, SILENCE], ["Dishes", SILENCE, SILENCE])


# ---------------------------------------------------------------------------------------------------------- labels
def test_label_metrics_example():
    pairs = [(["Speech", "Speech", SILENCE], ["Speech", "Dishes", SILENCE]),
             ([SILENCE] * 3, [SILENCE] * 3),
             (["Dishes", "Pour", SILENCE], ["Dishes", "Pour", SILENCE])]
    counts = [metrics.label_counts(est, ref) for est, ref in pairs]
    assert [(c["tp"], c["fp"], c["fn"]) for c in counts] == [(1, 1, 1), (0, 0, 0), (2, 0, 0)]
    assert [c["acc"] for c in counts] == [False, True, True]
    accuracy_mix, accuracy_src = metrics.label_accuracies(counts)
    assert round(accuracy_mix, 3) == 66.667 and accuracy_src == pytest.approx(60.0)


# ---------------------------------------------------------------------------------------------------------- batched
def test_accumulator_matches_single_calls(scene):
    references, estimates, mixture, _ = scene
    est_labels = [["Speech", "Dishes", "Pour"], ["Speech", "Speech", SILENCE], [SILENCE] * 3]
    ref_labels = [["Speech", "Dishes", "Pour"], ["Speech", "Dishes", SILENCE], [SILENCE] * 3]
    est = torch.stack([estimates, estimates[[1, 0, 2]], torch.zeros_like(estimates)])
    ref = torch.stack([references, references, torch.zeros_like(references)])
    mixtures = torch.stack([mixture] * 3)[:, None].expand(3, 4, -1)  # (B, C, L); channel 0 is used
    for metric, function in [("capi-sdri", metrics.capi_sdri), ("ca-sdri", metrics.ca_sdri)]:
        accumulator = metrics.MetricAccumulator(metric)
        values = accumulator.update(est_labels, est, ref_labels, ref, mixtures, ["a", "b", "c"])
        expected = [function(est_labels[b], est[b], ref_labels[b], ref[b], mixture) for b in range(3)]
        assert values[2] is None and values[:2] == pytest.approx(expected[:2], abs=1e-6)
        summary = accumulator.summary()
        assert summary["mean"] == pytest.approx(sum(values[:2]) / 2) and summary["scored"] == 2
        assert summary["count"] == 3 and [item["soundscape"] for item in accumulator.details] == ["a", "b", "c"]
    # Half precision (autocast outputs) is scored in float32.
    half = metrics.MetricAccumulator().update(est_labels, est.bfloat16(), ref_labels, ref, mixtures)
    assert half[0] == pytest.approx(expected[0], abs=0.1)


# ---------------------------------------------------------------------------------------------------------- losses
def test_class_aware_pit_batch_example():
    rng = np.random.default_rng(2)
    length = 1000
    targets = rng.standard_normal((2, 3, 1, length))
    targets[0, 2] = 0.0  # sample 0: (A, A, silence)
    preds = (targets + 0.4 * rng.standard_normal((2, 3, 1, length))).astype(np.float32)
    preds[0, [0, 1]] = preds[0, [1, 0]]  # the two A predictions swapped
    queries = np.zeros((2, 3, 18))
    queries[0, 0, 4] = queries[0, 1, 4] = 1.0
    queries[1, 0, 0] = queries[1, 1, 7] = queries[1, 2, 15] = 1.0
    preds_tensor = torch.tensor(preds, requires_grad=True)
    loss, permutation = metrics.class_aware_pit_snr_loss(preds_tensor, torch.tensor(targets),
                                                         torch.tensor(queries).reshape(2, 54))
    assert permutation.tolist() == [[1, 0, 2], [0, 1, 2]]
    sample0 = -(snr_numpy(preds[0, 1, 0], targets[0, 0, 0]) + snr_numpy(preds[0, 0, 0], targets[0, 1, 0]) + 0) / 3
    sample1 = -np.mean([snr_numpy(preds[1, i, 0], targets[1, i, 0]) for i in range(3)])
    assert loss.dtype == torch.float64
    assert abs(loss.item() - (sample0 + sample1) / 2) <= 1e-12
    loss.backward()
    assert torch.isfinite(preds_tensor.grad).all() and preds_tensor.grad[1].abs().sum() > 0
    assert preds_tensor.grad[0, 2].abs().sum() == 0  # the silent slot does not take part
    # [B, S, L] input without the channel dim gives the same value.
    squeezed, _ = metrics.class_aware_pit_snr_loss(torch.tensor(preds[:, :, 0]), torch.tensor(targets[:, :, 0]),
                                                   torch.tensor(queries))
    assert abs(squeezed.item() - loss.item()) <= 1e-12


def test_pit_cross_entropy_non_identity_permutation():
    targets = torch.zeros(2, 3, 19)
    targets[0, 0, 3] = targets[0, 1, 7] = targets[0, 2, 18] = 1.0
    targets[1, 0, 5] = targets[1, 1, 18] = targets[1, 2, 18] = 1.0
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 19, generator=generator)
    logits[0, 2, 3] += 6.0  # prediction slot 2 says class 3 (target 0), slot 0 says 7 (target 1), slot 1 silence
    logits[0, 0, 7] += 6.0
    logits[0, 1, 18] += 6.0
    logits[1, 1, 5] += 6.0
    logits[1, 0, 18] += 6.0
    logits[1, 2, 18] += 6.0
    logits.requires_grad_(True)
    loss, permutation = metrics.pit_cross_entropy(logits, targets)
    log_probabilities = torch.log_softmax(logits.detach().double(), -1).numpy()
    classes = targets.argmax(-1).numpy()
    expected = []
    for b in range(2):
        costs = [np.mean([-log_probabilities[b, perm[t], classes[b, t]] for t in range(3)])
                 for perm in itertools.permutations(range(3))]
        expected.append(min(costs))
    assert permutation[0].tolist() == [2, 0, 1] and permutation[1, 0].item() == 1
    assert loss.item() == pytest.approx(np.mean(expected), abs=1e-6)
    # Same optimum as scipy's assignment, which the official torchmetrics PIT uses.
    from scipy.optimize import linear_sum_assignment
    cost = -np.einsum("btc,bpc->btp", targets.numpy(), log_probabilities)
    rows, columns = linear_sum_assignment(cost[0])
    assert columns.tolist() == permutation[0].tolist()
    loss.backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


def test_masked_snr_loss_ignores_silent_slot():
    rng = np.random.default_rng(3)
    targets = rng.standard_normal((1, 3, 1, 500))
    targets[0, 2] = 0.0
    preds = targets + 0.2 * rng.standard_normal((1, 3, 1, 500))  # nonzero prediction in the silent slot
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    preds_tensor = torch.tensor(preds, dtype=torch.float32, requires_grad=True)
    loss = metrics.masked_snr_loss(preds_tensor, torch.tensor(targets), mask)
    expected = -(snr_numpy(preds[0, 0, 0].astype(np.float32), targets[0, 0, 0])
                 + snr_numpy(preds[0, 1, 0].astype(np.float32), targets[0, 1, 0])) / 3
    assert loss.item() == pytest.approx(expected, abs=1e-9)
    loss.backward()
    assert preds_tensor.grad[0, 2].abs().sum() == 0 and preds_tensor.grad[0, 0].abs().sum() > 0


def test_snr_loss_and_binary_cross_entropy():
    rng = np.random.default_rng(4)
    targets = rng.standard_normal((2, 1, 300))
    preds = torch.tensor(targets + 0.3 * rng.standard_normal((2, 1, 300)), dtype=torch.float32, requires_grad=True)
    loss = -metrics.snr64(preds, torch.tensor(targets)).mean()  # the 2025 ResUNet loss
    expected = -np.mean([snr_numpy(preds[i, 0].detach().numpy(), targets[i, 0]) for i in range(2)])
    assert loss.dtype == torch.float64 and loss.item() == pytest.approx(expected, abs=1e-9)
    loss.backward()
    assert preds.grad.abs().sum() > 0
    probabilities = torch.tensor([[0.2, 0.9, 1.0], [0.0, 0.5, 0.7]], requires_grad=True)
    multihot = torch.tensor([[0.0, 1.0, 0.0], [0.0, 1.0, 1.0]])
    ours = metrics.binary_cross_entropy(probabilities, multihot)
    reference = F.binary_cross_entropy(probabilities.double(), multihot.double())
    assert ours.item() == pytest.approx(reference.item(), rel=1e-12)  # includes the log clamp at -100
    ours.backward()
    assert torch.isfinite(probabilities.grad).all() and not math.isnan(ours.item())
