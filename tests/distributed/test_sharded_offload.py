"""``Averager(model, device="cpu")`` for a sharded model: each rank keeps its local shard on the host.

On CPU (2 gloo ranks) the offloaded average equals the on-device one bit for bit, stores the local
elements only, never pins a DTensor, and presents DTensors whose local tensor *is* the host storage
even when the mesh is an accelerator's (``DTensor.from_local`` would copy it to the device). The
CUDA test runs the real path (pinned double buffers, non-blocking copies) where a GPU exists.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

import weightavg as wa

from ._harness import run_ranks

RULES = {"ema": wa.ema(0.6), "swa": wa.mean()}


def _model(device: str = "cpu") -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3)).to(device)  # uneven shards over 2
    fully_shard(m[0])
    fully_shard(m[2])
    fully_shard(m)
    return m


def _no_dtensor_pinning(monkeypatch_target: type) -> list[str]:
    """Make ``Tensor.pin_memory`` raise on a DTensor; returns the list of pinned tensors' types."""
    seen: list[str] = []
    orig = monkeypatch_target.pin_memory

    def pin(self, *a, **k):  # type: ignore[no-untyped-def]
        seen.append(type(self).__name__)
        if isinstance(self, DTensor):
            raise AssertionError("pin_memory() called on a DTensor")
        return orig(self, *a, **k)

    monkeypatch_target.pin_memory = pin  # type: ignore[method-assign]
    return seen


def _train(model: nn.Module, avgs: list[wa.Averager], steps: int, device: str = "cpu") -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(dist.get_rank())
    for _ in range(steps):
        model(torch.randn(6, 4, generator=g).to(device)).square().mean().backward()
        opt.step()
        opt.zero_grad()
        for a in avgs:
            a.update(model)


def _offload(rank: int, world: int) -> dict[str, object]:
    pinned = _no_dtensor_pinning(torch.Tensor)
    model = _model()
    on = wa.Averager(model, rule=RULES)
    off = wa.Averager(model, rule=RULES, device="cpu")
    _train(model, [on, off], 4)
    out: dict[str, object] = {"pinned": pinned}
    out["equal"] = all(torch.equal(off.averaged_tensors(s)[n].to_local(), t.to_local())
                       for s in RULES for n, t in on.averaged_tensors(s).items())
    out["stored"] = sum(f.numel() for f in off._store.flat["ema"])
    out["local"] = sum(p.to_local().numel() for p in model.parameters())
    # the mesh of a model sharded on an accelerator: presented averages must keep the host storage
    store = off._store
    for name, s in list(store.shards.items()):
        mesh = copy.copy(s.mesh)
        mesh._device_type = "cuda"
        store.shards[name] = dataclasses.replace(s, mesh=mesh)
    flat = store.flat["ema"][0]
    lo, hi = flat.data_ptr(), flat.data_ptr() + flat.numel() * flat.element_size()
    views = off.averaged_tensors("ema")
    state = off.state_dict()["averages"]["ema"]
    out["aliases"] = all(
        isinstance(d, DTensor) and d.device_mesh.device_type == "cuda" and d.to_local().device.type == "cpu"
        and (d.to_local().numel() == 0 or lo <= d.to_local().data_ptr() < hi)
        for d in (*(views[n] for n in store.shards), *(state[n] for n in store.shards)))
    return out


@pytest.mark.distributed
def test_offloaded_sharded_average_keeps_the_local_shard_on_the_host(tmp_path) -> None:
    for r in run_ranks(_offload, 2, tmp_path):
        assert r["equal"]  # the same arithmetic on the same device: bit for bit
        assert r["stored"] == r["local"]  # local elements only (5x4+5 and 3x5+3 split over 2 ranks)
        assert "DTensor" not in r["pinned"]
        assert r["aliases"]


def _overlapped(rank: int, world: int) -> dict[str, object]:
    from weightavg import _overlap

    _overlap.OVERLAP_ON_CPU = True  # the accelerator's path (snapshot, worker thread), on CPU
    model = _model()
    ref = wa.Averager(model, rule=RULES, device="cpu", check="host", nonfinite="skip")
    off = wa.Averager(model, rule=RULES, device="cpu", nonfinite="skip")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(rank)
    for i in range(6):
        model(torch.randn(6, 4, generator=g)).square().mean().backward()
        opt.step()
        opt.zero_grad()
        w = model[0].weight.to_local()
        if i == 2 and rank == 1:  # a NaN in rank 1's shard only
            with torch.no_grad():
                w.view(-1)[0] = float("nan")
        for a in (ref, off):
            a.update(model, step=2 * i + 1)
        with torch.no_grad():
            w.nan_to_num_(0.0)
            for p in model.parameters():  # changed right after the update, before the worker runs
                p.mul_(0.9)
    out: dict[str, object] = {"kind": type(off._executor).__name__,
                              "private_group": off._executor.group is not None}  # type: ignore[attr-defined]
    out["counts"] = (off.num_updates, off.num_skipped, ref.num_updates, ref.num_skipped)
    out["equal"] = all(torch.equal(off.averaged_tensors(s)[n].to_local(), t.to_local())
                       for s in RULES for n, t in ref.averaged_tensors(s).items())
    return out


@pytest.mark.distributed
def test_overlapped_offload_refuses_a_rank_local_nan_on_every_rank(tmp_path) -> None:
    for r in run_ranks(_overlapped, 2, tmp_path):
        assert r["kind"] == "OverlappedExecutor" and r["private_group"], r
        assert r["counts"] == (5, 1, 5, 1), r  # both ranks refused the update rank 1 saw NaN in
        assert r["equal"], r


# ----------------------------------------------------------------------------- CUDA


def _cuda_offload(rank: int, world: int, path: str) -> dict[str, object]:
    torch.cuda.set_device(rank)
    pinned = _no_dtensor_pinning(torch.Tensor)
    model = _model("cuda")
    on = wa.Averager(model, rule=RULES)
    off = wa.Averager(model, rule=RULES, device="cpu")
    _train(model, [on, off], 5, "cuda")
    torch.cuda.synchronize()
    out: dict[str, object] = {"pinned": pinned}
    out["close"] = all(torch.allclose(off.averaged_tensors(s)[n].to_local().cuda(), t.to_local(),
                                      rtol=1e-6, atol=1e-7)
                       for s in RULES for n, t in on.averaged_tensors(s).items())
    out["on_host"] = all(f.device.type == "cpu" for slot in RULES for f in off._store.flat[slot])
    out["scratch_pinned"] = [buf.is_pinned() for buf in off._executor.staging if buf is not None]
    out["views_on_host"] = all(t.to_local().device.type == "cpu" for t in off.averaged_tensors("ema").values()
                               if isinstance(t, DTensor))
    full = off.export_state_dict(full=True, cpu=True)
    ref = on.export_state_dict(full=True, cpu=True)
    out["export"] = all(torch.allclose(full[n], ref[n], rtol=1e-6, atol=1e-7) for n in ref)
    dcp.save({"avg": off.state_dict()}, checkpoint_id=path)
    fresh = wa.Averager(model, rule=RULES, device="cpu")
    state = {"avg": fresh.state_dict()}
    dcp.load(state, checkpoint_id=path)
    fresh.load_state_dict(state["avg"])
    out["reloaded"] = all(torch.equal(fresh.averaged_tensors(s)[n].to_local(), t.to_local())
                          for s in RULES for n, t in off.averaged_tensors(s).items())
    return out


def _cuda_entry(rank: int, world: int, workdir: str) -> None:
    import datetime

    dist.init_process_group("nccl", init_method=f"file://{workdir}/store", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        result = _cuda_offload(rank, world, f"{workdir}/ck")
    finally:
        dist.destroy_process_group()
    torch.save(result, f"{workdir}/result{rank}.pt")


@pytest.mark.distributed
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_sharded_model_with_host_average(tmp_path) -> None:
    """The real offload path: FSDP2 on CUDA (nccl), averages on the host through pinned buffers."""
    import torch.multiprocessing as mp

    world = min(2, torch.cuda.device_count())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mp.start_processes(_cuda_entry, args=(world, str(tmp_path)), nprocs=world, start_method="spawn")
    for rank in range(world):
        r = torch.load(os.path.join(tmp_path, f"result{rank}.pt"), weights_only=True)
        assert r["close"] and r["on_host"] and r["views_on_host"] and r["export"] and r["reloaded"], r
        assert r["scratch_pinned"] and all(r["scratch_pinned"]), r
        assert "DTensor" not in r["pinned"]
