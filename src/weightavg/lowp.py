"""Low-precision training with a full-precision average (SWALP) and parallel averaging (SWAP).

SWALP (Yang et al., ICML 2019): train with weights, gradients, optimizer state, activations and
back-propagated errors quantized to a few bits (block floating point, stochastic rounding) and keep
the SWA average in float32. The average of many rounded-up and rounded-down iterates filters the
quantization noise, which is why an 8-bit SWALP run can match float SGD. The engine already keeps a
float32 average whatever the model's precision; this module adds the quantizer (:func:`quantize`)
and the hooks that make a run low precision (:class:`LowPrecision`).

SWAP (Gupta et al., ICLR 2020): after a large-batch phase (e.g. DDP), each worker trains on its own
with small batches; their weights are then averaged across workers and BatchNorm statistics
recomputed (:func:`swap_average`, defined in ``weightavg._swap`` and re-exported here).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Iterable
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from ._errors import bad_arg
from ._swap import swap_average

__all__ = ["LowPrecision", "quantize", "swap_average"]

Rounding = Literal["stochastic", "nearest"]
Block = Literal["tensor", "row"]


def _check(bits: object, block: object, rounding: object, name: str = "bits",
           block_name: str = "block") -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 24:
        raise bad_arg(name, bits, "an int in [2, 24]")
    if block not in ("tensor", "row"):
        raise bad_arg(block_name, block, "'tensor' or 'row'")
    if rounding not in ("stochastic", "nearest"):
        raise bad_arg("rounding", rounding, "'stochastic' or 'nearest'")


@torch.no_grad()
def quantize(
    x: Tensor,
    bits: int = 8,
    *,
    block: Block = "tensor",
    rounding: Rounding = "stochastic",
    generator: torch.Generator | None = None,
) -> Tensor:
    """Block floating-point quantization: ``bits``-bit integers sharing one exponent per block.

    .. note::
        For a block with largest magnitude ``m`` the shared exponent is ``e = ⌊log2 m⌋`` and the
        grid step is ``δ = 2^(e − bits + 2)``; values become ``δ·k`` with an integer
        ``k ∈ [−(2^(bits−1) − 1), 2^(bits−1) − 1]`` (sign and magnitude, symmetric as in
        QPyTorch: the two's-complement value ``−2^(bits−1)`` is not used, so quantizing twice
        changes nothing). The top of the range, ``2^(e+1) − δ``, lies one step below ``2^(e+1)``:
        values of the block beyond it are clamped (SWALP's formulation), everything else is
        rounded:

        * ``"stochastic"``: up with probability equal to the remainder, so ``E[quantize(x)] = x``
          inside the range, for every ``bits`` in 2..24 (the remainder is split off exactly; the
          only departure is the resolution of the uniform draws, ``2^-24·δ`` for float32 and
          narrower inputs and ``2^-53·δ`` for float64).
        * ``"nearest"``: ties rounded half to even (``torch.round``).

        ``block="row"`` gives each index of the first dimension its own exponent (one per output
        unit of a weight, one per example of an activation); a 0-D or 1-D tensor is one block either
        way. Arithmetic is float32 (float64 for float64 inputs); the result has ``x``'s dtype. A
        block whose largest magnitude is below ``2^(bits−2)`` times the smallest normal number of
        that precision uses the exponent that keeps ``δ`` normal.

    Args:
        x: the tensor (any floating dtype; the result has the same dtype and shape).
        bits: word length, 2..24.
        block: one exponent for the whole ``tensor`` or one per ``row`` (first dimension).
        rounding: ``"stochastic"`` (unbiased) or ``"nearest"``.
        generator: random source for stochastic rounding, on ``x``'s device (the global RNG is
            not touched if given).

    Returns:
        A new tensor of ``x``'s dtype, shape and device.

    Raises:
        ConfigError: ``bits``, ``block`` or ``rounding`` out of range, or ``x`` not floating point.

    Examples:
        >>> import torch
        >>> from weightavg.lowp import quantize
        >>> x = torch.tensor([0.3, -1.7, 0.01])
        >>> quantize(x, bits=4, rounding="nearest")  # m = 1.7: e = 0, step 2**(0 - 4 + 2) = 0.25
        tensor([ 0.2500, -1.7500,  0.0000])
        >>> torch.equal(quantize(quantize(x, 4, rounding="nearest"), 4, rounding="nearest"),
        ...             quantize(x, 4, rounding="nearest"))
        True
    """
    _check(bits, block, rounding)
    if not x.is_floating_point():
        raise bad_arg("x", x.dtype, "a floating-point tensor")
    if x.numel() == 0:
        return x.clone()
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    xf = x.to(work)
    tiny = torch.finfo(work).tiny
    if block == "row" and xf.dim() > 1:
        m = xf.abs().flatten(1).amax(1).view(-1, *([1] * (xf.dim() - 1)))
    else:
        m = xf.abs().amax()
    exp = torch.floor(torch.log2(m.clamp_min(tiny))).clamp_min(math.log2(tiny) + bits - 2)
    step = torch.exp2(exp - (bits - 2))
    scaled = xf / step  # exact: division by a power of two
    if rounding == "stochastic":
        k = torch.floor(scaled)
        frac = scaled.sub_(k)  # exact: the bits below the binary point
        noise = torch.rand(frac.shape, generator=generator, device=frac.device, dtype=work)
        k.add_(noise.lt_(frac))
    else:
        k = scaled.round_()
    top = 2 ** (bits - 1) - 1
    return k.clamp_(-top, top).mul_(step).to(x.dtype)


class _QuantizeActivation(torch.autograd.Function):
    """Identity whose forward quantizes the activation and whose backward quantizes the error."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, lp: LowPrecision) -> Tensor:
        ctx.lp = lp
        if lp.act_bits is None:
            return x.view_as(x)
        return quantize(x, lp.act_bits, block=lp.act_block, generator=lp.generator)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None]:
        lp: LowPrecision = ctx.lp
        if lp.err_bits is None or grad is None:
            return grad, None
        return quantize(grad, lp.err_bits, block=lp.act_block, generator=lp.generator), None


class LowPrecision:
    """Make a run low precision: quantize weights, gradients, optimizer state, activations, errors.

    Hooks on the optimizer quantize the gradients before each ``step()`` and the weights and the
    optimizer's floating state (e.g. momentum) after it. The post-step hook is put first among
    the optimizer's post-step hooks, so an averaging policy begun before or after this object
    always averages the quantized weights. With ``modules``, forward hooks quantize each module's
    output (``act_bits``) and the gradient flowing back into it (``err_bits``), as SWALP's
    quantizer layers do. Pair it with an :class:`~weightavg.Averager` or a policy (float32 by
    default) for SWALP. Call :meth:`remove` to stop.

    Args:
        optimizer: the optimizer whose parameters are quantized.
        bits: word length for weights, gradients and state (8 in SWALP).
        block: ``"tensor"`` (one exponent per tensor) or ``"row"`` (one per index of the first
            dimension, SWALP's reference runs); see :func:`quantize`.
        quantize_grads: also quantize gradients.
        quantize_state: also quantize the optimizer's floating-point state tensors.
        modules: modules whose outputs (activations) and output gradients (errors) are quantized.
        act_bits: word length for the outputs of ``modules`` (default: ``bits``; ``0``: leave them
            in full precision).
        err_bits: word length for the errors back-propagated into those outputs (default:
            ``bits``; ``0``: full precision).
        act_block: exponent blocks for activations and errors (default ``"row"``: one per example).
        generator: random source for stochastic rounding (on the parameters' device).

    Raises:
        ConfigError: a bad optimizer, word length, block or module.

    Examples:
        >>> import torch, weightavg
        >>> from weightavg.lowp import LowPrecision
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        >>> lp = LowPrecision(opt, bits=8, block="row", modules=list(model))  # SWALP's 8-bit run
        >>> swa = weightavg.Averager(model)          # float32 average of 8-bit iterates
        >>> for _ in range(3):
        ...     model(torch.randn(5, 4)).sum().backward(); opt.step(); opt.zero_grad()
        ...     _ = swa.update(model)
        >>> lp.remove()                               # back to full precision
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        bits: int = 8,
        block: Block = "tensor",
        quantize_grads: bool = True,
        quantize_state: bool = True,
        modules: Iterable[nn.Module] | None = None,
        act_bits: int | None = None,
        err_bits: int | None = None,
        act_block: Block = "row",
        generator: torch.Generator | None = None,
    ) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise bad_arg("optimizer", type(optimizer).__name__, "a torch.optim.Optimizer")
        _check(bits, block, "nearest")
        mods = list(modules) if modules is not None else []
        for i, m in enumerate(mods):
            if not isinstance(m, nn.Module):
                raise bad_arg(f"modules[{i}]", type(m).__name__, "a torch.nn.Module")
        self.act_bits = self._width("act_bits", act_bits, bits)
        self.err_bits = self._width("err_bits", err_bits, bits)
        _check(bits, act_block, "nearest", block_name="act_block")
        self.optimizer = optimizer
        self.bits = bits
        self.block: Block = block
        self.act_block: Block = act_block
        self.quantize_grads = quantize_grads
        self.quantize_state = quantize_state
        self.generator = generator
        self.modules = mods
        self._handles: list[RemovableHandle] = [
            optimizer.register_step_pre_hook(self._pre),
            self._first_post_hook(optimizer),
        ]
        for m in mods:
            self._handles.append(m.register_forward_hook(self._forward_hook))
        self._post(optimizer, (), {})  # start from quantized weights

    @staticmethod
    def _width(name: str, value: int | None, default: int) -> int | None:
        if value is None:
            return default
        if value == 0 and not isinstance(value, bool):
            return None
        _check(value, "tensor", "nearest", name)
        return value

    def _first_post_hook(self, optimizer: torch.optim.Optimizer) -> RemovableHandle:
        """Register the post-step hook ahead of those already there (hooks run in that order)."""
        handle = optimizer.register_step_post_hook(self._post)
        hooks = getattr(optimizer, "_optimizer_step_post_hooks", None)
        if isinstance(hooks, OrderedDict) and handle.id in hooks:
            hooks.move_to_end(handle.id, last=False)
        return handle

    def _params(self) -> Iterable[nn.Parameter]:
        for group in self.optimizer.param_groups:
            yield from group["params"]

    def _q(self, t: Tensor) -> Tensor:
        return quantize(t, self.bits, block=self.block, generator=self.generator)

    @torch.no_grad()
    def _pre(self, _opt: Any, _args: Any, _kwargs: Any) -> None:
        if self.quantize_grads:
            for p in self._params():
                if p.grad is not None:
                    p.grad.copy_(self._q(p.grad))

    @torch.no_grad()
    def _post(self, _opt: Any, _args: Any, _kwargs: Any) -> None:
        for p in self._params():
            p.copy_(self._q(p))
            if self.quantize_state:
                for v in self.optimizer.state.get(p, {}).values():
                    if isinstance(v, Tensor) and v.is_floating_point() and v.dim() > 0:
                        v.copy_(self._q(v))

    def _forward_hook(self, _module: nn.Module, _inputs: Any, output: Any) -> Any:
        if isinstance(output, Tensor):
            return self._activation(output)
        if isinstance(output, (tuple, list)):
            return type(output)(self._activation(o) if isinstance(o, Tensor) else o for o in output)
        return output

    def _activation(self, x: Tensor) -> Tensor:
        if not x.is_floating_point():
            return x
        out: Tensor = _QuantizeActivation.apply(x, self)
        return out

    def remove(self) -> None:
        """Stop quantizing (removes every optimizer and module hook); calling it again does nothing."""
        for h in self._handles:
            h.remove()
        self._handles = []


def _grid_step(x: Tensor, bits: int) -> float:
    """Grid step of :func:`quantize` for a whole-tensor block (used by tests)."""
    m = float(x.abs().max())
    return 2.0 ** (math.floor(math.log2(m)) - (bits - 2))
