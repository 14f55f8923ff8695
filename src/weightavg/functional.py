"""Functional forms, for loops that keep the averaged model themselves (Composer's ``compute_ema``).

The averaged copy is an ordinary module you own (``copy.deepcopy(model)``); each call folds the
model's current weights into it. Tensors are paired by name, integer buffers are copied, and the
arithmetic is the engine's. For a faster path that also counts optimizer steps, handles BatchNorm
and checkpoints, use :class:`weightavg.EMA`.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

from ._engine import Averager, named_tensors, unwrap_model
from ._errors import bad_arg
from ._rules import Rule, ema

__all__ = ["compute_ema"]

# ema_model -> (model it follows, smoothing, averager whose storage *is* ema_model's tensors, probe)
_CACHE: weakref.WeakKeyDictionary[
    nn.Module, tuple[weakref.ref[nn.Module], float, Averager, tuple[torch.Tensor, torch.Tensor]]
] = weakref.WeakKeyDictionary()


def _adopt(target: nn.Module, rule: Rule) -> tuple[Averager, tuple[torch.Tensor, torch.Tensor]]:
    """An averager seeded with ``target``'s values whose storage becomes ``target``'s tensors."""
    avg = Averager(target, rule=rule, dtype=None)  # the average keeps ema_model's own dtype
    avg.update(target)
    mine = named_tensors(target)
    for name, view in avg.averaged_tensors().items():
        mine[name][0].data = view  # same values; from now on one copy, updated in place
    name = avg.names[0]
    return avg, (mine[name][0], avg.averaged_tensors()[name])


@torch.no_grad()
def compute_ema(model: nn.Module, ema_model: nn.Module, smoothing: float = 0.99) -> None:
    """Update ``ema_model`` in place towards ``model``: one exponential-moving-average step.

    .. note::
        For every floating-point parameter and buffer, paired by name:
        ``ema ← smoothing · ema + (1 − smoothing) · θ``. Integer buffers (BatchNorm's
        ``num_batches_tracked``) are copied from ``model``.

    Args:
        model: the model being trained (wrappers such as DDP are looked through).
        ema_model: the averaged copy, same names and shapes (e.g. ``copy.deepcopy(model)``).
        smoothing: weight of the old average, in [0, 1).

    Raises:
        MismatchError: the two models' tensors do not pair by name and shape.

    Example:
        >>> import copy, torch
        >>> from weightavg.functional import compute_ema
        >>> model = torch.nn.Linear(2, 1)
        >>> ema_model = copy.deepcopy(model)
        >>> with torch.no_grad():
        ...     _ = model.bias.fill_(1.0); _ = ema_model.bias.fill_(0.0)
        >>> compute_ema(model, ema_model, smoothing=0.9)
        >>> round(ema_model.bias.item(), 4)
        0.1
    """
    if not isinstance(model, nn.Module):
        raise bad_arg("model", type(model).__name__, "a torch.nn.Module")
    if not isinstance(ema_model, nn.Module):
        raise bad_arg("ema_model", type(ema_model).__name__, "a torch.nn.Module")
    rule = ema(smoothing=smoothing)  # validates smoothing
    target = unwrap_model(ema_model)
    source = unwrap_model(model)
    cached = _CACHE.get(target)
    # ema_model is the state, as in Composer: the engine updates its tensors in place. A new
    # source or smoothing, or ema_model moved/cast (its tensors no longer alias the storage),
    # starts a new engine from ema_model's current values.
    if (cached is None or cached[0]() is not source or cached[1] != smoothing
            or cached[3][0].data_ptr() != cached[3][1].data_ptr()):
        avg, probe = _adopt(target, rule)
        _CACHE[target] = (weakref.ref(source), float(smoothing), avg, probe)
    else:
        avg = cached[2]
    avg.update(source)
    avg.sync_copies()  # integer buffers: ema_model's tensors are the copy storage
