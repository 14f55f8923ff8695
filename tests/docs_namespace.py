"""Stand-ins for the names the documentation's code leaves to the reader.

Small and fast: a BatchNorm MLP on a few random batches, so that every page's code runs in a
second or two. Nothing here is downloaded.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

import weightavg


def _model() -> nn.Module:
    return nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))


def docs_namespace() -> dict[str, Any]:
    """A fresh namespace: a model, its optimizer and scheduler, data, and small helpers."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(16, 8, generator=g), torch.randint(0, 3, (16,), generator=g)) for _ in range(3)]
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()

    def evaluate(m: nn.Module, data: Any = None) -> float:
        m.eval()
        with torch.no_grad():
            acc = sum((m(x).argmax(-1) == y).float().mean().item() for x, y in batches) / len(batches)
        m.train()
        return acc

    def train_one_epoch(m: nn.Module, opt: Any = None, *args: Any, **kwargs: Any) -> None:
        """One pass over the batches with ``opt`` (a fresh SGD when none is given)."""
        if not isinstance(opt, torch.optim.Optimizer):
            opt = torch.optim.SGD(m.parameters(), lr=0.05)
        m.train()
        for x, y in batches:
            opt.zero_grad()
            loss_fn(m(x), y).backward()
            opt.step()

    return {
        "torch": torch,
        "wa": weightavg,
        "nn": nn,
        "copy": copy,
        "model": model,
        "optimizer": optimizer,
        "opt": optimizer,
        "scheduler": torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=100),
        "loss_fn": loss_fn,
        "loader": batches,
        "train_loader": batches,
        "train_batches": [x for x, _ in batches],
        "val_batches": [x for x, _ in batches],
        "val_labels": torch.cat([y for _, y in batches]),
        "test_batches": [x for x, _ in batches],
        "evaluate": evaluate,
        "train_one_epoch": train_one_epoch,
        "epochs": 4,
        "swa_start": 2,
    }
