"""The averaging engine: named averaged copies of a model's tensors, and their counters.

Everything that keeps an average in weightavg (SWA, EMA, SWAG moments, the trainer callbacks, the
``swa_utils`` drop-in, the checkpoint averager) is a thin layer over :class:`Averager`.

Layout (why it is fast):
    Tracked tensors are grouped by (source device, source dtype). Each group's averages live in
    one flat buffer per rule (``storage[rule][group]``, float32 by default); each tracked tensor is a
    view into it. Small tensors (< 64Ki elements) are stored first and updated *packed*: one
    ``torch.cat`` gathers them into a bounded scratch buffer (≤ 1Mi elements, allocated once) and one
    ``lerp_`` per rule updates the whole run. Big tensors of the average's own dtype are updated with
    one ``torch._foreach_lerp_`` per rule; others stream through the scratch in chunks. Packed runs
    are gathered and applied 64Ki elements at a time, so each run is still in L2 when it is used. An update
    therefore costs a handful of kernel launches per group, whatever the number of tensors, never
    allocates a temporary the size of the model, and reads every source tensor once (twice with the
    non-finite check, which must read the whole model before anything is written).

    The first update from a model collects its tensors once (a binding) and flattens the work into a
    plan: a list of ``cat``/``lerp_`` calls on prebuilt views, so that later updates run no Python
    over groups, chunks or entries (with the cache cold after a training step, that Python cost as
    much as the arithmetic on a 1M-parameter model).
"""

from __future__ import annotations

import contextlib
import fnmatch
import math
import weakref
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Union

import torch
from torch import Tensor, nn

from ._errors import MismatchError, NonFiniteError, StateError, bad_arg, describe_mismatch
from ._rules import Rule, UpdateInfo, _Inplace

__all__ = ["Averager", "canonical_name", "make_contiguous", "named_tensors", "unwrap_model"]

FORMAT_VERSION = 1
_BIG = 1 << 16  # tensors with at least this many elements are not packed
_SCRATCH = 1 << 20  # elements of the packing scratch, per (device, dtype)
_CHUNK = 1 << 16  # packed tensors are gathered and applied in runs of at most this many elements
_FEW = 8  # up to this many big tensors are updated with one lerp_ each, more with one foreach
_BIG_CHUNK = 1 << 18  # big tensors that need a conversion stream through the scratch in such pieces

BufferPolicy = Literal["average", "copy", "ignore"]
NonFinitePolicy = Literal["raise", "skip", "allow"]
Source = Union[nn.Module, Mapping[str, Tensor]]  # noqa: UP007 (a runtime alias on Python 3.10)


# ----------------------------------------------------------------------------- names


def unwrap_model(model: nn.Module) -> nn.Module:
    """Strip DistributedDataParallel / DataParallel / torch.compile wrappers (any nesting)."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
            continue
        orig = getattr(model, "_orig_mod", None)
        if isinstance(orig, nn.Module) and type(model).__name__ == "OptimizedModule":
            model = orig
            continue
        return model


def canonical_name(name: str) -> str:
    """Canonical tensor name: ``_orig_mod.`` components and leading ``module.`` prefixes removed."""
    parts = [p for p in name.split(".") if p != "_orig_mod"]
    while len(parts) > 1 and parts[0] == "module":
        parts = parts[1:]
    return ".".join(parts)


def named_tensors(model: nn.Module) -> dict[str, tuple[Tensor, bool]]:
    """Canonical name -> (tensor, is_parameter) for parameters and *persistent* buffers.

    Shared (tied) tensors appear once, under their first name.
    """
    model = unwrap_model(model)
    out: dict[str, tuple[Tensor, bool]] = {}
    seen: set[int] = set()
    for mod_name, mod in model.named_modules(remove_duplicate=True):
        prefix = mod_name + "." if mod_name else ""
        for pname, p in mod._parameters.items():
            if p is None or id(p) in seen:
                continue
            seen.add(id(p))
            out[canonical_name(prefix + pname)] = (p, True)
        for bname, b in mod._buffers.items():
            if b is None or bname in mod._non_persistent_buffers_set or id(b) in seen:
                continue
            seen.add(id(b))
            out[canonical_name(prefix + bname)] = (b, False)
    return out


def _source_tensors(source: Source, what: str = "model") -> dict[str, tuple[Tensor, bool]]:
    if isinstance(source, nn.Module):
        return named_tensors(source)
    if isinstance(source, Mapping):
        out: dict[str, tuple[Tensor, bool]] = {}
        for k, v in source.items():
            if not isinstance(v, Tensor):
                continue
            out[canonical_name(str(k))] = (v, v.is_floating_point())
        return out
    raise bad_arg(what, type(source).__name__, "a torch.nn.Module or a mapping of name -> Tensor")


# ----------------------------------------------------------------------------- layout


@dataclass
class _Entry:
    name: str
    shape: torch.Size
    numel: int
    dtype: torch.dtype  # the source's dtype
    device: torch.device  # the source's device
    averaged: bool  # False: copied (integer/bool tensors, buffers under buffers="copy")
    offset: int = 0  # into its group's flat storage


@dataclass
class _Group:
    """Tensors that share (source device, source dtype, averaged?)."""

    src_device: torch.device
    src_dtype: torch.dtype
    dev: torch.device  # where the average lives
    dtype: torch.dtype  # dtype of the average
    averaged: bool
    entries: list[_Entry] = field(default_factory=list)
    n_packed: int = 0  # entries[:n_packed] are small and stored first
    packed_numel: int = 0
    # runs of packed entries: (lo, hi, start, stop) = entries[lo:hi] at storage[start:stop]; each
    # run is small enough (≤ _CHUNK) to stay in the L2 cache between its gather and its lerp_
    chunks: list[tuple[int, int, int, int]] = field(default_factory=list)

    @property
    def numel(self) -> int:
        return sum(e.numel for e in self.entries)

    contiguous: bool = False  # the sources tiled one storage range at construction (make_contiguous)

    @property
    def direct(self) -> bool:
        return self.src_device == self.dev and self.src_dtype == self.dtype


@dataclass
class _Binding:
    """Source tensors of one model, in storage order, collected once."""

    model_ref: Any
    srcs: list[list[Tensor]]  # per group: 1-D source views (the tensor itself if not contiguous)
    probes: list[Tensor | None]  # each group's first source tensor object (Parameter or buffer)
    fingerprint: list[int]  # its data_ptr at binding time (a change means .to()/.half()/assign)
    flat: list[bool]  # per group: every source is a 1-D view
    spans: list[Tensor | None]  # per group: one 1-D view over all its sources, when they tile a range
    big_views: dict[tuple[str, int], list[Tensor]] = field(default_factory=dict)
    plan: _Plan | None = None  # built on the first update that can use it


def _dead_ref() -> None:
    return None


# operations of a _Plan: (code, ...) tuples run by Averager._run
_GATHER = 0  # (_GATHER, sources, out): torch.cat(sources, out=out)
_LERP = 1  # (_LERP, slot, dst, src): dst.lerp_(src, weight[slot])
_FOREACH = 2  # (_FOREACH, slot, dsts, srcs): torch._foreach_lerp_(dsts, srcs, weight[slot])
_Op = tuple[Any, ...]


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


class Averager:
    """Averaged copies of a model's tensors, updated with one or several rules.

    Args:
        model: the module (or a mapping name -> tensor) whose tensors are averaged. Wrappers
            (DDP, DataParallel, ``torch.compile``) are looked through; names are canonical.
        rule: a :class:`Rule` (``weightavg.mean()``, ``weightavg.ema(...)``...) or a mapping
            name -> rule to keep several averages updated in one pass (e.g. SWA and two EMAs).
        params: ``"all"`` floating-point parameters (default) or ``"trainable"`` ones only.
        include: glob pattern(s) on canonical names; only matching tensors are tracked.
        exclude: glob pattern(s) on canonical names that are not tracked.
        buffers: policy for floating-point persistent buffers: ``"average"`` (default), ``"copy"``
            (keep the latest value) or ``"ignore"``. Integer/bool buffers (e.g. BatchNorm's
            ``num_batches_tracked``) are always copied, never averaged, unless ignored.
            Copied tensors of a module follow the model last updated from: they are read when
            the average is read (swap, export, state_dict), not on every update.
            Non-persistent buffers are never touched.
        dtype: dtype of the averages (default float32, whatever the model's dtype: a bf16 model
            gets a float32 average that keeps moving). ``None`` keeps each tensor's own dtype.
        device: where the averages live (default: with each source tensor); e.g. ``"cpu"``.
        nonfinite: what an update whose source holds NaN/Inf does: ``"raise"`` (default, the
            update is refused with :class:`NonFiniteError`), ``"skip"`` (refused and counted in
            ``num_skipped``) or ``"allow"`` (no check). The check reads the source once more and,
            on an accelerator, costs one device-to-host read per update.

    Example:
        >>> import torch, weightavg
        >>> model = torch.nn.Linear(3, 1)
        >>> avg = weightavg.Averager(model, rule=weightavg.ema(decay=0.9))
        >>> avg.update(model)
        True
        >>> with torch.no_grad():
        ...     _ = model.weight.add_(1.0)
        >>> avg.update(model)
        True
        >>> with avg.swapped_in(model):
        ...     pass  # evaluate the averaged weights here
        >>> avg.num_updates
        2
    """

    def __init__(
        self,
        model: Source,
        rule: Rule | Mapping[str, Rule] | None = None,
        *,
        params: Literal["all", "trainable"] = "all",
        include: str | Sequence[str] | None = None,
        exclude: str | Sequence[str] | None = None,
        buffers: BufferPolicy = "average",
        dtype: torch.dtype | None = torch.float32,
        device: torch.device | str | None = None,
        nonfinite: NonFinitePolicy = "raise",
    ) -> None:
        from ._rules import mean

        if rule is None:
            rule = mean()
        if isinstance(rule, Mapping):
            rules = dict(rule)
            if not rules:
                raise bad_arg("rule", rule, "a rule or a non-empty mapping name -> rule")
        else:
            rules = {"default": rule}
        for slot, r in rules.items():
            if not isinstance(slot, str) or not isinstance(r, Rule):
                raise bad_arg(f"rule[{slot!r}]" if len(rules) > 1 else "rule", r,
                              "a weightavg rule such as weightavg.mean() or weightavg.ema(0.999)")
        check_options(params=params, buffers=buffers, nonfinite=nonfinite, dtype=dtype)
        self.rules: dict[str, Rule] = rules
        self.params = params
        self.include = _patterns("include", include)
        self.exclude = _patterns("exclude", exclude)
        self.buffers: BufferPolicy = buffers
        self.dtype = dtype
        self.device = torch.device(device) if device is not None else None
        self.nonfinite: NonFinitePolicy = nonfinite

        # counters (Python ints: reading them never synchronises a device)
        self.num_updates = 0
        self.num_skipped = 0
        self.step = 0
        self.last_step: int | None = None

        tensors = _source_tensors(model)
        self._all_names = set(tensors)
        entries = self._select(tensors)
        if not entries:
            raise bad_arg("model", type(model).__name__,
                          "a model with at least one tensor to track (check params/include/exclude)")
        self._groups = self._layout(entries, tensors)
        self._entries = {e.name: e for g in self._groups for e in g.entries}
        # storage[slot][gi]: flat averages; copies share one storage across rules
        self._storage: dict[str, list[Tensor]] = {}
        for slot in self.rules:
            self._storage[slot] = [
                torch.empty(g.numel, dtype=g.dtype, device=g.dev) if g.averaged else torch.empty(0)
                for g in self._groups
            ]
        self._copies = [
            torch.empty(g.numel, dtype=g.dtype, device=g.dev) if not g.averaged else torch.empty(0)
            for g in self._groups
        ]
        self._scratch: dict[tuple[torch.device, torch.dtype, str], Tensor] = {}
        self._bindings: dict[int, _Binding] = {}
        self._last_binding: _Binding | None = None
        # update() takes a _Plan when every rule lerps the value itself and averages keep the
        # sources' dtype and device (see _plan)
        self._plannable = all(not isinstance(r, _Inplace) and getattr(r, "power", 1) == 1
                              for r in self.rules.values())
        # copied tensors of a module source are read lazily (see sync_copies)
        self._pending_copy: _Binding | None = None

    # ------------------------------------------------------------------ selection & layout

    def _select(self, tensors: dict[str, tuple[Tensor, bool]]) -> list[_Entry]:
        out = []
        for name, (t, is_param) in tensors.items():
            if self.include and not any(fnmatch.fnmatchcase(name, p) for p in self.include):
                continue
            if any(fnmatch.fnmatchcase(name, p) for p in self.exclude):
                continue
            floating = t.is_floating_point() or t.is_complex()
            if is_param:
                if self.params == "trainable" and not t.requires_grad:
                    continue
                averaged = floating
            else:
                if self.buffers == "ignore":
                    continue
                averaged = floating and self.buffers == "average"
            out.append(_Entry(name, t.shape, t.numel(), t.dtype, t.device, averaged))
        return out

    def _layout(self, entries: list[_Entry], tensors: dict[str, tuple[Tensor, bool]]) -> list[_Group]:
        groups: dict[tuple[torch.device, torch.dtype, bool], _Group] = {}
        for e in entries:
            key = (e.device, e.dtype, e.averaged)
            if key not in groups:
                dev = self.device if self.device is not None else e.device
                if e.averaged and self.dtype is not None and not e.dtype.is_complex:
                    dtype = self.dtype
                else:
                    dtype = e.dtype
                groups[key] = _Group(e.device, e.dtype, dev, dtype, e.averaged)
            groups[key].entries.append(e)
        out = list(groups.values())
        for g in out:
            order = _tiling([tensors[e.name][0] for e in g.entries]) if g.averaged else None
            if order is not None:
                # sources share one contiguous range (see make_contiguous): keep their order, so
                # an update reads them as one span, with no gather
                g.entries = [g.entries[i] for i in order]
                g.contiguous = True
                small: list[_Entry] = []
            else:
                small = [e for e in g.entries if e.numel < _BIG]
                big = [e for e in g.entries if e.numel >= _BIG]
                g.entries = small + big
            g.n_packed = len(small)
            off = 0
            for e in g.entries:
                e.offset = off
                off += e.numel
            g.packed_numel = sum(e.numel for e in small)
            lo = 0
            while lo < len(small):
                hi, n = lo, 0
                while hi < len(small) and (n + small[hi].numel <= _CHUNK or hi == lo):
                    n += small[hi].numel
                    hi += 1
                g.chunks.append((lo, hi, small[lo].offset, small[lo].offset + n))
                lo = hi
        return out

    # ------------------------------------------------------------------ binding a source

    def _bind(self, source: Source) -> _Binding:
        if isinstance(source, nn.Module):
            last = self._last_binding
            if last is not None and last.model_ref() is source:
                b: _Binding | None = last  # the unwrapped model of the previous update
            else:
                b = self._bindings.get(id(unwrap_model(source)))
            if b is not None and b.model_ref() is not None:
                for probe, fp in zip(b.probes, b.fingerprint, strict=True):
                    if probe is not None and probe.data_ptr() != fp:
                        break  # storage replaced (.to(), .half(), load with assign=True)
                else:
                    self._last_binding = b
                    return b
        tensors = _source_tensors(source, "model")
        missing = sorted(n for n in self._entries if n not in tensors)
        unexpected = sorted(n for n in set(tensors) - self._all_names)
        reshaped = [(n, tuple(e.shape), tuple(tensors[n][0].shape)) for n, e in self._entries.items()
                    if n in tensors and tensors[n][0].shape != e.shape]
        if missing or unexpected or reshaped:
            raise MismatchError(
                "model does not match the averager's tracked tensors (paired by name): "
                + describe_mismatch(missing, unexpected, reshaped)
            )
        srcs: list[list[Tensor]] = []
        probes: list[Tensor | None] = []
        for g in self._groups:
            probes.append(tensors[g.entries[0].name][0] if g.entries else None)
            row = []
            for e in g.entries:
                t = tensors[e.name][0]
                if t.dtype != e.dtype or t.device != e.device:
                    raise MismatchError(
                        f"tensor {e.name!r} is {t.dtype} on {t.device}, but the averager was built "
                        f"for {e.dtype} on {e.device}; build a new Averager after moving the model"
                    )
                row.append(t.detach().reshape(-1) if t.is_contiguous() else t.detach())
            srcs.append(row)
        fingerprint = [p.data_ptr() if p is not None else 0 for p in probes]
        flat = [all(t.dim() == 1 for t in row) for row in srcs]
        spans: list[Tensor | None] = []
        for g, row in zip(self._groups, srcs, strict=True):
            span = None
            if g.contiguous and _tiling(row) == list(range(len(row))):
                first = row[0]
                span = torch.as_strided(first, (g.numel,), (1,), first.storage_offset())
            spans.append(span)
        if isinstance(source, nn.Module):
            ref: Any = weakref.ref(unwrap_model(source))
            b = _Binding(ref, srcs, probes, fingerprint, flat, spans)
            self._bindings[id(unwrap_model(source))] = b
            self._last_binding = b
        else:
            b = _Binding(_dead_ref, srcs, probes, fingerprint, flat, spans)
        return b

    def refresh(self) -> None:
        """Forget the source tensors collected from models; the next call collects them again.

        The engine collects a model's tensors once. Moving or casting the whole model is detected;
        call this after replacing individual tensors (``module.weight = nn.Parameter(...)``,
        ``param.data = ...``, ``load_state_dict(..., assign=True)`` on part of a model).
        """
        self._bindings.clear()
        self._last_binding = None

    def _scratch_for(self, device: torch.device, dtype: torch.dtype, tag: str, n: int) -> Tensor:
        key = (device, dtype, tag)
        buf = self._scratch.get(key)
        if buf is None or buf.numel() < n:
            size = max(n, min(_SCRATCH, max(g.packed_numel for g in self._groups)))
            # staging on the host for an accelerator's tensors: pinned memory copies faster
            pin = device.type == "cpu" and any(g.src_device.type == "cuda" for g in self._groups)
            buf = torch.empty(size, dtype=dtype, device=device, pin_memory=pin)
            self._scratch[key] = buf
        return buf[:n]

    # ------------------------------------------------------------------ update

    def update(self, model: Source, *, step: int | None = None) -> bool:
        """Fold the model's current tensors into every average.

        Args:
            model: the module (wrapped or not) or mapping name -> tensor to average in.
            step: the training step of this snapshot (e.g. the optimizer step). Rules that depend
                on time (``half_life``, ``karras_ema``, warmup) use it; default: previous step + 1.

        Returns:
            True if the update was applied, False if it was skipped (``nonfinite="skip"``).

        Raises:
            MismatchError: the model's tensors do not pair by name/shape with the tracked ones.
            NonFiniteError: the source holds NaN/Inf and ``nonfinite="raise"``.
        """
        if step is None:
            step = self.step + 1
        elif isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise bad_arg("step", step, "a non-negative int")
        elif self.last_step is not None and step < self.last_step:
            raise bad_arg("step", step, f"a step >= the previous update's step {self.last_step}")
        binding = self._bind(model)
        since = step - self.last_step if self.last_step is not None else max(step, 1)
        info = UpdateInfo(self.num_updates, step, since)
        weights = {slot: r.weight(info) for slot, r in self.rules.items()}

        plan = binding.plan
        if plan is None and self._plannable and binding.model_ref is not _dead_ref:
            plan = binding.plan = self._plan(binding)  # kept with the binding of a module (not of a mapping)
        # a plan lerps; a weight of 1 (first update: copy) or NaN (in-place rule) takes the general path
        fast = plan if plan is not None and all(w == w and w != 1.0 for w in weights.values()) else None
        checked = self.nonfinite != "allow"
        staged: dict[int, Tensor] = {}
        if checked:
            if fast is not None:
                total = self._check_plan(fast)
            else:
                staged, total = self._check(binding)
            if not math.isfinite(float(total)):
                bad = self._nonfinite_names(binding)
                if bad:
                    if self.nonfinite == "skip":
                        self.num_skipped += 1
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
                for gi, g in enumerate(self._groups):
                    if g.averaged:
                        self._update_group(gi, g, binding, weights, info, staged.get(gi))
        if isinstance(model, nn.Module):
            # copied tensors (integer buffers...) are only read when the average is read: a model
            # with 1000 BatchNorm layers would otherwise spend a third of each update on them
            self._pending_copy = binding
        else:
            self._pending_copy = None
            self._copy_groups(binding)
        self.num_updates += 1
        self.step = step
        self.last_step = step
        return True

    def _plan(self, binding: _Binding) -> _Plan | None:
        """Flatten this binding's update into torch calls (None: it needs the general path)."""
        plain: list[_Op] = []
        staged: list[_Op] = []
        check: list[_Op] = []
        ops: list[_Op]
        devices = set()
        for gi, g in enumerate(self._groups):
            if not g.averaged:
                continue
            if not g.direct or (g.n_packed and not binding.flat[gi]):
                return None  # conversion or non-contiguous small sources
            devices.add(g.dev)
            srcs = binding.srcs[gi]
            store = {slot: flat[gi] for slot, flat in self._storage.items()}
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
            keep = checked and 0 < g.packed_numel <= _SCRATCH
            whole = self._scratch_for(g.src_device, g.src_dtype, "gather", g.packed_numel) if keep else None
            for lo, hi, start, stop in g.chunks:
                part = srcs[lo:hi]
                buf = self._scratch_for(g.src_device, g.src_dtype, "gather", stop - start)
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
                             for e, t in zip(big, big_srcs, strict=True)]
                    if len(big) <= _FEW:  # a few lerp_ calls run fewer distinct code paths than one foreach
                        ops = [(_LERP, slot, v, t) for v, t in zip(views, big_srcs, strict=True)]
                    else:
                        ops = [(_FOREACH, slot, views, big_srcs)]
                    plain += ops
                    staged += ops
                if checked:
                    check += [(None, t) for t in big_srcs]
        if len(devices) > 1:
            return None
        return _Plan(plain, staged, check)

    @staticmethod
    def _check_plan(plan: _Plan) -> Tensor | float:
        """Sum every checked source (NaN/Inf propagate), each gathered run while it is in cache."""
        sums = []
        for op in plan.check:
            if op[0] is None:
                sums.append(op[1].sum(dtype=torch.float32))
            else:
                torch.cat(op[1], out=op[2])
                sums.append(op[2].sum(dtype=torch.float32))
        return _total(sums)

    def _gather(
        self, g: _Group, srcs: list[Tensor], chunk: tuple[int, int, int, int], flat: bool, staged: bool = False
    ) -> Tensor:
        """Packed sources of one chunk, gathered into the scratch (source dtype and device).

        With ``staged`` every chunk gets its own place (the whole packed region is kept, for the
        non-finite check before anything is applied); otherwise chunks reuse the scratch's start.
        """
        lo, hi, start, stop = chunk
        if staged:
            buf = self._scratch_for(g.src_device, g.src_dtype, "gather", g.packed_numel)[start:stop]
        else:
            buf = self._scratch_for(g.src_device, g.src_dtype, "gather", stop - start)
        part = srcs[lo:hi]
        if not flat:  # non-contiguous sources (rare): slow path
            part = [t.reshape(-1) for t in part]
        torch.cat(part, out=buf)
        return buf

    def _check(self, binding: _Binding) -> tuple[dict[int, Tensor], Tensor | float]:
        """Sum every averaged source (NaN/Inf propagate) before anything is applied.

        Each packed chunk is summed right after its gather, while it is in cache. Gathers are kept
        (staged) when the whole packed region fits the scratch, so the update does not redo them.
        """
        sums: list[Tensor] = []
        staged: dict[int, Tensor] = {}
        for gi, g in enumerate(self._groups):
            if not g.averaged or not g.src_dtype.is_floating_point:
                continue
            srcs = binding.srcs[gi]
            span = binding.spans[gi]
            if span is not None:
                sums.append(span.sum(dtype=torch.float32))
                continue
            keep = 0 < g.packed_numel <= _SCRATCH
            for chunk in g.chunks:
                part = self._gather(g, srcs, chunk, binding.flat[gi], staged=keep)
                sums.append(part.sum(dtype=torch.float32))
            if keep:
                staged[gi] = self._scratch_for(g.src_device, g.src_dtype, "gather", g.packed_numel)
            sums.extend(t.sum(dtype=torch.float32) for t in srcs[g.n_packed:])
        return staged, _total(sums)

    def _nonfinite_names(self, binding: _Binding) -> list[str]:
        bad = []
        for gi, g in enumerate(self._groups):
            if not g.averaged:
                continue
            for e, t in zip(g.entries, binding.srcs[gi], strict=True):
                if not bool(torch.isfinite(t).all()):
                    bad.append(e.name)
        return bad

    @torch.no_grad()
    def _copy_groups(self, binding: _Binding) -> None:
        for gi, g in enumerate(self._groups):
            if g.averaged:
                continue
            dst, srcs = self._copies[gi], binding.srcs[gi]
            if g.dev == g.src_device and binding.flat[gi]:
                torch.cat(srcs, out=dst)
            else:
                for e, t in zip(g.entries, srcs, strict=True):
                    dst[e.offset : e.offset + e.numel].copy_(t.reshape(-1))

    def sync_copies(self) -> None:
        """Bring copied tensors (integer buffers, ``buffers="copy"``) up to date now.

        They are read from the module last updated from; every read of the average (swap, export,
        ``state_dict``, ``averaged_tensors``) does this first, so call it only to pin their values
        to this moment (e.g. right after an update).
        """
        if self._pending_copy is not None:
            self._copy_groups(self._pending_copy)

    def follow(self, model: nn.Module) -> None:
        """Let copied tensors follow ``model`` from now on, as after an update from it.

        After :meth:`load_state_dict` the loaded copies stand until the next update; a resumed run
        calls this so that its copies read the live model, exactly as the uninterrupted run does.
        """
        if self.num_updates:
            self._pending_copy = self._bind(model)

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
        lerp_slots = {s: w for s, w in weights.items() if not math.isnan(w)}
        inplace_slots = [s for s, w in weights.items() if math.isnan(w)]
        squares = any(self.rules[s].power == 2 for s in lerp_slots)

        def apply(value: Tensor, start: int, stop: int) -> None:
            sq: Tensor | None = None
            for slot, w in lerp_slots.items():
                dst = self._storage[slot][gi][start:stop]
                v = value
                if self.rules[slot].power == 2:
                    if sq is None:
                        sq = self._scratch_for(g.dev, g.dtype, "square", stop - start)
                        torch.mul(value, value, out=sq)
                    v = sq
                if w == 1.0:
                    dst.copy_(v)
                else:
                    dst.lerp_(v, w)

        def to_avg_dtype(value: Tensor) -> Tensor:
            if g.direct:
                return value
            conv = self._scratch_for(g.dev, g.dtype, "convert", value.numel())
            conv.copy_(value, non_blocking=False)
            return conv

        span = binding.spans[gi]
        if lerp_slots and span is not None:
            # contiguous sources: no gather at all
            if g.direct and not squares:
                for slot, w in lerp_slots.items():
                    dst = self._storage[slot][gi]
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
                        flat_store = self._storage[slot][gi]
                        views = [flat_store[e.offset : e.offset + e.numel].view(t.shape)
                                 for e, t in zip(big, big_srcs, strict=True)]
                        binding.big_views[(slot, gi)] = views
                    if w == 1.0:
                        torch._foreach_copy_(views, big_srcs)
                    else:
                        torch._foreach_lerp_(views, big_srcs, w)
            else:
                for e, t in zip(big, big_srcs, strict=True):
                    flat = t.reshape(-1)
                    for a in range(0, e.numel, _BIG_CHUNK):
                        b = min(a + _BIG_CHUNK, e.numel)
                        apply(to_avg_dtype(flat[a:b]), e.offset + a, e.offset + b)
        for slot in inplace_slots:
            rule = self.rules[slot]
            assert isinstance(rule, _Inplace)
            views = self._slot_views(slot, gi, g.entries)
            shaped = [t.view(e.shape) if t.dim() == 1 else t for e, t in zip(g.entries, srcs, strict=True)]
            rule.fn(views, shaped, info.num_averaged)

    def _slot_views(self, slot: str, gi: int, entries: list[_Entry]) -> list[Tensor]:
        flat = self._storage[slot][gi]
        return [flat[e.offset : e.offset + e.numel].view(e.shape) for e in entries]

    # ------------------------------------------------------------------ reading the averages

    def _slot(self, which: str | None) -> str:
        if which is None:
            if len(self.rules) == 1:
                return next(iter(self.rules))
            raise bad_arg("which", which, f"one of {sorted(self.rules)} (this averager keeps several)")
        if which not in self.rules:
            raise bad_arg("which", which, f"one of {sorted(self.rules)}")
        return which

    def _require_update(self) -> None:
        if self.num_updates == 0:
            raise StateError("the averager holds no average yet: call update(model) at least once")

    def averaged_tensors(self, which: str | None = None) -> dict[str, Tensor]:
        """Canonical name -> the stored average (a view, in the averager's dtype and device).

        Copied tensors (integer buffers, ``buffers="copy"``) are included with their latest value.
        Writing into these views changes the average.
        """
        slot = self._slot(which)
        self.sync_copies()
        out: dict[str, Tensor] = {}
        for gi, g in enumerate(self._groups):
            flat = self._storage[slot][gi] if g.averaged else self._copies[gi]
            for e in g.entries:
                out[e.name] = flat[e.offset : e.offset + e.numel].view(e.shape)
        return out

    def flat_layout(self) -> dict[str, tuple[int, int, torch.Size]]:
        """Where each averaged tensor sits in :meth:`flat`'s vector: name -> (start, stop, shape).

        Only averaged (floating-point) tensors take part, in storage order; copied tensors
        (integer buffers, ``buffers="copy"``) do not.
        """
        out: dict[str, tuple[int, int, torch.Size]] = {}
        off = 0
        for g in self._groups:
            if g.averaged:
                for e in g.entries:
                    out[e.name] = (off + e.offset, off + e.offset + e.numel, e.shape)
                off += g.numel
        return out

    @torch.no_grad()
    def flat(
        self,
        model: Source | None = None,
        *,
        which: str | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> Tensor:
        """The averaged tensors as one fresh 1-D tensor, laid out as :meth:`flat_layout` says.

        Args:
            model: if given, read *this source's current values* of the averaged tensors instead
                of the averages (paired by name and checked as in :meth:`update`), e.g. to form a
                deviation ``θ − θ̄`` with one subtraction.
            which: the rule whose averages are read (without ``model``).
            dtype: dtype of the result (default: the averages' dtype, promoted across groups).
            device: device of the result (default: where the first averaged group lives).

        Returns:
            A new tensor (never a view of the averages): writing to it changes nothing.
        """
        groups = [(gi, g) for gi, g in enumerate(self._groups) if g.averaged]
        if not groups:
            raise StateError("the averager tracks no averaged (floating-point) tensor")
        if model is None:
            self._require_update()
            slot = self._slot(which)
            parts = [self._storage[slot][gi] for gi, _ in groups]
        else:
            if which is not None:
                raise bad_arg("which", which, "None when model is given (model values are read)")
            binding = self._bind(model)
            parts = [torch.cat([t.reshape(-1) for t in binding.srcs[gi]]) for gi, _ in groups]
        if dtype is None:
            dtype = groups[0][1].dtype
            for _, g in groups[1:]:
                dtype = torch.promote_types(dtype, g.dtype)
        dev = torch.device(device) if device is not None else groups[0][1].dev
        out = torch.empty(sum(g.numel for _, g in groups), dtype=dtype, device=dev)
        off = 0
        for part in parts:
            out[off : off + part.numel()].copy_(part)
            off += part.numel()
        return out

    def export_state_dict(
        self, model: nn.Module | None = None, *, which: str | None = None
    ) -> dict[str, Tensor]:
        """The averaged weights as a state dict that loads into the *unwrapped* model.

        Tensors are fresh copies in each source tensor's own dtype. With ``model``, entries the
        averager does not track (ignored buffers, frozen parameters, excluded names) are filled
        from it, so the result loads with ``strict=True``.
        """
        self._require_update()
        out: dict[str, Tensor] = {}
        if model is not None:
            for k, v in unwrap_model(model).state_dict().items():
                out[canonical_name(k)] = v.detach().clone()
        for name, t in self.averaged_tensors(which).items():
            out[name] = t.detach().to(self._entries[name].dtype, copy=True)
        return out

    @torch.no_grad()
    def copy_to(self, model: nn.Module, *, which: str | None = None) -> None:
        """Write the averages into the model's tensors, in place (permanently)."""
        self._require_update()
        tensors = self._paired(model)
        for name, avg in self.averaged_tensors(which).items():
            tensors[name].copy_(avg)

    def _paired(self, model: nn.Module) -> dict[str, Tensor]:
        if not isinstance(model, nn.Module):
            raise bad_arg("model", type(model).__name__, "a torch.nn.Module")
        binding = self._bind(model)
        out: dict[str, Tensor] = {}
        for g, srcs in zip(self._groups, binding.srcs, strict=True):
            for e, t in zip(g.entries, srcs, strict=True):
                out[e.name] = t.view(e.shape) if t.dim() == 1 and len(e.shape) != 1 else t
        return out

    @contextlib.contextmanager
    @torch.no_grad()
    def swapped_in(self, model: nn.Module, *, which: str | None = None) -> Iterator[nn.Module]:
        """Put the averaged weights into the live model, in place, and restore them on exit.

        The model keeps its Parameter objects (optimizers and compiled graphs keep working). On
        exit, also when the body raises, every tracked tensor gets its training value back. Changes
        the body makes to tracked tensors (e.g. :func:`recompute_bn` on running statistics) are
        undone too; use :meth:`load_from` inside the block to keep them in the average.
        """
        self._require_update()
        tensors = self._paired(model)
        backup = {n: t.detach().clone() for n, t in tensors.items()}
        try:
            for name, avg in self.averaged_tensors(which).items():
                tensors[name].copy_(avg)
            yield model
        finally:
            with torch.no_grad():
                for n, t in tensors.items():
                    t.copy_(backup[n])

    @torch.no_grad()
    def load_from(
        self, model: nn.Module, names: Sequence[str] | None = None, *, which: str | None = None
    ) -> None:
        """Overwrite stored averages with the model's current values (e.g. refreshed BN statistics).

        Args:
            model: the source module.
            names: canonical names to take (default: every tracked buffer).
            which: the rule whose average is written (copied tensors are shared by all rules).
        """
        self._require_update()
        tensors = self._paired(model)
        if names is None:
            names = [n for n in self._entries if n not in self._param_names(model)]
        unknown = [n for n in names if n not in self._entries]
        if unknown:
            raise bad_arg("names", unknown[:10], "canonical names tracked by this averager")
        stored = self.averaged_tensors(which)
        for n in names:
            stored[n].copy_(tensors[n])

    @torch.no_grad()
    def all_reduce(self, group: Any = None) -> None:
        """Replace every average by its mean over the ranks of ``group`` (torch.distributed).

        One collective per storage group (not per tensor). This is SWAP's last step (average the
        workers' independently trained weights) and reconciles averages that drifted across ranks.
        Copied tensors are left as they are. Every rank must call it, with the same configuration.

        Raises:
            StateError: torch.distributed is not initialised, or no update happened yet.
        """
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise StateError("all_reduce needs an initialised torch.distributed process group")
        self._require_update()
        world = dist.get_world_size(group)
        for slot in self.rules:
            for gi, g in enumerate(self._groups):
                if g.averaged:
                    flat = self._storage[slot][gi]
                    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
                    flat.div_(world)

    def _param_names(self, model: nn.Module) -> set[str]:
        return {n for n, (_, is_p) in named_tensors(model).items() if is_p}

    # ------------------------------------------------------------------ checkpointing

    def config(self) -> dict[str, Any]:
        """Plain-data description of the configuration (saved in checkpoints)."""
        return {
            "rules": {s: r.config() for s, r in self.rules.items()},
            "params": self.params,
            "include": list(self.include),
            "exclude": list(self.exclude),
            "buffers": self.buffers,
            "dtype": str(self.dtype) if self.dtype is not None else None,
            "nonfinite": self.nonfinite,
        }

    def state_dict(self) -> dict[str, Any]:
        """Counters, configuration and averages: enough to continue exactly after a restart.

        Tensors are views that share one flat storage per group (``torch.save`` writes it once).
        """
        return {
            "format": "weightavg.Averager",
            "format_version": FORMAT_VERSION,
            "config": self.config(),
            "num_updates": self.num_updates,
            "num_skipped": self.num_skipped,
            "step": self.step,
            "last_step": self.last_step,
            "averages": {s: self.averaged_tensors(s) for s in self.rules} if self.num_updates else {},
        }

    @torch.no_grad()
    def load_state_dict(self, state: Mapping[str, Any], *, strict: bool = True) -> None:
        """Restore what :meth:`state_dict` returned.

        Raises:
            StateError: not an Averager state, or an unsupported format version.
            MismatchError: different rules (with ``strict``) or different tracked names/shapes.
        """
        if not isinstance(state, Mapping) or state.get("format") != "weightavg.Averager":
            raise StateError("state is not a weightavg.Averager state_dict (missing 'format' key)")
        version = state.get("format_version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise StateError(f"state has format_version={version!r}; this weightavg reads <= {FORMAT_VERSION}")
        cfg = state["config"]
        mine = self.config()
        if strict and cfg["rules"] != mine["rules"]:
            raise MismatchError(f"state was saved with rules {cfg['rules']}, this averager has {mine['rules']}"
                                " (pass strict=False to load anyway)")
        averages = state["averages"]
        if averages:
            for slot in self.rules:
                if slot not in averages:
                    raise MismatchError(f"state has no average for rule {slot!r} (it has {sorted(averages)})")
                saved = averages[slot]
                missing = sorted(set(self._entries) - set(saved))
                unexpected = sorted(set(saved) - set(self._entries))
                reshaped = [(n, tuple(saved[n].shape), tuple(e.shape)) for n, e in self._entries.items()
                            if n in saved and saved[n].shape != e.shape]
                if missing or unexpected or reshaped:
                    raise MismatchError("state does not match the tracked tensors: "
                                        + describe_mismatch(missing, unexpected, reshaped,
                                                            left="averager", right="state"))
            for slot in self.rules:
                mine_t = self.averaged_tensors(slot)
                for n, t in averages[slot].items():
                    mine_t[n].copy_(t)
        self._pending_copy = None  # the loaded copies stand until the next update
        self.num_updates = int(state["num_updates"])
        self.num_skipped = int(state.get("num_skipped", 0))
        self.step = int(state["step"])
        ls = state.get("last_step")
        self.last_step = int(ls) if ls is not None else None

    def reset(self) -> None:
        """Forget the average: the next update copies again."""
        self.num_updates = 0
        self.num_skipped = 0
        self.step = 0
        self.last_step = None
        self._pending_copy = None

    # ------------------------------------------------------------------ describing

    @property
    def names(self) -> list[str]:
        """Canonical names of the tracked tensors."""
        return list(self._entries)

    def summary(self) -> str:
        """One line describing what is tracked, to log."""
        avg = [e for g in self._groups if g.averaged for e in g.entries]
        cp = [e for g in self._groups if not g.averaged for e in g.entries]
        dtypes = sorted({str(g.dtype).replace("torch.", "") for g in self._groups if g.averaged})
        devs = sorted({str(g.dev) for g in self._groups})
        rules = ", ".join(f"{s}={r!r}" for s, r in self.rules.items())
        return (f"weightavg.Averager: {len(avg)} tensors ({sum(e.numel for e in avg):,} elements) "
                f"averaged in {'/'.join(dtypes) or '-'} on {'/'.join(devs)}, {len(cp)} copied; "
                f"buffers={self.buffers!r}; rules: {rules}; updates: {self.num_updates}")

    def __repr__(self) -> str:
        n = sum(e.numel for e in self._entries.values())
        rules = self.rules["default"] if list(self.rules) == ["default"] else self.rules
        return (f"Averager(rule={rules!r}, params={self.params!r}, buffers={self.buffers!r}, "
                f"dtype={self.dtype}, device={self.device}, nonfinite={self.nonfinite!r}, "
                f"tracked={len(self._entries)} tensors/{n:,} elements, num_updates={self.num_updates})")


def _total(sums: list[Tensor]) -> Tensor | float:
    """One value that is finite iff every partial sum is (no host read here)."""
    if not sums:
        return 0.0
    if len(sums) == 1:
        return sums[0]
    return torch.stack([s.to(sums[0].device) for s in sums]).sum()


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


def _tiling(ts: list[Tensor]) -> list[int] | None:
    """Order in which contiguous tensors tile one gap-free range of one storage, or None."""
    if len(ts) < 2 or not all(t.is_contiguous() for t in ts):
        return None
    base = ts[0].untyped_storage().data_ptr()
    if any(t.untyped_storage().data_ptr() != base for t in ts):
        return None
    order = sorted(range(len(ts)), key=lambda i: ts[i].storage_offset())
    pos = ts[order[0]].storage_offset()
    for i in order:
        if ts[i].storage_offset() != pos:
            return None
        pos += ts[i].numel()
    return order


@torch.no_grad()
def make_contiguous(model: nn.Module, *, buffers: bool = True) -> nn.Module:
    """Store the model's parameters (and floating buffers) in one flat buffer per (device, dtype).

    In place: every Parameter stays the same object (optimizers, hooks and compiled graphs keep
    working); only its storage moves, values unchanged. Parameters come first, then persistent
    floating buffers. An :class:`Averager` built afterwards reads each group as one span: its update
    is a single ``lerp_`` (and one ``sum`` for the non-finite check) with no gather, as fast as a
    flat buffer, however many tensors the model has. Call it before building the averager (and,
    for consistency, before the optimizer); integer buffers are left as they are.

    Returns:
        The model.
    """
    if not isinstance(model, nn.Module):
        raise bad_arg("model", type(model).__name__, "a torch.nn.Module")
    root = unwrap_model(model)
    params: list[tuple[Tensor, list[tuple[nn.Module, str]]]] = []
    bufs: list[tuple[Tensor, list[tuple[nn.Module, str]]]] = []
    where: dict[int, list[tuple[nn.Module, str]]] = {}
    for mod in root.modules():
        for name, p in mod._parameters.items():
            if p is not None:
                if id(p) not in where:
                    where[id(p)] = []
                    params.append((p, where[id(p)]))
                where[id(p)].append((mod, name))
        for name, b in mod._buffers.items():
            if b is None or not buffers or not b.is_floating_point() or name in mod._non_persistent_buffers_set:
                continue
            if id(b) not in where:
                where[id(b)] = []
                bufs.append((b, where[id(b)]))
            where[id(b)].append((mod, name))
    groups: dict[tuple[torch.device, torch.dtype], list[tuple[Tensor, list[tuple[nn.Module, str]], bool]]] = {}
    for items, is_param in ((params, True), (bufs, False)):
        for t, owners in items:
            groups.setdefault((t.device, t.dtype), []).append((t, owners, is_param))
    for (device, dtype), members in groups.items():
        flat = torch.empty(sum(t.numel() for t, _, _ in members), dtype=dtype, device=device)
        off = 0
        for t, owners, is_param in members:
            view = flat[off : off + t.numel()].view(t.shape)
            view.copy_(t)
            off += t.numel()
            if is_param:
                t.data = view
            else:
                for mod, name in owners:
                    mod._buffers[name] = view
    return model


def check_options(
    *, params: object = "all", buffers: object = "average", nonfinite: object = "raise",
    dtype: object = torch.float32,
) -> None:
    """Validate the Averager's option values (also used by layers that build an Averager later)."""
    if params not in ("all", "trainable"):
        raise bad_arg("params", params, "'all' or 'trainable'")
    if buffers not in ("average", "copy", "ignore"):
        raise bad_arg("buffers", buffers, "'average', 'copy' or 'ignore'")
    if nonfinite not in ("raise", "skip", "allow"):
        raise bad_arg("nonfinite", nonfinite, "'raise', 'skip' or 'allow'")
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise bad_arg("dtype", dtype, "a floating torch.dtype or None")


def _patterns(name: str, value: str | Sequence[str] | None) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if isinstance(value, Sequence) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise bad_arg(name, value, "a glob pattern or a list of glob patterns on canonical names")
