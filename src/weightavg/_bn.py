"""Recompute normalisation statistics (BatchNorm & co.) for a given set of weights."""

from __future__ import annotations

import itertools
import math
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
    """True if the model has a normalisation layer that keeps running statistics.

    Returns:
        Whether :func:`recompute_bn` has anything to do for ``model`` (BatchNorm, SyncBatchNorm or
        InstanceNorm with ``track_running_stats``).

    Examples:
        >>> import torch, weightavg
        >>> weightavg.has_running_stats(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2)))
        True
        >>> weightavg.has_running_stats(torch.nn.Linear(2, 2))
        False
    """
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

    Cost: one train-mode forward per batch. Each layer runs with momentum 1, so after every call
    its own buffers hold that batch's mean and unbiased variance (computed by the layer's kernel);
    those channel-sized vectors are combined exactly in float64 (parallel-variance formula).
    Layers whose buffers are not float32/float64, and SyncBatchNorm while it synchronises ranks,
    are measured from their inputs in float64 instead (slower, equally exact).

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

    Raises:
        ConfigError: ``model`` is not an ``nn.Module``; ``num_batches`` is not a positive int;
            ``data`` yielded no batch (on every rank, with ``sync_ranks``): the statistics would
            silently stay those of other weights. The buffers are left as they were.

    Examples:
        >>> import torch, weightavg
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
        >>> data = [torch.randn(8, 3) for _ in range(3)]
        >>> weightavg.recompute_bn(model, data)  # samples seen
        24
        >>> h = torch.cat([model[0](x) for x in data]).detach()
        >>> torch.allclose(model[1].running_mean, h.mean(0), atol=1e-6)
        True
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
    saved = {m: (_clone(m.running_mean), _clone(m.running_var), _clone(m.num_batches_tracked)) for m in layers}
    stats: dict[Any, _Stats] = {m: _Stats(isinstance(m, _InstanceNorm), _measure_inputs(m)) for m in layers}
    hooks = []

    def restore() -> None:
        for m, (rm, rv, nb) in saved.items():
            for buf, old in ((m.running_mean, rm), (m.running_var, rv), (m.num_batches_tracked, nb)):
                if old is not None:
                    buf.copy_(old)

    n_samples = 0
    try:
        model.eval()
        for m in layers:
            m.train()
            if not stats[m].from_inputs:
                m.momentum = 1.0  # the buffers become this call's batch statistics
                for buf in (m.running_mean, m.running_var):
                    if not _uninitialized(buf):
                        buf.zero_()  # a NaN left there would survive 0 * NaN
            hooks.append(m.register_forward_hook(stats[m].hook))
        for batch in itertools.islice(data, num_batches):
            batch = _to(batch, dev)
            fwd(model, batch)
            n_samples += _batch_size(batch)
    except BaseException:
        restore()
        raise
    finally:
        for h in hooks:
            h.remove()
        for m, mode in modes.items():
            m.training = mode
        for m, mom in momenta.items():
            m.momentum = mom
    totals = {m: stats[m].combine() for m in layers}
    if sync_ranks:
        totals = _pool_across_ranks(layers, totals, process_group)
    if all(t[0] == 0 for t in totals.values()):
        restore()
        raise bad_arg("data", type(data).__name__,
                      "at least one batch: it yielded none (an empty loader, or a one-shot iterator "
                      "already consumed), so the statistics would stay those of other weights")
    for m in layers:
        n, mean, var = totals[m]
        if n == 0:  # this layer saw no input: keep what it had
            for buf, old in ((m.running_mean, saved[m][0]), (m.running_var, saved[m][1])):
                if old is not None:
                    buf.copy_(old)
            continue
        if m.running_mean is not None:
            m.running_mean.copy_(mean.to(m.running_mean.dtype))
        if m.running_var is not None:
            m.running_var.copy_(var.to(m.running_var.dtype))
    return n_samples


def _clone(t: Tensor | None) -> Tensor | None:
    return None if t is None or _uninitialized(t) else t.clone()


def _uninitialized(t: Any) -> bool:
    from torch.nn.parameter import UninitializedTensorMixin  # type: ignore[attr-defined]

    return isinstance(t, UninitializedTensorMixin)


def _measure_inputs(m: Any) -> bool:
    """Whether ``m``'s statistics must be taken from its inputs (its buffers cannot hold them)."""
    if m.running_mean is None or m.running_var is None:
        return True  # torch refuses to run such a layer: its own error comes from the forward
    buf = m.running_mean  # both buffers have one dtype
    if not _uninitialized(buf) and buf.dtype not in (torch.float32, torch.float64):
        return True  # a low-precision buffer would round every batch's statistics
    if isinstance(m, nn.SyncBatchNorm):
        import torch.distributed as dist

        return dist.is_available() and dist.is_initialized()  # its buffers would hold all ranks' stats
    return False


class _Stats:
    """Per-call statistics of one layer: (count, mean, unbiased variance) vectors, float64.

    BatchNorm: the count is the number of values per channel, and the calls combine into the
    statistics of their union. InstanceNorm: the count is the number of instances, and the
    running statistics are the instance-weighted averages of per-instance mean and variance.
    """

    def __init__(self, instance: bool, from_inputs: bool) -> None:
        self.instance = instance
        self.from_inputs = from_inputs
        self.counts: list[int] = []
        self.moments: list[Tensor] = []  # (2, C) per call: mean, unbiased var

    def hook(self, m: Any, inputs: tuple[Tensor, ...], _out: Any) -> None:
        x = inputs[0]
        if self.instance:
            n = int(x.shape[0]) if x.dim() != m._get_no_batch_dim() else 1
        else:
            n = x.shape[0] * math.prod(x.shape[2:])  # values per channel (BatchNorm inputs are (N, C, ...))
        if self.from_inputs:
            self.moments.append(_input_moments(x.detach(), m, self.instance))
        else:
            self.moments.append(torch.stack((m.running_mean, m.running_var)).to(torch.float64))
        self.counts.append(n)

    def combine(self) -> tuple[int, Tensor, Tensor]:
        """(total count, mean, variance) over every call; (0, empty, empty) if none."""
        total = sum(self.counts)
        if not self.moments:
            empty = torch.zeros(0, dtype=torch.float64)
            return 0, empty, empty
        mo = torch.stack(self.moments)  # (B, 2, C)
        n = torch.tensor(self.counts, dtype=torch.float64, device=mo.device).unsqueeze(1)
        mean = (n * mo[:, 0]).sum(0) / total
        if self.instance:
            return total, mean, (n * mo[:, 1]).sum(0) / total
        return total, mean, _pooled_var(n, mo[:, 0], mo[:, 1], mean, total)


def _pooled_var(n: Tensor, means: Tensor, variances: Tensor, mean: Tensor, total: int) -> Tensor:
    """Unbiased variance of the union of groups (``n`` (B, 1) counts, (B, C) means/variances)."""
    # a group of one value (a rank's single sample under SyncBatchNorm) or none (a rank without
    # data) comes with variance 0, so (n - 1) * variance needs no clamp
    m2 = ((n - 1) * variances).sum(0) + (n * (means - mean) ** 2).sum(0)
    return m2 / max(total - 1, 1)  # one value in all: variance 0


def _input_moments(x: Tensor, m: Any, instance: bool) -> Tensor:
    """(2, C) mean and unbiased variance of a layer input, in float64 (the measured path)."""
    x = x.double()
    if instance:
        if x.dim() == m._get_no_batch_dim():
            x = x.unsqueeze(0)
        flat = x.flatten(2)
        return torch.stack((flat.mean(dim=2).mean(dim=0), flat.var(dim=2, unbiased=True).mean(dim=0)))
    flat = x.transpose(0, 1).reshape(x.shape[1], -1)  # BatchNorm inputs are (N, C, ...)
    var = flat.var(dim=1, unbiased=True) if flat.shape[1] > 1 else torch.zeros_like(flat[:, 0])
    return torch.stack((flat.mean(dim=1), var))


def _pool_across_ranks(layers: list[Any], totals: dict[Any, tuple[int, Tensor, Tensor]],
                       group: Any) -> dict[Any, tuple[int, Tensor, Tensor]]:
    """Every rank's (count, mean, variance) per layer, gathered in one collective and combined."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) < 2:
        return totals
    parts = []
    for m in layers:
        ref = m.running_mean  # a layer with one buffer cannot have run (torch refuses it)
        c = ref.numel()
        n, mean, var = totals[m]
        if n == 0:
            mean = var = torch.zeros(c, dtype=torch.float64, device=ref.device)
        parts += [torch.tensor([float(n)], dtype=torch.float64, device=ref.device), mean, var]
    flat = torch.cat([p.reshape(-1) for p in parts])
    gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, flat, group=group)
    rows = torch.stack(gathered)  # (world, sum over layers of 1 + 2C)
    out = {}
    off = 0
    for m in layers:
        c = m.running_mean.numel()
        counts = rows[:, off : off + 1]
        means, variances = rows[:, off + 1 : off + 1 + c], rows[:, off + 1 + c : off + 1 + 2 * c]
        off += 1 + 2 * c
        # a layer no rank reached gets NaN statistics here with count 0, and keeps its buffers
        total = round(float(counts.sum()))
        mean = (counts * means).sum(0) / total
        if isinstance(m, _InstanceNorm):
            var = (counts * variances).sum(0) / total
        else:
            var = _pooled_var(counts, means, variances, mean, total)
        out[m] = (total, mean, var)
    return out
