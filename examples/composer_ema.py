"""Composer's EMA examples with weightavg.

1. The functional form, as written for Composer (``import composer.functional as cf``), with
   ``weightavg.functional`` in its place: ``cf.compute_ema(model, ema_model, smoothing=0.99)``.
2. The trainer form ``EMA(half_life='50ba')``: a policy that hooks the optimizer, so it updates
   once per real optimizer step; after ``end()`` the model holds the EMA weights (Composer's
   ``model = ema.ema_model``). With Lightning: ``weightavg.lightning.EMA(half_life="50ba")``.

Each form prints the test accuracy of the raw model (the trained weights, no EMA) next to its
EMA's, so that the EMA has a baseline.

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


def trainer_form(model: nn.Module, train_loader, before_end=None) -> nn.Module:
    """``before_end(model)`` sees the raw trained weights, just before ``end()`` swaps in the EMA."""
    opt = torch.optim.Adam(model.parameters())
    ema = wa.EMA(half_life="50ba")
    ema.begin(model, opt, steps_per_epoch=len(train_loader))
    for _epoch in range(num_epochs):
        for X, y in train_loader:
            F.cross_entropy(model(X), y).backward()
            opt.step()
            opt.zero_grad()
        ema.on_epoch_end()
    if before_end is not None:
        before_end(model)
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
    model = make()
    a = acc(training_loop(model, train_loader))
    raw_a = acc(model)  # the trained weights themselves
    raw: list[float] = []
    b = acc(trainer_form(make(), train_loader, before_end=lambda m: raw.append(acc(m))))
    print(f"functional form: raw model (no EMA) {raw_a:.3f}, EMA {a:.3f}")
    print(f"policy form:     raw model (no EMA) {raw[0]:.3f}, EMA {b:.3f}")
    return a, b


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
