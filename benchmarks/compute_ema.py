"""compute_ema under a smoothing schedule vs constant smoothing (Composer's functional form).

A schedule (a new smoothing at every call) must cost what constant smoothing costs: the
smoothing is read at each update, nothing is rebuilt. Calls of the two variants are interleaved in
rounds on a ~1M-parameter MLP (CPU, one thread); the table gives the median time per call.

Run: ``python benchmarks/compute_ema.py`` (``--rounds``, ``--calls``). Take figures on a quiet machine.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from torch import nn

from weightavg.functional import compute_ema


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--calls", type=int, default=20)
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(256, 256) for _ in range(16)])
    emas = {"constant smoothing": copy.deepcopy(model), "schedule": copy.deepcopy(model)}
    times: dict[str, list[float]] = {k: [] for k in emas}
    step = 0
    for _ in range(args.rounds):
        for name, ema_model in emas.items():
            t0 = time.perf_counter()
            for _ in range(args.calls):
                step += 1
                s = 0.999 if name == "constant smoothing" else min(0.999, (1 + step) / (10 + step))
                compute_ema(model, ema_model, smoothing=s)
            times[name].append((time.perf_counter() - t0) / args.calls)
    print(f"{sum(p.numel() for p in model.parameters()):,} parameters, {args.rounds} rounds × {args.calls} calls, "
          f"1 thread, torch {torch.__version__}")
    base = statistics.median(times["constant smoothing"])
    for name, ts in times.items():
        print(f"{name:20} {statistics.median(ts) * 1e3:8.3f} ms/call  {statistics.median(ts) / base:6.2f}×")


if __name__ == "__main__":
    main()
