"""WindowAverage and PostHocEMA driven by the Lightning and Hugging Face front ends."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import weightavg as wa
from weightavg import posthoc

pytest.importorskip("safetensors")
pytestmark = pytest.mark.filterwarnings("ignore:.*LeafSpec.*")


def test_lightning_window_eval_with_both(tmp_path) -> None:
    pytest.importorskip("lightning.pytorch")
    from weightavg.lightning import WeightAveraging

    from .test_lightning import Module, Recorder, dataset, loader, make_trainer

    rec = Recorder()
    cb = WeightAveraging(wa.WindowAverage(k=2, every="1ep", eval_with="both", recompute_bn=False))
    model = Module(bn=False)
    trainer = make_trainer(callbacks=[cb, rec], max_epochs=3)
    trainer.fit(model, train_dataloaders=loader(), val_dataloaders=loader(seed=1))
    metrics = trainer.callback_metrics
    assert {"val_loss", "window/val_loss"} <= set(metrics)
    # independent reference: the mean of the last two epoch-end weights
    ref = Module(bn=False)
    mean = {k: (rec.epochs[-1][k] + rec.epochs[-2][k]) / 2 for k in rec.epochs[-1]}
    ref.load_state_dict(mean)
    x, y = dataset(seed=1).tensors
    with torch.no_grad():
        avg_loss = nn.functional.cross_entropy(ref(x), y)
    torch.testing.assert_close(metrics["window/val_loss"], avg_loss, rtol=1e-5, atol=1e-6)
    assert not math.isclose(float(metrics["val_loss"]), float(avg_loss))
    for k, v in mean.items():  # final="averaged": the module holds the window average
        torch.testing.assert_close(dict(model.named_parameters())[k].detach(), v)


def test_lightning_posthoc_snapshots_every_epoch(tmp_path) -> None:
    pytest.importorskip("lightning.pytorch")
    from weightavg.lightning import WeightAveraging

    from .test_lightning import N_BATCHES, Module, loader, make_trainer

    cb = WeightAveraging(wa.PostHocEMA(tmp_path, snapshot_every="1ep", eval_with="both"))
    trainer = make_trainer(callbacks=[cb], max_epochs=3)
    trainer.fit(Module(), train_dataloaders=loader(), val_dataloaders=loader(seed=1))
    assert "posthoc_ema/val_loss" in trainer.callback_metrics
    man = posthoc.read_manifest(tmp_path)
    assert [s["step"] for s in man["snapshots"]] == [N_BATCHES * e for e in (1, 1, 2, 2, 3, 3)]
    res = posthoc.reconstruct(tmp_path, sigma_rel=0.07, warn=False)
    assert isinstance(res, posthoc.Reconstruction) and res.step == 3 * N_BATCHES


def test_hf_trainer_window_eval_with_both(tmp_path) -> None:
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from weightavg.transformers import WeightAveraging

    from .test_transformers import make_trainer

    cb = WeightAveraging(wa.WindowAverage(k=3, every=2, weights="minus-sqrt", eval_with="both",
                                          recompute_bn=False))
    trainer = make_trainer(tmp_path, [cb], bn=False, max_steps=12, eval_strategy="steps", eval_steps=4)
    trainer.train()
    keys = {k for h in trainer.state.log_history for k in h}
    assert {"eval_loss", "eval_window_loss"} <= keys
    assert cb.policy.num_updates == 6 and cb.policy.window_size == 3
