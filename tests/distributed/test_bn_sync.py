"""recompute_bn(sync_ranks=True): statistics pooled over ranks equal one pass over all batches."""

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
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2), nn.BatchNorm1d(2))


def _data(rank: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(100 + rank)
    return [torch.randn(5 + 3 * rank, 3, generator=g) * (1 + rank) for _ in range(2)]


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        net = _net()
        wa.recompute_bn(net, _data(rank), sync_ranks=True)
        torch.save(net.state_dict(), f"{out}/bn{rank}.pt")
        local = _net()
        wa.recompute_bn(local, _data(rank))  # without sync_ranks (the default): this rank's batches only
        torch.save(local.state_dict(), f"{out}/local{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_pooled_statistics_equal_one_pass_over_all_ranks_data(tmp_path) -> None:
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    ref = _net()
    wa.recompute_bn(ref, _data(0) + _data(1))
    for rank in range(2):
        got = torch.load(tmp_path / f"bn{rank}.pt", weights_only=True)
        for name in ("1.running_mean", "1.running_var", "4.running_mean", "4.running_var"):
            torch.testing.assert_close(got[name], ref.state_dict()[name], rtol=1e-5, atol=1e-6, msg=name)
        own = _net()
        wa.recompute_bn(own, _data(rank))
        local = torch.load(tmp_path / f"local{rank}.pt", weights_only=True)
        for name, value in own.state_dict().items():
            torch.testing.assert_close(local[name], value, rtol=1e-5, atol=1e-6, msg=name)
