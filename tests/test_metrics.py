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


# ----------------------------------------------------------------------------- issue #17 gap 8, issue #9 item 14


def test_negative_label_raises() -> None:
    probs = torch.full((3, 4), 0.25)
    with pytest.raises(wa.ConfigError, match=r"labels=\[-1\] is invalid: expected integer class indices in \[0, 3\]"):
        metrics.accuracy(probs, torch.tensor([0, -1, 1]))


@pytest.mark.parametrize("labels", [torch.tensor([0.0, 1.0, 1.0]), torch.tensor([True, False, True]),
                                    torch.tensor([0j, 1j, 1j])])
def test_non_integer_labels_raise(labels: torch.Tensor) -> None:
    with pytest.raises(wa.ConfigError, match=rf"labels='{labels.dtype}' is invalid: expected integer class indices"):
        metrics.nll(torch.full((3, 2), 0.5), labels)


def test_default_is_15_width_bins() -> None:
    # a case where 14, 15 and 16 bins all give different ECEs: the default must be the 15-bin one
    g = torch.Generator().manual_seed(3)
    probs = torch.softmax(2 * torch.randn(300, 4, generator=g, dtype=torch.float64), 1)
    labels = torch.randint(0, 4, (300,), generator=g)
    refs = {b: numpy_ece(probs.numpy(), labels.numpy(), b)[0] for b in (14, 15, 16)}
    assert abs(refs[14] - refs[15]) > 1e-4 and abs(refs[16] - refs[15]) > 1e-4
    assert metrics.ece(probs, labels) == pytest.approx(refs[15], abs=1e-12)
    rel = metrics.reliability(probs, labels)
    assert rel.count.numel() == 15 and rel.edges.tolist() == pytest.approx([b / 15 for b in range(16)])


@pytest.mark.parametrize(("probs", "match"), [
    pytest.param([[0.7, 0.2], [0.5, 0.5]], r"probs='row 0 summing to 0\.9' is invalid: expected rows summing to 1",
                 id="sum-below-one"),
    pytest.param([[0.5, 0.5], [0.6, 0.6]], r"row 1 summing to 1\.2", id="sum-above-one"),
    pytest.param([[2.0, -1.0], [0.5, 0.5]], r"rows \[0\] with entries outside \[0, 1\]", id="negative-entry"),
    pytest.param([[math.nan, 0.5], [0.5, 0.5]], r"rows \[0\] with entries outside \[0, 1\] or not finite",
                 id="nan"),
    pytest.param([[3.1, -0.4], [1.2, 0.3]], r"apply softmax to logits first", id="logits"),
])
def test_rows_that_are_not_probabilities_raise(probs: list, match: str) -> None:
    p = torch.tensor(probs, dtype=torch.float64)
    for fn in (metrics.accuracy, metrics.nll, metrics.brier, metrics.ece):
        with pytest.raises(wa.ConfigError, match=match):
            fn(p, torch.tensor([0, 1]))


def test_a_negative_entry_in_a_row_summing_to_one_raises() -> None:
    probs = torch.tensor([[-0.2, 0.6, 0.6], [0.2, 0.4, 0.4]], dtype=torch.float64)
    with pytest.raises(wa.ConfigError, match=r"probs='rows \[0\] with entries outside \[0, 1\]"):
        metrics.brier(probs, torch.tensor([1, 2]))


def test_integer_probs_raise() -> None:
    with pytest.raises(wa.ConfigError, match=r"probs='torch\.int64' is invalid: expected a floating-point tensor"):
        metrics.accuracy(torch.tensor([[1, 0], [0, 1]]), torch.tensor([0, 1]))


def test_row_sum_tolerance() -> None:
    labels = torch.tensor([0, 1])
    # within 1e-3 passes (float32 softmax over many classes), beyond it fails
    ok = torch.tensor([[0.6, 0.4 + 9e-4], [0.3, 0.7 - 9e-4]], dtype=torch.float64)
    assert metrics.accuracy(ok, labels) == 1.0
    bad = torch.tensor([[0.6, 0.4 + 2e-3], [0.3, 0.7]], dtype=torch.float64)
    with pytest.raises(wa.ConfigError, match=r"row 0 summing to 1\.002.* within 0\.001"):
        metrics.accuracy(bad, labels)
    # half precision: the tolerance grows with the dtype's epsilon (bf16 eps = 2^-7: 4·eps ≈ 0.031)
    wide = torch.softmax(torch.randn(64, 1000), 1).bfloat16()
    assert 0.0 <= metrics.nll(wide, torch.zeros(64, dtype=torch.long)) < 100
    with pytest.raises(wa.ConfigError, match=r"within 0\.0312"):
        metrics.accuracy(torch.tensor([[0.5, 0.45], [0.5, 0.5]], dtype=torch.bfloat16), labels)


def _slow_mass_ece(conf: list[float], correct: list[float], num_bins: int) -> float:
    """Independent reference: sort by confidence, cut at floor(i·B/N); ties join the bin of their last member."""
    n = len(conf)
    order = sorted(range(n), key=lambda i: conf[i])
    bins: dict[int, list[int]] = {}
    for i in order:
        last = max(p for p, j in enumerate(order) if conf[j] == conf[i])
        bins.setdefault(last * num_bins // n, []).append(i)
    total = 0.0
    for members in bins.values():
        acc = sum(correct[i] for i in members) / len(members)
        cf = sum(conf[i] for i in members) / len(members)
        total += len(members) * abs(acc - cf)
    return total / n


def test_mass_ece_keeps_ties_together_by_hand() -> None:
    # confidences .6 .6 .6 .9 with 2 mass bins: positions 0,1 | 2,3 would split the .6 run; the run goes
    # whole to the bin of its last position (2 → bin 1): bins {} and {.6, .6, .6, .9}
    probs = torch.tensor([[0.6, 0.4], [0.4, 0.6], [0.6, 0.4], [0.9, 0.1]], dtype=torch.float64)
    for perm in ([0, 1, 2, 3], [1, 0, 3, 2], [3, 2, 1, 0], [2, 3, 0, 1]):
        labels = torch.tensor([0, 0, 1, 0])[perm]
        rel = metrics.reliability(probs[perm], labels, num_bins=2, binning="mass")
        assert rel.count.tolist() == [0.0, 4.0]
        assert rel.edges.tolist() == [0.0, 0.0, 1.0]
        # conf mean (.6·3 + .9)/4 = .675; right: rows 0 and 3 → acc .5
        assert rel.ece == pytest.approx(0.175, abs=1e-12)
    # 4 bins: positions 0,1,2 tie → bin of position 2 = 2; .9 → bin 3
    rel = metrics.reliability(probs, torch.tensor([0, 0, 1, 0]), num_bins=4, binning="mass")
    assert rel.count.tolist() == [0.0, 0.0, 3.0, 1.0]
    assert rel.edges.tolist() == [0.0, 0.0, 0.0, 0.6, 1.0]


@settings(max_examples=60, deadline=None, derandomize=True)
@given(n=st.integers(1, 30), c=st.integers(2, 4), levels=st.integers(1, 4), num_bins=st.integers(1, 8),
       seed=st.integers(0, 10**6))
def test_mass_ece_is_independent_of_row_order_with_ties(n: int, c: int, levels: int, num_bins: int, seed: int) -> None:
    # few distinct confidence levels, so that runs of ties straddle the equal-count cuts
    g = torch.Generator().manual_seed(seed)
    top = torch.tensor([0.5, 0.6, 0.75, 0.9], dtype=torch.float64)[torch.randint(0, levels, (n,), generator=g)]
    probs = torch.empty(n, c, dtype=torch.float64)
    probs[:] = ((1 - top) / (c - 1))[:, None]
    cls = torch.randint(0, c, (n,), generator=g)
    probs[torch.arange(n), cls] = top
    labels = torch.randint(0, c, (n,), generator=g)
    base = metrics.reliability(probs, labels, num_bins=num_bins, binning="mass")
    conf = probs.max(1).values
    correct = (probs.argmax(1) == labels).double()
    assert base.ece == pytest.approx(_slow_mass_ece(conf.tolist(), correct.tolist(), num_bins), abs=1e-12)
    for b in range(num_bins):  # the edges bound their bins exactly
        inside = int(((conf > base.edges[b]) & (conf <= base.edges[b + 1])).sum())
        assert inside == int(base.count[b])
    for _ in range(3):
        perm = torch.randperm(n, generator=g)
        rel = metrics.reliability(probs[perm], labels[perm], num_bins=num_bins, binning="mass")
        # same bins (exactly); the per-bin sums may round differently in another order
        assert torch.equal(rel.count, base.count) and torch.equal(rel.edges, base.edges)
        assert rel.ece == pytest.approx(base.ece, abs=1e-12)
        assert rel.accuracy.tolist() == pytest.approx(base.accuracy.tolist(), abs=1e-12)


def test_errors_list_the_first_five_offenders() -> None:
    probs = torch.full((8, 3), 1 / 3, dtype=torch.float64)
    labels = torch.tensor([3, 4, -1, 5, 6, 7, 0, 8])
    with pytest.raises(wa.ConfigError, match=r"labels=\[3, 4, -1, 5, 6\] is invalid"):
        metrics.accuracy(probs, labels)
    bad = probs.clone()
    bad[[0, 1, 2, 4, 5, 6, 7], 0] = 2.0
    with pytest.raises(wa.ConfigError, match=r"probs='rows \[0, 1, 2, 4, 5\] with entries outside"):
        metrics.accuracy(bad, torch.zeros(8, dtype=torch.long))


def test_rows_listed_are_exactly_those_out_of_range() -> None:
    probs = torch.tensor([[1.2, 0.0, 0.0],     # above 1
                          [-0.2, 0.6, 0.6],    # negative (sums to 1)
                          [math.nan, 0.5, 0.5],
                          [1.0, 0.0, 0.0],     # fine: 0 and 1 are probabilities
                          [0.5, 0.25, 0.25]], dtype=torch.float64)
    with pytest.raises(wa.ConfigError, match=r"probs='rows \[0, 1, 2\] with entries outside \[0, 1\] or not finite'"):
        metrics.nll(probs, torch.zeros(5, dtype=torch.long))
    assert metrics.accuracy(probs[3:], torch.tensor([0, 0])) == 1.0


def test_row_sum_tolerance_is_inclusive() -> None:
    # bfloat16: tol = 4·2^-7 = 0.03125 exactly; a row summing to 1.03125 is accepted, 1.0390625 is not
    labels = torch.tensor([0, 0])
    ok = torch.tensor([[0.5, 0.53125], [0.5, 0.5]], dtype=torch.bfloat16)
    assert metrics.accuracy(ok, labels) == 0.5
    bad = torch.tensor([[0.5, 0.5390625], [0.5, 0.5]], dtype=torch.bfloat16)
    with pytest.raises(wa.ConfigError, match=r"row 0 summing to 1\.039"):
        metrics.accuracy(bad, labels)


def test_one_bin_is_allowed() -> None:
    for binning in ("width", "mass"):
        rel = metrics.reliability(PROBS, LABELS, num_bins=1, binning=binning)
        assert rel.count.tolist() == [4.0]
        assert rel.ece == pytest.approx(abs(0.75 - (0.7 + 0.6 + 0.5 + 0.9) / 4))
