"""PostHocEMA under DDP (2 gloo ranks): snapshots written by rank 0 only, exact resume."""

from __future__ import annotations

import json
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

pytestmark = pytest.mark.distributed
pytest.importorskip("safetensors")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _steps(policy, ddp, opt, rank: int, start: int, n: int) -> None:
    for i in range(start, start + n):
        g = torch.Generator().manual_seed(100 * i + rank)
        x = torch.randn(8, 4, generator=g)
        ddp(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        import weightavg as wa
        from weightavg import posthoc

        writes = []
        real = posthoc._atomic_write

        def counting(path, data):
            writes.append(str(path))
            real(path, data)

        posthoc._atomic_write = counting  # type: ignore[assignment]

        def fresh():
            torch.manual_seed(0)
            model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
            ddp = nn.parallel.DistributedDataParallel(model)
            return model, ddp, torch.optim.SGD(ddp.parameters(), lr=0.1)

        # uninterrupted: 20 steps, snapshots every 5
        model, ddp, opt = fresh()
        p = wa.PostHocEMA(f"{out}/a", snapshot_every=5, snapshot_dtype=torch.float32, final="training")
        p.begin(ddp, opt)
        _steps(p, ddp, opt, rank, 0, 20)
        n_writes = len(writes)
        # interrupted at 12, resumed from rank 0's state on every rank
        model, ddp, opt = fresh()
        p = wa.PostHocEMA(f"{out}/b", snapshot_every=5, snapshot_dtype=torch.float32, final="training")
        p.begin(ddp, opt)
        _steps(p, ddp, opt, rank, 0, 12)
        state = [p.state_dict() if rank == 0 else None]
        dist.broadcast_object_list(state, src=0)
        sd = [{k: v.clone() for k, v in model.state_dict().items()}, opt.state_dict()]
        p.detach()
        model, ddp, opt = fresh()
        model.load_state_dict(sd[0])
        opt.load_state_dict(sd[1])
        q = wa.PostHocEMA(f"{out}/b", snapshot_every=5, snapshot_dtype=torch.float32, final="training")
        q.load_state_dict(state[0])
        q.begin(ddp, opt)
        _steps(q, ddp, opt, rank, 12, 8)
        with open(f"{out}/rank{rank}.json", "w") as f:
            json.dump({"writes_a": n_writes, "tmp": [n for n in os.listdir(f"{out}/a") if n.endswith(".tmp")]}, f)
    finally:
        dist.destroy_process_group()


def test_snapshots_written_once_and_resume(tmp_path) -> None:
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    from weightavg import posthoc

    r0 = json.loads((tmp_path / "rank0.json").read_text())
    r1 = json.loads((tmp_path / "rank1.json").read_text())
    assert r1["writes_a"] == 0
    # begin writes the manifest; each of 4 snapshot times writes 2 profiles + the manifest
    assert r0["writes_a"] == 1 + 4 * 3
    assert r0["tmp"] == []
    ma, mb = posthoc.read_manifest(tmp_path / "a"), posthoc.read_manifest(tmp_path / "b")
    assert [s["step"] for s in ma["snapshots"]] == [5, 5, 10, 10, 15, 15, 20, 20]
    assert ma["snapshots"] == mb["snapshots"]
    for s in ma["snapshots"]:
        assert (tmp_path / "a" / s["file"]).read_bytes() == (tmp_path / "b" / s["file"]).read_bytes()
