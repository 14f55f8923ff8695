"""Windowed averages along a run (LAWA, weighted windows): against a slow reference loop."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch
from torch import nn

import weightavg as wa
from weightavg._window import weighted_mean_rule, window_weights


def _model() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))


def _batch(i: int) -> torch.Tensor:
    return torch.randn(16, 4, generator=torch.Generator().manual_seed(1000 + i))


def _train(policy: wa.WindowAverage, model: nn.Module, steps: int, *, opt=None, start: int = 0,
           history: list[dict[str, torch.Tensor]] | None = None) -> torch.optim.Optimizer:
    opt = opt or torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    if policy.model is None:
        policy.begin(model, opt, bn_data=[_batch(-1)])
    for i in range(start, start + steps):
        x = _batch(i)
        (model(x) - x[:, :2]).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        if history is not None:
            history.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    return opt


def _reference(history: list[dict[str, torch.Tensor]], every: int, k: int, weights) -> dict[str, torch.Tensor]:
    """The slow loop: snapshots at steps every, 2·every, ...; weighted mean of the last k (float64)."""
    snaps = [history[t - 1] for t in range(every, len(history) + 1, every)][-k:]
    w = window_weights(weights, len(snaps))
    out = {}
    for n, t in snaps[0].items():
        if t.is_floating_point():
            out[n] = sum(wi * s[n].double() for wi, s in zip(w, snaps, strict=True)).float()
        else:
            out[n] = snaps[-1][n]
    return out


def test_window_weights() -> None:
    assert window_weights("uniform", 4) == [0.25] * 4
    assert window_weights("linear", 3) == pytest.approx([1 / 6, 2 / 6, 3 / 6])
    ms = window_weights("minus-sqrt", 4)
    # discrete differences of 1 - sqrt(x): tail sums are the cooldown's learning-rate factors
    for i in range(4):
        assert math.fsum(ms[i:]) == pytest.approx(1 - math.sqrt(i / 4))
    assert ms == sorted(ms, reverse=True)  # the oldest weighs most
    assert window_weights(lambda n: [0.0] * (n - 1) + [2.0], 3) == [0, 0, 1]
    for bad in ("cosine", lambda n: [1.0] * (n + 1), lambda n: [-1.0] * n):
        with pytest.raises(wa.ConfigError, match="weights"):
            window_weights(bad, 3)  # type: ignore[arg-type]


@pytest.mark.parametrize("weights", ["uniform", "linear", "minus-sqrt"])
@pytest.mark.parametrize("offload", ["cpu", None, "disk"])
def test_window_average_matches_the_slow_loop(weights: str, offload, tmp_path: Path) -> None:
    model = _model()
    policy = wa.WindowAverage(k=4, every=3, weights=weights, offload=offload,  # type: ignore[arg-type]
                              directory=tmp_path if offload == "disk" else None, recompute_bn=False,
                              final="training")
    history: list[dict[str, torch.Tensor]] = []
    _train(policy, model, 23, history=history)
    assert policy.num_updates == 7 and policy.window_size == 4
    got = policy.export_state_dict()
    ref = _reference(history, 3, 4, weights)
    for n, t in ref.items():
        torch.testing.assert_close(got[n], t, rtol=1e-6, atol=1e-6)
    if offload == "disk":
        files = sorted(p for p in os.listdir(tmp_path) if p.endswith(".safetensors"))
        assert len(files) == 4  # evicted snapshots are deleted


def test_partial_window_and_callable_weights() -> None:
    model = _model()
    policy = wa.WindowAverage(k=10, every=2, weights=lambda n: [i * i for i in range(1, n + 1)],
                              recompute_bn=False, final="training")
    history: list[dict[str, torch.Tensor]] = []
    _train(policy, model, 7, history=history)
    assert policy.window_size == 3
    got = policy.export_state_dict()
    ref = _reference(history, 2, 10, lambda n: [i * i for i in range(1, n + 1)])
    for n, t in ref.items():
        torch.testing.assert_close(got[n], t, rtol=1e-6, atol=1e-6)


def test_bn_statistics_are_recomputed(tmp_path: Path) -> None:
    model = _model()
    policy = wa.WindowAverage(k=3, every=2, final="training")
    _train(policy, model, 10)
    with policy.averaged() as m:
        got = m[1].running_mean.clone()
    ref = _model()
    ref.load_state_dict(policy.export_state_dict())
    # the reference: the averaged weights, statistics recomputed by hand from the same data
    wa.recompute_bn(ref, [_batch(-1)])
    torch.testing.assert_close(got, ref[1].running_mean)


@pytest.mark.parametrize("offload", ["cpu", "disk"])
@pytest.mark.parametrize("weights", ["uniform", "minus-sqrt"])
def test_resume_mid_window_is_exact(offload: str, weights: str, tmp_path: Path) -> None:
    def make(d: Path) -> wa.WindowAverage:
        return wa.WindowAverage(k=4, every=3, weights=weights, offload=offload,  # type: ignore[arg-type]
                                directory=d if offload == "disk" else None, recompute_bn=False,
                                final="training")

    torch.manual_seed(0)
    model = _model()
    straight = make(tmp_path / "a")
    _train(straight, model, 40)
    expected = straight.export_state_dict()

    torch.manual_seed(0)
    model = _model()
    first = make(tmp_path / "b")
    opt = _train(first, model, 20)  # mid-window: snapshots at 3..18 (6), ring 9..18
    path = tmp_path / "ckpt.pt"
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "policy": first.state_dict()}, path)
    _train(first, model, 11, opt=opt, start=20)  # runs on, evicts more files, then "crashes"
    first.detach()
    ckpt = torch.load(path, weights_only=True)
    model2 = _model()
    model2.load_state_dict(ckpt["model"])
    opt2 = torch.optim.SGD(model2.parameters(), lr=0.05, momentum=0.9)
    opt2.load_state_dict(ckpt["opt"])
    resumed = make(tmp_path / "b")
    resumed.load_state_dict(ckpt["policy"])
    _train(resumed, model2, 20, opt=opt2, start=20)
    got = resumed.export_state_dict()
    for n, t in expected.items():
        assert torch.equal(got[n], t), n


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(wa.ConfigError, match="k="):
        wa.WindowAverage(k=0)
    with pytest.raises(wa.ConfigError, match="weights"):
        wa.WindowAverage(weights="cosine")  # type: ignore[arg-type]
    with pytest.raises(wa.ConfigError, match="directory"):
        wa.WindowAverage(offload="disk")
    with pytest.raises(wa.ConfigError, match="offload"):
        wa.WindowAverage(offload="gpu")  # type: ignore[arg-type]


def test_weighted_mean_rule_is_the_weighted_mean() -> None:
    xs = [{"w": torch.randn(5, dtype=torch.float64)} for _ in range(4)]
    w = [0.5, 2.0, 1.0, 3.5]
    avg = wa.Averager(xs[0], weighted_mean_rule(w), dtype=torch.float64)
    for x in xs:
        avg.update(x)
    expected = sum(wi * x["w"] for wi, x in zip(w, xs, strict=True)) / sum(w)
    torch.testing.assert_close(avg.averaged_tensors()["w"], expected)
    with pytest.raises(wa.ConfigError):
        weighted_mean_rule([1.0, 0.0])


def test_a_failed_disk_write_does_not_stop_training(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from weightavg import posthoc

    model = _model()
    policy = wa.WindowAverage(k=3, every=2, offload="disk", directory=tmp_path, recompute_bn=False)
    opt = _train(policy, model, 4)

    def full_disk(path: Path, data: bytes) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(posthoc, "_atomic_write", full_disk)
    with pytest.warns(UserWarning, match="not written"):
        _train(policy, model, 2, opt=opt, start=4)
    assert policy.num_updates == 2 and policy.window_size == 2


def test_sharded_models_are_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from weightavg import posthoc

    monkeypatch.setattr(posthoc, "_is_sharded", lambda m: True)
    with pytest.raises(wa.ConfigError, match="sharded"):
        wa.WindowAverage(recompute_bn=False).begin(_model())
