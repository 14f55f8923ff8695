"""Non-contiguous source tensors: ``channels_last`` convolution weights, transposed parameters.

Every way of executing an update (host check, deferred check, the offloaded worker) reads such a
tensor when the update runs. Reference: the host-checked averager over a contiguous twin of the
model holding the same values; the averages must be bitwise equal (an update is element-wise).
The deferred check once built its plan from ``t.reshape(-1)``, a copy for these tensors, and
averaged that first snapshot forever.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

import weightavg as wa
from weightavg import _deferred, _overlap

from .test_deferred import RULES


class Net(nn.Module):
    def __init__(self, layout: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.big_conv = nn.Conv2d(64, 64, 3)  # 36864 elements: big
        self.small_conv = nn.Conv2d(3, 8, 3)  # 216: packed
        big, small = torch.randn(300, 200), torch.randn(30, 20)
        # transposed parameters: non-contiguous views when `layout`, plain copies otherwise
        self.big_t = nn.Parameter(big.t() if layout else big.t().contiguous())
        self.small_t = nn.Parameter(small.t() if layout else small.t().contiguous())
        self.lin = nn.Linear(5, 5)  # contiguous neighbours in the same groups
        if layout:
            self.to(memory_format=torch.channels_last)


def twins(dtype: torch.dtype) -> tuple[nn.Module, nn.Module]:
    odd, plain = Net(True).to(dtype), Net(False).to(dtype)
    if dtype != torch.float32:  # .to(dtype) keeps the memory format of 4-D weights
        assert not odd.big_conv.weight.is_contiguous()
    assert not odd.big_t.is_contiguous() and not odd.small_t.is_contiguous()
    assert not odd.small_conv.weight.is_contiguous()
    plain.load_state_dict(odd.state_dict())
    return odd, plain


def drive(odd: nn.Module, plain: nn.Module, avgs: list[wa.Averager], ref: wa.Averager, n: int,
          bad: frozenset[int] = frozenset()) -> None:
    g = torch.Generator().manual_seed(1)
    for i in range(n):
        with torch.no_grad():
            for p in odd.parameters():
                p.add_(torch.randn(p.shape, generator=g).to(p.dtype))  # in place: the layout stays
            if i in bad:
                odd.big_t[1, 2] = float("nan")
            for p, q in zip(odd.parameters(), plain.parameters(), strict=True):
                q.copy_(p)
        for a in avgs:
            a.update(odd, step=2 * i + 1)
        ref.update(plain, step=2 * i + 1)
        with torch.no_grad():
            odd.big_t.nan_to_num_(0.0)


def assert_same(a: wa.Averager, ref: wa.Averager) -> None:
    for slot in ref.rules:
        x, y = a.averaged_tensors(slot), ref.averaged_tensors(slot)
        for k in y:
            assert torch.equal(x[k], y[k]), (slot, k)


@pytest.mark.parametrize("rule", [*RULES, "several"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_executor_reads_non_contiguous_sources_at_each_update(
        rule: str, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    rules: Any = {k: f() for k, f in RULES.items()} if rule == "several" else RULES[rule]()
    odd, plain = twins(dtype)
    ref = wa.Averager(plain, rule=rules, check="host", nonfinite="skip")
    host = wa.Averager(odd, rule=rules, check="host", nonfinite="skip")
    avgs = [host, wa.Averager(odd, rule=rules, check="deferred", nonfinite="skip")]
    monkeypatch.setattr(_overlap, "OVERLAP_ON_CPU", True)
    offloaded = wa.Averager(odd, rule=rules, device="cpu", nonfinite="skip")
    assert offloaded.check == "deferred"
    avgs.append(offloaded)
    monkeypatch.setattr(_overlap, "OVERLAP_ON_CPU", False)
    # the deferred check with too many small elements to keep (gathered again for the update)
    monkeypatch.setattr(_deferred, "_SCRATCH", 64)
    avgs.append(wa.Averager(odd, rule=rules, check="deferred", nonfinite="skip"))
    drive(odd, plain, avgs, ref, 6, frozenset({3}))
    for a in avgs:
        assert (a.num_updates, a.num_skipped) == (5, 1)
        assert_same(a, ref)


def test_channels_last_stays_channels_last_and_swaps_back() -> None:
    odd, plain = twins(torch.float32)
    avg = wa.Averager(odd, rule=wa.ema(0.5), check="deferred")
    ref = wa.Averager(plain, rule=wa.ema(0.5), check="host")
    drive(odd, plain, [avg], ref, 3)
    before = {k: v.clone() for k, v in odd.state_dict().items()}
    with avg.swapped_in(odd):
        assert odd.big_conv.weight.is_contiguous(memory_format=torch.channels_last)
        for k, v in ref.averaged_tensors().items():
            assert torch.equal(odd.state_dict()[k], v), k
    for k, v in odd.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("check", ["host", "deferred"])
def test_a_non_contiguous_source_is_not_copied_whole_per_update(dtype: torch.dtype, check: str) -> None:
    from .test_memory import SMALL_ALLOC, allocations

    odd, _ = twins(dtype)
    avg = wa.Averager(odd, rule={"a": wa.ema(0.9), "b": wa.mean(power=2)}, check=check)  # type: ignore[arg-type]
    for _ in range(3):  # scratch allocated once
        avg.update(odd)
    sizes = allocations(lambda: avg.update(odd))
    assert max(sizes, default=0) <= SMALL_ALLOC, sorted(sizes)[-5:]
