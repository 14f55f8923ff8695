"""Calibration metrics against hand computations and a slow numpy reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import weightavg as wa
from weightavg import metrics

# confidences .7 (right), .6 (wrong: predicts 2), .5 (right), .9 (right)
PROBS = torch.tensor([[0.7, 0.2, 0.1],
                      [0.1, 0.3, 0.6],
                      [0.25, 0.25, 0.5],
                      [0.05, 0.9, 0.05]], dtype=torch.float64)
LABELS = torch.tensor([0, 1, 2, 1])


def test_accuracy_nll_brier_by_hand() -> None:
    assert metrics.accuracy(PROBS, LABELS) == 0.75
    nll = (-math.log(0.7) - math.log(0.3) - math.log(0.5) - math.log(0.9)) / 4  # a mean, not a sum
    assert metrics.nll(PROBS, LABELS) == pytest.approx(nll, rel=1e-12)
    # Σ_c (p_c − 1[c = y])² per row: .14, .86, .375, .015
    assert metrics.brier(PROBS, LABELS) == pytest.approx((0.14 + 0.86 + 0.375 + 0.015) / 4, rel=1e-12)


def test_nll_clamps_zero_probability() -> None:
    probs = torch.tensor([[1.0, 0.0], [0.5, 0.5]], dtype=torch.float64)
    assert metrics.nll(probs, torch.tensor([1, 0])) == pytest.approx(
        (-math.log(1e-12) - math.log(0.5)) / 2)


def test_ece_width_bins_by_hand() -> None:
    # 2 bins (0, .5], (.5, 1]: .5 sits on the edge and goes to the lower bin
    rel = metrics.reliability(PROBS, LABELS, num_bins=2)
    assert rel.count.tolist() == [1.0, 3.0]
    assert rel.edges.tolist() == [0.0, 0.5, 1.0]
    assert rel.confidence.tolist() == pytest.approx([0.5, 2.2 / 3])
    assert rel.accuracy.tolist() == pytest.approx([1.0, 2 / 3])
    assert metrics.ece(PROBS, LABELS, num_bins=2) == pytest.approx((1 * 0.5 + 3 * (2.2 / 3 - 2 / 3)) / 4)
    # 15 bins (the default): every sample alone in its bin, ECE = mean |correct − conf|
    assert metrics.ece(PROBS, LABELS) == pytest.approx((0.3 + 0.6 + 0.5 + 0.1) / 4)
    assert metrics.ece(PROBS, LABELS, num_bins=15) == metrics.ece(PROBS, LABELS)


def test_no_sample_is_dropped_on_edges_or_at_one() -> None:
    probs = torch.tensor([[1.0, 0.0], [0.5, 0.5], [0.75, 0.25], [0.25, 0.75]], dtype=torch.float64)
    labels = torch.tensor([0, 1, 0, 1])
    rel = metrics.reliability(probs, labels, num_bins=4)  # edges 0, .25, .5, .75, 1
    assert rel.count.tolist() == [0.0, 1.0, 2.0, 1.0]  # .5 → (.25, .5]; .75 ×2 → (.5, .75]; 1 → last
    assert rel.count.sum() == 4
    assert rel.confidence[0] == 0 and rel.accuracy[0] == 0  # empty bin reports zeros


def test_ece_mass_bins_by_hand() -> None:
    # sorted confidences .5 .6 | .7 .9
    rel = metrics.reliability(PROBS, LABELS, num_bins=2, binning="mass")
    assert rel.count.tolist() == [2.0, 2.0]
    assert rel.edges.tolist() == [0.0, 0.6, 1.0]  # edge = largest confidence of the lower bin
    assert rel.confidence.tolist() == pytest.approx([0.55, 0.8])
    assert rel.accuracy.tolist() == pytest.approx([0.5, 1.0])
    assert metrics.ece(PROBS, LABELS, num_bins=2, binning="mass") == pytest.approx(
        (2 * 0.05 + 2 * 0.2) / 4)


def numpy_ece(probs: np.ndarray, labels: np.ndarray, num_bins: int) -> tuple[float, np.ndarray]:
    """Slow reference: bin b is (b/B, (b+1)/B], confidence 0 in bin 0."""
    conf = probs.max(1)
    correct = (probs.argmax(1) == labels).astype(float)
    edges = np.linspace(0, 1, num_bins + 1)
    total, counts = 0.0, np.zeros(num_bins)
    for b in range(num_bins):
        inside = (conf > edges[b]) & (conf <= edges[b + 1])
        if b == 0:
            inside |= conf == 0
        counts[b] = inside.sum()
        if inside.any():
            total += inside.sum() * abs(correct[inside].mean() - conf[inside].mean())
    return total / len(conf), counts


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 40), c=st.integers(2, 5), num_bins=st.integers(1, 20), seed=st.integers(0, 10**6))
def test_ece_matches_numpy_reference(n: int, c: int, num_bins: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    probs = torch.softmax(3 * torch.randn(n, c, generator=g, dtype=torch.float64), 1)
    labels = torch.randint(0, c, (n,), generator=g)
    ref, counts = numpy_ece(probs.numpy(), labels.numpy(), num_bins)
    rel = metrics.reliability(probs, labels, num_bins=num_bins)
    assert rel.ece == pytest.approx(ref, abs=1e-12)
    assert rel.count.tolist() == counts.tolist()
    mass = metrics.reliability(probs, labels, num_bins=num_bins, binning="mass")
    assert mass.count.sum() == n
    assert mass.count.max() - mass.count.min() <= 1
    # mass edges bound their bins as width edges do: edges[b] < conf <= edges[b+1]
    conf = probs.max(1).values
    for b in range(num_bins):
        inside = int(((conf > mass.edges[b]) & (conf <= mass.edges[b + 1])).sum())
        assert inside == int(mass.count[b]), b
    assert 0.0 <= mass.ece <= 1.0


def test_float32_input_gives_the_same_numbers() -> None:
    p32 = PROBS.float()
    assert metrics.nll(p32, LABELS) == pytest.approx(metrics.nll(PROBS, LABELS), rel=1e-6)
    assert metrics.ece(p32, LABELS, num_bins=2) == pytest.approx(
        metrics.ece(PROBS, LABELS, num_bins=2), rel=1e-6)


@pytest.mark.parametrize(("kwargs", "match"), [
    pytest.param({"num_bins": 0}, "num_bins=0", id="zero-bins"),
    pytest.param({"num_bins": True}, "num_bins=True", id="bool-bins"),
    pytest.param({"binning": "quantile"}, "binning='quantile'", id="binning"),
])
def test_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(wa.ConfigError, match=match):
        metrics.ece(PROBS, LABELS, **kwargs)


def test_bad_shapes() -> None:
    with pytest.raises(wa.ConfigError, match="probs"):
        metrics.nll(PROBS[0], LABELS)
    with pytest.raises(wa.ConfigError, match="labels"):
        metrics.brier(PROBS, LABELS[:3])
    with pytest.raises(wa.ConfigError, match="at least one row"):
        metrics.accuracy(PROBS[:0], LABELS[:0])


def test_out_of_range_labels_get_a_clear_error() -> None:
    probs = torch.full((3, 4), 0.25)
    with pytest.raises(wa.ConfigError, match=r"labels=\[4\] is invalid: expected integer class indices in \[0, 3\]"):
        metrics.nll(probs, torch.tensor([0, 4, 1]))
