"""The deferred non-finite check: no host read per update.

Part of the engine (see :mod:`weightavg._engine` and :mod:`weightavg._executor`). The
:class:`DeferredExecutor` is the sibling of :class:`~weightavg._executor.LocalExecutor` for
accelerators: the finite flag of an update never leaves the device. Each update

1. reduces every checked source to one 0-d value (finite iff the whole model is), on the device;
2. computes every rule's weight on the device from device-side counters (the number averaged and
   the step of the last *applied* update), so that a refused update leaves every later weight
   exactly as if it had never been attempted;
3. applies the update masked, a bounded chunk at a time: ``lerp`` into a scratch, then
   ``where(finite, scratch, average)`` back into the average, a select (the average keeps its bits
   where the flag is false; a multiplication by a zero weight would not, since NaN·0 is NaN);
4. advances the device counters (applied, last applied step, refused, first refused step).

The host learns of refused updates when it next reads the averager (:meth:`settle`, called by
every read: ``num_updates``, ``num_skipped``, ``state_dict``, ``swapped_in``, exports, ``summary``),
with one device-to-host read of four numbers; the :class:`weightavg.Averager` then raises
:class:`~weightavg.NonFiniteError` (``nonfinite="raise"``) or counts them (``"skip"``).

Rules: the built-in rules have a device form (:func:`device_weight`). ``custom`` rules are a
function of the number averaged, which the host knows only up to the updates not yet settled: the
executor evaluates the function for each possible value and selects on the device; after
:data:`_MAX_PENDING` unsettled updates it settles (one read). In-place rules and user-defined rule
classes need the host check.

The masked update is one Triton kernel per piece and rule on CUDA where :mod:`weightavg._fused`
trusts it (``triton`` importable, a self-check passed on that device and dtype at the first update),
and eager torch otherwise, always on CPU (two kernels per chunk and rule, the chunk staying in
cache; five for a float16/bfloat16 average). ``torch.compile`` is not used, so that
``import weightavg`` and the first update stay fast.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from . import _fused
from ._binding import _Binding, is_module_binding
from ._executor import _BIG_CHUNK, _SCRATCH, LocalExecutor, NonFinitePolicy, _probe, _total, shaped_views, source_pieces
from ._rules import Rule, UpdateInfo, _Custom, _Ema, _EmaWarmup, _Karras, _Mean
from ._storage import FlatStorage, _Group

__all__ = ["DeferredExecutor", "device_weight", "supports_deferred"]

_MAX_PENDING = 32  # custom rules: unsettled updates before the executor settles (one host read)
_DEVICE_CHUNK = 1 << 24  # elements per masked piece on an accelerator (its scratch: 64 MiB in float32)

# operations of a deferred plan
_CAT = 0  # (_CAT, sources, out)
_CONV = 1  # (_CONV, source, out): out.copy_(source) (dtype/device conversion)
_SQ = 2  # (_SQ, value, out): torch.mul(value, value, out=out)
_MLERP = 3  # (_MLERP, weight key, average, value, scratch): masked lerp
_PROBE = 4  # (_PROBE, tensor): partial values of the check
_MLERP_HALF = 5  # (_MLERP_HALF, weight key, average, value, scratch, float32 scratch, float32 scratch)
_FUSED = 6  # (_FUSED, weight key, average, value, launch): the masked lerp in one kernel (_fused)
_COPYIN = 7  # (_COPYIN, sources, out views): torch._foreach_copy_ (non-contiguous small sources)
_HALF = (torch.float16, torch.bfloat16)  # averages a lerp_ with a Python weight computes in float32
_Op = tuple[Any, ...]


def supports_deferred(rule: Rule) -> bool:
    """True for rules whose weight the deferred executor can form on the device."""
    return isinstance(rule, (_Mean, _Ema, _EmaWarmup, _Karras, _Custom))


def device_weight(rule: Rule, n: Tensor, last: Tensor, step: int) -> Tensor:
    """The rule's weight for an update at ``step`` as a float64 0-d tensor, from the device counters
    ``n`` (snapshots averaged) and ``last`` (step of the last applied update; meaningless while
    ``n == 0``). Equal to ``rule.weight(UpdateInfo(n, step, since))`` (``since = step - last``, or
    ``max(step, 1)`` on the first update). Not for :class:`_Custom` (see the executor)."""
    one = torch.ones_like(n)
    first = n == 0
    if isinstance(rule, _Mean):
        return torch.reciprocal(n + 1)
    if isinstance(rule, _Ema):
        if rule.half_life is not None:
            since = torch.where(first, torch.full_like(n, float(max(step, 1))), step - last)
            return torch.where(first, one, 1 - torch.pow(2.0, -since / rule.half_life))
        d = rule.current_decay(UpdateInfo(1, step, 1))  # a constant or a function of the step
        return torch.where(first, one, torch.full_like(n, 1.0 - d))
    if isinstance(rule, _EmaWarmup):
        return torch.where(first, one, torch.full_like(n, 1.0 - rule.current_decay(step)))
    if isinstance(rule, _Karras):
        prev = torch.where(first, torch.zeros_like(n), last)
        beta = torch.pow(prev / max(step, 1), rule.gamma + 1.0)
        return torch.where(first | (prev <= 0), one, 1 - beta)
    raise TypeError(f"no device form for {rule!r}")


def _gather_op(g: _Group, srcs: list[Tensor], flat: bool, lo: int, hi: int, start: int, out: Tensor) -> _Op:
    """The op that gathers the packed run ``srcs[lo:hi]`` (stored from ``start``) into ``out``
    when the update runs. Non-contiguous sources are copied in through views of ``out`` shaped like
    them: a ``reshape(-1)`` here would copy them once, when the plan is built, and the plan would
    read that stale copy ever after."""
    if flat:
        return (_CAT, srcs[lo:hi], out)
    return (_COPYIN, srcs[lo:hi], shaped_views(g, srcs[lo:hi], lo, start, out))


def _cpu_layout(device: torch.device) -> bool:
    """Whether plans are laid out for a CPU's caches (small pieces) or an accelerator's launches."""
    return device.type == "cpu"


class DeferredExecutor(LocalExecutor):
    """Checks, weighs and applies updates on the device; reports refusals when settled.

    Args:
        storage, rules, nonfinite: as for :class:`~weightavg._executor.LocalExecutor`
            (``nonfinite`` is ``"raise"`` or ``"skip"``: ``"allow"`` needs no check).
    """

    deferred = True

    def __init__(self, storage: FlatStorage, rules: Mapping[str, Rule], nonfinite: NonFinitePolicy) -> None:
        super().__init__(storage, rules, nonfinite)
        devices = {g.dev for g in storage.groups} | {g.src_device for g in storage.groups}
        assert len(devices) == 1, devices
        self.device = devices.pop()
        # applied, last applied step, refused, first refused step since the last settle (0: none)
        with torch.inference_mode(False):
            self.counters = torch.zeros(4, dtype=torch.float64, device=self.device)
        self.settled_n = 0  # the number applied, as of the last settle
        self.pending = 0  # updates executed since
        self.plans: dict[int, tuple[Any, list[_Op], list[_Op]]] = {}
        self.clear_averages()

    def clear_averages(self) -> None:
        """Zero the averages: the first (masked) update interpolates from them with weight 1,
        which copies exactly only from finite values."""
        for flats in self.storage.flat.values():
            for gi, g in enumerate(self.storage.groups):
                if g.averaged:
                    flats[gi].zero_()

    def load_counters(self, num_averaged: int, last_step: int | None) -> None:
        """Set the device counters (after loading a state or a reset); refusals are forgotten."""
        self.counters.copy_(torch.tensor([float(num_averaged), float(last_step or 0), 0.0, 0.0],
                                         dtype=torch.float64))
        self.settled_n = num_averaged
        self.pending = 0
        if num_averaged == 0:
            self.clear_averages()

    def settle(self) -> tuple[int, int | None, int, int]:
        """One host read of the counters: (applied, last applied step or None, refused so far,
        first step refused since the previous settle, 0 if none)."""
        n, last, refused, first = (int(v) for v in self.counters.tolist())
        if first:
            self.counters[3].zero_()
        self.settled_n = n
        self.pending = 0
        return n, (last if n else None), refused, first

    # ------------------------------------------------------------------ update

    def execute(self, binding: _Binding, weights: dict[str, float], info: UpdateInfo) -> bool:
        """Queue the update on the device (``weights`` are ignored: they are formed on the device).

        Returns:
            True: accepted; a refusal is reported by :meth:`settle`.
        """
        if self.pending >= _MAX_PENDING and any(isinstance(r, _Custom) for r in self.rules.values()):
            self.settled_n = int(self.counters[0].item())  # bounds the custom rules' selection
            self.pending = 0
        check, apply = self._masked_plan(binding)
        step = info.step
        sums: list[Tensor] = []
        for op in check:
            if op[0] == _CAT:
                torch.cat(op[1], out=op[2])
            elif op[0] == _COPYIN:
                torch._foreach_copy_(op[2], op[1])
            else:
                _probe(op[1], sums)
        total = _total(sums)
        ok = self.agree(torch.isfinite(total) if isinstance(total, Tensor)
                        else torch.ones((), dtype=torch.bool, device=self.device))
        c = self.counters
        n, last = c[0], c[1]
        w: dict[Any, Tensor] = {}
        for slot, rule in self.rules.items():
            if isinstance(rule, _Custom):
                w64 = self._custom_weight(rule, n, step)
            else:
                w64 = device_weight(rule, n, last, step)
            for dtype in {torch.float32 if g.dtype in _HALF else g.dtype
                          for g in self.storage.groups if g.averaged}:
                w[(slot, dtype)] = w64.to(dtype)
        for op in apply:
            code = op[0]
            if code == _MLERP:
                dst, tmp = op[2], op[4]
                torch.lerp(dst, op[3], w[op[1]], out=tmp)
                torch.where(ok, tmp, dst, out=dst)
            elif code == _FUSED:
                op[4](op[2], op[3], w[op[1]], ok)
            elif code == _CAT:
                torch.cat(op[1], out=op[2])
            elif code == _COPYIN:
                torch._foreach_copy_(op[2], op[1])
            elif code == _MLERP_HALF:  # as lerp_ does with a Python weight: in float32, rounded once
                dst, tmp, a32, b32 = op[2], op[4], op[5], op[6]
                a32.copy_(dst)
                b32.copy_(op[3])
                torch.lerp(a32, b32, w[op[1]], out=a32)
                tmp.copy_(a32)
                torch.where(ok, tmp, dst, out=dst)
            elif code == _CONV:
                op[2].copy_(op[1])
            else:
                torch.mul(op[1], op[1], out=op[2])
        okf = ok.to(torch.float64)
        bad = 1 - okf
        fresh = torch.stack([n + okf, torch.where(ok, torch.full_like(last, float(step)), last), c[2] + bad,
                             torch.where(ok | (c[3] > 0), c[3], torch.full_like(last, float(step)))])
        c.copy_(fresh)
        self.pending += 1
        return True

    def agree(self, ok: Tensor) -> Tensor:
        """The finite flag the update acts on: this process's (a sharded sibling agrees it across
        the ranks, see :class:`weightavg._sharded.ShardedDeferredExecutor`)."""
        return ok

    def _custom_weight(self, rule: _Custom, n: Tensor, step: int) -> Tensor:
        """``rule``'s weight for the device's ``n``, selected among the values it can have."""
        lo = self.settled_n
        w = torch.full_like(n, rule.weight(UpdateInfo(lo, step, 1)))
        for k in range(lo + 1, lo + self.pending + 1):
            w = torch.where(n == k, torch.full_like(n, rule.weight(UpdateInfo(k, step, 1))), w)
        return w

    def _masked_plan(self, binding: _Binding) -> tuple[list[_Op], list[_Op]]:
        """The binding's check and masked update as operation lists (built once per binding).

        Packed sources are gathered once, during the check, into a scratch holding the whole packed
        region when it fits (≤ 1Mi elements), and the update reads them there. The masked update
        runs in pieces of :data:`_BIG_CHUNK` elements on CPU (each stays in cache between its lerp
        and its select) and of :data:`_DEVICE_CHUNK` on an accelerator (few kernel launches); the
        scratch of a piece is the only memory it needs.
        """
        got = self.plans.get(id(binding))
        if got is not None and got[0]() is binding:
            return got[1], got[2]
        on_cpu = _cpu_layout(self.device)
        piece = _BIG_CHUNK if on_cpu else _DEVICE_CHUNK
        check: list[_Op] = []
        apply: list[_Op] = []
        squares = any(r.power == 2 for r in self.rules.values())
        for gi, g in enumerate(self.storage.groups):
            if not g.averaged:
                continue
            srcs = binding.srcs[gi]
            store = {slot: flat[gi] for slot, flat in self.storage.flat.items()}
            pieces: list[tuple[Tensor, int, int]] = []  # (value, start, stop)
            span = binding.spans[gi]
            sources: list[tuple[Tensor, int]] = []
            if span is not None:
                sources.append((span, 0))
                check.append((_PROBE, span))
            else:
                flat_srcs = binding.flat[gi]

                if 0 < g.packed_numel <= _SCRATCH:
                    whole = self.scratch_for(g.src_device, g.src_dtype, "staged", g.packed_numel)
                    for lo, hi, start, stop in g.chunks:
                        check.append(_gather_op(g, srcs, flat_srcs, lo, hi, start, whole[start:stop]))
                        if on_cpu:  # while the run is in cache
                            check.append((_PROBE, whole[start:stop]))
                    if not on_cpu:
                        check.append((_PROBE, whole))
                    sources.append((whole, 0))
                else:  # too many small tensors to keep: gathered again for the update
                    for lo, hi, start, stop in g.chunks:
                        buf = self.scratch_for(g.src_device, g.src_dtype, "gather", stop - start)
                        op = _gather_op(g, srcs, flat_srcs, lo, hi, start, buf)
                        check += [op, (_PROBE, buf)]
                        apply.append(op)
                        self._masked_ops(apply, g, store, buf, start, stop, squares)
                for e, t in zip(g.entries[g.n_packed :], srcs[g.n_packed :], strict=True):
                    check.append((_PROBE, t))
                    sources.append((t, e.offset))
            for src, offset in sources:
                pieces += source_pieces(src, offset, piece)
            for value, start, stop in pieces:
                self._masked_ops(apply, g, store, value, start, stop, squares)
        if is_module_binding(binding):  # a mapping's binding lives for one update
            self.plans = {k: v for k, v in self.plans.items() if v[0]() is not None}
            self.plans[id(binding)] = (weakref.ref(binding), check, apply)
        return check, apply

    def _masked_ops(self, apply: list[_Op], g: _Group, store: dict[str, Tensor], value: Tensor,
                    start: int, stop: int, squares: bool) -> None:
        """Append the masked update of ``store[slot][start:stop]`` by ``value`` for every rule
        (``value``: a flat piece, or a block of rows of a non-contiguous source, see
        :func:`~weightavg._executor.source_pieces`; the average and the scratch take its shape)."""
        n, shape = stop - start, value.shape
        if not g.direct:
            conv = self.scratch_for(g.dev, g.dtype, "convert", n).view(shape)
            apply.append((_CONV, value, conv))
            value = conv
        sq = None
        if squares:
            sq = self.scratch_for(g.dev, g.dtype, "square", n).view(shape)
            apply.append((_SQ, value, sq))
        tmp = None
        for slot, flat in store.items():
            dst = flat[start:stop].view(shape)
            v = sq if self.rules[slot].power == 2 and sq is not None else value
            if _fused.fusable(dst, v):  # never on CPU; self-checked on first use
                apply.append((_FUSED, (slot, _fused.compute_dtype(g.dtype)), dst, v, _fused.launcher()))
                continue
            if tmp is None:
                tmp = self.scratch_for(g.dev, g.dtype, "masked", n).view(shape)
            if g.dtype in _HALF:
                a32 = self.scratch_for(g.dev, torch.float32, "masked", n).view(shape)
                b32 = self.scratch_for(g.dev, torch.float32, "masked value", n).view(shape)
                apply.append((_MLERP_HALF, (slot, torch.float32), dst, v, tmp, a32, b32))
            else:
                apply.append((_MLERP, (slot, g.dtype), dst, v, tmp))
