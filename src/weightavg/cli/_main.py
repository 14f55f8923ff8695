"""The ``weightavg`` command: ``demo``, ``average`` and ``plot-lr`` subcommands.

``main(argv)`` returns the exit status: 0 on success, 1 with a one-line reason on a user error
(bad input file, missing optional package...), 2 for a malformed command line (argparse), 130 when
interrupted. Tracebacks are kept for bugs, not for user errors.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .. import __version__
from .._errors import WeightAvgError, bad_arg

__all__ = ["build_parser", "cmd_average", "cmd_demo", "cmd_plot_lr", "main"]

_DEMO_EXAMPLES = """\
examples:
  weightavg demo                        # MNIST-1D, MLP, 5 seeds: SGD vs SWA vs EMA (~1 min)
  weightavg demo --quick                # a few seconds, for a smoke test
  weightavg demo --seeds 10 --epochs 120 --out runs/swa
  weightavg demo --dataset digits --methods swa
  weightavg demo --model cnn            # a CNN near its ceiling: SWA's gain is within noise (~2 min)
  weightavg demo --json > result.json   # machine-readable result on stdout

SGD and each method share a seed's initial weights and batch order; SWA branches off the SGD run
at 75% of the epochs. The table gives mean ± std over seeds, the paired difference to SGD and its
paired t-test p-value. Files: results.md, results.json and PNG plots (with matplotlib).
"""

_AVERAGE_EXAMPLES = """\
examples:
  weightavg average ckpt/epoch_{50..59}.pt -o swa.pt           # uniform average
  weightavg average ckpt/*.ckpt --key state_dict -o avg.ckpt   # Lightning checkpoints
  weightavg average $(ls run/step_*.safetensors | sort -V) --last 5 -o lawa.safetensors
  weightavg average $(ls -d out/checkpoint-* | sort -V) --ema 0.9 -o out/ema   # HF directories
  weightavg average a.pt b.pt -o avg.pt --json                 # JSON summary on stdout

Inputs are averaged in the order given (a shell glob sorts lexically: epoch_10 before epoch_9;
'sort -V' sorts numbers). Floating tensors are averaged in float32 (float64 inputs in float64)
and written in their own dtype; integer tensors are copied from the last input. All inputs must
have the same names, shapes and dtypes. The output is written atomically in the inputs' format,
with a note of what was averaged in its metadata. torch files are read with weights_only=True:
pickles holding arbitrary Python objects are refused.
"""

_PLOT_LR_EXAMPLES = """\
examples:
  weightavg plot-lr --lr 0.1 --swa-lr 0.001 --swa-start 2 --anneal-epochs 10 --epochs 20
  weightavg plot-lr --lr 0.1 --swa-lr 0.001 --swa-start 2 --anneal-epochs 10 --strategy linear
  weightavg plot-lr --demo                        # the demo's SGD and SWA schedules
  weightavg plot-lr --lr 0.05 --swa-lr 0.01 --swa-start 15 --epochs 20 --json
  weightavg plot-lr --lr 0.05 --swa-lr 0.005 --swa-start 10 --cycle 4 --strategy linear --epochs 30

The SWA phase is weightavg.SWA's (torch.optim.swa_utils.SWALR stepped once per epoch): the
first SWA epoch uses the current learning rate, which then anneals (cos or linear) to swa_lr
over --anneal-epochs epochs and stays there; with --cycle it restarts every cycle instead.
"""


class _Parser(argparse.ArgumentParser):
    """argparse with the examples kept as written."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)


def _positive_int(name: str) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a positive integer, got {text!r}") from None
        if v < 1:
            raise argparse.ArgumentTypeError(f"{name} must be a positive integer, got {text!r}")
        return v

    return parse


def _positive_float(name: str) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a positive number, got {text!r}") from None
        if not (v > 0 and math.isfinite(v)):
            raise argparse.ArgumentTypeError(f"{name} must be a positive number, got {text!r}")
        return v

    return parse


def _fraction(name: str) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a number in (0, 1), got {text!r}") from None
        if not 0.0 < v < 1.0:
            raise argparse.ArgumentTypeError(f"{name} must be a number in (0, 1), got {text!r}")
        return v

    return parse


def build_parser() -> argparse.ArgumentParser:
    """The ``weightavg`` argument parser (one subparser per subcommand)."""
    parser = _Parser(
        prog="weightavg",
        description="Weight averaging for PyTorch (SWA, EMA, SWAG): a demo, checkpoint averaging, "
        "learning-rate schedule plots.",
        epilog="Run 'weightavg <command> --help' for a command's options and examples.",
    )
    parser.add_argument("--version", action="version", version=f"weightavg {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="<command>")

    # ------------------------------------------------------------------ demo
    from ..demo import DATASETS, MODELS

    p = sub.add_parser(
        "demo", help="SGD vs SWA vs EMA (vs SWAG) on MNIST-1D, paired by seed (no download)",
        description="Train an MLP on MNIST-1D (generated locally) with tuned SGD, SWA and EMA over "
        "several seeds and print test accuracy, NLL and ECE with paired p-values.",
        epilog=_DEMO_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--dataset", choices=DATASETS, default="mnist1d",
                   help="mnist1d (default, generated locally) or digits (scikit-learn)")
    p.add_argument("--model", choices=MODELS, default="mlp", help="mlp (default) or cnn")
    p.add_argument("--seeds", type=_positive_int("--seeds"), default=None,
                   help="number of seeds (default 5, 3 for --model cnn; 2 with --quick)")
    p.add_argument("--epochs", type=_positive_int("--epochs"), default=None,
                   help="epochs of the SGD run (default 60; 8 with --quick)")
    p.add_argument("--methods", default=None,
                   help="comma-separated methods to compare with SGD: sgd, swa, ema, swag "
                   "(default: all available)")
    p.add_argument("--out", type=Path, default=Path("weightavg-demo"),
                   help="output directory (default ./weightavg-demo)")
    p.add_argument("--threads", type=_positive_int("--threads"), default=1,
                   help="torch threads (default 1: small models on shared CPUs slow down with more)")
    p.add_argument("--quick", action="store_true",
                   help="a smoke test in seconds: 2 seeds, 8 epochs, 5 SWAG draws")
    p.add_argument("--swag-samples", type=_positive_int("--swag-samples"), default=None,
                   help="draws averaged by SWAG's prediction (default 30)")
    p.add_argument("--swa-lr", type=_positive_float("--swa-lr"), default=0.03,
                   help="SWA learning rate (default 0.03)")
    p.add_argument("--swa-start", type=_fraction("--swa-start"), default=0.75,
                   help="fraction of the epochs after which SWA starts (default 0.75)")
    p.add_argument("--anneal-epochs", type=int, default=3, help="epochs of the anneal to --swa-lr")
    p.add_argument("--eval-every", type=_positive_int("--eval-every"), default=None, metavar="N",
                   help="evaluate the test-error curves every N epochs (default 1, 5 for cnn)")
    p.add_argument("--no-plots", action="store_true", help="do not draw the PNG plots")
    p.add_argument("--progress", choices=("auto", "rich", "tqdm", "plain", "none"), default="auto",
                   help="progress display on stderr (default auto: rich, tqdm or plain lines)")
    p.add_argument("--json", action="store_true",
                   help="print the result as JSON on stdout instead of the table")
    p.set_defaults(func=cmd_demo)

    # ------------------------------------------------------------------ average
    p = sub.add_parser(
        "average", help="average saved checkpoints (uniform, last k, or EMA)",
        description="Average checkpoints offline: torch files, safetensors files or Hugging Face "
        "model directories. Memory stays at about one model whatever the number of inputs.",
        epilog=_AVERAGE_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("inputs", nargs="+", metavar="CKPT", help="checkpoints, in averaging order")
    p.add_argument("-o", "--output", type=Path, required=True, metavar="OUT",
                   help="output file (or directory for Hugging Face inputs)")
    how = p.add_mutually_exclusive_group()
    how.add_argument("--last", type=_positive_int("--last"), metavar="K",
                     help="average only the last K inputs (LAWA)")
    how.add_argument("--ema", type=float, metavar="DECAY",
                     help="EMA over the inputs in order: avg = DECAY*avg + (1-DECAY)*next")
    p.add_argument("--key", help="entry holding the weights in nested torch checkpoints, "
                   "e.g. state_dict (dots for deeper levels: model.ema)")
    p.add_argument("-f", "--force", action="store_true", help="replace OUT if it exists")
    p.add_argument("--json", action="store_true", help="print a JSON summary on stdout")
    p.set_defaults(func=cmd_average)

    # ------------------------------------------------------------------ export (DCP -> safetensors)
    from ._export import add_export_parser

    add_export_parser(sub)

    # ------------------------------------------------------------------ plot-lr
    p = sub.add_parser(
        "plot-lr", help="draw an SWA learning-rate schedule (SWALR) as PNG",
        description="Draw the learning rate per epoch of an SWA run: the schedule before the SWA "
        "start, then SWALR's anneal to swa_lr.",
        epilog=_PLOT_LR_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--lr", type=_positive_float("--lr"), default=0.1, help="model learning rate")
    p.add_argument("--swa-lr", type=_positive_float("--swa-lr"), default=0.001,
                   help="SWA learning rate")
    p.add_argument("--swa-start", type=int, default=2, help="first SWA epoch (0-based)")
    p.add_argument("--anneal-epochs", type=int, default=10, help="epochs of the anneal")
    p.add_argument("--strategy", choices=("cos", "linear"), default="cos", help="anneal shape")
    p.add_argument("--epochs", type=_positive_int("--epochs"), default=20, help="epochs drawn")
    p.add_argument("--before", choices=("constant", "cosine"), default="constant",
                   help="learning rate before the SWA start (default constant)")
    p.add_argument("--cycle", type=_positive_int("--cycle"), default=None, metavar="EPOCHS",
                   help="cyclic SWA phase (weightavg.SWA(cycle=...)): each cycle goes from the "
                   "rate at the SWA start down to --swa-lr")
    p.add_argument("--demo", action="store_true",
                   help="draw the demo's schedules (SGD cosine and SWA; other options ignored)")
    p.add_argument("-o", "--output", type=Path, default=Path("lr_schedule.png"), metavar="PNG",
                   help="output PNG (default lr_schedule.png)")
    p.add_argument("--json", action="store_true",
                   help="print the per-epoch learning rates as JSON (no matplotlib needed)")
    p.set_defaults(func=cmd_plot_lr)
    return parser


# ----------------------------------------------------------------------------- demo


def cmd_demo(args: argparse.Namespace) -> int:
    """``weightavg demo``: run the comparison, print the table, write the files."""
    from ..demo import DemoConfig, run_demo
    from ..demo._methods import default_methods
    from ..demo._progress import make_progress
    from ..demo._report import print_table, result_json, write_outputs

    if args.methods is None:
        methods = default_methods()
    else:
        methods = tuple(m.strip().lower() for m in args.methods.split(",") if m.strip())
        if not methods:
            raise bad_arg("--methods", args.methods, "a comma-separated list such as swa,ema")
    cfg = DemoConfig(
        dataset=args.dataset,
        model=args.model,
        seeds=args.seeds if args.seeds is not None else (2 if args.quick else 3 if args.model == "cnn" else 5),
        epochs=args.epochs if args.epochs is not None else (8 if args.quick else 60),
        swag_samples=args.swag_samples if args.swag_samples is not None else (5 if args.quick else 30),
        methods=methods,
        swa_lr=args.swa_lr,
        swa_start=args.swa_start,
        anneal_epochs=args.anneal_epochs,
        threads=args.threads,
        eval_every=args.eval_every if args.eval_every is not None else (5 if args.model == "cnn" else 1),
    )
    cfg.validate()
    progress = make_progress(args.progress)
    result = run_demo(cfg, progress)
    files, note = write_outputs(result, args.out, plots=not args.no_plots)
    if args.json:
        print(json.dumps(result_json(result, files), indent=1))
    else:
        print_table(result)
        if args.quick:
            print("(--quick is a smoke test: too few epochs and seeds for these numbers to mean "
                  "anything; run 'weightavg demo' for the real comparison)")
        print("Files: " + ", ".join(files))
        if note:
            print(note)
    return 0


# ----------------------------------------------------------------------------- average


def cmd_average(args: argparse.Namespace) -> int:
    """``weightavg average``: average checkpoints into one, written atomically."""
    from ._average import average_checkpoints

    report = average_checkpoints(
        args.inputs, args.output, last=args.last, ema_decay=args.ema, key=args.key,
        force=args.force, warn=False,
    )
    for w in report["warnings"]:
        print(f"weightavg average: warning: {w}", file=sys.stderr)
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        of = "" if report["method"] == "last_k" else f" of {len(report['inputs'])} checkpoint(s)"
        print(f"wrote {report['output']}: {report['method_description']}{of}; "
              f"{report['num_averaged_tensors']} tensors averaged, {report['num_copied_tensors']} "
              "copied from the last input")
    return 0


# ----------------------------------------------------------------------------- plot-lr


def cmd_plot_lr(args: argparse.Namespace) -> int:
    """``weightavg plot-lr``: draw (or print) a per-epoch SWA learning-rate schedule."""
    from ..demo import DemoConfig
    from ..demo._lr import swa_schedule

    if args.demo:
        cfg = DemoConfig()
        sched = cfg.lr_schedules()
        schedules = {"SGD (cosine)": sched["sgd"], "SWA (SWALR)": sched["swa"]}
        start = cfg.swa_start_epoch
        notes = [f"lr {cfg.lr:g}, swa_lr {cfg.swa_lr:g}",
                 f"swa_start {start}, anneal {cfg.anneal_strategy} {cfg.anneal_epochs} ep"]
        params: dict[str, Any] = {"demo": True, "lr": cfg.lr, "swa_lr": cfg.swa_lr, "swa_start": start,
                                  "anneal_epochs": cfg.anneal_epochs, "strategy": cfg.anneal_strategy,
                                  "epochs": cfg.epochs, "before": "cosine"}
    else:
        if not 0 <= args.swa_start < args.epochs:
            raise bad_arg("--swa-start", args.swa_start, f"an epoch in [0, {args.epochs - 1}]")
        if args.anneal_epochs < 0:
            raise bad_arg("--anneal-epochs", args.anneal_epochs, "a non-negative int")
        lrs = swa_schedule(args.epochs, lr=args.lr, swa_start=args.swa_start, swa_lr=args.swa_lr,
                           anneal_epochs=args.anneal_epochs, strategy=args.strategy,
                           before=args.before, cycle=args.cycle)
        schedules = {"learning rate": lrs}
        start = args.swa_start
        notes = [f"model_lr: {args.lr:g}", f"swa_lr: {args.swa_lr:g}",
                 f"swa_epoch_start: {args.swa_start}",
                 f"cycle: {args.cycle} epochs" if args.cycle else f"annealing_epochs: {args.anneal_epochs}",
                 f"annealing_strategy: {args.strategy}"]
        params = {"demo": False, "lr": args.lr, "swa_lr": args.swa_lr, "swa_start": args.swa_start,
                  "anneal_epochs": args.anneal_epochs, "strategy": args.strategy,
                  "epochs": args.epochs, "before": args.before, "cycle": args.cycle}
    if args.json:
        print(json.dumps({"params": params, "schedules": schedules}, indent=1))
        return 0
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:
        raise _MissingMatplotlib()
    from ..demo._report import plot_schedule

    kind = "cyclic SWA" if not args.demo and args.cycle else "SWALR"
    plot_schedule(schedules, args.output, title=f"Learning rate per epoch ({kind})", swa_start=start,
                  notes=notes)
    print(f"wrote {args.output}")
    return 0


class _MissingMatplotlib(WeightAvgError):
    def __init__(self) -> None:
        super().__init__("plot-lr needs matplotlib: pip install 'weightavg[plot]' "
                         "(or use --json for the numbers)")


# ----------------------------------------------------------------------------- entry point


def _one_line(err: BaseException) -> str:
    text = str(err) or type(err).__name__
    return " ".join(text.split())


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``weightavg`` command line; returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version (0) or a usage error (2)
        return int(e.code) if isinstance(e.code, int) else (0 if e.code is None else 2)
    if getattr(args, "func", None) is None:
        parser.print_help(sys.stderr)
        return 2
    t0 = time.perf_counter()
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        print(f"weightavg {args.command}: interrupted after {time.perf_counter() - t0:.0f} s",
              file=sys.stderr)
        return 130
    except (WeightAvgError, OSError) as err:
        print(f"weightavg {args.command}: error: {_one_line(err)}", file=sys.stderr)
        return 1
