"""Speed of one averaging update: weightavg's engine against its peers and the memory-bound ideal.

Not a test: it prints Markdown tables of milliseconds per update (median over ``--reps`` runs),
the bandwidth achieved, the ratio to the ideal and each peer's time over weightavg's.

Models:
    * few big tensors (4 bias-free Linear layers): 1M and 10M parameters (100M with ``--huge``);
    * ~3000 small tensors (500 conv 3x3 + BatchNorm blocks: 1500 parameters + 1500 buffers):
      1M and 10M parameters;
    * torchvision's resnet50, if torchvision imports.

Every implementation averages the same thing: floating-point parameters and buffers (integer
buffers copied or ignored). "ideal" is one ``lerp_`` over one contiguous fp32 buffer holding as
many elements: the bytes that must move are read average + read source + write average. The
floors the targets of issue #14 are measured against are timed in the same rounds:

* per-tensor ideal: one ``lerp_`` per separately allocated tensor (the model's own tensors);
* checked per-tensor floor: one ``sum`` of every source, then the per-tensor ideal;
* checked flat floor: one ``sum`` and one ``lerp_`` over one flat buffer;
* gather floor: ``torch.cat`` of the sources into one buffer, then one ``lerp_``; and gather + sum.

Each timed update starts with a cold cache: a buffer larger than the last-level cache is written
first, outside the timed region. Peers are skipped when they do not import. "max alloc" is the
largest single allocation during one update, from ``torch.profiler``'s memory events (which see
allocations made inside a kernel, such as an upcast in a reduction); a second table gives it for
float32, bfloat16 and float16 models.

With ``--device cuda`` it measures on the GPU instead (see :func:`cuda_main`): GB/s and % of the
peak memory bandwidth for 1e6…1e9 elements in big tensors and for 3000 small tensors, one and two
EMAs, checked (deferred) and unchecked, against ``torch._foreach_lerp_``, torch's ``AveragedModel``
with ``get_ema_multi_avg_fn`` and timm-style and ema-pytorch-style loops, and the CPU time spent
launching one update.

Run:
    python benchmarks/update_speed.py            # full run (a few minutes; use a quiet machine)
    python benchmarks/update_speed.py --quick    # smoke run: 1M models, 3 repetitions
    python benchmarks/update_speed.py --huge --threads 4
    python benchmarks/update_speed.py --device cuda [--peak-gbs 4800]
"""

from __future__ import annotations

import argparse
import copy
import gc
import math
import random
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

import weightavg as wa
from weightavg import swa_utils as wsu

DECAY = 0.999


# ----------------------------------------------------------------------------- models


def big_tensors(n_params: int, n_tensors: int = 4) -> nn.Module:
    d = round(math.sqrt(n_params / n_tensors))
    return nn.Sequential(*[nn.Linear(d, d, bias=False) for _ in range(n_tensors)])


class ConvBN(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn(self.conv(x)))


def small_tensors(n_params: int, n_blocks: int = 500) -> nn.Module:
    per_block = n_params / n_blocks  # 9c² + 2c
    c = max(1, round((-2 + math.sqrt(4 + 36 * per_block)) / 18))
    return nn.Sequential(*[ConvBN(c) for _ in range(n_blocks)])


def models(args: argparse.Namespace) -> Iterator[tuple[str, Callable[[], nn.Module]]]:
    yield "4 big tensors, 1M", lambda: big_tensors(1_000_000)
    yield "~3000 small tensors, 1M", lambda: small_tensors(1_000_000)
    if args.quick:
        return
    yield "4 big tensors, 10M", lambda: big_tensors(10_000_000)
    yield "~3000 small tensors, 10M", lambda: small_tensors(10_000_000)
    if args.huge:
        yield "4 big tensors, 100M", lambda: big_tensors(100_000_000)
    try:
        import torchvision  # noqa: F401
    except Exception as err:  # torchvision built for another torch raises more than ImportError
        print(f"(resnet50 skipped: torchvision does not import: {type(err).__name__})")
    else:
        from torchvision.models import resnet50

        yield "torchvision resnet50", lambda: resnet50()


def float_numel(model: nn.Module) -> int:
    return sum(t.numel() for t in [*model.parameters(), *model.buffers()] if t.is_floating_point())


# ----------------------------------------------------------------------------- implementations


@dataclass
class Impl:
    name: str
    kind: str  # "EMA", "SWA" or "ideal"
    make: Callable[[nn.Module], Callable[[], Any]]  # model -> update()
    ours: bool = False


def _weightavg(
    rule: Callable[[], wa.Rule], nonfinite: str, contiguous: bool = False
) -> Callable[[nn.Module], Callable[[], Any]]:
    def make(model: nn.Module) -> Callable[[], Any]:
        if contiguous:  # the same model with its tensors moved into one flat buffer per dtype
            model = wa.make_contiguous(copy.deepcopy(model))
        avg = wa.Averager(model, rule=rule(), nonfinite=nonfinite)  # type: ignore[arg-type]
        return lambda: avg.update(model)

    return make


def _torch_averaged(ema: bool) -> Callable[[nn.Module], Callable[[], Any]]:
    def make(model: nn.Module) -> Callable[[], Any]:
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        kw = {"multi_avg_fn": get_ema_multi_avg_fn(DECAY)} if ema else {}
        avg = AveragedModel(model, use_buffers=True, **kw)
        return lambda: avg.update_parameters(model)

    return make


def _our_averaged(model: nn.Module) -> Callable[[], Any]:
    avg = wsu.AveragedModel(model, multi_avg_fn=wsu.get_ema_multi_avg_fn(DECAY), use_buffers=True)
    return lambda: avg.update_parameters(model)


def _timm_v3(model: nn.Module) -> Callable[[], Any]:
    from timm.utils.model_ema import ModelEmaV3

    ema = ModelEmaV3(model, decay=DECAY)
    return lambda: ema.update(model)


def _ema_pytorch(foreach: bool) -> Callable[[nn.Module], Callable[[], Any]]:
    def make(model: nn.Module) -> Callable[[], Any]:
        from ema_pytorch import EMA

        ema = EMA(model, beta=DECAY, update_after_step=0, update_every=1,
                  include_online_model=False, use_foreach=foreach)
        return ema.update

    return make


def _device(model: nn.Module) -> torch.device:
    return next(iter(model.parameters())).device


def _ideal(model: nn.Module) -> Callable[[], Any]:
    n = float_numel(model)
    avg, src = torch.randn(n, device=_device(model)), torch.randn(n, device=_device(model))
    return lambda: avg.lerp_(src, 1 - DECAY)


def _float_sources(model: nn.Module) -> list[torch.Tensor]:
    return [t.detach() for t in [*model.parameters(), *model.buffers()] if t.is_floating_point()]


def _per_tensor(checked: bool) -> Callable[[nn.Module], Callable[[], Any]]:
    def make(model: nn.Module) -> Callable[[], Any]:
        srcs = _float_sources(model)
        avgs = [t.clone() for t in srcs]

        def update() -> None:
            if checked:
                for t in srcs:
                    t.sum()
            for a, t in zip(avgs, srcs, strict=True):
                a.lerp_(t, 1 - DECAY)

        return update

    return make


def _flat_checked(model: nn.Module) -> Callable[[], Any]:
    n = float_numel(model)
    avg, src = torch.randn(n, device=_device(model)), torch.randn(n, device=_device(model))

    def update() -> None:
        src.sum()
        avg.lerp_(src, 1 - DECAY)

    return update


def _gather(checked: bool) -> Callable[[nn.Module], Callable[[], Any]]:
    def make(model: nn.Module) -> Callable[[], Any]:
        srcs = [t.reshape(-1) for t in _float_sources(model)]
        buf = torch.empty(sum(t.numel() for t in srcs), device=_device(model))
        avg = torch.randn(buf.numel(), device=_device(model))

        def update() -> None:
            torch.cat(srcs, out=buf)
            if checked:
                buf.sum()
            avg.lerp_(buf, 1 - DECAY)

        return update

    return make


PER_TENSOR = "floor: one lerp_ per tensor (per-tensor ideal)"
PER_TENSOR_CHECKED = "floor: sum of every tensor, then one lerp_ per tensor (checked)"
FLAT_CHECKED = "floor: one sum + one lerp_, flat fp32 (checked flat)"
GATHER = "floor: cat into one buffer + one lerp_ (gather)"
GATHER_CHECKED = "floor: cat + sum + one lerp_ (gather, checked)"

def implementations() -> list[tuple[Impl, str | None]]:
    """Every implementation with the reason it is unavailable (None if it runs)."""
    out: list[tuple[Impl, str | None]] = [
        (Impl("ideal: one lerp_ over one flat fp32 buffer", "ideal", _ideal), None),
        (Impl(PER_TENSOR, "floor", _per_tensor(False)), None),
        (Impl(PER_TENSOR_CHECKED, "floor", _per_tensor(True)), None),
        (Impl(FLAT_CHECKED, "floor", _flat_checked), None),
        (Impl(GATHER, "floor", _gather(False)), None),
        (Impl(GATHER_CHECKED, "floor", _gather(True)), None),
        (Impl("weightavg.Averager ema (nonfinite='raise', default)", "EMA",
              _weightavg(lambda: wa.ema(decay=DECAY), "raise"), ours=True), None),
        (Impl("weightavg.Averager ema (nonfinite='allow')", "EMA",
              _weightavg(lambda: wa.ema(decay=DECAY), "allow"), ours=True), None),
        (Impl("weightavg.Averager mean (nonfinite='raise', default)", "SWA",
              _weightavg(wa.mean, "raise"), ours=True), None),
        (Impl("weightavg.Averager mean (nonfinite='allow')", "SWA",
              _weightavg(wa.mean, "allow"), ours=True), None),
        (Impl("weightavg.Averager ema, make_contiguous(model) (default)", "EMA",
              _weightavg(lambda: wa.ema(decay=DECAY), "raise", contiguous=True), ours=True), None),
        (Impl("weightavg.Averager ema, make_contiguous(model) (nonfinite='allow')", "EMA",
              _weightavg(lambda: wa.ema(decay=DECAY), "allow", contiguous=True), ours=True), None),
        (Impl("weightavg.swa_utils.AveragedModel ema", "EMA", _our_averaged, ours=True), None),
        (Impl("torch AveragedModel (default SWA)", "SWA", _torch_averaged(False)), None),
        (Impl("torch AveragedModel (get_ema_multi_avg_fn)", "EMA", _torch_averaged(True)), None),
    ]
    try:
        from timm.utils.model_ema import ModelEmaV3  # noqa: F401

        why = None
    except Exception as err:  # timm imports torchvision, which may not import with this torch
        why = f"{type(err).__name__}: {str(err).splitlines()[0][:80]}"
    out.append((Impl("timm ModelEmaV3", "EMA", _timm_v3), why))
    try:
        import ema_pytorch  # noqa: F401

        why = None
    except Exception as err:
        why = f"{type(err).__name__}: {err}"
    out.append((Impl("ema-pytorch EMA", "EMA", _ema_pytorch(False)), why))
    out.append((Impl("ema-pytorch EMA (use_foreach=True)", "EMA", _ema_pytorch(True)), why))
    return out


# ----------------------------------------------------------------------------- measuring


def largest_transient(update: Callable[[], Any]) -> tuple[int, int]:
    """(largest single allocation, total allocated) in bytes during one call, from the profiler's
    memory events (each allocation counted once, by the operator that made it)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        update()
    sizes = [e.self_cpu_memory_usage for e in prof.events() if e.self_cpu_memory_usage > 0]
    return max(sizes, default=0), sum(sizes)


def allocation_table() -> list[str]:
    """Largest allocation of one update for float32/bfloat16/float16 models (one big 2500x2500
    weight and ~3000 small tensors), checked and unchecked, float32 averages and the model's dtype."""
    lines = ["| model dtype | averages | nonfinite | 1 big tensor (6.25M) | ~3000 small tensors (1M) |",
             "|---|---|---|---:|---:|"]
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for avg_dtype in (torch.float32, None):
            for nonfinite in ("raise", "allow"):
                cells = []
                for build in (lambda: nn.Linear(2500, 2500, bias=False), lambda: small_tensors(1_000_000)):
                    model = build().to(dtype)
                    avg = wa.Averager(model, rule=wa.ema(DECAY), dtype=avg_dtype, nonfinite=nonfinite)  # type: ignore[arg-type]
                    for _ in range(3):
                        avg.update(model)
                    cells.append(fmt_bytes(largest_transient(lambda avg=avg, model=model: avg.update(model))[0]))
                avg_name = "float32" if avg_dtype is not None else "model's"
                lines.append(f"| {str(dtype).replace('torch.', '')} | {avg_name} | {nonfinite} | {' | '.join(cells)} |")
    return lines


def last_level_cache_bytes() -> int:
    best = 0
    for i in range(8):
        try:
            with open(f"/sys/devices/system/cpu/cpu0/cache/index{i}/size") as f:
                text = f.read().strip()
        except OSError:
            break
        mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1], 1)
        best = max(best, int(text.rstrip("KMG")) * mult)
    return best or (260 << 20)


def time_interleaved(updates: list[Callable[[], Any]], reps: int, flush: torch.Tensor) -> list[list[float]]:
    """Seconds per update, ``reps`` per implementation, taken in rounds.

    Each round times every implementation once, in a shuffled order, each after a cache flush; so
    a slow spell of a shared machine falls on all of them alike, and ratios are taken within a round.
    """
    times: list[list[float]] = [[] for _ in updates]
    order = list(range(len(updates)))
    rng = random.Random(0)
    for i in range(reps):
        rng.shuffle(order)
        for k in order:
            flush.fill_(float(i))  # evict the model and the average from every cache level
            t0 = time.perf_counter()
            updates[k]()
            times[k].append(time.perf_counter() - t0)
    return times


def paired_ratio(a: list[float], b: list[float]) -> float:
    """Median over rounds of a/b (both timed in the same round)."""
    return statistics.median(x / y for x, y in zip(a, b, strict=True))


def fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return f"{n:.1f} TiB"


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1M models, 3 repetitions")
    parser.add_argument("--huge", action="store_true", help="also a 100M-parameter model")
    parser.add_argument("--reps", type=int, default=None, help="timed updates per row (median)")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--peak-gbs", type=float, default=None,
                        help="the GPU's peak memory bandwidth in GB/s (for --device cuda)")
    args = parser.parse_args(argv)
    if args.device != "cpu":
        return cuda_main(args)
    reps = args.reps or (3 if args.quick else 15)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    llc = last_level_cache_bytes()
    flush = torch.empty(int(llc * 1.5) // 4 + (1 << 20))
    impls = implementations()
    print(f"# weightavg update speed: torch {torch.__version__}, {args.threads} thread(s), "
          f"median of {reps}, cold cache (writes {fmt_bytes(flush.nbytes)} > LLC {fmt_bytes(llc)} "
          "before each update)\n")
    for impl, why in impls:
        if why:
            print(f"- skipped {impl.name}: {why}")
    print("\nmax alloc: the largest single allocation during one update (torch.profiler memory events)."
          " Flagged when ≥ 10% of the averaged bytes.\n")
    verdicts: list[str] = []
    for title, build in models(args):
        model = build()
        n = float_numel(model)
        n_tensors = len([*model.parameters(), *model.buffers()])
        moved = 3 * 4 * n  # read average, read source, write average (fp32)
        built: list[tuple[Impl, Callable[[], Any], int]] = []
        for impl, why in impls:
            if why:
                continue
            try:
                update = impl.make(model)
                update()  # first update copies / allocates scratch
                update()
                alloc, _ = largest_transient(update)
            except Exception as err:  # a peer failing on this model is a result too
                print(f"- {impl.name} failed on {title}: {type(err).__name__}: {err}")
                continue
            built.append((impl, update, alloc))
        samples = time_interleaved([u for _, u, _ in built], reps, flush)
        rows: list[tuple[Impl, float, int]] = [
            (impl, statistics.median(ts), alloc) for (impl, _, alloc), ts in zip(built, samples, strict=True)
        ]
        by_name = {impl.name: ts for (impl, _, _), ts in zip(built, samples, strict=True)}
        ideal_ts = next(ts for (impl, _, _), ts in zip(built, samples, strict=True) if impl.kind == "ideal")
        ours_ts = {impl.kind: by_name[impl.name] for impl, _, _ in built if impl.ours and "default" in impl.name}
        built = []
        gc.collect()
        print(f"\n## {title}: {n:,} averaged elements in {n_tensors} tensors "
              f"({fmt_bytes(moved)} moved per update)\n")
        print("| implementation | ms/update | GB/s | × ideal | time ÷ weightavg | max alloc |")
        print("|---|---:|---:|---:|---:|---:|")
        for impl, sec, alloc in rows:
            ts = by_name[impl.name]
            vs = "" if impl.ours or impl.kind in ("ideal", "floor") else f"{paired_ratio(ts, ours_ts[impl.kind]):.1f}×"
            sized = " (≥10% of model)" if alloc >= 0.1 * 4 * n else ""
            print(f"| {impl.name} | {sec * 1e3:.3f} | {moved / sec / 1e9:.1f} | {paired_ratio(ts, ideal_ts):.2f} "
                  f"| {vs} | {fmt_bytes(alloc)}{sized} |")
        peers = [by_name[i.name] for i, _, _ in rows if not i.ours and i.kind not in ("ideal", "floor")]
        for i, _, a in rows:
            if i.ours and a >= 0.1 * 4 * n:
                verdicts.append(f"MISS {title}: {i.name} allocates {fmt_bytes(a)} (≥10% of model)")
        verdicts += targets(title, by_name, ideal_ts, peers)
        del model
        gc.collect()
    print("\n## Allocation per update, by model dtype (torch.profiler memory events)\n")
    print("\n".join(allocation_table()))
    print("\n## Targets (issue #14; paired ratios, median over rounds)\n")
    for v in verdicts:
        print(f"- {v}")
    return 0


def targets(title: str, by_name: dict[str, list[float]], ideal_ts: list[float],
            peers: list[list[float]]) -> list[str]:
    """PASS/MISS lines for the issue's CPU targets on one model."""
    out = []

    def check(label: str, name: str, floor: str | None, limit: float, peer_min: float | None = None) -> None:
        ts = by_name[name]
        floor_ts = by_name[floor] if floor is not None else ideal_ts
        x = paired_ratio(ts, floor_ts)
        ok = x <= limit
        text = f"{x:.2f}× {floor or 'the flat ideal'} (target ≤ {limit}×)"
        if peer_min is not None:
            worst = min([paired_ratio(p, ts) for p in peers] or [math.inf])
            ok = ok and worst >= peer_min
            text += f", every peer ≥ {worst:.2f}× its time (target ≥ {peer_min}×)"
        out.append(f"{'PASS' if ok else 'MISS'} {title}: ema ({label}) {text}")

    allow = "weightavg.Averager ema (nonfinite='allow')"
    checked = "weightavg.Averager ema (nonfinite='raise', default)"
    c_allow = "weightavg.Averager ema, make_contiguous(model) (nonfinite='allow')"
    c_checked = "weightavg.Averager ema, make_contiguous(model) (default)"
    if "big" in title:
        check("allow", allow, PER_TENSOR, 1.1, peer_min=1.0)
        check("contiguous, allow", c_allow, None, 1.1)
        check("default check", checked, PER_TENSOR_CHECKED, 1.1)
        check("contiguous, default check", c_checked, FLAT_CHECKED, 1.1)
    elif "small" in title and "1M" in title:
        check("allow", allow, GATHER, 1.25, peer_min=10.0)
        check("default check", checked, GATHER_CHECKED, 1.25)
    return out


if __name__ == "__main__":
    raise SystemExit(main())


# ----------------------------------------------------------------------------- CUDA


def _timm_style(model: nn.Module) -> Callable[[], Any]:
    """timm ModelEmaV3's update, written here: one _foreach_lerp_ over parameters and float buffers."""
    ema = copy.deepcopy(model)
    mine = [t for t in [*ema.parameters(), *ema.buffers()] if t.is_floating_point()]
    theirs = [t.detach() for t in [*model.parameters(), *model.buffers()] if t.is_floating_point()]

    def update() -> None:
        with torch.no_grad():
            torch._foreach_lerp_(mine, theirs, 1 - DECAY)

    return update


def _ema_pytorch_style(model: nn.Module) -> Callable[[], Any]:
    """ema-pytorch's default update, written here: one lerp_ per tensor in a Python loop."""
    ema = copy.deepcopy(model)
    pairs = [(a, b.detach()) for a, b in zip([*ema.parameters(), *ema.buffers()],
                                               [*model.parameters(), *model.buffers()], strict=True)]

    def update() -> None:
        with torch.no_grad():
            for a, b in pairs:
                if a.is_floating_point():
                    a.lerp_(b, 1 - DECAY)
                else:
                    a.copy_(b)

    return update


def _foreach_floor(model: nn.Module) -> Callable[[], Any]:
    srcs = _float_sources(model)
    avgs = [t.clone() for t in srcs]
    return lambda: torch._foreach_lerp_(avgs, srcs, 1 - DECAY)


def _ours_cuda(two: bool, nonfinite: str, check: str = "auto") -> Callable[[nn.Module], Callable[[], Any]]:
    def make(model: nn.Module) -> Callable[[], Any]:
        rule: Any = {"a": wa.ema(DECAY), "b": wa.ema(0.9999)} if two else wa.ema(DECAY)
        avg = wa.Averager(model, rule=rule, nonfinite=nonfinite, check=check)  # type: ignore[arg-type]
        return lambda: avg.update(model)

    return make


def cuda_main(args: argparse.Namespace) -> int:
    """GPU table: ms, GB/s and % of peak bandwidth per update, and CPU launch time per update.

    Bytes moved: read average + read source + write average per averaged element and EMA (fp32).
    GPU time from CUDA events over ``reps`` back-to-back updates; CPU time is the host time spent in
    the update call (launching), measured over the same updates with no synchronisation between them.
    """
    dev = torch.device(args.device)
    if dev.index is None:
        dev = torch.device(dev.type, torch.cuda.current_device())
    torch.cuda.set_device(dev)
    props = torch.cuda.get_device_properties(dev.index)
    peak = args.peak_gbs
    print(f"# weightavg update speed on {props.name}: torch {torch.__version__}, "
          f"peak bandwidth {f'{peak:.0f} GB/s (--peak-gbs)' if peak else 'not given (pass --peak-gbs)'}\n")
    reps = args.reps or (5 if args.quick else 20)
    sizes = [10**6, 10**8] if args.quick else [10**6, 10**7, 10**8, 10**9]
    impls: list[tuple[str, Callable[[nn.Module], Callable[[], Any]], int]] = [
        ("ideal: one lerp_, flat fp32", _ideal, 1),
        ("torch._foreach_lerp_ over the tensors", _foreach_floor, 1),
        ("weightavg ema, checked (deferred, default)", _ours_cuda(False, "raise"), 1),
        ("weightavg ema, checked on the host (check='host')", _ours_cuda(False, "raise", "host"), 1),
        ("weightavg ema, nonfinite='allow'", _ours_cuda(False, "allow"), 1),
        ("weightavg two EMAs, checked (deferred)", _ours_cuda(True, "raise"), 2),
        ("weightavg two EMAs, nonfinite='allow'", _ours_cuda(True, "allow"), 2),
        ("torch AveragedModel (get_ema_multi_avg_fn)", _torch_averaged(True), 1),
        ("timm-style loop (_foreach_lerp_)", _timm_style, 1),
        ("ema-pytorch-style loop (lerp_ per tensor)", _ema_pytorch_style, 1),
    ]
    shapes: list[tuple[str, Callable[[], nn.Module]]] = [
        (f"4 big tensors, {n:.0e}", lambda n=n: big_tensors(n)) for n in sizes]
    shapes.append(("~3000 small tensors, 1M", lambda: small_tensors(1_000_000)))
    for title, build in shapes:
        with torch.device(dev):  # built on the device: initialising 1e9 parameters on the CPU is slow
            model = build()
        n = float_numel(model)
        print(f"\n## {title}: {n:,} averaged elements\n")
        print("| implementation | ms/update (GPU) | GB/s | % of peak | CPU ms/update (launch) |")
        print("|---|---:|---:|---:|---:|")
        for name, make, emas in impls:
            try:
                update = make(model)
                for _ in range(3):
                    update()
                torch.cuda.synchronize()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                t0 = time.perf_counter()
                start.record()
                for _ in range(reps):
                    update()
                end.record()
                cpu = (time.perf_counter() - t0) / reps
                end.synchronize()
                gpu = start.elapsed_time(end) / 1e3 / reps
            except Exception as err:  # e.g. out of memory at 1e9 for a peer that copies the model
                print(f"| {name} | failed: {type(err).__name__} | | | |")
                torch.cuda.empty_cache()
                continue
            moved = 3 * 4 * n * emas
            gbs = moved / gpu / 1e9
            pct = f"{100 * gbs / peak:.0f} %" if peak else "-"
            print(f"| {name} | {gpu * 1e3:.3f} | {gbs:.0f} | {pct} | {cpu * 1e3:.3f} |")
            del update
            gc.collect()
            torch.cuda.empty_cache()
        del model
        gc.collect()
        torch.cuda.empty_cache()
    return 0
