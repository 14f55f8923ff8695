"""weightavg.transformers under DDP: a real Trainer in two gloo processes (CPU, 127.0.0.1).

A hang (a collective that only some ranks join) fails the test after a timeout instead of
blocking the suite.
"""

from __future__ import annotations

import os
import time

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from .test_engine_all_reduce import _free_port

pytestmark = [pytest.mark.distributed, pytest.mark.slow]
TIMEOUT_S = int(os.environ.get("WEIGHTAVG_TEST_HANG_TIMEOUT", "240"))


def _worker(rank: int, world: int, port: int, out: str, mode: str) -> None:
    import transformers
    from transformers import PreTrainedModel, TrainerCallback, TrainingArguments

    from weightavg.transformers import EMA, SWA, WeightAveragingTrainer

    Config = getattr(transformers, "PreTrainedConfig", None) or transformers.PretrainedConfig  # 4.x name

    class TinyConfig(Config):  # type: ignore[misc, valid-type]
        model_type = "weightavg-tiny-ddp"

    class Tiny(PreTrainedModel):
        config_class = TinyConfig

        def __init__(self, config: TinyConfig) -> None:
            super().__init__(config)
            self.fc1, self.norm, self.fc2 = nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Linear(8, 2)
            self.post_init()

        def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> dict:
            logits = self.fc2(torch.relu(self.norm(self.fc1(x))))
            return {"loss": nn.functional.cross_entropy(logits, labels), "logits": logits}

    class Data(torch.utils.data.Dataset):
        def __init__(self) -> None:
            g = torch.Generator().manual_seed(0)
            self.x, self.y = torch.randn(64, 6, generator=g) * 3 + 1, torch.randint(0, 2, (64,), generator=g)

        def __len__(self) -> int:
            return 64

        def __getitem__(self, i: int) -> dict:
            return {"x": self.x[i], "labels": self.y[i]}

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world))
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    policy = (SWA(swa_start=2, update_interval="2ba", bn_batches=2) if mode != "ema"
              else EMA(smoothing=0.5))
    args = TrainingArguments(os.path.join(out, "run"), max_steps=12, per_device_train_batch_size=4,
                             save_strategy="steps", save_steps=6, use_cpu=True, ddp_backend="gloo",
                             report_to=[], logging_steps=100, disable_tqdm=True, seed=0,
                             dataloader_num_workers=0)
    holder: dict = {}

    class RankZeroSave(TrainerCallback):
        """_save on the saving rank only (as transformers 4.x's save_model does), right after an update."""

        def on_step_end(self, args, state, control, **kwargs):
            if mode == "rank0_save" and state.global_step == 8 and args.process_index == 0:
                holder["trainer"]._save(os.path.join(out, "rank0"))

    trainer = WeightAveragingTrainer(model=Tiny(TinyConfig()), args=args, train_dataset=Data(),
                                     callbacks=[policy, RankZeroSave()])
    holder["trainer"] = trainer
    trainer.train()
    torch.save({k: v.clone() for k, v in trainer.model.state_dict().items()}, os.path.join(out, f"final{rank}.pt"))


def _run(tmp_path, mode: str) -> None:
    ctx = mp.start_processes(_worker, args=(2, _free_port(), str(tmp_path), mode), nprocs=2, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + TIMEOUT_S
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            pytest.fail(f"the 2-rank Trainer run ({mode}) did not finish in {TIMEOUT_S} s: a collective "
                        "that only some ranks joined")


def test_trainer_ddp_saves_without_deadlock_and_ranks_agree(tmp_path) -> None:
    # checkpoints at steps 6 and 12 (save_model on every rank, _save on the saving one), plus a
    # _save on rank 0 alone right after an update (BatchNorm statistics stale)
    _run(tmp_path, "rank0_save")
    r0 = torch.load(tmp_path / "final0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "final1.pt", weights_only=True)
    for k, v in r0.items():  # the final model (averaged weights, pooled or rank-averaged BN) agrees
        assert torch.equal(v, r1[k]), k
    assert (tmp_path / "run" / "checkpoint-6" / "weightavg_state.pt").is_file()
    assert (tmp_path / "run" / "checkpoint-12" / "weightavg_state.pt").is_file()
    assert (tmp_path / "rank0" / "model.safetensors").is_file()
