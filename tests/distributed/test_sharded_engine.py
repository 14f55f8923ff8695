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
    elif kind == "mixed":  # DTensor parameters on two different meshes in a plain module
        mesh = init_device_mesh("cpu", (world,))
        m[0].weight = nn.Parameter(distribute_tensor(m[0].weight.detach(), mesh, [Shard(0)]))
        mesh2 = init_device_mesh("cpu", (1, world), mesh_dim_names=("a", "b"))
        m[3].weight = nn.Parameter(distribute_tensor(m[3].weight.detach(), mesh2, [Replicate(), Shard(1)]))
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


def test_dtensor_parameters_on_two_meshes_in_a_plain_model(tmp_path) -> None:
    res = run_ranks(_train_and_average, 3, tmp_path, "mixed")
    assert res[0]["types"] == {**{n: "Tensor" for n in res[0]["types"]}, "0.weight": "DTensor", "3.weight": "DTensor"}
    assert res[0]["placements"]["3.weight"] == str((Replicate(), Shard(1)))
    _check_against_reference(res, "mixed")


@pytest.mark.slow
@pytest.mark.parametrize(("kind", "world"), [("hsdp", 4), ("tp", 3)])
def test_hsdp_and_tensor_parallel_average_equals_reference(tmp_path, kind: str, world: int) -> None:
    res = run_ranks(_train_and_average, world, tmp_path, kind)
    if kind == "tp":
        assert res[0]["placements"]["2.bias"] == str((Replicate(),))
    _check_against_reference(res, kind)


# ----------------------------------------------------------------------------- non-finite shards


def _nonfinite(rank: int, world: int) -> dict[str, object]:
    model = _shard(_model("fsdp"), "fsdp", world)
    raising = wa.Averager(model, rule=wa.ema(0.5))
    skipping = wa.Averager(model, rule=wa.ema(0.5), nonfinite="skip")
    raising.update(model)
    skipping.update(model)
    before = {n: t.to_local().clone() for n, t in raising.averaged_tensors().items() if isinstance(t, DTensor)}
    if rank == world - 1:  # a NaN in one rank's shard only
        with torch.no_grad():
            model[0].weight.to_local()[0, 0] = float("nan")
    out: dict[str, object] = {}
    try:
        raising.update(model)
        out["raised"] = ""
    except wa.NonFiniteError as err:
        out["raised"] = str(err)
    out["skipped"] = skipping.update(model)
    out["num_skipped"] = skipping.num_skipped
    out["num_updates"] = (raising.num_updates, skipping.num_updates)
    out["unchanged"] = all(torch.equal(raising.averaged_tensors()[n].to_local(), t) for n, t in before.items())
    return out


def test_a_nonfinite_shard_on_one_rank_refuses_or_skips_on_every_rank(tmp_path) -> None:
    res = run_ranks(_nonfinite, 2, tmp_path)
    assert "0.weight" in res[1]["raised"]
    assert "another rank" in res[0]["raised"]
    for r in res:
        assert r["skipped"] is False and r["num_skipped"] == 1 and r["num_updates"] == (1, 1) and r["unchanged"]


# ----------------------------------------------------------------------------- reading, swapping


def _twin(world: int) -> nn.Module:
    return _shard(_model("fsdp"), "fsdp", world)


def _step(model: nn.Module, opt: torch.optim.Optimizer, g: torch.Generator) -> float:
    loss = model(torch.randn(6, 4, generator=g)).pow(2).mean()
    loss.backward()
    opt.step()
    opt.zero_grad()
    return float(loss)


def _read_and_swap(rank: int, world: int) -> dict[str, object]:
    model, twin = _twin(world), _twin(world)
    opt, opt_twin = torch.optim.SGD(model.parameters(), lr=0.1), torch.optim.SGD(twin.parameters(), lr=0.1)
    g, g_twin = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    avg = wa.Averager(model, rule=wa.ema(0.5))
    for _ in range(2):
        _step(model, opt, g)
        _step(twin, opt_twin, g_twin)
        avg.update(model)
    binding = avg._binder.last
    out: dict[str, object] = {"cached": binding is not None and avg._bind(model) is binding}
    with count_collectives() as c:
        sharded = avg.export_state_dict()
    out["export_comm"] = sum(c.values())
    out["export_types"] = {n: type(t).__name__ for n, t in sharded.items()}
    out["export_placements_ok"] = all(
        sharded[n].placements == p.placements for n, p in model.named_parameters())
    full = avg.export_state_dict(full=True, rank0_only=True, cpu=True)
    out["full"] = full
    averages = {n: t.full_tensor() if isinstance(t, DTensor) else t.clone()
                for n, t in avg.averaged_tensors().items()}
    out["averages"] = averages
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(5))
    model.eval()
    with avg.swapped_in(model), torch.no_grad():
        out["y_avg"] = model(x)
        out["inside"] = full_state(model)
    model.train()
    # trains on, straight away (nothing in between reshards it): the next steps equal those of a
    # twin that never swapped
    for _ in range(2):
        out["loss"] = _step(model, opt, g)
        _step(twin, opt_twin, g_twin)
    out["trains_on_equal"] = all(torch.equal(a, b) for a, b in zip(full_state(model).values(),
                                                                      full_state(twin).values(), strict=True))
    avg.copy_to(twin)
    out["copied"] = full_state(twin)
    with torch.no_grad():
        twin[1].running_mean.fill_(7.0)
    avg.load_from(twin, ["1.running_mean"])
    out["loaded"] = avg.averaged_tensors()["1.running_mean"].clone()
    return out


def test_read_swap_copy_and_load_shard_locally(tmp_path) -> None:
    res = run_ranks(_read_and_swap, 2, tmp_path)
    ref_model = _model("fsdp")
    ref_model.load_state_dict(res[0]["averages"])
    ref_model.eval()
    with torch.no_grad():
        y_ref = ref_model(torch.randn(3, 4, generator=torch.Generator().manual_seed(5)))
    for rank, r in enumerate(res):
        assert r["cached"]  # an FSDP2 forward/backward does not invalidate the binding
        assert r["export_comm"] == 0 and r["export_placements_ok"]
        assert r["export_types"]["0.weight"] == "DTensor" and r["export_types"]["1.running_mean"] == "Tensor"
        assert r["full"] == {} if rank else set(r["full"]) == set(r["averages"])
        for n, t in r["averages"].items():
            assert torch.equal(r["inside"][n], t.to(r["inside"][n].dtype)), n
            if t.is_floating_point():  # copied buffers follow the model updated from (it trained on)
                assert torch.equal(r["copied"][n], t), n
            if rank == 0:
                assert r["full"][n].device.type == "cpu" and torch.equal(r["full"][n], t), n
        torch.testing.assert_close(r["y_avg"], y_ref)
        assert r["trains_on_equal"]
        assert torch.equal(r["loaded"], torch.full((5,), 7.0))


# ----------------------------------------------------------------------------- refusals


def _refusals(rank: int, world: int) -> dict[str, str]:
    from weightavg.swa_utils import AveragedModel
    from weightavg.swag import SWAG

    model = _shard(_model("fsdp"), "fsdp", world)
    out = {}
    for what, fn in (("make_contiguous", lambda: wa.make_contiguous(model)),
                     ("swag", lambda: SWAG(model)),
                     ("averaged_model", lambda: AveragedModel(model)),
                     ("all_reduce", lambda: _all_reduce(model))):
        try:
            fn()
            out[what] = ""
        except wa.ConfigError as err:
            out[what] = str(err)
    dist.barrier()
    return out


def _all_reduce(model: nn.Module) -> None:
    avg = wa.Averager(model)
    avg.update(model)
    avg.all_reduce()


def test_sharded_models_are_refused_where_unsupported_naming_the_tensor(tmp_path) -> None:
    for r in run_ranks(_refusals, 2, tmp_path):
        assert "'0.weight'" in r["make_contiguous"] and "DTensor" in r["make_contiguous"]
        assert "SWAG" in r["swag"] and "'0.weight'" in r["swag"]
        assert "AveragedModel" in r["averaged_model"] and "'0.weight'" in r["averaged_model"]
        assert "all_reduce" in r["all_reduce"] and "'0.weight'" in r["all_reduce"]


# ----------------------------------------------------------------------------- BatchNorm


def _batches(rank: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(10 + rank)
    return [torch.randn(8, 4, generator=g) + rank for _ in range(3)]


def _recompute_bn(rank: int, world: int) -> dict[str, object]:
    model = _shard(_model("fsdp"), "fsdp", world)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(0)
    avg = wa.Averager(model, rule=wa.ema(0.5))
    for _ in range(2):
        _step(model, opt, g)
        avg.update(model)
    with avg.swapped_in(model):
        wa.recompute_bn(model, _batches(rank), sync_ranks=True)  # pooled over the ranks, as for DDP
        avg.load_from(model)
    return {"averages": {n: t.full_tensor() if isinstance(t, DTensor) else t.clone()
                         for n, t in avg.averaged_tensors().items()}}


def test_recompute_bn_on_fsdp2_pools_the_statistics_of_every_rank(tmp_path) -> None:
    res = run_ranks(_recompute_bn, 2, tmp_path)
    ref = _model("fsdp")
    ref.load_state_dict(res[0]["averages"])
    wa.recompute_bn(ref, [torch.cat([_batches(0)[i], _batches(1)[i]]) for i in range(3)])
    for r in res:
        for n in ("1.running_mean", "1.running_var"):
            torch.testing.assert_close(r["averages"][n], ref.state_dict()[n], msg=n)


def _moved(rank: int, world: int) -> str:
    model = _shard(_model("fsdp"), "fsdp", world)
    avg = wa.Averager(model)
    avg.update(model)
    model.to(torch.float64)  # keeps the DTensor objects, replaces their local tensors
    try:
        avg.update(model)
    except wa.MismatchError as err:
        return str(err)
    return ""


def test_a_cast_sharded_model_is_noticed(tmp_path) -> None:
    """DTensor.data_ptr() is always 0: the binding's probe must read the local tensor."""
    for msg in run_ranks(_moved, 2, tmp_path):
        assert "float64" in msg and "build a new Averager" in msg


def _other_ranks_file(rank: int, world: int, workdir: str) -> str:
    torch.manual_seed(0)
    model = nn.Linear(4, 4)  # even shards: the other rank's file has the very same shapes
    fully_shard(model)
    avg = wa.Averager(model)
    avg.update(model)
    torch.save(avg.state_dict(), f"{workdir}/avg{rank}.pt")
    dist.barrier()
    avg.load_state_dict(torch.load(f"{workdir}/avg{rank}.pt", weights_only=True))  # its own: fine
    try:
        avg.load_state_dict(torch.load(f"{workdir}/avg{(rank + 1) % world}.pt", weights_only=True))
    except wa.MismatchError as err:
        return str(err)
    return ""


def test_a_per_rank_file_loaded_by_another_rank_is_refused(tmp_path) -> None:
    for rank, msg in enumerate(run_ranks(_other_ranks_file, 2, tmp_path, str(tmp_path))):
        assert f"local shard of rank {1 - rank}" in msg and "'weight'" in msg and "torch.distributed.checkpoint" in msg


def _copy_into_unsharded_root(rank: int, world: int) -> dict[str, object]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5))
    fully_shard(model)  # one unit: its root stays unsharded after an eval forward
    avg = wa.Averager(model)
    avg.update(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # the live weights move away from the average
        x = torch.ones(2, 4)
        model(x)  # leaves the root unsharded (plain full parameters)
        avg.copy_to(model)  # must reshard first, or the next forward runs on the stale unsharded copy
        y = model(x)
    return {"y": y, "avg": {n: t.full_tensor() for n, t in avg.averaged_tensors().items()}}


def test_copy_to_reaches_an_fsdp2_root_left_unsharded_by_an_eval_forward(tmp_path) -> None:
    res = run_ranks(_copy_into_unsharded_root, 2, tmp_path)
    ref = nn.Sequential(nn.Linear(4, 5))
    ref.load_state_dict(res[0]["avg"])
    with torch.no_grad():
        y_ref = ref(torch.ones(2, 4))
    for r in res:
        torch.testing.assert_close(r["y"], y_ref)


def _swap_with_unsharded_root(rank: int, world: int) -> dict[str, object]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5))
    fully_shard(model)
    avg = wa.Averager(model)
    avg.update(model)
    x = torch.ones(2, 4)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
        live = model(x)
        model.reshard()
        with avg.swapped_in(model):
            inside = model(x)  # leaves the root unsharded, holding the averaged weights
        after = model(x)  # must run on the restored live weights
    return {"live": live, "inside": inside, "after": after}


def test_swapped_in_restores_an_fsdp2_root_left_unsharded_inside_the_block(tmp_path) -> None:
    for r in run_ranks(_swap_with_unsharded_root, 2, tmp_path):
        assert not torch.equal(r["inside"], r["live"])
        assert torch.equal(r["after"], r["live"])
