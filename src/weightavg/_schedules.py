"""Schedules: ``step -> value`` callables (learning-rate phases for SWA, cyclic schedules).

A schedule takes the count explicitly; nothing here holds tensors.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from ._errors import bad_arg

__all__ = ["ANNEAL_STRATEGIES", "anneal_factor"]


def _cos(t: float) -> float:
    return (1.0 - math.cos(math.pi * t)) / 2.0


def _linear(t: float) -> float:
    return t


ANNEAL_STRATEGIES: dict[str, Callable[[float], float]] = {"cos": _cos, "linear": _linear}


def anneal_factor(strategy: str, t: float) -> float:
    """Progress of an anneal at fraction ``t`` in [0, 1] (0 = start value, 1 = target value).

    ``"cos"``: ``(1 − cos(π t)) / 2``; ``"linear"``: ``t``. ``t`` is clamped to [0, 1].
    """
    fn = ANNEAL_STRATEGIES.get(strategy)
    if fn is None:
        raise bad_arg("anneal_strategy", strategy, "'cos' or 'linear'")
    return fn(min(1.0, max(0.0, t)))
