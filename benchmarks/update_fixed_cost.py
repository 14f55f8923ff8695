"""Fixed cost of one ``Averager.update``: the Python work around the torch calls, on tiny models.

Not a test: it prints a Markdown table of microseconds per update (median over ``--reps``) for
models so small that the arithmetic is negligible, so that what is left is the engine's own
bookkeeping (inference-mode check, step checks, binding lookup, rule weights, executor dispatch):

* ``1x4096``: one tensor of 4096 float32 elements (``nn.Linear(64, 64, bias=False)``);
* ``64x64``: 64 tensors of 64 elements (32 ``nn.Linear(8, 8)``);

each with one EMA (the default non-finite check and ``nonfinite="allow"``) and with two rules (an EMA
and the equal mean). "floor" is the torch work alone on the same tensors: one ``lerp_`` over a flat
buffer of as many elements (plus one ``sum`` for the checked rows), the least any implementation
must do; the engine's fixed cost is roughly the difference.

"warm" times consecutive updates; "cold" writes a buffer larger than the last-level cache before
each timed update (outside the timed region), as after a training step, when every line of the
engine's code and data has to come back from memory. The cold numbers are what matters at 1M
elements in ``benchmarks/update_speed.py``.

``--baseline OTHER/src`` also imports the ``weightavg`` package of another checkout (under the name
``weightavg_baseline``; the package imports itself relatively) and times its update on an identical
model in the same rounds, alternating with this one's, each timed update cold: the ratio column is
the median over rounds of this/baseline, which a slow spell of a shared machine hits alike.

Run: ``python benchmarks/update_fixed_cost.py`` (``--reps``, ``--flush-mib``, ``--baseline``; one thread).
"""

from __future__ import annotations

import argparse
import copy
import functools
import importlib.util
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

import weightavg as wa


def one_tensor() -> nn.Module:
    return nn.Linear(64, 64, bias=False)


def many_tensors() -> nn.Module:
    return nn.Sequential(*(nn.Linear(8, 8) for _ in range(32)))


MODELS: dict[str, Callable[[], nn.Module]] = {"1x4096": one_tensor, "64x64": many_tensors}


def configs(lib: Any = wa) -> dict[str, dict[str, Any]]:
    """Averager keyword arguments per row, with rules built by the package ``lib``."""
    return {
        "ema, checked": {"rule": lib.ema(0.999)},
        "ema, allow": {"rule": lib.ema(0.999), "nonfinite": "allow"},
        "ema+mean, checked": {"rule": {"ema": lib.ema(0.999), "mean": lib.mean()}},
    }


def floor(model: nn.Module, checked: bool) -> Callable[[], Any]:
    """The torch work alone: one lerp_ over a flat buffer as large as the model (+ one sum)."""
    n = sum(p.numel() for p in model.parameters())
    src, avg = torch.randn(n), torch.randn(n)

    def update() -> None:
        if checked:
            float(src.sum())
        avg.lerp_(src, 0.001)

    return update


def timed(update: Callable[[], Any], reps: int, flush: torch.Tensor | None) -> float:
    """Median seconds per call; with ``flush``, the buffer is written before each call."""
    times = []
    for i in range(reps):
        if flush is not None:
            flush.fill_(float(i))
        t0 = time.perf_counter()
        update()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def load_baseline(src: str) -> Any:
    """The ``weightavg`` package under ``src``, imported as ``weightavg_baseline``."""
    root = f"{src.rstrip('/')}/weightavg"
    spec = importlib.util.spec_from_file_location("weightavg_baseline", f"{root}/__init__.py",
                                                  submodule_search_locations=[root])
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["weightavg_baseline"] = module
    spec.loader.exec_module(module)
    return module


def paired(a: Callable[[], Any], b: Callable[[], Any], reps: int,
           flush: torch.Tensor) -> tuple[list[float], list[float]]:
    """Cold seconds of ``a`` and ``b``, ``reps`` each, timed alternately (which goes first alternates)."""
    ta: list[float] = []
    tb: list[float] = []
    for i in range(reps):
        for f, out in ((a, ta), (b, tb)) if i % 2 else ((b, tb), (a, ta)):
            flush.fill_(float(i))
            t0 = time.perf_counter()
            f()
            out.append(time.perf_counter() - t0)
    return ta, tb


def compare(base: Any, reps: int, flush: torch.Tensor) -> None:
    print(f"\nthis checkout against {base.__file__}: cold µs per update, alternating, median of {reps}\n")
    print("| model | config | this | baseline | this / baseline |")
    print("|---|---|---:|---:|---:|")
    for mname, make in MODELS.items():
        for (cname, kw), base_kw in zip(configs().items(), configs(base).values(), strict=True):
            # where the models, averages and scratch lie in memory shows in cold times (a fresh model
            # and its deep copy differ by ~5 % on 64 tensors): half the rounds on one pair of
            # averagers, half on a second pair built in the other order on the other model
            proto = make()
            models = [copy.deepcopy(proto), copy.deepcopy(proto)]
            ta: list[float] = []
            tb: list[float] = []
            for flip in (False, True):
                builds = [(wa, models[0], kw), (base, models[1], base_kw)]
                if flip:  # the baseline first, on the first model
                    builds = [(base, models[0], base_kw), (wa, models[1], kw)]
                made: dict[Any, Callable[[], Any]] = {}
                for lib, model, options in builds:
                    made[lib] = functools.partial(lib.Averager(model, **options).update, model)
                for _ in range(20):
                    made[wa]()
                    made[base]()
                a, b = paired(made[wa], made[base], reps // 2, flush)
                ta += a
                tb += b
            r = statistics.median(x / y for x, y in zip(ta, tb, strict=True))
            print(f"| {mname} | {cname} | {statistics.median(ta) * 1e6:.1f} | {statistics.median(tb) * 1e6:.1f} | "
                  f"{r:.3f} |", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=2000, help="timed updates per cell (warm); cold: a quarter")
    ap.add_argument("--flush-mib", type=int, default=96, help="size of the cache-flushing buffer (MiB)")
    ap.add_argument("--baseline", metavar="SRC", help="a checkout's src/ whose weightavg to compare with, cold")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    flush = torch.empty(args.flush_mib * (1 << 20) // 4)
    print(f"weightavg from {wa.__file__}; torch {torch.__version__}, 1 thread")
    print(f"µs per update, median of {args.reps} (warm) / {args.reps // 4} (cold: {args.flush_mib} MiB "
          "written before each)\n")
    print("| model | config | warm | cold | floor warm | floor cold |")
    print("|---|---|---:|---:|---:|---:|")
    for mname, make in MODELS.items():
        for cname, kw in configs().items():
            model = make()
            avg = wa.Averager(model, **kw)
            for _ in range(20):  # first update copies; plans and scratch are built
                avg.update(model)
            fl = floor(model, kw.get("nonfinite", "raise") != "allow")
            fl()

            def upd(avg: wa.Averager = avg, model: nn.Module = model) -> None:
                avg.update(model)

            warm = timed(upd, args.reps, None)
            cold = timed(upd, args.reps // 4, flush)
            fwarm = timed(fl, args.reps, None)
            fcold = timed(fl, args.reps // 4, flush)
            print(f"| {mname} | {cname} | {warm * 1e6:.1f} | {cold * 1e6:.1f} | {fwarm * 1e6:.1f} | "
                  f"{fcold * 1e6:.1f} |", flush=True)
    if args.baseline:
        compare(load_baseline(args.baseline), args.reps // 2, flush)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
