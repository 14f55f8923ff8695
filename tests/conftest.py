"""Shared fixtures: tiny models, seeding."""

from __future__ import annotations

import pytest
import torch
from hypothesis import settings
from torch import nn

torch.set_num_threads(1)

# every property test draws the same examples on every run (no flaky CI): derandomized, no
# example database, no timing deadline on a shared machine; a test's own @settings adds to this
settings.register_profile("weightavg", derandomize=True, database=None, deadline=None)
settings.load_profile("weightavg")


class ConvBN(nn.Module):
    """Conv + BatchNorm + Linear: parameters, float buffers and an integer buffer."""

    def __init__(self, channels: int = 4, classes: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv1d(1, channels, 3, padding=1)
        self.bn = nn.BatchNorm1d(channels)
        self.fc = nn.Linear(channels, classes)
        self.register_buffer("scratch", torch.zeros(2), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn(self.conv(x[:, None, :])))
        return self.fc(h.mean(-1))


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def convbn() -> ConvBN:
    return ConvBN()


def sgd_steps(model: nn.Module, n: int, *, lr: float = 0.1, width: int = 8, seed: int = 0):
    """Yield after each of n SGD steps on random data (deterministic given seed)."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for i in range(n):
        x = torch.randn(16, width, generator=g)
        model(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        yield i
