"""Composer's EMA examples with weightavg.

1. The functional form, as written for Composer (``import composer.functional as cf``), with
   ``weightavg.functional`` in its place: ``cf.compute_ema(model, ema_model, smoothing=0.99)``.
2. The trainer form ``EMA(half_life='50ba')``: a policy that hooks the optimizer, so it updates
   once per real optimizer step; after ``end()`` the model holds the EMA weights (Composer's
   ``model = ema.ema_model``). With Lightning: ``weightavg.lightning.EMA(half_life="50ba")``.

Run: ``python examples/composer_ema.py``.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

import weightavg as wa
import weightavg.functional as cf

num_epochs = 3


def training_loop(model: nn.Module, train_loader) -> nn.Module:
    # Composer's functional example, verbatim but for the import above
    opt = torch.optim.Adam(model.parameters())
    loss_fn = F.cross_entropy
    ema_model = copy.deepcopy(model)
    model.train()
    for _epoch in range(num_epochs):
        for X, y in train_loader:
            y_hat = model(X)
            loss = loss_fn(y_hat, y)
            loss.backward()
            opt.step()
            opt.zero_grad()
            cf.compute_ema(model, ema_model, smoothing=0.99)
    return ema_model


def trainer_form(model: nn.Module, train_loader) -> nn.Module:
    opt = torch.optim.Adam(model.parameters())
    ema = wa.EMA(half_life="50ba")
    ema.begin(model, opt, steps_per_epoch=len(train_loader))
    for _epoch in range(num_epochs):
        for X, y in train_loader:
            F.cross_entropy(model(X), y).backward()
            opt.step()
            opt.zero_grad()
        ema.on_epoch_end()
    ema.end()  # the model now holds the EMA weights
    return model


def digits(batch_size: int = 32):
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x, y = torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y)
    g = torch.Generator().manual_seed(0)
    ds = torch.utils.data.TensorDataset(x[:1400], y[:1400])
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=True, generator=g), (x[1400:], y[1400:])


def main(train_loader=None, test=None) -> tuple[float, float]:
    torch.manual_seed(0)
    if train_loader is None:
        train_loader, test = digits()
    x, y = test

    def acc(m: nn.Module) -> float:
        with torch.no_grad():
            return float((m.eval()(x).argmax(1) == y).float().mean())

    make = lambda: nn.Sequential(nn.Linear(x.shape[1], 64), nn.ReLU(), nn.Linear(64, 10))  # noqa: E731
    a = acc(training_loop(make(), train_loader))
    b = acc(trainer_form(make(), train_loader))
    print(f"EMA accuracy: functional {a:.3f}, policy {b:.3f}")
    return a, b


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
