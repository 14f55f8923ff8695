"""Sharded sources: each rank averages the local shards of its DTensor parameters.

Part of the engine (see :mod:`weightavg._engine`). A model whose parameters (or buffers) are
``DTensor``s -- FSDP2 ``fully_shard`` on a 1-D mesh, HSDP on a 2-D mesh, tensor parallel via
``parallelize_module``, or any mixture with plain tensors -- is averaged shard by shard: the
average is element-wise, so each rank keeps the average of its own local elements and an update
reads ``to_local()`` views with no communication at all. The siblings of the flat engine are:

- :class:`ShardedStorage`: a :class:`~weightavg._storage.FlatStorage` laid out over the *local*
  tensors (4 bytes x local elements in float32, whatever the parameters' dtype); it remembers each
  sharded entry's mesh, placements, global shape and stride and presents its views as DTensors
  (``DTensor.from_local(view, mesh, placements, shape=, stride=, run_check=False)``: no copy, no
  communication; the global shape and stride keep uneven shards right).
- :class:`ShardedBinder`: binds a source's local tensors (checking global shapes, meshes and
  placements); its change probe reads the *local* tensor's pointer (``DTensor.data_ptr()`` is 0).
- :class:`ShardedExecutor`: the local executor, whose non-finite check all-reduces one flag on
  every rank on every checked update, so that a NaN in one rank's shard refuses (or skips) the
  update on every rank; ``nonfinite="allow"`` communicates nothing.

FSDP2 leaves a unit's parameters unsharded (plain full tensors) after some forwards; collecting a
source and writing into it first calls ``reshard()`` on every FSDP2 unit (local, no collective).
Refused with a :class:`~weightavg.ConfigError` naming the parameter: FSDP1
(``FullyShardedDataParallel``) and DeepSpeed ZeRO-3 partitioned parameters.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ._binding import Binder
from ._deferred import DeferredExecutor
from ._errors import ConfigError, MismatchError
from ._executor import LocalExecutor
from ._storage import FlatStorage

__all__ = ["ShardedBinder", "ShardedDeferredExecutor", "ShardedExecutor", "ShardedStorage", "has_dtensor",
           "is_dtensor", "prepare_module"]


def _dtensor_type() -> type | None:
    if not torch.distributed.is_available():
        return None
    from torch.distributed.tensor import DTensor

    return DTensor


def is_dtensor(t: object) -> bool:
    """True for a ``torch.distributed.tensor.DTensor`` (a Parameter holding one included)."""
    cls = _dtensor_type()
    return cls is not None and isinstance(t, cls)


def has_dtensor(tensors: Mapping[str, tuple[Tensor, bool]]) -> bool:
    """True when one of a source's tensors is a DTensor (the source needs the sharded storage)."""
    cls = _dtensor_type()
    return cls is not None and any(isinstance(t, cls) for t, _ in tensors.values())


def _is_fsdp1(mod: nn.Module) -> bool:
    cls = type(mod)
    return cls.__name__ == "FullyShardedDataParallel" and cls.__module__.startswith("torch.distributed.fsdp")


def prepare_module(model: nn.Module) -> None:
    """Make a module's tensors collectable: refuse what cannot be averaged here, and put every
    FSDP2 unit back into its sharded state (``reshard()``: local, no collective).

    Raises:
        ConfigError: FSDP1 (``FullyShardedDataParallel``) or DeepSpeed ZeRO-3 partitioned
            parameters, naming the first parameter concerned.
    """
    fsdp2: type | None = None
    if torch.distributed.is_available():
        from torch.distributed.fsdp import FSDPModule

        fsdp2 = FSDPModule
    units: list[Any] = []
    for mod_name, mod in model.named_modules():
        if _is_fsdp1(mod):
            pname = next((n for n, _ in mod.named_parameters()), "<none>")
            where = f"{mod_name}." if mod_name else ""
            raise ConfigError(
                f"model is wrapped in FSDP1 FullyShardedDataParallel (parameter {where}{pname!r} is a flat "
                "parameter shard); weightavg averages FSDP2 models: shard the model with "
                "torch.distributed.fsdp.fully_shard instead (its parameters are DTensors)")
        for pname, p in mod._parameters.items():
            if p is None:
                continue
            if type(p).__name__ == "FlatParameter":
                raise ConfigError(
                    f"parameter {(mod_name + '.' if mod_name else '') + pname!r} is an FSDP1 FlatParameter; "
                    "weightavg averages FSDP2 models: use torch.distributed.fsdp.fully_shard instead")
            if hasattr(p, "ds_id") or hasattr(p, "ds_status"):
                raise ConfigError(
                    f"parameter {(mod_name + '.' if mod_name else '') + pname!r} is a DeepSpeed ZeRO-3 "
                    "partitioned parameter, which weightavg cannot average (each rank holds an opaque "
                    "partition); use ZeRO stage 1 or 2 (full parameters on every rank) or FSDP2 "
                    "(torch.distributed.fsdp.fully_shard)")
        if fsdp2 is not None and isinstance(mod, fsdp2):
            units.append(mod)
    for unit in units:
        unit.reshard()


@dataclass(frozen=True)
class _Shard:
    """How a tracked tensor is sharded: its DTensor's mesh, placements, global shape and stride."""

    mesh: Any
    placements: tuple[Any, ...]
    shape: torch.Size
    stride: tuple[int, ...]

    @classmethod
    def of(cls, t: Any) -> _Shard:
        return cls(t.device_mesh, tuple(t.placements), t.shape, tuple(t.stride()))

    def describe(self) -> str:
        return f"{tuple(self.shape)} on mesh {tuple(self.mesh.shape)} with placements {self.placements}"


def _localize(tensors: Mapping[str, tuple[Tensor, bool]]) -> tuple[dict[str, tuple[Tensor, bool]], dict[str, _Shard]]:
    """The source's tensors with each DTensor replaced by its local tensor, and how each was sharded."""
    local: dict[str, tuple[Tensor, bool]] = {}
    shards: dict[str, _Shard] = {}
    for name, (t, is_param) in tensors.items():
        if is_dtensor(t):
            shards[name] = _Shard.of(t)
            local[name] = (t.to_local(), is_param)  # type: ignore[attr-defined]
        else:
            local[name] = (t, is_param)
    return local, shards


class ShardedStorage(FlatStorage):
    """A :class:`~weightavg._storage.FlatStorage` over the local shards of a source's DTensors.

    Entries describe the *local* tensors (``shape``/``numel`` of the shard, possibly empty), so the
    flat buffers hold this rank's elements only; ``shards`` records each sharded entry's mesh,
    placements and global shape/stride. :meth:`present` turns views into DTensors.
    """

    sharded = True

    def __init__(self, tensors: dict[str, tuple[Tensor, bool]], slots: Sequence[str], **options: Any) -> None:
        local, shards = _localize(tensors)
        super().__init__(local, slots, **options)
        self.shards = {n: s for n, s in shards.items() if n in self.entries}

    def full_shape(self, name: str) -> torch.Size:
        s = self.shards.get(name)
        return s.shape if s is not None else self.entries[name].shape

    def present(self, views: dict[str, Tensor]) -> dict[str, Tensor]:
        """The views, each sharded entry's wrapped as a DTensor whose local tensor *is* the view.

        Built with the DTensor constructor (as FSDP2 builds its CPU-offloaded parameters), not
        ``DTensor.from_local``, which would copy a host view to the mesh's device: an average kept
        on the host (``device="cpu"``) of a model sharded on an accelerator stays on the host, and
        ``dcp.load`` into :meth:`~weightavg.Averager.state_dict` writes into the storage itself.
        """
        from torch.distributed.tensor import DTensor
        from torch.distributed.tensor._dtensor_spec import DTensorSpec, TensorMeta

        out = dict(views)
        for name, s in self.shards.items():
            view = out.get(name)
            if view is None:
                continue
            # torch 2.13 pickles a DTensor whose wrapper has a storage offset as a plain tensor (and
            # fails): build it on the same-shaped alias at offset 0, then point it at the view
            base = view if view.storage_offset() == 0 else view.as_strided(view.shape, view.stride(), 0)
            spec = DTensorSpec(s.mesh, s.placements, tensor_meta=TensorMeta(s.shape, s.stride, view.dtype))
            d = DTensor(base, spec, requires_grad=False)
            if base is not view:
                d._local_tensor = view
            out[name] = d
        return out

    def before_write(self, model: object) -> None:
        if isinstance(model, nn.Module):
            prepare_module(model)

    # ------------------------------------------------------------------ loading

    def rank(self) -> int | None:
        """This process's rank (None without an initialised process group)."""
        import torch.distributed as dist

        return dist.get_rank() if dist.is_available() and dist.is_initialized() else None

    def load_entry(self, name: str, view: Tensor, saved: Tensor, saved_rank: int | None = None) -> None:
        """Copy a saved tensor into the local view ``view`` of entry ``name``.

        ``saved`` may be the DTensor this storage presented (nothing to do when it is this very
        storage, as after ``dcp.load`` into :meth:`~weightavg.Averager.state_dict`), a DTensor with
        the same sharding saved by this same rank (``saved_rank``: the state's ``"rank"``), or a
        full plain tensor (this rank's slice is copied, no communication).

        Raises:
            MismatchError: a DTensor sharded differently or saved by another rank (a per-rank
                ``torch.save`` file read by another rank would silently take another rank's shard):
                load through ``dcp.load``, which reshards.
        """
        s = self.shards.get(name)
        if s is None:
            if is_dtensor(saved):
                raise MismatchError(
                    f"state holds {name!r} as a sharded DTensor, but this averager tracks it as a plain tensor; "
                    "load a sharded checkpoint with torch.distributed.checkpoint.load(avg.state_dict(), ...) "
                    "then avg.load_state_dict(...)")
            view.copy_(saved)
            return
        if is_dtensor(saved):
            local = saved.to_local()  # type: ignore[attr-defined]
            if local.data_ptr() == view.data_ptr() and local.shape == view.shape:
                return  # dcp.load wrote into this storage already
            if _Shard.of(saved) != s or local.shape != view.shape:
                raise MismatchError(
                    f"state holds {name!r} sharded as {_Shard.of(saved).describe()}, this averager as "
                    f"{s.describe()}; load it with torch.distributed.checkpoint.load(avg.state_dict(), ...) "
                    "(which reshards) then avg.load_state_dict(...)")
            if saved_rank != self.rank():
                raise MismatchError(
                    f"state holds {name!r} as the local shard of rank {saved_rank}, but this is rank "
                    f"{self.rank()}: each rank must load its own shard; save and load sharded averages with "
                    "torch.distributed.checkpoint (dcp.save(avg.state_dict(), ...), then dcp.load into "
                    "avg.state_dict() and avg.load_state_dict(...)), which reshards")
            view.copy_(local)
            return
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        shape, offset = compute_local_shape_and_global_offset(s.shape, s.mesh, s.placements)
        part = saved
        for dim, (n, o) in enumerate(zip(shape, offset, strict=True)):
            part = part.narrow(dim, o, n)
        view.copy_(part)

    # ------------------------------------------------------------------ full tensors

    def gather(self, name: str, value: Tensor) -> Tensor:
        """The full tensor of a presented value (a collective for a sharded entry; plain: itself)."""
        if not is_dtensor(value):
            return value
        local = value._local_tensor  # type: ignore[attr-defined]
        mesh = value.device_mesh  # type: ignore[attr-defined]
        if local.device.type != mesh.device_type:
            # an average kept on the host (device="cpu") of a model sharded on an accelerator: the
            # collective runs on the mesh's device, so this one shard goes there first
            from torch.distributed.tensor import DTensor

            value = DTensor.from_local(local.to(mesh.device_type), mesh, value.placements,  # type: ignore[attr-defined]
                                       shape=value.shape, stride=value.stride(), run_check=False)
        return value.full_tensor()  # type: ignore[attr-defined]


class _LocalProbe:
    """Change probe of a DTensor: the pointer of its current local tensor (``.to()`` replaces it)."""

    __slots__ = ("t",)

    def __init__(self, t: Any) -> None:
        self.t = t

    def data_ptr(self) -> int:
        return int(self.t._local_tensor.data_ptr())


class ShardedBinder(Binder):
    """Binds a source's local tensors to a :class:`ShardedStorage` (see :class:`~weightavg._binding.Binder`)."""

    storage: ShardedStorage

    def collect(self, source: Any) -> tuple[dict[str, tuple[Tensor, bool]], dict[str, tuple[Tensor, bool]]]:
        tensors = super().collect(source)[0]
        shards = self.storage.shards
        for name, (t, _) in tensors.items():
            e = self.storage.entries.get(name)
            if e is None:
                continue
            s = shards.get(name)
            if s is None and is_dtensor(t):
                raise MismatchError(f"tensor {name!r} is a DTensor now, but the averager was built for a plain "
                                    "tensor; build a new Averager after sharding the model")
            if s is not None:
                if not is_dtensor(t):
                    raise MismatchError(
                        f"tensor {name!r} is a plain tensor of shape {tuple(t.shape)}, but the averager was built "
                        f"for a DTensor {s.describe()}; expected the sharded model the averager was built on")
                got = _Shard.of(t)
                if got != s:
                    raise MismatchError(f"tensor {name!r} is sharded as {got.describe()}, but the averager was "
                                        f"built for {s.describe()}; build a new Averager after resharding")
        local, _ = _localize(tensors)
        return local, tensors

    def probe(self, g: Any, tensors: dict[str, tuple[Tensor, bool]]) -> Any:
        e = next((e for e in g.entries if e.numel > 0), g.entries[0] if g.entries else None)
        if e is None:
            return None
        t = tensors[e.name][0]
        return _LocalProbe(t) if is_dtensor(t) else t


class ShardedExecutor(LocalExecutor):
    """The local executor, with the non-finite verdict agreed by every rank (one all-reduce of one
    flag per checked update, on every rank; none with ``nonfinite="allow"``)."""

    def __init__(self, *args: Any, group: Any = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.group = group

    def _reduce_flag(self, bad: bool, device: torch.device) -> bool:
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return bad
        flag = torch.tensor([1 if bad else 0], dtype=torch.int32, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        return bool(flag.item())

    def _device(self) -> torch.device:
        import torch.distributed as dist

        backend = dist.get_backend(self.group) if dist.is_available() and dist.is_initialized() else "gloo"
        if backend == "nccl" and torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def finite(self, total: Tensor | float) -> bool:
        local = bool(torch.isfinite(torch.as_tensor(total)).all())
        return not self._reduce_flag(not local, self._device())

    def _nonfinite_names(self, binding: Any) -> list[str]:
        bad = super()._nonfinite_names(binding)
        # the sums overflowed somewhere: agree on whether any rank really holds NaN/Inf (every rank
        # takes this branch together, as they all saw the same flag)
        anywhere = self._reduce_flag(bool(bad), self._device())
        if anywhere and not bad:
            return ["(tensors on another rank)"]
        return bad if anywhere else []


class ShardedDeferredExecutor(DeferredExecutor):
    """The deferred (device-side) check over local shards: the finite flag is all-reduced (MAX of
    "not finite", one int32, ``async_op`` then ``wait()``: on NCCL the stream waits, the host does
    not) before the masked update, so every rank applies or refuses the same updates and its
    device counters agree; refusals surface at each rank's next read, as for one process.
    ``nonfinite="allow"`` never builds this executor (no check, no collective)."""

    def __init__(self, *args: Any, group: Any = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.group = group

    def agree(self, ok: Tensor) -> Tensor:
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return ok
        backend = dist.get_backend(self.group)
        flag = (~ok).to(torch.int32).reshape(1)
        if backend == "nccl" and flag.device.type != "cuda":
            flag = flag.cuda()
        elif backend == "gloo" and flag.device.type != "cpu":
            flag = flag.cpu()
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group, async_op=True).wait()
        return (flag[0] == 0).to(ok.device)


def refuse_sharded(storage: FlatStorage, what: str) -> None:
    """Raise ConfigError for a feature that does not support sharded models, naming a sharded tensor."""
    shards = getattr(storage, "shards", None)
    if shards:
        name = next(iter(shards))
        raise ConfigError(f"{what} does not support sharded models: tensor {name!r} is a DTensor "
                          f"({shards[name].describe()}); build it on the unsharded model")


def refuse_dtensor_model(model: object, what: str) -> None:
    """Raise ConfigError when ``model`` (a module) has a DTensor parameter or buffer, naming it."""
    if isinstance(model, nn.Module):
        for name, t in [*model.named_parameters(), *model.named_buffers()]:
            if is_dtensor(t):
                raise ConfigError(f"{what} does not support sharded models: tensor {name!r} is a DTensor "
                                  f"({_Shard.of(t).describe()}); build it on the unsharded model")
