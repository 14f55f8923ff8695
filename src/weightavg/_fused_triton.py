"""The Triton kernel of the masked lerp (imported by :mod:`weightavg._fused` only when needed).

This module imports ``triton`` at load time: nothing imports it but
:func:`weightavg._fused._kernel`, on the first update of a CUDA tensor (or in the tests, under
Triton's interpreter, ``TRITON_INTERPRET=1``, which runs it on CPU tensors).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["launch"]

_BLOCK = 2048  # elements per program (not tuned: no GPU has run this yet)


@triton.jit
def _masked_lerp_kernel(dst_ptr, src_ptr, w_ptr, ok_ptr, n, BLOCK: tl.constexpr,  # type: ignore[no-untyped-def]
                        BF16: tl.constexpr):
    """``dst = ok ? lerp(dst, src, w) : dst`` over ``n`` elements, computed in ``w``'s dtype.

    ``ok`` is loaded once per program; when it is false every lane is masked off, so the program
    neither reads nor writes (``dst`` keeps its bits whatever ``src`` holds). The lerp is ATen's
    formula (``|w| < 0.5 ? a + w·(b − a) : b − (b − a)·(1 − w)``) written as one FMA,
    ``fma(c, b − a, base)`` with ``(c, base) = (w, a)`` or ``(w − 1, b)`` (``w − 1`` is ``−(1 − w)``
    exactly in every rounding, so this is the formula with its product and sum rounded once).
    A bfloat16 ``dst`` is rounded to nearest-even with integer operations (NaN to 0x7FC0, as torch
    does), which Triton's interpreter rounds alike; float16 by the conversion (round to nearest even).
    """
    ok = tl.load(ok_ptr) != 0
    w = tl.load(w_ptr)
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    live = offs < tl.where(ok, n, 0)
    a = tl.load(dst_ptr + offs, mask=live).to(w.dtype)
    b = tl.load(src_ptr + offs, mask=live).to(w.dtype)
    small = tl.abs(w) < 0.5
    coeff = tl.where(small, w, w - 1.0)
    base = tl.where(small, a, b)
    r = tl.fma(coeff + tl.zeros_like(a), b - a, base)
    if BF16:
        bits = r.to(tl.uint32, bitcast=True)
        up = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        half = tl.where(r != r, 0x7FC0, up).to(tl.uint16)
        tl.store(dst_ptr + offs, half.to(tl.bfloat16, bitcast=True), mask=live)
    else:
        tl.store(dst_ptr + offs, r.to(dst_ptr.dtype.element_ty), mask=live)


def launch(dst: Tensor, src: Tensor, weight: Tensor, ok: Tensor) -> None:
    """Run the kernel over the contiguous ``dst`` and ``src`` (checked by the caller)."""
    n = dst.numel()
    if n == 0:
        return
    grid = (triton.cdiv(n, _BLOCK),)
    flag = ok.view(torch.uint8)  # a byte (a bool pointer is int1 in some Triton versions)
    # the one FMA is explicit; no other contraction (and no warning about Triton's changing default)
    options = {"BLOCK": _BLOCK, "BF16": dst.dtype == torch.bfloat16, "enable_fp_fusion": False}
    if dst.device.type == "cuda":
        with torch.cuda.device(dst.device):  # Triton launches on the current device
            _masked_lerp_kernel[grid](dst, src, weight, flag, n, **options)
    else:  # the interpreter
        _masked_lerp_kernel[grid](dst, src, weight, flag, n, **options)
