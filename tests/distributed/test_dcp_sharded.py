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
