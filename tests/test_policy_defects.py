"""Policy regressions from real training setups (issue #9): data and optimizers checked at begin,
no update after end, non-finite weights never stop training, a run that averaged nothing warns."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import weightavg as wa

from .test_policy import Net, batches, train_step


def test_one_shot_bn_data_is_refused_at_begin() -> None:
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(wa.ConfigError, match=r"bn_data=.*one-shot iterator"):
        wa.SWA(swa_start=1).begin(model, opt, bn_data=(b for b in batches()))
    with pytest.raises(wa.ConfigError, match=r"bn_data=.*yielded none"):
        wa.SWA(swa_start=1).begin(model, opt, bn_data=[])


class Generator(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 6))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


def test_bn_data_the_model_cannot_take_fails_at_begin_naming_the_arguments() -> None:
    gen = Generator()
    opt = torch.optim.SGD(gen.parameters(), lr=0.1)
    real = [(torch.randn(8, 6), torch.zeros(8)) for _ in range(3)]  # images, not noise
    before = {k: v.clone() for k, v in gen.state_dict().items()}
    gen.train()
    with pytest.raises(wa.ConfigError, match="bn_data/bn_forward_fn") as info:
        wa.SWA(swa_start=1, update_interval=1).begin(gen, opt, bn_data=real)
    assert "bn_forward_fn=fn(model, batch)" in str(info.value)
    assert gen.training and all(m.training for m in gen.modules())  # modes restored
    for k, v in gen.state_dict().items():
        assert torch.equal(v, before[k]), k  # buffers untouched
    # with a forward that feeds noise it begins, and the probe left the RNG and the stats alone
    torch.manual_seed(3)
    expected = torch.rand(1)
    torch.manual_seed(3)
    wa.SWA(swa_start=1, update_interval=1).begin(
        gen, opt, bn_data=real, bn_forward_fn=lambda m, b: m(torch.randn(b[0].shape[0], 4)))
    assert torch.equal(torch.rand(1), expected)
    for k, v in gen.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_on_epoch_end_and_on_step_after_end_raise() -> None:
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    swa = wa.SWA(swa_start=0, update_interval="1ep", recompute_bn=False)
    swa.begin(model, opt)
    for x, y in batches():
        train_step(model, opt, x, y)
    swa.on_epoch_end()
    swa.end()
    n = swa.num_updates
    with pytest.raises(wa.StateError, match=r"on_epoch_end\(\) after SWA.end\(\)"):
        swa.on_epoch_end()
    assert swa.num_updates == n
    manual = wa.EMA(smoothing=0.5, recompute_bn=False)
    manual.begin(model)
    manual.on_step()
    manual.end()
    with pytest.raises(wa.StateError, match=r"after EMA\.end"):
        manual.on_step()


def test_an_optimizer_of_another_model_is_refused() -> None:
    model, other = Net(), Net()
    opt = torch.optim.SGD(other.parameters(), lr=0.1)
    with pytest.raises(wa.ConfigError, match=r"optimizers=.*parameters of the averaged Net"):
        wa.EMA(smoothing=0.9).begin(model, opt)


def test_nonfinite_weights_are_skipped_with_a_counting_warning_and_training_goes_on() -> None:
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ema = wa.EMA(smoothing=0.5)  # the policy's default: skip
    ema.begin(model, opt, bn_data=batches())
    data = batches(6)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for i, (x, y) in enumerate(data):
            if i == 2:
                with torch.no_grad():
                    model.fc1.weight[0, 0] = float("nan")
            train_step(model, opt, x, y)
            if i == 3:
                with torch.no_grad():  # training repairs itself; the average never saw the NaN
                    model.fc1.weight.nan_to_num_(0.0)
                    model.fc2.weight.nan_to_num_(0.0)
                    model.fc1.bias.nan_to_num_(0.0)
                    model.fc2.bias.nan_to_num_(0.0)
                    model.bn.weight.nan_to_num_(0.0)
                    model.bn.bias.nan_to_num_(0.0)
                    model.bn.running_mean.nan_to_num_(0.0)
                    model.bn.running_var.nan_to_num_(1.0)
        ema.end()
    messages = [str(w.message) for w in record]
    assert any("1 update(s) skipped so far" in m for m in messages)
    assert any("2 update(s) skipped so far" in m for m in messages)
    assert any("2 update(s) were skipped" in m for m in messages)
    assert ema.num_updates == 4 and ema.averager is not None and ema.averager.num_skipped == 2
    assert all(torch.isfinite(v).all() for v in model.state_dict().values())
    # direct Averager use keeps raising
    bad = Net()
    with torch.no_grad():
        bad.fc1.weight[0, 0] = float("inf")
    with pytest.raises(wa.NonFiniteError):
        wa.Averager(bad).update(bad)


def test_a_run_that_never_reaches_its_window_warns_at_end() -> None:
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    swa = wa.SWA(swa_start=100, update_interval=1, recompute_bn=False)
    swa.begin(model, opt)
    for x, y in batches():
        train_step(model, opt, x, y)
    with pytest.warns(RuntimeWarning, match=r"made no update in this run \(4 steps"):
        swa.end()
    quiet = wa.SWA(swa_start=1, update_interval=1, recompute_bn=False)
    quiet.begin(model, opt)
    for x, y in batches():
        train_step(model, opt, x, y)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        quiet.end()


def test_dur_window_on_the_trainers_own_clock() -> None:
    # a GAN-like loop with two optimizers: the trainer counts every optimizer step (max_steps=16),
    # the policy counts rounds; '0.5dur' is half of the trainer's count
    model = Net()
    opt_a = torch.optim.SGD([model.fc1.weight, model.fc1.bias], lr=0.1)
    opt_b = torch.optim.SGD([p for n, p in model.named_parameters() if not n.startswith("fc1")], lr=0.1)
    ticks = [0]
    for o in (opt_a, opt_b):
        o.register_step_post_hook(lambda *a: ticks.__setitem__(0, ticks[0] + 1))
    swa = wa.SWA(swa_start="0.5dur", update_interval=1, recompute_bn=False)
    swa.begin(model, [opt_a, opt_b], total_steps=16, clock=lambda: ticks[0])
    for x, y in batches(8):
        nn.functional.cross_entropy(model(x), y).backward()
        opt_a.step()
        opt_b.step()
        opt_a.zero_grad()
        opt_b.zero_grad()
    assert swa.steps == 8 and ticks[0] == 16
    assert swa.num_updates == 4  # rounds 5..8: the trainer's count after them is 10..16 > 8


# ----------------------------------------------------------------------------- compute_ema


def _composer_ema(ema: dict[str, torch.Tensor], model: nn.Module, smoothing: float) -> None:
    for k, v in model.state_dict().items():
        if v.is_floating_point():
            ema[k] = smoothing * ema[k] + (1 - smoothing) * v.double()
        else:
            ema[k] = v.clone()


def test_compute_ema_float32_ema_of_a_bf16_model() -> None:
    from weightavg.functional import compute_ema

    torch.manual_seed(0)
    model = Net().to(torch.bfloat16)
    ema_model = Net()
    ema_model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in model.state_dict().items()})
    ref = {k: v.double() if v.is_floating_point() else v for k, v in ema_model.state_dict().items()}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for x, y in batches(5):
        train_step(model, opt, x.to(torch.bfloat16), y)
        compute_ema(model, ema_model, smoothing=0.9)
        _composer_ema(ref, model, 0.9)
    for k, v in ema_model.state_dict().items():
        assert v.dtype == ref[k].dtype if not v.is_floating_point() else v.dtype == torch.float32
        torch.testing.assert_close(v.double() if v.is_floating_point() else v, ref[k], rtol=1e-6, atol=1e-6)


def test_compute_ema_tensors_never_move_under_a_schedule_a_new_source_or_smoothing_1() -> None:
    from weightavg.functional import compute_ema

    torch.manual_seed(0)
    model, other = Net(), Net()
    ema_model = copy_of(model)
    compute_ema(model, ema_model, smoothing=0.5)  # the first call lays the storage out
    held = {k: v for k, v in ema_model.state_dict().items()}  # e.g. an optimizer or a CUDA graph
    ptrs = {k: v.data_ptr() for k, v in held.items()}
    ref = {k: v.double() if v.is_floating_point() else v.clone() for k, v in ema_model.state_dict().items()}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for i, (x, y) in enumerate(batches(6)):
        train_step(model, opt, x, y)
        src = other if i == 3 else model
        s = [0.9, 0.5, 0.99, 1.0, 0.7, 0.0][i]  # a schedule, a frozen step and a copy
        compute_ema(src, ema_model, smoothing=s)
        _composer_ema(ref, src, s)
        for k, v in ema_model.state_dict().items():
            assert v.data_ptr() == ptrs[k], k
            assert torch.equal(held[k], v), k  # what was held keeps seeing the updates
    for k, v in ema_model.state_dict().items():
        torch.testing.assert_close(v.double() if v.is_floating_point() else v, ref[k], rtol=1e-6, atol=1e-6)
    with pytest.raises(wa.ConfigError, match="smoothing"):
        compute_ema(model, ema_model, smoothing=1.5)


def copy_of(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model)
