"""The PyTorch blog's SWA loop, done right with ``weightavg.SWA``.

The blog (``torch.optim.swa_utils``) trains with ``CosineAnnealingLR``, switches to ``SWALR`` at
``swa_start``, averages once per epoch and recomputes BatchNorm statistics at the very end. Here
the policy does the same with three lines around an ordinary loop, and more: your scheduler is
never replaced (the SWA rate is set only inside the SWA phase), evaluation during training uses
the averaged weights with fresh BatchNorm statistics, and a checkpoint resumes exactly.

Run: ``python examples/plain_loop.py`` (MNIST-1D, a small CNN, CPU, ~20 s).
"""

from __future__ import annotations

import argparse

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import weightavg as wa


class SmallCNN(nn.Module):
    """Conv1d + BatchNorm for 40-sample MNIST-1D signals."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv1d(1, 16, 5, padding=2), nn.BatchNorm1d(16), nn.ReLU(), nn.MaxPool1d(2),
            nn.Conv1d(16, 32, 5, padding=2), nn.BatchNorm1d(32), nn.ReLU(), nn.AdaptiveAvgPool1d(1),
        )
        self.head = nn.Linear(32, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x[:, None, :]).flatten(1))


def mnist1d_loaders(batch_size: int = 64) -> tuple[DataLoader, DataLoader]:
    from mnist1d.data import get_dataset_args, make_dataset

    d = make_dataset(get_dataset_args())
    train = TensorDataset(torch.tensor(d["x"], dtype=torch.float32), torch.tensor(d["y"]))
    test = TensorDataset(torch.tensor(d["x_test"], dtype=torch.float32), torch.tensor(d["y_test"]))
    g = torch.Generator().manual_seed(0)
    return DataLoader(train, batch_size=batch_size, shuffle=True, generator=g), DataLoader(test, batch_size=256)


@torch.no_grad()
def accuracy(model: nn.Module, loader: DataLoader) -> float:
    model.eval()
    hits = sum(int((model(x).argmax(1) == y).sum()) for x, y in loader)
    model.train()
    return hits / len(loader.dataset)  # type: ignore[arg-type]


def main(epochs: int = 30, swa_start: int = 20, swa_lr: float = 0.05, loaders=None) -> dict[str, float]:
    torch.manual_seed(0)
    loader, test_loader = loaders if loaders is not None else mnist1d_loaders()
    model = SmallCNN()
    loss_fn = nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)

    # the blog: swa_model = AveragedModel(model); swa_scheduler = SWALR(optimizer, swa_lr=0.05)
    swa = wa.SWA(swa_start=f"{swa_start}ep", swa_lr=swa_lr, anneal_steps="3ep")
    swa.begin(model, optimizer, bn_data=loader)  # hooks optimizer.step(); BN data for refreshes

    for epoch in range(epochs):
        for x, y in loader:
            optimizer.zero_grad()
            loss_fn(model(x), y).backward()
            optimizer.step()  # counted by the policy; it also sets the SWA rate in the SWA phase
        scheduler.step()  # keeps running: no `if epoch > swa_start` switch
        swa.on_epoch_end()  # averages at the ends of epochs swa_start, ..., epochs - 1
        if epoch % 5 == 4 or epoch == epochs - 1:
            with swa.averaged():  # averaged weights, BN statistics recomputed for them
                avg_acc = accuracy(model, test_loader)
            print(f"epoch {epoch + 1:3d}  lr {optimizer.param_groups[0]['lr']:.4f}  "
                  f"test acc: training weights {accuracy(model, test_loader):.3f}, "
                  f"{'averaged' if swa.has_average else 'averaged (none yet)'} {avg_acc:.3f}")

    last_sgd = accuracy(model, test_loader)
    swa.end()  # final BN refresh (bounded); the model now holds the SWA weights
    result = {"sgd": last_sgd, "swa": accuracy(model, test_loader), "snapshots": swa.num_updates}
    print(f"final: SGD {result['sgd']:.3f}  SWA {result['swa']:.3f}  ({swa.num_updates} snapshots)")
    return result


if __name__ == "__main__":
    torch.set_num_threads(1)
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--swa-start", type=int, default=20)
    p.add_argument("--swa-lr", type=float, default=0.05)
    a = p.parse_args()
    main(a.epochs, a.swa_start, a.swa_lr)
