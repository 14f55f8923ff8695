"""``weightavg average`` over DCP checkpoints written by 2 gloo ranks of an FSDP2 model, run as a
separate process: the output equals the hand mean of the gathered full tensors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.distributed.fsdp import fully_shard

import weightavg as wa
from weightavg.cli._average import average_checkpoints

from ._harness import full_state, run_ranks

pytestmark = pytest.mark.distributed

STEPS = 3


def _train_and_save(rank: int, world: int, root: str) -> dict[str, list[dict[str, Tensor]]]:
    torch.manual_seed(0)
    # (5, 4) and (3, 5) weights: uneven shards over 2 ranks (3 + 2 rows, 2 + 1 rows)
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3))
    fully_shard(model[0])
    fully_shard(model[2])
    fully_shard(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    avg = wa.Averager(model, rule=wa.ema(0.6))
    g = torch.Generator().manual_seed(rank)
    averages, models = [], []
    for step in range(STEPS):
        loss = model(torch.randn(8, 4, generator=g)).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        avg.update(model)
        dcp.save({"ema": avg.state_dict()}, checkpoint_id=f"{root}/avg{step}")
        dcp.save({"model": model.state_dict(), "step": step}, checkpoint_id=f"{root}/model{step}")
        averages.append({n: t.full_tensor().clone() for n, t in avg.averaged_tensors().items()})
        models.append(full_state(model))
    return {"averages": averages, "models": models}


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "weightavg", "average", *args], capture_output=True,
                          text=True, timeout=120)


def test_cli_averages_dcp_checkpoints_of_a_2_rank_fsdp2_run(tmp_path: Path) -> None:
    root = tmp_path / "ck"
    res = run_ranks(_train_and_save, 2, tmp_path / "run", str(root))
    averages, models = res[0]["averages"], res[0]["models"]
    assert all(torch.equal(a[n], b[n]) for a, b in zip(averages, res[1]["averages"], strict=True) for n in a)

    # checkpoints of the Averager's state: their averages (prefix ema.averages.default. found)
    out = tmp_path / "avg.safetensors"
    r = _cli(*(str(root / f"avg{s}") for s in range(STEPS)), "-o", str(out))
    assert r.returncode == 0, r.stderr
    got = load_file(out)
    assert set(got) == set(averages[0])
    for n, t in got.items():
        ref = torch.stack([a[n] for a in averages]).double().mean(0).float()
        torch.testing.assert_close(t, ref, rtol=0, atol=1e-6)

    # checkpoints of the model's state dict (--key model), the last one given as safetensors
    save_file({k: v.contiguous() for k, v in models[-1].items()}, str(tmp_path / "last.safetensors"))
    out = tmp_path / "hf"
    ins = [*(str(root / f"model{s}") for s in range(STEPS - 1)), str(tmp_path / "last.safetensors")]
    average_checkpoints(ins, out, key="model", last=2, warn=False)  # in process: one CLI start is enough
    got = load_file(out / "model.safetensors")
    assert set(got) == set(models[0])
    for n, t in got.items():
        ref = (models[-2][n].double() + models[-1][n].double()) / 2
        torch.testing.assert_close(t.double(), ref, rtol=0, atol=1e-6)
