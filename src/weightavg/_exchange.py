"""Putting an average into a live model and back, in place, with one bounded scratch.

Part of the engine (see :mod:`weightavg._engine`). A parameter whose average has its dtype and
device is *exchanged* with its average, a chunk at a time through one scratch buffer (three
``copy_`` calls per chunk: exact both ways, peak extra memory one chunk); while swapped, the
average's storage holds the training value and the model holds the average. Leaving exchanges
them again, so whatever the model holds then becomes the average again (unchanged, unless the block
wrote to the parameter: :meth:`weightavg.Averager.load_from` does so on purpose, anything else is
warned about). Every other tracked tensor (buffers, which evaluation code such as BatchNorm
recomputation may change; tensors whose average has another dtype or device) is backed up in the
model's own dtype and copied back on exit.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

__all__ = ["SWAP_CHUNK", "Swap"]

SWAP_CHUNK = 1 << 16  # elements of the exchange scratch (one per dtype and device)


class Swap:
    """One swapped-in state: model tensors and averages exchanged or backed up.

    Args:
        model: canonical name -> the model's tensor.
        stored: canonical name -> the average's view.
        exchange: names to exchange in place (the model's parameters with the average's dtype and device).
    """

    def __init__(self, model: dict[str, Tensor], stored: dict[str, Tensor], exchange: set[str]) -> None:
        self.model = model
        self.stored = stored
        self.exchanged = [n for n in model if n in exchange and _exchangeable(model[n], stored[n])]
        self.exchanged_set = set(self.exchanged)
        self.loaded: set[str] = set()  # names that load_from wrote on purpose
        self.backup: dict[str, Tensor] = {}
        self.versions: dict[str, int] = {}

    @torch.no_grad()
    def enter(self) -> None:
        ex = self.exchanged_set
        for n, t in self.model.items():
            if n not in ex:
                self.backup[n] = t.detach().clone()
        scratch: dict[tuple[torch.dtype, torch.device], Tensor] = {}
        done: list[str] = []
        try:
            for n in self.exchanged:
                _exchange(self.model[n], self.stored[n], scratch)
                done.append(n)
            for n, t in self.model.items():
                if n not in ex:
                    t.copy_(self.stored[n])
        except BaseException:
            for n in done:  # undo what was exchanged (nothing else was written)
                _exchange(self.model[n], self.stored[n], scratch)
            raise
        self.versions = {n: self.model[n]._version for n in self.exchanged}

    @torch.no_grad()
    def exit(self) -> None:
        scratch: dict[tuple[torch.dtype, torch.device], Tensor] = {}
        written = [n for n in self.exchanged
                   if self.model[n]._version != self.versions[n] and n not in self.loaded]
        for n in self.exchanged:
            _exchange(self.model[n], self.stored[n], scratch)
        for n, b in self.backup.items():
            self.model[n].copy_(b)
        if written:
            warnings.warn(
                f"swapped_in: the block wrote to {len(written)} parameter(s) ({', '.join(written[:5])}"
                f"{', ...' if len(written) > 5 else ''}); parameters are exchanged with their average in "
                "place, so the average now holds the written values (use load_from to do this on purpose)",
                RuntimeWarning, stacklevel=3)

    def reads(self, stored: dict[str, Tensor]) -> dict[str, Tensor]:
        """``stored`` (views of the swapped rule's averages) with each exchanged name holding a copy of
        where its average is now, the model's tensor (a copy: the model gets its training value back
        on exit, and a state dict taken inside the block may be saved after it)."""
        out = dict(stored)
        for n in self.exchanged:
            out[n] = self.model[n].detach().clone()
        return out


def _exchangeable(t: Tensor, avg: Tensor) -> bool:
    return t.dtype == avg.dtype and t.device == avg.device and t.shape == avg.shape and t.numel() > 0


def _exchange(a: Tensor, b: Tensor, scratch: dict[tuple[torch.dtype, torch.device], Tensor]) -> None:
    """Exchange the values of ``a`` and ``b`` (same dtype, device and shape), a chunk at a time."""
    key = (a.dtype, a.device)
    buf = scratch.get(key)
    if buf is None:
        buf = scratch[key] = torch.empty(SWAP_CHUNK, dtype=a.dtype, device=a.device)
    if a.dim() == 0 or (a.is_contiguous() and b.is_contiguous()):
        a, b = a.reshape(-1), b.reshape(-1)  # views
    row = a[0].numel()
    if row > SWAP_CHUNK:  # a non-contiguous tensor with long rows: row by row
        for i in range(a.shape[0]):
            _exchange(a[i], b[i], scratch)
        return
    rows = max(1, SWAP_CHUNK // row)
    for i in range(0, a.shape[0], rows):
        x, y = a[i : i + rows], b[i : i + rows]
        tmp = buf[: x.numel()].view(x.shape)
        tmp.copy_(x)
        x.copy_(y)
        y.copy_(tmp)
