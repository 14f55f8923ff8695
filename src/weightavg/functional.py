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

from ._engine import Averager, unwrap_model
from ._errors import bad_arg
from ._rules import ema

__all__ = ["compute_ema"]

# ema_model -> (model it follows, smoothing, averager holding ema_model's dtype)
_CACHE: weakref.WeakKeyDictionary[nn.Module, tuple[weakref.ref[nn.Module], float, Averager]] = (
    weakref.WeakKeyDictionary()
)


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
    if cached is None or cached[0]() is not source or cached[1] != smoothing:
        # the average lives in ema_model's own dtype: ema_model is the state, as in Composer
        avg = Averager(target, rule=rule, dtype=None)
        _CACHE[target] = (weakref.ref(source), float(smoothing), avg)
    else:
        avg = cached[2]
    avg.reset()
    avg.update(target)  # start from ema_model's current values (the user owns them)
    avg.update(source)
    avg.copy_to(target)
