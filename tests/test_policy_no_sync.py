import pytest
import torch
from torch import nn

import weightavg as wa


def test_policy_steps_read_no_settled_counter(monkeypatch: pytest.MonkeyPatch) -> None:
    """A policy's update reads no settled counter (a host sync per step under the deferred check)."""
    model = nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ema = wa.EMA(smoothing=0.9)
    ema.begin(model, opt)
    calls = []
    real = wa.Averager._settle
    monkeypatch.setattr(wa.Averager, "_settle", lambda self: (calls.append(1), real(self))[1])
    for _ in range(5):
        opt.zero_grad()
        model(torch.randn(3, 4)).sum().backward()
        opt.step()
    assert ema.num_updates == 5  # a read settles: that is where refusals surface
    assert len(calls) == 1, len(calls)
