"""weightavg.lightning regressions from real training setups (issue #9)."""

from __future__ import annotations

import logging
import pickle
import warnings

import pytest
import torch
from torch import nn

pl = pytest.importorskip("lightning.pytorch")

import weightavg as wa  # noqa: E402
from weightavg.lightning import SWA, StochasticWeightAveraging  # noqa: E402

from .test_lightning import GAN, N_BATCHES, Module, loader, make_trainer  # noqa: E402

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*does not have many workers.*"),
    pytest.mark.filterwarnings("ignore:.*LeafSpec.*"),
]
logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)


class Metrics(pl.Callback):
    def __init__(self) -> None:
        self.seen: list[dict[str, float]] = []

    def on_validation_end(self, trainer, pl_module):
        self.seen.append({k: float(v) for k, v in trainer.callback_metrics.items()})


def test_averaged_metric_can_be_monitored_from_the_first_validation(tmp_path) -> None:
    from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

    metrics = Metrics()
    swa = SWA(swa_start="0.75dur", update_interval=1, eval_with="both", bn_batches=2)
    trainer = make_trainer(
        max_epochs=4, enable_checkpointing=True, default_root_dir=str(tmp_path),
        callbacks=[swa, ModelCheckpoint(dirpath=str(tmp_path), monitor="swa/val_loss"),
                   EarlyStopping(monitor="swa/val_loss", patience=10), metrics])
    trainer.fit(Module(), train_dataloaders=loader(), val_dataloaders=loader(seed=1))
    assert len(metrics.seen) == 4
    for m in metrics.seen[:3]:  # before the first snapshot: the averaged model is the training model
        assert m["swa/val_loss"] == m["val_loss"]
    assert metrics.seen[3]["swa/val_loss"] != metrics.seen[3]["val_loss"]
    assert swa.policy.num_updates == N_BATCHES


def test_manual_optimization_max_steps_dur_counts_in_the_trainers_units() -> None:
    # Lightning's max_steps counts both optimizers' steps; the policy counts rounds
    swa = SWA(swa_start="0.5dur", update_interval=1, target="generator", bn_batches=2)
    trainer = make_trainer(callbacks=[swa], max_steps=16, max_epochs=-1)
    trainer.fit(GAN(), train_dataloaders=loader())
    assert trainer.global_step == 16 and swa.policy.steps == 8
    assert swa.policy.num_updates == 4  # rounds 5..8 end at global steps 10..16 > 8


def test_a_run_whose_policy_made_no_update_warns() -> None:
    swa = SWA(swa_start=100, update_interval=1, bn_batches=2)
    with pytest.warns(RuntimeWarning, match="made no update in this run"):
        make_trainer(callbacks=[swa], max_epochs=1).fit(Module(), train_dataloaders=loader())


class NoForward(pl.LightningModule):
    """Valid Lightning: no forward(), training_step calls the layers (and logs)."""

    def __init__(self, manual: bool = False) -> None:
        super().__init__()
        self.automatic_optimization = not manual
        self.net = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.log("train_loss", loss)
        if not self.automatic_optimization:
            opt = self.optimizers()
            opt.zero_grad()
            self.manual_backward(loss)
            opt.step()
            return None
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_drop_in_swa_on_a_module_without_forward_recomputes_bn_through_training_step() -> None:
    cb = StochasticWeightAveraging(swa_lrs=0.05, swa_epoch_start=1, annealing_epochs=0, bn_batches=2)
    model = NoForward()
    make_trainer(callbacks=[cb], max_epochs=2).fit(model, train_dataloaders=loader())
    assert cb.policy.num_updates == 2
    ref = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))
    ref.load_state_dict(model.net.state_dict())
    wa.recompute_bn(ref, [b for _, b in zip(range(2), loader(), strict=False)])
    torch.testing.assert_close(model.net[1].running_mean, ref[1].running_mean)
    torch.testing.assert_close(model.net[1].running_var, ref[1].running_var)


def test_no_forward_and_manual_optimization_fails_at_train_start_naming_bn_forward_fn() -> None:
    trainer = make_trainer(callbacks=[SWA(swa_start=1, update_interval=1)], max_epochs=1)
    with pytest.raises(wa.ConfigError, match="bn_forward_fn"):
        trainer.fit(NoForward(manual=True), train_dataloaders=loader())
    assert trainer.global_step == 0


class Diverge(pl.Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == 3:
            with torch.no_grad():
                pl_module.net[0].weight[0, 0] = float("nan")


def test_a_diverging_run_finishes_and_counts_the_skipped_updates() -> None:
    swa = SWA(swa_start=0, update_interval=1, bn_batches=2)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        make_trainer(callbacks=[Diverge(), swa], max_epochs=2).fit(Module(), train_dataloaders=loader())
    assert swa.policy.averager is not None and swa.policy.averager.num_skipped > 0
    assert any("skipped" in str(w.message) for w in record)


def test_after_a_spawning_strategy_the_parent_says_where_the_state_is() -> None:
    cb = SWA(swa_start=1)
    child = pickle.loads(pickle.dumps(cb))  # what ddp_spawn does with the trainer's callbacks
    with pytest.raises(wa.StateError, match=r"worker processes.*ddp_spawn"):
        cb.policy.export_state_dict()
    with pytest.raises(wa.StateError, match="was not called yet"):
        child.policy.export_state_dict()  # the worker's copy is a plain, not-yet-begun policy
