"""How an update is executed: the non-finite check and the arithmetic, on the storage's device.

Part of the engine (see :mod:`weightavg._engine`). An :class:`Executor` folds a bound source into
a storage's averages for given per-rule weights, and copies the copied tensors. The
:class:`LocalExecutor` checks on the host (one device-to-host read per update when checked) and
then runs either a :class:`_Plan` (the binding's update flattened once into torch calls) or the
general per-group path (conversions, squares, in-place rules).

Another way of executing is a sibling subclass of :class:`Executor`, picked by :func:`make_executor`
(the only place that chooses); the :class:`weightavg.Averager` talks to an executor only through
``execute`` (before which it has computed the per-rule weights and after which it moves its
counters) and ``copy``; a ``deferred`` executor (:class:`weightavg._deferred.DeferredExecutor`,
the device-side check) also has ``settle`` (called before any read of the averages, to report
refusals), ``load_counters`` and ``clear_averages``.
"""

from __future__ import annotations

import functools
import math
import operator
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from ._binding import _Binding, is_module_binding
from ._errors import NonFiniteError, bad_arg
from ._rules import Rule, UpdateInfo, _Inplace
from ._storage import FlatStorage, _Group

__all__ = ["Executor", "LocalExecutor", "make_executor"]

_SCRATCH = 1 << 20  # elements of the packing scratch, per (device, dtype)
_FEW = 8  # up to this many big tensors are updated with one lerp_ each, more with one foreach
_BIG_CHUNK = 1 << 18  # big tensors that need a conversion stream through the scratch in such pieces

NonFinitePolicy = Literal["raise", "skip", "allow"]

# operations of a _Plan: (code, ...) tuples run by _run
_GATHER = 0  # (_GATHER, sources, out): torch.cat(sources, out=out)
_LERP = 1  # (_LERP, slot, dst, src): dst.lerp_(src, weight[slot])
_FOREACH = 2  # (_FOREACH, slot, dsts, srcs): torch._foreach_lerp_(dsts, srcs, weight[slot])
_Op = tuple[Any, ...]
# zip() over a group's entries and its bound sources needs no strict=: a binding holds one source per
# entry by construction (a check there could never fail)


def _stages(g: _Group) -> bool:
    """Whether a checked update keeps the gathered packed sources of ``g`` (the whole packed region
    fits the scratch), so that the update does not gather them again (the one place this is decided)."""
    return 0 < g.packed_numel <= _SCRATCH


@dataclass
class _Plan:
    """One binding's update, flattened once into a list of torch calls.

    With the cache cold (as it is after a training step on a model larger than the cache) every
    Python object an update touches costs a memory access: walking groups, chunks and entries on
    each update cost a third as much as the arithmetic on a 1M-parameter model. A plan touches
    only the tensors. It covers the common case (averages of the sources' own dtype and device,
    rules that ``lerp_`` the value itself); anything else takes the general path.
    """

    plain: list[_Op]  # the whole update
    staged: list[_Op]  # the update once `check` has gathered every packed source
    check: list[_Op]  # (_GATHER, sources, out) then summed, or (None, tensor) summed
    # a few float32/float64/bfloat16 tensors on the CPU: each sum is read on the host as it comes
    # (see _host_total), with no list of partial values
    host_sums: bool = False


class Executor:
    """Executes updates of one storage. Subclasses implement :meth:`execute` and :meth:`copy`.

    ``deferred`` executors (see :mod:`weightavg._deferred`) learn whether an update was applied
    only on the device; the Averager then calls their ``settle`` before reading the averages.

    Args:
        storage: the storage whose averages are updated.
        rules: slot -> rule (the storage has one flat average per slot).
        nonfinite: ``"raise"``, ``"skip"`` or ``"allow"`` (see :class:`weightavg.Averager`).
    """

    def __init__(self, storage: FlatStorage, rules: Mapping[str, Rule], nonfinite: NonFinitePolicy) -> None:
        self.storage = storage
        self.rules = dict(rules)
        self.nonfinite: NonFinitePolicy = nonfinite

    deferred = False
    # whether execute() reads its ``info`` argument; when not, the Averager passes a placeholder
    # and weighs built-in rules without building an UpdateInfo
    reads_info = True

    def execute(self, binding: _Binding, weights: dict[str, float], info: UpdateInfo) -> bool:
        """Fold ``binding``'s sources into every average with ``weights`` (slot -> weight; 1 copies,
        NaN means the rule updates in place).

        Returns:
            True if applied, False if refused and skipped (``nonfinite="skip"``).

        Raises:
            NonFiniteError: a source holds NaN/Inf and ``nonfinite="raise"``.
        """
        raise NotImplementedError

    def copy(self, binding: _Binding) -> None:
        """Write the copied (non-averaged) groups' sources into the storage's copies."""
        raise NotImplementedError


CheckMode = Literal["auto", "host", "deferred"]


def make_executor(
    storage: FlatStorage, rules: Mapping[str, Rule], nonfinite: NonFinitePolicy, check: CheckMode = "auto"
) -> Executor:
    """The executor for this storage and configuration (the only place that chooses).

    A :class:`~weightavg._deferred.DeferredExecutor` (the non-finite check stays on the device) when
    asked (``check="deferred"``), or by default when the averages and sources all live on one CUDA
    device and every rule has a device form; an :class:`~weightavg._overlap.OverlappedExecutor` (the
    sources snapshotted, the update folded in by a worker thread while training goes on) when the
    averages live on the host and the sources on an accelerator, unless ``check="host"``; otherwise a
    :class:`LocalExecutor` (``"allow"`` needs no check, so it never reads the host either). For the
    local shards of a sharded model, their siblings
    :class:`weightavg._sharded.ShardedDeferredExecutor` (the device flag all-reduced without a host
    read) and :class:`weightavg._sharded.ShardedExecutor` (host check, one all-reduced flag per
    checked update), chosen by the same rule.

    Raises:
        ConfigError: ``check="deferred"`` with a configuration the deferred check cannot run.
    """
    from ._deferred import DeferredExecutor, supports_deferred
    from ._overlap import OverlappedExecutor, offloaded
    from ._sharded import ShardedDeferredExecutor, ShardedExecutor

    host = ShardedExecutor if storage.sharded else LocalExecutor
    if check != "host" and offloaded(storage):
        # averages on the host, sources on an accelerator: the update runs beside training
        return OverlappedExecutor(storage, rules, nonfinite)
    if check == "host" or nonfinite == "allow":
        return host(storage, rules, nonfinite)
    devices = {g.dev for g in storage.groups} | {g.src_device for g in storage.groups}
    unsupported = [s for s, r in rules.items() if not supports_deferred(r)]
    one_device = len(devices) == 1
    if check == "deferred" and (not one_device or unsupported):
        why = (f"rules {unsupported} (in-place or user-defined rules need the host check)" if unsupported
               else f"tensors on several devices {sorted(map(str, devices))}")
        raise bad_arg("check", check, f"'auto' or 'host' for {why}")
    if check == "deferred" or (one_device and next(iter(devices)).type == "cuda" and not unsupported):
        # a sharded model's device flag is all-reduced (asynchronously) before the masked update
        return (ShardedDeferredExecutor if storage.sharded else DeferredExecutor)(storage, rules, nonfinite)
    return host(storage, rules, nonfinite)


class LocalExecutor(Executor):
    """Updates with torch calls on the storage's devices; the check reads one scalar on the host.

    Small tensors are gathered into a bounded scratch (one per (device, dtype, purpose), allocated
    once) and updated in runs; big ones take ``lerp_``/``_foreach_lerp_`` directly, or stream
    through the scratch when they need a conversion.
    """

    def __init__(self, storage: FlatStorage, rules: Mapping[str, Rule], nonfinite: NonFinitePolicy) -> None:
        super().__init__(storage, rules, nonfinite)
        self.scratch: dict[tuple[torch.device, torch.dtype, str], Tensor] = {}
        # execute() takes a _Plan when every rule lerps the value itself and averages keep the
        # sources' dtype and device (see _plan)
        self.plannable = all(not isinstance(r, _Inplace) and getattr(r, "power", 1) == 1
                             for r in self.rules.values())
        # only an in-place rule reads the info (its num_averaged)
        self.reads_info = any(isinstance(r, _Inplace) for r in self.rules.values())

    def scratch_for(self, device: torch.device, dtype: torch.dtype, tag: str, n: int) -> Tensor:
        """``n`` elements of the scratch for (device, dtype, tag), grown once if too small."""
        key = (device, dtype, tag)
        buf = self.scratch.get(key)
        if buf is None or buf.numel() < n:
            groups = self.storage.groups
            size = max(n, min(_SCRATCH, max(g.packed_numel for g in groups)))
            # staging on the host for an accelerator's tensors: pinned memory copies faster
            pin = device.type == "cpu" and any(g.src_device.type == "cuda" for g in groups)
            buf = torch.empty(size, dtype=dtype, device=device, pin_memory=pin)
            self.scratch[key] = buf
        return buf[:n]

    # ------------------------------------------------------------------ update

    def execute(self, binding: _Binding, weights: dict[str, float], info: UpdateInfo) -> bool:
        fast = binding.plan
        if fast is None and self.plannable and is_module_binding(binding):
            fast = binding.plan = self._plan(binding)  # kept with the binding of a module (not of a mapping)
        # a plan lerps; a weight of 1 (first update: copy) or NaN (in-place rule) takes the general path
        if fast is not None:
            for w in weights.values():
                if w != w or w == 1.0:
                    fast = None
                    break
        checked = self.nonfinite != "allow"
        staged: dict[int, Tensor] = {}
        if checked:
            if fast is not None:
                total = self._check_plan(fast)
            else:
                staged, total = self._check(binding)
            if not self.finite(total):
                bad = self._nonfinite_names(binding)
                if bad:
                    if self.nonfinite == "skip":
                        return False
                    raise NonFiniteError(
                        f"update refused: the model holds NaN or Inf in {len(bad)} tensor(s): "
                        f"{', '.join(bad[:10])}{' ...' if len(bad) > 10 else ''}; the average is "
                        "unchanged (pass nonfinite='skip' to skip and count such updates)"
                    )
        if fast is not None:
            _run(fast.staged if checked else fast.plain, weights)
        else:
            with torch.no_grad():
                for gi, g in enumerate(self.storage.groups):
                    if g.averaged:
                        self._update_group(gi, g, binding, weights, info, staged.get(gi))
        return True

    def finite(self, total: Tensor | float) -> bool:
        """The verdict of the check on the sources' total (see weightavg._sharded.ShardedExecutor)."""
        return math.isfinite(float(total))

    def _plan(self, binding: _Binding) -> _Plan | None:
        """Flatten this binding's update into torch calls (None: it needs the general path)."""
        plain: list[_Op] = []
        staged: list[_Op] = []
        check: list[_Op] = []
        ops: list[_Op]
        devices = set()
        for gi, g in enumerate(self.storage.groups):
            if not g.averaged:
                continue
            if not g.direct or (g.n_packed and not binding.flat[gi]):
                return None  # conversion or non-contiguous small sources
            devices.add(g.dev)
            srcs = binding.srcs[gi]
            store = {slot: flat[gi] for slot, flat in self.storage.flat.items()}
            checked = g.src_dtype.is_floating_point  # as in _check
            span = binding.spans[gi]
            if span is not None:
                lerps = [(_LERP, slot, dst, span) for slot, dst in store.items()]
                plain += lerps
                staged += lerps
                if checked:
                    check.append((None, span))
                continue
            # the check gathers every packed source into the scratch, so the update need not again
            keep = checked and _stages(g)
            whole = self.scratch_for(g.src_device, g.src_dtype, "gather", g.packed_numel) if keep else None
            for lo, hi, start, stop in g.chunks:
                part = srcs[lo:hi]
                buf = self.scratch_for(g.src_device, g.src_dtype, "gather", stop - start)
                ops = [(_GATHER, part, buf), *((_LERP, slot, dst[start:stop], buf) for slot, dst in store.items())]
                plain += ops
                if checked:
                    check.append((_GATHER, part, whole[start:stop] if whole is not None else buf))
                if whole is None:
                    staged += ops
            if whole is not None:
                staged += [(_LERP, slot, dst[: g.packed_numel], whole) for slot, dst in store.items()]
            big = g.entries[g.n_packed :]
            if big:
                big_srcs = srcs[g.n_packed :]
                for slot, dst in store.items():
                    views = [dst[e.offset : e.offset + e.numel].view(t.shape)
                             for e, t in zip(big, big_srcs)]  # noqa: B905 (a source per entry)
                    if len(big) <= _FEW:  # a few lerp_ calls run fewer distinct code paths than one foreach
                        ops = [(_LERP, slot, v, t) for v, t in zip(views, big_srcs)]  # noqa: B905 (a source per entry)
                    else:
                        ops = [(_FOREACH, slot, views, big_srcs)]
                    plain += ops
                    staged += ops
                if checked:
                    check += [(None, t) for t in big_srcs]
        if len(devices) > 1:
            return None
        checked_dtypes = {(op[2] if op[0] is not None else op[1]).dtype for op in check}
        host_sums = (len(check) <= _FEW and devices == {torch.device("cpu")}
                     and not checked_dtypes - {torch.float32, torch.float64, torch.bfloat16})
        return _Plan(plain, staged, check, host_sums)

    @staticmethod
    def _check_plan(plan: _Plan) -> Tensor | float:
        """Sum every checked source (NaN/Inf propagate), each gathered run while it is in cache."""
        if plan.host_sums:
            total = 0.0
            for op in plan.check:
                if op[0] is None:
                    total += float(op[1].sum())
                else:
                    total += float(torch.cat(op[1], out=op[2]).sum())
            return total
        sums: list[Tensor] = []
        for op in plan.check:
            if op[0] is None:
                _probe(op[1], sums)
            else:
                torch.cat(op[1], out=op[2])
                _probe(op[2], sums)
        return _host_total(sums)

    def _gather(
        self, g: _Group, srcs: list[Tensor], chunk: tuple[int, int, int, int], flat: bool, staged: bool = False
    ) -> Tensor:
        """Packed sources of one chunk, gathered into the scratch (source dtype and device).

        With ``staged`` every chunk gets its own place (the whole packed region is kept, for the
        non-finite check before anything is applied); otherwise chunks reuse the scratch's start.
        """
        lo, hi, start, stop = chunk
        if staged:
            buf = self.scratch_for(g.src_device, g.src_dtype, "gather", g.packed_numel)[start:stop]
        else:
            buf = self.scratch_for(g.src_device, g.src_dtype, "gather", stop - start)
        part = srcs[lo:hi]
        if flat:
            torch.cat(part, out=buf)
        else:  # non-contiguous sources among them: copied in through views shaped like them
            torch._foreach_copy_(shaped_views(g, part, lo, start, buf), part)
        return buf

    def _check(self, binding: _Binding) -> tuple[dict[int, Tensor], Tensor | float]:
        """Sum every averaged source (NaN/Inf propagate) before anything is applied.

        Each packed chunk is summed right after its gather, while it is in cache. Gathers are kept
        (staged) when the whole packed region fits the scratch, so the update does not redo them.
        """
        sums: list[Tensor] = []
        staged: dict[int, Tensor] = {}
        for gi, g in enumerate(self.storage.groups):
            if not g.averaged or not g.src_dtype.is_floating_point:
                continue
            srcs = binding.srcs[gi]
            span = binding.spans[gi]
            if span is not None:
                _probe(span, sums)
                continue
            keep = _stages(g)
            for chunk in g.chunks:
                part = self._gather(g, srcs, chunk, binding.flat[gi], staged=keep)
                _probe(part, sums)
            if keep:
                staged[gi] = self.scratch_for(g.src_device, g.src_dtype, "gather", g.packed_numel)
            for t in srcs[g.n_packed:]:
                _probe(t, sums)
        return staged, _host_total(sums)

    def _offloaded(
        self, gi: int, g: _Group, binding: _Binding, staged: Tensor | None
    ) -> Iterator[tuple[Tensor, int, int]]:
        """A CUDA group averaged on the host: (host copy of a piece, start, stop), piece by piece.

        Two pinned buffers alternate: the copy of the next piece is queued (``non_blocking``) before
        this one is handed out, so the device-to-host transfer overlaps the CPU's arithmetic; each
        piece waits only for its own copy (an event). Packed sources are gathered on the device first.
        """
        srcs = binding.srcs[gi]
        span = binding.spans[gi]
        pieces: list[tuple[Any, int, int]] = []
        if span is None:
            for chunk in g.chunks:
                pieces.append((chunk, chunk[2], chunk[3]))
        pieces += _pieces(g, srcs, span)
        if not pieces:
            return
        size = max(stop - start for _, start, stop in pieces)
        bufs = [self.scratch_for(g.dev, g.src_dtype, f"offload{i}", size) for i in (0, 1)]
        events: list[Any] = [None, None]

        def issue(i: int) -> None:
            what, start, stop = pieces[i]
            if isinstance(what, tuple):  # a packed chunk: gather on the device
                what = staged[start:stop] if staged is not None else self._gather(g, srcs, what, binding.flat[gi])
            bufs[i % 2][: stop - start].view(what.shape).copy_(what, non_blocking=True)
            ev = torch.cuda.Event()
            ev.record()
            events[i % 2] = ev

        issue(0)
        for i, (_, start, stop) in enumerate(pieces):
            if i + 1 < len(pieces):
                issue(i + 1)
            events[i % 2].synchronize()
            yield bufs[i % 2][: stop - start], start, stop

    def _nonfinite_names(self, binding: _Binding) -> list[str]:
        bad = []
        for gi, g in enumerate(self.storage.groups):
            if not g.averaged:
                continue
            for e, t in zip(g.entries, binding.srcs[gi]):  # noqa: B905 (a source per entry)
                if not bool(torch.isfinite(t).all()):
                    bad.append(e.name)
        return bad

    @torch.no_grad()
    def copy(self, binding: _Binding) -> None:
        for gi, g in enumerate(self.storage.groups):
            if g.averaged:
                continue
            dst, srcs = self.storage.copies[gi], binding.srcs[gi]
            if g.dev == g.src_device and binding.flat[gi]:
                torch.cat(srcs, out=dst)
            else:
                for e, t in zip(g.entries, srcs):  # noqa: B905 (a source per entry)
                    dst[e.offset : e.offset + e.numel].view(t.shape).copy_(t)

    def _update_group(
        self,
        gi: int,
        g: _Group,
        binding: _Binding,
        weights: dict[str, float],
        info: UpdateInfo,
        staged: Tensor | None,
    ) -> None:
        srcs = binding.srcs[gi]
        storage = self.storage.flat
        lerp_slots = {s: w for s, w in weights.items() if not math.isnan(w)}
        inplace_slots = [s for s, w in weights.items() if math.isnan(w)]
        squares = any(self.rules[s].power == 2 for s in lerp_slots)

        def apply(value: Tensor, start: int, stop: int) -> None:
            # value: a flat piece, or a block of rows of a non-contiguous source (see source_pieces)
            sq: Tensor | None = None
            for slot, w in lerp_slots.items():
                dst = storage[slot][gi][start:stop].view(value.shape)
                v = value
                if self.rules[slot].power == 2:
                    if sq is None:
                        sq = self.scratch_for(g.dev, g.dtype, "square", stop - start).view(value.shape)
                        torch.mul(value, value, out=sq)
                    v = sq
                if w == 1.0:
                    dst.copy_(v)
                else:
                    dst.lerp_(v, w)

        def to_avg_dtype(value: Tensor) -> Tensor:
            if g.direct:
                return value
            conv = self.scratch_for(g.dev, g.dtype, "convert", value.numel()).view(value.shape)
            conv.copy_(value, non_blocking=False)
            return conv

        if lerp_slots and g.src_device.type == "cuda" and g.dev.type == "cpu":
            # offloaded averages: pieces come through pinned buffers, copies overlapping the CPU's work
            for value, start, stop in self._offloaded(gi, g, binding, staged):
                apply(value if value.dtype == g.dtype else to_avg_dtype(value), start, stop)
            lerp_slots = {}
        span = binding.spans[gi]
        if lerp_slots and span is not None:
            # contiguous sources: no gather at all
            if g.direct and not squares:
                for slot, w in lerp_slots.items():
                    dst = storage[slot][gi]
                    if w == 1.0:
                        dst.copy_(span)
                    else:
                        dst.lerp_(span, w)
            else:
                for a in range(0, g.numel, _BIG_CHUNK):
                    b = min(a + _BIG_CHUNK, g.numel)
                    apply(to_avg_dtype(span[a:b]), a, b)
            lerp_slots = {}
        # packed small tensors: one gather + one lerp_ per rule per chunk
        if lerp_slots:
            for chunk in g.chunks:
                start, stop = chunk[2], chunk[3]
                if staged is not None:
                    value = staged[start:stop]
                else:
                    value = self._gather(g, srcs, chunk, binding.flat[gi])
                apply(to_avg_dtype(value), start, stop)
            big = g.entries[g.n_packed :]
            big_srcs = srcs[g.n_packed :]
            if big and g.direct and not squares:
                for slot, w in lerp_slots.items():
                    views = binding.big_views.get((slot, gi))
                    if views is None:
                        flat_store = storage[slot][gi]
                        views = [flat_store[e.offset : e.offset + e.numel].view(t.shape)
                                 for e, t in zip(big, big_srcs)]  # noqa: B905 (a source per entry)
                        binding.big_views[(slot, gi)] = views
                    if w == 1.0:
                        torch._foreach_copy_(views, big_srcs)
                    else:
                        torch._foreach_lerp_(views, big_srcs, w)
            else:
                for e, t in zip(big, big_srcs):  # noqa: B905 (a source per entry)
                    for value, a, b in source_pieces(t, e.offset, _BIG_CHUNK):
                        apply(to_avg_dtype(value), a, b)
        for slot in inplace_slots:
            rule = self.rules[slot]
            assert isinstance(rule, _Inplace)
            views = self.storage.slot_views(slot, gi)
            shaped = [t.view(e.shape) if t.dim() == 1 else t for e, t in zip(g.entries, srcs)]  # noqa: B905 (a source per entry)
            rule.fn(views, shaped, info.num_averaged)


def _pieces(g: _Group, srcs: list[Tensor], span: Tensor | None) -> list[tuple[Tensor, int, int]]:
    """Big sources (or the span) of a group cut in pieces of about ``_BIG_CHUNK``: (piece, start, stop)."""
    if span is not None:
        return source_pieces(span, 0, _BIG_CHUNK)
    out = []
    for e, t in zip(g.entries[g.n_packed :], srcs[g.n_packed :]):  # noqa: B905 (a source per entry)
        out += source_pieces(t, e.offset, _BIG_CHUNK)
    return out


def shaped_views(g: _Group, part: list[Tensor], lo: int, start: int, out: Tensor) -> list[Tensor]:
    """Views of ``out`` (the place of a packed run stored from ``start``) shaped like the run's
    sources ``part`` (``g``'s entries from ``lo`` on): ``torch._foreach_copy_`` into them gathers
    non-contiguous sources without copying each one first (``reshape(-1)`` would)."""
    return [out[e.offset - start : e.offset - start + e.numel].view(t.shape)
            for e, t in zip(g.entries[lo : lo + len(part)], part, strict=True)]


def source_pieces(t: Tensor, offset: int, piece: int) -> list[tuple[Tensor, int, int]]:
    """Views of the source ``t`` stored at ``offset``, in pieces of about ``piece`` elements:
    (view, start, stop), the view's elements in the storage's (row-major) order.

    A 1-D source is cut into flat slices. A non-contiguous one of two or more dimensions (a
    ``channels_last`` convolution weight, a transposed parameter) is cut into blocks of whole rows
    along dim 0, shaped (a row longer than ``piece`` is one piece): each is a *view*, read when the
    update runs. (``t.reshape(-1)`` would copy such a tensor, and a copy taken when an update plan
    is built would never see the tensor change again.)
    """
    if t.dim() <= 1 or t.is_contiguous():
        flat = t.reshape(-1)  # a view
        return [(flat[a : min(a + piece, flat.numel())], offset + a, offset + min(a + piece, flat.numel()))
                for a in range(0, flat.numel(), piece)]
    row = t[0].numel()
    rows = max(1, piece // max(row, 1))
    return [(t[a : min(a + rows, t.shape[0])], offset + a * row, offset + min(a + rows, t.shape[0]) * row)
            for a in range(0, t.shape[0], rows)]


def _probe(t: Tensor, out: list[Tensor]) -> None:
    """Append 0-d values that are all finite iff every element of ``t`` is, allocating nothing
    tensor-sized: a sum in ``t``'s own dtype (it accumulates in float32 or wider inside the kernel;
    ``sum(dtype=float32)`` would first convert the whole tensor), and for float16, whose range a
    sum of a model's weights can exceed, its minimum and maximum (NaN propagates through both)."""
    if t.dtype == torch.float16:
        out.extend(torch.aminmax(t))
    elif t.is_complex():
        out.append(torch.view_as_real(t).sum())
    else:
        out.append(t.sum())


def _total(sums: list[Tensor]) -> Tensor | float:
    """One value that is finite iff every partial value is (no host read here)."""
    match sums:
        case []:
            return 0.0  # nothing is checked
        case [only]:
            return only
        case [first, *_]:
            dev = first.device
    # one stack per (dtype, device), summed in float64 (float16 minima/maxima would overflow a
    # float16 sum): a few kernels whatever the number of partial values; then the parts added
    by: dict[tuple[torch.dtype, torch.device], list[Tensor]] = {}
    for v in sums:
        by.setdefault((v.dtype, v.device), []).append(v)
    parts = [torch.stack(vs).to(dev, torch.float64).sum() for vs in by.values()]
    return functools.reduce(operator.add, parts)


def _host_total(sums: list[Tensor]) -> Tensor | float:
    """Like :func:`_total`, for a check that reads its verdict on the host anyway: a few partial
    values on the CPU are read one by one and added as Python floats (float64, as in ``_total``),
    which with the cache cold costs a tenth of stacking them (``benchmarks/update_speed.py``, 1M
    parameters in 4 tensors: 1.01× the checked floor against 1.09×); many, or on an accelerator
    (where each read would be a synchronization), are combined on the device first."""
    if len(sums) <= _FEW and all(v.is_cpu for v in sums):
        total = 0.0
        for v in sums:
            total += float(v)  # inf - inf is NaN: still refused, and rechecked by _nonfinite_names
        return total
    return _total(sums)


def _run(ops: list[_Op], weights: Mapping[str, float]) -> None:
    """Run a plan's operations. Sources are detached and averages need no grad: no no_grad() needed."""
    for op in ops:
        code = op[0]
        if code == _LERP:
            op[2].lerp_(op[3], weights[op[1]])
        elif code == _GATHER:
            torch.cat(op[1], out=op[2])
        else:
            torch._foreach_lerp_(op[2], op[3], weights[op[1]])
