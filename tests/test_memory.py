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
    # self (not inclusive) figures: an allocation is counted once, by the operator that made it
    return [e.self_cpu_memory_usage for e in prof.events() if e.self_cpu_memory_usage > 0]


def peak_extra(fn: Callable[[], Any]) -> int:
    """Highest running total of allocations minus frees while ``fn`` runs (an upper bound: each
    operator's allocations count from its start, its frees from its end)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    deltas = sorted((e.time_range.start if e.self_cpu_memory_usage > 0 else e.time_range.end, e.self_cpu_memory_usage)
                    for e in prof.events() if e.self_cpu_memory_usage != 0)
    now = top = 0
    for _, d in deltas:
        now += d
        top = max(top, now)
    return top


def model_of(dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    # two big tensors (≥ 64Ki elements: updated directly or streamed) and small ones (packed)
    m = nn.Sequential(nn.Linear(400, 400), nn.BatchNorm1d(400), nn.Linear(400, 300), nn.Linear(300, 10))
    return m.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("nonfinite", ["raise", "allow", "deferred"])
@pytest.mark.parametrize("avg_dtype", [torch.float32, None])
def test_update_allocates_nothing_tensor_sized(
    dtype: torch.dtype, nonfinite: str, avg_dtype: torch.dtype | None
) -> None:
    model = model_of(dtype)
    check = "deferred" if nonfinite == "deferred" else "host"  # deferred: the device-side check, run on CPU
    avg = wa.Averager(model, rule={"a": wa.ema(0.9), "b": wa.mean()},
                      nonfinite="raise" if check == "deferred" else nonfinite,  # type: ignore[arg-type]
                      dtype=avg_dtype, check=check)  # type: ignore[arg-type]
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


# ----------------------------------------------------------------------------- swapped_in


def trained_pair(
    dtype: torch.dtype = torch.float32, avg_dtype: torch.dtype | None = torch.float32
) -> tuple[nn.Module, wa.Averager]:
    model = model_of(dtype)
    avg = wa.Averager(model, rule=wa.ema(0.5), dtype=avg_dtype)
    for _ in range(3):
        avg.update(model)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        model.train()
        model(torch.randn(8, 400).to(dtype))  # moves the BatchNorm statistics
    return model, avg


def test_swapped_in_exchanges_in_place_with_one_chunk_of_extra_memory() -> None:
    model, avg = trained_pair()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    stored = {k: v.clone() for k, v in avg.averaged_tensors().items()}

    def swap() -> None:
        with avg.swapped_in(model):
            pass

    extra = peak_extra(swap)
    with avg.swapped_in(model):
        for k, v in model.state_dict().items():
            assert torch.equal(v, stored[k]), k
        inside = avg.state_dict()["averages"]["default"]  # copies: still right after the block
    assert all(torch.equal(v, stored[k]) for k, v in inside.items())
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    assert extra <= wa._exchange.SWAP_CHUNK * 4 + buffers + SMALL_ALLOC, extra
    params = sum(p.numel() * 4 for p in model.parameters())
    assert extra < params // 4
    for k, v in model.state_dict().items():  # exact both ways
        assert torch.equal(v, before[k]), k
    for k, v in avg.averaged_tensors().items():
        assert torch.equal(v, stored[k]), k


def test_swapped_in_backs_up_in_the_models_dtype_when_the_average_differs() -> None:
    model, avg = trained_pair(torch.bfloat16)  # float32 averages of a bf16 model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    stored = avg.averaged_tensors()
    cm = avg.swapped_in(model)
    extra = peak_extra(cm.__enter__)  # entering: the backup's peak
    model_bytes = sum(v.numel() * v.element_size() for v in model.state_dict().values())
    assert extra <= model_bytes + SMALL_ALLOC, (extra, model_bytes)
    cm.__exit__(None, None, None)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    with avg.swapped_in(model):
        w = model[0].weight
        assert torch.equal(w, stored["0.weight"].to(torch.bfloat16))
    assert torch.equal(model[0].weight, before["0.weight"])


def test_swapped_in_restores_on_error_and_keeps_load_from_and_undoes_buffer_changes() -> None:
    model, avg = trained_pair()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    stored = {k: v.clone() for k, v in avg.averaged_tensors().items()}
    with pytest.raises(KeyError), avg.swapped_in(model):
        raise KeyError("body failed")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(torch.equal(v, stored[k]) for k, v in avg.averaged_tensors().items())
    with avg.swapped_in(model):
        with torch.no_grad():
            model[1].running_mean.fill_(7.0)  # a buffer change: undone
            model[0].weight.mul_(2.0)
        avg.load_from(model, ["0.weight"])  # kept on purpose: no warning
        with pytest.raises(wa.StateError, match="swapped_in"):
            avg.update(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    got = avg.averaged_tensors()
    assert torch.equal(got["0.weight"], stored["0.weight"] * 2)
    assert torch.equal(got["1.running_mean"], stored["1.running_mean"])


def test_swapped_in_warns_when_the_block_writes_a_parameter() -> None:
    model, avg = trained_pair()
    with pytest.warns(RuntimeWarning, match=r"0\.bias"), avg.swapped_in(model), torch.no_grad():
        model[0].bias.add_(1.0)


# ----------------------------------------------------------------------------- inference mode


def test_averager_made_and_first_updated_under_inference_mode_keeps_working() -> None:
    model = model_of(torch.float32)
    ref = wa.Averager(model, rule=wa.ema(0.5))
    with torch.inference_mode():
        avg = wa.Averager(model, rule=wa.ema(0.5))
        avg.update(model)
        ref_first = True
    assert ref_first
    ref.update(model)
    for _ in range(2):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)
        avg.update(model)  # outside inference mode: writes the storage and the plan's views
        ref.update(model)
    with torch.inference_mode():
        avg.update(model)
    ref.update(model)
    for k, v in ref.averaged_tensors().items():
        assert torch.equal(avg.averaged_tensors()[k], v), k
    assert not any(t.is_inference() for t in avg.averaged_tensors().values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_copy_to_and_load_from_allocate_nothing_tensor_sized(dtype: torch.dtype) -> None:
    model, avg = trained_pair(dtype)
    avg.averaged_tensors()  # copied tensors synchronised once
    assert max(allocations(lambda: avg.copy_to(model)), default=0) <= SMALL_ALLOC
    assert max(allocations(lambda: avg.load_from(model)), default=0) <= SMALL_ALLOC
    for k, v in avg.averaged_tensors().items():
        assert torch.equal(model.state_dict()[k], v.to(dtype)), k
