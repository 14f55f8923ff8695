"""SGD vs SWA vs SWAG-Diag vs SWAG vs MultiSWA vs MultiSWAG on MNIST-1D with a small 1D CNN.

Protocol (every method gets the same number of training epochs per run):

- Data: MNIST-1D generated locally (``mnist1d.data.make_dataset(get_dataset_args())``, 4000 train
  examples); per seed, 500 of them are held out as a validation split. The test set is a separate
  draw of the generator with another seed (10,000 examples by default), so the test numbers have
  small sampling error.
- Learning rates are tuned on the validation split of a separate tuning seed: first the SGD
  learning rate (grid, lowest validation NLL, SGD schedule), then the constant SWA-phase
  learning rate (grid, lowest SWA validation NLL) at that initial rate. NLL, not accuracy: on
  500 validation examples accuracies differ by a handful of examples, which is noise.
- SGD: momentum 0.9; lr constant for the first half, linear decay to 0.01·lr at 90 %, then flat
  (the schedule of the SWAG paper's SGD baselines).
- SWA/SWAG: the same shape compressed into the first ``swa_start`` epochs, decaying to the SWA
  rate, then that rate held while a SWAG posterior (rank 20) collects one snapshot per epoch.
- SWAG and SWAG-Diag: their variance ``scale`` is chosen per seed on the validation split by
  :func:`weightavg.swag.select_scale` (lowest validation NLL); MultiSWAG reuses SWAG's scale.
- Predictions: BMA of probabilities over 30 draws (SWAG) or 10 per member (MultiSWAG, M = 3),
  with BatchNorm statistics recomputed for every draw; SWA and MultiSWA use the means.

    python benchmarks/swag_mnist1d.py               # full run (5 seeds)
    python benchmarks/swag_mnist1d.py --quick       # smoke run (~1 min)
    python benchmarks/swag_mnist1d.py --lr 0.05 --swa-lr 0.2 --json r.json --plot swag.png
    python benchmarks/swag_mnist1d.py --from-json r.json --plot swag.png   # redraw, no training

``--json`` keeps the per-seed results with the command, seeds, sizes and machine; ``--plot``
draws test accuracy, NLL and ECE per method (mean ± std over seeds, one dot per seed) and writes
the command and the machine under the figure.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable

import torch
from torch import nn

import weightavg as wa
from weightavg import metrics
from weightavg.swag import SWAG, MultiSWA, MultiSWAG, bma_predict, select_scale

Batches = list[tuple[torch.Tensor, torch.Tensor]]
METHODS = ["SGD", "SWA", "SWAG-Diag", "SWAG", "MultiSWA", "MultiSWAG"]


# ----------------------------------------------------------------------------- data & model


def make_data(test_size: int) -> dict[str, torch.Tensor]:
    from mnist1d.data import get_dataset_args, make_dataset

    d = make_dataset(get_dataset_args())
    args = get_dataset_args()
    args.seed = 4321  # a different draw of the generator for the large test set
    args.num_samples = int(math.ceil(test_size / 0.8 / 10) * 10)
    args.train_split = 0.2
    t = make_dataset(args)
    f32 = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
    return {"x": f32(d["x"]), "y": torch.tensor(d["y"]),
            "x_test": f32(t["x_test"][:test_size]), "y_test": torch.tensor(t["y_test"][:test_size])}


class CNN(nn.Module):
    def __init__(self, channels: int = 32) -> None:
        super().__init__()
        c = channels
        self.features = nn.Sequential(
            nn.Conv1d(1, c, 5, padding=2), nn.BatchNorm1d(c), nn.ReLU(),
            nn.Conv1d(c, c, 3, padding=1, stride=2), nn.BatchNorm1d(c), nn.ReLU(),
            nn.Conv1d(c, c, 3, padding=1, stride=2), nn.BatchNorm1d(c), nn.ReLU(),
        )
        self.head = nn.Linear(c * 10, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x[:, None, :]).flatten(1))


def batches(x: torch.Tensor, y: torch.Tensor, size: int = 1000) -> Batches:
    return [(x[i : i + size], y[i : i + size]) for i in range(0, len(x), size)]


# ----------------------------------------------------------------------------- training


def lr_factor(t: float, final: float) -> float:
    """1 until t = .5, linear to ``final`` at t = .9, then ``final`` (SWAG paper schedule)."""
    if t <= 0.5:
        return 1.0
    if t <= 0.9:
        return 1.0 - (1.0 - final) * (t - 0.5) / 0.4
    return final


def train(x: torch.Tensor, y: torch.Tensor, *, seed: int, epochs: int, lr: float,
          swa_lr: float | None, swa_start: int, wd: float = 1e-4) -> tuple[CNN, SWAG | None]:
    """SGD (swa_lr None) or SWA/SWAG training; returns the final model and the posterior."""
    torch.manual_seed(seed)
    model = CNN()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=wd)
    swag = SWAG(model, max_rank=20) if swa_lr is not None else None
    g = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        if swa_lr is None:
            rate = lr * lr_factor(epoch / epochs, 0.01)
        else:
            rate = lr * lr_factor(epoch / swa_start, swa_lr / lr) if epoch < swa_start else swa_lr
        for grp in opt.param_groups:
            grp["lr"] = rate
        model.train()
        for idx in torch.randperm(len(x), generator=g).split(128):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
        if swag is not None and epoch >= swa_start:
            swag.collect(model)
    return model, swag


def predict(model: nn.Module, data: Batches) -> torch.Tensor:
    return wa.swag.predict_probs(model, data)


def scores(probs: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    return {"acc": 100 * metrics.accuracy(probs, labels), "nll": metrics.nll(probs, labels),
            "ece": 100 * metrics.ece(probs, labels)}


# ----------------------------------------------------------------------------- one seed


def split(d: dict[str, torch.Tensor], seed: int, n_val: int = 500):
    perm = torch.randperm(len(d["x"]), generator=torch.Generator().manual_seed(10_000 + seed))
    val, tr = perm[:n_val], perm[n_val:]
    return d["x"][tr], d["y"][tr], d["x"][val], d["y"][val]


def timed(fn: Callable[[], object]) -> tuple[object, float]:
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def run_seed(d, seed: int, a: argparse.Namespace, lr: float, swa_lr: float) -> dict[str, dict]:
    xtr, ytr, xval, yval = split(d, seed)
    test = batches(d["x_test"], d["y_test"])
    val = batches(xval, yval)
    bn = batches(xtr, ytr, 256)[: a.bn_batches]
    swa_start = int(a.epochs * a.swa_start)
    out: dict[str, dict] = {}

    (sgd, _), t_sgd = timed(lambda: train(xtr, ytr, seed=seed, epochs=a.epochs, lr=lr, swa_lr=None,
                                          swa_start=swa_start))
    p, t = timed(lambda: predict(sgd, test))
    out["SGD"] = {**scores(p, d["y_test"]), "time": t_sgd + t}

    posts, t_runs = [], []
    for m in range(a.members):
        (_, post), t_run = timed(lambda m=m: train(xtr, ytr, seed=seed * 100 + m + 1, epochs=a.epochs,
                                                   lr=lr, swa_lr=swa_lr, swa_start=swa_start))
        posts.append(post)
        t_runs.append(t_run)
    model = CNN()
    swag = posts[0]

    p, t = timed(lambda: bma_predict(swag, model, test, num_samples=1, scale=0.0, bn_data=bn))
    out["SWA"] = {**scores(p, d["y_test"]), "time": t_runs[0] + t}

    chosen = {}
    for name, diag in (("SWAG-Diag", True), ("SWAG", False)):
        def select(diag: bool = diag) -> tuple[float, dict[float, float]]:
            return select_scale(swag, model, val, yval, scales=a.scales, num_samples=a.val_samples,
                                bn_data=bn, diag_only=diag,
                                generator=torch.Generator().manual_seed(seed))
        (scale, _), t_sel = timed(select)
        chosen[name] = scale
        g = torch.Generator().manual_seed(seed + 1)
        p, t = timed(lambda s=scale, diag=diag, g=g: bma_predict(
            swag, model, test, num_samples=a.samples, scale=s, diag_only=diag, bn_data=bn, generator=g))
        out[name] = {**scores(p, d["y_test"]), "time": t_runs[0] + t_sel + t, "scale": scale}

    p, t = timed(lambda: bma_predict(MultiSWA(posts), model, test, bn_data=bn))
    out["MultiSWA"] = {**scores(p, d["y_test"]), "time": sum(t_runs) + t}
    g = torch.Generator().manual_seed(seed + 2)
    p, t = timed(lambda: bma_predict(MultiSWAG(posts), model, test, num_samples=a.samples // a.members,
                                     scale=chosen["SWAG"], bn_data=bn, generator=g))
    out["MultiSWAG"] = {**scores(p, d["y_test"]), "time": sum(t_runs) + t, "scale": chosen["SWAG"]}
    return out


# ----------------------------------------------------------------------------- tuning


def tune(d, a: argparse.Namespace) -> tuple[float, float, list[str]]:
    """Pick the SGD rate, then the SWA-phase rate, on the validation split of a tuning seed."""
    seed = 999
    xtr, ytr, xval, yval = split(d, seed)
    val = batches(xval, yval)
    bn = batches(xtr, ytr, 256)[: a.bn_batches]
    swa_start = int(a.epochs * a.swa_start)
    log = []
    best_lr, best = a.lrs[0], math.inf
    for lr in a.lrs:
        model, _ = train(xtr, ytr, seed=seed, epochs=a.epochs, lr=lr, swa_lr=None, swa_start=swa_start)
        s = scores(predict(model, val), yval)
        log.append(f"  SGD lr={lr:<6g} val acc {s['acc']:.2f}  nll {s['nll']:.4f}")
        if s["nll"] < best:
            best_lr, best = lr, s["nll"]
    best_swa, best = a.swa_lrs[0], math.inf
    for swa_lr in a.swa_lrs:
        _, post = train(xtr, ytr, seed=seed, epochs=a.epochs, lr=best_lr, swa_lr=swa_lr,
                        swa_start=swa_start)
        assert post is not None
        p = bma_predict(post, CNN(), val, num_samples=1, scale=0.0, bn_data=bn)
        s = scores(p, yval)
        log.append(f"  SWA lr={best_lr:g} swa_lr={swa_lr:<6g} val acc {s['acc']:.2f}  "
                   f"nll {s['nll']:.4f}")
        if s["nll"] < best:
            best_swa, best = swa_lr, s["nll"]
    return best_lr, best_swa, log


# ----------------------------------------------------------------------------- record & plot


def machine() -> str:
    """The machine in words: CPU count, OS and torch build (what a figure's caption names)."""
    return (f"{os.cpu_count()}-core CPU, {platform.system()} {platform.machine()}, "
            f"torch {torch.__version__}")


def command(script: str, argv: list[str]) -> str:
    """The command line that produced the results, without the output options (--json, --plot)."""
    kept, skip = [], False
    for x in argv:
        if skip:
            skip = False
        elif x in ("--json", "--plot"):
            skip = True
        elif not x.startswith(("--json=", "--plot=")):
            kept.append(shlex.quote(x))
    return " ".join(["python", script, *kept])


def plot(record: dict, path: str) -> None:
    """Accuracy, NLL and ECE per method: mean ± std over seeds, one dot per seed, caption below."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res, n = record["results"], len(record["seeds"])
    fig, axes = plt.subplots(1, 3, figsize=(10, 3.4))
    for ax, (key, label) in zip(axes, [("acc", "test accuracy %  (higher is better)"),
                                       ("nll", "test NLL  (lower is better)"),
                                       ("ece", "test ECE %, 15 bins  (lower is better)")], strict=True):
        for i, m in enumerate(METHODS):
            v = res[m][key]
            sd = statistics.stdev(v) if len(v) > 1 else 0.0
            ax.errorbar([i], [statistics.mean(v)], yerr=[sd], fmt="o", color=f"C{i}", capsize=4, ms=6)
            ax.scatter([i + 0.18] * len(v), v, s=8, color=f"C{i}", alpha=0.5)
        ax.set_xticks(range(len(METHODS)), METHODS, rotation=30, fontsize=8)
        ax.set_title(label, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    a = record["args"]
    fig.suptitle(f"MNIST-1D, 1D CNN with BatchNorm: {n} seeds, mean ± std (dots: seeds), "
                 f"{a['epochs']} epochs, test set {a['test_size']:,}", fontsize=10)
    fig.text(0.01, 0.01, f"$ {record['command']}\n{record['machine']}, {a['threads']} thread(s); "
             f"lr={record['lr']:g}, swa_lr={record['swa_lr']:g}", fontsize=7, family="monospace")
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=90)
    plt.close(fig)
    print(f"wrote {path}")


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=40, help="training epochs of every run")
    ap.add_argument("--swa-start", type=float, default=0.5, help="fraction of epochs before SWA")
    ap.add_argument("--members", type=int, default=3, help="M for MultiSWA/MultiSWAG")
    ap.add_argument("--samples", type=int, default=30, help="BMA draws (split over members)")
    ap.add_argument("--val-samples", type=int, default=10, help="draws per scale on validation")
    ap.add_argument("--scales", type=float, nargs="+", default=[0.1, 0.3, 1.0, 3.0])
    ap.add_argument("--bn-batches", type=int, default=8, help="batches of 256 for BN recompute")
    ap.add_argument("--test-size", type=int, default=10_000)
    ap.add_argument("--lrs", type=float, nargs="+", default=[0.02, 0.05, 0.1, 0.2])
    ap.add_argument("--swa-lrs", type=float, nargs="+", default=[0.02, 0.05, 0.1, 0.2])
    ap.add_argument("--lr", type=float, default=None, help="skip tuning: SGD learning rate")
    ap.add_argument("--swa-lr", type=float, default=None, help="skip tuning: SWA learning rate")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="2 seeds, 16 epochs, small test set")
    ap.add_argument("--json", metavar="PATH", help="write the per-seed results, command and machine")
    ap.add_argument("--plot", metavar="PATH", help="draw the results (PNG; needs matplotlib)")
    ap.add_argument("--from-json", metavar="PATH", help="no training: plot a --json file's results")
    a = ap.parse_args(argv)
    if a.from_json:
        with open(a.from_json) as f:
            record = json.load(f)
        if a.plot:
            plot(record, a.plot)
        return 0
    if a.quick:
        a.seeds, a.epochs, a.test_size, a.samples, a.val_samples = 2, 16, 2000, 12, 4
        a.lrs, a.swa_lrs = a.lrs[1:3], a.swa_lrs[1:3]
    torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    d = make_data(a.test_size)
    print(f"MNIST-1D: {len(d['x'])} train (500 held out per seed for validation), "
          f"{len(d['x_test'])} test (generator seed 4321); CNN "
          f"{sum(p.numel() for p in CNN().parameters()):,} parameters; {a.epochs} epochs per run; "
          f"threads={a.threads}")
    if a.lr is not None and a.swa_lr is not None:
        lr, swa_lr = a.lr, a.swa_lr
        print(f"learning rates given: lr={lr:g}, swa_lr={swa_lr:g}")
    else:
        lr, swa_lr, log = tune(d, a)
        print("tuning on seed 999's validation split:")
        print("\n".join(log))
        print(f"chosen: lr={lr:g}, swa_lr={swa_lr:g}  ({time.perf_counter() - t0:.0f} s so far)")

    res: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for seed in range(a.seeds):
        out = run_seed(d, seed, a, lr, swa_lr)
        for meth, row in out.items():
            for k, v in row.items():
                res[meth][k].append(v)
        print(f"seed {seed}: " + ", ".join(
            f"{m} {out[m]['acc']:.2f}/{out[m]['nll']:.3f}" for m in METHODS)
            + f"  (scales: diag {out['SWAG-Diag']['scale']:g}, swag {out['SWAG']['scale']:g}; "
            f"{time.perf_counter() - t0:.0f} s)", flush=True)

    def ms(v: list[float], f: str) -> str:
        sd = statistics.stdev(v) if len(v) > 1 else 0.0
        return f"{statistics.mean(v):{f}} ± {sd:{f}}"

    print(f"\n{a.seeds} seeds, mean ± std; test accuracy %, NLL, ECE % (15 equal-width bins); "
          "time = training + scale selection + prediction, seconds per seed")
    print(f"{'method':<10} {'accuracy':>15} {'NLL':>17} {'ECE':>13} {'time s':>8}  scale")
    for m in METHODS:
        r = res[m]
        scale = ",".join(f"{s:g}" for s in r["scale"]) if "scale" in r else "-"
        print(f"{m:<10} {ms(r['acc'], '.2f'):>15} {ms(r['nll'], '.4f'):>17} {ms(r['ece'], '.2f'):>13} "
              f"{statistics.mean(r['time']):8.1f}  {scale}")
    base = res["SWA"]
    for m in ("SWAG-Diag", "SWAG", "MultiSWAG"):
        dn = [x - y for x, y in zip(res[m]["nll"], base["nll"], strict=True)]
        print(f"paired NLL difference {m} − SWA: {ms(dn, '+.4f')}")
    dn = [x - y for x, y in zip(res["MultiSWAG"]["nll"], res["MultiSWA"]["nll"], strict=True)]
    print(f"paired NLL difference MultiSWAG − MultiSWA: {ms(dn, '+.4f')}")
    da = [x - y for x, y in zip(res["SWA"]["acc"], res["SGD"]["acc"], strict=True)]
    print(f"paired accuracy difference SWA − SGD: {ms(da, '+.2f')} points")
    print(f"total wall time {time.perf_counter() - t0:.0f} s")
    cmd = command("benchmarks/swag_mnist1d.py", sys.argv[1:] if argv is None else argv)
    record = {"command": cmd, "machine": machine(), "seeds": list(range(a.seeds)), "lr": lr,
              "swa_lr": swa_lr, "args": {k: v for k, v in vars(a).items()
                                         if k not in ("json", "plot", "from_json")},
              "results": {m: dict(r) for m, r in res.items()}, "wall_s": time.perf_counter() - t0}
    if a.json:
        with open(a.json, "w") as f:
            json.dump(record, f, indent=1)
    if a.plot:
        plot(record, a.plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
