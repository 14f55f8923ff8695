"""Memory of an update and of a swap, measured with the profiler's memory events.

``tracemalloc`` does not see tensors, and a ``TorchDispatchMode`` does not see an upcast made inside a
reduction kernel; ``torch.profiler.profile(profile_memory=True)`` records every allocation of the
CPU allocator.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

import weightavg as wa

SMALL_ALLOC = 8 << 10  # bytes: what an update may allocate at once (0-d partial sums, views' metadata)


def allocations(fn: Callable[[], Any]) -> list[int]:
    """Sizes in bytes of every allocation ``fn`` makes (the profiler's positive memory events)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return [e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage > 0]


def peak_extra(fn: Callable[[], Any]) -> int:
    """Highest running total of allocations minus frees while ``fn`` runs."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.events() if e.cpu_memory_usage != 0), key=lambda e: e.time_range.start)
    now = top = 0
    for e in events:
        now += e.cpu_memory_usage
        top = max(top, now)
    return top


def model_of(dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    # two big tensors (≥ 64Ki elements: updated directly or streamed) and small ones (packed)
    m = nn.Sequential(nn.Linear(400, 400), nn.BatchNorm1d(400), nn.Linear(400, 300), nn.Linear(300, 10))
    return m.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("nonfinite", ["raise", "allow"])
@pytest.mark.parametrize("avg_dtype", [torch.float32, None])
def test_update_allocates_nothing_tensor_sized(
    dtype: torch.dtype, nonfinite: str, avg_dtype: torch.dtype | None
) -> None:
    model = model_of(dtype)
    avg = wa.Averager(model, rule={"a": wa.ema(0.9), "b": wa.mean()}, nonfinite=nonfinite,  # type: ignore[arg-type]
                      dtype=avg_dtype)
    for _ in range(3):  # the first updates copy and allocate the bounded scratch once
        avg.update(model)
    sizes = allocations(lambda: avg.update(model))
    assert max(sizes, default=0) <= SMALL_ALLOC, sorted(sizes)[-5:]
    big = 400 * 400 * dtype.itemsize
    assert sum(sizes) < big // 10, sum(sizes)


def test_bf16_check_does_not_upcast_a_big_tensor() -> None:
    model = nn.Linear(2500, 2500, bias=False).to(torch.bfloat16)
    avg = wa.Averager(model, rule=wa.ema(0.9), dtype=None)
    avg.update(model)
    avg.update(model)
    assert max(allocations(lambda: avg.update(model)), default=0) <= SMALL_ALLOC
