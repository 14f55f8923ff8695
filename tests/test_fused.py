"""The fused masked update of the deferred check (:mod:`weightavg._fused`) and its fallbacks.

- The Triton kernel itself runs, without a GPU, under Triton's interpreter (``TRITON_INTERPRET=1``,
  which must be set before ``triton`` is imported, so :func:`test_the_kernel_under_the_interpreter`
  reruns this file's ``interp`` tests in a subprocess with it). Reference: ATen's lerp formula with
  its product and sum rounded once, in exact rational arithmetic (:func:`fma_reference`), and
  ``torch.lerp`` on CPU within the self-check's allowance. Skipped where triton is not installed.
- The self-check and the fallbacks need no triton: a stand-in kernel (correct, broken, raising)
  replaces the launcher, and the device types the kernel serves are widened to the CPU.
- On CUDA (skipped without it): the executor with the kernel equals the CPU result.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import warnings
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

import weightavg as wa
from weightavg import _deferred, _fused

HAS_TRITON = importlib.util.find_spec("triton") is not None
INTERP = os.environ.get("TRITON_INTERPRET") == "1"
interp = pytest.mark.skipif(not (HAS_TRITON and INTERP), reason="runs in the subprocess of "
                            "test_the_kernel_under_the_interpreter (TRITON_INTERPRET=1, triton installed)")
FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
SPECIAL_WEIGHTS = (0.0, 1e-7, 0.1, 0.4999999, 0.5, 0.5000001, 0.75, 0.9999999, 1.0)
Launch = Callable[[Tensor, Tensor, Tensor, Tensor], None]


# ---------------------------------------------------------------- references


def _round(q: Fraction, bits: int, emin: int) -> float:
    """``q`` rounded to nearest even in a binary format of ``bits`` significand bits and minimum
    normal exponent ``emin`` (float32: 24, -126; float64: 53, -1022); no overflow in the tests."""
    if q == 0:
        return 0.0
    sign, q = (-1.0 if q < 0 else 1.0), abs(q)
    e = q.numerator.bit_length() - q.denominator.bit_length()
    while Fraction(2) ** e > q:
        e -= 1
    while Fraction(2) ** (e + 1) <= q:
        e += 1
    ulp = Fraction(2) ** (max(e, emin) - bits + 1)
    return sign * float(round(q / ulp) * ulp)  # round(): half to even; the product is exact in float64


def fma_reference(a: Tensor, b: Tensor, w: float, dtype: torch.dtype) -> Tensor:
    """ATen's lerp ``|w| < 0.5 ? a + w·(b − a) : b − (b − a)·(1 − w)`` in ``dtype`` (float32 or
    float64): ``b − a`` and ``1 − w`` rounded, then the product and the sum rounded once, exactly."""
    bits, emin = {torch.float32: (24, -126), torch.float64: (53, -1022)}[dtype]
    a, b = a.to(dtype), b.to(dtype)
    wq = Fraction(float(torch.tensor(w, dtype=dtype)))
    small = abs(wq) < Fraction(1, 2)
    one_minus = Fraction(float(torch.tensor(1, dtype=dtype) - torch.tensor(w, dtype=dtype)))
    out = []
    for x, y, d in zip(a.tolist(), b.tolist(), (b - a).tolist(), strict=True):
        q = Fraction(x) + wq * Fraction(d) if small else Fraction(y) - Fraction(d) * one_minus
        out.append(_round(q, bits, emin))
    return torch.tensor(out, dtype=torch.float64).to(dtype)


def expected(a: Tensor, b: Tensor, w: float) -> Tensor:
    """What the masked update with the flag true must give for an ``a.dtype`` average: the FMA
    reference in the compute dtype (float32 for a half average, then rounded to nearest even)."""
    return fma_reference(a, b, w, _fused.compute_dtype(a.dtype)).to(a.dtype)


def operands(n: int, seed: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """An average and new values over many binades, some of opposite signs (cancellation)."""
    g = torch.Generator().manual_seed(seed)
    top = 3 if dtype == torch.float16 else 10  # no overflow in float16
    scale = torch.exp2(torch.randint(-12, top, (n,), generator=g).double())
    a = torch.randn(n, generator=g, dtype=torch.float64) * scale
    b = a + torch.randn(n, generator=g, dtype=torch.float64) * scale * torch.rand(n, generator=g, dtype=torch.float64)
    b[::5] = -a[::5]
    b[1::7] = a[1::7]
    return a.to(dtype), b.to(dtype)


def poisoned(b: Tensor) -> Tensor:
    """``b`` with NaN, +Inf and −Inf sprinkled in."""
    bad = b.clone()
    bad[::3] = float("nan")
    bad[1::4] = float("inf")
    bad[2::5] = float("-inf")
    return bad


def bits(t: Tensor) -> Tensor:
    return t.view(torch.uint8).clone()


# ---------------------------------------------------------------- the kernel, under the interpreter


@interp
@settings(max_examples=60)
@given(dtype=st.sampled_from(FLOATS), n=st.integers(1, 4500), seed=st.integers(0, 2**16),
       w=st.one_of(st.sampled_from(SPECIAL_WEIGHTS), st.floats(0.0, 1.0)), ok=st.booleans())
def test_interp_kernel_is_the_masked_lerp(dtype: torch.dtype, n: int, seed: int, w: float, ok: bool) -> None:
    a, b = operands(n, seed, dtype)
    weight = torch.tensor(w, dtype=_fused.compute_dtype(dtype))
    flag = torch.tensor(ok)
    got = a.clone()
    _fused.masked_lerp_(got, b if ok else poisoned(b), weight, flag)
    if not ok:  # refused: the average keeps its bits, whatever the new values hold
        assert torch.equal(bits(got), bits(a))
        return
    want = expected(a, b, w)
    assert torch.equal(got, want), (got.double() - want.double()).abs().max()
    # and torch's own (eager) update within the self-check's allowance (bitwise where its CPU lerp uses an FMA)
    eager = a.clone()
    _fused.eager_masked_lerp_(eager, b, weight, flag)
    assert bool(((got.double() - eager.double()).abs() <= _fused.allowed_error(a, b, weight, eager)).all())


@interp
@pytest.mark.parametrize("dtype", FLOATS)
def test_interp_self_check_passes(dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_fused, "_DEVICE_TYPES", ("cuda", "cpu"))
    monkeypatch.setattr(_fused, "_TRUSTED", {})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _fused.trusted(torch.device("cpu"), dtype)


@interp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_interp_deferred_executor_with_the_kernel(dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_fused, "_DEVICE_TYPES", ("cuda", "cpu"))
    monkeypatch.setattr(_fused, "_TRUSTED", {})
    monkeypatch.setattr(_deferred, "_cpu_layout", lambda device: False)  # the plan a GPU gets
    monkeypatch.setattr(_deferred, "_DEVICE_CHUNK", 3000)  # several pieces per tensor
    launches = count_launches(monkeypatch)
    rules = {"m": wa.mean(), "e": wa.ema(0.9), "k": wa.karras_ema(gamma=6.94), "sq": wa.mean(power=2)}
    model = make_model(80)
    fused = wa.Averager(model, rule=rules, nonfinite="skip", check="deferred", dtype=dtype)
    ref = wa.Averager(model, rule=rules, nonfinite="skip", check="host", dtype=dtype)
    drive(model, [fused, ref], 6, {2, 3})
    assert fused.num_skipped == ref.num_skipped == 2
    assert launches[0] > 0 and fused_ops(fused) > 0
    for slot in rules:
        want = ref.averaged_tensors(slot)
        for k, v in fused.averaged_tensors(slot).items():
            if dtype == torch.bfloat16:
                torch.testing.assert_close(v, want[k], rtol=2 ** -7, atol=1e-6, msg=f"{slot} {k}")
            else:
                torch.testing.assert_close(v, want[k], rtol=4 * torch.finfo(dtype).eps, atol=1e-30, msg=f"{slot} {k}")


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed (optional: pip install triton)")
@pytest.mark.skipif(INTERP, reason="already under the interpreter")
def test_the_kernel_under_the_interpreter() -> None:
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "test_interp_",
                          str(Path(__file__).resolve())], cwd=root, env=env, capture_output=True, text=True,
                         timeout=600)
    tail = out.stdout[-3000:] + out.stderr[-2000:]
    assert out.returncode == 0, tail
    summary = out.stdout.strip().splitlines()[-1]
    assert "passed" in summary and "skipped" not in summary and "failed" not in summary, tail


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed (optional: pip install triton)")
@pytest.mark.skipif(INTERP, reason="compiles for a GPU: not under the interpreter")
@pytest.mark.parametrize(("dtype", "weight"), [("fp32", "fp32"), ("fp64", "fp64"), ("fp16", "fp32"), ("bf16", "fp32")])
def test_the_kernel_compiles_for_an_h100(dtype: str, weight: str) -> None:
    # what the interpreter cannot show: Triton lowers the kernel to PTX and ptxas (bundled with
    # triton) assembles it for sm_90, with the one explicit FMA and, for aligned pieces whose
    # length is a multiple of 16, 128-bit loads and stores; no GPU is needed to compile
    from triton import compile as compile_kernel
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from weightavg._fused_triton import _BLOCK, _masked_lerp_kernel

    aligned = [["tt.divisibility", 16]]
    src = ASTSource(fn=_masked_lerp_kernel, signature={
        "dst_ptr": f"*{dtype}", "src_ptr": f"*{dtype}", "w_ptr": f"*{weight}", "ok_ptr": "*u8", "n": "i32",
        "BLOCK": "constexpr", "BF16": "constexpr"}, constexprs={"BLOCK": _BLOCK, "BF16": dtype == "bf16"},
        attrs={(i,): aligned for i in range(5)})
    compiled = compile_kernel(src, target=GPUTarget("cuda", 90, 32), options={"enable_fp_fusion": False})
    ptx = compiled.asm["ptx"]
    assert len(compiled.asm["cubin"]) > 0
    assert "fma.rn" in ptx and "st.global.v" in ptx and ("ld.global.v4" in ptx or "ld.global.v2" in ptx)


# ---------------------------------------------------------------- the self-check and the fallbacks (no triton)


def make_model(width: int = 300) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(width, width), nn.BatchNorm1d(width), nn.Linear(width, 4))


def drive(model: nn.Module, avgs: list[wa.Averager], n: int, bad: set[int]) -> None:
    g = torch.Generator().manual_seed(0)
    for i in range(n):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=g).to(p.device, p.dtype))
            if i in bad:
                model[0].weight[1, 2] = float("nan")
        for a in avgs:
            a.update(model, step=3 * i + 1)
        with torch.no_grad():
            model[0].weight.nan_to_num_(0.0)


def fused_ops(avg: wa.Averager) -> int:
    """The number of fused masked updates in the deferred executor's plans."""
    ex = avg._executor
    assert isinstance(ex, _deferred.DeferredExecutor)
    return sum(op[0] == _deferred._FUSED for _, _, apply in ex.plans.values() for op in apply)


def count_launches(monkeypatch: pytest.MonkeyPatch, launch: Launch | None = None) -> list[int]:
    """Replace the kernel's launcher by ``launch`` (default: the real one) counting its calls."""
    calls = [0]
    inner = launch or _fused._kernel()

    def counted(dst: Tensor, src: Tensor, weight: Tensor, ok: Tensor) -> None:
        calls[0] += 1
        inner(dst, src, weight, ok)

    monkeypatch.setattr(_fused, "_kernel", lambda: counted)
    return calls


@pytest.fixture
def on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """The kernel's device types widened to the CPU, no verdict yet."""
    monkeypatch.setattr(_fused, "_DEVICE_TYPES", ("cuda", "cpu"))
    monkeypatch.setattr(_fused, "_TRUSTED", {})


def stand_in(dst: Tensor, src: Tensor, weight: Tensor, ok: Tensor) -> None:
    """A correct kernel: the eager update (so that the wiring is tested without triton)."""
    _fused.eager_masked_lerp_(dst, src, weight, ok)


def garbage(dst: Tensor, src: Tensor, weight: Tensor, ok: Tensor) -> None:
    """Garbage where the update is applied."""
    torch.where(ok, torch.full_like(dst, 12345.0), dst, out=dst)


def leaky(dst: Tensor, src: Tensor, weight: Tensor, ok: Tensor) -> None:
    """Right with the flag true, but it applies refused updates too (a multiplication by the flag)."""
    _fused.eager_masked_lerp_(dst, src, weight * ok, torch.ones_like(ok))


def off_by_ulps(dst: Tensor, src: Tensor, weight: Tensor, ok: Tensor) -> None:
    """Right but for a relative error of a few ε (more than one rounding of the product)."""
    _fused.eager_masked_lerp_(dst, src, weight, ok)
    dst.mul_(torch.where(ok, 1 + 4 * torch.finfo(dst.dtype).eps, 1.0).to(dst.dtype))


def spilling(dst: Tensor, src: Tensor, weight: Tensor, ok: Tensor) -> None:
    """Right inside its piece, but it also writes the element after it (where there is one)."""
    _fused.eager_masked_lerp_(dst, src, weight, ok)
    if dst.storage_offset() + dst.numel() < dst.untyped_storage().nbytes() // dst.element_size():
        torch.as_strided(dst, (dst.numel() + 1,), (1,))[-1:].add_(ok.to(dst.dtype))


def raising(dst: Tensor, src: Tensor, weight: Tensor, ok: Tensor) -> None:
    raise RuntimeError("PTX compilation failed (simulated)")


def run_pair(dtype: torch.dtype = torch.float32) -> tuple[wa.Averager, wa.Averager]:
    rules = {"m": wa.mean(), "e": wa.ema(0.9), "h": wa.ema(half_life=3), "sq": wa.mean(power=2)}
    model = make_model()
    dev = wa.Averager(model, rule=rules, nonfinite="skip", check="deferred", dtype=dtype)
    ref = wa.Averager(model, rule=rules, nonfinite="skip", check="host", dtype=dtype)
    drive(model, [dev, ref], 6, {2, 4})
    assert dev.num_skipped == ref.num_skipped == 2
    return dev, ref


def assert_same(a: wa.Averager, b: wa.Averager) -> None:
    for slot in a.rules:
        x, y = a.averaged_tensors(slot), b.averaged_tensors(slot)
        for k in y:
            assert torch.equal(x[k], y[k]), (slot, k)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_trusted_kernel_runs_every_masked_update(on_cpu: None, monkeypatch: pytest.MonkeyPatch,
                                                   dtype: torch.dtype) -> None:
    calls = count_launches(monkeypatch, stand_in)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dev, ref = run_pair(dtype)
    rules, pieces = 4, fused_ops(dev)
    assert pieces >= rules and pieces % rules == 0
    self_check = 2 * len(_fused._CHECK_WEIGHTS) * len(_fused._CHECK_PIECES)
    assert calls[0] == self_check + 6 * pieces  # then one per piece, rule and update
    assert not any(k[2] == "masked" for k in dev._executor.scratch)  # no scratch for a fused update
    assert_same(dev, ref)  # the stand-in is the eager update: bitwise


@pytest.mark.parametrize(("kernel", "why"), [
    (garbage, "differs from the eager update"),
    (off_by_ulps, "differs from the eager update"),
    (leaky, "flag false it changed the average"),
    (spilling, "wrote outside its piece"),
    (raising, "raised RuntimeError: PTX compilation failed"),
])
def test_a_kernel_failing_its_self_check_falls_back_with_one_warning(
        on_cpu: None, monkeypatch: pytest.MonkeyPatch, kernel: Launch, why: str) -> None:
    calls = count_launches(monkeypatch, kernel)
    with pytest.warns(RuntimeWarning, match=f"self-check on cpu for torch.float32: .*{why}") as record:
        dev, ref = run_pair()
    assert len(record) == 1  # once per (device, dtype), not per update or per piece
    assert not _fused.trusted(torch.device("cpu"), torch.float32)
    assert fused_ops(dev) == 0
    made = calls[0]
    assert made > 0  # the self-check did run the kernel
    assert_same(dev, ref)  # the eager update, bitwise
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not _fused.fusable(torch.zeros(4), torch.zeros(4))  # the verdict is kept: no second warning
    assert calls[0] == made


def test_without_triton_the_eager_update_runs_silently(on_cpu: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "triton", None)  # import triton raises ImportError
    monkeypatch.delitem(sys.modules, "weightavg._fused_triton", raising=False)
    with pytest.raises(ImportError):
        _fused.masked_lerp_(torch.zeros(3), torch.ones(3), torch.tensor(0.5), torch.tensor(True))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dev, ref = run_pair()
    assert not _fused.trusted(torch.device("cpu"), torch.float32)
    assert fused_ops(dev) == 0
    assert_same(dev, ref)


def test_the_cpu_never_asks_for_the_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    # the default device types: the CPU plan is the eager one, bitwise as before, triton untouched
    calls = count_launches(monkeypatch, garbage)
    monkeypatch.setattr(_fused, "_TRUSTED", {})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dev, ref = run_pair()
    assert calls[0] == 0 and _fused._TRUSTED == {} and fused_ops(dev) == 0
    assert_same(dev, ref)


def test_fusable_refuses_what_the_kernel_does_not_take(on_cpu: None, monkeypatch: pytest.MonkeyPatch) -> None:
    count_launches(monkeypatch, stand_in)
    x = torch.zeros(8)
    assert _fused.fusable(x, torch.ones(8))
    assert not _fused.fusable(x, torch.ones(8, dtype=torch.float64))  # dtypes differ
    assert not _fused.fusable(x, torch.ones(16)[::2])  # not contiguous
    assert not _fused.fusable(x, torch.ones(9))
    assert not _fused.fusable(torch.zeros(8, dtype=torch.int64), torch.ones(8, dtype=torch.int64))
    with pytest.raises(ValueError, match="weight"):
        _fused.masked_lerp_(x, torch.ones(8), torch.tensor(0.5, dtype=torch.float64), torch.tensor(True))
    with pytest.raises(ValueError, match="contiguous"):
        _fused.masked_lerp_(torch.zeros(16)[::2], torch.ones(8), torch.tensor(0.5), torch.tensor(True))


def test_import_weightavg_does_not_import_triton() -> None:
    code = ("import sys, torch; before = 'triton' in sys.modules; import weightavg, weightavg._deferred, "
            "weightavg._fused; print(before, 'triton' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    before, after = out.stdout.split()
    assert after == before, out.stdout  # nothing beyond what torch itself loaded


# ---------------------------------------------------------------- on a GPU


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", FLOATS)
def test_cuda_kernel_against_the_eager_update(dtype: torch.dtype) -> None:
    pytest.importorskip("triton", reason="the fused kernel needs triton")
    a, b = (t.cuda() for t in operands(70_001, 0, dtype))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a failed self-check is a failure here
        assert _fused.trusted(a.device, dtype)
    for w in SPECIAL_WEIGHTS:
        weight = torch.tensor(w, dtype=_fused.compute_dtype(dtype), device="cuda")
        got, want = a.clone(), a.clone()
        _fused.masked_lerp_(got, b, weight, torch.ones((), dtype=torch.bool, device="cuda"))
        _fused.eager_masked_lerp_(want, b, weight, torch.ones((), dtype=torch.bool, device="cuda"))
        assert bool(((got.double() - want.double()).abs() <= _fused.allowed_error(a, b, weight, want)).all()), w
        kept = a.clone()
        _fused.masked_lerp_(kept, poisoned(b), weight, torch.zeros((), dtype=torch.bool, device="cuda"))
        assert torch.equal(bits(kept), bits(a))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_deferred_executor_with_the_kernel_equals_cpu(dtype: torch.dtype) -> None:
    rules = {"m": wa.mean(), "e": wa.ema(0.9), "k": wa.karras_ema(gamma=6.94), "sq": wa.mean(power=2)}
    on_dev, on_cpu = make_model().cuda(), make_model()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a failed self-check is a failure here
        dev = wa.Averager(on_dev, rule=rules, nonfinite="skip", dtype=dtype)
        cpu = wa.Averager(on_cpu, rule=rules, nonfinite="skip", dtype=dtype)
        assert dev.check == "deferred"
        drive(on_dev, [dev], 6, {2, 3})
        drive(on_cpu, [cpu], 6, {2, 3})
    assert dev.num_skipped == cpu.num_skipped == 2
    if HAS_TRITON:
        assert fused_ops(dev) > 0
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-6
    for slot in rules:
        want = cpu.averaged_tensors(slot)
        for k, v in dev.averaged_tensors(slot).items():
            torch.testing.assert_close(v.cpu().double(), want[k].double(), rtol=tol, atol=tol, msg=f"{slot} {k}")
