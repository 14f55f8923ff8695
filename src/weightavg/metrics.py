"""Calibration and accuracy metrics on predicted class probabilities (plain torch, no sklearn).

All functions take ``probs`` of shape (N, C) and integer ``labels`` of shape (N,). Every entry of
``probs`` must be a finite number in [0, 1] and every row must sum to 1 within
``max(1e-3, 4·eps)`` (``eps`` of the tensor's dtype: 1e-3 for float32/float64, about 0.004 for
float16 and 0.03 for bfloat16); logits or unnormalised scores raise :class:`ConfigError`.

Examples:
    >>> import torch
    >>> from weightavg import metrics
    >>> probs = torch.tensor([[0.9, 0.1], [0.3, 0.7], [0.6, 0.4]])
    >>> labels = torch.tensor([0, 1, 1])
    >>> round(metrics.accuracy(probs, labels), 4), round(metrics.ece(probs, labels, num_bins=2), 4)
    (0.6667, 0.0667)
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
    expected = f"integer class indices in [0, {probs.shape[1] - 1}]"
    if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.is_complex():
        raise bad_arg("labels", str(labels.dtype), expected)
    if labels.min() < 0 or labels.max() >= probs.shape[1]:
        raise bad_arg("labels", labels[(labels < 0) | (labels >= probs.shape[1])][:5].tolist(), expected)
    if not probs.dtype.is_floating_point:
        raise bad_arg("probs", str(probs.dtype), "a floating-point tensor of probabilities")
    p = probs.detach().double()
    if not bool(((p >= 0) & (p <= 1)).all()):  # also False for NaN
        bad_rows = (~((p >= 0) & (p <= 1))).any(1).nonzero().flatten()[:5].tolist()
        raise bad_arg("probs", f"rows {bad_rows} with entries outside [0, 1] or not finite",
                      "probabilities in [0, 1] (apply softmax to logits first)")
    tol = max(1e-3, 4 * torch.finfo(probs.dtype).eps)
    err = (p.sum(1) - 1).abs()
    if bool((err > tol).any()):
        i = int(err.argmax())
        raise bad_arg("probs", f"row {i} summing to {float(p[i].sum()):.6g}",
                      f"rows summing to 1 within {tol:.3g} (apply softmax to logits first)")
    return p, labels.detach().long()


def accuracy(probs: Tensor, labels: Tensor) -> float:
    """Fraction of rows whose arg-max is the label.

    Returns:
        The accuracy, a float in [0, 1].

    Raises:
        ConfigError: bad ``probs``/``labels``: not (N, C) and (N,), no rows, labels not integer
            class indices, entries outside [0, 1] or not finite, or rows not summing to 1.

    Examples:
        >>> import torch
        >>> from weightavg.metrics import accuracy
        >>> accuracy(torch.tensor([[0.9, 0.1], [0.4, 0.6]]), torch.tensor([0, 0]))
        0.5
    """
    p, y = _check(probs, labels)
    return float((p.argmax(1) == y).double().mean())


def nll(probs: Tensor, labels: Tensor, *, eps: float = 1e-12) -> float:
    """Mean negative log-likelihood of the labels (a mean over rows, not a sum).

    Probabilities below ``eps`` count as ``eps`` (a wrong, certain prediction costs ``-log(eps)``,
    not infinity).

    Returns:
        The mean NLL in nats, a float ≥ 0.

    Raises:
        ConfigError: bad ``probs``/``labels``: not (N, C) and (N,), no rows, labels not integer
            class indices, entries outside [0, 1] or not finite, or rows not summing to 1.

    Examples:
        >>> import math, torch
        >>> from weightavg.metrics import nll
        >>> math.isclose(nll(torch.tensor([[0.5, 0.5], [0.25, 0.75]]), torch.tensor([0, 1])),
        ...              -(math.log(0.5) + math.log(0.75)) / 2)
        True
    """
    p, y = _check(probs, labels)
    return float(-(p.gather(1, y[:, None]).squeeze(1).clamp_min(eps)).log().mean())


def brier(probs: Tensor, labels: Tensor) -> float:
    """Mean over rows of the squared distance between the probabilities and the one-hot label.

    Returns:
        The Brier score, a float in [0, 2].

    Raises:
        ConfigError: bad ``probs``/``labels``: not (N, C) and (N,), no rows, labels not integer
            class indices, entries outside [0, 1] or not finite, or rows not summing to 1.

    Examples:
        >>> import torch
        >>> from weightavg.metrics import brier
        >>> brier(torch.tensor([[1.0, 0.0], [0.5, 0.5]]), torch.tensor([0, 0]))  # (0 + 0.5) / 2
        0.25
    """
    p, y = _check(probs, labels)
    onehot = torch.zeros_like(p).scatter_(1, y[:, None], 1.0)
    return float(((p - onehot) ** 2).sum(1).mean())


@dataclass(frozen=True)
class Reliability:
    """The numbers behind a reliability diagram (bins with no sample have count 0).

    Built by :func:`reliability`; its ``ece`` property is :func:`ece`.

    Examples:
        >>> import torch
        >>> from weightavg.metrics import reliability
        >>> r = reliability(torch.tensor([[0.9, 0.1], [0.3, 0.7]]), torch.tensor([0, 0]), num_bins=2)
        >>> r.count.tolist(), r.accuracy.tolist()
        ([0.0, 2.0], [0.0, 0.5])
        >>> round(r.ece, 4)  # |0.5 - 0.8|
        0.3
    """

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
    holding (nearly) equal numbers of samples, split by sorted confidence: sorted position ``i``
    goes to bin ``floor(i·B/N)``, except that equal confidences are never split: a run of ties goes
    whole to the bin of its last sorted position (so the result does not depend on the order of
    the rows, and bins may hold unequal counts when confidences tie). ``edges[b]`` is the largest
    confidence in bins ``0..b−1`` (0 if they are empty), so bin ``b`` holds
    ``edges[b] < conf <= edges[b+1]`` exactly, as for width bins.

    Returns:
        A :class:`Reliability` with ``num_bins`` bins.

    Raises:
        ConfigError: bad ``num_bins``/``binning``, or bad ``probs``/``labels`` (see the module).

    Examples:
        >>> import torch
        >>> from weightavg.metrics import reliability
        >>> probs = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8], [0.45, 0.55]])
        >>> r = reliability(probs, torch.tensor([0, 1, 1, 1]), num_bins=2, binning="mass")
        >>> r.count.tolist()
        [2.0, 2.0]
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
        sorted_conf = conf.sort().values
        # the last sorted position holding each sample's confidence: a function of the value only,
        # so ties share a bin and the binning is independent of the row order
        last = torch.searchsorted(sorted_conf, conf, right=True) - 1
        idx = last * num_bins // n
        # edges[b] = largest confidence in bins < b = the below[b]-th smallest (0 when there is none)
        below = torch.bincount(idx, minlength=num_bins).cumsum(0)[:-1]  # samples in bins 0..b-1
        kth_smallest = torch.cat([torch.zeros(1, dtype=torch.float64), sorted_conf])  # [0] = none
        edges = torch.cat([torch.zeros(1, dtype=torch.float64), kth_smallest[below],
                           torch.ones(1, dtype=torch.float64)])
    count = torch.bincount(idx, minlength=num_bins).double()
    sconf = torch.bincount(idx, weights=conf, minlength=num_bins)
    sacc = torch.bincount(idx, weights=correct, minlength=num_bins)
    safe = count.clamp_min(1.0)
    return Reliability(edges, sconf / safe, sacc / safe, count)


def ece(
    probs: Tensor, labels: Tensor, *, num_bins: int = 15, binning: Literal["width", "mass"] = "width"
) -> float:
    """Expected calibration error: Σ_b (n_b/N)·|acc_b − conf_b| over confidence bins.

    Bins as in :func:`reliability` (15 equal-width bins by default).

    Returns:
        The ECE, a float in [0, 1] (multiply by 100 for percent).

    Raises:
        ConfigError: bad ``num_bins``/``binning``, or bad ``probs``/``labels`` (see the module).

    Examples:
        >>> import torch
        >>> from weightavg.metrics import ece
        >>> round(ece(torch.tensor([[0.8, 0.2], [0.8, 0.2]]), torch.tensor([0, 0])), 4)  # |1 - 0.8|
        0.2
    """
    return reliability(probs, labels, num_bins=num_bins, binning=binning).ece
