"""Offloaded averages updated beside training (:mod:`weightavg._overlap`), run on CPU.

On a CUDA model with ``device="cpu"`` the update snapshots the sources and a worker thread folds
them into the host averages. Here the same path is forced for CPU sources (``OVERLAP_ON_CPU``).
Reference: the synchronous host-checked averager (``check="host"``) fed the same snapshots; the
averages must be bitwise equal (``torch.equal``), refused updates skipped by both.
"""

from __future__ import annotations

import threading
from typing import Any

import pytest
import torch
from torch import nn

import weightavg as wa
from weightavg import _overlap
from weightavg._executor import LocalExecutor, make_executor
from weightavg._storage import _Group

from .test_deferred import RULES as DEFERRED_RULES

RULES = {**DEFERRED_RULES, "inplace": lambda: wa.inplace(_halfway, name="halfway")}


def _halfway(avg: list[torch.Tensor], new: list[torch.Tensor], n: int) -> None:
    torch._foreach_lerp_(avg, [t.float() for t in new], 0.5)


@pytest.fixture
def overlap_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_overlap, "OVERLAP_ON_CPU", True)


def make_model(dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    # big and small tensors, float buffers, an integer buffer (copied)
    return nn.Sequential(nn.Linear(300, 300), nn.BatchNorm1d(300), nn.Linear(300, 4)).to(dtype)


def drive(model: nn.Module, avgs: list[wa.Averager], n: int, bad: frozenset[int] = frozenset(),
          start: int = 0, seed: int = 0) -> None:
    """Train-like steps; after each update the model is changed at once (as the next optimizer
    step would), which must not reach the snapshot the update took."""
    g = torch.Generator().manual_seed(seed)
    for i in range(n):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=g).to(p.dtype))
            if i in bad:
                model[0].weight[1, 2] = float("nan") if i % 2 else float("inf")
            model[1].num_batches_tracked += 1
        for a in avgs:
            a.update(model, step=start + 3 * i + 1 + (i % 2))  # uneven gaps: interval-aware rules see them
        with torch.no_grad():
            model[0].weight.nan_to_num_(0.0, posinf=0.0)
            for p in model.parameters():
                p.mul_(1.5)


def assert_same(a: wa.Averager, b: wa.Averager) -> None:
    for slot in a.rules:
        x, y = a.averaged_tensors(slot), b.averaged_tensors(slot)
        assert x.keys() == y.keys()
        for k in y:
            assert torch.equal(x[k], y[k]), (slot, k)


def pair(model: nn.Module, rules: Any, **kw: Any) -> tuple[wa.Averager, wa.Averager]:
    """(overlapped, synchronous reference), both with the averages on the host."""
    ov = wa.Averager(model, rule=rules, device="cpu", **kw)
    ref = wa.Averager(model, rule=rules, device="cpu", check="host", **{**kw, "nonfinite": "skip"}
                      if kw.get("nonfinite", "raise") != "allow" else kw)
    assert type(ov._executor) is _overlap.OverlappedExecutor
    assert type(ref._executor) is LocalExecutor
    return ov, ref


@pytest.mark.usefixtures("overlap_on_cpu")
@pytest.mark.parametrize("rule", [*RULES, "several"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_overlapped_update_equals_the_synchronous_one(rule: str, dtype: torch.dtype) -> None:
    rules: Any = {k: f() for k, f in RULES.items()} if rule == "several" else RULES[rule]()
    model = make_model(dtype)
    ov, ref = pair(model, rules, nonfinite="skip")
    drive(model, [ov, ref], 7, frozenset({2, 5}))
    assert (ov.num_updates, ov.num_skipped, ov.last_step, ov.step) == (5, 2, 19, 19)
    assert (ref.num_updates, ref.num_skipped, ref.last_step) == (5, 2, 19)
    assert_same(ov, ref)
    drive(model, [ov, ref], 3, start=30)  # goes on after the settle
    assert_same(ov, ref)


@pytest.mark.usefixtures("overlap_on_cpu")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_unchecked_and_kept_dtype(dtype: torch.dtype) -> None:
    model = make_model(dtype)
    rules = {"e": wa.ema(0.8), "m": wa.mean()}
    ov, ref = pair(model, rules, nonfinite="allow", dtype=None)
    drive(model, [ov, ref], 5)
    assert_same(ov, ref)
    assert ov.averaged_tensors("e")["0.weight"].dtype == dtype


@pytest.mark.usefixtures("overlap_on_cpu")
def test_refusal_surfaces_at_the_next_read_and_later_weights_are_exact() -> None:
    model = make_model()
    ov = wa.Averager(model, rule=wa.mean(), device="cpu")  # nonfinite="raise"
    ref = wa.Averager(model, rule=wa.mean(), device="cpu", check="host", nonfinite="skip")
    drive(model, [ov, ref], 4, frozenset({1}))  # no exception at the update
    with pytest.raises(wa.NonFiniteError, match=r"1 update\(s\) refused .*step 5"):
        _ = ov.num_updates
    assert (ov.num_updates, ov.num_skipped) == (3, 1)  # reported once
    assert_same(ov, ref)


@pytest.mark.usefixtures("overlap_on_cpu")
def test_update_returns_before_the_arithmetic_and_reads_wait_for_it(monkeypatch: pytest.MonkeyPatch) -> None:
    model = make_model()
    ov, ref = pair(model, wa.ema(0.5))
    drive(model, [ov, ref], 2)
    ov.settle()  # the second update has landed before its worker's executor is replaced
    ex = ov._executor
    assert isinstance(ex, _overlap.OverlappedExecutor)
    gate, started = threading.Event(), threading.Event()
    real = ex.inner.execute

    def held(*a: Any, **k: Any) -> bool:
        started.set()
        assert gate.wait(10)
        return real(*a, **k)

    monkeypatch.setattr(ex.inner, "execute", held)
    before = ov._store.flat["default"][0].clone()  # the raw storage (read below without settling)
    drive(model, [ov, ref], 1, start=10)  # returns while the worker is held
    assert started.wait(10)
    in_flight = ex._thread
    assert in_flight is not None and in_flight.is_alive()
    assert torch.equal(ov._store.flat["default"][0], before)
    threading.Timer(0.2, gate.set).start()
    assert_same(ov, ref)  # the read waited for the worker; the model changed since the update did not matter
    assert ex.pending == 0 and not in_flight.is_alive()


@pytest.mark.usefixtures("overlap_on_cpu")
def test_an_error_in_the_worker_is_raised_at_the_next_read_and_nothing_is_counted(
        monkeypatch: pytest.MonkeyPatch) -> None:
    model = make_model()
    ov, ref = pair(model, wa.ema(0.5))
    drive(model, [ov, ref], 2)
    ov.settle()  # the second update has landed before its worker's executor is replaced
    ex = ov._executor
    assert isinstance(ex, _overlap.OverlappedExecutor)
    real = ex.inner.execute

    def broken(*a: Any, **k: Any) -> bool:
        raise RuntimeError("out of host memory")

    monkeypatch.setattr(ex.inner, "execute", broken)
    ov.update(model, step=10)  # no exception here
    with pytest.raises(RuntimeError, match="out of host memory"):
        ov.state_dict()
    assert ov.num_updates == 2  # the failed update is not counted, and is reported once
    monkeypatch.setattr(ex.inner, "execute", real)
    drive(model, [ov, ref], 2, start=20)
    assert_same(ov, ref)


@pytest.mark.usefixtures("overlap_on_cpu")
def test_resume_swap_reset_and_copies() -> None:
    model = make_model()
    rules = {"e": wa.ema(half_life=2), "m": wa.mean()}
    ov, ref = pair(model, rules, nonfinite="skip")
    drive(model, [ov, ref], 4, frozenset({2}))
    state = ov.state_dict()
    assert state["num_updates"] == 3 and state["num_skipped"] == 1
    resumed = wa.Averager(model, rule=rules, device="cpu", nonfinite="skip")
    resumed.load_state_dict(state)
    drive(model, [ov, ref, resumed], 3, start=40)
    assert_same(resumed, ref)
    assert_same(ov, ref)
    # swapped in while an update is in flight: the model holds the settled average
    drive(model, [ov, ref], 1, start=60)
    with ov.swapped_in(model, which="e"):
        assert torch.equal(model[0].weight, ref.averaged_tensors("e")["0.weight"])
        assert model[1].num_batches_tracked.item() == ref.averaged_tensors("e")["1.num_batches_tracked"].item()
    ov.reset()
    ref.reset()
    drive(model, [ov, ref], 2, start=70)
    assert_same(ov, ref)
    assert ov.num_updates == 2


def test_only_offloaded_averages_take_the_worker() -> None:
    model = make_model()
    # sources on the CPU: nothing to overlap
    assert type(wa.Averager(model, device="cpu")._executor) is LocalExecutor
    # averages on the host of an accelerator's tensors (the storage's groups say where each lives)
    avg = wa.Averager(model, device="cpu")
    store = avg._store
    store.groups = [_Group(torch.device("cuda", 0), g.src_dtype, g.dev, g.dtype, g.averaged, g.entries,
                           g.n_packed, g.packed_numel, g.chunks) for g in store.groups]
    assert _overlap.offloaded(store)
    assert type(make_executor(store, avg.rules, "raise")) is _overlap.OverlappedExecutor
    assert type(make_executor(store, avg.rules, "allow")) is _overlap.OverlappedExecutor
    assert type(make_executor(store, avg.rules, "raise", check="host")) is LocalExecutor
    store.groups = [_Group(g.src_device, g.src_dtype, g.src_device, g.dtype, g.averaged, g.entries)
                    for g in store.groups]  # averages kept on the accelerator
    assert not _overlap.offloaded(store)
