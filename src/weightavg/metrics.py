"""Calibration and accuracy metrics on predicted class probabilities (plain torch, no sklearn).

All functions take ``probs`` of shape (N, C) (rows sum to 1) and integer ``labels`` of shape (N,).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from ._errors import bad_arg

__all__ = ["Reliability", "accuracy", "brier", "ece", "nll", "reliability"]


def _check(probs: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    if not isinstance(probs, Tensor) or probs.dim() != 2:
        raise bad_arg("probs", getattr(probs, "shape", type(probs).__name__), "a (N, C) tensor of probabilities")
    if not isinstance(labels, Tensor) or labels.shape != probs.shape[:1]:
        raise bad_arg("labels", getattr(labels, "shape", type(labels).__name__), f"a ({probs.shape[0]},) tensor")
    if probs.shape[0] == 0:
        raise bad_arg("probs", tuple(probs.shape), "at least one row")
    if labels.dtype.is_floating_point or labels.min() < 0 or labels.max() >= probs.shape[1]:
        bad = labels[(labels < 0) | (labels >= probs.shape[1])][:5].tolist() or str(labels.dtype)
        raise bad_arg("labels", bad, f"integer class indices in [0, {probs.shape[1] - 1}]")
    return probs.detach().double(), labels.detach().long()


def accuracy(probs: Tensor, labels: Tensor) -> float:
    """Fraction of rows whose arg-max is the label."""
    p, y = _check(probs, labels)
    return float((p.argmax(1) == y).double().mean())


def nll(probs: Tensor, labels: Tensor, *, eps: float = 1e-12) -> float:
    """Mean negative log-likelihood of the labels (a mean over rows, not a sum)."""
    p, y = _check(probs, labels)
    return float(-(p.gather(1, y[:, None]).squeeze(1).clamp_min(eps)).log().mean())


def brier(probs: Tensor, labels: Tensor) -> float:
    """Mean over rows of the squared distance between the probabilities and the one-hot label."""
    p, y = _check(probs, labels)
    onehot = torch.zeros_like(p).scatter_(1, y[:, None], 1.0)
    return float(((p - onehot) ** 2).sum(1).mean())


@dataclass(frozen=True)
class Reliability:
    """The numbers behind a reliability diagram (bins with no sample have count 0)."""

    edges: Tensor  # (B+1,) bin edges on confidence
    confidence: Tensor  # (B,) mean confidence per bin
    accuracy: Tensor  # (B,) accuracy per bin
    count: Tensor  # (B,) samples per bin

    @property
    def ece(self) -> float:
        total = float(self.count.sum())
        gap = (self.accuracy - self.confidence).abs() * self.count
        return float(gap.sum() / total)


def reliability(
    probs: Tensor, labels: Tensor, *, num_bins: int = 15, binning: Literal["width", "mass"] = "width"
) -> Reliability:
    """Bin predictions by confidence (max probability).

    ``binning="width"``: equal-width bins on (0, 1], bin ``b`` holds ``edges[b] < conf <= edges[b+1]``
    (a confidence exactly on an edge goes to the lower bin; 0 goes to the first). ``"mass"``: bins
    holding (nearly) equal numbers of samples, split by sorted confidence (sorted position ``i``
    goes to bin ``floor(i·B/N)``; ``edges[b]`` is the largest confidence of bin ``b−1``).
    """
    if isinstance(num_bins, bool) or not isinstance(num_bins, int) or num_bins < 1:
        raise bad_arg("num_bins", num_bins, "a positive int")
    if binning not in ("width", "mass"):
        raise bad_arg("binning", binning, "'width' or 'mass'")
    p, y = _check(probs, labels)
    conf, pred = p.max(1)
    correct = (pred == y).double()
    n = conf.numel()
    if binning == "width":
        edges = torch.linspace(0.0, 1.0, num_bins + 1, dtype=torch.float64)
        idx = torch.bucketize(conf, edges[1:-1], right=False)  # edges[b] < c <= edges[b+1]
    else:
        order = conf.argsort()
        idx = torch.empty(n, dtype=torch.long)
        idx[order] = torch.arange(n) * num_bins // n
        sorted_conf = conf[order]
        # edge b is the largest confidence of bin b-1 (its last sorted position is ceil(b·n/B) - 1),
        # so that bin b holds edges[b] < conf <= edges[b+1] as for width bins (up to ties)
        cuts = [sorted_conf[-(-b * n // num_bins) - 1] for b in range(1, num_bins)]
        edges = torch.tensor([0.0, *[float(c) for c in cuts], 1.0], dtype=torch.float64)
    count = torch.bincount(idx, minlength=num_bins).double()
    sconf = torch.bincount(idx, weights=conf, minlength=num_bins)
    sacc = torch.bincount(idx, weights=correct, minlength=num_bins)
    safe = count.clamp_min(1.0)
    return Reliability(edges, sconf / safe, sacc / safe, count)


def ece(
    probs: Tensor, labels: Tensor, *, num_bins: int = 15, binning: Literal["width", "mass"] = "width"
) -> float:
    """Expected calibration error: Σ_b (n_b/N)·|acc_b − conf_b| over confidence bins."""
    return reliability(probs, labels, num_bins=num_bins, binning=binning).ece
