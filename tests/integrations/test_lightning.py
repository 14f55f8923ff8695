"""weightavg.lightning on a real Lightning Trainer (CPU, tiny models, a few steps)."""

from __future__ import annotations

import copy
import logging
import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

pl = pytest.importorskip("lightning.pytorch")

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*no `val_dataloader`.*"),
    pytest.mark.filterwarnings("ignore:.*LeafSpec.*"),
    pytest.mark.filterwarnings("ignore:.*dataloader is not resumable.*"),
    pytest.mark.filterwarnings("ignore:.*does not have many workers.*"),
]

import weightavg as wa  # noqa: E402
from weightavg._schedules import swa_anneal_lr  # noqa: E402
from weightavg.lightning import EMA, SWA, StochasticWeightAveraging, WeightAveraging  # noqa: E402

from ..reference import ema_closed_form, mean_of  # noqa: E402

logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)

N_BATCHES = 4  # per epoch


class Module(pl.LightningModule):
    """Linear + BatchNorm + Linear; logs val_loss; optional StepLR."""

    def __init__(self, lr: float = 0.1, step_lr: bool = False, bn: bool = True) -> None:
        super().__init__()
        self.lr, self.step_lr = lr, step_lr
        self.net = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8) if bn else nn.Identity(),
                                 nn.ReLU(), nn.Linear(8, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self(x), y))

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)
        if not self.step_lr:
            return opt
        return [opt], [torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)]


def dataset(n: int = N_BATCHES * 8, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 6, generator=g), torch.randint(0, 2, (n,), generator=g))


def loader(seed: int = 0) -> DataLoader:
    return DataLoader(dataset(seed=seed), batch_size=8)


def make_trainer(**kw) -> pl.Trainer:
    args = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                deterministic=True)
    args.update(kw)
    return pl.Trainer(**args)


class Recorder(pl.Callback):
    """Parameters after every optimizer step and at every epoch end; learning rates used."""

    def __init__(self) -> None:
        self.steps, self.epochs, self.lrs, self.epoch_lrs = [], [], [], []

    def on_train_epoch_start(self, trainer, pl_module):
        self.epoch_lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.steps.append({k: v.detach().clone() for k, v in pl_module.named_parameters()})

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.lrs.append(optimizer.param_groups[0]["lr"])

    def on_train_epoch_end(self, trainer, pl_module):
        self.epochs.append({k: v.detach().clone() for k, v in pl_module.named_parameters()})


def assert_params_close(got: dict, ref: dict, tol: float = 1e-6) -> None:
    for k, v in ref.items():
        torch.testing.assert_close(got[k].double(), v.double(), rtol=tol, atol=tol, msg=k)


# ----------------------------------------------------------------------------- the seed's LR curve


def test_seed_swa_lr_curve_matches_the_described_one() -> None:
    # lightning-swa-explained.txt: model_lr 0.1, swa_lr 0.001, swa_epoch_start=2, annealing_epochs=10,
    # 'cos', max_epochs=20: 0.1 until SWA starts at the 2nd epoch, then a cosine anneal over 10
    # epochs down to 0.001, then constant.
    class Simple(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(1, 1)

        def training_step(self, batch, batch_idx):
            return nn.functional.mse_loss(self.linear(torch.rand(4, 1)), torch.rand(4, 1))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    rec = Recorder()
    cb = StochasticWeightAveraging(swa_lrs=0.001, swa_epoch_start=2, annealing_epochs=10,
                                   annealing_strategy="cos")
    make_trainer(callbacks=[cb, rec], max_epochs=20).fit(Simple(), train_dataloaders=range(2))
    described = [0.1] + [swa_anneal_lr(0.1, 0.001, e, 10, "cos") for e in range(19)]
    assert rec.epoch_lrs == pytest.approx(described, rel=1e-12)
    assert described[1] == 0.1 and described[11] == pytest.approx(0.001) and described[-1] == pytest.approx(0.001)
    # the same as torch's SWALR created at the SWA start and stepped once per epoch
    opt = torch.optim.SGD(nn.Linear(1, 1).parameters(), lr=0.1)
    ref = [0.1]
    sched = torch.optim.swa_utils.SWALR(opt, swa_lr=0.001, anneal_epochs=10, anneal_strategy="cos")
    for _ in range(19):
        ref.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert rec.epoch_lrs == pytest.approx(ref, rel=1e-9)


# ----------------------------------------------------------------------------- Lightning's defects


def test_snapshots_are_the_swa_epochs_and_no_extra_bn_epoch() -> None:
    # Lightning: averages one pre-SWA snapshot, drops the last epoch, adds an epoch with a step
    rec = Recorder()
    cb = StochasticWeightAveraging(swa_lrs=0.05, swa_epoch_start=3, annealing_epochs=1, bn_batches=3)
    trainer = make_trainer(callbacks=[cb, rec], max_epochs=5)
    model = Module()
    trainer.fit(model, train_dataloaders=loader())
    assert trainer.current_epoch == 5 and trainer.global_step == 5 * N_BATCHES  # no extra epoch / step
    assert len(rec.steps) == 5 * N_BATCHES
    ref = mean_of(rec.epochs[2:])  # the 3rd, 4th and 5th epochs (1-based), nothing before
    assert cb.policy.num_updates == 3
    assert_params_close(dict(model.named_parameters()), ref)  # the module holds the average
    # its BatchNorm statistics are those of the averaged weights on 3 training batches
    x = torch.cat([b[0] for b in list(loader())[:3]])
    probe = copy.deepcopy(model.net).train()
    probe[1].momentum = 1.0
    with torch.no_grad():
        probe(x)
    torch.testing.assert_close(model.net[1].running_mean, probe[1].running_mean)
    torch.testing.assert_close(model.net[1].running_var, probe[1].running_var)


def test_user_scheduler_is_kept_and_lr_untouched_without_swa_lrs() -> None:
    base = Recorder()
    make_trainer(callbacks=[base], max_epochs=3).fit(Module(step_lr=True), train_dataloaders=loader())
    rec = Recorder()
    trainer = make_trainer(callbacks=[StochasticWeightAveraging(swa_epoch_start=1), rec], max_epochs=3)
    trainer.fit(Module(step_lr=True), train_dataloaders=loader())
    assert rec.lrs == base.lrs  # averaging alone never changes the learning rate
    assert [type(c.scheduler).__name__ for c in trainer.lr_scheduler_configs] == ["StepLR"]
    # with swa_lrs the user's scheduler stays in place; the SWA rate applies inside the phase
    rec = Recorder()
    trainer = make_trainer(callbacks=[StochasticWeightAveraging(swa_lrs=0.07, swa_epoch_start=2,
                                                                annealing_epochs=0), rec], max_epochs=3)
    trainer.fit(Module(step_lr=True), train_dataloaders=loader())
    assert [type(c.scheduler).__name__ for c in trainer.lr_scheduler_configs] == ["StepLR"]
    assert rec.lrs == pytest.approx([0.1] * N_BATCHES + [0.07] * 2 * N_BATCHES)


class GAN(pl.LightningModule):
    """Two optimizers, manual optimization (Lightning's SWA refuses more than one optimizer)."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.generator = nn.Sequential(nn.Linear(6, 6), nn.BatchNorm1d(6))
        self.discriminator = nn.Linear(6, 1)

    def training_step(self, batch, batch_idx):
        opt_g, opt_d = self.optimizers()
        x, _ = batch
        fake = self.generator(torch.randn_like(x))
        d_loss = self.discriminator(fake.detach()).mean() - self.discriminator(x).mean()
        opt_d.zero_grad()
        self.manual_backward(d_loss)
        opt_d.step()
        g_loss = -self.discriminator(fake).mean()
        opt_g.zero_grad()
        self.manual_backward(g_loss)
        opt_g.step()

    def configure_optimizers(self):
        return [torch.optim.SGD(self.generator.parameters(), lr=0.05),
                torch.optim.SGD(self.discriminator.parameters(), lr=0.05)]


def test_two_optimizers_and_a_sub_model() -> None:
    snaps = []

    class Snap(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            snaps.append({k: v.detach().clone() for k, v in pl_module.generator.named_parameters()})

    swa = SWA(swa_start=2, update_interval=1, target="generator", bn_batches=2)
    ema = EMA(smoothing=0.8, target="discriminator")
    model = GAN()
    trainer = make_trainer(callbacks=[swa, ema, Snap()], max_epochs=2)
    trainer.fit(model, train_dataloaders=loader())
    assert swa.policy.steps == 2 * N_BATCHES and ema.policy.steps == 2 * N_BATCHES
    assert_params_close(swa.policy.averager.averaged_tensors(), mean_of(snaps[2:]))
    assert_params_close(dict(model.generator.named_parameters()), mean_of(snaps[2:]))


class Stream(IterableDataset):
    """An iterable dataset: the loop does not know its length."""

    def __iter__(self):
        yield from dataset()


def test_max_steps_and_iterable_dataset() -> None:
    rec = Recorder()
    # float swa_epoch_start with max_steps only: a fraction of the run's steps
    cb = StochasticWeightAveraging(swa_lrs=0.01, swa_epoch_start=0.5, annealing_epochs=0, bn_batches=2)
    key = cb.state_key
    trainer = make_trainer(callbacks=[cb, rec], max_steps=10, max_epochs=-1)
    model = Module()
    trainer.fit(model, train_dataloaders=DataLoader(Stream(), batch_size=8))
    assert cb.state_key == key  # stable although the start was settled at fit start (resume finds it)
    assert trainer.global_step == 10 and cb.policy.epochs == 3  # 4 + 4 + 2 steps
    # snapshots at the ends of epochs after 5 steps: after steps 8 and 10 (the partial last epoch)
    assert cb.policy.num_updates == 2
    assert_params_close(cb.policy.averager.averaged_tensors(), mean_of([rec.steps[7], rec.steps[9]]))
    # whole epochs need no epoch length: counted from epoch ends
    rec = Recorder()
    cb = SWA(swa_start="1ep", bn_batches=2)
    make_trainer(callbacks=[cb, rec], max_epochs=3).fit(Module(), train_dataloaders=DataLoader(Stream(), batch_size=8))
    assert_params_close(cb.policy.averager.averaged_tensors(), mean_of(rec.epochs[1:]))


def test_dur_time_without_max_steps_fails_at_fit_start() -> None:
    model = Module()
    before = copy.deepcopy(model.state_dict())
    trainer = make_trainer(callbacks=[SWA(swa_start="0.5dur")], max_epochs=2)
    with pytest.raises(wa.ConfigError, match=r"swa_start='0.5dur'.*total"):
        trainer.fit(model, train_dataloaders=DataLoader(Stream(), batch_size=8))
    assert trainer.global_step == 0
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_gradient_accumulation_updates_once_per_optimizer_step() -> None:
    rec = Recorder()
    cb = EMA(smoothing=0.5)
    make_trainer(callbacks=[cb, rec], max_epochs=1, accumulate_grad_batches=2).fit(
        Module(bn=False), train_dataloaders=loader())
    assert cb.policy.steps == 2 and cb.policy.num_updates == 2
    assert_params_close(cb.policy.averager.averaged_tensors(), ema_closed_form([rec.steps[1], rec.steps[3]], 0.5))


def test_swa_lrs_of_the_wrong_length_fail_at_fit_start() -> None:
    trainer = make_trainer(callbacks=[StochasticWeightAveraging(swa_lrs=[0.1, 0.2], bn_batches=1)], max_epochs=2)
    with pytest.raises(wa.ConfigError, match=r"swa_lr=\[0.1, 0.2\].*1 floats \(one per param group\)"):
        trainer.fit(Module(), train_dataloaders=loader())
    assert trainer.global_step == 0


def test_two_writers_on_one_module_fail_at_fit_start() -> None:
    trainer = make_trainer(callbacks=[SWA(swa_start=0, bn_batches=1), EMA()], max_epochs=1)
    with pytest.raises(wa.ConfigError, match="two policies write averaged weights"):
        trainer.fit(Module(), train_dataloaders=loader())
    assert trainer.global_step == 0
    # one of them evaluating the training weights and keeping them at the end is fine
    trainer = make_trainer(callbacks=[SWA(swa_start=0, bn_batches=1),
                                      EMA(eval_with="training", final="training")], max_epochs=1)
    trainer.fit(Module(), train_dataloaders=loader())


# ----------------------------------------------------------------------------- validation


class Probe(pl.Callback):
    """What validation saw: the module's state at each validation batch 0."""

    def __init__(self) -> None:
        self.seen = []

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if batch_idx == 0:
            self.seen.append({k: v.detach().clone() for k, v in pl_module.state_dict().items()})


def test_validation_sees_averaged_weights_with_fresh_bn() -> None:
    rec, probe = Recorder(), Probe()
    cb = SWA(swa_start="1ep", bn_batches=2)
    model = Module()
    make_trainer(callbacks=[cb, rec, probe], max_epochs=3).fit(
        model, train_dataloaders=loader(), val_dataloaders=loader(seed=1))
    # epoch 0: nothing averaged yet -> training weights; epochs 1, 2: average of their ends
    assert_params_close(probe.seen[0], rec.epochs[0])
    assert_params_close(probe.seen[1], rec.epochs[1])
    assert_params_close(probe.seen[2], mean_of(rec.epochs[1:3]))
    # BN statistics at the epoch-1 validation: recomputed for the averaged weights (2 batches)
    m = Module()
    m.load_state_dict(probe.seen[1])
    m.net[1].momentum = 1.0
    with torch.no_grad():
        m.train()(torch.cat([b[0] for b in list(loader())[:2]]))
    torch.testing.assert_close(probe.seen[1]["net.1.running_var"], m.net[1].running_var)
    assert not torch.equal(probe.seen[1]["net.1.running_var"], rec_running_var(rec, model))


def rec_running_var(rec: Recorder, model: Module) -> torch.Tensor:
    return model.net[1].running_var  # the final (also recomputed) statistics differ from epoch 1's


class CountValidationEnd(pl.Callback):
    def __init__(self) -> None:
        self.calls = 0

    def on_validation_end(self, trainer, pl_module):
        self.calls += 1


def test_eval_with_both_logs_averaged_metrics_under_a_prefix() -> None:
    probe, counter = Probe(), CountValidationEnd()
    cb = EMA(smoothing=0.5, eval_with="both")
    model = Module(bn=False)
    trainer = make_trainer(callbacks=[cb, probe, counter], max_epochs=2)
    trainer.fit(model, train_dataloaders=loader(), val_dataloaders=loader(seed=1))
    assert counter.calls == 2  # other callbacks see each validation once
    metrics = trainer.callback_metrics
    assert {"val_loss", "ema/val_loss"} <= set(metrics)
    # the last validation's two passes, computed independently
    x, y = dataset(seed=1).tensors
    ref = Module(bn=False)
    with torch.no_grad():
        ref.load_state_dict(probe.seen[-1])  # training weights (the second pass)
        train_loss = nn.functional.cross_entropy(ref(x), y)
        ref.load_state_dict(cb.policy.export_state_dict())
        avg_loss = nn.functional.cross_entropy(ref(x), y)
    torch.testing.assert_close(metrics["val_loss"], train_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(metrics["ema/val_loss"], avg_loss, rtol=1e-5, atol=1e-6)
    assert not math.isclose(float(train_loss), float(avg_loss))


# ----------------------------------------------------------------------------- checkpoints & resume


class SaveAt(pl.Callback):
    """Save a checkpoint after `step` optimizer steps (from on_train_batch_end, like ModelCheckpoint)."""

    def __init__(self, step: int, path) -> None:
        self.step, self.path = step, path

    def on_train_batch_end(self, trainer, pl_module, *args):
        if trainer.global_step == self.step:
            trainer.save_checkpoint(self.path)


class ResumableBatches:
    """The dataset's batches in order; resumes mid-epoch (Lightning saves/loads its position)."""

    def __init__(self) -> None:
        x, y = dataset().tensors
        self.batches = [(x[i:i + 8], y[i:i + 8]) for i in range(0, len(x), 8)]
        self.pos = self.skip = 0

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        start, self.skip = self.skip, 0
        for i in range(start, len(self.batches)):
            self.pos = i + 1
            yield self.batches[i]
        self.pos = 0

    def state_dict(self) -> dict:
        return {"pos": self.pos % len(self.batches)}  # after the last batch: the next epoch

    def load_state_dict(self, state: dict) -> None:
        self.skip = state["pos"]


def _fit(make_cb, epochs: int, ckpt=None, save=None, train=None):
    torch.manual_seed(0)
    model = Module()
    cb = make_cb()
    callbacks = [cb] + ([save] if save is not None else [])
    trainer = make_trainer(callbacks=callbacks, max_epochs=epochs)
    trainer.fit(model, train_dataloaders=train if train is not None else loader(),
                val_dataloaders=loader(seed=1), ckpt_path=ckpt)
    return model, cb


RESUME = {
    "before-swa": lambda: StochasticWeightAveraging(swa_lrs=0.05, swa_epoch_start=3, annealing_epochs=1,
                                                    bn_batches=2, bn_data=loader()),
    "during-swa": lambda: StochasticWeightAveraging(swa_lrs=0.05, swa_epoch_start=2, annealing_epochs=2,
                                                    bn_batches=2, bn_data=loader()),
    "during-ema": lambda: EMA(half_life="3ba", update_interval=2),
}


@pytest.mark.parametrize("case", list(RESUME))
def test_resume_from_checkpoint_is_bit_identical(case: str, tmp_path) -> None:
    # interrupted at epoch ends (any dataloader) and mid-epoch (a resumable dataloader)
    make = RESUME[case]
    full, full_cb = _fit(make, 4, train=ResumableBatches())
    for stop in (4, 6, 9, 12):
        path = tmp_path / f"at{stop}.ckpt"
        _fit(make, 4, save=SaveAt(stop, path), train=ResumableBatches())
        ck = torch.load(path, weights_only=False)
        assert ("current_model_state" in ck) == (stop >= {"before-swa": 12, "during-swa": 8, "during-ema": 1}[case])
        if "current_model_state" in ck and case != "before-swa":  # averaged in state_dict, training aside
            averaged = ck["state_dict"]["net.0.weight"]
            assert not torch.equal(averaged, ck["current_model_state"]["net.0.weight"])
        resumed, cb = _fit(make, 4, ckpt=str(path), train=ResumableBatches())
        for k, v in full.state_dict().items():
            assert torch.equal(v, resumed.state_dict()[k]), (stop, k)
        assert cb.policy.num_updates == full_cb.policy.num_updates
    # a plain DataLoader resumes exactly from epoch-end checkpoints
    full, _ = _fit(make, 4)
    _fit(make, 4, save=SaveAt(8, tmp_path / "plain.ckpt"))
    resumed, _ = _fit(make, 4, ckpt=str(tmp_path / "plain.ckpt"))
    assert all(torch.equal(v, resumed.state_dict()[k]) for k, v in full.state_dict().items())


def test_checkpoint_loads_averaged_weights_for_inference(tmp_path) -> None:
    path = tmp_path / "end.ckpt"
    model, cb = _fit(lambda: SWA(swa_start="1ep", bn_batches=2), 2, save=SaveAt(2 * N_BATCHES, path))
    loaded = Module.load_from_checkpoint(path)
    exported = cb.policy.averager.export_state_dict(model)
    for k, v in loaded.state_dict().items():
        if v.is_floating_point() and "running" not in k:
            torch.testing.assert_close(v, exported[k], msg=k)


def test_should_update_override_on_the_callback() -> None:
    rec = Recorder()

    class EveryOtherStep(WeightAveraging):
        def should_update(self, step_idx=None, epoch_idx=None):
            return step_idx is not None and step_idx % 2 == 1

    cb = EveryOtherStep(wa.SWA(swa_start=0, bn_batches=1))
    make_trainer(callbacks=[cb, rec], max_epochs=1).fit(Module(), train_dataloaders=loader())
    assert_params_close(cb.policy.averager.averaged_tensors(), mean_of([rec.steps[1], rec.steps[3]]))


def test_a_second_fit_with_the_same_callback_starts_fresh() -> None:
    cb = SWA(swa_start=0, update_interval="1ep", bn_batches=1)
    for _ in range(2):
        make_trainer(callbacks=[cb], max_epochs=1).fit(Module(), train_dataloaders=loader())
        assert cb.policy.epochs == 1 and cb.policy.num_updates == 1
