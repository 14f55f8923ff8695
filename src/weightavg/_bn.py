"""Recompute normalisation statistics (BatchNorm & co.) for a given set of weights."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

from ._errors import bad_arg

__all__ = ["has_running_stats", "recompute_bn"]


def _stat_layers(model: nn.Module) -> list[Any]:
    """Normalisation layers with running statistics (typed Any: their buffers may be None)."""
    out: list[Any] = []
    for m in model.modules():
        has_stats = getattr(m, "running_mean", None) is not None or getattr(m, "running_var", None) is not None
        if isinstance(m, (_BatchNorm, _InstanceNorm)) and m.track_running_stats and has_stats:
            out.append(m)
    return out


def has_running_stats(model: nn.Module) -> bool:
    """True if the model has a normalisation layer that keeps running statistics."""
    return bool(_stat_layers(model))


def _to(batch: Any, device: torch.device | None) -> Any:
    if device is None:
        return batch
    if isinstance(batch, Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return type(batch)({k: _to(v, device) for k, v in batch.items()})  # type: ignore[call-arg]
    if isinstance(batch, (list, tuple)):
        moved = [_to(v, device) for v in batch]
        return type(batch)(*moved) if hasattr(batch, "_fields") else type(batch)(moved)
    return batch


def _batch_size(batch: Any) -> int:
    if isinstance(batch, Tensor):
        return int(batch.shape[0]) if batch.dim() else 1
    if isinstance(batch, Mapping):
        for v in batch.values():
            if isinstance(v, Tensor) and v.dim():
                return int(v.shape[0])
    if isinstance(batch, (list, tuple)):
        for v in batch:
            n = _batch_size(v)
            if n:
                return n
    return 0


def _default_forward(model: nn.Module, batch: Any) -> Any:
    if isinstance(batch, Tensor):
        return model(batch)
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (list, tuple)) and batch:
        return model(batch[0])
    raise bad_arg("data", type(batch).__name__,
                  "batches that are a Tensor, a tuple/list (inputs first) or a dict of model kwargs; "
                  "or pass forward_fn(model, batch)")


@torch.no_grad()
def recompute_bn(
    model: nn.Module,
    data: Iterable[Any],
    *,
    num_batches: int | None = None,
    device: torch.device | str | None = None,
    forward_fn: Callable[[nn.Module, Any], Any] | None = None,
    sync_ranks: bool = False,
    process_group: Any = None,
) -> int:
    """Recompute the running statistics of every normalisation layer from ``data``.

    Statistics are the sample-weighted mean and (unbiased) variance over all batches seen, as if
    they came in one big batch per layer input; BatchNorm, SyncBatchNorm and InstanceNorm with
    ``track_running_stats`` are covered. Only those layers are put in train mode, so dropout and
    friends stay as they were; every module's mode and momentum is restored afterwards. A model
    without such layers returns at once without reading ``data``.

    Args:
        model: the model, holding the weights the statistics are for (e.g. inside
            ``Averager.swapped_in``).
        data: an iterable of batches: tensors, tuples/lists (inputs first), dicts of keyword
            arguments, or anything ``forward_fn`` understands.
        num_batches: stop after this many batches (default: all).
        device: move each batch there first.
        forward_fn: ``forward_fn(model, batch)`` runs the model on one batch.
        sync_ranks: pool the statistics over the ranks of ``process_group`` (torch.distributed),
            so every rank ends with the statistics of all ranks' batches together (one collective;
            every rank must call). Ignored when torch.distributed is not initialised.
        process_group: the group for ``sync_ranks`` (default: the world).

    Returns:
        The number of samples the statistics were computed from, on this rank (0 if the model has
        no such layer).
    """
    if not isinstance(model, nn.Module):
        raise bad_arg("model", type(model).__name__, "a torch.nn.Module")
    if num_batches is not None and (isinstance(num_batches, bool) or not isinstance(num_batches, int)
                                    or num_batches <= 0):
        raise bad_arg("num_batches", num_batches, "a positive int or None")
    layers = _stat_layers(model)
    if not layers:
        return 0
    dev = torch.device(device) if device is not None else None
    fwd = forward_fn or _default_forward
    modes = {m: m.training for m in model.modules()}
    momenta = {m: m.momentum for m in layers}
    saved = {m: (m.running_mean.clone() if m.running_mean is not None else None,
                 m.running_var.clone() if m.running_var is not None else None,
                 m.num_batches_tracked.clone() if m.num_batches_tracked is not None else None)
             for m in layers}
    # sample-weighted running sums: mean_k = Σ n_b μ_b / Σ n_b; var from E[x²] with Bessel per batch
    sums: dict[nn.Module, list[Any]] = {m: [None, None, 0] for m in layers}
    hooks = []

    def hook(m: nn.Module, inputs: tuple[Tensor, ...], _out: Any) -> None:
        x = inputs[0].detach().double()
        acc = sums[m]
        if isinstance(m, _InstanceNorm):
            # running stats of InstanceNorm: average over instances of per-instance mean/var
            if x.dim() == m._get_no_batch_dim():
                x = x.unsqueeze(0)
            flat = x.flatten(2)
            n = flat.shape[0]
            mu = flat.mean(dim=2).sum(dim=0) / n
            sq = flat.var(dim=2, unbiased=True).sum(dim=0) / n  # stands in for E[x²]; see below
            acc.append("instance")
        else:
            dims = [0, *range(2, x.dim())]
            n = x.numel() // x.shape[1] if x.dim() > 1 else x.shape[0]
            mu = x.mean(dim=dims)
            sq = (x * x).mean(dim=dims)
        acc[0] = mu * n if acc[0] is None else acc[0] + mu * n
        acc[1] = sq * n if acc[1] is None else acc[1] + sq * n
        acc[2] += n

    n_samples = 0
    try:
        model.eval()
        for m in layers:
            m.train()
            hooks.append(m.register_forward_hook(hook))
        for batch in itertools.islice(data, num_batches):
            batch = _to(batch, dev)
            fwd(model, batch)
            n_samples += _batch_size(batch)
    except BaseException:
        for m, (rm, rv, nb) in saved.items():
            if rm is not None:
                m.running_mean.copy_(rm)
            if rv is not None:
                m.running_var.copy_(rv)
            if nb is not None:
                m.num_batches_tracked.copy_(nb)
        raise
    finally:
        for h in hooks:
            h.remove()
        for m, mode in modes.items():
            m.training = mode
        for m, mom in momenta.items():
            m.momentum = mom
    if sync_ranks:
        _pool_across_ranks(layers, sums, process_group)
    for m in layers:
        s_mu, s_sq, n = sums[m][:3]
        if n == 0:
            continue
        mean = s_mu / n
        if len(sums[m]) > 3:  # InstanceNorm: s_sq already holds Σ n·(mean per-instance variance)
            var = s_sq / n
        else:
            var = (s_sq / n - mean * mean).clamp_min_(0.0)
            if n > 1:
                var = var * (n / (n - 1))
        if m.running_mean is not None:
            m.running_mean.copy_(mean.to(m.running_mean.dtype))
        if m.running_var is not None:
            m.running_var.copy_(var.to(m.running_var.dtype))
    return n_samples


def _pool_across_ranks(layers: list[Any], sums: dict[Any, list[Any]], group: Any) -> None:
    """Sum every layer's (Σ n·μ, Σ n·E[x²], n) over the ranks, in one all_reduce."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) < 2:
        return
    parts = []
    for m in layers:
        c = (m.running_mean if m.running_mean is not None else m.running_var).numel()
        s_mu, s_sq, n = sums[m][:3]
        zeros = torch.zeros(c, dtype=torch.float64, device=(m.running_mean if m.running_mean is not None
                                                            else m.running_var).device)
        parts += [s_mu if s_mu is not None else zeros, s_sq if s_sq is not None else zeros,
                  torch.tensor([float(n)], dtype=torch.float64, device=zeros.device)]
    flat = torch.cat([p.reshape(-1) for p in parts])
    dist.all_reduce(flat, group=group)
    off = 0
    for m in layers:
        c = (m.running_mean if m.running_mean is not None else m.running_var).numel()
        sums[m][0] = flat[off : off + c]
        sums[m][1] = flat[off + c : off + 2 * c]
        sums[m][2] = round(float(flat[off + 2 * c]))
        off += 2 * c + 1
