"""Averaging a sharded (FSDP2) model: per-update time and per-rank memory on 2 and 4 CPU ranks.

Not a test: it prints one Markdown table per world size. Rows:

    * ``ideal (flat local shard)``: one ``lerp_`` of a flat float32 buffer of the rank's local
      elements with an equally long contiguous source: the least any local-shard update can do;
    * ``checked floor``: the ideal plus one read of the source (its sum) and one all-reduce of one
      flag: the least a checked update can do (the floor of the NaN-check row);
    * ``gather (full_tensor + full lerp)``: what the peers do (gather every parameter with
      ``full_tensor()``, then a full-size float32 ``lerp_`` on every rank);
    * ``weightavg (sharded)``: ``weightavg.Averager(model, rule=ema, nonfinite="allow")`` on the
      FSDP2 model (local shards, no communication); ``weightavg (sharded, NaN check)``: the default
      ``nonfinite="raise"``, whose check all-reduces one flag per update (rows are pluggable, see
      ``IMPLS``: a row the installed engine cannot run says why);
    * ``single process, whole model``: ``weightavg.Averager`` over the unsharded model in one process
      (timed once, before the ranks start).

Columns: median milliseconds per update over ``--reps`` rounds in which every implementation takes
a turn (the slowest rank's), the ratio to the ideal and to the row's own floor, collectives per
update (the larger of the counted ``torch.distributed`` calls and DTensor communications: both see
a plain all_reduce), the bytes each rank keeps for the average, and the largest / total fresh
allocation made during one
update (plain tensors only; a DTensor's own wrapper is not counted).

The model: ``--layers`` bias-carrying Linear layers of width ``--width`` (default 1003: dim 0 is
not divisible by the world size, so shards are uneven), each ``fully_shard``-ed, then the root.

Run (CPU, gloo; use a quiet machine for figures):
    python benchmarks/sharded.py                  # 2 and 4 ranks, ~8M parameters
    python benchmarks/sharded.py --quick          # smoke run
    python benchmarks/sharded.py --worlds 2 --width 2003 --reps 30
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import weightavg as wa

DECAY = 0.999
WEIGHT = 1 - DECAY


def make_model(width: int, layers: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Linear(width, width) for _ in range(layers)])


def shard(model: nn.Module) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    for layer in model:
        fully_shard(layer)
    fully_shard(model)
    return model


def _local(t: Tensor) -> Tensor:
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def held_bytes(tensors: list[Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (DTensors: their local tensors)."""
    seen: dict[int, int] = {}
    for t in tensors:
        t = _local(t)
        s = t.untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


class FreshAllocations(TorchDispatchMode):
    """Largest and total bytes of the plain tensors operators allocate (outputs aliasing no input)."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0
        self.total = 0

    @staticmethod
    def _ptr(t: Any) -> int | None:
        if not isinstance(t, Tensor) or (type(t) is not Tensor and not isinstance(t, nn.Parameter)):
            return None
        try:
            return t.untyped_storage().data_ptr()
        except RuntimeError:
            return None

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        ins = {self._ptr(t) for t in tree_flatten((args, kwargs))[0]}
        out = func(*args, **kwargs)
        for t in tree_flatten(out)[0]:
            p = self._ptr(t)
            if p is not None and p not in ins:
                n = t.untyped_storage().nbytes()
                self.largest = max(self.largest, n)
                self.total += n
        return out


# ----------------------------------------------------------------------------- implementations


@dataclass
class Impl:
    name: str
    make: Callable[[nn.Module], tuple[Callable[[], Any], list[Tensor]]]  # -> (update, tensors it keeps)


def _ideal(model: nn.Module) -> tuple[Callable[[], Any], list[Tensor]]:
    n = sum(_local(p).numel() for p in model.parameters())
    avg = torch.zeros(n)
    src = torch.randn(n)

    def update() -> None:
        avg.lerp_(src, WEIGHT)

    return update, [avg]


def _checked_floor(model: nn.Module) -> tuple[Callable[[], Any], list[Tensor]]:
    """The least a checked update can do: the ideal, plus one read of the source (its sum) and one
    all-reduce of one flag, so that every rank refuses alike."""
    n = sum(_local(p).numel() for p in model.parameters())
    avg = torch.zeros(n)
    src = torch.randn(n)
    flag = torch.zeros(1, dtype=torch.int32)

    def update() -> None:
        flag.fill_(0 if math.isfinite(float(src.sum())) else 1)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if not flag.item():
            avg.lerp_(src, WEIGHT)

    return update, [avg]


def _gather(model: nn.Module) -> tuple[Callable[[], Any], list[Tensor]]:
    params = list(model.parameters())
    avgs = [torch.zeros(p.shape) for p in params]

    @torch.no_grad()
    def update() -> None:
        for a, p in zip(avgs, params, strict=True):
            a.lerp_(p.full_tensor().float(), WEIGHT)

    return update, avgs


def _weightavg(model: nn.Module) -> tuple[Callable[[], Any], list[Tensor]]:
    avg = wa.Averager(model, rule=wa.ema(DECAY), nonfinite="allow")
    avg.update(model)

    def update() -> None:
        avg.update(model)

    return update, list(avg.averaged_tensors().values())


def _weightavg_checked(model: nn.Module) -> tuple[Callable[[], Any], list[Tensor]]:
    avg = wa.Averager(model, rule=wa.ema(DECAY))  # nonfinite="raise": one all-reduced flag per update
    avg.update(model)

    def update() -> None:
        avg.update(model)

    return update, [t.to_local() if hasattr(t, "to_local") else t for t in avg.averaged_tensors().values()]


IDEAL = "ideal (flat local shard)"
CHECKED_FLOOR = "checked floor (ideal + sum + 1 flag all-reduce)"
# the floor each engine row is held to (issue #13: ≤ 1.2×; the checked one as decided in #14)
FLOOR = {"weightavg (sharded)": IDEAL, "weightavg (sharded, NaN check)": CHECKED_FLOOR}

IMPLS: list[Impl] = [
    Impl("ideal (flat local shard)", _ideal),
    Impl("checked floor (ideal + sum + 1 flag all-reduce)", _checked_floor),
    Impl("gather (full_tensor + full lerp)", _gather),
    Impl("weightavg (sharded)", _weightavg),
    Impl("weightavg (sharded, NaN check)", _weightavg_checked),
]


# ----------------------------------------------------------------------------- measurement


def time_interleaved(updates: dict[str, Callable[[], Any]], reps: int) -> dict[str, float]:
    """Median ms per update of each, the implementations taking turns in every round (absolute
    times drift on a shared machine; rounds see the same drift)."""
    times: dict[str, list[float]] = {name: [] for name in updates}
    for update in updates.values():
        update()  # warm up (allocations, plans)
    for _ in range(reps):
        for name, update in updates.items():
            dist.barrier()
            t0 = time.perf_counter()
            update()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}


def count(update: Callable[[], Any]) -> dict[str, Any]:
    """Collectives and fresh allocations of one update."""
    from torch.distributed.tensor.debug import CommDebugMode

    calls = 0
    names = ("all_reduce", "all_gather_into_tensor", "all_gather", "broadcast", "reduce_scatter_tensor")
    real = {n: getattr(dist, n) for n in names}

    def counting(f: Callable[..., Any]) -> Callable[..., Any]:
        def wrapped(*a: Any, **k: Any) -> Any:
            nonlocal calls
            calls += 1
            return f(*a, **k)
        return wrapped

    for n in names:
        setattr(dist, n, counting(real[n]))
    try:
        mode = CommDebugMode()
        with mode:
            update()
    finally:
        for n in names:
            setattr(dist, n, real[n])
    with FreshAllocations() as rec:
        update()
    # both views see a plain all_reduce: take the larger count, not the sum
    return {"comms": max(calls, mode.get_total_counts()), "largest": rec.largest, "total": rec.total}


def _worker(rank: int, world: int, store: str, args: argparse.Namespace, out: dict[str, Any]) -> None:
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=600))
    try:
        model = shard(make_model(args.width, args.layers))
        rows: dict[str, Any] = {}
        updates: dict[str, Callable[[], Any]] = {}
        for impl in IMPLS:
            try:
                update, kept = impl.make(model)
                rows[impl.name] = {"held": held_bytes(kept), **count(update)}
                updates[impl.name] = update
            except Exception as err:  # a pluggable row the installed engine cannot run yet
                rows[impl.name] = {"error": f"{type(err).__name__}: {str(err).splitlines()[0][:90]}"}
                dist.barrier()
        for name, ms in time_interleaved(updates, args.reps).items():
            rows[name]["ms"] = ms
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, rows)
        if rank == 0:
            out.update({"rows": gathered})
            torch.save(gathered, os.path.join(os.path.dirname(store), "rows.pt"))
    finally:
        dist.destroy_process_group()


def single_process(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    model = make_model(args.width, args.layers)
    avg = wa.Averager(model, rule=wa.ema(DECAY), nonfinite="allow")
    avg.update(model)
    times = []
    for _ in range(args.reps):
        t0 = time.perf_counter()
        avg.update(model)
        times.append(time.perf_counter() - t0)
    return {"ms": statistics.median(times) * 1e3, "comms": 0,
            "held": held_bytes(list(avg.averaged_tensors().values())), "largest": 0, "total": 0}


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def table(world: int, per_rank: list[dict[str, Any]], single: dict[str, Any], n_params: int) -> str:
    lines = [f"### {world} ranks, {n_params / 1e6:.1f}M parameters (float32)", "",
             "| implementation | ms/update (slowest rank) | × ideal | × its floor | collectives/update "
             "| kept per rank (max) | largest / total fresh alloc per update |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    ideal = max(r[IDEAL]["ms"] for r in per_rank)
    for name in [i.name for i in IMPLS]:
        rows = [r[name] for r in per_rank]
        errs = [r["error"] for r in rows if "error" in r]
        if errs:
            lines.append(f"| {name} | not run: {errs[0]} | | | | | |")
            continue
        ms = max(r["ms"] for r in rows)
        floor = FLOOR.get(name)
        vs = f"{ms / max(r[floor]['ms'] for r in per_rank):.2f}" if floor else ""
        lines.append(f"| {name} | {ms:.2f} | {ms / ideal:.2f} | {vs} | {max(r['comms'] for r in rows)} "
                     f"| {fmt_bytes(max(r['held'] for r in rows))} "
                     f"| {fmt_bytes(max(r['largest'] for r in rows))} / {fmt_bytes(max(r['total'] for r in rows))} |")
    lines.append(f"| single process, whole model | {single['ms']:.2f} | {single['ms'] / ideal:.2f} | | 0 "
                 f"| {fmt_bytes(single['held'])} | — |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--worlds", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--width", type=int, default=1003)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    ap.add_argument("--quick", action="store_true", help="smoke run: width 203, 4 layers, 3 repetitions")
    args = ap.parse_args(argv)
    if args.quick:
        args.width, args.layers, args.reps = 203, 4, 3
    n_params = args.layers * (args.width * args.width + args.width)
    single = single_process(args)
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, {args.threads} thread(s) per rank\n")
    for world in args.worlds:
        with tempfile.TemporaryDirectory() as d:
            store = os.path.join(d, "store")
            mp.start_processes(_worker, args=(world, store, args, {}), nprocs=world, start_method="fork")
            per_rank = torch.load(os.path.join(d, "rows.pt"), weights_only=True)
        print(table(world, per_rank, single, n_params), "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
