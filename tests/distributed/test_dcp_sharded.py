"""A DCP checkpoint written by 3 ranks (uneven shards, an empty one, a replicated tensor) reads
back whole in one process, and exports to safetensors equal to the full tensors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

from weightavg._dcp import export_dcp, iter_dcp_tensors, read_dcp_metadata

from ._harness import run_ranks

pytestmark = pytest.mark.distributed


def _full() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return {"w": torch.randn(5, 4, generator=g),  # 2, 2, 1 rows over 3 ranks
            "v": torch.randn(2, 3, generator=g).to(torch.bfloat16),  # 1, 1, 0 rows: rank 2 empty
            "r": torch.randn(3, generator=g)}  # replicated: written once


def _save_sharded(rank: int, world: int, path: str) -> dict[str, list[int]]:
    mesh = init_device_mesh("cpu", (world,))
    full = _full()
    state = {}
    for name, t in full.items():
        ref = distribute_tensor(t, mesh, [Replicate() if name == "r" else Shard(0)])
        # a local-shard average presented as a DTensor: from_local with the global shape and stride
        local = ref.to_local().clone()
        state[name] = DTensor.from_local(local, mesh, ref.placements, shape=ref.shape, stride=ref.stride(),
                                         run_check=False)
    dcp.save({"averages": {"default": state}, "num_updates": 2}, checkpoint_id=path)
    return {n: list(d.to_local().shape) for n, d in state.items()}


def test_three_rank_checkpoint_exports_whole(tmp_path: Path) -> None:
    ck = tmp_path / "ck"
    shapes = run_ranks(_save_sharded, 3, tmp_path / "run", str(ck))
    assert [s["w"][0] for s in shapes] == [2, 2, 1] and shapes[2]["v"] == [0, 3]
    info = read_dcp_metadata(ck, prefix="averages.default.")
    assert len(info["w"].chunks) == 3 and len(info["r"].chunks) == 1
    full = _full()
    got = dict(iter_dcp_tensors(ck, prefix="averages.default."))
    for k, v in full.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k], v), k
    out = export_dcp(ck, tmp_path / "avg.safetensors", prefix="averages.default.")
    st = load_file(out)
    for k, v in full.items():
        assert torch.equal(st[k], v), k


def _targets(world: int) -> dict[str, DTensor]:
    """Zeroed local-shard storage for every tensor of _full(), presented as DTensors."""
    mesh = init_device_mesh("cpu", (world,))
    out = {}
    for name, t in _full().items():
        ref = distribute_tensor(torch.zeros_like(t), mesh, [Replicate() if name == "r" else Shard(0)])
        out[name] = DTensor.from_local(ref.to_local().clone(), mesh, ref.placements, shape=ref.shape,
                                       stride=ref.stride(), run_check=False)
    return out


def _load_sharded(rank: int, world: int, path: str) -> dict[str, object]:
    state = {"averages": {"default": _targets(world)}, "num_updates": 0}
    dcp.load(state, checkpoint_id=path)
    locals_ = {n: d.to_local().clone() for n, d in state["averages"]["default"].items()}
    return {"num_updates": state["num_updates"], "locals": locals_,
            "full": {n: d.full_tensor().clone() for n, d in state["averages"]["default"].items()}}


def test_saved_on_3_ranks_loads_on_2_and_on_one_process(tmp_path: Path) -> None:
    """Resharding on load (N -> M) and single-process loading: what Averager.state_dict() relies on."""
    import warnings

    ck = tmp_path / "ck"
    run_ranks(_save_sharded, 3, tmp_path / "save", str(ck))
    full = _full()
    res = run_ranks(_load_sharded, 2, tmp_path / "load", str(ck))
    for rank, r in enumerate(res):
        assert r["num_updates"] == 2
        assert [r["locals"]["w"].shape[0] for r in res] == [3, 2]
        for n, t in full.items():
            assert torch.equal(r["full"][n], t), n
        assert torch.equal(r["locals"]["w"], full["w"][3 * rank : 3 * rank + 3])
    single = {"averages": {"default": {n: torch.zeros_like(t) for n, t in full.items()}}, "num_updates": 0}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no process group: DCP warns and loads in this process
        dcp.load(single, checkpoint_id=ck)
    assert single["num_updates"] == 2
    for n, t in full.items():
        assert torch.equal(single["averages"]["default"][n], t), n
