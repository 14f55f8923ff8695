"""Bayesian model averaging over posterior draws, streamed one draw at a time."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from .. import metrics
from .._bn import has_running_stats, recompute_bn
from .._errors import StateError, bad_arg


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model.eval()`` for the block; every module's own train/eval mode restored on exit."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield model
    finally:
        for m, mode in modes.items():
            m.training = mode

__all__ = ["Posterior", "bma_predict", "predict_probs", "select_scale"]

ForwardFn = Callable[[nn.Module, Any], Tensor]


class Posterior(Protocol):
    """What :func:`bma_predict` needs: write draws into a model one after the other.

    :class:`SWAG`, :class:`MultiSWAG`, :class:`MultiSWA` and :class:`SubspaceInference` are
    posteriors; so is any object with a compatible ``draws`` method.

    Examples:
        >>> import contextlib, torch
        >>> from weightavg.swag import bma_predict
        >>> class TwoWeights:  # a posterior of two fixed weight values
        ...     def draws(self, model, num_samples=None, **kwargs):
        ...         saved = model.weight.detach().clone()
        ...         try:
        ...             for i, w in enumerate((1.0, -1.0)):
        ...                 with torch.no_grad():
        ...                     _ = model.weight.fill_(w)
        ...                 yield i
        ...         finally:
        ...             with torch.no_grad():
        ...                 _ = model.weight.copy_(saved)
        >>> net = torch.nn.Linear(1, 2, bias=False)
        >>> [net.weight.sum().item() for _ in TwoWeights().draws(net)]  # what bma_predict iterates
        [2.0, -2.0]
        >>> bma_predict(TwoWeights(), net, [torch.ones(1, 1)])  # both draws' softmax averaged
        tensor([[0.5000, 0.5000]], dtype=torch.float64)
    """

    def draws(self, model: nn.Module, num_samples: int | None = None, **kwargs: Any) -> Iterator[int]:
        """Yield once per draw, with the draw written into ``model``; restore it when closed.

        Returns:
            An iterator over the draw indices.
        """
        ...


def _move(batch: Any, device: torch.device | None) -> Any:
    if device is None:
        return batch
    if isinstance(batch, Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: _move(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_move(v, device) for v in batch)
    return batch


def _forward(model: nn.Module, batch: Any) -> Tensor:
    if isinstance(batch, Tensor):
        out = model(batch)
    elif isinstance(batch, Mapping):
        out = model(**batch)
    elif isinstance(batch, (list, tuple)) and batch:
        out = model(batch[0])
    else:
        raise bad_arg("data", type(batch).__name__,
                      "batches that are a Tensor, a tuple/list (inputs first) or a dict of model "
                      "kwargs; or pass forward_fn(model, batch) -> logits")
    if not isinstance(out, Tensor):
        raise bad_arg("forward_fn", type(out).__name__, "a forward that returns a logits Tensor")
    return out


@torch.no_grad()
def predict_probs(
    model: nn.Module,
    data: Iterable[Any],
    *,
    device: torch.device | str | None = None,
    forward_fn: ForwardFn | None = None,
) -> Tensor:
    """Softmax probabilities (N, C) of the model on every batch of ``data``, in float64.

    The model is put in eval mode for the pass and the mode of every module restored afterwards.

    Returns:
        An (N, C) float64 tensor on the CPU, batches concatenated in order.

    Raises:
        ConfigError: ``data`` yielded no batch.

    Examples:
        >>> import torch
        >>> from weightavg.swag import predict_probs
        >>> net = torch.nn.Linear(3, 4)
        >>> p = predict_probs(net, [torch.randn(5, 3), (torch.randn(2, 3), torch.zeros(2))])
        >>> p.shape, p.dtype, bool(torch.allclose(p.sum(1), torch.ones(7, dtype=torch.float64)))
        (torch.Size([7, 4]), torch.float64, True)
    """
    dev = torch.device(device) if device is not None else None
    fwd = forward_fn or _forward
    with eval_mode(model):
        parts = [torch.softmax(fwd(model, _move(b, dev)).double(), dim=-1).cpu() for b in data]
    if not parts:
        raise bad_arg("data", "an empty iterable", "at least one batch")
    return torch.cat(parts)


@torch.no_grad()
def bma_predict(
    posterior: Posterior,
    model: nn.Module,
    data: Iterable[Any],
    *,
    num_samples: int | None = None,
    bn_data: Iterable[Any] | None = None,
    bn_batches: int | None = None,
    device: torch.device | str | None = None,
    forward_fn: ForwardFn | None = None,
    **draw_kwargs: Any,
) -> Tensor:
    """Bayesian model average: mean over posterior draws of the predicted *probabilities*.

    Streaming: one draw at a time is written into ``model`` (in place), its BatchNorm statistics
    are recomputed from ``bn_data``, and its probabilities are added to a running (N, C) sum, so
    memory beyond the posterior is O(P) (one backup of the weights) plus the output. The model's
    weights, buffers and train/eval mode are restored afterwards, also on error.

    .. note::
        ``p(y | x) ≈ (1/S) Σ_s softmax(f(x; θ_s))`` with ``θ_s`` the draws (for a mixture such as
        :class:`MultiSWAG`, every member gives the same number of draws: equal weights).

    Args:
        posterior: a :class:`SWAG`, :class:`MultiSWAG`, :class:`MultiSWA`,
            :class:`SubspaceInference` or anything with a compatible ``draws`` method.
        model: the module the draws are written into (same architecture as the posterior's).
        data: batches to predict on; iterated once per draw, so it must yield the same examples in
            the same order every time (e.g. a DataLoader without shuffling, or a list).
        num_samples: draws to average (per member for mixtures; default: the posterior's own, 30
            for SWAG, one per member for MultiSWA, every stored sample for subspace ESS).
        bn_data: training batches to recompute BatchNorm statistics from for each draw; required
            when the model has BatchNorm (or similar) layers, because the draws' statistics differ
            from the stored ones.
        bn_batches: read at most this many batches of ``bn_data`` per draw (default: all).
        device: move each batch there first.
        forward_fn: ``forward_fn(model, batch) -> logits`` (default: ``model(batch[0])`` for a
            tuple/list batch, ``model(batch)`` for a tensor, ``model(**batch)`` for a dict).
        **draw_kwargs: passed to ``posterior.draws``, e.g. ``scale=0.5``, ``diag_only=True``,
            ``generator=torch.Generator().manual_seed(0)``.

    Returns:
        (N, C) float64 probabilities on the CPU.

    Raises:
        ConfigError: ``model`` not an ``nn.Module``; ``num_samples < 1``; a model with BatchNorm
            and no ``bn_data``; a posterior without ``draws``; ``data`` yielding a different
            number of rows on a later pass.
        StateError: the posterior gave no draw.

    Examples:
        >>> import torch, weightavg
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 3))
        >>> swag = weightavg.SWAG(net, max_rank=3)
        >>> for _ in range(3):
        ...     with torch.no_grad():
        ...         for p in net.parameters():
        ...             _ = p.add_(0.01 * torch.randn_like(p))
        ...     swag.collect(net)
        >>> train = [torch.randn(16, 2) for _ in range(2)]
        >>> probs = weightavg.bma_predict(swag, net, [torch.randn(5, 2)], num_samples=4, bn_data=train,
        ...                               scale=0.5, generator=torch.Generator().manual_seed(0))
        >>> probs.shape
        torch.Size([5, 3])
    """
    if not isinstance(model, nn.Module):
        raise bad_arg("model", type(model).__name__, "a torch.nn.Module")
    if num_samples is not None and (isinstance(num_samples, bool) or not isinstance(num_samples, int)
                                    or num_samples < 1):
        raise bad_arg("num_samples", num_samples, "a positive int (draws to average) or None")
    needs_bn = has_running_stats(model)
    if needs_bn and bn_data is None:
        raise bad_arg("bn_data", None, "training batches to recompute BatchNorm statistics for "
                      "each draw (the model has BatchNorm layers, whose stored statistics belong "
                      "to other weights)")
    if not hasattr(posterior, "draws"):
        raise bad_arg("posterior", type(posterior).__name__,
                      "a SWAG, MultiSWAG, MultiSWA or SubspaceInference posterior")
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    live = dict(model.named_buffers())
    modes = {m: m.training for m in model.modules()}
    total: Tensor | None = None
    count = 0
    try:
        with contextlib.closing(posterior.draws(model, num_samples, **draw_kwargs)) as it:  # type: ignore[type-var]
            for _ in it:
                if needs_bn and bn_data is not None:
                    recompute_bn(model, bn_data, num_batches=bn_batches, device=device,
                                 forward_fn=forward_fn)
                probs = predict_probs(model, data, device=device, forward_fn=forward_fn)
                if total is None:
                    total = probs
                elif probs.shape != total.shape:
                    raise bad_arg("data", f"{tuple(probs.shape[:1])} rows on draw {count + 1}",
                                  f"the same {total.shape[0]} examples on every pass")
                else:
                    total.add_(probs)
                count += 1
    finally:
        for n, b in buffers.items():
            live[n].copy_(b)
        for m, mode in modes.items():
            m.training = mode
    if total is None:
        raise StateError("the posterior produced no draw to average")
    return total.div_(count)


def select_scale(
    posterior: Posterior,
    model: nn.Module,
    data: Iterable[Any],
    labels: Tensor,
    *,
    scales: Sequence[float] = (0.05, 0.1, 0.2, 0.3, 0.5, 1.0),
    metric: str = "nll",
    num_samples: int | None = None,
    generator: torch.Generator | None = None,
    **bma_kwargs: Any,
) -> tuple[float, dict[float, float]]:
    """Choose the posterior's ``scale`` on held-out data (lowest validation NLL by default).

    Every scale is evaluated with the same random numbers (the generator is rewound before each),
    so the comparison is not blurred by sampling noise. Use a validation split carved from the
    training set, never the test set.

    Args:
        posterior, model, data, num_samples: as in :func:`bma_predict` (``data``: validation
            batches; ``labels``: their (N,) integer labels, in the same order).
        scales: candidate variance multipliers.
        metric: ``"nll"``, ``"brier"`` or ``"ece"`` (lower is better).
        generator: random source (default: a fresh one seeded from the global RNG).
        **bma_kwargs: more arguments for :func:`bma_predict` (``bn_data``, ``diag_only``, ...).

    Returns:
        ``(best_scale, {scale: metric value})``.

    Raises:
        ConfigError: an unknown ``metric``, empty ``scales``, or what :func:`bma_predict` raises
            for the other arguments.

    Examples:
        >>> import torch, weightavg
        >>> from weightavg.swag import select_scale
        >>> net = torch.nn.Linear(2, 2)
        >>> swag = weightavg.SWAG(net, max_rank=2)
        >>> for _ in range(3):
        ...     with torch.no_grad():
        ...         _ = net.weight.add_(0.1 * torch.randn(2, 2))
        ...     swag.collect(net)
        >>> x, y = torch.randn(20, 2), torch.randint(0, 2, (20,))
        >>> best, table = select_scale(swag, net, [x], y, scales=[0.0, 0.5], num_samples=3,
        ...                            generator=torch.Generator().manual_seed(0))
        >>> best in table, sorted(table)
        (True, [0.0, 0.5])
    """
    fns: dict[str, Callable[[Tensor, Tensor], float]] = {
        "nll": metrics.nll, "brier": metrics.brier, "ece": metrics.ece}
    if metric not in fns:
        raise bad_arg("metric", metric, f"one of {sorted(fns)}")
    if isinstance(scales, (str, bytes)) or not isinstance(scales, Sequence) or not scales:
        raise bad_arg("scales", scales, "a non-empty sequence of floats >= 0")
    if generator is None:
        generator = torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,))))
    start = generator.get_state()
    results: dict[float, float] = {}
    for s in scales:
        generator.set_state(start)
        probs = bma_predict(posterior, model, data, num_samples=num_samples, scale=s,
                            generator=generator, **bma_kwargs)
        results[float(s)] = fns[metric](probs, labels)
    best = min(results, key=lambda k: (results[k] if math.isfinite(results[k]) else math.inf))
    return best, results
