"""The SWA anneal starts from the rate of the window's first step (issue 16, defect 6)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.optim.swa_utils import SWALR

import weightavg as wa


def _used_rates(opt: torch.optim.Optimizer) -> list[float]:
    seen: list[float] = []
    opt.register_step_pre_hook(lambda o, a, k: seen.append(o.param_groups[0]["lr"]))
    return seen


@pytest.mark.parametrize("strategy", ["cos", "linear"])
def test_step_window_anneal_matches_torch_swalr_pattern(strategy: str) -> None:
    swa_start, steps = 2, 7
    # torch's pattern: the user's scheduler until swa_start, then SWALR, one scheduler step per step
    model = nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    user = torch.optim.lr_scheduler.ExponentialLR(opt, 0.9)
    want = _used_rates(opt)
    swalr = None
    for i in range(steps):
        opt.step()
        if i < swa_start:
            user.step()
        else:
            if swalr is None:
                swalr = SWALR(opt, swa_lr=0.05, anneal_epochs=2, anneal_strategy=strategy)
            swalr.step()
    # ours: the user's scheduler keeps stepping every step; the policy owns the rate in the window
    model = nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    user = torch.optim.lr_scheduler.ExponentialLR(opt, 0.9)
    swa = wa.SWA(swa_start=swa_start, swa_lr=0.05, anneal_steps=2, anneal_strategy=strategy,
                 update_interval=1, recompute_bn=False)
    swa.begin(model, opt)
    got = _used_rates(opt)
    for _ in range(steps):
        opt.step()
        user.step()
    assert got == pytest.approx(want, rel=1e-12)
    if strategy == "cos":
        assert got[:4] == pytest.approx([0.1, 0.09, 0.081, 0.0655])
