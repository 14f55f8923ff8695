"""Windowed checkpoint averages (LAWA, minus-sqrt) vs a cooldown, and model soups, on MNIST-1D.

Part A, windows (per seed; the demo's MLP 40-256-256-10 with BatchNorm; 500 training examples
held out as validation):

- One constant-learning-rate run: SGD, momentum 0.9, weight decay 5e-4, batch 128, ``--epochs``
  epochs at ``--lr``. ``weightavg.WindowAverage`` policies take one snapshot per epoch: uniform
  windows of k = 2…10 (LAWA) and minus-sqrt windows of k = 5 and 10 (WSM). BatchNorm statistics
  of every averaged model are recomputed from the training split (the policy does it).
- Cooldown of equal compute: the same run branched at ``epochs − cooldown``, with the learning
  rate decayed to 0 by a half cosine over the last ``cooldown`` epochs (same number of steps).

Part B, soups (per seed): a shared start (``--pretrain`` epochs at lr 0.05), then 8 fine-tunes of
``--finetune`` epochs with learning rates {0.01, 0.02, 0.05, 0.1} × 2 data orders. Best single
model (by validation accuracy), uniform soup of all 8 and ``weightavg.greedy_soup`` (validation
accuracy as the score) are compared on the test split.

Reported: test accuracy, mean ± std over seeds, paired differences with two-sided paired t-test
p-values.

    python benchmarks/window_mnist1d.py               # 5 seeds
    python benchmarks/window_mnist1d.py --quick       # smoke run
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import torch
from torch import nn

import weightavg as wa
from weightavg.demo._data import load_data
from weightavg.demo._models import make_model
from weightavg.demo._stats import mean_std, paired_test

KS = list(range(2, 11))
MSQ = [5, 10]


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return float((model(x).argmax(1) == y).float().mean())


def bn_batches(x: torch.Tensor) -> list[torch.Tensor]:
    return [x[i : i + 500] for i in range(0, len(x), 500)]


def epoch(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
          g: torch.Generator, lrs: list[float] | None = None) -> None:
    model.train()
    for j, idx in enumerate(torch.randperm(len(x), generator=g).split(128)):
        if lrs is not None:
            for grp in opt.param_groups:
                grp["lr"] = lrs[j]
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()


def split(seed: int) -> tuple[torch.Tensor, ...]:
    data = load_data("mnist1d")
    perm = torch.randperm(len(data.y_train), generator=torch.Generator().manual_seed(seed))
    val, tr = perm[:500], perm[500:]
    return (data.x_train[tr], data.y_train[tr], data.x_train[val], data.y_train[val],
            data.x_test, data.y_test)


def windows(seed: int, epochs: int, cooldown: int, lr: float) -> dict[str, float]:
    x, y, _xv, _yv, xt, yt = split(seed)
    torch.manual_seed(seed)
    model = make_model("mlp", x.shape[1], 10)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    g = torch.Generator().manual_seed(seed)
    pols: dict[str, wa.WindowAverage] = {}
    for k in KS:
        pols[f"LAWA k={k}"] = wa.WindowAverage(k=k, every="1ep", eval_with="training", final="training",
                                               name=f"lawa{k}")
    for k in MSQ:
        pols[f"minus-sqrt k={k}"] = wa.WindowAverage(k=k, every="1ep", weights="minus-sqrt",
                                                     eval_with="training", final="training", name=f"msq{k}")
    for p in pols.values():
        p.begin(model, opt, bn_data=bn_batches(x))
    branch = None
    for e in range(epochs):
        if e == epochs - cooldown:
            branch = (copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict()), g.get_state())
        epoch(model, opt, x, y, g)
        for p in pols.values():
            p.on_epoch_end()
    out = {"raw iterate (constant lr)": accuracy(model, xt, yt)}
    for name, p in pols.items():
        sd = p.export_state_dict()
        m = make_model("mlp", x.shape[1], 10)
        m.load_state_dict(sd)
        out[name] = accuracy(m, xt, yt)
        p.end()
    # the cooldown branch: same steps, lr -> 0 by a half cosine over the last `cooldown` epochs
    assert branch is not None
    m = make_model("mlp", x.shape[1], 10)
    m.load_state_dict(branch[0])
    o = torch.optim.SGD(m.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    o.load_state_dict(branch[1])
    g2 = torch.Generator()
    g2.set_state(branch[2])
    steps_per_epoch = math.ceil(len(x) / 128)
    total = cooldown * steps_per_epoch
    for e in range(cooldown):
        lrs = [lr * 0.5 * (1 + math.cos(math.pi * (e * steps_per_epoch + j + 1) / total))
               for j in range(steps_per_epoch)]
        epoch(m, o, x, y, g2, lrs)
    out[f"cosine cooldown ({cooldown} ep, equal compute)"] = accuracy(m, xt, yt)
    return out


def soups(seed: int, pretrain: int, finetune: int) -> dict[str, float | list[int]]:
    x, y, xv, yv, xt, yt = split(seed)
    torch.manual_seed(seed)
    base = make_model("mlp", x.shape[1], 10)
    opt = torch.optim.SGD(base.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    g = torch.Generator().manual_seed(seed)
    for _ in range(pretrain):
        epoch(base, opt, x, y, g)
    start = copy.deepcopy(base.state_dict())
    ingredients = []
    for lr in (0.01, 0.02, 0.05, 0.1):
        for order in range(2):
            m = make_model("mlp", x.shape[1], 10)
            m.load_state_dict(start)
            o = torch.optim.SGD(m.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
            gg = torch.Generator().manual_seed(seed * 1000 + order)
            for _ in range(finetune):
                epoch(m, o, x, y, gg)
            ingredients.append({k: v.clone() for k, v in m.state_dict().items()})
    evaluator = make_model("mlp", x.shape[1], 10)

    def load(sd: dict[str, torch.Tensor]) -> nn.Module:
        evaluator.load_state_dict(sd)
        wa.recompute_bn(evaluator, bn_batches(x))
        return evaluator

    def val_score(sd: dict[str, torch.Tensor]) -> float:
        return accuracy(load(sd), xv, yv)

    vals = [val_score(sd) for sd in ingredients]
    best = max(range(len(vals)), key=lambda i: vals[i])
    out: dict[str, float | list[int]] = {"best single model (validation)": accuracy(load(ingredients[best]), xt, yt)}
    uniform = {k: (torch.stack([sd[k].double() for sd in ingredients]).mean(0).to(v.dtype)
                   if v.is_floating_point() else v) for k, v in ingredients[-1].items()}
    out["uniform soup (8)"] = accuracy(load(uniform), xt, yt)
    soup = wa.greedy_soup(ingredients, val_score)
    out["greedy soup"] = accuracy(load(soup.state_dict), xt, yt)
    out["greedy members"] = soup.members
    return out


def table(rows: list[dict[str, float]], ref: str, title: str) -> None:
    print(f"\n{title}")
    print(f"| model | test acc. % | vs {ref} (paired) | p |")
    print("|---|---|---|---|")
    base = [r[ref] for r in rows]
    for name in rows[0]:
        if not isinstance(rows[0][name], float):
            continue
        v = [r[name] for r in rows]
        m, s = mean_std(v)
        if name == ref:
            print(f"| {name} | {100 * m:.2f} ± {100 * s:.2f} |  |  |")
            continue
        pt = paired_test(v, base)
        print(f"| {name} | {100 * m:.2f} ± {100 * s:.2f} | {100 * pt.diff_mean:+.2f} ± {100 * pt.diff_std:.2f} "
              f"| {pt.p_value:.3g} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=60)
    ap.add_argument("--cooldown", type=int, default=6)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--pretrain", type=int, default=20)
    ap.add_argument("--finetune", type=int, default=10)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    if args.quick:
        args.seeds, args.epochs, args.cooldown, args.pretrain, args.finetune = 2, 12, 3, 3, 2
    torch.set_num_threads(1)
    win, soup = [], []
    for seed in range(args.seeds):
        t0 = time.perf_counter()
        win.append(windows(seed, args.epochs, args.cooldown, args.lr))
        t1 = time.perf_counter()
        soup.append(soups(seed, args.pretrain, args.finetune))
        print(f"seed {seed}: windows {t1 - t0:.0f} s, soups {time.perf_counter() - t1:.0f} s; greedy members "
              f"{soup[-1]['greedy members']}", flush=True)
    table(win, "raw iterate (constant lr)",
          f"Part A: MNIST-1D MLP, {args.epochs} epochs at constant lr {args.lr}, {len(win)} seeds")
    cd = f"cosine cooldown ({args.cooldown} ep, equal compute)"
    table(win, cd, "Part A against the cooldown")
    table(soup, "best single model (validation)",  # type: ignore[arg-type]
          f"Part B: soups of 8 fine-tunes ({args.pretrain} ep shared start + {args.finetune} ep), {len(soup)} seeds")
    if args.json:
        args.json.write_text(json.dumps({"windows": win, "soups": soup}, indent=1))


if __name__ == "__main__":
    main()
