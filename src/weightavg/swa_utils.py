"""Drop-in replacement for ``torch.optim.swa_utils``, built on :class:`weightavg.Averager`.

Same names, signatures and semantics as ``torch.optim.swa_utils`` (``AveragedModel``, ``SWALR``,
``update_bn``, ``get_ema_multi_avg_fn``, ``get_swa_multi_avg_fn``, ``get_ema_avg_fn``,
``get_swa_avg_fn``); change the import and nothing else::

    from weightavg.swa_utils import SWALR, AveragedModel, update_bn

:class:`AveragedModel` keeps ``self.module`` (a deep copy of the model) and the ``state_dict``
layout (``n_averaged``, ``module.*``), so a checkpoint written by either class loads in the other.
The averaging itself is done by one :class:`weightavg.Averager` whose storage *is* the module's
tensors: there is no second copy, and ``state_dict()`` shows the averages. The averages keep the
model's dtype, as torch does (use :class:`weightavg.Averager` directly for float32 averages of a
bf16/fp16 model). :class:`SWALR` reproduces torch's learning rates exactly.

Differences from ``torch.optim.swa_utils`` (each is where torch is wrong or slow; each has a test in
``tests/test_swa_utils.py``):

1. **Integer buffers are copied, not averaged.** With ``use_buffers=True`` torch averages
   BatchNorm's ``num_batches_tracked`` (an int64 counter) and truncates the result back to an
   integer, which freezes an EMA's counter near its first value. Here integer and bool buffers
   always take the model's latest value.
2. **Tensors are paired by name.** torch zips ``parameters()`` by position and silently stops at
   the shorter list, so a structurally different model averages the wrong tensors together. Here a
   model whose parameter/buffer names or shapes differ raises :class:`weightavg.MismatchError`
   listing the names that differ.
3. **No host synchronisation per update.** torch reads ``n_averaged`` on the host at every update
   (``bool(self.n_averaged == 0)``), which stalls an accelerator. Here the count is a Python int in
   the engine; the ``n_averaged`` buffer is only mirrored with ``fill_`` (no read). Consequently,
   writing into ``n_averaged`` by hand has no effect; load a state dict to set it.
4. **Fused updates everywhere, CPU included.** torch's default average on CPU loops over tensors
   with ``avg + (x − avg) / (n + 1)``; here the engine packs small tensors and updates each storage
   group with a handful of kernels (``lerp``), on every device. Results agree with torch's to
   floating-point rounding (the engine's ``lerp`` is the same operation torch uses on GPU).
   Known rules (``get_ema_multi_avg_fn``, ``get_swa_multi_avg_fn``, ``get_ema_avg_fn``,
   ``get_swa_avg_fn`` from *this* module) take the fused path; any other ``avg_fn`` /
   ``multi_avg_fn`` is called as torch calls it (on the float tensors only, see 1).
5. **Non-persistent buffers are copied, never averaged** (torch averages them under
   ``use_buffers=True``); they are constants such as masks or rotary tables.
6. **Errors are explicit.** Passing both ``avg_fn`` and ``multi_avg_fn`` raises
   :class:`weightavg.ConfigError` (torch: a bare ``AssertionError``); bad ``swa_lr``,
   ``anneal_epochs`` and ``anneal_strategy`` values raise ``ConfigError`` (a ``ValueError``) naming
   the argument.

Keyword-only extension: ``AveragedModel(..., nonfinite="allow")`` (default, torch's behaviour);
``"raise"`` or ``"skip"`` refuse updates from a model holding NaN/Inf (one host read per update).

:func:`update_bn` keeps torch's semantics exactly (momentum-free cumulative statistics over one
pass, the whole model in train mode); :func:`weightavg.recompute_bn` is the better tool: exact
sample-weighted statistics, only the normalisation layers in train mode, ``num_batches``, dict
batches, and state restored if the pass fails.

References:
    Izmailov et al., "Averaging Weights Leads to Wider Optima and Better Generalization" (UAI 2018).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from ._engine import FORMAT_VERSION, Averager, NonFinitePolicy, named_tensors, unwrap_model
from ._errors import MismatchError, StateError, bad_arg, describe_mismatch
from ._rules import Rule, custom, ema, inplace, mean
from ._schedules import ANNEAL_STRATEGIES, anneal_factor
from ._sharded import refuse_dtensor_model

__all__ = [
    "SWALR",
    "AveragedModel",
    "get_ema_avg_fn",
    "get_ema_multi_avg_fn",
    "get_swa_avg_fn",
    "get_swa_multi_avg_fn",
    "update_bn",
]

ParamList = Sequence[Tensor]
AvgFn = Callable[[Tensor, Tensor, Tensor | int], Tensor]
MultiAvgFn = Callable[[ParamList, ParamList, Tensor | int], None]


# ----------------------------------------------------------------------------- averaging functions


def _check_decay(decay: float) -> float:
    if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0.0 <= decay <= 1.0:
        raise bad_arg("decay", decay, "a number in [0, 1]")
    return float(decay)


def _never(num_averaged: int) -> float:
    return 0.0


def _ema_rule(decay: float) -> Rule:
    if decay < 1.0:
        return ema(decay=decay)
    return custom(_never, name="ema(decay=1)")  # frozen at the first snapshot


class _RuleFn:
    """A torch-compatible averaging callable that also carries the engine rule it stands for.

    :class:`AveragedModel` reads :attr:`weightavg_rule` and runs the engine's fused update instead
    of calling the function; ``torch.optim.swa_utils.AveragedModel`` just calls it.
    """

    #: "multi" (lists of tensors, in place) or "single" (one tensor, returns the new average)
    arity: str = "multi"
    weightavg_rule: Rule

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.weightavg_rule!r})"


class _EmaMulti(_RuleFn):
    arity = "multi"

    def __init__(self, decay: float) -> None:
        self.decay = decay
        self.weightavg_rule = _ema_rule(decay)

    @torch.no_grad()
    def __call__(self, averaged: ParamList, current: ParamList, num_averaged: Tensor | int) -> None:
        _lerp_lists(averaged, current, 1.0 - self.decay)


class _SwaMulti(_RuleFn):
    arity = "multi"

    def __init__(self) -> None:
        self.weightavg_rule = mean()

    @torch.no_grad()
    def __call__(self, averaged: ParamList, current: ParamList, num_averaged: Tensor | int) -> None:
        _lerp_lists(averaged, current, _swa_weight(num_averaged, averaged[0] if averaged else None))


class _EmaSingle(_RuleFn):
    arity = "single"

    def __init__(self, decay: float) -> None:
        self.decay = decay
        self.weightavg_rule = _ema_rule(decay)

    @torch.no_grad()
    def __call__(self, averaged: Tensor, current: Tensor, num_averaged: Tensor | int) -> Tensor:
        if not (averaged.is_floating_point() or averaged.is_complex()):
            return current.clone()
        return torch.lerp(averaged, current.to(averaged.dtype), 1.0 - self.decay)


class _SwaSingle(_RuleFn):
    arity = "single"

    def __init__(self) -> None:
        self.weightavg_rule = mean()

    @torch.no_grad()
    def __call__(self, averaged: Tensor, current: Tensor, num_averaged: Tensor | int) -> Tensor:
        if not (averaged.is_floating_point() or averaged.is_complex()):
            return current.clone()
        return torch.lerp(averaged, current.to(averaged.dtype), _swa_weight(num_averaged, averaged))


def _swa_weight(num_averaged: Tensor | int, like: Tensor | None) -> Tensor | float:
    """``1 / (n + 1)``; a tensor count stays on its device (reading it would synchronise)."""
    if isinstance(num_averaged, Tensor):
        w = 1.0 / (num_averaged + 1)
        return w.to(like.dtype) if like is not None and like.is_floating_point() else w
    return 1.0 / (int(num_averaged) + 1)


def _lerp_lists(averaged: ParamList, current: ParamList, weight: Tensor | float) -> None:
    """``avg ← lerp(avg, new, weight)`` on float tensors; integer tensors take the new value."""
    if len(averaged) != len(current):
        raise MismatchError(f"got {len(averaged)} averaged tensors but {len(current)} new ones")
    floats = [(a, c) for a, c in zip(averaged, current, strict=True)
              if a.is_floating_point() or a.is_complex()]
    others = [(a, c) for a, c in zip(averaged, current, strict=True)
              if not (a.is_floating_point() or a.is_complex())]
    if floats:
        avg_f, cur_f = (list(x) for x in zip(*floats, strict=True))
        if isinstance(weight, Tensor):
            for a, c in zip(avg_f, cur_f, strict=True):
                a.lerp_(c, weight.to(a.device))
        else:
            torch._foreach_lerp_(avg_f, cur_f, weight)
    for a, c in others:
        a.copy_(c)


def get_ema_multi_avg_fn(decay: float = 0.999) -> MultiAvgFn:
    """In-place EMA over lists of tensors: ``avg ← decay · avg + (1 − decay) · θ``.

    .. note::
        :math:`W^{EMA}_0 = W_0`, :math:`W^{EMA}_{t+1} = d\\,W^{EMA}_t + (1-d)\\,W_{t+1}`.
        Integer tensors take the new value (torch truncates an average of them).

    Args:
        decay: decay in [0, 1] (default 0.999); 1 keeps the first snapshot forever.

    Returns:
        ``fn(averaged_list, current_list, num_averaged)``, usable as ``multi_avg_fn`` here and in
        ``torch.optim.swa_utils.AveragedModel``. Here it runs as the engine's fused EMA.

    Raises:
        ConfigError: ``decay`` outside [0, 1].

    Examples:
        >>> import torch
        >>> from weightavg.swa_utils import AveragedModel, get_ema_multi_avg_fn
        >>> model = torch.nn.Linear(2, 1)
        >>> ema_model = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9))
        >>> ema_model.update_parameters(model)
        >>> torch.equal(ema_model.module.weight, model.weight)  # the first update copies
        True
    """
    return _EmaMulti(_check_decay(decay))


def get_swa_multi_avg_fn() -> MultiAvgFn:
    """In-place equal average over lists of tensors: ``avg ← avg + (θ − avg) / (n + 1)``.

    Returns:
        ``fn(averaged_list, current_list, num_averaged)``; here it runs as the engine's fused mean.

    Examples:
        >>> import torch
        >>> from weightavg.swa_utils import get_swa_multi_avg_fn
        >>> avg, new = [torch.zeros(2)], [torch.ones(2)]
        >>> get_swa_multi_avg_fn()(avg, new, 3)  # in place: 0 + (1 - 0) / 4
        >>> avg[0]
        tensor([0.2500, 0.2500])
    """
    return _SwaMulti()


def get_ema_avg_fn(decay: float = 0.999) -> AvgFn:
    """EMA of one tensor: returns ``decay · avg + (1 − decay) · θ``.

    Args:
        decay: decay in [0, 1] (default 0.999).

    Returns:
        ``fn(averaged, current, num_averaged) -> Tensor``, usable as ``avg_fn``; here it runs as
        the engine's fused EMA.

    Raises:
        ConfigError: ``decay`` outside [0, 1].

    Examples:
        >>> import torch
        >>> from weightavg.swa_utils import get_ema_avg_fn
        >>> get_ema_avg_fn(0.75)(torch.zeros(2), torch.ones(2), 5)
        tensor([0.2500, 0.2500])
    """
    return _EmaSingle(_check_decay(decay))


def get_swa_avg_fn() -> AvgFn:
    """Equal average of one tensor: returns ``avg + (θ − avg) / (n + 1)``.

    Returns:
        ``fn(averaged, current, num_averaged) -> Tensor``; here it runs as the engine's fused mean.

    Examples:
        >>> import torch
        >>> from weightavg.swa_utils import get_swa_avg_fn
        >>> get_swa_avg_fn()(torch.zeros(2), torch.ones(2), 1)  # 0 + (1 - 0) / 2
        tensor([0.5000, 0.5000])
    """
    return _SwaSingle()


class _CallMulti:
    """Engine in-place rule calling a user ``multi_avg_fn`` as torch does (count as a tensor)."""

    def __init__(self, fn: MultiAvgFn) -> None:
        self.fn = fn

    def __call__(self, averaged: Sequence[Tensor], new: Sequence[Tensor], n: int) -> None:
        if not averaged:
            return
        dev = averaged[0].device
        count = torch.full((), n, dtype=torch.long, device=dev)  # a fill: no host-to-device copy
        self.fn(list(averaged), [t.to(dev) for t in new], count)


class _CallSingle:
    """Engine in-place rule calling a user ``avg_fn`` tensor by tensor, as torch does."""

    def __init__(self, fn: AvgFn) -> None:
        self.fn = fn

    def __call__(self, averaged: Sequence[Tensor], new: Sequence[Tensor], n: int) -> None:
        counts: dict[torch.device, Tensor] = {}
        for a, t in zip(averaged, new, strict=True):
            count = counts.get(a.device)
            if count is None:
                count = counts[a.device] = torch.full((), n, dtype=torch.long, device=a.device)
            a.copy_(self.fn(a, t.to(a.device), count))


def _rule_for(avg_fn: AvgFn | None, multi_avg_fn: MultiAvgFn | None) -> Rule:
    if avg_fn is not None and multi_avg_fn is not None:
        raise bad_arg("avg_fn/multi_avg_fn", (avg_fn, multi_avg_fn), "at most one of them")
    if multi_avg_fn is not None:
        if not callable(multi_avg_fn):
            raise bad_arg("multi_avg_fn", multi_avg_fn,
                          "a callable (averaged: list[Tensor], current: list[Tensor], n) -> None")
        if isinstance(multi_avg_fn, _RuleFn) and multi_avg_fn.arity == "multi":
            return multi_avg_fn.weightavg_rule
        return inplace(_CallMulti(multi_avg_fn), name=getattr(multi_avg_fn, "__name__", "multi_avg_fn"))
    if avg_fn is not None:
        if not callable(avg_fn):
            raise bad_arg("avg_fn", avg_fn, "a callable (averaged: Tensor, current: Tensor, n) -> Tensor")
        if isinstance(avg_fn, _RuleFn) and avg_fn.arity == "single":
            return avg_fn.weightavg_rule
        return inplace(_CallSingle(avg_fn), name=getattr(avg_fn, "__name__", "avg_fn"))
    return mean()


# ----------------------------------------------------------------------------- AveragedModel


def _aliases(t: Tensor, view: Tensor) -> bool:
    return (t.data_ptr() == view.data_ptr() and t.shape == view.shape and t.dtype == view.dtype
            and t.device == view.device and t.stride() == view.stride())


class AveragedModel(nn.Module):
    """Running average (SWA, EMA or custom) of a model's parameters, and optionally its buffers.

    Same constructor, attributes (``module``, ``n_averaged``, ``avg_fn``, ``multi_avg_fn``,
    ``use_buffers``) and ``state_dict`` as ``torch.optim.swa_utils.AveragedModel``; see the module
    docstring for the few deliberate differences.

    .. note::
        The first :meth:`update_parameters` copies the model. After that, with
        ``n = n_averaged``: SWA (default) ``avg ← avg + (θ − avg)/(n + 1)``, the mean of all
        snapshots; EMA (``get_ema_multi_avg_fn(d)``) ``avg ← d·avg + (1 − d)·θ``.

    Args:
        model: the model to average. It is deep-copied into :attr:`module`.
        device: if given, the averages live there (e.g. ``"cpu"`` for a GPU model).
        avg_fn: ``avg_fn(averaged, current, n_averaged) -> Tensor`` per tensor (default: SWA).
        multi_avg_fn: ``multi_avg_fn(averaged_list, current_list, n_averaged)`` in place.
            At most one of ``avg_fn`` / ``multi_avg_fn``.
        use_buffers: average floating-point buffers too (e.g. BatchNorm running statistics);
            otherwise buffers keep the model's latest value.
        nonfinite: ``"allow"`` (default, as torch), ``"raise"`` or ``"skip"`` updates from a model
            holding NaN/Inf (costs one host read per update on an accelerator).

    Raises:
        ConfigError: both ``avg_fn`` and ``multi_avg_fn``, or a non-callable one.

    Examples:
        >>> import torch
        >>> from weightavg.swa_utils import AveragedModel, get_ema_multi_avg_fn
        >>> model = torch.nn.Linear(3, 1)
        >>> ema_model = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9))
        >>> ema_model.update_parameters(model)
        >>> int(ema_model.n_averaged)
        1
        >>> sorted(ema_model.state_dict())
        ['module.bias', 'module.weight', 'n_averaged']
    """

    n_averaged: Tensor

    def __init__(
        self,
        model: nn.Module,
        device: int | str | torch.device | None = None,
        avg_fn: AvgFn | None = None,
        multi_avg_fn: MultiAvgFn | None = None,
        use_buffers: bool = False,
        *,
        nonfinite: NonFinitePolicy = "allow",
    ) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise bad_arg("model", type(model).__name__, "a torch.nn.Module")
        if not isinstance(use_buffers, bool):
            raise bad_arg("use_buffers", use_buffers, "True or False")
        rule = _rule_for(avg_fn, multi_avg_fn)
        # a copy of the whole model: not for sharded models (FSDP2 refuses deepcopy)
        refuse_dtensor_model(model, "weightavg.swa_utils.AveragedModel (a copy of the whole model; use "
                             "weightavg.Averager(model, rule=...), which averages each rank's shards in place)")
        dev = torch.device(device) if device is not None else None
        avg = Averager(model, rule=rule, buffers="average" if use_buffers else "copy", dtype=None,
                       device=dev, nonfinite=nonfinite)
        # Deep-copy the model with every tracked tensor replaced by its slot in the engine's
        # storage, so the copy never exists twice; whatever the memo misses is re-pointed below.
        src = named_tensors(model)
        memo: dict[int, Any] = {}
        with torch.no_grad():
            for name, view in avg.averaged_tensors().items():
                t, is_param = src[name]
                view.copy_(t.detach())
                if is_param and type(t) is nn.Parameter:
                    memo[id(t)] = nn.Parameter(view, requires_grad=t.requires_grad)
                elif not is_param and type(t) is Tensor:
                    memo[id(t)] = view
        self.module = copy.deepcopy(model, memo)
        if dev is not None and any(t.device != dev for t in self._all_tensors()):
            self.module = self.module.to(dev)
        self.register_buffer("n_averaged", torch.tensor(0, dtype=torch.long, device=dev))
        self.avg_fn = avg_fn
        self.multi_avg_fn = multi_avg_fn
        self.use_buffers = use_buffers
        self.nonfinite: NonFinitePolicy = nonfinite
        self._rule = rule
        self._avg: Averager | None = None
        self._views: dict[str, Tensor] = {}  # canonical name -> the engine's storage view
        self._own_copies: list[str] = []  # copied tensors the module keeps (dtype differs)
        self._pending_n = 0  # the count while the engine is absent or being re-attached
        self._dirty = False
        self._attach(avg, 0)

    # ------------------------------------------------------------------ engine plumbing

    def _all_tensors(self) -> list[Tensor]:
        return [*self.module.parameters(), *self.module.buffers()]

    def _count(self) -> int:
        if self._avg is None or self._dirty:
            return self._pending_n
        return self._avg.num_updates

    @torch.no_grad()
    def _attach(self, avg: Averager, count: int, own: Sequence[str] = ()) -> None:
        """Make ``avg``'s storage the module's tensors (values kept) and set its count.

        ``own``: copied tensors whose dtype differs from the model's (after ``.double()``...);
        the module keeps them and they are copied (with a cast) after each update.
        """
        # Views are taken once per engine: reading them again later would let the engine refresh
        # its copied tensors (buffers) from the live model, after the update they belong to.
        if avg is self._avg:
            views = self._views
        else:
            views = {n: v for n, v in avg.averaged_tensors().items() if n not in own}
            self._own_copies = list(own)
        mine = named_tensors(self.module)
        for name, view in views.items():
            t = mine[name][0]
            if _aliases(t, view):
                continue
            if t.shape != view.shape or t.dtype != view.dtype or t.device != view.device:
                raise StateError(
                    f"AveragedModel tensor {name!r} is {t.dtype} {tuple(t.shape)} on {t.device} but "
                    f"the model's gives an average of {view.dtype} {tuple(view.shape)} on "
                    f"{view.device}; convert the model and the AveragedModel alike (.to())"
                )
            view.copy_(t)
            t.data = view
        root = unwrap_model(self.module)
        self._nonpersistent = [
            f"{mod_name}.{b}" if mod_name else b
            for mod_name, mod in root.named_modules()
            for b in mod._non_persistent_buffers_set
            if mod._buffers.get(b) is not None
        ]
        if avg.num_updates != count:
            avg.load_state_dict({
                "format": "weightavg.Averager", "format_version": FORMAT_VERSION,
                "config": avg.config(), "num_updates": count, "num_skipped": avg.num_skipped,
                "step": count, "last_step": count if count else None, "averages": {},
            })
        self._avg = avg
        self._views = views
        self._dirty = False

    def _is_attached(self) -> bool:
        if self._avg is None:
            return False
        mine = named_tensors(self.module)
        return all(name in mine and _aliases(mine[name][0], view) for name, view in self._views.items())

    def _rebuild(self, model: nn.Module) -> Averager:
        """A new engine reading ``model``, whose storage becomes the module's current tensors."""
        count = self._count()
        mine = named_tensors(self.module)
        src = named_tensors(model)
        missing = sorted(set(mine) - set(src))
        unexpected = sorted(set(src) - set(mine))
        reshaped = [(n, tuple(t.shape), tuple(src[n][0].shape)) for n, (t, _) in mine.items()
                    if n in src and src[n][0].shape != t.shape]
        if missing or unexpected or reshaped:
            raise MismatchError("model does not match the AveragedModel (paired by name): "
                                + describe_mismatch(missing, unexpected, reshaped,
                                                    left="AveragedModel", right="model"))
        pairs = [(t, src[n][0]) for n, (t, _) in mine.items()]
        device: torch.device | None = None
        if any(t.device != s.device for t, s in pairs):
            devices = {t.device for t, _ in pairs}
            if len(devices) != 1:
                raise StateError(f"the AveragedModel's tensors are on {sorted(map(str, devices))} "
                                 "and the model's elsewhere; put the AveragedModel on one device")
            device = devices.pop()
        # averaged tensors follow the module's dtype; copied ones that differ are copied with a cast
        averaged = {n for n, (_, is_param) in mine.items()
                    if src[n][0].is_floating_point() and (is_param or self.use_buffers)}
        own = [n for n, (t, _) in mine.items() if n not in averaged and t.dtype != src[n][0].dtype]
        dtype: torch.dtype | None = None
        floats = [(mine[n][0], src[n][0]) for n in averaged]
        if any(t.dtype != s.dtype for t, s in floats):
            dtypes = {t.dtype for t, _ in floats}
            if len(dtypes) != 1:
                raise StateError(f"the AveragedModel's floating tensors mix {sorted(map(str, dtypes))}"
                                 " and differ from the model's; convert it to one dtype")
            dtype = dtypes.pop()
        avg = Averager(model, rule=self._rule, buffers="average" if self.use_buffers else "copy",
                       dtype=dtype, device=device, nonfinite=self.nonfinite)
        self._attach(avg, count, own)
        return avg

    def _apply(self, fn: Callable[..., Any], recurse: bool = True) -> AveragedModel:
        # .to()/.cuda()/.half() may replace the module's tensors: the engine then no longer owns
        # them. Drop it (freeing its storage); the next update builds one on the new tensors.
        count = self._count() if "_avg" in self.__dict__ else 0
        out = super()._apply(fn, recurse)
        if self.__dict__.get("_avg") is not None and not self._is_attached():
            self._avg = None
            self._views = {}
            self._pending_n = count
            self._dirty = True
        return out

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        value = state_dict.get(prefix + "n_averaged")
        if isinstance(value, Tensor) and value.numel() == 1:
            self._pending_n = int(value)  # one host read per load, never per update
            self._dirty = True

    def __getstate__(self) -> dict[str, Any]:
        # The engine holds weak references and its storage aliases the module's tensors, which a
        # copy does not preserve: copies and pickles rebuild it at their first update.
        state = super().__getstate__()
        state["_pending_n"] = self._count()
        state["_avg"] = None
        state["_views"] = {}
        state["_dirty"] = True
        return state

    # ------------------------------------------------------------------ public API

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Run the averaged module."""
        return self.module(*args, **kwargs)

    @torch.no_grad()
    def update_parameters(self, model: nn.Module) -> None:
        """Fold the model's current parameters (and buffers, per ``use_buffers``) into the average.

        Args:
            model: a module with the same parameter and buffer names as :attr:`module`
                (DDP / ``torch.compile`` wrappers are looked through).

        Raises:
            ConfigError: ``model`` is not an ``nn.Module``.
            MismatchError: the model's tensors do not pair with the average's by name and shape.
            NonFiniteError: the model holds NaN/Inf and ``nonfinite="raise"``.
        """
        if not isinstance(model, nn.Module):
            raise bad_arg("model", type(model).__name__, "a torch.nn.Module")
        avg = self._avg
        if avg is None or self._dirty:
            if avg is not None and self._is_attached():
                self._attach(avg, self._pending_n)  # e.g. after load_state_dict: take its count
            else:
                avg = self._rebuild(model)
        try:
            avg.update(model)
        except MismatchError:
            # the same names and shapes but another device/dtype: re-read the model from there
            avg = self._rebuild(model)
            avg.update(model)
        # copied tensors (buffers) are written now, as torch does, not when the engine is read
        avg.sync_copies()
        if self._own_copies:
            kept, latest = named_tensors(self.module), named_tensors(model)
            torch._foreach_copy_([kept[n][0] for n in self._own_copies],
                                 [latest[n][0] for n in self._own_copies])
        if self._nonpersistent:
            mine, theirs = unwrap_model(self.module), unwrap_model(model)
            for name in self._nonpersistent:
                mine.get_buffer(name).copy_(theirs.get_buffer(name))
        self.n_averaged.fill_(avg.num_updates)


# ----------------------------------------------------------------------------- update_bn


@torch.no_grad()
def update_bn(
    loader: Iterable[Any],
    model: nn.Module,
    device: int | str | torch.device | None = None,
) -> None:
    """Recompute BatchNorm ``running_mean`` / ``running_var`` with one pass over ``loader``.

    Same semantics as ``torch.optim.swa_utils.update_bn``: statistics are reset, every BatchNorm
    layer accumulates a cumulative (momentum-free) average over the batches, the whole model runs
    in train mode, and modes and momenta are restored afterwards (here also if the pass raises).
    Prefer :func:`weightavg.recompute_bn`: sample-weighted exact statistics, dropout left alone,
    ``num_batches``, dict batches, and the previous statistics restored on failure.

    Args:
        loader: batches, each a tensor or a list/tuple whose first element is the input.
        model: the model whose BatchNorm statistics are recomputed (e.g. an AveragedModel).
        device: if given, each input is moved there first.

    Raises:
        ConfigError: ``model`` is not an ``nn.Module``.

    Examples:
        >>> import torch
        >>> from weightavg.swa_utils import update_bn
        >>> model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.BatchNorm1d(3))
        >>> update_bn([torch.randn(4, 2), torch.randn(4, 2)], model)
        >>> int(model[1].num_batches_tracked)
        2
    """
    if not isinstance(model, nn.Module):
        raise bad_arg("model", type(model).__name__, "a torch.nn.Module")
    momenta: dict[_BatchNorm, float | None] = {}
    for module in model.modules():
        if isinstance(module, _BatchNorm):
            module.reset_running_stats()
            momenta[module] = module.momentum
    if not momenta:
        return
    was_training = model.training
    model.train()
    for module in momenta:
        module.momentum = None  # cumulative moving average
    try:
        for batch in loader:
            if isinstance(batch, (list, tuple)):
                batch = batch[0]
            if device is not None:
                batch = batch.to(device)
            model(batch)
    finally:
        for module, momentum in momenta.items():
            module.momentum = momentum
        model.train(was_training)


# ----------------------------------------------------------------------------- SWALR


def _per_group(name: str, optimizer: Optimizer, value: Any) -> list[Any]:
    groups = optimizer.param_groups
    values = list(value) if isinstance(value, (list, tuple)) else [value] * len(groups)
    if len(values) != len(groups):
        raise bad_arg(name, value, f"a number or a list of {len(groups)} numbers (one per param group)")
    out: list[Any] = []
    for v in values:
        if isinstance(v, Tensor):
            if v.numel() != 1 or not v.is_floating_point():
                raise bad_arg(name, value, "non-negative numbers (or one-element float tensors)")
            out.append(v.clone())
        elif isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0.0:
            raise bad_arg(name, value, "non-negative numbers, one or one per param group")
        else:
            out.append(v)
    return out


class SWALR(LRScheduler):
    """Anneal each param group's learning rate to ``swa_lr``, then hold it (the SWA phase).

    Same arguments, learning rates and ``state_dict`` as ``torch.optim.swa_utils.SWALR`` (a state
    saved by either loads in the other).

    .. note::
        At step ``s`` (``s ≥ 1``, or ``max(1, s)`` when ``anneal_epochs=0``) with
        ``α_s = f(min(1, s / max(1, anneal_epochs)))`` and ``f`` the anneal function
        (``cos``: ``(1 − cos πt)/2``, ``linear``: ``t``), the new rate is
        ``lr_s = α_s · swa_lr + (1 − α_s) · lr₀``, where ``lr₀`` is recovered from the group's
        current ``lr`` as ``(lr − α_{s−1} · swa_lr) / (1 − α_{s−1})``. A rate changed from outside
        between steps is therefore carried into the rest of the anneal.

    Args:
        optimizer: the wrapped optimizer.
        swa_lr: target rate, one for all groups or a list with one per group.
        anneal_epochs: number of steps of the anneal (default 10; 0 jumps to ``swa_lr``).
        anneal_strategy: ``"cos"`` (default) or ``"linear"``.
        last_epoch: index of the last step, for resuming (default -1).

    Raises:
        ConfigError: a negative/non-numeric ``swa_lr``, a list of the wrong length, a negative or
            non-int ``anneal_epochs``, or an unknown ``anneal_strategy``.

    Examples:
        >>> import torch
        >>> from weightavg.swa_utils import SWALR
        >>> opt = torch.optim.SGD(torch.nn.Linear(2, 1).parameters(), lr=1.0)
        >>> sched = SWALR(opt, swa_lr=0.1, anneal_epochs=2, anneal_strategy="linear")
        >>> for _ in range(3):
        ...     opt.step(); sched.step()
        >>> [round(lr, 6) for lr in sched.get_last_lr()]
        [0.1]
    """

    def __init__(
        self,
        optimizer: Optimizer,
        swa_lr: float | Tensor | Sequence[float | Tensor],
        anneal_epochs: int = 10,
        anneal_strategy: Literal["cos", "linear"] = "cos",
        last_epoch: int = -1,
    ) -> None:
        if not isinstance(optimizer, Optimizer):
            raise bad_arg("optimizer", type(optimizer).__name__, "a torch.optim.Optimizer")
        swa_lrs = _per_group("swa_lr", optimizer, swa_lr)
        if anneal_strategy not in ANNEAL_STRATEGIES:
            raise bad_arg("anneal_strategy", anneal_strategy, "'cos' or 'linear'")
        if isinstance(anneal_epochs, bool) or not isinstance(anneal_epochs, int) or anneal_epochs < 0:
            raise bad_arg("anneal_epochs", anneal_epochs, "an int >= 0")
        for value, group in zip(swa_lrs, optimizer.param_groups, strict=True):
            group["swa_lr"] = value
        self._anneal_strategy = anneal_strategy  # attribute name shared with torch's state_dict
        self.anneal_epochs = anneal_epochs
        super().__init__(optimizer, last_epoch)

    @property
    def anneal_func(self) -> Callable[[float], float]:
        """The anneal function ``t -> progress`` in [0, 1] of :attr:`anneal_strategy`."""
        strategy = self._anneal_strategy
        return lambda t: anneal_factor(strategy, t)

    @property
    def anneal_strategy(self) -> str:
        """``"cos"`` or ``"linear"``."""
        return self._anneal_strategy

    def get_lr(self) -> list[float | Tensor]:
        """Learning rates for the current step (called by :meth:`step`; use ``get_last_lr()``)."""
        if not self._get_lr_called_within_step:
            warnings.warn("To get the last learning rate computed by the scheduler, "
                          "please use `get_last_lr()`.", UserWarning, stacklevel=2)
        step = self._step_count - 1
        if self.anneal_epochs == 0:
            step = max(1, step)
        span = max(1, self.anneal_epochs)
        prev_alpha = anneal_factor(self._anneal_strategy, (step - 1) / span)
        alpha = anneal_factor(self._anneal_strategy, step / span)
        out: list[float | Tensor] = []
        for group in self.optimizer.param_groups:
            swa_lr = group["swa_lr"]
            # the anneal's starting rate, recovered from the current one (follows outside changes)
            start = swa_lr if prev_alpha == 1 else (group["lr"] - prev_alpha * swa_lr) / (1 - prev_alpha)
            out.append(swa_lr * alpha + start * (1 - alpha))
        return out
