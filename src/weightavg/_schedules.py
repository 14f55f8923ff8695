"""Schedules: ``step -> value`` callables (learning-rate phases for SWA, cyclic schedules).

A schedule takes the count explicitly; nothing here holds tensors. The two learning-rate phases of
SWA are given twice: as closed-form functions of the phase index (:func:`swa_anneal_lr`,
:func:`swa_cyclic_lr`, used by the policies in ``weightavg._policy``) and as ordinary
``torch.optim.lr_scheduler.LRScheduler`` classes (:class:`SWAAnnealLR`, :class:`SWACyclicLR`) for
hand-written loops. Both leave the learning rate alone until their phase starts, so they compose
with the user's own scheduler instead of replacing it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

from torch import Tensor
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from ._errors import bad_arg

__all__ = [
    "ANNEAL_STRATEGIES",
    "FastSWALR",
    "SWAAnnealLR",
    "SWACyclicLR",
    "anneal_factor",
    "fast_swa_lr",
    "fast_swa_update",
    "group_lr",
    "per_group",
    "swa_anneal_lr",
    "swa_cyclic_lr",
]


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


def swa_anneal_lr(start_lr: float, swa_lr: float, index: int, anneal_steps: int,
                  strategy: str = "cos") -> float:
    """Learning rate of the ``index``-th step (0-based) of SWA's anneal-then-constant phase.

    .. note::
        ``lr = start_lr + (swa_lr − start_lr) · f(min(1, index / anneal_steps))`` with ``f`` the
        anneal function (:func:`anneal_factor`); ``anneal_steps = 0`` jumps to ``swa_lr`` at once.
        This is the learning rate of ``torch.optim.swa_utils.SWALR`` after ``index`` steps when
        nothing else changes the learning rate.

    Examples:
        >>> swa_anneal_lr(0.1, 0.01, 5, 10, "linear")
        0.055
    """
    t = 1.0 if anneal_steps <= 0 else index / anneal_steps
    return start_lr + (swa_lr - start_lr) * anneal_factor(strategy, t)


def swa_cyclic_lr(max_lr: float, min_lr: float, index: int, cycle_steps: int,
                  strategy: str = "linear") -> float:
    """Learning rate of the ``index``-th step (0-based) of a cyclic SWA phase (Izmailov et al.).

    .. note::
        With cycle length ``c`` and ``t = ((index mod c) + 1) / c``,
        ``lr = max_lr + (min_lr − max_lr) · f(t)``: each cycle decreases from near ``max_lr`` to
        ``min_lr`` at its last step, where the weights are averaged (fast-SWA averages several
        times per cycle).

    Examples:
        >>> [round(swa_cyclic_lr(0.1, 0.0, i, 4), 3) for i in range(5)]
        [0.075, 0.05, 0.025, 0.0, 0.075]
    """
    if cycle_steps < 1:
        raise bad_arg("cycle_steps", cycle_steps, "a positive int")
    t = ((index % cycle_steps) + 1) / cycle_steps
    return max_lr + (min_lr - max_lr) * anneal_factor(strategy, t)


def _int(name: str, value: object, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise bad_arg(name, value, f"an int ≥ {low}")
    return value


def _fast_swa_args(cycle_start: int, cycle_steps: int, anneal_steps: int | None) -> int:
    _int("cycle_steps", cycle_steps, 1)
    _int("cycle_start", cycle_start, cycle_steps)
    length = cycle_start if anneal_steps is None else _int("anneal_steps", anneal_steps, cycle_start)
    return length


def fast_swa_lr(max_lr: float, index: int, *, cycle_start: int, cycle_steps: int,
                anneal_steps: int | None = None, min_lr: float = 0.0) -> float:
    """Learning rate of step ``index`` (0-based) of fast-SWA's schedule (Athiwaratkun et al. 2019).

    .. note::
        A cosine from the top of the schedule, then cycles that repeat its last ``c`` steps:
        ``lr = min_lr + (max_lr − min_lr) · (1 + cos(π τ / L)) / 2`` with ``τ = index`` before
        ``ℓ0 = cycle_start`` and ``τ = ℓ0 − c + ((index − ℓ0) mod c)`` from ``ℓ0`` on (``c =
        cycle_steps``, ``L = anneal_steps ≥ ℓ0``, default ``ℓ0``: the reference runs use a longer
        cosine so the cycles never reach zero). The averages are taken at the points of
        :func:`fast_swa_update`. This is not the original SWA paper's cycle
        (:func:`swa_cyclic_lr`, :class:`SWACyclicLR`: linear from ``max_lr`` to ``min_lr`` each cycle).

    Examples:
        >>> [round(fast_swa_lr(1.0, i, cycle_start=4, cycle_steps=2), 3) for i in range(8)]
        [1.0, 0.854, 0.5, 0.146, 0.5, 0.146, 0.5, 0.146]
    """
    length = _fast_swa_args(cycle_start, cycle_steps, anneal_steps)
    _int("index", index, 0)
    tau = index if index < cycle_start else cycle_start - cycle_steps + (index - cycle_start) % cycle_steps
    return min_lr + (max_lr - min_lr) * (1.0 + math.cos(math.pi * tau / length)) / 2.0


def fast_swa_update(index: int, *, cycle_start: int, cycle_steps: int, interval: int) -> bool:
    """Whether fast-SWA averages the weights after step ``index`` (0-based).

    .. note::
        Every ``interval`` steps from step ``ℓ0 − c`` on (``ℓ0 = cycle_start``, ``c =
        cycle_steps``): after the steps with ``index ≥ ℓ0 − c`` and
        ``(index − ℓ0 + c) mod interval = interval − 1``. ``interval = c`` averages once per
        cycle, at its lowest rate (SWA); ``interval < c`` several times per cycle (fast-SWA). The
        same points as ``weightavg.SWA(swa_start=ℓ0 − c, update_interval=interval)`` in steps.

    Examples:
        >>> [i for i in range(12) if fast_swa_update(i, cycle_start=6, cycle_steps=4, interval=2)]
        [3, 5, 7, 9, 11]
    """
    _fast_swa_args(cycle_start, cycle_steps, None)
    _int("interval", interval, 1)
    first = cycle_start - cycle_steps
    return index >= first and (index - first) % interval == interval - 1


def per_group(name: str, value: float | Sequence[float], n_groups: int) -> list[float]:
    """A float, or a sequence with one positive float per param group, as a list of ``n_groups``."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if not (value >= 0 and math.isfinite(value)):
            raise bad_arg(name, value, "a non-negative finite float")
        return [float(value)] * n_groups
    if isinstance(value, Sequence) and not isinstance(value, str):
        vals = list(value)
        if len(vals) != n_groups:
            raise bad_arg(name, value, f"a float or a list of {n_groups} floats "
                                       f"(one per param group), not {len(vals)}")
        return [per_group(f"{name}[{i}]", v, 1)[0] for i, v in enumerate(vals)]
    raise bad_arg(name, value, "a float or a list of floats (one per param group)")


def group_lr(group: dict[str, Any]) -> float:
    """A param group's learning rate as a float (``lr`` may be a tensor, e.g. capturable Adam)."""
    lr = group["lr"]
    return float(lr.item()) if isinstance(lr, Tensor) else float(lr)


class _PhaseLR(LRScheduler):
    """Leaves every group's lr alone for ``start`` steps, then follows ``phase_lr(i, group)``."""

    def __init__(self, optimizer: Optimizer, *, start: int, last_epoch: int) -> None:
        if isinstance(start, bool) or not isinstance(start, int) or start < 0:
            raise bad_arg("start", start, "a non-negative int (scheduler steps before the phase)")
        self.start = start
        self.start_lrs: list[float] | None = None  # each group's lr when the phase began
        super().__init__(optimizer, last_epoch)

    def _phase_lr(self, index: int, group_index: int) -> float:
        raise NotImplementedError

    def get_lr(self) -> list[float]:  # type: ignore[override]
        i = self.last_epoch - self.start
        groups = self.optimizer.param_groups
        if i < 0:
            return [group_lr(g) for g in groups]
        if self.start_lrs is None:
            self.start_lrs = [group_lr(g) for g in groups]
        return [self._phase_lr(i, k) for k in range(len(groups))]


class SWAAnnealLR(_PhaseLR):
    """SWA's learning-rate phase as an ordinary scheduler: anneal to ``swa_lr``, then hold it.

    Until ``start`` calls of :meth:`step` the learning rate is left as it is (your own scheduler
    keeps control); from then on each group's learning rate goes from its value at that moment to
    ``swa_lr`` in ``anneal_steps`` steps and stays there. Step it once per epoch or once per
    optimizer step, *after* your own scheduler (the later write wins).

    .. note::
        At phase index ``i = step_count − start``:
        ``lr = lr₀ + (swa_lr − lr₀) · f(min(1, i / anneal_steps))``, ``lr₀`` the group's learning
        rate at ``i = 0`` and ``f`` the anneal function. Started at ``i = 0`` with nothing else
        changing the learning rate, this is ``torch.optim.swa_utils.SWALR``.

    Args:
        optimizer: the optimizer.
        swa_lr: the constant learning rate of the SWA phase; a float or one per param group.
        anneal_steps: length of the anneal in scheduler steps (0 jumps to ``swa_lr``).
        anneal_strategy: ``"cos"`` or ``"linear"``.
        start: scheduler steps before the phase begins.
        last_epoch: as in every torch scheduler (-1 to start fresh).

    Raises:
        ConfigError: a bad ``swa_lr`` (per group), ``anneal_steps``, ``anneal_strategy`` or ``start``.

    Examples:
        >>> import torch
        >>> opt = torch.optim.SGD(torch.nn.Linear(2, 1).parameters(), lr=0.1)
        >>> sched = SWAAnnealLR(opt, swa_lr=0.01, anneal_steps=2, anneal_strategy="linear", start=1)
        >>> lrs = []
        >>> for _ in range(4):
        ...     opt.step(); sched.step(); lrs.append(round(opt.param_groups[0]["lr"], 4))
        >>> lrs
        [0.1, 0.055, 0.01, 0.01]
    """

    def __init__(
        self,
        optimizer: Optimizer,
        swa_lr: float | Sequence[float],
        *,
        anneal_steps: int = 10,
        anneal_strategy: str = "cos",
        start: int = 0,
        last_epoch: int = -1,
    ) -> None:
        self.swa_lrs = per_group("swa_lr", swa_lr, len(optimizer.param_groups))
        if isinstance(anneal_steps, bool) or not isinstance(anneal_steps, int) or anneal_steps < 0:
            raise bad_arg("anneal_steps", anneal_steps, "a non-negative int")
        anneal_factor(anneal_strategy, 0.0)  # validates the name
        self.anneal_steps = anneal_steps
        self.anneal_strategy = anneal_strategy
        super().__init__(optimizer, start=start, last_epoch=last_epoch)

    def _phase_lr(self, index: int, group_index: int) -> float:
        assert self.start_lrs is not None
        return swa_anneal_lr(self.start_lrs[group_index], self.swa_lrs[group_index], index,
                             self.anneal_steps, self.anneal_strategy)


class SWACyclicLR(_PhaseLR):
    """Cyclic learning rate of the SWA paper (Izmailov et al. 2018): each cycle decays linearly.

    Each cycle goes from ``max_lr`` to ``min_lr``. fast-SWA's schedule (a cosine from the top,
    then cycles repeating its last segment) is :class:`FastSWALR`.

    Until ``start`` calls of :meth:`step` the learning rate is left alone; then cycles of
    ``cycle_steps`` steps follow, each ending at ``min_lr`` (average the weights there, or several
    times per cycle for fast-SWA). ``max_lr=None`` uses each group's learning rate at the start.

    .. note::
        ``t = ((i mod c) + 1) / c``, ``lr = max_lr + (min_lr − max_lr) · f(t)`` at phase index
        ``i``, cycle length ``c`` and anneal function ``f`` (``"linear"`` as in the SWA paper).

    Raises:
        ConfigError: a bad ``min_lr``/``max_lr`` (per group), ``cycle_steps``, ``strategy``
            or ``start``.

    Examples:
        >>> import torch
        >>> opt = torch.optim.SGD(torch.nn.Linear(2, 1).parameters(), lr=0.1)
        >>> sched = SWACyclicLR(opt, min_lr=0.0, cycle_steps=2)
        >>> [round(sched.get_last_lr()[0], 3)] + [
        ...     (opt.step(), sched.step(), round(sched.get_last_lr()[0], 3))[2] for _ in range(3)]
        [0.05, 0.0, 0.05, 0.0]
    """

    def __init__(
        self,
        optimizer: Optimizer,
        min_lr: float | Sequence[float],
        *,
        cycle_steps: int,
        max_lr: float | Sequence[float] | None = None,
        strategy: str = "linear",
        start: int = 0,
        last_epoch: int = -1,
    ) -> None:
        n = len(optimizer.param_groups)
        self.min_lrs = per_group("min_lr", min_lr, n)
        self.max_lrs = None if max_lr is None else per_group("max_lr", max_lr, n)
        if isinstance(cycle_steps, bool) or not isinstance(cycle_steps, int) or cycle_steps < 1:
            raise bad_arg("cycle_steps", cycle_steps, "a positive int")
        anneal_factor(strategy, 0.0)
        self.cycle_steps = cycle_steps
        self.strategy = strategy
        super().__init__(optimizer, start=start, last_epoch=last_epoch)

    def _phase_lr(self, index: int, group_index: int) -> float:
        assert self.start_lrs is not None
        top = self.max_lrs[group_index] if self.max_lrs is not None else self.start_lrs[group_index]
        return swa_cyclic_lr(top, self.min_lrs[group_index], index, self.cycle_steps, self.strategy)


class FastSWALR(LRScheduler):
    """fast-SWA's learning-rate schedule as an ordinary scheduler (Athiwaratkun et al. 2019).

    A cosine from each group's initial rate (or ``max_lr``) over ``anneal_steps``; from step
    ``cycle_start`` on, cycles that repeat the cosine's segment ``[cycle_start − cycle_steps,
    cycle_start)`` (:func:`fast_swa_lr`). Step it once per optimizer step (or once per epoch, with
    every length in epochs). Average the weights at the points of :func:`fast_swa_update`, e.g.
    with ``weightavg.SWA(swa_start=cycle_start − cycle_steps, update_interval=k)`` and no
    ``swa_lr`` (the policy then leaves the rate to this scheduler). :class:`SWACyclicLR` is the
    original SWA paper's cycle instead.

    Args:
        optimizer: the optimizer.
        cycle_start: ``ℓ0``, the step at which the cycles begin (≥ ``cycle_steps``).
        cycle_steps: ``c``, the length of a cycle.
        anneal_steps: ``L ≥ ℓ0``, the length of the cosine (default ``cycle_start``).
        max_lr: the top of the schedule, a float or one per param group (default: each group's
            initial learning rate).
        min_lr: the bottom of the cosine, a float or one per param group.
        last_epoch: as in every torch scheduler (-1 to start fresh).

    Examples:
        >>> import torch
        >>> opt = torch.optim.SGD(torch.nn.Linear(2, 1).parameters(), lr=1.0)
        >>> sched = FastSWALR(opt, cycle_start=4, cycle_steps=2)
        >>> lrs = []
        >>> for _ in range(6):
        ...     lrs.append(round(opt.param_groups[0]["lr"], 3)); opt.step(); sched.step()
        >>> lrs
        [1.0, 0.854, 0.5, 0.146, 0.5, 0.146]
    """

    def __init__(
        self,
        optimizer: Optimizer,
        *,
        cycle_start: int,
        cycle_steps: int,
        anneal_steps: int | None = None,
        max_lr: float | Sequence[float] | None = None,
        min_lr: float | Sequence[float] = 0.0,
        last_epoch: int = -1,
    ) -> None:
        _fast_swa_args(cycle_start, cycle_steps, anneal_steps)
        n = len(optimizer.param_groups)
        self.cycle_start, self.cycle_steps, self.anneal_steps = cycle_start, cycle_steps, anneal_steps
        self.max_lrs = None if max_lr is None else per_group("max_lr", max_lr, n)
        self.min_lrs = per_group("min_lr", min_lr, n)
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:  # type: ignore[override]
        tops = self.max_lrs if self.max_lrs is not None else [float(b) for b in self.base_lrs]
        return [fast_swa_lr(top, max(0, self.last_epoch), cycle_start=self.cycle_start,
                            cycle_steps=self.cycle_steps, anneal_steps=self.anneal_steps, min_lr=low)
                for top, low in zip(tops, self.min_lrs, strict=True)]
