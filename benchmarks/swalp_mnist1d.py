"""SWALP on MNIST-1D: float SGD vs low-precision SGD vs SWALP, at 8 bits (the paper's setting) and below.

Low precision is SWALP's full setting (Yang et al., ICML 2019): weights, gradients and momentum
quantized after/before every optimizer step, and the activations and back-propagated errors at
the output of every Linear, Conv1d and ReLU module (so every layer's input is low precision), all
in block floating point with one exponent per row
(per output unit for weights, per example for activations) and stochastic rounding
(``weightavg.lowp.LowPrecision(..., block="row", modules=...)``).

Per seed and model, every run starts from the same initial weights and sees the same batches:

* ``float SGD``: the demo's recipe (Nesterov momentum 0.9, lr 0.1 cosine-decayed to 0, weight decay
  5e-3, batch 128).
* ``float SWA``: branches off the float run at 75 % of training, anneals (cos, 3 epochs) to
  ``--swa-lr`` and keeps a float32 equal average of the weights after every step; BatchNorm
  statistics recomputed.
* ``b-bit SGD``: the float recipe in low precision; evaluated as trained (b-bit activations).
* ``b-bit SWALP``: branches off the b-bit run at 75 % like float SWA, the average kept in float32.
  ``fp32 eval``: the average used as is (float activations, BatchNorm recomputed in float);
  ``b-bit eval``: the average quantized to b bits (nearest) and evaluated with b-bit activations
  (BatchNorm recomputed with them), i.e. a fully low-precision model at test time.

The table gives the test error (mean ± std over seeds), the paired difference to float SGD and to
b-bit SGD with two-sided paired t-test p-values, and the share of the low-precision gap that SWALP
closes: ``(err(b-bit SGD) − err(SWALP)) / (err(b-bit SGD) − err(float SGD))``.

    nice -n 10 python benchmarks/swalp_mnist1d.py             # MLP at 8 6 5 4 bits, CNN at 8 6 4, 5 seeds
    python benchmarks/swalp_mnist1d.py --models mlp --bits 8 4 --seeds 3 --epochs 10   # quicker
    python benchmarks/swalp_mnist1d.py --json r.json --plot swalp.png   # also keep and draw the results
    python benchmarks/swalp_mnist1d.py --from-json r.json --plot swalp.png   # redraw, no training

``--json`` keeps the per-seed test errors with the command, seeds, sizes and machine; ``--plot``
draws test error against bit width per model (mean ± std over seeds) and writes the command and the
machine under the figure.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from swag_mnist1d import command  # the sibling script (benchmarks/ is on sys.path when run)
from torch import Tensor, nn

import weightavg as wa
from weightavg.demo._data import load_data
from weightavg.demo._models import CNN1d, make_model
from weightavg.demo._stats import paired_test
from weightavg.lowp import LowPrecision, quantize

QUANTIZED = (nn.Linear, nn.Conv1d, nn.ReLU)


def p_value(a: list[float], b: list[float]) -> float:
    """Two-sided paired t-test p-value (scipy's ttest_rel when installed, else the demo's exact one)."""
    return paired_test(a, b).p_value


def error(model: nn.Module, x: Tensor, y: Tensor) -> float:
    model.eval()
    with torch.no_grad():
        wrong = sum(int((model(xb).argmax(1) != yb).sum()) for xb, yb in zip(x.split(500), y.split(500), strict=True))
    return 100.0 * wrong / len(y)


def build(kind: str, features: int, classes: int, channels: int) -> nn.Module:
    """The demo's MLP (40-256-256-10, BatchNorm) or its 1D CNN with ``channels`` channels."""
    return CNN1d(features, classes, channels=channels) if kind == "cnn" else make_model(kind, features, classes)


class Run:
    """One training run (float or low precision) that can be branched into an SWA phase."""

    def __init__(self, kind: str, data: Any, seed: int, bits: int | None, channels: int) -> None:
        self.spec = (kind, data.num_features, data.num_classes, channels)
        torch.manual_seed(seed)
        self.model = build(*self.spec)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.1, momentum=0.9, nesterov=True,
                                   weight_decay=5e-3)
        self.bits = bits
        self.lp = self._low_precision(seed) if bits else None

    def _low_precision(self, seed: int) -> LowPrecision:
        assert self.bits is not None
        mods = [m for m in self.model.modules() if isinstance(m, QUANTIZED)]
        return LowPrecision(self.opt, bits=self.bits, block="row", modules=mods,
                            generator=torch.Generator().manual_seed(10_000 + seed))

    def branch(self, seed: int) -> Run:
        """A copy of this run's model, optimizer state and precision (hooks of its own)."""
        other = Run.__new__(Run)
        other.spec = self.spec
        other.model = build(*self.spec)
        other.model.load_state_dict(self.model.state_dict())
        other.opt = torch.optim.SGD(other.model.parameters(), lr=0.1, momentum=0.9, nesterov=True,
                                    weight_decay=5e-3)
        other.opt.load_state_dict(self.opt.state_dict())
        other.bits = self.bits
        other.lp = other._low_precision(seed + 1) if self.bits else None  # already on the grid
        return other

    def train(self, batches: Callable[[int], list[tuple[Tensor, Tensor]]], epochs: range,
              lr: Callable[[int], float], avg: wa.Averager | None = None) -> None:
        for epoch in epochs:
            for g in self.opt.param_groups:
                g["lr"] = lr(epoch)
            self.model.train()
            for xb, yb in batches(epoch):
                self.opt.zero_grad(set_to_none=True)
                nn.functional.cross_entropy(self.model(xb), yb).backward()
                self.opt.step()
                if avg is not None:
                    avg.update(self.model)


def one_seed(kind: str, data: Any, seed: int, bits_list: list[int], epochs: int,
             swa_lr: float, channels: int) -> dict[str, float]:
    g = torch.Generator().manual_seed(seed)
    orders = [torch.randperm(len(data.y_train), generator=g) for _ in range(epochs)]

    def batches(epoch: int) -> list[tuple[Tensor, Tensor]]:
        return [(data.x_train[i], data.y_train[i]) for i in orders[epoch].split(128)]

    bn_batches = [(data.x_train[i], data.y_train[i]) for i in torch.arange(len(data.y_train)).split(500)]
    start = int(0.75 * epochs)

    def cosine(epoch: int) -> float:
        return 0.1 * 0.5 * (1 + math.cos(math.pi * epoch / epochs))

    def swa_phase(epoch: int) -> float:
        t = min(1.0, (epoch - start + 1) / 3)
        return cosine(start) + (swa_lr - cosine(start)) * (1 - math.cos(math.pi * t)) / 2

    out: dict[str, float] = {}
    for bits in [None, *bits_list]:
        run = Run(kind, data, seed, bits, channels)
        run.train(batches, range(start), cosine)
        swa = run.branch(seed)
        run.train(batches, range(start, epochs), cosine)
        name = f"{bits}-bit" if bits else "float"
        out[f"{name} SGD"] = error(run.model, data.x_test, data.y_test)  # b-bit: as trained
        avg = wa.Averager(swa.model, rule=wa.mean())
        swa.train(batches, range(start, epochs), swa_phase, avg)
        if bits:
            assert swa.lp is not None
            avg.copy_to(swa.model)
            with torch.no_grad():
                for p in swa.model.parameters():
                    p.copy_(quantize(p, bits, block="row", rounding="nearest"))
            wa.recompute_bn(swa.model, bn_batches)  # with b-bit activations
            out[f"{name} SWALP, {bits}-bit eval"] = error(swa.model, data.x_test, data.y_test)
            swa.lp.remove()
        avg.copy_to(swa.model)
        wa.recompute_bn(swa.model, bn_batches)
        out[f"{name} SWALP, fp32 eval" if bits else "float SWA"] = error(swa.model, data.x_test, data.y_test)
    return out


def table(kind: str, results: list[dict[str, float]], bits_list: list[int]) -> list[str]:
    def col(name: str) -> list[float]:
        return [r[name] for r in results]

    fl = col("float SGD")
    lines = [f"| {kind} | method | test error % | Δ vs float SGD (p) | Δ vs b-bit SGD (p) | gap closed |",
             "|---|---|---|---|---|---|"]

    def row(name: str, ref: list[float] | None) -> str:
        v = col(name)
        sd = statistics.stdev(v) if len(v) > 1 else 0.0
        d_f = statistics.mean(a - b for a, b in zip(v, fl, strict=True))
        cell_f = "—" if name == "float SGD" else f"{d_f:+.2f} ({p_value(v, fl):.3f})"
        cell_b, closed = "—", "—"
        if ref is not None:
            d_b = statistics.mean(a - b for a, b in zip(v, ref, strict=True))
            cell_b = f"{d_b:+.2f} ({p_value(v, ref):.3f})"
            gap = statistics.mean(ref) - statistics.mean(fl)
            if gap > 0:
                closed = f"{100 * (statistics.mean(ref) - statistics.mean(v)) / gap:.0f} %"
        return f"| | {name} | {statistics.mean(v):.2f} ± {sd:.2f} | {cell_f} | {cell_b} | {closed} |"

    lines += [row("float SGD", None), row("float SWA", None)]
    for b in bits_list:
        ref = col(f"{b}-bit SGD")
        lines += [row(f"{b}-bit SGD", None), row(f"{b}-bit SWALP, fp32 eval", ref),
                  row(f"{b}-bit SWALP, {b}-bit eval", ref)]
    return lines


def plot(record: dict[str, Any], path: str) -> None:
    """Test error against bit width per model: mean ± std over seeds, float as the leftmost point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = record["models"]
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 3.6), squeeze=False)
    for ax, (kind, m) in zip(axes[0], models.items(), strict=True):
        res, bits = m["results"], m["bits"]
        xs = ["float", *[f"{b}-bit" for b in bits]]

        def ms(name: str, res: list[dict[str, float]] = res) -> tuple[float, float]:
            v = [r[name] for r in res]
            return statistics.mean(v), (statistics.stdev(v) if len(v) > 1 else 0.0)

        series = [("SGD (as trained)", ["float SGD", *[f"{b}-bit SGD" for b in bits]], "o-"),
                  ("SWA / SWALP, fp32 eval", ["float SWA", *[f"{b}-bit SWALP, fp32 eval" for b in bits]], "s-"),
                  ("SWALP, b-bit eval", [None, *[f"{b}-bit SWALP, {b}-bit eval" for b in bits]], "^--")]
        for j, (label, names, fmt) in enumerate(series):
            pts = [(i + (j - 1) * 0.08, *ms(n)) for i, n in enumerate(names) if n is not None]
            ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], fmt=fmt,
                        capsize=3, ms=5, label=label)
        ax.set_xticks(range(len(xs)), xs)
        ax.set_ylabel("test error %  (lower is better)")
        ax.set_title(f"{kind.upper()} ({m['parameters']:,} parameters), {m['epochs']} epochs", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"SWALP on MNIST-1D: {len(record['seeds'])} seeds, mean ± std; weights, gradients, "
                 "momentum and activations in b-bit block floating point", fontsize=9)
    fig.text(0.01, 0.01, f"$ {record['command']}\n{record['machine']}, {record['threads']} thread(s)",
             fontsize=7, family="monospace")
    fig.tight_layout(rect=(0, 0.09, 1, 1))
    fig.savefig(path, dpi=90)
    plt.close(fig)
    print(f"wrote {path}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["mlp", "cnn"], choices=["mlp", "cnn"])
    p.add_argument("--bits", type=int, nargs="+", default=[8, 6, 5, 4], help="widths for the MLP")
    p.add_argument("--cnn-bits", type=int, nargs="+", default=[8, 6, 4], help="widths for the CNN")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--epochs", type=int, default=15, help="epochs for the MLP")
    p.add_argument("--cnn-epochs", type=int, default=10)
    p.add_argument("--cnn-channels", type=int, default=16)
    p.add_argument("--swa-lr", type=float, default=0.03)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", metavar="PATH", help="write the per-seed results, command and machine")
    p.add_argument("--plot", metavar="PATH", help="draw the results (PNG; needs matplotlib)")
    p.add_argument("--from-json", metavar="PATH", help="no training: plot a --json file's results")
    a = p.parse_args()
    if a.from_json:
        with open(a.from_json) as f:
            rec = json.load(f)
        if a.plot:
            plot(rec, a.plot)
        return
    torch.set_num_threads(a.threads)
    record: dict[str, Any] = {
        "command": command("benchmarks/swalp_mnist1d.py", sys.argv[1:]), "seeds": list(range(a.seeds)),
        "threads": a.threads,
        "machine": f"{os.cpu_count()}-core CPU, {platform.system()} {platform.machine()}, torch {torch.__version__}",
        "swa_lr": a.swa_lr, "models": {}}
    data = load_data("mnist1d")
    print(f"{data.description}; seeds 0..{a.seeds - 1}, torch {torch.__version__}, {a.threads} thread(s)")
    for kind in a.models:
        t0 = time.perf_counter()
        bits, epochs = (a.cnn_bits, a.cnn_epochs) if kind == "cnn" else (a.bits, a.epochs)
        results = [one_seed(kind, data, s, bits, epochs, a.swa_lr, a.cnn_channels) for s in range(a.seeds)]
        n = sum(p.numel() for p in build(kind, data.num_features, data.num_classes, a.cnn_channels).parameters())
        print(f"\n{kind} ({n:,} parameters), {epochs} epochs, widths {bits}")
        print("\n".join(table(kind, results, bits)))
        print(f"{kind}: {time.perf_counter() - t0:.0f} s")
        record["models"][kind] = {"bits": bits, "epochs": epochs, "parameters": n, "results": results,
                                  "wall_s": time.perf_counter() - t0}
    if a.json:
        with open(a.json, "w") as f:
            json.dump(record, f, indent=1)
    if a.plot:
        plot(record, a.plot)


if __name__ == "__main__":
    main()
