"""Averaging policies: *when* an :class:`~weightavg.Averager` is updated and *how much* (SWA, EMA).

A policy is trainer-independent. Trainer adapters (``weightavg.lightning``,
``weightavg.transformers``, a hand-written loop) only turn the trainer's events into the calls
below; every decision (window, interval, learning-rate phase, BatchNorm refresh, checkpoint state)
is taken here, and every average is computed by the engine.

Lifecycle (what an adapter calls)::

    policy = weightavg.EMA(half_life="1000ba")            # or weightavg.SWA(...); no model yet
    policy.load_state_dict(sd)                             # optional (resume), before or after begin()
    policy.begin(model, optimizers,                        # at train start: a fresh run unless a
                 total_steps=..., steps_per_epoch=...,     # state was loaded; resolves durations,
                 bn_data=train_loader)                     # builds the Averager, hooks the optimizers
    # ... optimizer.step() ...   -> counted by the hooks (register_step_pre/post_hook); steps that
    #                               GradScaler skipped (fused optimizers too) are not counted
    policy.on_epoch_end()                                  # at each epoch boundary (once)
    with policy.averaged():                                # evaluate the averaged weights
        validate(model)                                    # (BN statistics recomputed if stale)
    sd = policy.state_dict()                               # checkpoint (counters + averager)
    weights = policy.export_state_dict()                   # averaged weights, model's own names
    policy.end()                                           # final BN refresh; model holds the
                                                           # averaged weights if final="averaged"

Members an adapter may read: ``active`` (between ``begin`` and ``end``), ``model``, ``averager``,
``steps`` (optimizer steps counted; with several optimizers, rounds in which each stepped),
``epochs`` (epoch ends seen), ``num_updates``, ``has_average``, ``in_phase`` (averaging window
open), ``bn_stale``, ``eval_with`` (``"averaged" | "training" | "both"``), ``final``,
``log_prefix`` (e.g. ``"swa/"``: prefix for metrics of the averaged weights when
``eval_with="both"``), ``name``. ``on_step()`` counts one step by hand for loops that cannot
expose their optimizer (only when ``begin`` got no optimizer). ``detach()`` removes the hooks
without touching the model (use it when a run aborts). A policy that writes averaged weights into
its model (``eval_with != "training"`` or ``final == "averaged"``) is the only one allowed to for
that model (and its sub-modules) while active.

Resume is exact when the data are: BN recomputation reads ``bn_data`` under a forked RNG, but a
shuffling ``bn_data`` read for at most ``bn_batches`` batches sees other batches after a restart.

Customisation: subclass and override ``should_update(step_idx=None, epoch_idx=None) -> bool``. It
is called after every counted optimizer step (``step_idx``, 0-based) and at every epoch end
(``epoch_idx``, 0-based); the default implements the window and ``update_interval``.

Time: every time argument is a :class:`~weightavg.Duration` or its text (``'1ep'``, ``'5ba'``,
``'0.7dur'``, ``'100sp'``, ``'2000tok'``) or a plain int (optimizer steps). Whole epochs are
counted from ``on_epoch_end()`` calls, so they need no epoch length (iterable datasets work);
fractional epochs need ``steps_per_epoch``, ``'dur'`` needs ``total_steps``, ``'sp'``/``'tok'``
need ``samples_per_step``/``tokens_per_step``. A unit the loop cannot count is a
:class:`~weightavg.ConfigError` at ``begin``, not mid-run.

Window: an event at time ``T`` (after the ``T``-th optimizer step, or after ``E`` epochs) is inside
``(start, end]``: steps ``start+1 ... end``, epochs with 0-based index in ``[start, end)``. The
first update after ``start`` is one ``update_interval`` after the window opens.
"""

from __future__ import annotations

import contextlib
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from ._bn import _stat_layers, recompute_bn
from ._duration import Duration
from ._engine import Averager, canonical_name, check_options, named_tensors, unwrap_model
from ._errors import ConfigError, StateError, bad_arg
from ._rules import Rule, ema, ema_warmup, inplace, mean
from ._schedules import anneal_factor, group_lr, per_group, swa_anneal_lr, swa_cyclic_lr

__all__ = ["EMA", "SWA", "AveragingPolicy", "TimeLike"]

TimeLike = Duration | str | int
EvalWith = Literal["averaged", "training", "both"]
Final = Literal["averaged", "training"]

FORMAT = "weightavg.Policy"
FORMAT_VERSION = 1

# model -> policies that write averaged weights into it (at evaluation or at the end)
_WRITERS: weakref.WeakKeyDictionary[nn.Module, list[weakref.ref[AveragingPolicy]]] = (
    weakref.WeakKeyDictionary()
)


@dataclass(frozen=True)
class _Time:
    """A resolved time: ``value`` optimizer steps or ``value`` whole epochs."""

    value: int
    unit: Literal["step", "epoch", "tick"]  # tick: the trainer's own step count (begin's clock)

    def __str__(self) -> str:
        return f"{self.value} {({'step': 'steps', 'epoch': 'epochs', 'tick': 'trainer steps'})[self.unit]}"


def _parse(name: str, value: TimeLike | None, *, allow_none: bool = False) -> Duration | None:
    if value is None:
        if allow_none:
            return None
        raise bad_arg(name, value, "a duration such as '1ep', '5ba', '0.7dur' or an int")
    return Duration.parse(value, name=name)


def _unwrap_optimizer(opt: Any, i: int) -> Optimizer:
    """The optimizer that really steps, under Lightning's and accelerate's wrappers.

    accelerate's ``AcceleratedOptimizer`` subclasses ``Optimizer`` without its hook tables, so an
    ``Optimizer`` holding another ``Optimizer`` in ``.optimizer`` is looked through too.
    """
    for _ in range(4):
        inner = getattr(opt, "optimizer", None)
        if inner is None or (isinstance(opt, Optimizer) and not isinstance(inner, Optimizer)):
            break
        opt = inner
    if not isinstance(opt, Optimizer):
        raise bad_arg(f"optimizers[{i}]", type(opt).__name__, "a torch.optim.Optimizer")
    return opt


def _set_lr(group: dict[str, Any], value: float) -> None:
    if isinstance(group["lr"], Tensor):
        group["lr"].fill_(value)
    else:
        group["lr"] = value


class AveragingPolicy:
    """Base class of :class:`SWA` and :class:`EMA`: an averager plus *when* and *how much*.

    Subclasses give the rule (:meth:`_make_rule`) and, optionally, a learning-rate phase.

    Args:
        start: time before which nothing is averaged (exclusive).
        end: time after which nothing is averaged (inclusive; ``None``: end of training).
        update_interval: time between updates inside the window.
        eval_with: what evaluation sees inside :meth:`averaged` as used by the adapters:
            ``"averaged"`` weights (default), the ``"training"`` weights, or ``"both"`` (adapters
            run validation twice and log the averaged metrics under ``log_prefix``).
        final: what the model holds after :meth:`end`: ``"averaged"`` (default) or ``"training"``.
        recompute_bn: recompute BatchNorm statistics of the averaged weights before each
            evaluation and at the end (from ``bn_data`` given to :meth:`begin`).
        bn_batches: at most this many batches per recomputation (``None``: all of ``bn_data``).
        name: short name (log prefix ``"<name>/"``, checkpoint key).
        log_prefix: prefix of averaged-weight metrics when ``eval_with="both"``.
        params, include, exclude, buffers, dtype, device: passed to
            :class:`~weightavg.Averager`.
        nonfinite: an update from weights holding NaN/Inf is ``"skip"``-ped (default: the average
            keeps its last finite value, a warning counts the skipped updates; training never
            dies because of its average), ``"raise"`` (:class:`~weightavg.NonFiniteError`) or
            ``"allow"``-ed (no check). :class:`~weightavg.Averager` itself defaults to ``"raise"``.

    Raises:
        ConfigError: a malformed time (``start``, ``end``, ``update_interval``), a window that
            ends before it starts, a non-positive or ``'dur'`` ``update_interval``, or a bad
            ``eval_with``, ``final``, ``recompute_bn``, ``bn_batches`` or averager option.

    Examples:
        The life of a policy in a plain loop (an :class:`EMA` here; :class:`SWA`,
        :class:`~weightavg.WindowAverage` and :class:`~weightavg.PostHocEMA` work the same way):

        >>> import torch, weightavg
        >>> model = torch.nn.Linear(2, 1)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> ema = weightavg.EMA(smoothing=0.5, update_interval="1ba")
        >>> ema.begin(model, opt)             # hooks the optimizer: every step counts
        >>> for epoch in range(2):
        ...     for _ in range(3):
        ...         model(torch.randn(4, 2)).sum().backward(); opt.step(); opt.zero_grad()
        ...     ema.on_epoch_end()
        >>> ema.num_updates, ema.should_update(step_idx=6)
        (6, True)
        >>> with ema.averaged() as m:         # evaluate the average; training weights come back
        ...     _ = m(torch.randn(1, 2))
        >>> weights = ema.export_state_dict()  # the average as the model's state dict
        >>> state = ema.state_dict()           # checkpoint it next to the model and optimizer
        >>> resumed = weightavg.EMA(smoothing=0.5, update_interval="1ba")
        >>> resumed.load_state_dict(state)     # before begin(): applied by begin()
        >>> ema.end()                          # final="averaged": the model now holds the EMA
        >>> torch.equal(model.weight, weights["weight"])
        True
        >>> resumed.begin(model, opt); resumed.num_updates
        6
        >>> resumed.detach()                   # unhook without touching the model

        Without optimizers, count the steps yourself:

        >>> manual = weightavg.EMA(smoothing=0.5, update_interval="1ba")
        >>> manual.begin(torch.nn.Linear(2, 1))
        >>> manual.on_step(); manual.num_updates
        1
    """

    _kind = "policy"

    def __init__(
        self,
        *,
        start: TimeLike | None,
        end: TimeLike | None,
        update_interval: TimeLike,
        eval_with: EvalWith = "averaged",
        final: Final = "averaged",
        recompute_bn: bool = True,
        bn_batches: int | None = 100,
        name: str | None = None,
        log_prefix: str | None = None,
        params: Literal["all", "trainable"] = "all",
        include: str | Sequence[str] | None = None,
        exclude: str | Sequence[str] | None = None,
        buffers: Literal["average", "copy", "ignore"] = "average",
        dtype: torch.dtype | None = torch.float32,
        device: torch.device | str | None = None,
        nonfinite: Literal["raise", "skip", "allow"] = "skip",
        start_name: str = "start",
        end_name: str = "end",
    ) -> None:
        self._start_name, self._end_name = start_name, end_name
        self.window_start = _parse(start_name, 0 if start is None else start)
        self.window_end = _parse(end_name, end, allow_none=True)
        self.update_interval = _parse("update_interval", update_interval)
        assert self.window_start is not None and self.update_interval is not None
        if self.update_interval.value <= 0:
            raise bad_arg("update_interval", update_interval, "a positive duration (e.g. '1ba', '1ep')")
        if self.update_interval.unit == "dur":
            raise bad_arg("update_interval", update_interval,
                          "a duration in 'ba', 'ep', 'sp' or 'tok' (not a fraction of the run)")
        ws, we = self.window_start, self.window_end
        if we is not None and ws.unit == we.unit and ws.value >= we.value:
            raise bad_arg(start_name, str(ws), f"a time before {end_name}='{we}'")
        if eval_with not in ("averaged", "training", "both"):
            raise bad_arg("eval_with", eval_with, "'averaged', 'training' or 'both'")
        if final not in ("averaged", "training"):
            raise bad_arg("final", final, "'averaged' or 'training'")
        if not isinstance(recompute_bn, bool):
            raise bad_arg("recompute_bn", recompute_bn, "True or False")
        if bn_batches is not None and (isinstance(bn_batches, bool) or not isinstance(bn_batches, int)
                                       or bn_batches <= 0):
            raise bad_arg("bn_batches", bn_batches, "a positive int or None (all batches)")
        check_options(params=params, buffers=buffers, nonfinite=nonfinite)
        self.eval_with: EvalWith = eval_with
        self.final: Final = final
        self.recompute_bn = recompute_bn
        self.bn_batches = bn_batches
        self.name = name or self._kind
        self.log_prefix = log_prefix if log_prefix is not None else f"{self.name}/"
        self._averager_kwargs: dict[str, Any] = dict(
            params=params, include=include, exclude=exclude, buffers=buffers, dtype=dtype,
            device=device, nonfinite=nonfinite)

        # --- set by begin()
        self.model: nn.Module | None = None
        self.averager: Averager | None = None
        self._optimizers: list[Optimizer] = []
        self._handles: list[Any] = []
        self._t_start: _Time = _Time(0, "step")
        self._t_end: _Time | None = None
        self._t_interval: _Time = _Time(1, "step")
        self._bn_data: Iterable[Any] | None = None
        self._bn_forward: Callable[[nn.Module, Any], Any] | None = None
        self._bn_device: torch.device | str | None = None
        self._has_bn = False
        self._bn_cache: tuple[int, dict[str, Tensor]] | None = None  # (num_updates, buffers)
        self._plan: _LRPlan | None = None
        self._pending: Mapping[str, Any] | None = None
        self._ended = False
        self._clock: Callable[[], int] | None = None
        self._skips_warned = 0
        self._elsewhere: str | None = None  # why begin() is never called in this process (adapters)

        # --- counters (checkpointed)
        self.steps = 0  # optimizer steps counted (rounds: every hooked optimizer stepped)
        self._counts: list[int] = []  # steps of each hooked optimizer
        self.epochs = 0  # epoch ends seen
        self._anchor: tuple[int, int] | None = None  # (steps, epochs) when the window opened
        self._start_lrs: list[float] | None = None  # lr of every param group when the window opened
        self.bn_stale = False

    # ------------------------------------------------------------------ configuration hooks

    def _make_rule(self, resolve: Callable[[Duration, str], _Time]) -> Rule:
        raise NotImplementedError

    def _lr_plan(self) -> _LRPlan | None:
        return None

    def _recompute_enabled(self) -> bool:
        return self.recompute_bn

    # ------------------------------------------------------------------ begin / end

    def begin(
        self,
        model: nn.Module,
        optimizers: Optimizer | Sequence[Optimizer] | None = None,
        *,
        total_steps: int | None = None,
        steps_per_epoch: int | None = None,
        samples_per_step: int | None = None,
        tokens_per_step: int | None = None,
        bn_data: Iterable[Any] | None = None,
        bn_forward_fn: Callable[[nn.Module, Any], Any] | None = None,
        bn_device: torch.device | str | None = None,
        clock: Callable[[], int] | None = None,
    ) -> None:
        """Start averaging ``model``: resolve the times, build the averager, hook the optimizers.

        Args:
            model: the module to average (wrappers such as DDP are looked through).
            optimizers: the optimizer(s) whose steps count. With several, a step is counted once
                every one of them has stepped (a GAN's D and G step = one step). ``None``: call
                :meth:`on_step` yourself.
            total_steps: optimizer steps in the whole run (for ``'dur'`` times).
            steps_per_epoch: optimizer steps per epoch (for fractional ``'ep'`` times).
            samples_per_step, tokens_per_step: for ``'sp'`` and ``'tok'`` times.
            bn_data: batches to recompute BatchNorm statistics from (typically the training
                loader; at most ``bn_batches`` are read each time). Required when the model has
                BatchNorm and ``recompute_bn`` is on.
            bn_forward_fn: ``fn(model, batch)`` running one batch (default: ``model(batch[0])``
                for tuples, ``model(**batch)`` for dicts, ``model(batch)`` for tensors).
            bn_device: move batches there before the forward pass.
            clock: the trainer's own step counter, when its ``total_steps`` counts something else
                than the policy's steps (Lightning's ``max_steps`` counts every optimizer's steps
                under manual optimization; the policy counts rounds). ``'dur'`` times of the window
                (start, end) are then fractions of ``total_steps`` read on this clock.

        With BatchNorm and ``recompute_bn`` on, one batch of ``bn_data`` is run through
        ``bn_forward_fn`` at once (eval mode, no gradient, RNG forked, every buffer and mode
        restored), so that data the model cannot take fail here rather than after training.

        Raises:
            ConfigError: a time the loop cannot count, a window that ends before it starts, a
                ``swa_lr`` list of the wrong length, optimizers holding none of the model's
                parameters, BatchNorm without ``bn_data``, ``bn_data`` that is a one-shot iterator
                or yields no batch, a batch ``bn_forward_fn`` cannot run, or another policy
                already writing averaged weights into the same model.
        """
        if not isinstance(model, nn.Module):
            raise bad_arg("model", type(model).__name__, "a torch.nn.Module")
        self.detach()
        model = unwrap_model(model)
        if optimizers is None:
            opts: list[Optimizer] = []
        elif isinstance(optimizers, Sequence):
            opts = [_unwrap_optimizer(o, i) for i, o in enumerate(optimizers)]
        else:
            opts = [_unwrap_optimizer(optimizers, 0)]
        if clock is not None and not callable(clock):
            raise bad_arg("clock", clock, "a callable returning the trainer's step count, or None")
        if opts:
            owned = {id(p) for p in model.parameters()}
            if owned and not any(id(p) in owned for o in opts for g in o.param_groups for p in g["params"]):
                raise bad_arg("optimizers", [type(o).__name__ for o in opts],
                              f"optimizer(s) holding parameters of the averaged {type(model).__name__}: "
                              "these update another model, so their steps say nothing about this one")
        for name, v in (("total_steps", total_steps), ("steps_per_epoch", steps_per_epoch),
                        ("samples_per_step", samples_per_step), ("tokens_per_step", tokens_per_step)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v <= 0):
                raise bad_arg(name, v, "a positive int or None (unknown)")
        known = dict(total_steps=total_steps, steps_per_epoch=steps_per_epoch,
                     samples_per_step=samples_per_step, tokens_per_step=tokens_per_step)

        def resolve(d: Duration, name: str) -> _Time:
            if d.unit == "ba":
                return _Time(int(d.value), "step")
            if d.unit == "ep" and float(d.value).is_integer():
                return _Time(int(d.value), "epoch")
            # 'dur' window times with a clock: fractions of the trainer's own count
            tick = d.unit == "dur" and clock is not None and name in (self._start_name, self._end_name)
            try:
                return _Time(d.to_steps(**known), "tick" if tick else "step")
            except ConfigError as err:
                raise ConfigError(f"{name}='{d}' cannot be counted by this training loop: "
                                  f"{str(err).split(': ', 1)[-1]}") from err

        assert self.window_start is not None and self.update_interval is not None
        t_start = resolve(self.window_start, self._start_name)
        t_end = resolve(self.window_end, self._end_name) if self.window_end is not None else None
        t_interval = resolve(self.update_interval, "update_interval")
        if t_interval.value <= 0:
            raise bad_arg("update_interval", str(self.update_interval),
                          "a duration of at least one step at this loop's scale")
        if t_end is not None:
            a, b = self._comparable(t_start, t_end, steps_per_epoch)
            if a is not None and b is not None and a >= b:
                raise bad_arg(self._start_name, str(self.window_start),
                              f"a time before {self._end_name}='{self.window_end}' "
                              f"({t_start} vs {t_end} in this run)")
        rule = self._make_rule(resolve)
        plan = self._resolve_lr_plan(resolve)
        if plan is not None:
            if not opts:
                raise bad_arg("optimizers", None, "the optimizer(s) whose learning rate swa_lr sets")
            n_groups = sum(len(o.param_groups) for o in opts)
            plan.lrs = per_group(plan.arg, plan.value, n_groups)
            if plan.max_value is not None:
                plan.max_lrs = per_group("cycle_max_lr", plan.max_value, n_groups)
        averager = Averager(model, rule, **self._averager_kwargs)
        layers = _stat_layers(model)
        has_bn = bool(layers)
        if has_bn and self._recompute_enabled():
            tracked = set(averager.names)
            untracked = [canonical_name(f"{mn}.{b}") for mn, m in model.named_modules()
                         if any(m is x for x in layers) for b in ("running_mean", "running_var")
                         if getattr(m, b, None) is not None
                         and canonical_name(f"{mn}.{b}") not in tracked]
            if untracked:
                raise bad_arg("buffers", self._averager_kwargs["buffers"],
                              "'average' or 'copy' with BatchNorm statistics tracked when "
                              f"recompute_bn=True (untracked: {', '.join(untracked[:5])}); "
                              "or pass recompute_bn=False")
            if bn_data is None:
                raise bad_arg("bn_data", None,
                              "batches to recompute BatchNorm statistics of the averaged weights "
                              "(e.g. the training loader): the model has BatchNorm layers; or "
                              "pass recompute_bn=False to the policy")
            if isinstance(bn_data, Iterator):
                raise bad_arg("bn_data", type(bn_data).__name__,
                              "an iterable that can be read again (a list, a DataLoader): a one-shot "
                              "iterator or generator is exhausted after the first BatchNorm "
                              "recomputation, and every later evaluation would be stale")
            _probe_bn(model, bn_data, bn_forward_fn, bn_device)
        self._register_writer(model)

        self.model, self.averager, self._optimizers = model, averager, opts
        self._t_start, self._t_end, self._t_interval = t_start, t_end, t_interval
        self._plan = plan
        self._bn_data, self._bn_forward, self._bn_device = bn_data, bn_forward_fn, bn_device
        self._clock = clock
        self._skips_warned = 0
        self._elsewhere = None
        self._has_bn = has_bn
        self._bn_cache = None
        self._ended = False
        # a fit starts from scratch unless a state was loaded (applied just below)
        self.steps, self.epochs, self._anchor, self._start_lrs = 0, 0, None, None
        self.bn_stale = False
        self._counts = [0] * len(opts)
        if self._pending is not None:
            pending, self._pending = self._pending, None
            self._apply_state(pending)
        for i, opt in enumerate(opts):
            self._handles.append(opt.register_step_pre_hook(self._make_pre_hook(i)))
            self._handles.append(opt.register_step_post_hook(self._make_post_hook(i)))

    @staticmethod
    def _comparable(a: _Time, b: _Time, spe: int | None) -> tuple[int | None, int | None]:
        if a.unit == b.unit:
            return a.value, b.value
        if spe is None or "tick" in (a.unit, b.unit):
            return None, None
        return (a.value * spe if a.unit == "epoch" else a.value,
                b.value * spe if b.unit == "epoch" else b.value)

    def _register_writer(self, model: nn.Module) -> None:
        if self.eval_with == "training" and self.final == "training":
            return
        for other_model, refs in list(_WRITERS.items()):
            for ref in refs:
                other = ref()
                if other is None or other is self or other.model is None or other._ended:
                    continue
                overlap = other_model is model or any(m is model for m in other_model.modules()) \
                    or any(m is other_model for m in model.modules())
                if overlap:
                    raise ConfigError(
                        f"two policies write averaged weights into the same model: {other!r} and "
                        f"{self!r}; give one of them eval_with='training' and final='training' "
                        "(its average stays available through export_state_dict())")
        _WRITERS.setdefault(model, []).append(weakref.ref(self))

    def _unregister_writer(self) -> None:
        if self.model is None:
            return
        refs = _WRITERS.get(self.model)
        if refs is not None:
            refs[:] = [r for r in refs if r() is not None and r() is not self]

    def detach(self) -> None:
        """Remove the optimizer hooks and the writer registration; the model is left as it is."""
        for h in self._handles:
            h.remove()
        self._handles = []
        self._unregister_writer()

    @torch.no_grad()
    def end(self) -> None:
        """End of training: refresh BatchNorm statistics if stale, then apply ``final``.

        Every rank must call it (BatchNorm statistics are pooled across ranks). Warns when the
        run made no update at all (a window the run never reached) and when updates were skipped
        because the weights held NaN/Inf.
        """
        self._require_begun()
        if self.has_average:
            assert self.averager is not None and self.model is not None
            if self._bn_needs_work():
                with self.averager.swapped_in(self.model):
                    self._fresh_bn()
                    self.averager.load_from(self.model)  # the average keeps these statistics
                self.bn_stale = False
                self._bn_cache = None
            if self.final == "averaged":
                self.averager.copy_to(self.model)
        elif not self._ended and (self.steps > 0 or self.epochs > 0):
            end = f"{self._end_name}='{self.window_end}'" if self.window_end is not None else "the end"
            warnings.warn(
                f"{self!r} made no update in this run ({self.steps} steps, {self.epochs} epochs counted; "
                f"window from {self._start_name}='{self.window_start}' ({self._t_start}) to {end}): "
                "the model keeps its training weights. Check the window against the run's length "
                "and the units the trainer counts", RuntimeWarning, stacklevel=2)
        skipped = self.averager.num_skipped if self.averager is not None else 0
        if skipped and not self._ended:
            warnings.warn(f"{self.name}: {skipped} update(s) were skipped because the weights held NaN/Inf "
                          "(the average kept its last finite value)", RuntimeWarning, stacklevel=2)
        self.detach()
        self._ended = True

    # ------------------------------------------------------------------ events

    def _make_pre_hook(self, i: int) -> Callable[..., None]:
        ref = weakref.ref(self)

        def hook(opt: Optimizer, args: Any, kwargs: Any) -> None:
            me = ref()
            if me is not None:
                me._before_step(i)
        return hook

    def _make_post_hook(self, i: int) -> Callable[..., None]:
        ref = weakref.ref(self)

        def hook(opt: Optimizer, args: Any, kwargs: Any) -> None:
            me = ref()
            if me is None:
                return
            # fused/capturable optimizers under AMP: GradScaler calls step() with `found_inf` set
            # and the kernel skips the update itself; such a step is not counted (one host sync)
            found_inf = getattr(opt, "found_inf", None)
            if isinstance(found_inf, Tensor) and bool(found_inf.ne(0).any()):
                return
            me._after_step(i)
        return hook

    def _before_step(self, i: int) -> None:
        self._apply_lr(before_step=True)

    def _after_step(self, i: int) -> None:
        self._counts[i] += 1
        n = min(self._counts)
        if n > self.steps:
            self.steps = n
            self._step_event()

    def on_step(self) -> None:
        """Count one optimizer step by hand (only for a policy begun without optimizers).

        Raises:
            StateError: before :meth:`begin`, after :meth:`end`, or for a policy that counts its
                optimizers' steps through hooks.
        """
        self._require_running("on_step()")
        if self._optimizers:
            raise StateError("on_step() is for policies begun without optimizers: this one counts "
                             "the steps of its optimizers through hooks already")
        self.steps += 1
        self._step_event()

    def _step_event(self) -> None:
        t = self.steps
        if self._anchor is None and self._window(t, self.epochs, epoch_event=False):
            self._open_window(t - 1, self.epochs)
        if self.should_update(step_idx=t - 1):
            self._update()
        self._apply_lr()

    def on_epoch_end(self) -> None:
        """Tell the policy that an epoch ended (call once per epoch, after its last step).

        Raises:
            StateError: before :meth:`begin` or after :meth:`end`.
        """
        self._require_running("on_epoch_end()")
        self.epochs += 1
        if self._anchor is None and self._window(self.steps, self.epochs, epoch_event=True):
            self._open_window(self.steps, self.epochs - 1)
        if self.should_update(epoch_idx=self.epochs - 1):
            self._update()
        self._apply_lr()

    def should_update(self, step_idx: int | None = None, epoch_idx: int | None = None) -> bool:
        """Whether to update the average now: after step ``step_idx`` or epoch ``epoch_idx``.

        Exactly one argument is given (0-based index of the step or epoch that just ended).
        Override to take control; the default averages inside the window, every
        ``update_interval`` counted from the window's opening.

        Returns:
            True to update now; always False before the window opens.
        """
        if self._anchor is None:
            return False
        interval = self._t_interval
        if step_idx is not None:
            if interval.unit != "step" or not self._window(self.steps, self.epochs, epoch_event=False):
                return False
            return (self.steps - self._anchor[0]) % interval.value == 0
        if epoch_idx is not None:
            if interval.unit != "epoch" or not self._window(self.steps, self.epochs, epoch_event=True):
                return False
            return (self.epochs - self._anchor[1]) % interval.value == 0
        return False

    def _ticks(self, steps: int) -> int:
        """The trainer's clock at policy step ``steps`` (the current one, or the next)."""
        assert self._clock is not None
        return int(self._clock()) + (steps - self.steps)

    def _window(self, steps: int, epochs: int, *, epoch_event: bool) -> bool:
        s, e = self._t_start, self._t_end
        if s.unit == "tick":
            after = self._ticks(steps) > s.value
        elif s.unit == "step":
            after = steps > s.value
        else:
            after = epochs > s.value if epoch_event else epochs >= s.value
        if not after:
            return False
        if e is None:
            return True
        if e.unit == "tick":
            return self._ticks(steps) <= e.value
        if e.unit == "step":
            return steps <= e.value
        return epochs <= e.value if epoch_event else epochs < e.value

    @property
    def in_phase(self) -> bool:
        """True while the averaging window is open (the next step lies inside it)."""
        return self.model is not None and self._window(self.steps + 1, self.epochs, epoch_event=False)

    def _open_window(self, steps: int, epochs: int) -> None:
        self._anchor = (steps, epochs)

    @torch.no_grad()
    def _update(self) -> None:
        assert self.averager is not None and self.model is not None
        updated = self.averager.update(self.model, step=max(self.steps, self.averager.step))
        if updated and self._has_bn:
            self.bn_stale = True
        if updated:
            return
        # refused on the host (nonfinite="skip"). A deferred, device-side check always reports
        # True here and its refusals surface at the next read (and in end()'s total): reading
        # num_skipped after every update would be a host sync per step.
        skipped = self.averager.num_skipped
        if skipped > self._skips_warned and skipped & (skipped - 1) == 0:  # 1, 2, 4, 8...: not every step
            self._skips_warned = skipped
            warnings.warn(f"{self.name}: {skipped} update(s) skipped so far because the weights held NaN/Inf "
                          f"(at step {self.steps}); the average keeps its last finite value",
                          RuntimeWarning, stacklevel=2)

    # ------------------------------------------------------------------ learning rate

    def _resolve_lr_plan(self, resolve: Callable[[Duration, str], _Time]) -> _LRPlan | None:
        plan = self._lr_plan()
        if plan is not None:
            plan.length = resolve(plan.length_d, plan.length_name)
            if plan.cyclic and plan.length.value < 1:
                raise bad_arg(plan.length_name, str(plan.length_d), "a cycle of at least one step")
        return plan

    def _apply_lr(self, *, before_step: bool = False) -> None:
        """Set the learning rate of the next step (called after events and before every step)."""
        if not self._window(self.steps + 1, self.epochs, epoch_event=False):
            return  # outside the window the learning rate is the user's
        if self._anchor is None:
            self._open_window(self.steps, self.epochs)
        plan = self._plan
        if plan is None or self._anchor is None:
            return
        if self._start_lrs is None:
            # the phase starts from the rate the first step of the window would use: read it right
            # before that step, after the user's scheduler stepped (not when the window opens)
            if not before_step:
                return
            self._start_lrs = [group_lr(g) for o in self._optimizers for g in o.param_groups]
        length = plan.length
        index = (self.steps - self._anchor[0]) if length.unit == "step" else (self.epochs - self._anchor[1])
        k = 0
        for opt in self._optimizers:
            for g in opt.param_groups:
                if plan.cyclic:
                    top = plan.max_lrs[k] if plan.max_lrs is not None else self._start_lrs[k]
                    lr = swa_cyclic_lr(top, plan.lrs[k], index, length.value, plan.strategy)
                else:
                    lr = swa_anneal_lr(self._start_lrs[k], plan.lrs[k], index, length.value,
                                       plan.strategy)
                _set_lr(g, lr)
                k += 1

    # ------------------------------------------------------------------ evaluation & export

    @property
    def active(self) -> bool:
        """True between :meth:`begin` and :meth:`end`."""
        return self.model is not None and not self._ended

    @property
    def has_average(self) -> bool:
        """True once the average holds at least one snapshot."""
        return self.averager is not None and self.averager.num_updates > 0

    @property
    def num_updates(self) -> int:
        """Snapshots averaged so far."""
        return self.averager.num_updates if self.averager is not None else 0

    def _recompute(self, *, sync: bool) -> None:
        """Recompute BN statistics of the weights now in the model (RNG and modes preserved)."""
        assert self.model is not None and self._bn_data is not None
        with torch.random.fork_rng(devices=[]):
            recompute_bn(self.model, self._bn_data, num_batches=self.bn_batches,
                         device=self._bn_device, forward_fn=self._bn_forward, sync_ranks=sync)

    @contextlib.contextmanager
    def averaged(self, *, collective: bool = True) -> Iterator[nn.Module]:
        """The model with the averaged weights in it, restored on exit; BN statistics fresh.

        If nothing has been averaged yet the model is yielded unchanged (training weights).
        BatchNorm statistics of the averaged weights are recomputed when stale (pooled over the
        ranks of torch.distributed) or, when they are averaged (EMA's default) under
        torch.distributed, replaced by their mean over the ranks (each rank averaged its local
        running statistics; EMA and SWA are linear, so this is the average of the ranks' mean
        statistics, identical on every rank). Either result is kept for later evaluations until
        the next update; nothing in the training state changes (weights, optimizer, counters, RNG).

        Args:
            collective: every rank enters this call (evaluation, checkpoint hooks that run on
                all ranks). ``False`` for a path only some ranks take (e.g. saving on rank 0):
                no collective runs; the statistics kept from the last collective call are used
                if no update happened since, otherwise this rank's own (recomputed from its
                ``bn_data`` only, or its local averages).

        Yields:
            The model itself, holding the averaged weights for the block.

        Raises:
            StateError: before :meth:`begin`.
        """
        self._require_begun()
        assert self.model is not None
        if not self.has_average:
            yield self.model
            return
        assert self.averager is not None
        with self.averager.swapped_in(self.model):
            self._fresh_bn(collective=collective)
            yield self.model

    def _bn_needs_work(self) -> bool:
        if not self._has_bn:
            return False
        if self._recompute_enabled():
            return self.bn_stale
        return _world_size() > 1  # averaged local statistics: reconcile the ranks

    @torch.no_grad()
    def _fresh_bn(self, *, collective: bool = True) -> None:
        """Inside swapped_in: put the evaluation BN statistics of the averaged weights in the model."""
        if not self._bn_needs_work():
            return
        assert self.model is not None and self.averager is not None
        n = self.averager.num_updates
        buffers = {nm: t for nm, (t, is_param) in named_tensors(self.model).items() if not is_param}
        if self._bn_cache is not None and self._bn_cache[0] == n:  # no update since: reuse
            for nm, t in self._bn_cache[1].items():
                buffers[nm].copy_(t)
            return
        if self._recompute_enabled():
            self._recompute(sync=collective)
        elif collective:
            _mean_over_ranks([t for m in _stat_layers(self.model) for t in (m.running_mean, m.running_var)
                              if t is not None and t.is_floating_point()])
        if collective:
            self._bn_cache = (n, {nm: t.detach().clone() for nm, t in buffers.items()})

    @torch.no_grad()
    def export_state_dict(self, *, collective: bool = True) -> dict[str, Tensor]:
        """The averaged weights (fresh BN statistics) as a state dict of the model, its own names.

        Nothing in the policy or the model changes. Before any update: the model's own weights.
        ``collective``: as for :meth:`averaged` (pass ``False`` on a path not every rank takes).

        Returns:
            Name -> tensor (fresh copies), the keys of ``model.state_dict()``.

        Raises:
            StateError: before :meth:`begin`.
        """
        self._require_begun()
        assert self.model is not None
        with self.averaged(collective=collective) as m:
            return {k: v.detach().clone() for k, v in m.state_dict().items()}

    # ------------------------------------------------------------------ checkpointing

    def state_dict(self) -> dict[str, Any]:
        """Counters, window, learning-rate anchor and the averager's state.

        Tensors are views of the live averages (``torch.save`` them; clone to keep in memory).

        Returns:
            A dict of plain data and tensors (``torch.load(..., weights_only=True)`` reads it
            back); before :meth:`begin`, a state given to :meth:`load_state_dict` as it was given.
        """
        pending = self._pending
        if self.averager is None and pending is not None:
            return dict(pending)
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "kind": self._kind,
            "steps": self.steps,
            "counts": list(self._counts),
            "epochs": self.epochs,
            "anchor": list(self._anchor) if self._anchor is not None else None,
            "start_lrs": list(self._start_lrs) if self._start_lrs is not None else None,
            "bn_stale": self.bn_stale,
            "averager": self.averager.state_dict() if self.averager is not None else None,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`; before :meth:`begin` it is kept and applied by ``begin``.

        Raises:
            StateError: not a policy state, a newer format, or another kind of policy's state.
            MismatchError: the saved averages do not pair with the model's tensors (when applied).
        """
        if not isinstance(state, Mapping) or state.get("format") != FORMAT:
            raise StateError("state is not a weightavg policy state_dict (missing 'format' key)")
        version = state.get("format_version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise StateError(f"policy state has format_version={version!r}; "
                             f"this weightavg reads <= {FORMAT_VERSION}")
        if state.get("kind") != self._kind:
            raise StateError(f"policy state was saved by a {state.get('kind')!r} policy, "
                             f"this is a {self._kind!r} policy")
        if self.averager is None:
            self._pending = state
        else:
            self._apply_state(state)

    def _apply_state(self, state: Mapping[str, Any]) -> None:
        assert self.averager is not None
        if state.get("averager") is not None:
            self.averager.load_state_dict(state["averager"])
            if self.model is not None:
                self.averager.follow(self.model)  # copied tensors track the live model, as before
        else:
            self.averager.reset()
        self.steps = int(state["steps"])
        counts = [int(c) for c in state["counts"]]
        self._counts = counts if len(counts) == len(self._optimizers) else [self.steps] * len(self._optimizers)
        self.epochs = int(state["epochs"])
        anchor = state["anchor"]
        self._anchor = (int(anchor[0]), int(anchor[1])) if anchor is not None else None
        lrs = state["start_lrs"]
        self._start_lrs = [float(x) for x in lrs] if lrs is not None else None
        self.bn_stale = bool(state["bn_stale"])
        self._bn_cache = None

    # ------------------------------------------------------------------ misc

    def _require_begun(self) -> None:
        if self.model is None:
            if self._elsewhere:
                raise StateError(f"{type(self).__name__}.begin() was not called in this process: {self._elsewhere}")
            raise StateError(f"{type(self).__name__}.begin(model, optimizers) was not called yet")

    def _require_running(self, what: str) -> None:
        self._require_begun()
        if self._ended:
            raise StateError(f"{what} after {type(self).__name__}.end(): the run is over and the "
                             "model may hold the averaged weights; call begin() to start a new run")

    def _extra_repr(self) -> str:
        return ""

    def __repr__(self) -> str:
        end = f"'{self.window_end}'" if self.window_end is not None else None
        return (f"{type(self).__name__}({self._extra_repr()}{self._start_name}='{self.window_start}', "
                f"{self._end_name}={end}, update_interval='{self.update_interval}', "
                f"eval_with={self.eval_with!r}, final={self.final!r}, name={self.name!r})")


@dataclass
class _LRPlan:
    """The learning-rate phase of a policy (resolved at begin)."""

    arg: str
    value: float | Sequence[float]
    length_d: Duration
    length_name: str
    strategy: str
    cyclic: bool = False
    max_value: float | Sequence[float] | None = None
    length: _Time = _Time(0, "step")  # resolved length of the anneal or of a cycle
    lrs: list[float] = field(default_factory=list)  # swa_lr of every param group
    max_lrs: list[float] | None = None  # top of each cycle per param group (None: lr at start)


class SWA(AveragingPolicy):
    """Stochastic Weight Averaging: an equal average of the weights in the window, BN refreshed.

    With ``swa_lr``, the learning rate of every param group anneals from its value when the window
    opens to ``swa_lr`` in ``anneal_steps`` and stays there until ``swa_end`` (or cycles, with
    ``cycle``); without it the learning rate is never touched. Your own scheduler keeps running:
    inside the window the policy sets the rate right before each optimizer step.

    .. note::
        After ``n`` snapshots ``θ_SWA = (θ_1 + ... + θ_n) / n``. Snapshots are taken every
        ``update_interval`` inside ``(swa_start, swa_end]`` (with ``update_interval='1ep'``: at the
        end of every epoch whose 0-based index is in ``[swa_start, swa_end)``).

    Args:
        swa_start: when averaging starts (default ``'0.7dur'``, as Composer).
        swa_end: when it stops (default: end of training).
        update_interval: time between snapshots (default ``'1ep'``; with ``cycle``: the cycle).
        swa_lr: constant learning rate of the SWA phase; a float or one per param group (across
            the hooked optimizers, in order). ``None`` (default): the learning rate is untouched.
        anneal_strategy: ``'cos'`` (default) or ``'linear'``.
        anneal_steps: length of the anneal to ``swa_lr`` (default ``'10ep'``; ``0``: jump).
            Its unit sets how often the rate changes: per epoch for whole epochs, else per step.
        cycle: cycle length for a cyclic SWA phase (the SWA paper's cycle; fast-SWA's cosine
            schedule is :class:`~weightavg.FastSWALR`): each cycle goes from
            ``cycle_max_lr`` (default: the rate when the window opens) down to ``swa_lr``.
        cycle_max_lr: top of each cycle; a float or one per param group.
        avg_fn: custom ``avg_fn(averaged, new, num_averaged) -> Tensor`` per tensor
            (``torch.optim.swa_utils`` convention), instead of the equal mean.
        **kwargs: see :class:`AveragingPolicy` (``eval_with``, ``final``, ``recompute_bn``,
            ``bn_batches``, averager options...).

    Raises:
        ConfigError: bad times, ``swa_lr``/``cycle_max_lr`` values, ``anneal_strategy``, a
            ``cycle`` that is not a positive 'ba'/'ep' duration or comes without ``swa_lr``,
            ``cycle_max_lr`` without ``cycle``, an ``avg_fn`` that is not callable, or any
            :class:`AveragingPolicy` argument.

    Examples:
        >>> import torch, weightavg
        >>> model = torch.nn.Linear(2, 1)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> swa = weightavg.SWA(swa_start=2, update_interval=1)
        >>> swa.begin(model, opt)
        >>> for _ in range(4):
        ...     model(torch.randn(3, 2)).sum().backward(); opt.step(); opt.zero_grad()
        >>> swa.num_updates  # steps 3 and 4
        2

    References:
        Izmailov et al., *Averaging Weights Leads to Wider Optima and Better Generalization*,
        UAI 2018. Athiwaratkun et al., *There Are Many Consistent Explanations of Unlabeled
        Data: Why You Should Average*, ICLR 2019 (fast-SWA).
    """

    _kind = "swa"

    def __init__(
        self,
        swa_start: TimeLike = "0.7dur",
        swa_end: TimeLike | None = None,
        update_interval: TimeLike | None = None,
        *,
        swa_lr: float | Sequence[float] | None = None,
        anneal_strategy: Literal["cos", "linear"] = "cos",
        anneal_steps: TimeLike = "10ep",
        cycle: TimeLike | None = None,
        cycle_max_lr: float | Sequence[float] | None = None,
        avg_fn: Callable[[Tensor, Tensor, Tensor], Tensor] | None = None,
        **kwargs: Any,
    ) -> None:
        cycle_d = _parse("cycle", cycle, allow_none=True)
        if update_interval is None:
            update_interval = cycle_d if cycle_d is not None else "1ep"
        super().__init__(start=swa_start, end=swa_end, update_interval=update_interval,
                         start_name="swa_start", end_name="swa_end", **kwargs)
        anneal_factor(anneal_strategy, 0.0)  # validates the name
        self.anneal_steps = _parse("anneal_steps", anneal_steps)
        if swa_lr is not None:
            per_group("swa_lr", swa_lr, len(swa_lr) if isinstance(swa_lr, Sequence) else 1)
        if cycle_d is not None:
            if cycle_d.value <= 0 or cycle_d.unit == "dur":
                raise bad_arg("cycle", cycle, "a positive duration in 'ba' or 'ep'")
            if swa_lr is None:
                raise bad_arg("swa_lr", None, "the lowest learning rate of each cycle (cycle is set)")
        if cycle_max_lr is not None:
            if cycle_d is None:
                raise bad_arg("cycle_max_lr", cycle_max_lr, "None unless cycle is set")
            per_group("cycle_max_lr", cycle_max_lr,
                      len(cycle_max_lr) if isinstance(cycle_max_lr, Sequence) else 1)
        if avg_fn is not None and not callable(avg_fn):
            raise bad_arg("avg_fn", avg_fn, "a callable (averaged, new, num_averaged) -> Tensor")
        self.swa_lr = swa_lr
        self.anneal_strategy = anneal_strategy
        self.cycle = cycle_d
        self.cycle_max_lr = cycle_max_lr
        self.avg_fn = avg_fn

    def _extra_repr(self) -> str:
        out = f"swa_lr={self.swa_lr!r}, " if self.swa_lr is not None else ""
        return out + (f"cycle='{self.cycle}', " if self.cycle is not None else "")

    def _make_rule(self, resolve: Callable[[Duration, str], _Time]) -> Rule:
        if self.avg_fn is None:
            return mean()
        fn = self.avg_fn

        def apply(avgs: Sequence[Tensor], news: Sequence[Tensor], n: int) -> None:
            count = torch.tensor(n)
            for a, x in zip(avgs, news, strict=True):
                a.copy_(fn(a, x.to(a.dtype), count))
        return inplace(apply, name=getattr(fn, "__name__", "avg_fn"))

    def _lr_plan(self) -> _LRPlan | None:
        if self.swa_lr is None:
            return None
        if self.cycle is not None:
            return _LRPlan("swa_lr", self.swa_lr, self.cycle, "cycle", self.anneal_strategy,
                           cyclic=True, max_value=self.cycle_max_lr)
        assert self.anneal_steps is not None
        return _LRPlan("swa_lr", self.swa_lr, self.anneal_steps, "anneal_steps", self.anneal_strategy)


class EMA(AveragingPolicy):
    """Exponential moving average of the weights, updated every ``update_interval``.

    Give ``half_life`` (default ``'1000ba'``) or ``smoothing``. With ``half_life`` the decay per
    update follows the real time between updates, so ``update_interval`` does not change the time
    scale; ``smoothing`` is the decay per update (Composer's convention).

    .. note::
        ``θ_EMA ← d · θ_EMA + (1 − d) · θ`` with ``d = 2^(−Δ/h)`` (``Δ`` steps since the previous
        update, ``h`` the half-life in steps) or ``d = smoothing``. The first update copies. With
        ``warmup=True`` the decay is ``min(d, 1 − (1 + s)^(−warmup_power))`` at ``s`` steps after
        ``ema_start`` (timm, diffusers), so early weights are forgotten fast.

    Args:
        half_life: half-life of a snapshot's weight (a duration; default ``'1000ba'``).
        smoothing: decay per update in [0, 1), instead of ``half_life``.
        ema_start: when averaging starts (default 0).
        update_interval: time between updates (default: one unit of ``half_life``, or ``'1ba'``).
        ema_end: when averaging stops (default: end of training).
        warmup: warm the decay up from 0 (see the note).
        warmup_power: exponent of the warmup (2/3 for long runs, 3/4 for short ones).
        recompute_bn: default ``False``: BatchNorm statistics are averaged along with the weights
            (``buffers='average'``); ``True`` recomputes them like :class:`SWA`.
        **kwargs: see :class:`AveragingPolicy`.

    Raises:
        ConfigError: both ``half_life`` and ``smoothing``, a value out of range, a bad
            ``warmup``/``warmup_power``, or any :class:`AveragingPolicy` argument.

    Examples:
        >>> import torch, weightavg
        >>> model = torch.nn.Linear(2, 1)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> ema = weightavg.EMA(smoothing=0.9)
        >>> ema.begin(model, opt)
        >>> for _ in range(3):
        ...     model(torch.randn(3, 2)).sum().backward(); opt.step(); opt.zero_grad()
        >>> ema.num_updates
        3
    """

    _kind = "ema"

    def __init__(
        self,
        half_life: TimeLike | None = None,
        smoothing: float | None = None,
        ema_start: TimeLike = 0,
        update_interval: TimeLike | None = None,
        *,
        ema_end: TimeLike | None = None,
        warmup: bool = False,
        warmup_power: float = 2 / 3,
        recompute_bn: bool = False,
        **kwargs: Any,
    ) -> None:
        if half_life is not None and smoothing is not None:
            raise bad_arg("half_life/smoothing", (half_life, smoothing), "only one of them")
        if smoothing is not None:
            ema(smoothing=smoothing)  # validates
            hl = None
        else:
            hl = _parse("half_life", half_life if half_life is not None else "1000ba")
            assert hl is not None
            if hl.value <= 0:
                raise bad_arg("half_life", half_life, "a positive duration")
        if update_interval is None:
            update_interval = Duration(1, hl.unit) if hl is not None and hl.unit != "dur" else "1ba"
        if not isinstance(warmup, bool):
            raise bad_arg("warmup", warmup, "True or False")
        if not (isinstance(warmup_power, (int, float)) and warmup_power > 0):
            raise bad_arg("warmup_power", warmup_power, "a positive number")
        super().__init__(start=ema_start, end=ema_end, update_interval=update_interval,
                         recompute_bn=recompute_bn, start_name="ema_start", end_name="ema_end",
                         **kwargs)
        self.half_life = hl
        self.smoothing = smoothing
        self.warmup = warmup
        self.warmup_power = float(warmup_power)

    def _extra_repr(self) -> str:
        if self.half_life is not None:
            return f"half_life='{self.half_life}', "
        return f"smoothing={self.smoothing}, "

    def _make_rule(self, resolve: Callable[[Duration, str], _Time]) -> Rule:
        if self.half_life is not None:
            h = resolve(self.half_life, "half_life")
            if h.unit != "step":
                raise ConfigError(f"half_life='{self.half_life}' cannot be counted by this training "
                                  "loop: an epoch half-life needs steps_per_epoch")
            if h.value <= 0:
                raise bad_arg("half_life", str(self.half_life), "at least one step")
            if not self.warmup:
                return ema(half_life=h.value)
            interval = self._interval_steps(resolve)
            decay = 2.0 ** (-interval / h.value)
        else:
            assert self.smoothing is not None
            if not self.warmup:
                return ema(smoothing=self.smoothing)
            decay = self.smoothing
        start = resolve(self.window_start, "ema_start") if self.window_start is not None else _Time(0, "step")
        if start.unit != "step":
            raise ConfigError(f"ema_start='{self.window_start}' with warmup=True cannot be counted by this "
                              "training loop: it needs steps_per_epoch")
        return ema_warmup(inv_gamma=1.0, power=self.warmup_power, max_decay=min(decay, 0.999999),
                          start_step=start.value)

    def _interval_steps(self, resolve: Callable[[Duration, str], _Time]) -> int:
        assert self.update_interval is not None
        t = resolve(self.update_interval, "update_interval")
        if t.unit != "step":
            raise ConfigError(f"update_interval='{self.update_interval}' with warmup=True cannot "
                              "be counted by this training loop: it needs steps_per_epoch")
        return t.value



def _world_size() -> int:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return int(dist.get_world_size())


def _mean_over_ranks(tensors: list[Tensor]) -> None:
    """Replace each tensor by its mean over the ranks (one all_reduce of their concatenation)."""
    import torch.distributed as dist

    if not tensors or _world_size() < 2:
        return
    flat = torch.cat([t.detach().reshape(-1).to(torch.float64) for t in tensors])
    dist.all_reduce(flat)
    flat.div_(dist.get_world_size())
    off = 0
    for t in tensors:
        t.copy_(flat[off : off + t.numel()].view_as(t))
        off += t.numel()


@torch.no_grad()
def _probe_bn(model: nn.Module, data: Iterable[Any], forward_fn: Callable[[nn.Module, Any], Any] | None,
              device: torch.device | str | None) -> None:
    """Run one batch of ``data`` through ``forward_fn`` in eval mode; every mode, buffer and the
    RNG are as before afterwards. A failure is a ConfigError naming bn_data/bn_forward_fn."""
    from ._bn import _default_forward, _to

    modes = {m: m.training for m in model.modules()}
    buffers = [(b, b.clone()) for b in model.buffers()
               if not isinstance(b, nn.parameter.UninitializedBuffer)]
    what = "bn_forward_fn" if forward_fn is not None else "the default BatchNorm forward (model(batch[0]) " \
        "for tuples, model(**batch) for dicts, model(batch) for tensors)"
    try:
        with torch.random.fork_rng(devices=[]):
            batch = next(iter(data), _NO_BATCH)
            if batch is _NO_BATCH:
                raise bad_arg("bn_data", type(data).__name__,
                              "batches to recompute BatchNorm statistics from: it yielded none")
            model.eval()
            try:
                (forward_fn or _default_forward)(model, _to(batch, torch.device(device) if device else None))
            except Exception as err:
                raise ConfigError(
                    f"bn_data/bn_forward_fn: one batch of bn_data ({type(batch).__name__}) could not be "
                    f"run through {what}: {type(err).__name__}: {err}. BatchNorm statistics of the averaged "
                    "weights are recomputed from these batches before evaluation and at the end; pass "
                    "bn_forward_fn=fn(model, batch) (e.g. a GAN generator fed noise) and/or bn_data= "
                    "batches the model takes, or recompute_bn=False") from err
    finally:
        for m, mode in modes.items():
            m.training = mode
        for b, old in buffers:
            b.copy_(old)


_NO_BATCH = object()
