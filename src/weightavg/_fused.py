"""The masked update in one pass: a Triton kernel for the deferred check, trusted after a self-check.

Part of the engine (see :mod:`weightavg._deferred`). The deferred non-finite check applies each
update as ``average = finite ? lerp(average, new, w) : average``. Eager torch needs two kernels for
that (``lerp`` into a scratch, then ``where`` back), and five for a float16/bfloat16 average (whose
lerp is computed in float32). :func:`masked_lerp_` does it in one: it reads the average and the new
values once, writes the average once, and needs no scratch. The finite flag ``ok`` and the weight
are 0-d tensors on the device, read by the kernel (no host sync); when ``ok`` is false the kernel
reads and writes nothing, so the average keeps its bits even where the new values are NaN/Inf (a
select, never a multiplication by zero).

**Arithmetic.** The lerp is ATen's formula (``|w| < 0.5 ? a + w·(b − a) : b − (b − a)·(1 − w)``),
computed in the weight's dtype (the average's; float32 for a float16/bfloat16 average, then rounded
to nearest even), with the product and the sum rounded once (an FMA). Torch's eager CUDA kernel is
the same formula; whether its compiler contracts it into an FMA is not promised (the kernel itself
contracts nothing else: ``enable_fp_fusion=False``), so the two may differ by the rounding of that
one product and of the result: ``|fused − eager| ≤ ε_w·|c·(b − a)| + ε_avg·|eager|`` plus the
smallest subnormal (``c`` is ``w`` or ``1 − w``, ``ε`` the machine epsilon of the weight's and of
the average's dtype). Under Triton's interpreter it equals an exact rational evaluation of the
formula rounded once (tests/test_fused.py), and torch's CPU ``lerp`` bitwise where that uses an FMA.

**When it is used.** Only for CUDA tensors (:data:`_DEVICE_TYPES`), contiguous, float32, float64,
float16 or bfloat16, with ``triton`` importable. ``triton`` is imported at the first such update,
never by ``import weightavg``. Everything else takes the eager path, which the CPU keeps (bitwise as
before). This kernel has never run on a GPU where it was written, so it is trusted on a device only
after a **self-check**, once per (device, dtype) and process, at the first update that would use it:
on pieces of a few thousand elements (aligned or not, of a length a multiple of 16 or not, and
one element: the variants Triton compiles apart; several programs, a ragged end), for weights 0,
tiny, < 0.5, 0.5, > 0.5, 1, with the flag true it must agree with the eager update within the
rounding above, with the flag false, NaN and Inf in the new values, the average must keep its bits,
and nothing outside the piece may change. If it differs, or raises
(Triton missing a compiler, a driver error), that (device, dtype) takes the eager path for the rest
of the process, with one ``RuntimeWarning`` saying why. The self-check reads two numbers from
the device, once (``torch.cuda.set_sync_debug_mode`` is switched off meanwhile); during CUDA-graph
capture it is not run and the eager path is used. The kernel is compiled at its first launch per dtype (Triton keeps
it in its on-disk cache). GPU speed: not yet measured.
"""

from __future__ import annotations

import importlib
import math
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

__all__ = ["compute_dtype", "eager_masked_lerp_", "fusable", "launcher", "masked_lerp_", "trusted"]

# the dtype the lerp is computed in, per average dtype
_COMPUTE = {torch.float32: torch.float32, torch.float64: torch.float64,
            torch.float16: torch.float32, torch.bfloat16: torch.float32}
_DEVICE_TYPES: tuple[str, ...] = ("cuda",)  # a test hook: ("cuda", "cpu") under Triton's interpreter
_TRUSTED: dict[tuple[torch.device, torch.dtype], bool] = {}  # self-check verdicts
_CHECK_N = 5003  # elements of the self-check's tensors
# (start, stop) of the pieces it updates: the variants Triton compiles apart (16-byte aligned or not,
# a length a multiple of 16 or not, one element), three programs of the kernel with a ragged end
_CHECK_PIECES = ((0, 4112), (0, 5003), (1, 5002), (2, 3))
_CHECK_WEIGHTS = (0.0, 1e-7, 0.1, 0.25, 0.4999999, 0.5, 0.5000001, 0.75, 0.9999999, 1.0)


def _kernel() -> Any:
    """The launcher of the Triton kernel (imports ``triton``; raises ImportError without it)."""
    return importlib.import_module("weightavg._fused_triton").launch


def launcher() -> Callable[[Tensor, Tensor, Tensor, Tensor], None]:
    """The kernel's launcher without :func:`masked_lerp_`'s checks, for plans whose pieces passed
    :func:`fusable` (which imported ``triton``): ``launcher()(dst, src, weight, ok)``."""
    launch: Callable[[Tensor, Tensor, Tensor, Tensor], None] = _kernel()
    return launch


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a masked lerp of a ``dtype`` average is computed (and weighed) in."""
    return _COMPUTE.get(dtype, dtype)


def masked_lerp_(dst: Tensor, src: Tensor, weight: Tensor, ok: Tensor) -> None:
    """``dst = where(ok, lerp(dst, src, weight), dst)`` in one kernel, in place.

    Args:
        dst: a contiguous float32/float64/float16/bfloat16 tensor (the average).
        src: a contiguous tensor of ``dst``'s dtype, device and number of elements.
        weight: a 0-d tensor of :func:`compute_dtype` (``dst``'s dtype, float32 for half ones).
        ok: a 0-d bool tensor; false leaves ``dst`` bitwise unchanged.

    Raises:
        ImportError: triton is not installed. ValueError: the tensors are not as described.
    """
    if dst.dtype not in _COMPUTE or src.dtype != dst.dtype or weight.dtype != _COMPUTE[dst.dtype]:
        raise ValueError(f"masked_lerp_: expected dst and src of one float dtype and a {compute_dtype(dst.dtype)} "
                         f"weight, got {dst.dtype}, {src.dtype} and {weight.dtype}")
    if ok.dtype != torch.bool or ok.dim() or weight.dim():
        raise ValueError(f"masked_lerp_: expected 0-d weight and bool flag, got {tuple(weight.shape)} and "
                         f"{ok.dtype} {tuple(ok.shape)}")
    if not (dst.is_contiguous() and src.is_contiguous()) or src.numel() != dst.numel():
        raise ValueError("masked_lerp_: dst and src must be contiguous with one number of elements")
    if len({dst.device, src.device, weight.device, ok.device}) != 1:
        raise ValueError("masked_lerp_: dst, src, weight and ok must be on one device")
    _kernel()(dst, src, weight, ok)


def eager_masked_lerp_(dst: Tensor, src: Tensor, weight: Tensor, ok: Tensor) -> None:
    """The eager reference of :func:`masked_lerp_` (allocates a temporary; for the self-check and tests).

    As the deferred executor's eager path: ``lerp`` (in float32 for a half ``dst``), then ``where``.
    """
    cd = compute_dtype(dst.dtype)
    tmp = torch.lerp(dst.to(cd), src.to(cd), weight).to(dst.dtype)
    torch.where(ok, tmp, dst, out=dst)


def fusable(dst: Tensor, src: Tensor) -> bool:
    """Whether the masked update of ``dst`` by ``src`` may run in the fused kernel: a device of
    :data:`_DEVICE_TYPES`, a supported dtype, both contiguous, and the kernel :func:`trusted` there.
    Runs the self-check on first use per (device, dtype)."""
    if dst.device.type not in _DEVICE_TYPES or dst.dtype not in _COMPUTE:
        return False
    if src.dtype != dst.dtype or src.device != dst.device or src.numel() != dst.numel():
        return False
    if not (dst.is_contiguous() and src.is_contiguous()):
        return False
    return trusted(dst.device, dst.dtype)


def trusted(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the fused kernel passed its self-check on (``device``, ``dtype``); runs it once.

    False, without a warning, where ``triton`` is not installed; False with one ``RuntimeWarning``
    where the kernel raised or disagreed with the eager update.
    """
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    key = (device, dtype)
    verdict = _TRUSTED.get(key)
    if verdict is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return False  # no host read during a capture: eager for now, checked on a later update
        verdict = _TRUSTED[key] = _self_check(device, dtype)
    return verdict


def _self_check(device: torch.device, dtype: torch.dtype) -> bool:
    """Run the kernel against the eager update on ``device`` (see the module's docstring)."""
    try:
        _kernel()
    except ImportError:
        return False  # the ordinary case without triton: eager, nothing to say
    where = f"on {device} for {dtype}"
    try:
        debug = torch.cuda.get_sync_debug_mode() if device.type == "cuda" else 0
        if debug:
            torch.cuda.set_sync_debug_mode(0)  # the one read of the verdict is intended
        try:
            with torch.inference_mode(False), torch.no_grad():
                problem = _disagreement(device, dtype)
        finally:
            if debug:
                torch.cuda.set_sync_debug_mode(debug)
    except Exception as e:  # whatever the kernel raises, the eager path still works
        problem = f"it raised {type(e).__name__}: {e}"
    if problem:
        warnings.warn(f"weightavg: the fused masked-update kernel (Triton) failed its self-check {where}: "
                      f"{problem}; the eager two-pass update is used there instead", RuntimeWarning, stacklevel=2)
        return False
    return True


def check_data(device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """The self-check's average, finite new values and new values with NaN/±Inf (seeded, on ``device``)."""
    g = torch.Generator().manual_seed(14)
    n = _CHECK_N
    fi = torch.finfo(dtype)
    # many binades, none overflowing in dtype
    lo, hi = max(-20, round(math.log2(fi.smallest_normal))), min(20, int(math.log2(fi.max)) - 4)
    scale = torch.exp2(torch.randint(lo, hi + 1, (n,), generator=g).double())
    a = torch.randn(n, generator=g, dtype=torch.float64) * scale
    b = a + torch.randn(n, generator=g, dtype=torch.float64) * scale * torch.rand(n, generator=g, dtype=torch.float64)
    b[::7] = -a[::7]  # opposite signs: cancellation, where an unfused product shows most
    bad = b.clone()
    bad[::3] = float("nan")
    bad[1::5] = float("inf")
    bad[2::5] = float("-inf")
    return (a.to(device=device, dtype=dtype), b.to(device=device, dtype=dtype), bad.to(device=device, dtype=dtype))


def allowed_error(a: Tensor, b: Tensor, weight: Tensor, eager: Tensor) -> Tensor:
    """Per element, the difference the fused kernel may have from the eager update (module docstring)."""
    cd = weight.dtype
    w = weight.to(torch.float64)
    c = torch.where(w.abs() < 0.5, w, 1 - w)
    diff = b.to(cd).to(torch.float64) - a.to(cd).to(torch.float64)
    eps_w, eps_d = torch.finfo(cd).eps, torch.finfo(a.dtype).eps
    tiny = torch.finfo(a.dtype).smallest_normal * torch.finfo(a.dtype).eps  # the smallest subnormal
    return eps_w * (c * diff).abs() + eps_d * eager.to(torch.float64).abs() + tiny


def _disagreement(device: torch.device, dtype: torch.dtype) -> str:
    """Empty if the kernel agrees with the eager update on :func:`check_data`, else what differs.

    Each weight is tried on every piece of :data:`_CHECK_PIECES` (the variants Triton compiles
    separately); outside the piece the average must keep its bits."""
    a, b, bad = check_data(device, dtype)
    cd = compute_dtype(dtype)
    launch = _kernel()
    yes = torch.ones((), dtype=torch.bool, device=device)
    no = torch.zeros((), dtype=torch.bool, device=device)
    fine = torch.ones((), dtype=torch.bool, device=device)
    worst = torch.zeros((), dtype=torch.float64, device=device)
    for wv in _CHECK_WEIGHTS:
        w = torch.tensor(wv, dtype=cd, device=device)
        for lo, hi in _CHECK_PIECES:
            got, want = a.clone(), a.clone()
            launch(got[lo:hi], b[lo:hi], w, yes)
            eager_masked_lerp_(want[lo:hi], b[lo:hi], w, yes)
            allowed = torch.zeros(a.shape, dtype=torch.float64, device=device)
            allowed[lo:hi] = allowed_error(a[lo:hi], b[lo:hi], w, want[lo:hi])
            excess = (got.double() - want.double()).abs() - allowed
            excess = torch.where(excess.isnan(), torch.full_like(excess, float("inf")), excess)  # NaN: a failure
            worst = torch.maximum(worst, excess.max())
            kept = a.clone()
            launch(kept[lo:hi], bad[lo:hi], w, no)
            fine &= (kept.view(torch.uint8) == a.view(torch.uint8)).all()
    kept_bits, excess = torch.stack([fine.to(torch.float64), worst]).tolist()  # the one host read
    if not kept_bits:
        return "with the finite flag false it changed the average (the new values held NaN/Inf)"
    if excess > 0:
        return (f"it differs from the eager update by more than the rounding of one product, or wrote outside "
                f"its piece (by {excess:.3g} more)")
    return ""
