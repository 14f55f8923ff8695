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
many elements: the bytes that must move are read average + read source + write average. Each timed
update starts with a cold cache: a buffer larger than the last-level cache is written first,
outside the timed region. Peers are skipped when they do not import.

Run:
    python benchmarks/update_speed.py            # full run (a few minutes; use a quiet machine)
    python benchmarks/update_speed.py --quick    # smoke run: 1M models, 3 repetitions
    python benchmarks/update_speed.py --huge --threads 4
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
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

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


def _ideal(model: nn.Module) -> Callable[[], Any]:
    n = float_numel(model)
    avg, src = torch.randn(n), torch.randn(n)
    return lambda: avg.lerp_(src, 1 - DECAY)


def implementations() -> list[tuple[Impl, str | None]]:
    """Every implementation with the reason it is unavailable (None if it runs)."""
    out: list[tuple[Impl, str | None]] = [
        (Impl("ideal: one lerp_ over one flat fp32 buffer", "ideal", _ideal), None),
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


class FreshAllocations(TorchDispatchMode):
    """Largest tensor an operator allocates (an output aliasing none of its inputs)."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0
        self.total = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        ins = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
               if isinstance(t, torch.Tensor) and t.device.type != "meta"}
        out = func(*args, **kwargs)
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in ins:
                n = t.untyped_storage().nbytes()
                self.largest = max(self.largest, n)
                self.total += n
        return out


def largest_transient(update: Callable[[], Any]) -> tuple[int, int]:
    with FreshAllocations() as rec:
        update()
    return rec.largest, rec.total


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
    args = parser.parse_args(argv)
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
    print("\nmax alloc: the largest tensor any operator allocated during one update (measured with a"
          " TorchDispatchMode that records every operator output whose storage aliases none of its"
          " inputs). Flagged when ≥ 10% of the averaged bytes.\n")
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
            vs = "" if impl.ours or impl.kind == "ideal" else f"{paired_ratio(ts, ours_ts[impl.kind]):.1f}×"
            sized = " (≥10% of model)" if alloc >= 0.1 * 4 * n else ""
            print(f"| {impl.name} | {sec * 1e3:.3f} | {moved / sec / 1e9:.1f} | {paired_ratio(ts, ideal_ts):.2f} "
                  f"| {vs} | {fmt_bytes(alloc)}{sized} |")
        peers = [by_name[i.name] for i, _, _ in rows if not i.ours and i.kind != "ideal"]
        for i, _, a in rows:
            if i.ours and a >= 0.1 * 4 * n:
                verdicts.append(f"MISS {title}: {i.name} allocates {fmt_bytes(a)} (≥10% of model)")
        variants = (("allow", "weightavg.Averager ema (nonfinite='allow')"),
                    ("default", "weightavg.Averager ema (nonfinite='raise', default)"),
                    ("contiguous, allow", "weightavg.Averager ema, make_contiguous(model) (nonfinite='allow')"),
                    ("contiguous, default", "weightavg.Averager ema, make_contiguous(model) (default)"))
        for label, name in variants:
            ts = by_name[name]
            x_ideal = paired_ratio(ts, ideal_ts)
            peer_ratios = [paired_ratio(p, ts) for p in peers] or [math.inf]
            if "big" in title:
                ok = x_ideal <= 1.1 and min(peer_ratios) >= 1.0
                verdicts.append(f"{'PASS' if ok else 'MISS'} {title}: ema ({label}) {x_ideal:.2f}× ideal "
                                f"(target ≤ 1.1×), fastest peer {min(peer_ratios):.2f}× its time (target ≥ 1)")
            elif "small" in title and "1M" in title:
                ok = min(peer_ratios) >= 10 and x_ideal <= 5
                verdicts.append(f"{'PASS' if ok else 'MISS'} {title}: ema ({label}) {x_ideal:.2f}× ideal "
                                f"(target ≤ 5×), every peer ≥ {min(peer_ratios):.1f}× slower (target ≥ 10×)")
        del model
        gc.collect()
    print("\n## Targets\n")
    for v in verdicts:
        print(f"- {v}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
