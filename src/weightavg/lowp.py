"""Low-precision training with a full-precision average (SWALP) and parallel averaging (SWAP).

SWALP (Yang et al., ICML 2019): train with weights, gradients and optimizer state quantized to a
few bits (block floating point, stochastic rounding) and keep the SWA average in float32. The
average of many rounded-up and rounded-down iterates filters the quantization noise, which is why
an 8-bit SWALP run can match float SGD. The engine already keeps a float32 average whatever the
model's precision; this module adds the quantizer and the hooks that make a run low precision.

SWAP (Gupta et al., ICLR 2020): after a large-batch phase (e.g. DDP), each worker trains on its own
with small batches; their weights are then averaged across workers (``swap_average``) and BatchNorm
statistics recomputed.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ._engine import Averager
from ._errors import bad_arg
from ._rules import mean

__all__ = ["LowPrecision", "quantize", "swap_average"]

Rounding = Literal["stochastic", "nearest"]


@torch.no_grad()
def quantize(
    x: Tensor,
    bits: int = 8,
    *,
    block: Literal["tensor", "row"] = "tensor",
    rounding: Rounding = "stochastic",
    generator: torch.Generator | None = None,
) -> Tensor:
    """Block floating-point quantization: ``bits``-bit integers sharing one exponent per block.

    .. note::
        For a block with largest magnitude ``m`` the shared exponent is ``e = ⌊log2 m⌋`` and the
        grid step is ``δ = 2^(e − bits + 2)``, so values are ``δ·k`` with integer
        ``k ∈ [−2^(bits−1), 2^(bits−1) − 1]``. Stochastic rounding rounds up with probability equal
        to the remainder, so ``E[quantize(x)] = x`` inside the range (SWALP's unbiasedness).
        The top of the range, ``(2^(bits−1) − 1)·δ``, lies a little below ``2^(e+1)``: values of
        the block within one step of that are clamped, as in SWALP's formulation.

    Args:
        x: the tensor (any floating dtype; the result has the same dtype and shape).
        bits: word length, 2..24.
        block: one exponent for the whole ``tensor`` or one per ``row`` (first dimension).
        rounding: ``"stochastic"`` (unbiased) or ``"nearest"``.
        generator: random source for stochastic rounding (the global RNG is not touched if given).
    """
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 24:
        raise bad_arg("bits", bits, "an int in [2, 24]")
    if block not in ("tensor", "row"):
        raise bad_arg("block", block, "'tensor' or 'row'")
    if rounding not in ("stochastic", "nearest"):
        raise bad_arg("rounding", rounding, "'stochastic' or 'nearest'")
    if not x.is_floating_point():
        raise bad_arg("x", x.dtype, "a floating-point tensor")
    xf = x.float()
    if block == "row" and xf.dim() > 1:
        m = xf.abs().flatten(1).amax(1).view(-1, *([1] * (xf.dim() - 1)))
    else:
        m = xf.abs().amax()
    exp = torch.floor(torch.log2(m.clamp_min(torch.finfo(torch.float32).tiny)))
    step = torch.exp2(exp - (bits - 2))
    scaled = xf / step
    if rounding == "stochastic":
        noise = torch.rand(scaled.shape, generator=generator, device=scaled.device)
        k = torch.floor(scaled + noise)
    else:
        k = torch.round(scaled)
    k.clamp_(-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    return (k * step).to(x.dtype)


class LowPrecision:
    """Make an optimizer's run low precision: quantize weights (and gradients, state) each step.

    Hooks on the optimizer: gradients are quantized before ``step()`` and the weights and the
    optimizer's floating state (e.g. momentum) after it. Pair it with an :class:`Averager`
    (float32 by default) for SWALP. Call :meth:`remove` to stop.

    Args:
        optimizer: the optimizer whose parameters are quantized.
        bits: word length for weights, gradients and state (8 in SWALP).
        quantize_grads: also quantize gradients.
        quantize_state: also quantize the optimizer's floating-point state tensors.
        generator: random source for stochastic rounding.

    Example:
        >>> import torch, weightavg
        >>> from weightavg.lowp import LowPrecision
        >>> model = torch.nn.Linear(4, 2)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        >>> lp = LowPrecision(opt, bits=8)
        >>> swa = weightavg.Averager(model)          # float32 average of 8-bit iterates
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        bits: int = 8,
        quantize_grads: bool = True,
        quantize_state: bool = True,
        generator: torch.Generator | None = None,
    ) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise bad_arg("optimizer", type(optimizer).__name__, "a torch.optim.Optimizer")
        quantize(torch.zeros(1), bits)  # validates bits
        self.optimizer = optimizer
        self.bits = bits
        self.quantize_grads = quantize_grads
        self.quantize_state = quantize_state
        self.generator = generator
        self._handles = [
            optimizer.register_step_pre_hook(self._pre),
            optimizer.register_step_post_hook(self._post),
        ]
        self._post(optimizer, (), {})  # start from quantized weights

    def _params(self) -> Iterable[nn.Parameter]:
        for group in self.optimizer.param_groups:
            yield from group["params"]

    @torch.no_grad()
    def _pre(self, _opt: Any, _args: Any, _kwargs: Any) -> None:
        if self.quantize_grads:
            for p in self._params():
                if p.grad is not None:
                    p.grad.copy_(quantize(p.grad, self.bits, generator=self.generator))

    @torch.no_grad()
    def _post(self, _opt: Any, _args: Any, _kwargs: Any) -> None:
        for p in self._params():
            p.copy_(quantize(p, self.bits, generator=self.generator))
            if self.quantize_state:
                for v in self.optimizer.state.get(p, {}).values():
                    if isinstance(v, Tensor) and v.is_floating_point() and v.dim() > 0:
                        v.copy_(quantize(v, self.bits, generator=self.generator))

    def remove(self) -> None:
        """Stop quantizing."""
        for h in self._handles:
            h.remove()
        self._handles = []


@torch.no_grad()
def swap_average(model: nn.Module, *, group: Any = None) -> Averager:
    """SWAP's last step: replace each worker's weights by their mean over the ranks, in place.

    Every rank calls it after its own small-batch phase. Returns the averager (float32 means),
    whose ``copy_to`` has already been applied; recompute BatchNorm statistics afterwards
    (:func:`weightavg.recompute_bn`), as the averaged weights' statistics are unknown.
    """
    avg = Averager(model, rule=mean(), buffers="ignore")
    avg.update(model)
    avg.all_reduce(group)
    avg.copy_to(model)
    return avg


def _grid_step(x: Tensor, bits: int) -> float:
    """Grid step of :func:`quantize` for a whole-tensor block (used by tests)."""
    m = float(x.abs().max())
    return 2.0 ** (math.floor(math.log2(m)) - (bits - 2))
