"""Run a function on N gloo CPU processes, with a timeout, and collect what each rank returns.

    results = run_ranks(_worker, 3, tmp_path, extra_arg)   # _worker(rank, world, extra_arg) -> Any

``_worker`` must be a module-level function (with ``start_method="spawn"`` the processes import it
by name); it runs in forked processes by default, with
an initialised gloo process group (file store under the given directory: no port to pick) and
``torch.set_num_threads(1)``. Its return value comes back through ``torch.save``/``torch.load
(weights_only=True)``: tensors, numbers, strings, lists, tuples and dicts. An exception on any
rank raises :class:`RankError` with every failing rank's traceback; ranks still blocked in a
collective after a failure are killed after a short grace period, and a run that outlives
``timeout`` raises :class:`RankTimeout` (a hang fails the test instead of blocking the suite).

Reference helpers for sharded-model tests: :func:`full_state` (full tensors of a model whose
parameters may be DTensors), :func:`reference_averages` (a single-process ``Averager`` over the
unsharded model fed the same snapshots) and :func:`count_collectives` (counts every
``torch.distributed`` collective and every DTensor communication in a block).
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import os
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor, nn

__all__ = ["RankError", "RankTimeout", "count_collectives", "full_state", "reference_averages", "run_ranks"]


class RankError(AssertionError):
    """One or more ranks raised; the message holds each failing rank's traceback."""


class RankTimeout(AssertionError):
    """The ranks did not all finish within the timeout (a hang, e.g. a collective not every rank took)."""


def _entry(rank: int, world: int, workdir: str, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
    torch.set_num_threads(1)
    out = Path(workdir)
    try:
        dist.init_process_group("gloo", init_method=f"file://{out / 'store'}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=60))
        try:
            result = fn(rank, world, *args)
        finally:
            dist.destroy_process_group()
        torch.save({"result": result}, out / f"result{rank}.pt")
    except BaseException:  # reported to the parent, which raises
        (out / f"error{rank}.txt").write_text(traceback.format_exc())
        raise SystemExit(1) from None


def run_ranks(
    fn: Callable[..., Any], world: int, workdir: str | os.PathLike[str], *args: Any,
    timeout: float = 120.0, grace: float = 10.0, start_method: str = "fork",
) -> list[Any]:
    """Run ``fn(rank, world, *args)`` on ``world`` gloo processes; return each rank's result.

    Args:
        fn: a module-level function (importable by the spawned processes).
        world: number of processes.
        workdir: an empty directory for the file store and the results (e.g. pytest's tmp_path).
        timeout: seconds for the whole run; then every process is killed and RankTimeout raised.
        grace: seconds the other ranks get to finish once one rank has failed.
        start_method: "fork" (default: no re-import of torch per process, seconds faster on a
            loaded machine; the parent must not hold a process group) or "spawn".

    Raises:
        RankError: a rank raised (traceback of each failing rank in the message).
        RankTimeout: not every rank finished in time.
    """
    wd = Path(workdir)
    wd.mkdir(parents=True, exist_ok=True)
    for p in wd.glob("result*.pt"):
        p.unlink()
    for p in [*wd.glob("error*.txt"), wd / "store"]:
        if p.exists():
            p.unlink()
    ctx: Any = mp.get_context(start_method)
    procs = [ctx.Process(target=_entry, args=(r, world, str(wd), fn, args), daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    failed_at: float | None = None
    try:
        while any(p.is_alive() for p in procs):
            now = time.monotonic()
            if failed_at is None and any(p.exitcode not in (None, 0) for p in procs):
                failed_at = now
            if now > deadline or (failed_at is not None and now > failed_at + grace):
                break
            time.sleep(0.05)
    finally:
        alive = [r for r, p in enumerate(procs) if p.is_alive()]
        for p in procs:
            if p.is_alive():
                p.kill()
        for p in procs:
            p.join(5)
    errors = {r: (wd / f"error{r}.txt").read_text() for r in range(world) if (wd / f"error{r}.txt").exists()}
    if errors:
        text = "\n".join(f"--- rank {r} ---\n{tb}" for r, tb in sorted(errors.items()))
        hung = f" (ranks {alive} were still running and were killed)" if alive else ""
        raise RankError(f"{len(errors)} of {world} ranks failed{hung}:\n{text}")
    if alive:
        raise RankTimeout(f"ranks {alive} of {world} did not finish within {timeout:.0f} s (a hang?)")
    codes = {r: p.exitcode for r, p in enumerate(procs) if p.exitcode != 0}
    if codes:
        raise RankError(f"ranks exited abnormally without a traceback: {codes}")
    return [torch.load(wd / f"result{r}.pt", weights_only=True)["result"] for r in range(world)]


# ----------------------------------------------------------------------------- references


def full_state(model: nn.Module) -> dict[str, Tensor]:
    """``{name: full tensor}`` of a model's state dict, DTensors gathered (a collective: every rank
    must call it). Tensors are fresh copies."""
    from torch.distributed.tensor import DTensor

    out = {}
    for k, v in model.state_dict().items():
        v = v.detach()
        # full_tensor() of a Replicate() DTensor returns its local tensor itself (an alias): clone
        out[k] = (v.full_tensor() if isinstance(v, DTensor) else v).clone()
    return out


def reference_averages(
    model: nn.Module, snapshots: Sequence[Mapping[str, Tensor]], **averager_kwargs: Any
) -> dict[str, dict[str, Tensor]]:
    """A single-process ``Averager`` over the unsharded ``model`` fed ``snapshots`` in order.

    Each snapshot (full tensors, e.g. from :func:`full_state`) is loaded into ``model`` before the
    update. Returns ``{rule slot: {name: averaged tensor}}`` (copies).
    """
    import weightavg as wa

    avg = wa.Averager(model, **averager_kwargs)
    for snap in snapshots:
        model.load_state_dict(snap)
        avg.update(model)
    return {slot: {k: v.clone() for k, v in avg.averaged_tensors(slot).items()} for slot in avg.rules}


_COLLECTIVES = (
    "all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_object", "all_to_all",
    "all_to_all_single", "broadcast", "broadcast_object_list", "reduce", "reduce_scatter",
    "reduce_scatter_tensor", "gather", "scatter", "barrier", "send", "recv", "isend", "irecv",
    "batch_isend_irecv", "monitored_barrier",
)


@contextlib.contextmanager
def count_collectives() -> Iterator[Counter[str]]:
    """Count the collectives run in the block: ``torch.distributed.*`` calls and DTensor comms.

    Yields a Counter that is filled in when the block exits (``sum(counter.values()) == 0`` proves
    the block communicated nothing). Both views are taken: a wrapper around each
    ``torch.distributed`` collective (the calls weightavg makes) and
    ``torch.distributed.tensor.debug.CommDebugMode`` (what DTensor operations dispatch).
    """
    from torch.distributed import distributed_c10d
    from torch.distributed.tensor.debug import CommDebugMode

    counts: Counter[str] = Counter()
    saved: list[tuple[Any, str, Any]] = []

    def wrap(name: str, f: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(f)
        def counted(*a: Any, **k: Any) -> Any:
            counts[f"dist.{name}"] += 1
            return f(*a, **k)
        return counted

    for mod in (dist, distributed_c10d):
        for name in _COLLECTIVES:
            f = getattr(mod, name, None)
            if f is not None:
                saved.append((mod, name, f))
    wrapped = {id(f): wrap(name, f) for _, name, f in saved}
    for mod, name, f in saved:
        setattr(mod, name, wrapped[id(f)])
    mode = CommDebugMode()
    try:
        with mode:
            yield counts
    finally:
        for mod, name, f in saved:
            setattr(mod, name, f)
        for op, n in mode.get_comm_counts().items():
            counts[f"comm.{op}"] += n
