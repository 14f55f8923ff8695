"""Cost of BatchNorm recomputation against the forward passes it needs.

Times, on the same batches of a 6-block conv+BatchNorm net (CPU, one thread by default):

* a plain train-mode forward over the batches under ``torch.no_grad()`` (the floor: any exact
  recomputation reads every batch through the model once),
* ``weightavg.recompute_bn`` (exact sample-weighted statistics),
* ``torch.optim.swa_utils.update_bn`` (torch's cumulative average: exact for equal batches only).

The three are run interleaved in random order for ``--rounds`` rounds so that the drift of a
shared machine hits them alike; the table gives each median and its ratio to the forward's, and
the median of the per-round paired ratios.

Run: ``python benchmarks/bn_recompute.py`` (``--threads 1``, ``--batches 8``, ``--batch 64``).
Timings from a busy machine are indicative only; take the figures on a quiet one.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn
from torch.optim.swa_utils import update_bn

import weightavg as wa


def six_block_net(width: int = 32) -> nn.Module:
    """Six conv → BatchNorm2d → ReLU blocks on 3×32×32 inputs, then a linear head."""
    layers: list[nn.Module] = []
    c = 3
    for i in range(6):
        layers += [nn.Conv2d(c, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU()]
        if i % 2 == 1:
            layers.append(nn.MaxPool2d(2))
        c = width
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 10))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batches", type=int, default=8)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=15)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    net = six_block_net()
    data = [torch.randn(args.batch, 3, 32, 32) for _ in range(args.batches)]

    def forward() -> None:
        net.train()
        with torch.no_grad():
            for x in data:
                net(x)
        net.eval()

    def recompute() -> None:
        wa.recompute_bn(net, data)

    def torch_update_bn() -> None:
        update_bn(data, net)

    variants: dict[str, Callable[[], None]] = {
        "train-mode forward": forward, "weightavg.recompute_bn": recompute, "torch update_bn": torch_update_bn}
    for fn in variants.values():  # warm up
        fn()
    times: dict[str, list[float]] = {k: [] for k in variants}
    rng = random.Random(0)
    for _ in range(args.rounds):
        order = list(variants)
        rng.shuffle(order)
        for k in order:
            t0 = time.perf_counter()
            variants[k]()
            times[k].append(time.perf_counter() - t0)
    base = statistics.median(times["train-mode forward"])
    print(f"{args.batches} batches of {args.batch}×3×32×32, 6 conv+BN blocks, {args.threads} thread(s), "
          f"{args.rounds} interleaved rounds, torch {torch.__version__}")
    print(f"{'':26} {'median ms':>10} {'× forward':>10} {'paired ×':>10}")
    for k, ts in times.items():
        paired = statistics.median(t / f for t, f in zip(ts, times["train-mode forward"], strict=True))
        print(f"{k:26} {statistics.median(ts) * 1e3:10.1f} {statistics.median(ts) / base:10.3f} {paired:10.3f}")


if __name__ == "__main__":
    main()
