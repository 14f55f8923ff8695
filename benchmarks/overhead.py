"""Overhead of averaging on a training step: a small CNN on CPU, EMA updated after every step.

Compares a plain training step with the same step plus

* ``weightavg.EMA(half_life=...)`` (the policy: optimizer hook + engine update every step),
* ``torch.optim.swa_utils.AveragedModel`` with ``get_ema_multi_avg_fn`` (a peer), called by hand.

Steps of the three variants are interleaved in random order, so that the drift of a shared machine
hits them alike. The overhead is the median of the paired differences (variant step − adjacent
plain step) over the plain step's median, with a bootstrap 95% interval; the averaging work alone
(what runs after each optimizer step) is also timed on its own.

Run: ``python benchmarks/overhead.py`` (``--threads 1`` by default; ``--batch``, ``--pairs``).
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

import weightavg as wa


class SmallCNN(nn.Module):
    """Two conv blocks with BatchNorm on 1×28×28 inputs (~25k parameters)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
        )
        self.head = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x).flatten(1))


def make_variant(kind: str, batch: int) -> tuple[Callable[[], float], Callable[[], None] | None]:
    """A function timing one training step of this variant, and its averaging work alone."""
    torch.manual_seed(0)
    model = SmallCNN()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(batch, 1, 28, 28)
    y = torch.randint(0, 10, (batch,))
    peer: AveragedModel | None = None
    alone: Callable[[], None] | None = None
    if kind == "weightavg.EMA":
        ema = wa.EMA(half_life="1000ba")
        ema.begin(model, opt)

        def alone() -> None:  # what the optimizer hook does after each step
            ema._after_step(0)
    elif kind == "torch AveragedModel":
        peer = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.999), use_buffers=True)

        def alone() -> None:
            assert peer is not None
            peer.update_parameters(model)

    def step() -> float:
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        if peer is not None:
            peer.update_parameters(model)
        return time.perf_counter() - t0

    for _ in range(5):  # warm up (allocations, first-call paths)
        step()
    return step, alone


def bootstrap(values: list[float], stat: Callable[[list[float]], float], n: int = 1000,
              seed: int = 0) -> tuple[float, float]:
    rng = random.Random(seed)
    est = sorted(stat([rng.choice(values) for _ in values]) for _ in range(n))
    return est[int(0.025 * n)], est[int(0.975 * n)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--pairs", type=int, default=600, help="interleaved steps per variant")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    kinds = ["plain step", "weightavg.EMA", "torch AveragedModel"]
    variants = {k: make_variant(k, a.batch) for k in kinds}
    times: dict[str, list[float]] = {k: [] for k in kinds}
    order = list(kinds)
    rng = random.Random(0)
    for _ in range(a.pairs):
        rng.shuffle(order)  # adjacent steps of every variant, in random order: drift cancels
        for k in order:
            times[k].append(variants[k][0]())
    base = times["plain step"]
    base_med = statistics.median(base)
    n_params = sum(q.numel() for q in SmallCNN().parameters())
    print(f"SmallCNN ({n_params:,} parameters), batch {a.batch}, CPU, {a.threads} thread(s); "
          f"{a.pairs} interleaved steps per variant")
    print(f"{'variant':<22}{'median step':>13}{'overhead (paired)':>20}{'95% CI':>22}{'update alone':>16}")
    print(f"{'plain step':<22}{base_med * 1e3:>10.3f} ms{'-':>20}{'-':>22}{'-':>16}")
    for k in kinds[1:]:
        diffs = [t - b for t, b in zip(times[k], base, strict=True)]

        def rel(d: list[float]) -> float:
            return statistics.median(d) / base_med * 100

        lo, hi = bootstrap(diffs, rel)
        fn = variants[k][1]
        assert fn is not None
        reps = 300
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        alone = (time.perf_counter() - t0) / reps
        print(f"{k:<22}{statistics.median(times[k]) * 1e3:>10.3f} ms{rel(diffs):>+19.2f}%"
              f"{f'[{lo:+.2f}%, {hi:+.2f}%]':>22}{alone * 1e6:>10.0f} µs ({alone / base_med * 100:.2f}%)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
