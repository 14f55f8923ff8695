"""weightavg.lightning under Lightning's ModelParallelStrategy (FSDP2) on 2 gloo CPU processes:
the callbacks average each rank's shards, and a distributed checkpoint taken inside the averaging
window resumes to the same averages as an uninterrupted run."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.utils.data import DataLoader, TensorDataset

pl = pytest.importorskip("lightning.pytorch")
from lightning.pytorch.strategies import ModelParallelStrategy  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from weightavg import ConfigError  # noqa: E402
from weightavg.cli._main import main  # noqa: E402
from weightavg.lightning import EMA  # noqa: E402

from ._harness import run_ranks  # noqa: E402

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.filterwarnings("ignore::UserWarning"),
]

EPOCHS = 3


class Module(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 2))  # 5 rows over 2 ranks: uneven

    def configure_model(self) -> None:
        mesh = self.device_mesh["data_parallel"]
        fully_shard(self.net[0], mesh=mesh)
        fully_shard(self.net[2], mesh=mesh)
        fully_shard(self.net, mesh=mesh)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", nn.functional.mse_loss(self(x), y), sync_dist=True)


def _full(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {n: t.full_tensor() if isinstance(t, DTensor) else t.clone() for n, t in tensors.items()}


class SaveAtEpoch(pl.Callback):
    """Saves a checkpoint at the end of epoch ``epoch`` (inside the EMA window) and keeps the full
    averages it holds."""

    def __init__(self, path: str, epoch: int, ema: EMA) -> None:
        self.path, self.epoch, self.ema = path, epoch, ema
        self.saved: dict[str, torch.Tensor] = {}

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if trainer.current_epoch == self.epoch:
            trainer.save_checkpoint(self.path)
            assert self.ema.policy.averager is not None
            self.saved = _full(self.ema.policy.averager.averaged_tensors())


def _data() -> DataLoader:
    g = torch.Generator().manual_seed(1)
    ds = TensorDataset(torch.randn(24, 4, generator=g), torch.randn(24, 2, generator=g))
    return DataLoader(ds, batch_size=4)  # 3 batches per rank and epoch


def _fit(rank: int, world: int, ckpt: str, phase: str, distributed: bool = True) -> dict[str, Any]:
    os.environ.update(LOCAL_RANK=str(rank), NODE_RANK="0", WORLD_SIZE=str(world))
    ema = EMA(smoothing=0.8)
    save = SaveAtEpoch(ckpt, 0, ema)
    callbacks: list[Any] = [ema, save] if phase == "save" else [ema]
    trainer = pl.Trainer(
        accelerator="cpu", devices=world,
        strategy=ModelParallelStrategy(data_parallel_size=world, tensor_parallel_size=1,
                                       save_distributed_checkpoint=distributed),
        max_epochs=EPOCHS, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=1, num_sanity_val_steps=0, callbacks=callbacks)
    module = Module()
    trainer.fit(module, train_dataloaders=_data(), val_dataloaders=_data(),
                ckpt_path=ckpt if phase == "resume" else None)
    avg = ema.policy.averager
    assert avg is not None
    return {"avg": _full(avg.averaged_tensors()), "weights": _full(module.state_dict()), "saved": save.saved,
            "updates": avg.num_updates, "steps": ema.policy.steps,
            "sharded": any(isinstance(t, DTensor) for t in avg.averaged_tensors().values())}


@pytest.mark.parametrize("distributed", [True, False], ids=["dcp", "full"])
def test_model_parallel_strategy_resume_inside_the_window_equals_an_uninterrupted_run(
        tmp_path: Path, distributed: bool) -> None:
    # dcp: each rank writes its shards of the average with the model's; full
    # (save_distributed_checkpoint=False): one file from rank 0, the averages gathered
    ckpt = str(tmp_path / ("ck" if distributed else "ck.ckpt"))
    straight = run_ranks(_fit, 2, tmp_path / "a", ckpt, "save", distributed, timeout=180)
    assert Path(ckpt).is_dir() == distributed
    resumed = run_ranks(_fit, 2, tmp_path / "b", ckpt, "resume", distributed, timeout=180)
    for a, b in zip(straight, resumed, strict=True):
        assert a["sharded"] and b["sharded"]
        assert a["steps"] == b["steps"] == EPOCHS * 3
        assert a["updates"] == b["updates"]
        for n in a["weights"]:
            assert torch.equal(a["weights"][n], b["weights"][n]), n
        for n in a["avg"]:
            assert torch.equal(a["avg"][n], b["avg"][n]), n
    saved = straight[0]["saved"]
    if not distributed:  # state_dict = the averaged weights (what load_from_checkpoint gives)
        full = torch.load(ckpt, weights_only=True)
        assert full["state_dict"].keys() == saved.keys()
        for n, t in saved.items():
            assert torch.equal(full["state_dict"][n], t), n
            assert not torch.equal(full["current_model_state"][n], t), n
        return
    # the checkpoint's averages export to safetensors as they were when saved (full tensors)
    out = tmp_path / "avg.safetensors"
    assert main(["export", ckpt, "-o", str(out)]) == 0
    exported = load_file(out)
    assert exported.keys() == straight[0]["saved"].keys()
    for n, t in straight[0]["saved"].items():
        assert torch.equal(exported[n], t), n



class Steps(pl.Callback):
    def __init__(self) -> None:
        self.steps = 0

    def on_train_batch_end(self, *args: Any) -> None:
        self.steps += 1


def _clash(rank: int, world: int, ckpt: str) -> dict[str, Any]:
    os.environ.update(LOCAL_RANK=str(rank), NODE_RANK="0", WORLD_SIZE=str(world))
    steps = Steps()
    trainer = pl.Trainer(
        accelerator="cpu", devices=world,
        strategy=ModelParallelStrategy(data_parallel_size=world, tensor_parallel_size=1),
        max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
        callbacks=[EMA(smoothing=0.8), EMA(smoothing=0.9), steps])
    try:
        trainer.fit(Module(), train_dataloaders=_data())
    except ConfigError as err:
        return {"error": str(err), "steps": steps.steps}
    return {"error": None, "steps": steps.steps}


def test_two_policies_with_one_name_are_refused_before_the_first_step(tmp_path: Path) -> None:
    # both would save their shards under "weightavg.ema." in the distributed checkpoint
    for r in run_ranks(_clash, 2, tmp_path, str(tmp_path / "ck"), timeout=180):
        assert r["steps"] == 0, r
        assert r["error"] is not None and "policy.name='ema'" in r["error"] and "name='ema2'" in r["error"], r
