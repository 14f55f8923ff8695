"""How one update combines a new value with the running average.

A rule holds no tensors. Most rules are a *weight* ``w`` given to the new value, applied by the
engine as one fused ``avg.lerp_(new, w)`` per storage group:

* equal mean (SWA): ``w = 1 / (n + 1)`` after ``n`` averaged snapshots;
* EMA with decay ``d``: ``w = 1 - d``.

The first update of every rule copies (``w = 1``). Custom in-place rules, which receive lists of
tensors, are the escape hatch for anything that is not a weighted interpolation.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from torch import Tensor

from ._errors import bad_arg

__all__ = [
    "Rule",
    "UpdateInfo",
    "custom",
    "ema",
    "ema_warmup",
    "inplace",
    "karras_ema",
    "mean",
    "sigma_rel_to_gamma",
]


@dataclass(frozen=True)
class UpdateInfo:
    """What a rule may look at when it weighs an update.

    Attributes:
        num_averaged: snapshots already in the average (0 on the first update).
        step: the training step of this update (1-based, counted in optimizer steps or calls).
        steps_since_last: steps since the previous applied update (``step`` on the first).

    Examples:
        >>> import weightavg
        >>> info = weightavg.UpdateInfo(num_averaged=3, step=40, steps_since_last=10)
        >>> weightavg.mean().weight(info)  # the 4th snapshot weighs 1/4
        0.25
    """

    num_averaged: int
    step: int
    steps_since_last: int


@runtime_checkable
class Rule(Protocol):
    """Protocol of an averaging rule: what :class:`Averager` asks of ``rule=``.

    The factories :func:`mean`, :func:`ema`, :func:`ema_warmup`, :func:`karras_ema`, :func:`custom`
    and :func:`inplace` build rules; any object with ``power``, ``weight`` and ``config`` is one.

    Examples:
        >>> import weightavg
        >>> rule = weightavg.ema(decay=0.9)
        >>> isinstance(rule, weightavg.Rule)
        True
        >>> rule.weight(weightavg.UpdateInfo(num_averaged=5, step=6, steps_since_last=1))
        0.1
        >>> rule.config()["kind"]
        'ema'
    """

    @property
    def power(self) -> int:
        """Averaged quantity: 1 averages the values, 2 their squares (second moments)."""
        ...

    def weight(self, info: UpdateInfo) -> float:
        """Weight of the new value in ``avg.lerp_(new, weight)``; NaN means "in place" (see ``apply``).

        Returns:
            A float in [0, 1] (1 on the first update: a copy), or NaN for an in-place rule.
        """
        ...

    def config(self) -> dict[str, Any]:
        """Plain-data description saved in checkpoints and compared on resume.

        Returns:
            A JSON-able dict with at least ``"kind"`` (e.g. ``{"kind": "mean", "power": 1}``).
        """
        ...


def _check_decay(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise bad_arg(name, value, "a number in [0, 1)")
    return float(value)


@dataclass(frozen=True)
class _Mean:
    power: int = 1

    def weight(self, info: UpdateInfo) -> float:
        return self._weight(info.num_averaged, info.step, info.steps_since_last)

    def _weight(self, num_averaged: int, step: int, since: int) -> float:
        return 1.0 / (num_averaged + 1)

    def config(self) -> dict[str, Any]:
        return {"kind": "mean", "power": self.power}

    def __repr__(self) -> str:
        return "mean()" if self.power == 1 else f"mean(power={self.power})"


def mean(*, power: int = 1) -> Rule:
    """Equal average of every snapshot (Stochastic Weight Averaging).

    .. note::
        After ``n`` snapshots the average is ``(θ_1 + ... + θ_n) / n``; each update is
        ``avg ← avg + (θ − avg) / (n + 1)``.

    Args:
        power: 1 averages the weights; 2 averages their squares (SWAG's second moment).

    Returns:
        The equal-average :class:`Rule`.

    Raises:
        ConfigError: ``power`` is not 1 or 2.

    Examples:
        >>> import torch, weightavg
        >>> m = torch.nn.Linear(2, 1)
        >>> avg = weightavg.Averager(m, rule=weightavg.mean())
        >>> avg.update(m)  # True: the update was applied
        True
        >>> avg.num_updates
        1
    """
    if power not in (1, 2):
        raise bad_arg("power", power, "1 (values) or 2 (squares)")
    return _Mean(power=power)


@dataclass(frozen=True)
class _Ema:
    decay: float | None = None
    half_life: float | None = None
    schedule: Callable[[int], float] | None = field(default=None, compare=False)
    power: int = 1

    def current_decay(self, info: UpdateInfo) -> float:
        return self._decay(info.step, info.steps_since_last)

    def _decay(self, step: int, since: int) -> float:
        if self.half_life is not None:
            # interval-aware: k steps since the last update count as k half-life steps
            return float(2.0 ** (-since / self.half_life))
        if self.schedule is not None:
            return _check_decay("decay(step)", self.schedule(step))
        assert self.decay is not None
        return self.decay

    def weight(self, info: UpdateInfo) -> float:
        return self._weight(info.num_averaged, info.step, info.steps_since_last)

    def _weight(self, num_averaged: int, step: int, since: int) -> float:
        if num_averaged == 0:
            return 1.0
        return 1.0 - self._decay(step, since)

    def config(self) -> dict[str, Any]:
        if self.half_life is not None:
            return {"kind": "ema", "half_life": self.half_life, "power": self.power}
        if self.schedule is not None:
            return {"kind": "ema", "decay": "schedule", "power": self.power}
        return {"kind": "ema", "decay": self.decay, "power": self.power}

    def __repr__(self) -> str:
        if self.half_life is not None:
            return f"ema(half_life={self.half_life:g})"
        if self.schedule is not None:
            return f"ema(decay={self.schedule!r})"
        return f"ema(decay={self.decay:g})"


def ema(
    decay: float | Callable[[int], float] | None = None,
    *,
    smoothing: float | None = None,
    half_life: float | None = None,
    power: int = 1,
) -> Rule:
    """Exponential moving average of the weights.

    Give exactly one of ``decay``, ``smoothing`` (Composer's name for the same number) or
    ``half_life``.

    .. note::
        ``avg ← decay · avg + (1 − decay) · θ``. With ``half_life=h`` (in steps) the decay is
        ``2^(−Δ/h)`` where ``Δ`` is the number of steps since the previous update, so updating every
        k steps keeps the same time scale; after ``h`` steps a snapshot's weight has halved.
        ``decay``/``smoothing`` are per update: changing how often you update changes the time scale.

    Args:
        decay: per-update decay in [0, 1), or a function ``step -> decay``.
        smoothing: alias of ``decay``.
        half_life: half-life in steps (> 0).
        power: 1 averages values, 2 their squares.

    Returns:
        The EMA :class:`Rule`.

    Raises:
        ConfigError: none or several of decay/smoothing/half_life, or a value out of range.

    Examples:
        >>> import weightavg
        >>> weightavg.ema(decay=0.999)
        ema(decay=0.999)
        >>> rule = weightavg.ema(half_life=100)  # the same time scale however often you update
        >>> info = weightavg.UpdateInfo(num_averaged=1, step=200, steps_since_last=100)
        >>> rule.weight(info)  # 1 - 2**(-100/100)
        0.5
    """
    given = [n for n, v in (("decay", decay), ("smoothing", smoothing), ("half_life", half_life)) if v is not None]
    if len(given) != 1:
        raise bad_arg("decay/smoothing/half_life", given or None, "exactly one of them")
    if power not in (1, 2):
        raise bad_arg("power", power, "1 (values) or 2 (squares)")
    if half_life is not None:
        if isinstance(half_life, bool) or not isinstance(half_life, (int, float)) or not half_life > 0:
            raise bad_arg("half_life", half_life, "a positive number of steps")
        if not math.isfinite(half_life):
            raise bad_arg("half_life", half_life, "a finite positive number of steps")
        return _Ema(half_life=float(half_life), power=power)
    if smoothing is not None:
        return _Ema(decay=_check_decay("smoothing", smoothing), power=power)
    if callable(decay):
        return _Ema(schedule=decay, power=power)
    assert decay is not None
    return _Ema(decay=_check_decay("decay", decay), power=power)


@dataclass(frozen=True)
class _EmaWarmup:
    inv_gamma: float
    warmup_power: float
    max_decay: float
    min_decay: float
    start_step: int
    power: int = 1

    def current_decay(self, step: int) -> float:
        s = max(0, step - self.start_step - 1)
        d = 1.0 - (1.0 + s / self.inv_gamma) ** (-self.warmup_power)
        return min(max(d, self.min_decay), self.max_decay)

    def weight(self, info: UpdateInfo) -> float:
        return self._weight(info.num_averaged, info.step, info.steps_since_last)

    def _weight(self, num_averaged: int, step: int, since: int) -> float:
        if num_averaged == 0:
            return 1.0
        return 1.0 - self.current_decay(step)

    def config(self) -> dict[str, Any]:
        return {
            "kind": "ema_warmup", "inv_gamma": self.inv_gamma, "warmup_power": self.warmup_power,
            "max_decay": self.max_decay, "min_decay": self.min_decay, "start_step": self.start_step,
            "power": self.power,
        }

    def __repr__(self) -> str:
        return (f"ema_warmup(inv_gamma={self.inv_gamma:g}, power={self.warmup_power:g}, "
                f"max_decay={self.max_decay:g}, min_decay={self.min_decay:g})")


def ema_warmup(
    *,
    inv_gamma: float = 1.0,
    power: float = 2 / 3,
    max_decay: float = 0.9999,
    min_decay: float = 0.0,
    start_step: int = 0,
) -> Rule:
    """EMA whose decay warms up as ``1 − (1 + s/inv_gamma)^(−power)`` (timm, diffusers).

    .. note::
        ``s = max(0, step − start_step − 1)``; the decay is clamped to ``[min_decay, max_decay]``.
        ``power=2/3`` suits runs of ~1M steps, ``power=3/4`` shorter runs. Early on the decay is
        small, so the random initial weights are forgotten quickly.

    Args:
        inv_gamma: time scale of the warm-up, in steps (> 0).
        power: exponent of the warm-up (> 0).
        max_decay: the decay's ceiling, in [0, 1).
        min_decay: the decay's floor, in [0, max_decay].
        start_step: steps before the warm-up starts (≥ 0).

    Returns:
        The warmed-up EMA :class:`Rule`.

    Raises:
        ConfigError: a value out of the ranges above.

    Examples:
        >>> import weightavg
        >>> rule = weightavg.ema_warmup(power=3 / 4)
        >>> round(rule.current_decay(10), 4)  # 1 - (1 + 9)**(-3/4)
        0.8222
    """
    if not (isinstance(inv_gamma, (int, float)) and inv_gamma > 0):
        raise bad_arg("inv_gamma", inv_gamma, "a positive number")
    if not (isinstance(power, (int, float)) and power > 0):
        raise bad_arg("power", power, "a positive number")
    _check_decay("max_decay", max_decay)
    _check_decay("min_decay", min_decay)
    if min_decay > max_decay:
        raise bad_arg("min_decay", min_decay, f"at most max_decay={max_decay}")
    if not (isinstance(start_step, int) and start_step >= 0):
        raise bad_arg("start_step", start_step, "a non-negative int")
    return _EmaWarmup(float(inv_gamma), float(power), float(max_decay), float(min_decay), start_step)


#: γ* = (√5 − 3)/2 ≈ −0.382 maximises σ_rel(γ); the maximum is σ_rel(γ*) = φ^(−5/2) ≈ 0.30028 (φ the golden ratio).
_GAMMA_AT_MAX_SIGMA = (5**0.5 - 3) / 2
#: the largest relative std a power-function EMA can have: φ^(−5/2).
MAX_SIGMA_REL = ((1 + 5**0.5) / 2) ** -2.5


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """Exponent γ of the power-function EMA whose relative std is ``sigma_rel`` (Karras et al. 2024).

    Solves ``σ_rel² = (γ+1) / ((γ+2)² (γ+3))`` for the largest real γ. The right-hand side rises
    from 0 at γ = −1 to its maximum ``φ^(−5/2) ≈ 0.30028`` at ``γ* = (√5 − 3)/2 ≈ −0.382`` (where
    ``d/dγ log σ_rel² = 1/(γ+1) − 2/(γ+2) − 1/(γ+3)`` vanishes, i.e. ``(γ+2)² = (γ+2) + 1``) and then
    falls to 0, so ``sigma_rel`` must lie in ``(0, φ^(−5/2)]`` and the root returned is ≥ γ*.

    Returns:
        γ (> −1): the exponent to pass to :func:`karras_ema` as ``gamma``.

    Raises:
        ConfigError: ``sigma_rel`` is not a number in ``(0, φ^(−5/2) ≈ 0.30028]``.

    Examples:
        >>> round(sigma_rel_to_gamma(0.10), 2)
        6.94
    """
    if (isinstance(sigma_rel, bool) or not isinstance(sigma_rel, (int, float))
            or not 0 < sigma_rel <= MAX_SIGMA_REL):
        raise bad_arg("sigma_rel", sigma_rel, f"a number in (0, {MAX_SIGMA_REL:.5f}] (the largest relative "
                                              "std of a power-function EMA, φ^(-5/2))")

    def f(g: float) -> float:
        return (g + 1) / ((g + 2) ** 2 * (g + 3)) - sigma_rel**2

    # f(γ*) ≥ 0 and f decreases on [γ*, ∞): bisect there for the largest root
    lo, hi = _GAMMA_AT_MAX_SIGMA, 1.0
    while f(hi) > 0:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if f(mid) > 0:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


@dataclass(frozen=True)
class _Karras:
    gamma: float
    power: int = 1

    def weight(self, info: UpdateInfo) -> float:
        return self._weight(info.num_averaged, info.step, info.steps_since_last)

    def _weight(self, num_averaged: int, step: int, since: int) -> float:
        t = step
        prev = t - since
        if num_averaged == 0 or prev <= 0:
            return 1.0
        # average with weights ∝ τ^γ over [0, t]: mass up to t ∝ t^(γ+1)
        beta = (prev / t) ** (self.gamma + 1.0)
        return 1.0 - beta

    def config(self) -> dict[str, Any]:
        return {"kind": "karras_ema", "gamma": self.gamma, "power": self.power}

    def __repr__(self) -> str:
        return f"karras_ema(gamma={self.gamma:g})"


def karras_ema(*, gamma: float | None = None, sigma_rel: float | None = None) -> Rule:
    """Power-function EMA of Karras et al. (EDM2): weights ∝ τ^γ over the whole run so far.

    .. note::
        ``β = (t_prev / t)^(γ+1)`` where ``t`` is this update's step and ``t_prev`` the previous
        update's step, so updating every k steps still follows the τ^γ profile (a per-update
        ``(1 − 1/t)^(γ+1)`` would not). Give ``gamma`` (> −1) or ``sigma_rel``
        (in ``(0, φ^(−5/2) ≈ 0.30028]``, see :func:`sigma_rel_to_gamma`). ``gamma=0`` is the equal mean.

    Raises:
        ConfigError: neither or both of ``gamma``/``sigma_rel``; ``gamma`` not a finite number > −1
            (at γ = −1 every β is 1 and the average never moves past its first snapshot);
            ``sigma_rel`` out of range.

    Returns:
        The power-function EMA :class:`Rule`.

    Examples:
        >>> import weightavg
        >>> rule = weightavg.karras_ema(gamma=0.0)  # the equal mean
        >>> rule.weight(weightavg.UpdateInfo(num_averaged=3, step=4, steps_since_last=1))
        0.25
        >>> round(weightavg.karras_ema(sigma_rel=0.05).config()["gamma"], 2)
        16.97
    """
    if (gamma is None) == (sigma_rel is None):
        raise bad_arg("gamma/sigma_rel", (gamma, sigma_rel), "exactly one of them")
    if sigma_rel is not None:
        gamma = sigma_rel_to_gamma(sigma_rel)
    assert gamma is not None
    if isinstance(gamma, bool) or not (isinstance(gamma, (int, float)) and gamma > -1 and math.isfinite(gamma)):
        # γ = −1 gives β = (t_prev/t)^0 = 1: the average would never move past its first snapshot;
        # γ < −1 gives β > 1 (extrapolation). The profile τ^γ is integrable on [0, t] only for γ > −1.
        raise bad_arg("gamma", gamma, "a finite number > -1 (at gamma=-1 the average never moves)")
    return _Karras(float(gamma))


@dataclass(frozen=True)
class _Custom:
    fn: Callable[[int], float] = field(compare=False)
    name: str = "custom"
    power: int = 1

    def weight(self, info: UpdateInfo) -> float:
        return self._weight(info.num_averaged, info.step, info.steps_since_last)

    def _weight(self, num_averaged: int, step: int, since: int) -> float:
        if num_averaged == 0:
            return 1.0
        w = float(self.fn(num_averaged))
        if not 0.0 <= w <= 1.0:
            raise bad_arg("weight_fn(num_averaged)", w, "a weight in [0, 1]")
        return w

    def config(self) -> dict[str, Any]:
        return {"kind": "custom", "name": self.name}

    def __repr__(self) -> str:
        return f"custom({self.name})"


def custom(weight_fn: Callable[[int], float], *, name: str | None = None) -> Rule:
    """A rule given by the weight of the new value as a function of the number already averaged.

    ``avg ← avg + weight_fn(n) · (θ − avg)``; ``weight_fn(n) = 1/(n+1)`` is the equal mean.

    Returns:
        The :class:`Rule`; its ``weight`` raises :class:`ConfigError` when ``weight_fn`` returns a
        value outside [0, 1].

    Raises:
        ConfigError: ``weight_fn`` is not callable.

    Examples:
        >>> import torch, weightavg
        >>> def harmonic(n: int) -> float:
        ...     return 1 / (n + 1)
        >>> m = torch.nn.Linear(2, 1)
        >>> avg = weightavg.Averager(m, rule=weightavg.custom(harmonic))
        >>> avg.update(m)
        True
    """
    if not callable(weight_fn):
        raise bad_arg("weight_fn", weight_fn, "a callable num_averaged -> weight in [0, 1]")
    return _Custom(weight_fn, name or str(getattr(weight_fn, "__name__", "custom")))


InplaceFn = Callable[[Sequence[Tensor], Sequence[Tensor], int], None]


@dataclass(frozen=True)
class _Inplace:
    fn: InplaceFn = field(compare=False)
    name: str = "inplace"
    power: int = 1

    def weight(self, info: UpdateInfo) -> float:
        return self._weight(info.num_averaged, info.step, info.steps_since_last)

    def _weight(self, num_averaged: int, step: int, since: int) -> float:
        return 1.0 if num_averaged == 0 else math.nan

    def config(self) -> dict[str, Any]:
        return {"kind": "inplace", "name": self.name}

    def __repr__(self) -> str:
        return f"inplace({self.name})"


def inplace(fn: InplaceFn, *, name: str | None = None) -> Rule:
    """A rule given by an in-place function ``fn(averaged, new, num_averaged)`` over lists of tensors.

    ``averaged`` are the stored averages (float32 by default), ``new`` the model's tensors (their
    own dtype), in the same order. The first update copies without calling ``fn``.

    Returns:
        The in-place :class:`Rule`.

    Raises:
        ConfigError: ``fn`` is not callable.

    Examples:
        >>> import torch, weightavg
        >>> def halfway(avg: list, new: list, n: int) -> None:
        ...     torch._foreach_lerp_(avg, [t.float() for t in new], 0.5)
        >>> m = torch.nn.Linear(2, 1)
        >>> avg = weightavg.Averager(m, rule=weightavg.inplace(halfway))
        >>> avg.update(m), avg.update(m)
        (True, True)
    """
    if not callable(fn):
        raise bad_arg("fn", fn, "a callable (averaged: list[Tensor], new: list[Tensor], n: int) -> None")
    return _Inplace(fn, name or str(getattr(fn, "__name__", "inplace")))


#: the built-in rules: their ``_weight(num_averaged, step, since)`` is ``weight(UpdateInfo(num_averaged,
#: step, since))`` without building the :class:`UpdateInfo` (``weight`` calls it)
_BUILTIN: tuple[type, ...] = (_Mean, _Ema, _EmaWarmup, _Karras, _Custom, _Inplace)

#: ``(num_averaged, step, steps_since_last) -> weight``
WeightFn = Callable[[int, int, int], float]


def weight_fns(rules: Mapping[str, Rule]) -> list[tuple[str, WeightFn]] | None:
    """Each slot's weight as a function of three ints (a bound method), when every rule is built in.

    Returns:
        ``[(slot, fn), ...]`` in the rules' order, or None when a rule is not one of the built-in
        ones (a user's object, or a subclass, which may override ``weight``): such a rule is asked
        ``weight(UpdateInfo(...))`` itself.
    """
    if not all(type(r) in _BUILTIN for r in rules.values()):
        return None
    return [(slot, r._weight) for slot, r in rules.items()]  # type: ignore[attr-defined]
