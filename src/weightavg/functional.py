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
from ._errors import MismatchError, bad_arg, describe_mismatch
from ._rules import ema

__all__ = ["compute_ema"]

class _Follower:
    """The engine behind one ``ema_model``: its storage *is* ema_model's tensors.

    The smoothing is read at every update from ``smoothing`` (a schedule changes no storage), and
    a new source model with the same names, dtypes and devices is only a new binding.
    """

    def __init__(self, source: nn.Module, target: nn.Module, smoothing: float) -> None:
        self.smoothing = smoothing
        mine = named_tensors(target)
        theirs = named_tensors(source)
        reshaped = [(n, tuple(t.shape), tuple(theirs[n][0].shape)) for n, (t, _) in mine.items()
                    if n in theirs and t.shape != theirs[n][0].shape]
        if set(mine) != set(theirs) or reshaped:
            raise MismatchError("ema_model and model do not pair by name and shape: " + describe_mismatch(
                sorted(set(theirs) - set(mine)), sorted(set(mine) - set(theirs)), reshaped,
                left="model", right="ema_model"))
        floats = {t.dtype for t, _ in mine.values() if t.is_floating_point()}
        if len(floats) == 1:
            dtype: torch.dtype | None = floats.pop()  # e.g. a float32 EMA of a bf16 model
        elif all(t.dtype == theirs[n][0].dtype for n, (t, _) in mine.items() if n in theirs):
            dtype = None
        else:
            raise bad_arg("ema_model", "mixed floating dtypes",
                          "one floating dtype for all of its tensors, or each the dtype of model's")
        self.averager = Averager(source, rule=ema(decay=self._decay), dtype=dtype)
        self.averager.update(source)  # the first update copies: storage laid out and filled
        views = self.averager.averaged_tensors()
        with torch.no_grad():
            for name, view in views.items():
                mine[name][0].data = view.copy_(mine[name][0].detach())  # ema_model's own values
        name = self.averager.names[0]
        self.probe = (mine[name][0], views[name])

    def _decay(self, step: int) -> float:
        return self.smoothing

    def aliased(self) -> bool:
        """ema_model's tensors are still the storage (not moved or cast since)."""
        return self.probe[0].data_ptr() == self.probe[1].data_ptr()


# ema_model -> its follower
_CACHE: weakref.WeakKeyDictionary[nn.Module, _Follower] = weakref.WeakKeyDictionary()


@torch.no_grad()
def compute_ema(model: nn.Module, ema_model: nn.Module, smoothing: float = 0.99) -> None:
    """Update ``ema_model`` in place towards ``model``: one exponential-moving-average step.

    .. note::
        For every floating-point parameter and buffer, paired by name:
        ``ema ← smoothing · ema + (1 − smoothing) · θ``. Integer buffers (BatchNorm's
        ``num_batches_tracked``) are copied from ``model``.

    ``ema_model`` may keep a higher precision than ``model`` (a float32 EMA of a bf16 model:
    ``copy.deepcopy(model).float()``). The first call moves ``ema_model``'s tensors into the
    engine's storage (same Parameter objects, same values); from then on they stay where they are,
    whatever the smoothing (a schedule costs nothing extra) or the source model of each call, so
    anything holding them sees every update. Only moving or casting ``ema_model`` yourself, or a
    source of other dtypes or devices, starts over from ``ema_model``'s current values.

    Args:
        model: the model being trained (wrappers such as DDP are looked through).
        ema_model: the averaged copy, same names and shapes (e.g. ``copy.deepcopy(model)``).
        smoothing: weight of the old average, in [0, 1]; ``1`` leaves ``ema_model`` frozen.

    Raises:
        ConfigError: ``smoothing`` outside [0, 1].
        MismatchError: the two models' tensors do not pair by name and shape.

    Examples:
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
    if isinstance(smoothing, bool) or not isinstance(smoothing, (int, float)) or not 0.0 <= smoothing <= 1.0:
        raise bad_arg("smoothing", smoothing, "a number in [0, 1] (1: frozen)")
    target = unwrap_model(ema_model)
    source = unwrap_model(model)
    follower = _CACHE.get(target)
    if follower is None or not follower.aliased():
        follower = _CACHE[target] = _Follower(source, target, 0.5)
    if smoothing == 1.0:
        return  # frozen: nothing changes
    follower.smoothing = float(smoothing)
    try:
        follower.averager.update(source)
    except MismatchError:
        # a source of other dtypes/devices: start over from ema_model's current values
        follower = _CACHE[target] = _Follower(source, target, float(smoothing))
        follower.averager.update(source)
    follower.averager.sync_copies()  # integer buffers: ema_model's tensors are the copy storage
