"""What is tracked and where it lives: selected tensors, their layout and the flat storage.

Part of the engine (see :mod:`weightavg._engine`). :class:`FlatStorage` selects a source's tensors
(``params``/``include``/``exclude``/``buffers``), groups them by (source device, source dtype,
averaged?), orders each group (small tensors first, packed in runs; or the sources' own order when
they tile one range, see :func:`make_contiguous`) and allocates one flat buffer per rule and
group (``flat[slot][gi]``) plus one per copied group (``copies[gi]``); every tracked tensor is a
view into it.

A different kind of storage is a subclass overriding the hooks below (``full_shape``, ``present``,
``before_write``, ``load_entry``, ``gather``, ``rank``): :class:`weightavg._sharded.ShardedStorage`
lays the same groups out over the local shards of DTensor parameters (entries describe the local
tensors) and presents its views as DTensors; its binder binds each source's ``to_local()``, and the
executors run unchanged on local tensors.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn

from ._errors import ConfigError, MismatchError, bad_arg
from ._names import unwrap_model

__all__ = ["FlatStorage", "make_contiguous"]

_BIG = 1 << 13  # tensors with at least this many elements are not packed (benchmarks/update_vs_count.py:
# from 8Ki elements on, a lerp_ per tensor or one foreach beats gathering them first)
_CHUNK = 1 << 16  # packed tensors are gathered and applied in runs of at most this many elements

BufferPolicy = Literal["average", "copy", "ignore"]


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


class FlatStorage:
    """The tracked tensors of one source and their averages, one flat buffer per (rule, group).

    Args:
        tensors: the source's ``name -> (tensor, is_param)`` (see :func:`weightavg._names.source_tensors`).
        slots: the rules' names; each gets its own averages (copied tensors are shared).
        params, include, exclude, buffers, dtype, device: as :class:`weightavg.Averager` takes them
            (``include``/``exclude`` already normalised to tuples, ``device`` to a device or None).

    ``entries`` is empty when nothing matched (the caller raises, naming its argument).
    """

    sharded = False  # see weightavg._sharded.ShardedStorage

    def __init__(
        self,
        tensors: dict[str, tuple[Tensor, bool]],
        slots: Sequence[str],
        *,
        params: str,
        include: tuple[str, ...],
        exclude: tuple[str, ...],
        buffers: BufferPolicy,
        dtype: torch.dtype | None,
        device: torch.device | None,
    ) -> None:
        self.params = params
        self.include = include
        self.exclude = exclude
        self.buffers = buffers
        self.dtype = dtype
        self.device = device
        self.all_names = set(tensors)
        entries = self._select(tensors)
        self.groups = self._layout(entries, tensors)
        self.entries = {e.name: e for g in self.groups for e in g.entries}
        # flat[slot][gi]: flat averages; copies share one storage across rules
        self.flat: dict[str, list[Tensor]] = {}
        for slot in slots:
            self.flat[slot] = [
                torch.zeros(g.numel, dtype=g.dtype, device=g.dev) if g.averaged else torch.empty(0)
                for g in self.groups
            ]
        self.copies = [
            torch.zeros(g.numel, dtype=g.dtype, device=g.dev) if not g.averaged else torch.empty(0)
            for g in self.groups
        ]

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

    # ------------------------------------------------------------------ views

    def views(self, slot: str) -> dict[str, Tensor]:
        """Canonical name -> view of the stored value (``slot``'s average, or the shared copy)."""
        out: dict[str, Tensor] = {}
        for gi, g in enumerate(self.groups):
            flat = self.flat[slot][gi] if g.averaged else self.copies[gi]
            for e in g.entries:
                out[e.name] = flat[e.offset : e.offset + e.numel].view(e.shape)
        return out

    def slot_views(self, slot: str, gi: int) -> list[Tensor]:
        """Views of ``slot``'s averages of group ``gi``, shaped, in storage order."""
        flat = self.flat[slot][gi]
        return [flat[e.offset : e.offset + e.numel].view(e.shape) for e in self.groups[gi].entries]

    # the hooks a sharded storage overrides (weightavg._sharded.ShardedStorage): for this one, a
    # stored tensor is its own full tensor

    def full_shape(self, name: str) -> torch.Size:
        """Shape of the tracked tensor ``name`` as the model sees it."""
        return self.entries[name].shape

    def present(self, views: dict[str, Tensor]) -> dict[str, Tensor]:
        """Views as the user reads them (here: unchanged)."""
        return views

    def before_write(self, model: object) -> None:
        """Called before the averages are written into ``model``, and before its values are restored."""

    def rank(self) -> int | None:
        """The rank a state of this storage records (None: not sharded, states are the same on every rank)."""
        return None

    def load_entry(self, name: str, view: Tensor, saved: Tensor, saved_rank: int | None = None) -> None:
        """Copy a saved tensor (from a state dict) into the view ``view`` of entry ``name``.

        Raises:
            MismatchError: ``saved`` is a DTensor (a sharded averager's state) and this averager is
                not sharded: load such a state with ``torch.distributed.checkpoint.load``.
        """
        if type(saved).__name__ == "DTensor":
            raise MismatchError(
                f"state holds {name!r} as a DTensor (a sharded averager's state), this averager tracks a plain "
                "tensor; load it with torch.distributed.checkpoint.load(avg.state_dict(), checkpoint_id=...) "
                "then avg.load_state_dict(...)")
        view.copy_(saved)

    def gather(self, name: str, value: Tensor) -> Tensor:
        """The full tensor of a presented value (here: the value itself)."""
        return value

    def flat_layout(self) -> dict[str, tuple[int, int, torch.Size]]:
        """Name -> (start, stop, shape) of each averaged tensor in the groups' concatenation."""
        out: dict[str, tuple[int, int, torch.Size]] = {}
        off = 0
        for g in self.groups:
            if g.averaged:
                for e in g.entries:
                    out[e.name] = (off + e.offset, off + e.offset + e.numel, e.shape)
                off += g.numel
        return out


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

    Raises:
        ConfigError: ``model`` is not an ``nn.Module``; a parameter is a DTensor (a sharded
            model: its storage belongs to FSDP2 / the tensor-parallel plan).

    Examples:
        >>> import torch, weightavg
        >>> m = weightavg.make_contiguous(torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 1)))
        >>> w0, b1 = m[0].weight, m[1].bias
        >>> w0.untyped_storage().data_ptr() == b1.untyped_storage().data_ptr()  # one buffer
        True
    """
    if not isinstance(model, nn.Module):
        raise bad_arg("model", type(model).__name__, "a torch.nn.Module")
    root = unwrap_model(model)
    for pname, param in root.named_parameters():
        if type(param).__name__ == "DTensor" or hasattr(param, "device_mesh"):
            raise ConfigError(
                f"make_contiguous cannot move parameter {pname!r}: it is a DTensor (FSDP2 / tensor "
                "parallel), whose storage the sharding owns; build the Averager without make_contiguous "
                "(it averages the local shards as they are)")
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
