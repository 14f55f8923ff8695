"""DDP + BatchNorm + EMA (BN statistics averaged, not recomputed): every rank ends with the same
average, the EMA of the ranks' mean running statistics (EMA is linear, so this is the mean of the
ranks' EMAs)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import weightavg as wa

from .test_engine_all_reduce import _free_port

pytestmark = pytest.mark.distributed
STEPS, SMOOTHING = 5, 0.5


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2))
        ddp = DDP(model)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
        ema = wa.EMA(smoothing=SMOOTHING)
        ema.begin(ddp, opt)
        seen = []
        opt.register_step_post_hook(lambda *a: seen.append(
            {k: model[1].get_buffer(k).clone() for k in ("running_mean", "running_var")}))
        g = torch.Generator().manual_seed(10 + rank)
        for _ in range(STEPS):
            x = torch.randn(6, 3, generator=g) * (1 + 2 * rank) + rank
            ddp(x).square().mean().backward()
            opt.step()
            opt.zero_grad()
        exported = ema.export_state_dict()
        ema.end()
        torch.save({"seen": seen, "export": exported, "final": model.state_dict()}, f"{out}/r{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_ema_of_bn_statistics_is_identical_on_every_rank(tmp_path) -> None:
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    r = [torch.load(tmp_path / f"r{i}.pt", weights_only=True) for i in range(2)]
    for b in ("running_mean", "running_var"):
        ref = None
        for step in range(STEPS):
            x = (r[0]["seen"][step][b].double() + r[1]["seen"][step][b].double()) / 2
            ref = x if ref is None else SMOOTHING * ref + (1 - SMOOTHING) * x
        assert not torch.allclose(r[0]["seen"][-1][b], r[1]["seen"][-1][b])  # the ranks' stats differ
        for i in range(2):
            torch.testing.assert_close(r[i]["export"][f"1.{b}"].double(), ref, rtol=1e-6, atol=1e-7)
            torch.testing.assert_close(r[i]["final"][f"1.{b}"].double(), ref, rtol=1e-6, atol=1e-7)
        assert torch.equal(r[0]["export"][f"1.{b}"], r[1]["export"][f"1.{b}"])
        assert torch.equal(r[0]["final"][f"1.{b}"], r[1]["final"][f"1.{b}"])
