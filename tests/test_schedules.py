"""Learning-rate schedules of the SWA phase against closed forms written out here (issue #17 gap 1).

Expected sequences are literal numbers or the SWA paper's formulas evaluated in this file, never the
library's own schedule functions.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import weightavg as wa


def cyclic(max_lr: float, min_lr: float, i: int, c: int) -> float:
    """Izmailov et al. (2018), eq. 2 shifted to end each cycle at min_lr: t = ((i mod c) + 1)/c."""
    t = ((i % c) + 1) / c
    return (1 - t) * max_lr + t * min_lr


def cos_anneal(start: float, end: float, i: int, n: int) -> float:
    """SWALR's cosine anneal: start → end over n steps, then end."""
    t = 1.0 if n == 0 else min(1.0, i / n)
    return end + (start - end) * (1 + math.cos(math.pi * t)) / 2


def opt_with(*lrs: float) -> torch.optim.Optimizer:
    return torch.optim.SGD([{"params": [nn.Parameter(torch.zeros(1))], "lr": lr} for lr in lrs])


def lrs_of(sched: torch.optim.lr_scheduler.LRScheduler, opt: torch.optim.Optimizer, n: int) -> list[list[float]]:
    out = [[g["lr"] for g in opt.param_groups]]
    for _ in range(n - 1):
        opt.step()
        sched.step()
        out.append([g["lr"] for g in opt.param_groups])
    return out


# ----------------------------------------------------------------------------- SWACyclicLR


def test_cyclic_docstring_sequence() -> None:
    opt = opt_with(0.1)
    sched = wa.SWACyclicLR(opt, min_lr=0.0, cycle_steps=2)
    assert [r[0] for r in lrs_of(sched, opt, 4)] == pytest.approx([0.05, 0.0, 0.05, 0.0], abs=1e-15)


@pytest.mark.parametrize("cycle", [1, 3, 4])
def test_cyclic_matches_the_paper_formula(cycle: int) -> None:
    opt = opt_with(0.2)
    sched = wa.SWACyclicLR(opt, min_lr=0.02, cycle_steps=cycle)
    got = [r[0] for r in lrs_of(sched, opt, 10)]
    assert got == pytest.approx([cyclic(0.2, 0.02, i, cycle) for i in range(10)], rel=1e-12)


def test_cyclic_literal_values_cycle_3() -> None:
    # max .1, min .01, c = 3: .1 − .09·(1/3, 2/3, 1)
    opt = opt_with(0.1)
    got = [r[0] for r in lrs_of(wa.SWACyclicLR(opt, min_lr=0.01, cycle_steps=3), opt, 6)]
    assert got == pytest.approx([0.07, 0.04, 0.01, 0.07, 0.04, 0.01], rel=1e-12)


def test_cyclic_max_lr_start_and_per_group() -> None:
    opt = opt_with(1.0, 2.0)
    sched = wa.SWACyclicLR(opt, min_lr=[0.0, 0.5], cycle_steps=2, max_lr=[0.4, 0.9], start=2)
    got = lrs_of(sched, opt, 6)
    # two steps untouched, then (0.4 → 0.2, 0.0) and (0.9 → 0.7, 0.5)
    assert got == [pytest.approx(r) for r in
                   ([1.0, 2.0], [1.0, 2.0], [0.2, 0.7], [0.0, 0.5], [0.2, 0.7], [0.0, 0.5])]


def test_cyclic_without_max_lr_starts_from_the_rate_when_the_phase_opens() -> None:
    opt = opt_with(1.0)
    user = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    sched = wa.SWACyclicLR(opt, min_lr=0.1, cycle_steps=2, start=2)
    lrs = []
    for _ in range(5):
        opt.step()
        user.step()
        sched.step()
        lrs.append(opt.param_groups[0]["lr"])
    # user: 1 → .5 → .25; the phase opens at the 2nd step (index 0) from .25: (.25 + .1)/2 = .175, then
    # .1, .175, .1 (the cycle top stays .25 although the user's scheduler keeps halving)
    assert lrs == pytest.approx([0.5, 0.175, 0.1, 0.175, 0.1])


def test_cyclic_cos_strategy() -> None:
    opt = opt_with(1.0)
    got = [r[0] for r in lrs_of(wa.SWACyclicLR(opt, min_lr=0.0, cycle_steps=4, strategy="cos"), opt, 4)]
    # lr = 1 − (1 − cos(π t))/2 = (1 + cos(π t))/2 at t = 1/4, 1/2, 3/4, 1
    assert got == pytest.approx([(1 + math.cos(math.pi * k / 4)) / 2 for k in (1, 2, 3, 4)], abs=1e-15)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"cycle_steps": 0}, r"cycle_steps=0 is invalid: expected a positive int"),
    ({"cycle_steps": -2}, r"cycle_steps=-2"),
    ({"cycle_steps": 2.0}, r"cycle_steps=2\.0"),
    ({"cycle_steps": True}, r"cycle_steps=True"),
    ({"cycle_steps": 2, "strategy": "step"}, r"anneal_strategy='step' is invalid: expected 'cos' or 'linear'"),
    ({"cycle_steps": 2, "start": -1}, r"start=-1 is invalid: expected a non-negative int"),
    ({"cycle_steps": 2, "start": True}, r"start=True"),
    ({"cycle_steps": 2, "min_lr": -0.1}, r"min_lr=-0\.1 is invalid: expected a non-negative finite float"),
    ({"cycle_steps": 2, "min_lr": math.inf}, r"min_lr=inf"),
    ({"cycle_steps": 2, "min_lr": [0.1, 0.2]}, r"min_lr=\[0\.1, 0\.2\] is invalid: expected a float or a list of 1"),
    ({"cycle_steps": 2, "max_lr": "0.1"}, r"max_lr='0\.1' is invalid: expected a float or a list of floats"),
    ({"cycle_steps": 2, "max_lr": [math.nan]}, r"max_lr\[0\]=nan"),
])
def test_cyclic_bad_arguments(kwargs: dict, match: str) -> None:
    kwargs = {"min_lr": 0.0, **kwargs}
    with pytest.raises(wa.ConfigError, match=match):
        wa.SWACyclicLR(opt_with(0.1), **kwargs)


def test_cyclic_rejects_an_empty_cycle_at_construction_even_before_its_phase() -> None:
    # with start > 0 no learning rate of the phase is computed yet: the check must not wait for it
    with pytest.raises(wa.ConfigError, match=r"cycle_steps=0 is invalid: expected a positive int"):
        wa.SWACyclicLR(opt_with(0.1), min_lr=0.0, cycle_steps=0, start=5)


def test_cyclic_state_round_trip() -> None:
    opt = opt_with(0.3)
    a = wa.SWACyclicLR(opt, min_lr=0.03, cycle_steps=3, start=1)
    for _ in range(3):
        opt.step()
        a.step()
    opt2 = opt_with(0.3)
    b = wa.SWACyclicLR(opt2, min_lr=0.03, cycle_steps=3, start=1)
    b.load_state_dict(a.state_dict())
    assert b.start_lrs == [0.3] and b.last_epoch == a.last_epoch


# ----------------------------------------------------------------------------- SWAAnnealLR


@pytest.mark.parametrize("anneal", [0, 1, 3])
def test_anneal_cos_closed_form(anneal: int) -> None:
    opt = opt_with(0.5)
    got = [r[0] for r in lrs_of(wa.SWAAnnealLR(opt, swa_lr=0.05, anneal_steps=anneal), opt, 6)]
    assert got == pytest.approx([cos_anneal(0.5, 0.05, i, anneal) for i in range(6)], rel=1e-12)


def test_anneal_docstring_sequence_and_defaults() -> None:
    opt = opt_with(0.1)
    sched = wa.SWAAnnealLR(opt, swa_lr=0.01, anneal_steps=2, anneal_strategy="linear", start=1)
    lrs = []
    for _ in range(4):
        opt.step()
        sched.step()
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs == pytest.approx([0.1, 0.055, 0.01, 0.01])
    d = wa.SWAAnnealLR(opt_with(0.1), swa_lr=0.01)
    assert (d.anneal_steps, d.anneal_strategy, d.start) == (10, "cos", 0)


def test_anneal_per_group_linear() -> None:
    opt = opt_with(0.4, 0.8)
    got = lrs_of(wa.SWAAnnealLR(opt, swa_lr=[0.0, 0.4], anneal_steps=4, anneal_strategy="linear"), opt, 6)
    assert got == [pytest.approx(r) for r in
                   ([0.4, 0.8], [0.3, 0.7], [0.2, 0.6], [0.1, 0.5], [0.0, 0.4], [0.0, 0.4])]


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"anneal_steps": -1}, r"anneal_steps=-1 is invalid: expected a non-negative int"),
    ({"anneal_steps": 1.5}, r"anneal_steps=1\.5"),
    ({"anneal_steps": True}, r"anneal_steps=True"),
    ({"anneal_strategy": "exp"}, r"anneal_strategy='exp'"),
    ({"swa_lr": -1.0}, r"swa_lr=-1\.0 is invalid"),
    ({"swa_lr": [0.1, 0.1]}, r"swa_lr=\[0\.1, 0\.1\] is invalid: expected a float or a list of 1 floats"),
    ({"swa_lr": True}, r"swa_lr=True"),
    ({"start": -3}, r"start=-3"),
])
def test_anneal_bad_arguments(kwargs: dict, match: str) -> None:
    kwargs = {"swa_lr": 0.01, **kwargs}
    with pytest.raises(wa.ConfigError, match=match):
        wa.SWAAnnealLR(opt_with(0.1), **kwargs)


def test_anneal_reads_a_tensor_learning_rate() -> None:
    p = nn.Parameter(torch.zeros(1))
    opt = torch.optim.Adam([p], lr=torch.tensor(0.4), capturable=False)
    sched = wa.SWAAnnealLR(opt, swa_lr=0.0, anneal_steps=2, anneal_strategy="linear")
    opt.step()
    sched.step()
    assert float(opt.param_groups[0]["lr"]) == pytest.approx(0.2)


# ----------------------------------------------------------------------------- the SWA policy's phases


def _policy_lrs(swa: wa.SWA, lrs: tuple[float, ...], steps: int) -> list[list[float]]:
    model = nn.Sequential(*[nn.Linear(2, 2) for _ in lrs])
    opt = torch.optim.SGD([{"params": m.parameters(), "lr": lr} for m, lr in zip(model, lrs, strict=True)])
    swa.begin(model, opt)
    used: list[list[float]] = []
    opt.register_step_pre_hook(lambda o, a, k: used.append([g["lr"] for g in o.param_groups]))
    x = torch.randn(4, 2)
    for _ in range(steps):
        model(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    return used


def test_policy_cyclic_phase_literal_values() -> None:
    swa = wa.SWA(swa_start=2, swa_lr=0.01, cycle=3, anneal_strategy="linear", recompute_bn=False)
    got = _policy_lrs(swa, (0.1,), 8)
    assert [r[0] for r in got] == pytest.approx([0.1, 0.1, 0.07, 0.04, 0.01, 0.07, 0.04, 0.01])
    assert swa.num_updates == 2  # at each cycle minimum


def test_policy_anneal_phase_literal_values_per_group() -> None:
    swa = wa.SWA(swa_start=1, swa_lr=[0.02, 0.1], anneal_steps=2, anneal_strategy="cos", recompute_bn=False,
                 update_interval=1)
    got = _policy_lrs(swa, (0.1, 0.3), 5)
    # cos anneal over 2 steps: start, midpoint (start + end)/2, end
    assert got == [pytest.approx(r) for r in
                   ([0.1, 0.3], [0.1, 0.3], [0.06, 0.2], [0.02, 0.1], [0.02, 0.1])]


# ----------------------------------------------------------------------------- the closed-form helpers
# (module-level functions the policies use; documented contracts, checked with literal numbers)


def test_anneal_factor_clamps_and_names() -> None:
    from weightavg._schedules import anneal_factor

    assert anneal_factor("linear", -0.5) == 0.0 and anneal_factor("linear", 1.5) == 1.0
    assert anneal_factor("cos", -1.0) == 0.0 and anneal_factor("cos", 2.0) == 1.0
    assert anneal_factor("cos", 0.5) == pytest.approx(0.5) and anneal_factor("cos", 0.25) == pytest.approx(
        (1 - 2**-0.5) / 2)
    with pytest.raises(wa.ConfigError, match=r"anneal_strategy='step' is invalid: expected 'cos' or 'linear'"):
        anneal_factor("step", 0.5)


def test_swa_cyclic_lr_rejects_an_empty_cycle() -> None:
    from weightavg._schedules import swa_anneal_lr, swa_cyclic_lr

    for bad in (0, -1):
        with pytest.raises(wa.ConfigError, match=rf"cycle_steps={bad} is invalid: expected a positive int"):
            swa_cyclic_lr(0.1, 0.0, 0, bad)
    assert swa_cyclic_lr(0.1, 0.02, 5, 1) == pytest.approx(0.02)  # a 1-step cycle sits at its minimum
    assert swa_anneal_lr(0.1, 0.02, 0, 0) == pytest.approx(0.02)  # no anneal: the SWA rate at once
    assert swa_anneal_lr(0.1, 0.02, 0, 1) == pytest.approx(0.1)
    assert swa_anneal_lr(0.1, 0.02, 7, 2, "linear") == pytest.approx(0.02)
