"""The policies (weightavg.EMA) on an FSDP2 model in a plain loop: averaging, evaluation and a DCP
resume that continues bit-identically."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

import weightavg as wa

from ._harness import run_ranks

pytestmark = pytest.mark.distributed

STEPS, SAVE_AT = 6, 3


def _setup() -> tuple[nn.Module, torch.optim.Optimizer, wa.EMA]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 2))
    fully_shard(model[0])
    fully_shard(model[2])
    fully_shard(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)  # no optimizer state: the model's state is enough
    policy = wa.EMA(smoothing=0.8, recompute_bn=False)
    policy.begin(model, opt, total_steps=STEPS)
    return model, opt, policy


def _batch(step: int, rank: int) -> torch.Tensor:
    return torch.randn(6, 4, generator=torch.Generator().manual_seed(100 * step + rank))


def _loop(rank: int, world: int, path: str, phase: str) -> dict[str, object]:
    model, opt, policy = _setup()
    first = 0
    if phase == "resume":
        state = {"model": model.state_dict(), "ema": policy.state_dict()}
        dcp.load(state, checkpoint_id=path)
        model.load_state_dict(state["model"])
        policy.load_state_dict(state["ema"])
        first = SAVE_AT
    for step in range(first, STEPS):
        model(_batch(step, rank)).pow(2).mean().backward()
        opt.step()  # the policy's hook counts the step and updates the average
        opt.zero_grad()
        if phase == "save" and step == SAVE_AT - 1:
            dcp.save({"model": model.state_dict(), "ema": policy.state_dict()}, checkpoint_id=path)
    x = torch.ones(2, 4)
    with torch.no_grad(), policy.averaged() as m:
        y = m(x)
    avg = policy.averager
    assert avg is not None
    return {"y": y, "num_updates": avg.num_updates,
            "avg": {n: t.full_tensor() if isinstance(t, DTensor) else t.clone()
                    for n, t in avg.averaged_tensors().items()}}


def test_ema_policy_on_fsdp2_resumes_from_dcp_bit_identically(tmp_path: Path) -> None:
    ck = str(tmp_path / "ck")
    straight = run_ranks(_loop, 2, tmp_path / "a", ck, "save")
    resumed = run_ranks(_loop, 2, tmp_path / "b", ck, "resume")
    for a, b in zip(straight, resumed, strict=True):
        assert a["num_updates"] == b["num_updates"] == STEPS
        assert torch.equal(a["y"], b["y"])
        for n in a["avg"]:
            assert torch.equal(a["avg"][n], b["avg"][n]), n
