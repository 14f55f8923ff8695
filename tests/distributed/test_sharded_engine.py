"""weightavg.Averager over sharded models (FSDP2, HSDP, tensor parallel; gloo CPU processes).

The full tensor of every averaged DTensor must equal a single-process Averager over the unsharded
model fed the same snapshots; the unchecked update communicates nothing, the checked one all-reduces
one flag; each rank stores its local elements only.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

import weightavg as wa

from ._harness import count_collectives, full_state, reference_averages, run_ranks

pytestmark = pytest.mark.distributed

RULES = {"ema": wa.ema(0.5), "swa": wa.mean()}


def _model(kind: str, dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    if kind == "tp":  # hidden width divisible by the world (torch's rowwise matmul needs it)
        m = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    else:  # dim 0 of 5 and 2: uneven shards on 2 and 3 ranks, rank 2 of 3 holds an empty one
        m = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 2))
    return m.to(dtype)


def _shard(m: nn.Module, kind: str, world: int) -> nn.Module:
    if kind == "fsdp":
        fully_shard(m[0])
        fully_shard(m[3])
        fully_shard(m)
    elif kind == "hsdp":
        fully_shard(m, mesh=init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("rep", "shard")))
    elif kind == "tp":
        parallelize_module(m, init_device_mesh("cpu", (world,)), {"0": ColwiseParallel(), "2": RowwiseParallel()})
    elif kind == "mixed":  # one DTensor parameter in a plain module
        mesh = init_device_mesh("cpu", (world,))
        m[0].weight = nn.Parameter(distribute_tensor(m[0].weight.detach(), mesh, [Shard(0)]))
    return m


def _train_and_average(rank: int, world: int, kind: str, dtype: torch.dtype = torch.float32) -> dict[str, object]:
    model = _shard(_model(kind, dtype), kind, world)
    checked = wa.Averager(model, rule=RULES)
    unchecked = wa.Averager(model, rule=RULES, nonfinite="allow")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(0)
    snapshots, comm_allow, comm_checked = [], [], []
    for step in range(3):
        x = torch.randn(6, 4, generator=g).to(dtype)
        if kind == "mixed":  # a plain Linear cannot multiply a DTensor weight: move the weights by hand
            with torch.no_grad():
                for i, p in enumerate(model.parameters()):
                    p.mul_(0.9).add_(0.01 * (step + i))
        else:
            model(x).float().pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
        with count_collectives() as c:
            unchecked.update(model)
        comm_allow.append(sum(c.values()))
        with count_collectives() as c:
            checked.update(model)
        comm_checked.append(c["dist.all_reduce"])
        snapshots.append(full_state(model))
    out: dict[str, object] = {"comm_allow": comm_allow, "comm_checked": comm_checked,
                              "snapshots": snapshots if rank == 0 else []}
    avgs = checked.averaged_tensors("ema")
    out["types"] = {n: type(t).__name__ for n, t in avgs.items()}
    out["placements"] = {n: str(t.placements) for n, t in avgs.items() if isinstance(t, DTensor)}
    out["param_placements"] = {n: str(p.placements) for n, p in model.named_parameters() if isinstance(p, DTensor)}
    out["full"] = {slot: {n: (t.full_tensor() if isinstance(t, DTensor) else t).clone()
                          for n, t in checked.averaged_tensors(slot).items()} for slot in RULES}
    out["full_allow"] = {n: (t.full_tensor() if isinstance(t, DTensor) else t).clone()
                         for n, t in unchecked.averaged_tensors("ema").items()}
    out["stored_bytes"] = sum(f.numel() * f.element_size() for f in checked._store.flat["ema"])
    out["local_float"] = sum((p.to_local() if isinstance(p, DTensor) else p).numel()
                             for p in model.parameters()) + sum(
        b.numel() for n, b in model.named_buffers() if b.is_floating_point())
    return out


def _check_against_reference(res: list[dict[str, object]], kind: str, dtype: torch.dtype = torch.float32) -> None:
    ref = reference_averages(_model(kind, dtype), res[0]["snapshots"], rule=RULES)
    for r in res:
        assert r["comm_allow"] == [0, 0, 0]
        assert r["comm_checked"] == [1, 1, 1]  # one flag, on every rank, on every checked update
        assert r["placements"] == {n: p for n, p in r["param_placements"].items() if n in r["placements"]}
        assert r["stored_bytes"] == 4 * r["local_float"]  # float32, local elements only
        for slot in RULES:
            assert set(r["full"][slot]) == set(ref[slot])
            for n, t in ref[slot].items():
                torch.testing.assert_close(r["full"][slot][n], t, rtol=1e-6, atol=1e-7, msg=f"{slot} {n}")
        for n, t in ref["ema"].items():
            torch.testing.assert_close(r["full_allow"][n], t, rtol=1e-6, atol=1e-7, msg=n)


@pytest.mark.parametrize("world", [2, 3])
def test_fsdp2_average_equals_single_process_reference(tmp_path, world: int) -> None:
    res = run_ranks(_train_and_average, world, tmp_path, "fsdp")
    assert res[0]["types"]["0.weight"] == "DTensor" and res[0]["types"]["1.num_batches_tracked"] == "Tensor"
    _check_against_reference(res, "fsdp")


def test_fsdp2_bf16_model_keeps_a_float32_local_average(tmp_path) -> None:
    res = run_ranks(_train_and_average, 2, tmp_path, "fsdp", torch.bfloat16)
    _check_against_reference(res, "fsdp", torch.bfloat16)


def test_one_dtensor_parameter_in_a_plain_model(tmp_path) -> None:
    res = run_ranks(_train_and_average, 3, tmp_path, "mixed")
    assert res[0]["types"] == {**{n: "Tensor" for n in res[0]["types"]}, "0.weight": "DTensor"}
    _check_against_reference(res, "mixed")


@pytest.mark.slow
@pytest.mark.parametrize(("kind", "world"), [("hsdp", 4), ("tp", 3)])
def test_hsdp_and_tensor_parallel_average_equals_reference(tmp_path, kind: str, world: int) -> None:
    res = run_ranks(_train_and_average, world, tmp_path, kind)
    if kind == "tp":
        assert res[0]["placements"]["2.bias"] == str((Replicate(),))
    _check_against_reference(res, kind)
