"""Binding a source to the storage: its tensors collected once, in storage order.

Part of the engine (see :mod:`weightavg._engine`). A :class:`Binder` pairs a source's tensors with
the storage's entries by canonical name (checking names, shapes, dtypes and devices) and keeps the
result per module, so that an update from the same module collects nothing again. A cached binding
is dropped when the module's storage changed (``.to()``, ``.half()``, ``load_state_dict(assign=True)``)
or when one of its modules registered a parameter, buffer or submodule since (``model[1].weight =
nn.Parameter(...)``): torch's global registration hooks log which module registered something and
bump a generation counter, which a cached binding compares in O(1); when it moved, the binding
reads the log entries since (once) and is dropped only if one of them is one of its modules. What
neither sees: ``tensor.data = ...`` or ``tensor.set_(...)`` on a tensor other than the first of its
group (see :meth:`weightavg.Averager.refresh`).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from ._errors import MismatchError, describe_mismatch
from ._names import Source, source_tensors, unwrap_model
from ._storage import FlatStorage, _Group, _tiling

if TYPE_CHECKING:
    from ._executor import _Plan

__all__ = ["Binder"]


@dataclass
class _Binding:
    """Source tensors of one model, in storage order, collected once."""

    model_ref: Any
    srcs: list[list[Tensor]]  # per group: 1-D source views (the tensor itself if not contiguous)
    probes: list[Any]  # per group: its first source tensor object (Parameter or buffer), or None
    fingerprint: list[int]  # its data_ptr at binding time (a change means .to()/.half()/assign)
    flat: list[bool]  # per group: every source is a 1-D view
    spans: list[Tensor | None]  # per group: one 1-D view over all its sources, when they tile a range
    modules: frozenset[int] = frozenset()  # ids of the model's modules
    generation: int = 0  # the registration generation up to which it is known to be current
    big_views: dict[tuple[str, int], list[Tensor]] = field(default_factory=dict)
    plan: _Plan | None = None  # built by the executor on the first update that can use it
    checks: list[tuple[Any, int]] = field(default_factory=list)  # (probe, fingerprint), probes not None

    def __post_init__(self) -> None:
        self.checks = [(p, fp) for p, fp in zip(self.probes, self.fingerprint, strict=True) if p is not None]


def _dead_ref() -> None:
    return None


# ids of the modules that registered (or replaced) a parameter, buffer or submodule, in order; the
# generation is _GEN[0] == _BASE[0] + len(_LOG) (older entries are dropped: bindings older than them rebind)
_LOG: list[int] = []
_BASE = [0]
_GEN = [0]  # _BASE[0] + len(_LOG), set by _bump (one read on the hot path)
_KEEP = 1 << 12
_HOOKS: list[Any] = []


def _bump(module: nn.Module, name: str, value: object) -> None:
    _LOG.append(id(module))
    if len(_LOG) > 2 * _KEEP:
        del _LOG[:_KEEP]
        _BASE[0] += _KEEP
    _GEN[0] = _BASE[0] + len(_LOG)


def _current(binding: _Binding) -> bool:
    """False when one of the binding's modules registered something since it was collected."""
    now = _GEN[0]
    if binding.generation == now:
        return True
    start = binding.generation - _BASE[0]
    if start < 0:
        return False  # the log no longer reaches back to it
    mods = binding.modules
    if any(m in mods for m in _LOG[start:]):
        return False
    binding.generation = now  # only other modules changed
    return True


def _install_hooks() -> None:
    """Install torch's global registration hooks once (they only log in :data:`_LOG` and bump :data:`_GEN`)."""
    if not _HOOKS:
        from torch.nn.modules import module as m

        _HOOKS.extend((m.register_module_parameter_registration_hook(_bump),
                       m.register_module_buffer_registration_hook(_bump),
                       m.register_module_module_registration_hook(_bump)))


def _in_place(binding: _Binding) -> bool:
    """Whether the storage of every group's first source is still where it was at binding time."""
    for probe, fp in binding.checks:  # noqa: SIM110 (no generator frame on the hot path)
        if probe.data_ptr() != fp:
            return False  # storage replaced (.to(), .half(), load with assign=True)
    return True


def is_stale(binding: _Binding) -> bool:
    """True when a module's binding may no longer reflect its tensors (one of its modules registered
    a parameter, buffer or submodule since)."""
    return binding.model_ref is not _dead_ref and not _current(binding)


class Binder:
    """Collects and caches the bindings of sources to one storage."""

    def __init__(self, storage: FlatStorage) -> None:
        self.storage = storage
        self.bindings: dict[int, _Binding] = {}
        self.last: _Binding | None = None
        _install_hooks()

    def bind(self, source: Source) -> _Binding:
        """The binding of ``source`` (cached for a module while its storage stays in place).

        Raises:
            MismatchError: names, shapes, dtypes or devices differ from the tracked ones.
        """
        last = self.last
        # the common case first, in as few steps as possible (with the cache cold after a training
        # step every line costs memory accesses): the module of the previous update, unchanged
        # (_in_place inlined: no call)
        if last is not None and last.model_ref() is source and last.generation == _GEN[0]:
            for probe, fp in last.checks:
                if probe.data_ptr() != fp:
                    break
            else:
                return last
        if isinstance(source, nn.Module):
            b = self.bindings.get(id(unwrap_model(source)))
            if b is not None and _current(b) and b.model_ref() is not None and _in_place(b):
                self.last = b
                return b
        store = self.storage
        tensors, originals = self.collect(source)
        missing = sorted(n for n in store.entries if n not in tensors)
        unexpected = sorted(n for n in set(tensors) - store.all_names)
        reshaped = [(n, tuple(e.shape), tuple(tensors[n][0].shape)) for n, e in store.entries.items()
                    if n in tensors and tensors[n][0].shape != e.shape]
        if missing or unexpected or reshaped:
            raise MismatchError(
                "model does not match the averager's tracked tensors (paired by name): "
                + describe_mismatch(missing, unexpected, reshaped)
            )
        srcs: list[list[Tensor]] = []
        probes: list[Any] = []
        for g in store.groups:
            probes.append(self.probe(g, originals))
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
        generation = _GEN[0]
        fingerprint = [p.data_ptr() if p is not None else 0 for p in probes]
        flat = [all(t.dim() == 1 for t in row) for row in srcs]
        spans: list[Tensor | None] = []
        for g, row in zip(store.groups, srcs, strict=True):
            span = None
            if g.contiguous and _tiling(row) == list(range(len(row))):
                first = row[0]
                span = torch.as_strided(first, (g.numel,), (1,), first.storage_offset())
            spans.append(span)
        if isinstance(source, nn.Module):
            root = unwrap_model(source)
            ref: Any = weakref.ref(root)
            modules = frozenset(id(m) for m in root.modules())
            b = _Binding(ref, srcs, probes, fingerprint, flat, spans, modules, generation)
            self.bindings[id(unwrap_model(source))] = b
            self.last = b
        else:
            b = _Binding(_dead_ref, srcs, probes, fingerprint, flat, spans)
        return b

    def collect(self, source: Source) -> tuple[dict[str, tuple[Tensor, bool]], dict[str, tuple[Tensor, bool]]]:
        """The source's ``name -> (tensor, is_param)`` as the storage's entries describe them, and
        as the source holds them (the same here; see :class:`weightavg._sharded.ShardedBinder`)."""
        tensors = source_tensors(source, "model")
        return tensors, tensors

    def probe(self, g: _Group, tensors: dict[str, tuple[Tensor, bool]]) -> Any:
        """What tells a group's storage was replaced: an object whose ``data_ptr()`` changes then."""
        return tensors[g.entries[0].name][0] if g.entries else None

    def refresh(self) -> None:
        """Forget every cached binding."""
        self.bindings.clear()
        self.last = None

    def paired(self, binding: _Binding) -> dict[str, Tensor]:
        """Canonical name -> the bound source tensor, in its own shape."""
        out: dict[str, Tensor] = {}
        for g, srcs in zip(self.storage.groups, binding.srcs, strict=True):
            for e, t in zip(g.entries, srcs, strict=True):
                out[e.name] = t.view(e.shape) if t.dim() == 1 and len(e.shape) != 1 else t
        return out


def is_module_binding(binding: _Binding) -> bool:
    """True for the cached binding of a module (False for a mapping's one-off binding)."""
    return binding.model_ref is not _dead_ref
