"""weightavg.lightning under DDP: two gloo processes (Lightning's ddp_spawn on CPU, 127.0.0.1)."""

from __future__ import annotations

import socket

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

pl = pytest.importorskip("lightning.pytorch")

from weightavg.lightning import SWA  # noqa: E402

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.filterwarnings("ignore:.*LeafSpec.*"),
    pytest.mark.filterwarnings("ignore:.*does not have many workers.*"),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Module(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self(x), y), sync_dist=True)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


class Dump(pl.Callback):
    """After the averaging callback's on_train_end: each rank writes what it holds."""

    def __init__(self, out: str, swa: SWA) -> None:
        self.out, self.swa = out, swa

    def on_train_end(self, trainer, pl_module):
        torch.save({"avg": {k: v.clone() for k, v in self.swa.policy.averager.averaged_tensors().items()},
                    "model": {k: v.clone() for k, v in pl_module.state_dict().items()},
                    "updates": self.swa.policy.num_updates, "steps": self.swa.policy.steps},
                   f"{self.out}/rank{trainer.global_rank}.pt")


def _data(seed: int) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    ds = TensorDataset(torch.randn(64, 6, generator=g), torch.randint(0, 2, (64,), generator=g))
    return DataLoader(ds, batch_size=8)


def test_ddp_two_ranks_hold_identical_averages(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    swa = SWA(swa_start="1ep", update_interval="2ba", bn_batches=2)
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp_fork", max_epochs=3,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0,
                         callbacks=[swa, Dump(str(tmp_path), swa)])
    trainer.fit(Module(), train_dataloaders=_data(0), val_dataloaders=_data(1))
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    # each rank sees 4 of the 8 batches per epoch: 4 steps, averaged every 2 in epochs 1 and 2
    assert r0["steps"] == r1["steps"] == 12
    assert r0["updates"] == r1["updates"] == 4
    for k, v in r0["avg"].items():
        assert torch.equal(v, r1["avg"][k]), k
    # the final module: averaged weights and BN statistics recomputed on both ranks' shards,
    # pooled so that the ranks agree exactly
    for k, v in r0["model"].items():
        assert torch.equal(v, r1["model"][k]), k
    assert not torch.equal(r0["model"]["net.1.running_mean"], torch.zeros(8))
