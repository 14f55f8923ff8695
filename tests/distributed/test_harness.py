"""The multi-process harness and the sharded-model reference helpers, checked on FSDP2 (gloo, CPU).

The FSDP2 tests here also pin the facts the sharded engine is built on (see
/work/notes/shard-findings.md): ``to_local()`` of an FSDP2 parameter aliases the storage FSDP2
all-gathers from, stays put across forward/backward/optimizer steps, shards are uneven (a rank
may hold an empty one), and ``DTensor.from_local`` with the parameter's global shape and stride
presents a per-rank local average as the average of the full tensor.
"""

from __future__ import annotations

import time

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from ._harness import RankError, RankTimeout, count_collectives, full_state, reference_averages, run_ranks

pytestmark = pytest.mark.distributed


def _sum_ranks(rank: int, world: int, scale: float) -> dict[str, object]:
    t = torch.tensor([float(rank)])
    dist.all_reduce(t)
    return {"rank": rank, "world": world, "sum": t * scale}


def _fail_on_one(rank: int, world: int) -> None:
    if rank == world - 1:
        raise ValueError(f"boom on rank {rank}")
    dist.barrier()  # the other ranks wait here for the failed one: the harness must not hang


def _hang(rank: int, world: int) -> None:
    time.sleep(60)


def test_results_come_back_per_rank_for_2_and_3_processes(tmp_path) -> None:
    for world in (2, 3):
        res = run_ranks(_sum_ranks, world, tmp_path / str(world), 2.0)
        assert [r["rank"] for r in res] == list(range(world))
        for r in res:
            assert r["world"] == world
            assert torch.equal(r["sum"], torch.tensor([2.0 * sum(range(world))]))


def test_a_failing_rank_is_reported_with_its_traceback_not_a_hang(tmp_path) -> None:
    t0 = time.monotonic()
    with pytest.raises(RankError, match=r"rank 1 ---(.|\n)*ValueError: boom on rank 1"):
        run_ranks(_fail_on_one, 2, tmp_path, grace=3.0)
    assert time.monotonic() - t0 < 50


def test_a_hang_fails_at_the_timeout(tmp_path) -> None:
    t0 = time.monotonic()
    with pytest.raises(RankTimeout, match="did not finish"):
        run_ranks(_hang, 2, tmp_path, timeout=4.0)
    assert time.monotonic() - t0 < 30


# ----------------------------------------------------------------------------- FSDP2 facts


def _model(hidden: int = 5) -> nn.Module:
    torch.manual_seed(0)
    # dim 0 of 5 and 2 over 2 or 3 ranks: uneven shards; Linear(5, 2) on 3 ranks: rank 2 empty
    return nn.Sequential(nn.Linear(4, hidden), nn.ReLU(), nn.Linear(hidden, 2))


def _shard(model: nn.Module, kind: str, world: int) -> nn.Module:
    if kind == "fsdp":
        fully_shard(model[0])
        fully_shard(model[2])
        fully_shard(model)
    elif kind == "hsdp":  # 2-D mesh: replicate over 2 groups, shard within each
        fully_shard(model, mesh=init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("rep", "shard")))
    else:  # tensor parallel: colwise then rowwise (Shard(0), Shard(1), a Replicate() bias)
        parallelize_module(model, init_device_mesh("cpu", (world,)), {"0": ColwiseParallel(), "2": RowwiseParallel()})
    return model


def _fsdp_local_average(rank: int, world: int, kind: str = "fsdp") -> dict[str, object]:
    """Train a sharded model; keep an EMA of the local shards only (the design the engine adopts)."""
    # tensor parallel needs the hidden width divisible by the world (an uneven one fails in
    # torch's sharding propagation of the rowwise matmul)
    model = _shard(_model(6 if kind == "tp" else 5), kind, world)
    params = dict(model.named_parameters())
    locals_ = {n: p.to_local() for n, p in params.items()}  # taken once, before any step
    ptrs = {n: t.data_ptr() for n, t in locals_.items()}
    storage = torch.empty(sum(t.numel() for t in locals_.values()))  # flat float32, local elements
    views, off = {}, 0
    for n, t in locals_.items():
        views[n] = storage[off : off + t.numel()].view(t.shape)
        off += t.numel()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(0)
    snapshots, comm = [], []
    for step in range(3):
        x = torch.randn(6, 4, generator=g)
        model(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        with count_collectives() as counts, torch.no_grad():
            if step == 0:
                for n in views:
                    views[n].copy_(locals_[n])
            else:
                torch._foreach_lerp_(list(views.values()), list(locals_.values()), 0.5)
        comm.append(sum(counts.values()))
        snapshots.append(full_state(model))  # collective, outside the counted block
    with count_collectives() as gather_counts:
        params["0.weight"].full_tensor()
    avg = {n: DTensor.from_local(views[n], p.device_mesh, p.placements, shape=p.shape, stride=p.stride(),
                                 run_check=False) for n, p in params.items()}
    return {
        "local_shapes": {n: list(t.shape) for n, t in locals_.items()},
        "placements": {n: str(p.placements) for n, p in params.items()},
        "ptr_stable": all(params[n].to_local().data_ptr() == ptrs[n] for n in params),
        "comm_per_update": comm,
        "gather_comm": sum(gather_counts.values()),
        "full_avg": {n: a.full_tensor() for n, a in avg.items()},
        "snapshots": snapshots if rank == 0 else [],
    }


@pytest.mark.parametrize("world", [2, 3])
def test_local_shard_average_equals_single_process_reference(tmp_path, world: int) -> None:
    import weightavg as wa

    res = run_ranks(_fsdp_local_average, world, tmp_path)
    if world == 3:
        assert res[2]["local_shapes"]["2.weight"] == [0, 5]  # a rank with an empty shard
    assert [r["local_shapes"]["0.weight"][0] for r in res] == ([3, 2] if world == 2 else [2, 2, 1])
    for r in res:
        assert r["ptr_stable"]
        assert r["comm_per_update"] == [0, 0, 0]
        assert r["gather_comm"] > 0  # the counter does see communication
    ref = reference_averages(_model(), res[0]["snapshots"], rule={"ema": wa.ema(0.5)})["ema"]
    for r in res:
        assert set(r["full_avg"]) == set(ref)
        for n, t in ref.items():
            torch.testing.assert_close(r["full_avg"][n], t, rtol=1e-6, atol=1e-7, msg=n)


def test_count_collectives_sees_plain_distributed_calls(tmp_path) -> None:
    res = run_ranks(_count_plain, 2, tmp_path)
    assert res[0]["all_reduce"] >= 1 and res[0]["none"] == 0


def _count_plain(rank: int, world: int) -> dict[str, int]:
    with count_collectives() as c:
        dist.all_reduce(torch.ones(1))
    with count_collectives() as none:
        torch.ones(3).mul_(2)
    return {"all_reduce": c["dist.all_reduce"], "none": sum(none.values())}


@pytest.mark.slow
@pytest.mark.parametrize(("kind", "world"), [("hsdp", 4), ("tp", 3)])
def test_local_shard_average_hsdp_and_tensor_parallel(tmp_path, kind: str, world: int) -> None:
    import weightavg as wa

    res = run_ranks(_fsdp_local_average, world, tmp_path, kind)
    if kind == "hsdp":
        assert res[0]["placements"]["0.weight"] == "(Replicate(), Shard(dim=0))"
        assert [r["local_shapes"]["0.weight"][0] for r in res] == [3, 2, 3, 2]  # replicas hold equal shards
    else:
        assert res[0]["placements"]["2.weight"] == "(Shard(dim=1),)"
        assert res[0]["placements"]["2.bias"] == "(Replicate(),)"
        assert [r["local_shapes"]["2.weight"] for r in res] == [[2, 2]] * 3
    for r in res:
        assert r["ptr_stable"] and r["comm_per_update"] == [0, 0, 0]
    ref = reference_averages(_model(6 if kind == "tp" else 5), res[0]["snapshots"],
                             rule={"ema": wa.ema(0.5)})["ema"]
    for r in res:
        for n, t in ref.items():
            torch.testing.assert_close(r["full_avg"][n], t, rtol=1e-6, atol=1e-7, msg=n)


def _unsharded_root(rank: int, world: int) -> dict[str, object]:
    """The pitfall swapped_in/copy_to must handle: a single-unit root stays unsharded after an eval
    forward, so a write into the local shards is not seen until reshard()."""
    model = nn.Sequential(nn.Linear(4, 5))
    fully_shard(model)
    assert isinstance(model, FSDPModule)
    locals_ = [model[0].weight.to_local(), model[0].bias.to_local()]
    x = torch.ones(1, 4)
    with torch.no_grad():
        before = model(x)
        plain_after_eval = type(model[0].weight) is not DTensor
        for t in locals_:
            t.zero_()  # like copy_to writing the average into the shards
        stale = model(x)  # still the old unsharded weights
        model.reshard()
        fresh = model(x)
    return {"plain_after_eval": plain_after_eval, "stale_equal_before": torch.equal(stale, before),
            "fresh_zero": bool((fresh == 0).all())}


def test_fsdp2_root_stays_unsharded_after_eval_forward_until_reshard(tmp_path) -> None:
    for r in run_ranks(_unsharded_root, 2, tmp_path):
        assert r == {"plain_after_eval": True, "stale_equal_before": True, "fresh_zero": True}
