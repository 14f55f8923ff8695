"""Slow, obviously correct reference implementations to compare the engine against."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor


def mean_of(snapshots: Sequence[dict[str, Tensor]]) -> dict[str, Tensor]:
    """Closed form of the equal mean, in float64."""
    return {k: torch.stack([s[k].double() for s in snapshots]).mean(0) for k in snapshots[0]}


def weighted_loop(
    snapshots: Sequence[dict[str, Tensor]], weight: Callable[[int, int], float]
) -> dict[str, Tensor]:
    """avg ← avg + w(n, i)·(θ_i − avg), elementwise in float64, one tensor at a time."""
    avg = {k: v.double().clone() for k, v in snapshots[0].items()}
    for i, s in enumerate(snapshots[1:], start=1):
        w = weight(i, i)
        for k in avg:
            avg[k] = avg[k] * (1.0 - w) + s[k].double() * w
    return avg


def ema_closed_form(snapshots: Sequence[dict[str, Tensor]], decay: float) -> dict[str, Tensor]:
    """EMA started by a copy: θ̂_n = d^(n-1) θ_1 + Σ_{i≥2} (1−d) d^(n−i) θ_i."""
    n = len(snapshots)
    out = {}
    for k in snapshots[0]:
        acc = snapshots[0][k].double() * decay ** (n - 1)
        for i in range(1, n):
            acc = acc + snapshots[i][k].double() * (1 - decay) * decay ** (n - 1 - i)
        out[k] = acc
    return out


def power_profile_weights(steps: Sequence[int], gamma: float) -> list[float]:
    """Weight of each snapshot under the Karras power EMA sampled at ``steps``.

    The continuous profile has density ∝ τ^γ on [0, t]; snapshot i stands for the interval
    (steps[i-1], steps[i]] (the first for [0, steps[0]]), so its weight is the profile's mass there.
    """
    t = steps[-1]
    edges = [0, *steps]
    return [(edges[i + 1] ** (gamma + 1) - edges[i] ** (gamma + 1)) / t ** (gamma + 1)
            for i in range(len(steps))]
