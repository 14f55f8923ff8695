"""SWALP on scikit-learn's digits: float SGD vs low-precision SGD vs low-precision SWA (SWALP).

Low precision here quantizes weights, gradients and momentum to ``--bits`` (block floating point,
stochastic rounding) on every step (weightavg.lowp.LowPrecision); activations stay float32. SWALP
keeps a float32 equal average of the low-precision iterates (weightavg.Averager) over the last
quarter of training at a constant learning rate.

    python benchmarks/swalp_digits.py --seeds 5 --bits 8 4
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch
from torch import nn

import weightavg as wa
from weightavg.lowp import LowPrecision


def data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.3, stratify=y, random_state=seed)
    mu, sd = xtr.mean(0), xtr.std(0) + 1e-6
    f = lambda a: torch.tensor((a - mu) / sd, dtype=torch.float32)  # noqa: E731
    return f(xtr), torch.tensor(ytr), f(xte), torch.tensor(yte)


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def run(seed: int, bits: int | None, swa: bool, epochs: int, split) -> float:
    xtr, ytr, xte, yte = split
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    lp = LowPrecision(opt, bits=bits, generator=torch.Generator().manual_seed(seed)) if bits else None
    avg = wa.Averager(model, rule=wa.mean()) if swa else None
    swa_start = int(0.75 * epochs)
    g = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        cosine = 0.05 * 0.5 * (1 + math.cos(math.pi * epoch / epochs))
        lr = 0.05 if (swa and epoch >= swa_start) else cosine
        for grp in opt.param_groups:
            grp["lr"] = lr
        model.train()
        for idx in torch.randperm(len(xtr), generator=g).split(64):
            opt.zero_grad()
            nn.functional.cross_entropy(model(xtr[idx]), ytr[idx]).backward()
            opt.step()
            if avg is not None and epoch >= swa_start:
                avg.update(model)
    if lp is not None:
        lp.remove()
    if avg is not None:
        avg.copy_to(model)
    return accuracy(model, xte, yte)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--bits", type=int, nargs="+", default=[8, 4])
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    rows = [("float32 SGD", None, False)]
    for b in a.bits:
        rows += [(f"{b}-bit SGD", b, False), (f"{b}-bit SWALP", b, True)]
    print(f"digits (sklearn), MLP 64-128-10, {a.epochs} epochs, seeds 0..{a.seeds - 1}; test error %")
    print("| method | test error % (mean ± std) | per seed |")
    print("|---|---|---|")
    for name, bits, swa in rows:
        errs = [100 * (1 - run(s, bits, swa, a.epochs, data(s))) for s in range(a.seeds)]
        sd = statistics.stdev(errs) if len(errs) > 1 else 0.0
        print(f"| {name} | {statistics.mean(errs):.2f} ± {sd:.2f} | {' '.join(f'{e:.1f}' for e in errs)} |")
    print(f"wall time {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
