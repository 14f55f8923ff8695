"""Update time against the number of tensors, at a fixed model size: weightavg and its peers.

Not a test. A model of ``--params`` float32 elements is split into N equal tensors (N from 1 to
4096); for each N every implementation runs one EMA update per round, in a shuffled order, after
a buffer larger than the last-level cache has been written (cold cache, as after a training step).
The plot shows the median time per update (ms) against N, with the flat ideal (one ``lerp_`` over
one contiguous buffer of the same size) as the floor. Peers are written here, in the way each
library updates (no new dependency): one ``lerp_`` per tensor (timm / ema-pytorch style), one
``torch._foreach_lerp_`` over the lists (torch's ``get_ema_multi_avg_fn``), and torch's
``AveragedModel`` itself.

Run (one torch thread; a quiet machine):
    python benchmarks/update_vs_count.py --out docs/img/update_vs_count.png
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

import weightavg as wa

DECAY = 0.999


class Many(nn.Module):
    """``n`` separately allocated float32 parameters of ``size`` elements each."""

    def __init__(self, n: int, size: int) -> None:
        super().__init__()
        self.ps = nn.ParameterList([nn.Parameter(torch.randn(size)) for _ in range(n)])


def implementations(model: Many) -> dict[str, Callable[[], None]]:
    """One zero-argument update per implementation, each with its own average of ``model``."""
    params = [p.detach() for p in model.ps]
    total = sum(p.numel() for p in params)
    flat_avg, flat_src = torch.zeros(total), torch.randn(total)
    per_tensor = [p.clone() for p in params]
    foreach = [p.clone() for p in params]
    averaged = torch.optim.swa_utils.AveragedModel(
        model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(DECAY)
    )
    averaged.update_parameters(model)
    checked = wa.Averager(model, rule=wa.ema(DECAY))
    unchecked = wa.Averager(model, rule=wa.ema(DECAY), nonfinite="allow")
    checked.update(model)
    unchecked.update(model)

    def loop() -> None:
        for a, p in zip(per_tensor, params, strict=True):
            a.lerp_(p, 1 - DECAY)

    def ideal() -> None:
        flat_avg.lerp_(flat_src, 1 - DECAY)

    def ours(averager: wa.Averager) -> Callable[[], None]:
        def update() -> None:
            averager.update(model)

        return update

    return {
        "ideal (one lerp_, flat)": ideal,
        "weightavg, nonfinite='allow'": ours(unchecked),
        "weightavg (checked, default)": ours(checked),
        "one lerp_ per tensor (timm, ema-pytorch)": loop,
        "torch._foreach_lerp_": lambda: torch._foreach_lerp_(foreach, params, 1 - DECAY),
        "torch AveragedModel (get_ema_multi_avg_fn)": lambda: averaged.update_parameters(model),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", type=int, default=1 << 20, help="model size in elements (default: 2^20)")
    ap.add_argument("--counts", default="1,4,16,64,256,1024,4096", help="tensor counts (default: %(default)s)")
    ap.add_argument("--rounds", type=int, default=15, help="timed rounds per count (default: %(default)s)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default: %(default)s)")
    ap.add_argument("--flush-mib", type=int, default=400, help="cache-flush buffer, MiB (default: %(default)s)")
    ap.add_argument("--out", type=Path, help="write the plot (PNG) here; the numbers go next to it as JSON")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rng = random.Random(0)
    flush = torch.empty(args.flush_mib << 18)
    counts = [int(c) for c in args.counts.split(",")]
    table: dict[str, dict[int, float]] = {}
    for n in counts:
        impls = implementations(Many(n, args.params // n))
        times: dict[str, list[float]] = {name: [] for name in impls}
        for _ in range(args.rounds + 1):  # the first round warms up
            order = list(impls)
            rng.shuffle(order)
            for name in order:
                flush.fill_(1.0)
                t0 = time.perf_counter()
                impls[name]()
                times[name].append(time.perf_counter() - t0)
        for name, ts in times.items():
            table.setdefault(name, {})[n] = 1e3 * statistics.median(ts[1:])
    machine = f"{platform.machine()}, {torch.get_num_threads()} thread(s), torch {torch.__version__}"
    print(f"ms per EMA update of {args.params} float32 elements split into N tensors ({machine})")
    print("| implementation | " + " | ".join(f"N={n}" for n in counts) + " |")
    print("|---|" + "---:|" * len(counts))
    for name, row in table.items():
        print(f"| {name} | " + " | ".join(f"{row[n]:.3f}" for n in counts) + " |")
    if args.out is None:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, row in table.items():
        style = {"color": "black", "linestyle": "--"} if name.startswith("ideal") else {"marker": "o"}
        ax.plot(counts, [row[n] for n in counts], label=name, **style)  # type: ignore[arg-type]
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("number of tensors (same total size)")
    ax.set_ylabel("ms per update (median, cold cache)")
    ax.set_title(f"EMA update of {args.params / 2**20:g} Mi float32 elements\n{machine}", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=120)
    args.out.with_suffix(".json").write_text(json.dumps({"machine": machine, "ms": table}, indent=1))
    print(f"wrote {args.out} and {args.out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
