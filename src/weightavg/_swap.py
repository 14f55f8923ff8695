"""SWAP's last step (Gupta et al., ICLR 2020): average the workers' weights, then recompute BN.

Re-exported by :mod:`weightavg.lowp` as ``swap_average``.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from ._bn import has_running_stats, recompute_bn
from ._engine import Averager, named_tensors
from ._errors import ConfigError, MismatchError, StateError, bad_arg
from ._rules import mean

__all__ = ["model_signature", "swap_average"]


def model_signature(model: nn.Module) -> Tensor:
    """A fixed-size digest of the model's tensors' names, shapes and dtypes (int64, 6 values).

    ``[number of tensors, number of elements, 4 words of SHA-256 over (name, shape, dtype)]``:
    equal on two ranks exactly when they hold the same architecture (up to hash collisions).
    """
    tensors = named_tensors(model)
    h = hashlib.sha256()
    numel = 0
    for name in sorted(tensors):
        t, is_param = tensors[name]
        numel += t.numel()
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|{int(is_param)};".encode())
    digest = h.digest()
    words = [int.from_bytes(digest[i:i + 8], "little", signed=True) for i in range(0, 32, 8)]
    return torch.tensor([len(tensors), numel, *words], dtype=torch.int64)


def _collective_device(model: nn.Module, group: Any) -> torch.device:
    import torch.distributed as dist

    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    for p in model.parameters():
        return p.device if p.device.type != "meta" else torch.device("cpu")
    return torch.device("cpu")


def _check_same_model(model: nn.Module, group: Any, with_bn_data: bool) -> None:
    """Raise the same error on every rank unless all ranks hold the same architecture.

    Whether each rank passed ``bn_data`` travels with the signature: the BatchNorm recomputation
    is a collective, so either every rank runs it or none.
    """
    import torch.distributed as dist

    dev = _collective_device(model, group)
    mine = torch.cat([model_signature(model), torch.tensor([int(with_bn_data)])]).to(dev)
    world = dist.get_world_size(group)
    every = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(every, mine, group=group)
    rows = [tuple(int(v) for v in s.cpu()) for s in every]
    sigs = [r[:-1] for r in rows]
    if len(set(sigs)) == 1:
        flags = [r[-1] for r in rows]
        if len(set(flags)) > 1:
            given = [r for r, f in enumerate(flags) if f]
            raise ConfigError(
                f"swap_average: bn_data was given on rank(s) {given} only; pass it on every rank "
                "(each its own batches) or on none: the BatchNorm recomputation pools statistics "
                "over all ranks. Nothing was averaged.")
        return
    ranks = ", ".join(f"rank {r}: {s[0]} tensors, {s[1]} elements, digest {s[2] & 0xFFFFFFFF:08x}"
                      for r, s in enumerate(sigs))
    raise MismatchError(
        "swap_average: the ranks hold different models (names, shapes or dtypes of their "
        f"parameters and buffers differ): {ranks}. Every rank must pass the same architecture "
        "with the same dtypes; nothing was averaged.")


def _average_dtype(model: nn.Module) -> torch.dtype:
    """float32, or float64 when any tensor is float64: the model's own precision or wider."""
    wide = any(t.dtype == torch.float64 for t, _ in named_tensors(model).values())
    return torch.float64 if wide else torch.float32


@torch.no_grad()
def swap_average(
    model: nn.Module,
    *,
    group: Any = None,
    bn_data: Iterable[Any] | None = None,
    bn_batches: int | None = None,
    bn_forward_fn: Callable[[nn.Module, Any], Any] | None = None,
    bn_device: torch.device | str | None = None,
) -> Averager:
    """SWAP's last step: replace each worker's weights by their mean over the ranks, in place.

    Every rank of ``group`` calls it after its own small-batch phase (SWAP, Algorithm 1). It
    first checks that all ranks hold the same model (names, shapes and dtypes; one small
    collective), then averages parameters and floating buffers in float32 (float64 when the model
    has float64 tensors; never narrower than the model), writes the mean into every rank's model
    and, with ``bn_data``, recomputes BatchNorm statistics of the averaged weights pooled over all
    ranks' batches (:func:`weightavg.recompute_bn` with ``sync_ranks=True``), as Algorithm 1 does.
    Without ``bn_data`` a model with BatchNorm keeps the ranks' mean running statistics, which
    are not those of the averaged weights: a warning says so; call
    ``recompute_bn(model, data, sync_ranks=True)`` on every rank before evaluating.

    Args:
        model: this rank's model (every rank the same architecture).
        group: the process group (default: the world).
        bn_data: batches for the BatchNorm recomputation on this rank (each rank its own share).
        bn_batches: use at most this many batches of ``bn_data``.
        bn_forward_fn: ``bn_forward_fn(model, batch)`` runs the model on one batch.
        bn_device: move each BatchNorm batch there first.

    Returns:
        The averager holding the means (its ``copy_to`` has already been applied).

    Raises:
        StateError: torch.distributed is not initialised.
        MismatchError: the ranks hold different models (raised on every rank, before averaging).
        ConfigError: ``model`` is not an ``nn.Module``; ``bn_data`` given on some ranks only
            (raised on every rank, before averaging).

    Examples:
        A job of one process (gloo) shows the call; in a real job every rank runs the same lines.

        >>> import os, tempfile, torch
        >>> import torch.distributed as dist
        >>> from weightavg.lowp import swap_average
        >>> store = os.path.join(tempfile.mkdtemp(), "store")
        >>> dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
        >>> try:
        ...     model = torch.nn.Linear(2, 1)
        ...     avg = swap_average(model)
        ... finally:
        ...     dist.destroy_process_group()
        >>> avg.num_updates, torch.equal(model.weight, avg.averaged_tensors()["weight"])
        (1, True)
    """
    import torch.distributed as dist

    if not isinstance(model, nn.Module):
        raise bad_arg("model", type(model).__name__, "a torch.nn.Module")
    if not (dist.is_available() and dist.is_initialized()):
        raise StateError(
            "swap_average averages the weights of the workers of a torch.distributed job, and no "
            "process group is initialised: call torch.distributed.init_process_group(...) on every "
            "worker first (or, in one process, average models with weightavg.Averager).")
    _check_same_model(model, group, bn_data is not None and has_running_stats(model))
    avg = Averager(model, rule=mean(), dtype=_average_dtype(model))
    avg.update(model)
    avg.all_reduce(group)
    avg.copy_to(model)
    if has_running_stats(model):
        if bn_data is not None:
            recompute_bn(model, bn_data, num_batches=bn_batches, device=bn_device,
                         forward_fn=bn_forward_fn, sync_ranks=True, process_group=group)
            avg.load_from(model)
        else:
            warnings.warn(
                "swap_average: the model has BatchNorm and no bn_data was given, so its running "
                "statistics are the ranks' mean, not those of the averaged weights; pass "
                "bn_data=... or call weightavg.recompute_bn(model, data, sync_ranks=True) on every "
                "rank before evaluating", UserWarning, stacklevel=2)
    return avg
