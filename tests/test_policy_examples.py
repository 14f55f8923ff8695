"""The seed examples run as written with our names (small data, few epochs)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def toy(features: int, n: int = 96, seed: int = 0) -> tuple[DataLoader, DataLoader]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=g)
    y = (x[:, 0] > 0).long() + 2 * (x[:, 1] > 0).long()
    return (DataLoader(TensorDataset(x, y), batch_size=16),
            DataLoader(TensorDataset(x[:32], y[:32]), batch_size=32))


def test_blog_loop_example(capsys) -> None:
    result = load("plain_loop").main(epochs=4, swa_start=2, swa_lr=0.05, loaders=toy(40))
    assert result["snapshots"] == 2  # ends of epochs 2 and 3 (0-based)
    assert "final: SGD" in capsys.readouterr().out


def test_composer_swa_example() -> None:
    ex = load("composer_swa")
    accs = ex.main(loaders=toy(64))
    assert len(accs) == 3


def test_composer_swa_example_snapshots() -> None:
    import weightavg as wa

    ex = load("composer_swa")
    swa = wa.SWA(swa_start="1ep", swa_end="2ep", update_interval="5ba")
    train, evl = toy(64, n=160)  # 10 batches per epoch: snapshots after batches 5 and 10 of epoch 2
    model = torch.nn.Sequential(torch.nn.Linear(64, 4))
    ex.fit(model, train, evl, max_duration="3ep", algorithms=[swa])
    assert swa.num_updates == 2


def test_composer_ema_example() -> None:
    ex = load("composer_ema")
    train, test = toy(64)
    a, b = ex.main(train, next(iter(test)))
    assert 0.0 <= a <= 1.0 and 0.0 <= b <= 1.0
