"""Turn a :class:`DemoResult` into the printed table, Markdown/JSON files and PNG plots."""

from __future__ import annotations

import io
import itertools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .. import __version__, metrics
from .._files import atomic_output
from ._run import DemoResult
from ._stats import mean_std

__all__ = [
    "DEMO_FILES",
    "PLOT_FILES",
    "Outputs",
    "column_order",
    "plot_schedule",
    "render_markdown",
    "result_json",
    "table_rows",
    "verdicts",
    "write_atomic",
    "write_outputs",
]

PLOT_FILES = ("lr_schedule.png", "test_error.png", "reliability.png")
#: every file the demo writes into its output folder (and the only ones it replaces or removes)
DEMO_FILES = ("results.md", "results.json", *PLOT_FILES)
_ALPHA = 0.05
_METRICS = (("accuracy", "Acc. %", 100.0, 1), ("nll", "NLL", 1.0, 3), ("ece", "ECE %", 100.0, 1))


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through the shared atomic writer (replacing the demo's own file)."""
    with atomic_output(path, force=True) as tmp:
        tmp.write_bytes(data)


def _fmt_p(p: float) -> str:
    if math.isnan(p):
        return "n/a"
    if p < 0.001:
        return "<0.001"
    return f"{p:.3f}"


def _p_text(p: float) -> str:
    """``p = 0.012``, ``p < 0.001`` or ``p n/a``."""
    text = _fmt_p(p)
    if text.startswith("<"):
        return f"p < {text[1:]}"
    return "p n/a" if text == "n/a" else f"p = {text}"


def _nan_to_none(v: float) -> float | None:
    return None if math.isnan(v) else v


def _delta_header(metric: str) -> str:
    return {"accuracy": "Δ acc. (p)", "nll": "Δ NLL (p)", "ece": "Δ ECE (p)"}[metric]


def table_rows(result: DemoResult) -> list[dict[str, str]]:
    """One row per method: formatted cells keyed by column header (see :func:`column_order`)."""
    rows = []
    for key, label in result.labels.items():
        row = {"Method": label}
        for metric, header, scale, digits in _METRICS:
            m, s = result.summary(key, metric)
            row[header] = f"{scale * m:.{digits}f} ± {scale * s:.{digits}f}"
            if key == "sgd":
                row[_delta_header(metric)] = "—"
            else:
                pr = result.versus_sgd(key, metric)
                sign = "+" if pr.diff_mean >= 0 else "−"
                d = digits + 1 if scale == 100.0 else digits
                row[_delta_header(metric)] = (
                    f"{sign}{abs(scale * pr.diff_mean):.{d}f} ({_fmt_p(pr.p_value)})")
        t, _ = result.summary(key, "train_time_s")
        row["s/seed"] = f"{t:.1f}"
        rows.append(row)
    return rows


def column_order() -> list[str]:
    """Column headers of the table, in order."""
    cols = ["Method"]
    for metric, header, _, _ in _METRICS:
        cols += [header, _delta_header(metric)]
    return [*cols, "s/seed"]


def verdicts(result: DemoResult) -> list[str]:
    """Plain-language reading of the table, one line per compared method."""
    n = len(result.seeds)
    out = []
    for key, label in result.labels.items():
        if key == "sgd":
            continue
        acc = result.versus_sgd(key, "accuracy")
        nll = result.versus_sgd(key, "nll")
        if n < 2:
            out.append(f"{label}: {100 * acc.diff_mean:+.2f} accuracy points vs SGD on one seed; "
                       "run with --seeds 3 or more for a p-value.")
            continue
        if math.isnan(acc.p_value):
            line = (f"{label} vs SGD: {100 * acc.diff_mean:+.2f} accuracy points in every seed (no "
                    "p-value: the differences do not vary across seeds)")
        elif acc.p_value < _ALPHA:
            word = "ahead of" if acc.diff_mean > 0 else "behind"
            line = (f"{label} is {word} SGD by {abs(100 * acc.diff_mean):.2f} accuracy points "
                    f"(paired {_p_text(acc.p_value)}, higher in {acc.wins}/{n} seeds)")
        else:
            line = (f"{label} vs SGD: {100 * acc.diff_mean:+.2f} accuracy points, within noise "
                    f"(paired {_p_text(acc.p_value)}, higher in {acc.wins}/{n} seeds)")
        if nll.p_value < _ALPHA:
            line += f"; NLL {'lower' if nll.diff_mean < 0 else 'higher'} by {abs(nll.diff_mean):.3f}"
            line += f" ({_p_text(nll.p_value)})"
        else:
            line += f"; NLL {nll.diff_mean:+.3f}, within noise ({_p_text(nll.p_value)})"
        out.append(line + ".")
    if result.config.model == "cnn":
        out.append("Note: this CNN is close to its ceiling on clean MNIST-1D; SWA's gain over a "
                   "well-tuned SGD run is expected to be within noise here (the MLP shows it).")
    return out


def _header_lines(result: DemoResult) -> list[str]:
    c = result.config
    return [
        f"Data: {result.data_description}.",
        (f"Model: {c.model.upper()} with BatchNorm; {c.epochs} epochs, batch {c.batch_size}, SGD "
         f"(Nesterov momentum {c.momentum}), lr {c.lr:g} cosine-decayed, weight decay {c.weight_decay:g}. "
         f"SWA branches off the SGD run after epoch {c.swa_start_epoch}, anneals ({c.anneal_strategy}, "
         f"{c.anneal_epochs} epochs) to swa_lr {c.swa_lr:g}, averages once per epoch and recomputes "
         "BatchNorm statistics. Same initial weights and batch order for every method of a seed."),
        (f"{len(result.seeds)} seed{'' if len(result.seeds) == 1 else 's'}: mean ± std over seeds; "
         "Δ = paired difference to SGD "
         "(method − SGD), in parentheses its two-sided paired t-test p-value; ECE with 15 bins; "
         "s/seed = training seconds per seed, shared SGD epochs, averaging and BN refresh included "
         "(evaluation excluded)."),
    ]


def render_markdown(result: DemoResult, files: list[str] | None = None) -> str:
    """The table with its context, as Markdown."""
    cols = column_order()
    rows = table_rows(result)
    lines = ["# weightavg demo", "", *_header_lines(result), ""]
    lines.append("| " + " | ".join(cols) + " |")
    lines.append("|" + "|".join("---" if c == "Method" else "---:" for c in cols) + "|")
    for r in rows:
        lines.append("| " + " | ".join(r[c] for c in cols) + " |")
    lines += ["", *[f"- {v}" for v in verdicts(result)], "",
              f"Wall time: {result.wall_time_s:.1f} s with {result.threads} torch thread(s) "
              f"(torch {result.torch_version}, weightavg {__version__})."]
    if files:
        lines += ["", "Files: " + ", ".join(files)]
    return "\n".join(lines) + "\n"


def print_table(result: DemoResult, stream: Any = None) -> None:
    """Print the table (rich when installed, else Markdown) and the verdicts."""
    import importlib.util
    import sys

    stream = stream or sys.stdout
    if importlib.util.find_spec("rich") is None:
        print(render_markdown(result), file=stream, end="")
        return
    from rich import box
    from rich.console import Console
    from rich.table import Table

    probe = Console(file=stream)
    console = Console(file=stream, width=probe.width if probe.is_terminal else 120)
    for line in _header_lines(result):
        console.print(line, highlight=False, markup=False, soft_wrap=True)
    cols = column_order()
    rows = table_rows(result)
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False)
    for c in cols:
        table.add_column(c, justify="left" if c == "Method" else "right", no_wrap=True)
    for r in rows:
        table.add_row(*(r[c] for c in cols))
    if console.measure(table, options=console.options.update_width(10_000)).maximum > console.width:
        # narrow terminal: each metric in one column, the paired difference under the value
        table = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_lines=True)
        table.add_column("Method", no_wrap=True)
        for _, header, _, _ in _METRICS:
            table.add_column(f"{header}\nΔ (p)", justify="right", no_wrap=True)
        table.add_column("s/seed", justify="right", no_wrap=True)
        for r in rows:
            table.add_row(r["Method"], *(f"{r[h]}\n{r[_delta_header(m)]}" for m, h, _, _ in _METRICS),
                          r["s/seed"])
    console.print(table)
    for v in verdicts(result):
        console.print(v, highlight=False, markup=False, soft_wrap=True)
    console.print(f"Wall time: {result.wall_time_s:.1f} s with {result.threads} torch thread(s).",
                  highlight=False)


def _curve_stats(result: DemoResult, key: str) -> tuple[list[float], list[float]]:
    E = result.config.epochs
    means, stds = [], []
    for e in range(E):
        vals = [s.curves[key][e] for s in result.seeds if not math.isnan(s.curves[key][e])]
        m, sd = mean_std(vals) if vals else (math.nan, math.nan)
        means.append(m)
        stds.append(sd)
    return means, stds


def result_json(
    result: DemoResult, files: list[str] | None = None, plot_errors: dict[str, str] | None = None
) -> dict[str, Any]:
    """Machine-readable result (NaN becomes null).

    ``methods.<key>.vs_sgd.<metric>.wins`` counts the seeds where the method beat SGD: higher
    accuracy, lower NLL and ECE (``better`` says which); ``plot_errors`` maps a plot that could not
    be drawn to the reason.
    """
    methods: dict[str, Any] = {}
    for key, label in result.labels.items():
        entry: dict[str, Any] = {"label": label, "description": result.descriptions[key],
                                 "trajectory": result.trajectories[key]}
        for metric in ("accuracy", "nll", "ece", "train_time_s"):
            m, s = result.summary(key, metric)
            entry[metric] = {"mean": m, "std": s, "per_seed": result.values(key, metric)}
        if key != "sgd":
            entry["vs_sgd"] = {}
            for metric in ("accuracy", "nll", "ece"):
                pr = result.versus_sgd(key, metric)
                higher = metric == "accuracy"
                wins = sum((d > 0) if higher else (d < 0) for d in result.differences(key, metric))
                entry["vs_sgd"][metric] = {"diff_mean": pr.diff_mean, "diff_std": pr.diff_std,
                                           "p_value": _nan_to_none(pr.p_value), "wins": wins,
                                           "better": "higher" if higher else "lower", "n": pr.n}
        means, stds = _curve_stats(result, key)
        entry["test_error_curve"] = {"mean": [_nan_to_none(v) for v in means],
                                     "std": [_nan_to_none(v) for v in stds]}
        methods[key] = entry
    schedules = result.config.lr_schedules()
    return {
        "weightavg_version": __version__,
        "torch_version": result.torch_version,
        "data": result.data_description,
        "config": result.config_dict(),
        "seeds": [s.seed for s in result.seeds],
        "methods": methods,
        "lr_schedules": {k: schedules[t] for k, t in result.trajectories.items()},
        "verdicts": verdicts(result),
        "wall_time_s": result.wall_time_s,
        "threads": result.threads,
        "files": files or [],
        "plot_errors": plot_errors or {},
    }


# ----------------------------------------------------------------------------- plots


def _figure(w: float, h: float, ncols: int = 1) -> tuple[Any, Any]:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=100, layout="constrained")
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    return fig, axes


def _save(fig: Any, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    write_atomic(path, buf.getvalue())


_COLORS = {"sgd": "#4c72b0", "swa": "#dd8452", "ema": "#55a868", "swag": "#8172b3"}


def plot_schedule(
    schedules: dict[str, list[float]],
    path: Path,
    *,
    title: str,
    swa_start: int | None = None,
    notes: list[str] | None = None,
    averaged_epochs: list[int] | None = None,
) -> None:
    """Learning rate per epoch, one line per schedule (epochs numbered from 1)."""
    fig, (ax,) = _figure(7.0, 4.0)
    for i, (name, lrs) in enumerate(schedules.items()):
        xs = list(range(1, len(lrs) + 1))
        ax.plot(xs, lrs, marker="o", markersize=2.5, lw=1.6, label=name,
                color=list(_COLORS.values())[i % len(_COLORS)], ls="-" if i == 0 else "--")
    if swa_start is not None:
        ax.axvline(swa_start + 0.5, color="grey", lw=0.8, ls=":")
        ax.text(swa_start + 0.7, 0.99, "SWA start", va="top", fontsize=8, color="grey",
                transform=ax.get_xaxis_transform())
    if averaged_epochs:
        ax.plot([e + 1 for e in averaged_epochs],
                [0.0] * len(averaged_epochs), "|", color="#dd8452", ms=8,
                label="SWA snapshot (end of epoch)")
    if notes:
        ax.text(0.02, 0.03, "\n".join(notes), transform=ax.transAxes, ha="left", va="bottom",
                fontsize=8, family="monospace")
    ax.set_xlabel("epoch")
    ax.set_ylabel("learning rate")
    ax.set_title(title, fontsize=10)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.legend(fontsize=8, loc="upper right", bbox_to_anchor=(1.0, 0.93))
    ax.grid(alpha=0.3)
    _save(fig, path)


def _plot_lr(result: DemoResult, path: Path) -> None:
    c = result.config
    sched = c.lr_schedules()
    by_traj: dict[str, list[str]] = {}
    for k, t in result.trajectories.items():
        by_traj.setdefault(t, []).append(result.labels[k])
    named = {" / ".join(labels) + (" (cosine)" if t == "sgd" else " (SWALR)"): sched[t]
             for t, labels in by_traj.items()}
    averaged = list(range(c.swa_start_epoch, c.epochs)) if "swa" in result.trajectories else None
    plot_schedule(named, path, title="Learning rate per epoch", swa_start=c.swa_start_epoch,
                  averaged_epochs=averaged,
                  notes=[f"lr {c.lr:g}, swa_lr {c.swa_lr:g}",
                         f"anneal {c.anneal_strategy}, {c.anneal_epochs} epochs"])


def _zoom_start(epochs: int, swa_start: int) -> int:
    """First epoch (1-based) of the zoom panel: a few epochs before the SWA start, within the last part."""
    return max(1, min(swa_start, epochs - max(2, epochs // 4)) - max(1, epochs // 12))


def _limits(values: list[float], *, pad: float = 0.06, floor: float = 0.5) -> tuple[float, float]:
    lo, hi = min(values), max(values)
    margin = max(pad * (hi - lo), floor)
    return lo - margin, hi + margin


def _error_figure(result: DemoResult) -> Any:
    """Test error per epoch, whole run and zoom on the SWA phase (only evaluated epochs drawn)."""
    c = result.config
    E, S = c.epochs, c.swa_start_epoch
    fig, axes = _figure(11.0, 4.2, ncols=2)
    lo = _zoom_start(E, S)
    spans: dict[int, list[float]] = {0: [], 1: []}  # panel -> every drawn y (curve and band edges)
    for key, label in result.labels.items():
        means, stds = _curve_stats(result, key)
        pts = [(e + 1, 100 * m, 100 * s) for e, (m, s) in enumerate(zip(means, stds, strict=True))
               if not math.isnan(m)]  # epochs without an evaluation (--eval-every) are not drawn
        if not pts:
            continue
        xs = [p[0] for p in pts]
        ms = [p[1] for p in pts]
        ss = [0.0 if math.isnan(p[2]) else p[2] for p in pts]
        for i in (0, 1):
            shown = [j for j, x in enumerate(xs) if i == 0 or x >= lo]
            spans[i] += [ms[j] + d * ss[j] for j in shown for d in (-1.0, 1.0)]
        color = _COLORS.get(key)
        if len(xs) == 1:  # evaluated at the end only (e.g. SWAG)
            for ax in axes:
                ax.errorbar(xs, ms, yerr=ss, fmt="D", ms=5, capsize=3, color=color,
                            label=f"{label} (end of run)")
            continue
        name = label if key == "sgd" else f"{label} (running average)"
        sparse = c.eval_every > 1
        for ax in axes:
            ax.plot(xs, ms, lw=1.5, label=name, color=color, marker="o" if sparse else None, ms=3)
            ax.fill_between(xs, [m - s for m, s in zip(ms, ss, strict=True)],
                            [m + s for m, s in zip(ms, ss, strict=True)],
                            alpha=0.15, color=color, lw=0)
    every = "" if c.eval_every == 1 else f", evaluated every {c.eval_every} epochs"
    axes[0].set_title(f"Test error per epoch (mean ± std over seeds{every})", fontsize=10)
    axes[1].set_title(f"Zoom: epochs {lo}–{E}", fontsize=10)
    axes[0].set_xlim(0.5, E + 0.5)
    # the zoom starts on its first epoch (a curve coming from earlier epochs enters at the edge) and
    # ends half an epoch after the last: end-of-run markers stay inside
    axes[1].set_xlim(lo, E + 0.5)
    for i, ax in enumerate(axes):
        if spans[i]:
            ax.set_ylim(*_limits(spans[i], floor=0.5 if i == 0 else 0.2))
        ax.axvline(S + 0.5, color="grey", lw=0.8, ls=":", label=f"SWA start (after epoch {S})")
        if i == 1:  # the main panel's legend names the line
            ax.text(S + 0.5, 0.98, " SWA start", va="top", ha="left", fontsize=8, color="grey",
                    transform=ax.get_xaxis_transform())
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_xlabel("epoch")
        ax.set_ylabel("test error (%)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    return fig


def _plot_error(result: DemoResult, path: Path) -> None:
    _save(_error_figure(result), path)


def _reliability_figure(result: DemoResult) -> Any:
    """Reliability diagrams of the pooled seeds; titles give both ECEs (table: mean of seeds)."""
    keys = list(result.labels)
    fig, axes = _figure(3.3 * len(keys), 4.0, ncols=len(keys))
    labels = torch.cat([result.y_test for _ in result.seeds])
    for ax, key in zip(axes, keys, strict=True):
        probs = torch.cat([s.probs[key] for s in result.seeds])
        rel = metrics.reliability(probs, labels, num_bins=15)
        edges = rel.edges.tolist()
        width = edges[1] - edges[0]
        filled = rel.count > 0
        centers = [(a + b) / 2 for a, b in itertools.pairwise(edges)]
        xs = [c for c, f in zip(centers, filled.tolist(), strict=True) if f]
        acc = [a for a, f in zip(rel.accuracy.tolist(), filled.tolist(), strict=True) if f]
        conf = [a for a, f in zip(rel.confidence.tolist(), filled.tolist(), strict=True) if f]
        ax.bar(xs, acc, width=width * 0.95, color=_COLORS.get(key, "#8172b3"), alpha=0.8,
               label="accuracy")
        ax.bar(xs, [c - a for c, a in zip(conf, acc, strict=True)], bottom=acc,
               width=width * 0.95, color="#c44e52", alpha=0.25, edgecolor="#c44e52", lw=0.6,
               label="gap to confidence")
        ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_aspect("equal")
        ax.set_xlabel("confidence")
        table_ece, _ = result.summary(key, "ece")
        ax.set_title(f"{result.labels[key]}\nECE {100 * table_ece:.1f}% (mean of seeds, as in the table)\n"
                     f"ECE {100 * rel.ece:.1f}% (seeds pooled, as drawn)", fontsize=9)
    axes[0].set_ylabel("accuracy")
    axes[0].legend(fontsize=7, loc="upper left")
    fig.suptitle(f"Reliability on the test set ({len(result.seeds)} seed"
                 f"{'' if len(result.seeds) == 1 else 's'} pooled, 15 bins)", fontsize=10)
    return fig


def _plot_reliability(result: DemoResult, path: Path) -> None:
    _save(_reliability_figure(result), path)


@dataclass
class Outputs:
    """What :func:`write_outputs` did in the output folder.

    Attributes:
        files: paths written by this run (the table files first).
        note: why the plots were skipped (matplotlib missing), else None.
        plot_errors: plot file name -> why it could not be drawn.
        replaced: the demo's files of an earlier run that this run overwrote.
        removed: the demo's plots of an earlier run that this run did not draw, deleted so that
            no stale plot stays next to new results (other files are never touched).
    """

    files: list[str] = field(default_factory=list)
    note: str | None = None
    plot_errors: dict[str, str] = field(default_factory=dict)
    replaced: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)


def _reason(err: BaseException) -> str:
    return f"{type(err).__name__}: {' '.join(str(err).split())}".rstrip(": ")


def _write_tables(result: DemoResult, out_dir: Path, files: list[Path],
                  plot_errors: dict[str, str]) -> None:
    names = [str(p) for p in files]
    write_atomic(out_dir / "results.md", render_markdown(result, names).encode())
    write_atomic(out_dir / "results.json",
                 (json.dumps(result_json(result, names, plot_errors), indent=1) + "\n").encode())


def write_outputs(result: DemoResult, out_dir: Path, *, plots: bool = True) -> Outputs:
    """Write ``results.md`` and ``results.json``, then (with matplotlib) the PNG plots, into ``out_dir``.

    The table files are written before any plot is drawn. A plot that fails is recorded in
    :attr:`Outputs.plot_errors` (the other plots are still drawn) and the table files are rewritten
    to list only what exists. The demo's own files of an earlier run (:data:`DEMO_FILES`) are
    replaced, and its plots that this run does not draw are removed; nothing else is touched.

    Returns:
        An :class:`Outputs` record.
    """
    import importlib.util

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    earlier = [n for n in DEMO_FILES if (out_dir / n).exists() or (out_dir / n).is_symlink()]
    outputs = Outputs()
    draw = plots and importlib.util.find_spec("matplotlib") is not None
    if plots and not draw:
        outputs.note = "plots skipped: matplotlib is not installed (pip install 'weightavg[demo]')"
    tables = [out_dir / "results.md", out_dir / "results.json"]
    planned = [out_dir / n for n in PLOT_FILES] if draw else []
    _write_tables(result, out_dir, tables + planned, {})  # before any plot: a plot never loses them
    drawn: list[Path] = []
    for path, fn in zip(planned, (_plot_lr, _plot_error, _plot_reliability), strict=False):
        try:
            fn(result, path)
        except Exception as err:  # a plot must never cost the results: report it and go on
            outputs.plot_errors[path.name] = _reason(err)
        else:
            drawn.append(path)
    if outputs.plot_errors:
        _write_tables(result, out_dir, tables + drawn, outputs.plot_errors)
    for name in PLOT_FILES:
        path = out_dir / name
        if name in earlier and path not in drawn:
            path.unlink(missing_ok=True)  # a stale plot of an earlier run (a symlink: the link only)
            outputs.removed.append(name)
    outputs.replaced = [n for n in earlier if n not in outputs.removed]
    outputs.files = [str(p) for p in tables + drawn]
    return outputs
