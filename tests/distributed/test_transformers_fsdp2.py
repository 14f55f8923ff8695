"""weightavg.transformers with FSDP2 through accelerate, on 2 gloo CPU processes: each rank averages
its shards, checkpoints keep them in ``weightavg_dcp/`` (every rank writes its own), and a resume
inside the averaging window ends with the averages of an uninterrupted run.

accelerate (1.15) enables FSDP only for accelerator device types: on CPU (``use_cpu=True``, its
``MULTI_CPU`` state) it drops the FSDP plugin silently and trains with DDP. The test therefore sets
the Trainer's accelerator state to FSDP (``_force_fsdp2``) right after constructing the Trainer;
from there on, accelerate's own FSDP2 path (``fully_shard`` of the GPT-2 blocks, ``save_fsdp_model``,
``load_fsdp_model``) runs unchanged on CPU.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch.distributed.tensor import DTensor

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin  # noqa: E402

# accelerate's FSDP2 (``fsdp_version=2``) exists from accelerate 1.6; at the declared floor (1.4) the
# Trainer can only run FSDP1, which the refusal test below covers
_HAS_FSDP2 = "fsdp_version" in getattr(FullyShardedDataParallelPlugin, "__dataclass_fields__", {})
needs_fsdp2 = pytest.mark.skipif(not _HAS_FSDP2, reason="this accelerate has no FSDP2 (fsdp_version needs >= 1.6)")
from safetensors.torch import load_file  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel, TrainingArguments  # noqa: E402

from weightavg import ConfigError  # noqa: E402
from weightavg.cli._main import main  # noqa: E402
from weightavg.transformers import EMA, SHARDED_NAME, STATE_NAME, WeightAveragingTrainer  # noqa: E402

from ._harness import run_ranks  # noqa: E402

pytestmark = [pytest.mark.distributed, pytest.mark.filterwarnings("ignore::UserWarning"),
              pytest.mark.filterwarnings("ignore::FutureWarning")]

STEPS, SAVE_AT = 6, 3


class Data(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 16

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = torch.randint(0, 65, (8,), generator=torch.Generator().manual_seed(i))
        return {"input_ids": ids, "labels": ids}


def _model() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    # vocab 65 over 2 ranks: uneven shards of the embedding; no dropout (deterministic steps)
    cfg = GPT2Config(vocab_size=65, n_positions=16, n_embd=6, n_layer=2, n_head=2, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(cfg)


def _args(out: str, **kw: Any) -> TrainingArguments:
    return TrainingArguments(
        out, max_steps=STEPS, per_device_train_batch_size=2, save_strategy="steps", save_steps=SAVE_AT,
        eval_strategy="steps", eval_steps=2, per_device_eval_batch_size=2,
        use_cpu=True, ddp_backend="gloo", report_to=[], disable_tqdm=True, seed=0, logging_steps=100,
        fsdp="full_shard auto_wrap",
        fsdp_config={"version": 2, "transformer_layer_cls_to_wrap": ["GPT2Block"],
                     "reshard_after_forward": True, "state_dict_type": "SHARDED_STATE_DICT"}, **kw)


def _force_fsdp2(trainer: Any, args: TrainingArguments) -> None:
    """What accelerate would do on an accelerator: its state says FSDP, with the FSDP2 plugin."""
    state = trainer.accelerator.state
    state.distributed_type = DistributedType.FSDP
    state.fsdp_plugin = FullyShardedDataParallelPlugin(**args.fsdp_plugin_args)
    trainer.is_fsdp_enabled = True


def _full(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {n: t.full_tensor() if isinstance(t, DTensor) else t.clone() for n, t in tensors.items()}


def _train(rank: int, world: int, out: str, resume: str | None) -> dict[str, Any]:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT="1")  # the process group exists already
    transformers.logging.set_verbosity_error()
    args = _args(out)
    ema = EMA(smoothing=0.8)
    losses: list[float] = []
    saved: dict[str, torch.Tensor] = {}

    class Record(transformers.TrainerCallback):
        def on_evaluate(self, args: Any, state: Any, control: Any, metrics: dict[str, float], **kw: Any) -> None:
            losses.append(metrics["eval_loss"])

        def on_save(self, args: Any, state: Any, control: Any, **kw: Any) -> None:  # every rank
            if state.global_step == SAVE_AT and ema.policy.averager is not None:
                saved.update(_full(ema.policy.averager.averaged_tensors()))

    trainer = WeightAveragingTrainer(model=_model(), args=args, train_dataset=Data(), eval_dataset=Data(),
                                     callbacks=[ema, Record()])
    _force_fsdp2(trainer, args)
    trainer.train(resume_from_checkpoint=resume)
    avg = ema.policy.averager
    assert avg is not None
    return {"avg": _full(avg.averaged_tensors()), "model": _full(dict(trainer.model.named_parameters())),
            "eval_loss": losses[-1], "saved": saved, "updates": avg.num_updates, "steps": ema.policy.steps,
            "sharded": any(isinstance(t, DTensor) for t in avg.averaged_tensors().values())}


@needs_fsdp2
def test_fsdp2_trainer_resume_inside_the_window_equals_an_uninterrupted_run(tmp_path: Path) -> None:
    out = str(tmp_path / "run")
    straight = run_ranks(_train, 2, tmp_path / "a", out, None, timeout=240)
    ck = Path(out) / f"checkpoint-{SAVE_AT}"
    assert (ck / STATE_NAME).is_file() and (ck / SHARDED_NAME / ".metadata").is_file()
    assert not (ck / f"{SHARDED_NAME}.tmp").exists()
    resumed = run_ranks(_train, 2, tmp_path / "b", str(tmp_path / "run2"), str(ck), timeout=240)
    for a, b in zip(straight, resumed, strict=True):
        assert a["sharded"] and b["sharded"]
        assert a["eval_loss"] == b["eval_loss"]  # the last evaluation (averaged weights, swapped in shard-locally)
        assert a["steps"] == b["steps"] == STEPS and a["updates"] == b["updates"] == STEPS
        for n in a["avg"]:
            assert torch.equal(a["avg"][n], b["avg"][n]), n
        for n in a["model"]:  # final="averaged": the model holds the average at the end
            assert torch.equal(a["model"][n], b["model"][n]), n
    # the checkpoint's averages export to safetensors as full tensors, as they were when saved
    exported = tmp_path / "avg.safetensors"
    assert main(["export", str(ck / SHARDED_NAME), "-o", str(exported)]) == 0
    got = load_file(exported)
    assert got.keys() == straight[0]["saved"].keys()
    for n, t in straight[0]["saved"].items():
        assert torch.equal(got[n], t), n


def _trainer_with(tmp_path: Path, **state: Any) -> Any:
    trainer = WeightAveragingTrainer(model=torch.nn.Linear(2, 2), args=TrainingArguments(
        str(tmp_path), use_cpu=True, report_to=[]), callbacks=[EMA(smoothing=0.8)])
    trainer.accelerator = SimpleNamespace(state=SimpleNamespace(**state))
    return trainer


def test_fsdp1_is_refused_naming_the_fix(tmp_path: Path) -> None:
    trainer = _trainer_with(tmp_path, fsdp_plugin=SimpleNamespace(fsdp_version=1))
    trainer.is_fsdp_enabled = True
    with pytest.raises(ConfigError, match=r"FSDP1.*fsdp_config=\{'version': 2\}"):
        trainer._wa_check()


def test_deepspeed_zero3_is_refused_and_zero2_accepted(tmp_path: Path) -> None:
    trainer = _trainer_with(tmp_path, deepspeed_plugin=SimpleNamespace(zero_stage=3))
    trainer.is_deepspeed_enabled = True
    with pytest.raises(ConfigError, match=r"ZeRO stage 3.*stage 1 or 2"):
        trainer._wa_check()
    trainer.accelerator.state.deepspeed_plugin.zero_stage = 2
    trainer._wa_check()  # full parameters on every rank: averaged as without DeepSpeed
