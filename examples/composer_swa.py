"""Composer's SWA example with weightavg: ``SWA(swa_start="1ep", swa_end="2ep", update_interval="5ba")``.

Composer runs the algorithm inside its Trainer. A weightavg policy is trainer-independent: any
loop drives it with ``begin`` / ``on_epoch_end`` / ``averaged()`` / ``end``; ``fit`` below is such a
loop, with Composer's ``max_duration`` and an evaluation after every epoch. (With Lightning, pass
``weightavg.lightning.SWA(swa_start="1ep", swa_end="2ep", update_interval="5ba")`` as a callback.)

Run: ``python examples/composer_swa.py``.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import weightavg as wa
from weightavg import Duration


def fit(model: nn.Module, train_dataloader: DataLoader, eval_dataloader: DataLoader, max_duration: str,
        algorithms: list[wa.AveragingPolicy]) -> list[float]:
    """A minimal trainer: SGD, cross-entropy, evaluation (averaged weights) after every epoch."""
    epochs = int(Duration.parse(max_duration).value)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for algo in algorithms:
        algo.begin(model, opt, steps_per_epoch=len(train_dataloader), total_steps=epochs * len(train_dataloader),
                   bn_data=train_dataloader)
    accs = []
    for _ in range(epochs):
        for x, y in train_dataloader:
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        for algo in algorithms:
            algo.on_epoch_end()
        with torch.no_grad(), algorithms[0].averaged() as m:
            m.eval()
            accs.append(sum(int((m(x).argmax(1) == y).sum()) for x, y in eval_dataloader)
                        / len(eval_dataloader.dataset))  # type: ignore[arg-type]
            m.train()
    for algo in algorithms:
        algo.end()
    return accs


def digits_loaders() -> tuple[DataLoader, DataLoader]:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32)
    y = torch.tensor(y)
    g = torch.Generator().manual_seed(0)
    train = DataLoader(TensorDataset(x[:1400], y[:1400]), batch_size=32, shuffle=True, generator=g)
    return train, DataLoader(TensorDataset(x[1400:], y[1400:]), batch_size=256)


def main(loaders=None) -> list[float]:
    torch.manual_seed(0)
    train_dataloader, eval_dataloader = loaders if loaders is not None else digits_loaders()
    model = nn.Sequential(nn.Linear(64, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 10))

    # Composer:  swa_algorithm = SWA(swa_start="1ep", swa_end="2ep", update_interval='5ba')
    swa_algorithm = wa.SWA(swa_start="1ep", swa_end="2ep", update_interval="5ba")
    accs = fit(model, train_dataloader, eval_dataloader, max_duration="3ep", algorithms=[swa_algorithm])
    print(f"eval accuracy per epoch: {[round(a, 3) for a in accs]}; "
          f"{swa_algorithm.num_updates} snapshots (every 5 batches of the 2nd epoch)")
    return accs


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
