"""weightavg.transformers on a real Hugging Face Trainer (CPU, tiny models, a few steps, no downloads)."""

from __future__ import annotations

import copy
import logging
import math
import os
import warnings

import pytest
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from safetensors.torch import load_file  # noqa: E402
from transformers import (  # noqa: E402
    PreTrainedModel,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

import weightavg as wa  # noqa: E402

PreTrainedConfig = getattr(transformers, "PreTrainedConfig", None) or transformers.PretrainedConfig  # 4.x name
from weightavg.transformers import (  # noqa: E402
    EMA,
    STATE_NAME,
    SWA,
    WeightAveraging,
    WeightAveragingTrainer,
)

from ..reference import ema_closed_form, mean_of  # noqa: E402

transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()
logging.getLogger("accelerate").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", ".*torch.amp.GradScaler.*")

N_TRAIN, BATCH = 32, 4  # 8 micro-batches per epoch; with gradient_accumulation_steps=2: 4 optimizer steps


class TinyConfig(PreTrainedConfig):
    model_type = "weightavg-tiny"

    def __init__(self, n_in: int = 6, hidden: int = 8, n_out: int = 2, bn: bool = True, **kwargs) -> None:
        self.n_in, self.hidden, self.n_out, self.bn = n_in, hidden, n_out, bn
        super().__init__(**kwargs)


class Tiny(PreTrainedModel):
    """Linear -> BatchNorm (optional) -> ReLU -> Linear, cross-entropy loss."""

    config_class = TinyConfig

    def __init__(self, config: TinyConfig) -> None:
        super().__init__(config)
        self.fc1 = nn.Linear(config.n_in, config.hidden)
        self.norm = nn.BatchNorm1d(config.hidden) if config.bn else nn.Identity()
        self.fc2 = nn.Linear(config.hidden, config.n_out)
        self.poison = False  # multiply the loss by inf (an overflow for AMP's GradScaler)
        self.post_init()

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> dict:
        logits = self.fc2(torch.relu(self.norm(self.fc1(x))))
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        if loss is not None and self.poison:
            loss = loss * math.inf
        return {"loss": loss, "logits": logits}


class Data(torch.utils.data.Dataset):
    def __init__(self, n: int = N_TRAIN, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 6, generator=g)
        self.y = torch.randint(0, 2, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        return {"x": self.x[i], "labels": self.y[i]}


class Stream(torch.utils.data.IterableDataset):
    def __iter__(self):
        yield from Data()


def make_trainer(out, callbacks, *, bn: bool = True, trainer_cls=WeightAveragingTrainer, train=None,
                 **overrides) -> Trainer:
    torch.manual_seed(0)
    args = dict(output_dir=str(out), use_cpu=True, report_to=[], disable_tqdm=True, seed=0,
                max_steps=12, per_device_train_batch_size=BATCH, per_device_eval_batch_size=16,
                gradient_accumulation_steps=2, learning_rate=0.05, save_strategy="no", logging_strategy="no",
                eval_strategy="no")
    args.update(overrides)
    return trainer_cls(model=Tiny(TinyConfig(bn=bn)), args=TrainingArguments(**args),
                       train_dataset=Data() if train is None else train, eval_dataset=Data(16, seed=1),
                       callbacks=callbacks)


class Recorder(TrainerCallback):
    """The model's state after every optimizer step; the metrics each on_evaluate saw."""

    def __init__(self) -> None:
        self.snaps: list[dict[str, torch.Tensor]] = []
        self.evaluations: list[tuple[int, dict]] = []

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.snaps.append({k: v.detach().clone() for k, v in model.state_dict().items()})

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        self.evaluations.append((state.global_step, dict(metrics)))


class StopAt(TrainerCallback):
    """Interrupt training after optimizer step ``step`` (after its checkpoint is written)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


class Poison(TrainerCallback):
    """Make the loss infinite at the given optimizer steps (0-based global_step at their start)."""

    def __init__(self, steps: set[int]) -> None:
        self.steps = steps

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        model.poison = state.global_step in self.steps


PARAMS = ["fc1.weight", "fc1.bias", "norm.weight", "norm.bias", "fc2.weight", "fc2.bias"]


def params_of(state: dict, bn: bool = True) -> dict:
    return {k: state[k] for k in PARAMS if bn or not k.startswith("norm.")}


def assert_close(got: dict, ref: dict, tol: float = 1e-6) -> None:
    for k, v in ref.items():
        torch.testing.assert_close(got[k].double(), v.double(), rtol=tol, atol=tol, msg=k)


def swa_reference(snaps: list[dict], bn: bool) -> dict:
    """torch.optim.swa_utils.AveragedModel over the snapshots (parameters)."""
    model = Tiny(TinyConfig(bn=bn))
    swa = AveragedModel(model)
    for s in snaps:
        model.load_state_dict(s)
        swa.update_parameters(model)
    return params_of(swa.module.state_dict(), bn)


def by_hand_loss(state: dict, x: torch.Tensor, y: torch.Tensor, *, bn_from: torch.Tensor | None = None) -> float:
    """Cross-entropy of the tiny model, in float64 from the state's tensors; BatchNorm statistics
    from ``state`` or, with ``bn_from``, recomputed as the mean / unbiased variance over those inputs."""
    s = {k: v.double() for k, v in state.items()}
    h = x.double() @ s["fc1.weight"].T + s["fc1.bias"]
    if bn_from is not None:
        hb = bn_from.double() @ s["fc1.weight"].T + s["fc1.bias"]
        mean, var = hb.mean(0), hb.var(0, unbiased=True)
    else:
        mean, var = s["norm.running_mean"], s["norm.running_var"]
    h = (h - mean) / torch.sqrt(var + 1e-5) * s["norm.weight"] + s["norm.bias"]
    logits = torch.relu(h) @ s["fc2.weight"].T + s["fc2.bias"]
    return float(nn.functional.cross_entropy(logits, y))


# ----------------------------------------------------------------------------- counting optimizer steps


@pytest.mark.parametrize("kind", ["ema", "swa"])
def test_one_update_per_optimizer_step_under_gradient_accumulation(tmp_path, kind) -> None:
    rec = Recorder()
    cb = EMA(smoothing=0.8) if kind == "ema" else SWA(swa_start=4, update_interval=1)
    trainer = make_trainer(tmp_path, [cb, rec], bn=False, max_steps=10)
    trainer.train()
    assert trainer.state.global_step == 10 and len(rec.snaps) == 10  # 20 micro-batches
    assert cb.policy.steps == 10
    if kind == "ema":
        assert cb.policy.num_updates == 10
        ref = ema_closed_form([params_of(s, bn=False) for s in rec.snaps], 0.8)
    else:
        assert cb.policy.num_updates == 6  # steps 5 ... 10
        ref = swa_reference(rec.snaps[4:], bn=False)
    # final="averaged": the trained model holds the average
    assert_close(trainer.model.state_dict(), ref)
    assert not torch.equal(trainer.model.fc1.weight, rec.snaps[-1]["fc1.weight"])


@pytest.mark.parametrize("optim", ["adamw_torch_fused", "adamw_torch"])
def test_steps_skipped_by_the_grad_scaler_are_not_counted(tmp_path, optim) -> None:
    # The Trainer's AcceleratedOptimizer with a GradScaler, as under fp16 on a GPU: an overflow
    # skips the step (the fused optimizer is called and skips inside; the other is not called).
    rec = Recorder()
    cb = EMA(smoothing=0.5)
    trainer = make_trainer(tmp_path, [cb, rec, Poison({2, 5})], bn=False, max_steps=8, optim=optim)
    trainer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=1.0, growth_interval=1000)
    trainer.train()
    assert trainer.optimizer.scaler is trainer.accelerator.scaler
    assert trainer.state.global_step == 8
    assert torch.equal(rec.snaps[2]["fc1.weight"], rec.snaps[1]["fc1.weight"])  # really skipped
    assert cb.policy.steps == 6 and cb.policy.num_updates == 6
    kept = [params_of(s, bn=False) for i, s in enumerate(rec.snaps) if i not in (2, 5)]
    assert_close(trainer.model.state_dict(), ema_closed_form(kept, 0.5))


@pytest.mark.parametrize("dataset", ["sized", "iterable"])
def test_epochs_end_after_each_full_pass_not_at_a_stop(tmp_path, dataset) -> None:
    # 4 optimizer steps per pass over the data; max_steps=10 stops the third pass after 2 steps
    rec = Recorder()
    cb = SWA(swa_start=0, update_interval="1ep", final="training")
    trainer = make_trainer(tmp_path, [cb, rec], bn=False, max_steps=10,
                           train=Data() if dataset == "sized" else Stream())
    trainer.train()
    assert trainer.state.global_step == 10
    assert cb.policy.epochs == 2 and cb.policy.num_updates == 2
    assert_close(cb.policy.export_state_dict(), mean_of([params_of(rec.snaps[i], bn=False) for i in (3, 7)]))


def test_hooks_sit_on_the_real_torch_optimizer(tmp_path) -> None:
    cb = EMA(smoothing=0.5, final="training")
    trainer = make_trainer(tmp_path, [cb, StopAt(1)], bn=False)
    seen = []

    class Look(TrainerCallback):
        def on_step_end(self, args, state, control, optimizer=None, **kwargs):
            seen.append((type(optimizer).__name__, cb.policy._optimizers[0] is optimizer.optimizer))

    trainer.add_callback(Look())
    trainer.train()
    assert seen == [("AcceleratedOptimizer", True)]


# ----------------------------------------------------------------------------- saving


def test_saved_models_hold_the_averaged_weights_with_fresh_bn(tmp_path) -> None:
    rec = Recorder()
    data = Data()
    bn_data = [{"x": data.x, "labels": data.y}]  # one batch: statistics = mean / variance over it
    cb = SWA(swa_start=2, update_interval=1, bn_data=bn_data)
    trainer = make_trainer(tmp_path, [cb, rec], max_steps=8, save_strategy="steps", save_steps=4)
    trainer.train()

    # checkpoint-4: averaged weights of steps 3, 4 with BN statistics for them; training weights aside
    ckpt = tmp_path / "checkpoint-4"
    saved = load_file(str(ckpt / "model.safetensors"))
    avg4 = swa_reference(rec.snaps[2:4], bn=True)
    assert_close(saved, avg4)
    hb = data.x.double() @ avg4["fc1.weight"].double().T + avg4["fc1.bias"].double()
    assert_close(saved, {"norm.running_mean": hb.mean(0), "norm.running_var": hb.var(0)}, tol=1e-5)
    state = torch.load(ckpt / STATE_NAME, weights_only=True)
    for k, v in rec.snaps[3].items():  # the training weights after step 4, bit for bit
        assert torch.equal(state["training_weights"][k], v), k
    assert state["policies"]["swa"]["steps"] == 4

    # after training: trainer.save_model() -> from_pretrained gives the final average
    trainer.save_model(str(tmp_path / "final"))
    loaded = Tiny.from_pretrained(str(tmp_path / "final"))
    avg = swa_reference(rec.snaps[2:], bn=True)
    assert_close(loaded.state_dict(), avg)
    hb = data.x.double() @ avg["fc1.weight"].double().T + avg["fc1.bias"].double()
    assert_close(loaded.state_dict(), {"norm.running_mean": hb.mean(0), "norm.running_var": hb.var(0)}, tol=1e-5)
    for k, v in trainer.model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


def test_gpt2_from_config_saves_its_ema_with_tied_weights(tmp_path) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=32, n_positions=8, n_embd=8, n_layer=1, n_head=2, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config)
    assert model.lm_head.weight is model.transformer.wte.weight
    ids = torch.randint(0, 32, (16, 8), generator=torch.Generator().manual_seed(0))
    train = [{"input_ids": r, "labels": r} for r in ids]
    rec = Recorder()
    cb = EMA(half_life=2)  # decay 2^(-1/2) per step
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], disable_tqdm=True, seed=0,
                             max_steps=6, per_device_train_batch_size=4, gradient_accumulation_steps=2,
                             learning_rate=0.01, save_strategy="no", logging_strategy="no")
    trainer = WeightAveragingTrainer(model=model, args=args, train_dataset=train, callbacks=[cb, rec])
    trainer.train()
    assert cb.policy.num_updates == 6
    trainer.save_model(str(tmp_path / "ema"))
    loaded = GPT2LMHeadModel.from_pretrained(str(tmp_path / "ema"))
    names = [n for n, _ in model.named_parameters()]
    ref = ema_closed_form([{n: s[n] for n in names} for s in rec.snaps], 2 ** -0.5)
    assert_close(dict(loaded.named_parameters()), ref, tol=1e-5)
    assert loaded.lm_head.weight is loaded.transformer.wte.weight


# ----------------------------------------------------------------------------- evaluation


@pytest.mark.parametrize("eval_with", ["averaged", "training", "both"])
def test_evaluation_sees_what_eval_with_chooses(tmp_path, eval_with) -> None:
    rec = Recorder()
    data, val = Data(), Data(16, seed=1)
    cb = SWA(swa_start=2, update_interval=1, eval_with=eval_with, bn_data=[{"x": data.x, "labels": data.y}])
    trainer = make_trainer(tmp_path, [cb, rec], max_steps=4, eval_strategy="steps", eval_steps=2)
    trainer.train()
    assert [step for step, _ in rec.evaluations] == [2, 4]  # on_evaluate once per evaluation
    (_, first), (_, second) = rec.evaluations
    training = by_hand_loss(rec.snaps[3], val.x, val.y)
    averaged = by_hand_loss(swa_reference(rec.snaps[2:4], bn=True), val.x, val.y, bn_from=data.x)
    assert training != pytest.approx(averaged, rel=1e-3)
    # step 2: nothing averaged yet, the training weights in every mode
    assert first["eval_loss"] == pytest.approx(by_hand_loss(rec.snaps[1], val.x, val.y), rel=1e-5)
    if eval_with == "both":  # the averaged model is the training model until an average exists
        assert first["eval_swa_loss"] == first["eval_loss"]
    else:
        assert "eval_swa_loss" not in first
    if eval_with == "averaged":
        assert second["eval_loss"] == pytest.approx(averaged, rel=1e-5)
        assert "eval_swa_loss" not in second
    elif eval_with == "training":
        assert second["eval_loss"] == pytest.approx(training, rel=1e-5)
        assert "eval_swa_loss" not in second
    else:
        assert second["eval_loss"] == pytest.approx(training, rel=1e-5)
        assert second["eval_swa_loss"] == pytest.approx(averaged, rel=1e-5)
        logged = [h for h in trainer.state.log_history if "eval_swa_loss" in h]
        assert [h["step"] for h in logged] == [2, 4]


def test_best_model_on_the_averaged_metric_from_the_first_evaluation(tmp_path) -> None:
    # the usual swa_start="0.75dur": evaluations at steps 2..8 come before the first snapshot
    rec = Recorder()
    cb = SWA(swa_start="0.75dur", update_interval=1, eval_with="both", final="training", bn_batches=2)
    trainer = make_trainer(tmp_path, [cb, rec], max_steps=12, eval_strategy="steps", eval_steps=2,
                           save_strategy="steps", save_steps=2, metric_for_best_model="eval_swa_loss",
                           greater_is_better=False, load_best_model_at_end=True)
    trainer.train()
    assert [step for step, _ in rec.evaluations] == [2, 4, 6, 8, 10, 12]
    for step, metrics in rec.evaluations:
        assert ("eval_swa_loss" in metrics) and (metrics["eval_swa_loss"] == metrics["eval_loss"]) == (step <= 8)
    best = min(rec.evaluations, key=lambda e: e[1]["eval_swa_loss"])
    assert trainer.state.best_metric == best[1]["eval_swa_loss"]


def test_evaluation_and_saving_leave_the_training_weights_alone(tmp_path) -> None:
    rec = Recorder()
    seen = []

    class NextStep(TrainerCallback):
        def on_step_begin(self, args, state, control, model=None, **kwargs):
            if state.global_step == 3:  # after step 3's evaluation and checkpoint
                seen.append({k: v.detach().clone() for k, v in model.state_dict().items()})

    cb = SWA(swa_start=1, update_interval=1, eval_with="both")
    trainer = make_trainer(tmp_path, [cb, rec, NextStep()], max_steps=4, eval_strategy="steps", eval_steps=1,
                           save_strategy="steps", save_steps=1)
    trainer.train()
    assert len(seen) == 1 and cb.policy.num_updates == 3
    for k, v in rec.snaps[2].items():
        assert torch.equal(seen[0][k], v), k


# ----------------------------------------------------------------------------- exact resume


CONFIGS = {
    "swa": lambda: SWA(swa_start=5, update_interval=1, eval_with="both"),
    "swa-epochs": lambda: SWA(swa_start="1ep", update_interval="1ep"),
    "ema": lambda: EMA(half_life=3, ema_start=2, eval_with="both"),
}


def run_to_end(out, config: str, *extra, resume=None, save="steps") -> tuple[Trainer, WeightAveraging]:
    cb = CONFIGS[config]()
    trainer = make_trainer(out, [cb, *extra], max_steps=12, save_strategy=save, save_steps=2,
                           eval_strategy="steps", eval_steps=2)
    trainer.train(resume_from_checkpoint=resume)
    return trainer, cb


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict:
    runs = {}
    for config in CONFIGS:
        trainer, cb = run_to_end(tmp_path_factory.mktemp(config), config)
        runs[config] = (trainer, cb)
    return runs


def eval_history(trainer: Trainer) -> dict:
    return {(h["step"], k): v for h in trainer.state.log_history for k, v in h.items()
            if k in ("eval_loss", "eval_swa_loss", "eval_ema_loss")}


@pytest.mark.parametrize(("config", "stop", "save"), [
    pytest.param("swa", 4, "steps", id="swa-before-the-window"),
    pytest.param("swa", 8, "steps", id="swa-inside-the-window-at-an-epoch-end"),
    pytest.param("swa-epochs", 6, "steps", id="swa-per-epoch-mid-epoch"),
    pytest.param("swa-epochs", 8, "steps", id="swa-per-epoch-at-an-epoch-end"),
    pytest.param("swa-epochs", 10, "epoch", id="swa-per-epoch-saved-after-a-stopped-epoch"),
    pytest.param("ema", 6, "steps", id="ema-inside-the-window"),
])
def test_resume_from_a_checkpoint_is_bit_identical(tmp_path, uninterrupted, config, stop, save) -> None:
    full, full_cb = uninterrupted[config]
    stopped, _ = run_to_end(tmp_path, config, StopAt(stop), save=save)  # "epoch": saved after on_epoch_end
    assert stopped.state.global_step == stop
    resume = True if stop == 8 else str(tmp_path / f"checkpoint-{stop}")  # True: the latest checkpoint
    resumed, cb = run_to_end(tmp_path, config, resume=resume)
    assert resumed.state.global_step == 12
    assert (cb.policy.steps, cb.policy.epochs, cb.policy.num_updates) == \
        (full_cb.policy.steps, full_cb.policy.epochs, full_cb.policy.num_updates)
    assert cb.policy.num_updates > 0
    # the final model (averaged weights, BatchNorm refreshed) and the averages themselves
    want, got = full.model.state_dict(), resumed.model.state_dict()
    for k in want:
        assert torch.equal(got[k], want[k]), k
    a, b = full_cb.policy.averager.averaged_tensors(), cb.policy.averager.averaged_tensors()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # evaluations after the interruption saw the same weights
    later = {key: v for key, v in eval_history(full).items() if key[0] > stop}
    assert later and {key: v for key, v in eval_history(resumed).items() if key[0] > stop} == later


def test_resume_from_a_checkpoint_without_weightavg_state_fails(tmp_path) -> None:
    plain = make_trainer(tmp_path, [], trainer_cls=Trainer, max_steps=2, save_strategy="steps", save_steps=2)
    plain.train()
    trainer = make_trainer(tmp_path, [SWA(swa_start=1, update_interval=1)], max_steps=4)
    with pytest.raises(wa.StateError, match=STATE_NAME):
        trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))


def test_a_second_train_call_starts_afresh(tmp_path) -> None:
    cb = EMA(smoothing=0.5, final="training")
    trainer = make_trainer(tmp_path, [cb], bn=False, max_steps=3)
    trainer.train()
    assert (cb.policy.steps, cb.policy.num_updates) == (3, 3)
    trainer.train()
    assert (cb.policy.steps, cb.policy.num_updates) == (3, 3)


# ----------------------------------------------------------------------------- bad configuration


def test_a_plain_trainer_is_refused_at_train_start(tmp_path) -> None:
    trainer = make_trainer(tmp_path, [SWA(swa_start=1)], trainer_cls=Trainer)
    before = copy.deepcopy(trainer.model.state_dict())
    with pytest.raises(wa.ConfigError, match="WeightAveragingTrainer"):
        trainer.train()
    assert trainer.state.global_step == 0
    assert all(torch.equal(v, before[k]) for k, v in trainer.model.state_dict().items())


def test_bad_configuration_errors(tmp_path) -> None:
    with pytest.raises(wa.ConfigError, match="policy="):
        WeightAveraging("swa")
    with pytest.raises(wa.ConfigError, match="swa_start"):
        SWA(swa_start="soon")
    # two callbacks with one name: their checkpoint states would collide
    with pytest.raises(wa.ConfigError, match="name='ema'"):
        make_trainer(tmp_path, [EMA(), EMA(final="training", eval_with="training")])
    # the final average would overwrite the best checkpoint's weights
    with pytest.raises(wa.ConfigError, match="load_best_model_at_end"):
        make_trainer(tmp_path, [SWA()], load_best_model_at_end=True, eval_strategy="steps",
                     save_strategy="steps", eval_steps=2, save_steps=2)
    make_trainer(tmp_path, [SWA(final="training")], load_best_model_at_end=True, eval_strategy="steps",
                 save_strategy="steps", eval_steps=2, save_steps=2)


def test_times_the_loop_cannot_count_fail_at_train_start(tmp_path) -> None:
    # an iterable dataset has no epoch length: a fractional epoch cannot be placed
    trainer = make_trainer(tmp_path, [SWA(swa_start="0.5ep")], train=Stream())
    with pytest.raises(wa.ConfigError, match=r"swa_start='0.5ep'"):
        trainer.train()
    assert trainer.state.global_step == 0
    # two policies writing averaged weights into one model
    trainer = make_trainer(tmp_path, [SWA(swa_start=1), EMA()])
    with pytest.raises(wa.ConfigError, match="two policies write averaged weights"):
        trainer.train()
    trainer = make_trainer(tmp_path, [SWA(swa_start=1, update_interval=1),
                                      EMA(eval_with="training", final="training")], max_steps=3)
    trainer.train()
    assert os.path.isdir(tmp_path)


def test_the_mixin_on_another_trainer_class(tmp_path) -> None:
    from transformers import Seq2SeqTrainer, Seq2SeqTrainingArguments

    from weightavg.transformers import WeightAveragingMixin

    class MyTrainer(WeightAveragingMixin, Seq2SeqTrainer):
        pass

    cb = SWA(swa_start=1, update_interval=1, eval_with="both")
    args = Seq2SeqTrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], disable_tqdm=True,
                                    max_steps=2, per_device_train_batch_size=BATCH, eval_strategy="steps",
                                    eval_steps=2, save_strategy="no", logging_strategy="no")
    trainer = MyTrainer(model=Tiny(TinyConfig()), args=args, train_dataset=Data(), eval_dataset=Data(16, 1),
                        callbacks=[cb])
    trainer.train()
    logged = set().union(*trainer.state.log_history)
    assert {"eval_loss", "eval_swa_loss"} <= logged and cb.policy.num_updates == 1
