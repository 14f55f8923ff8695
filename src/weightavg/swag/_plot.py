"""Reliability diagram (matplotlib is imported only when a plot is asked for)."""

from __future__ import annotations

from typing import Any, Literal

from torch import Tensor

from .._errors import bad_arg
from ..metrics import Reliability, reliability

__all__ = ["plot_reliability"]


def plot_reliability(
    probs: Tensor | Reliability,
    labels: Tensor | None = None,
    *,
    num_bins: int = 15,
    binning: Literal["width", "mass"] = "width",
    ax: Any = None,
    label: str | None = None,
) -> Any:
    """Draw a reliability diagram: accuracy against mean confidence per bin, with the diagonal.

    Args:
        probs: (N, C) probabilities (with ``labels``), or a :class:`weightavg.metrics.Reliability`.
        labels: (N,) integer labels when ``probs`` is a tensor.
        num_bins, binning: as in :func:`weightavg.metrics.reliability`.
        ax: a matplotlib Axes to draw on (default: a new figure's).
        label: legend label of the curve (the ECE is appended).

    Returns:
        The matplotlib Axes.

    Raises:
        ImportError: matplotlib is not installed (``pip install weightavg[plot]``).
        ConfigError: ``probs`` is a tensor and ``labels`` is missing, or what
            :func:`weightavg.metrics.reliability` raises for bad probabilities.

    Examples:
        >>> import matplotlib
        >>> matplotlib.use("Agg")
        >>> import torch
        >>> from weightavg.swag import plot_reliability
        >>> probs = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]])
        >>> ax = plot_reliability(probs, torch.tensor([0, 1, 1]), num_bins=5, label="SWAG")
        >>> ax.get_legend().get_texts()[0].get_text()
        'SWAG (ECE 0.300)'
    """
    try:
        import matplotlib.pyplot as plt
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("plot_reliability needs matplotlib: pip install 'weightavg[plot]'") from err
    if isinstance(probs, Reliability):
        rel = probs
    else:
        if labels is None:
            raise bad_arg("labels", None, "the (N,) labels when probs is a tensor")
        rel = reliability(probs, labels, num_bins=num_bins, binning=binning)
    if ax is None:
        _, ax = plt.subplots(figsize=(4, 4))
    keep = rel.count > 0
    conf = rel.confidence[keep].numpy()
    acc = rel.accuracy[keep].numpy()
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1)
    text = f"ECE {rel.ece:.3f}" if label is None else f"{label} (ECE {rel.ece:.3f})"
    ax.plot(conf, acc, marker="o", label=text)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.legend(loc="upper left")
    return ax
