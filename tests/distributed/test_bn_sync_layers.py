"""recompute_bn(sync_ranks=True) with several normalisation layers of different kinds and sizes
(issue #17 gap 6): the pooled layout must keep every layer's slice apart."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import weightavg as wa

from .test_engine_all_reduce import _free_port

pytestmark = pytest.mark.distributed


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv1d(2, 3, 3, padding=1), nn.BatchNorm1d(3), nn.ReLU(),
        nn.Conv1d(3, 5, 3, padding=1), nn.InstanceNorm1d(5, track_running_stats=True),
        nn.Conv1d(5, 4, 3, padding=1), nn.BatchNorm1d(4, momentum=None),
        nn.Flatten(), nn.Linear(4 * 6, 2), nn.BatchNorm1d(2),
    )


def _data(rank: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(7 + rank)
    return [torch.randn(3 + 4 * rank + k, 2, 6, generator=g) * (1 + rank) + rank for k in range(2)]


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        net = _net()
        n = wa.recompute_bn(net, _data(rank), sync_ranks=True)
        torch.save({"state": net.state_dict(), "n": n}, f"{out}/bn{rank}.pt")
        lone = _net()  # only rank 0 has batches: rank 1 contributes zero counts and ends with rank 0's
        n = wa.recompute_bn(lone, _data(0) if rank == 0 else [], sync_ranks=True)
        torch.save({"state": lone.state_dict(), "n": n}, f"{out}/lone{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_four_layers_pool_like_one_pass_over_all_data(tmp_path) -> None:
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    ref = _net()
    wa.recompute_bn(ref, _data(0) + _data(1))
    names = [f"{i}.{s}" for i in (1, 4, 6, 9) for s in ("running_mean", "running_var")]
    for rank in range(2):
        got = torch.load(tmp_path / f"bn{rank}.pt", weights_only=True)
        assert got["n"] == sum(len(x) for x in _data(rank))  # the count stays this rank's
        for name in names:
            torch.testing.assert_close(got["state"][name], ref.state_dict()[name], rtol=1e-5, atol=1e-5, msg=name)
    ref0 = _net()
    wa.recompute_bn(ref0, _data(0))
    for rank in range(2):
        got = torch.load(tmp_path / f"lone{rank}.pt", weights_only=True)
        assert got["n"] == (sum(len(x) for x in _data(0)) if rank == 0 else 0)
        for name in names:
            torch.testing.assert_close(got["state"][name], ref0.state_dict()[name], rtol=1e-5, atol=1e-5, msg=name)
