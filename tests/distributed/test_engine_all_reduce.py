"""Averager.all_reduce over two gloo processes (SWAP's final averaging)."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import weightavg as wa

pytestmark = pytest.mark.distributed


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(rank)  # each worker has its own weights (SWAP's second phase)
        model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
        avg = wa.Averager(model, rule=wa.mean())
        avg.update(model)
        avg.all_reduce()
        torch.save({"avg": {k: v.clone() for k, v in avg.averaged_tensors().items()},
                    "model": model.state_dict()}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_all_reduce_averages_across_ranks(tmp_path) -> None:
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    for name in ("0.weight", "0.bias", "1.running_var"):
        expected = (r0["model"][name] + r1["model"][name]) / 2
        torch.testing.assert_close(r0["avg"][name], expected)
        assert torch.equal(r0["avg"][name], r1["avg"][name])
    # copied integer buffers are not summed
    assert int(r0["avg"]["1.num_batches_tracked"]) == 0


def test_all_reduce_needs_a_process_group() -> None:
    avg = wa.Averager(nn.Linear(2, 2))
    avg.update(nn.Linear(2, 2))
    with pytest.raises(wa.StateError, match="process group"):
        avg.all_reduce()


def _swap_worker(rank: int, world: int, port: int, out: str) -> None:
    from weightavg.lowp import swap_average

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(10 + rank)
        model = nn.Linear(3, 2).to(torch.bfloat16)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        swap_average(model)
        torch.save({"before": before, "after": model.state_dict()}, f"{out}/swap{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_swap_average_puts_the_mean_of_workers_in_every_model(tmp_path) -> None:
    mp.spawn(_swap_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    r = [torch.load(tmp_path / f"swap{i}.pt", weights_only=True) for i in range(2)]
    for name in ("weight", "bias"):
        expected = ((r[0]["before"][name].float() + r[1]["before"][name].float()) / 2).to(torch.bfloat16)
        assert torch.equal(r[0]["after"][name], expected)  # fp32 mean, rounded once into bf16
        assert torch.equal(r[1]["after"][name], expected)
