"""fast-SWA's schedule and averaging points against the formulas of Athiwaratkun et al. (2019)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import weightavg as wa
from weightavg._schedules import fast_swa_lr, fast_swa_update


def paper_lr(i: int, eta0: float, l0: int, c: int, length: int) -> float:
    """The paper's cosine η(i) = η0 (1 + cos(π i / L)) / 2, whose last c steps before ℓ0 repeat."""
    if i >= l0:
        i = l0 - c + (i - l0) % c
    return eta0 * 0.5 * (1 + math.cos(math.pi * i / length))


def rampdown(current: float, length: float) -> float:
    """The reference training script's cosine ramp-down factor."""
    assert 0 <= current <= length
    return float(0.5 * (np.cos(np.pi * current / length) + 1))


def script_lr(i: int, eta0: float, l0: int, c: int, length: int) -> float:
    """The reference training script's cyclic branch (the cycle replays [ℓ0 − c, ℓ0))."""
    if i < l0:
        return eta0 * rampdown(i, length)
    return eta0 * rampdown((length - (length - l0) - c) + ((i - l0) % c), length)


@pytest.mark.parametrize(("l0", "c", "length"), [(10, 3, 10), (12, 4, 16), (6, 6, 9), (5, 1, 5)])
def test_schedule_equals_the_reference_formulas_step_by_step(l0: int, c: int, length: int) -> None:
    got = [fast_swa_lr(0.2, i, cycle_start=l0, cycle_steps=c, anneal_steps=length) for i in range(40)]
    assert got == pytest.approx([paper_lr(i, 0.2, l0, c, length) for i in range(40)], rel=1e-12, abs=1e-15)
    assert got == pytest.approx([script_lr(i, 0.2, l0, c, length) for i in range(40)], rel=1e-12, abs=1e-15)
    assert got[0] == 0.2  # the cosine starts at the top of the schedule
    # every cycle repeats the segment [ℓ0 − c, ℓ0) of the cosine
    for i in range(l0, 40):
        assert got[i] == got[l0 - c + (i - l0) % c]


def test_min_lr_shifts_the_bottom_of_the_cosine() -> None:
    got = [fast_swa_lr(1.0, i, cycle_start=8, cycle_steps=2, min_lr=0.1) for i in range(12)]
    assert got == pytest.approx([0.1 + 0.9 * paper_lr(i, 1.0, 8, 2, 8) for i in range(12)])


@pytest.mark.parametrize(("l0", "c", "k"), [(10, 4, 1), (10, 4, 2), (10, 4, 4), (9, 3, 2)])
def test_averaging_points_every_k_steps_from_l0_minus_c(l0: int, c: int, k: int) -> None:
    got = [i for i in range(30) if fast_swa_update(i, cycle_start=l0, cycle_steps=c, interval=k)]
    # the weights after steps ℓ0 − c + k − 1, ℓ0 − c + 2k − 1, ... (k = c: each cycle's last step)
    assert got == list(range(l0 - c + k - 1, 30, k))
    if k == c:
        lrs = [fast_swa_lr(1.0, i, cycle_start=l0, cycle_steps=c) for i in range(30)]
        assert all(lrs[i] == min(lrs[l0 - c:]) for i in got)  # the lowest rate of every cycle


def test_scheduler_per_group_and_resume() -> None:
    model = nn.Linear(2, 2)
    opt = torch.optim.SGD([{"params": [model.weight], "lr": 0.1}, {"params": [model.bias], "lr": 0.4}])
    sched = wa.FastSWALR(opt, cycle_start=6, cycle_steps=3, anneal_steps=8)
    used = []
    for _ in range(14):
        used.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    for i, (a, b) in enumerate(used):
        assert a == pytest.approx(paper_lr(i, 0.1, 6, 3, 8), rel=1e-12)
        assert b == pytest.approx(paper_lr(i, 0.4, 6, 3, 8), rel=1e-12)
    opt2 = torch.optim.SGD([{"params": [model.weight], "lr": 0.1}, {"params": [model.bias], "lr": 0.4}])
    resumed = wa.FastSWALR(opt2, cycle_start=6, cycle_steps=3, anneal_steps=8)
    resumed.load_state_dict(sched.state_dict())
    resumed.step()
    sched.step()
    assert [g["lr"] for g in opt2.param_groups] == [g["lr"] for g in opt.param_groups]


def test_swa_policy_with_fast_swa_schedule_averages_at_the_fast_swa_points() -> None:
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    l0, c, k = 8, 4, 2
    sched = wa.FastSWALR(opt, cycle_start=l0, cycle_steps=c, anneal_steps=10)
    swa = wa.SWA(swa_start=l0 - c, update_interval=k, recompute_bn=False)  # no swa_lr: rate untouched
    swa.begin(model, opt)
    snaps, lrs = [], []
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        lrs.append(opt.param_groups[0]["lr"])
        model(torch.randn(4, 3, generator=g)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        sched.step()
        snaps.append(model.weight.detach().double().clone())
    assert lrs == pytest.approx([paper_lr(i, 0.1, l0, c, 10) for i in range(20)], rel=1e-12)
    points = [i for i in range(20) if fast_swa_update(i, cycle_start=l0, cycle_steps=c, interval=k)]
    assert swa.num_updates == len(points)
    expected = torch.stack([snaps[i] for i in points]).mean(0)
    torch.testing.assert_close(swa.averager.averaged_tensors()["weight"].double(), expected,
                               rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(("kw", "match"), [
    ({"cycle_start": 3, "cycle_steps": 0}, "cycle_steps=0"),
    ({"cycle_start": 2, "cycle_steps": 3}, "cycle_start=2"),
    ({"cycle_start": 5, "cycle_steps": 2, "anneal_steps": 4}, "anneal_steps=4"),
])
def test_bad_arguments(kw, match) -> None:
    with pytest.raises(wa.ConfigError, match=match):
        fast_swa_lr(0.1, 0, **kw)
    with pytest.raises(wa.ConfigError, match=match):
        wa.FastSWALR(torch.optim.SGD(nn.Linear(1, 1).parameters(), lr=0.1), **kw)
