"""Binding a source to the storage: its tensors collected once, in storage order.

Part of the engine (see :mod:`weightavg._engine`). A :class:`Binder` pairs a source's tensors with
the storage's entries by canonical name (checking names, shapes, dtypes and devices) and keeps the
result per module, so that an update from the same module collects nothing again. A cached binding
is dropped when the module's storage changed (``.to()``, ``.half()``, ``load_state_dict(assign=True)``).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from ._errors import MismatchError, describe_mismatch
from ._names import Source, source_tensors, unwrap_model
from ._storage import FlatStorage, _tiling

if TYPE_CHECKING:
    from ._executor import _Plan

__all__ = ["Binder"]


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
    plan: _Plan | None = None  # built by the executor on the first update that can use it


def _dead_ref() -> None:
    return None


class Binder:
    """Collects and caches the bindings of sources to one storage."""

    def __init__(self, storage: FlatStorage) -> None:
        self.storage = storage
        self.bindings: dict[int, _Binding] = {}
        self.last: _Binding | None = None

    def bind(self, source: Source) -> _Binding:
        """The binding of ``source`` (cached for a module while its storage stays in place).

        Raises:
            MismatchError: names, shapes, dtypes or devices differ from the tracked ones.
        """
        if isinstance(source, nn.Module):
            last = self.last
            if last is not None and last.model_ref() is source:
                b: _Binding | None = last  # the unwrapped model of the previous update
            else:
                b = self.bindings.get(id(unwrap_model(source)))
            if b is not None and b.model_ref() is not None:
                for probe, fp in zip(b.probes, b.fingerprint, strict=True):
                    if probe is not None and probe.data_ptr() != fp:
                        break  # storage replaced (.to(), .half(), load with assign=True)
                else:
                    self.last = b
                    return b
        store = self.storage
        tensors = source_tensors(source, "model")
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
        probes: list[Tensor | None] = []
        for g in store.groups:
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
        for g, row in zip(store.groups, srcs, strict=True):
            span = None
            if g.contiguous and _tiling(row) == list(range(len(row))):
                first = row[0]
                span = torch.as_strided(first, (g.numel,), (1,), first.storage_offset())
            spans.append(span)
        if isinstance(source, nn.Module):
            ref: Any = weakref.ref(unwrap_model(source))
            b = _Binding(ref, srcs, probes, fingerprint, flat, spans)
            self.bindings[id(unwrap_model(source))] = b
            self.last = b
        else:
            b = _Binding(_dead_ref, srcs, probes, fingerprint, flat, spans)
        return b

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
