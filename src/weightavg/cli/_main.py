"""The ``weightavg`` command: ``demo``, ``average`` and ``plot-lr`` subcommands.

``main(argv)`` returns the exit status: 0 on success, 1 with a one-line reason on a user error
(bad input file, missing optional package...), 2 for a malformed command line (argparse), 130 when
interrupted (Ctrl-C), 143 when terminated (SIGTERM), 141 when stdout is closed early (``| head``).
Tracebacks are kept for bugs, not for user errors. Every file a command writes goes through
:func:`weightavg._files.atomic_output` (no-clobber without ``--force``, atomic, cleaned up on
errors and signals).

A new subcommand: one ``_add_<name>(sub)`` function that builds its subparser and sets
``func=cmd_<name>``, listed in ``_SUBCOMMANDS``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import signal
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .. import __version__
from .._errors import WeightAvgError, bad_arg
from .._files import atomic_output, check_output, one_line_warnings

__all__ = ["build_parser", "cmd_average", "cmd_demo", "cmd_plot_lr", "main"]

_DEMO_EXAMPLES = """\
examples:
  weightavg demo                        # MNIST-1D, MLP, 8 seeds: SGD vs SWA vs EMA (~2 min)
  weightavg demo --quick                # a few seconds, for a smoke test
  weightavg demo --seeds 10 --epochs 120 --out runs/swa
  weightavg demo --dataset digits --methods swa
  weightavg demo --model cnn            # a CNN near its ceiling: SWA's gain is within noise (~3 min)
  weightavg demo --json > result.json   # machine-readable result on stdout

SGD and each method share a seed's initial weights and batch order; SWA branches off the SGD run
after half of the epochs (--swa-start). The table gives mean ± std over seeds, the paired
difference to SGD and its paired t-test p-value. Files: results.md and results.json (written
first), then PNG plots (with matplotlib). --out is checked before any training.
"""

_AVERAGE_EXAMPLES = """\
examples:
  weightavg average ckpt/epoch_{50..59}.pt -o swa.pt           # uniform average
  weightavg average ckpt/*.ckpt --key state_dict -o avg.ckpt   # Lightning checkpoints
  weightavg average $(ls run/step_*.safetensors | sort -V) --last 5 -o lawa.safetensors
  weightavg average $(ls -d out/checkpoint-* | sort -V) --ema 0.9 -o out/ema   # HF directories
  weightavg average a.pt b.pt -o avg.pt --json                 # JSON summary on stdout
  weightavg average dcp/ema_{1,2,3} -o avg.safetensors          # DCP dirs of a sharded run (streamed)

Inputs are averaged in the order given (a shell glob sorts lexically: epoch_10 before epoch_9;
'sort -V' sorts numbers). Floating tensors are averaged in float32 (float64 inputs in float64)
and written in their own dtype; integer tensors are copied from the last input. All inputs must
have the same names, shapes and dtypes. The output is written atomically in the inputs' format,
with a note of what was averaged in its metadata. torch files are read with weights_only=True:
pickles holding arbitrary Python objects are refused.
"""

_PLOT_LR_EXAMPLES = """\
examples:
  weightavg plot-lr --lr 0.1 --swa-lr 0.001 --swa-epoch-start 2 --anneal-epochs 10 --epochs 20
  weightavg plot-lr --lr 0.1 --swa-lr 0.001 --swa-epoch-start 2 --anneal-epochs 10 --strategy linear
  weightavg plot-lr --demo                        # the demo's SGD and SWA schedules
  weightavg plot-lr --lr 0.05 --swa-lr 0.01 --swa-epoch-start 16 --epochs 20 --json
  weightavg plot-lr --lr 0.05 --swa-lr 0.005 --swa-epoch-start 11 --cycle 4 --strategy linear --epochs 30

Epochs are counted from 1, as on the plot and in Lightning's StochasticWeightAveraging:
--swa-epoch-start N is Lightning's swa_epoch_start=N (the first SWA epoch is epoch N). The SWA
phase is weightavg.SWA's (torch.optim.swa_utils.SWALR stepped once per epoch): the first SWA
epoch uses the current learning rate, which then anneals (cos or linear) to swa_lr over
--anneal-epochs epochs and stays there; with --cycle it restarts every cycle instead.
(--swa-start K, the 0-based epoch index of earlier versions, still works: it is
--swa-epoch-start K+1.)
"""


class _DefaultsFormatter(argparse.RawDescriptionHelpFormatter):
    """Examples kept as written, and each option's default shown (unless None, False or said)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if ("default" in text or action.default in (None, False, argparse.SUPPRESS)
                or not action.option_strings):
            return text
        return f"{text} (default: %(default)s)"


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
                   help="number of seeds (default 8, 3 for --model cnn; 2 with --quick)")
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
    p.add_argument("--swa-start", type=_fraction("--swa-start"), default=0.5,
                   help="fraction of the epochs after which SWA starts (default 0.5)")
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
        description="Average checkpoints offline: torch files, safetensors files, Hugging Face "
        "model directories or torch.distributed.checkpoint (DCP) directories. Memory stays at about "
        "one model whatever the number of inputs (one tensor for DCP inputs).",
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
                   "e.g. state_dict (dots for deeper levels: model.ema); in DCP checkpoints, the "
                   "name prefix to take (e.g. model, or ema.averages.swa)")
    p.add_argument("-f", "--force", action="store_true", help="replace OUT if it exists (never an input)")
    p.add_argument("--json", action="store_true", help="print a JSON summary on stdout")
    from ._weighted import add_average_flags  # --weights, --schedule, --greedy --eval

    add_average_flags(p)
    p.set_defaults(func=cmd_average)

    # ------------------------------------------------------------------ export (DCP -> safetensors)
    from ._export import add_export_parser

    add_export_parser(sub)

    # ------------------------------------------------------------------ plot-lr
    p = sub.add_parser(
        "plot-lr", help="draw an SWA learning-rate schedule (SWALR) as PNG",
        description="Draw the learning rate per epoch of an SWA run: the schedule before the SWA "
        "start, then SWALR's anneal to swa_lr. Epochs are counted from 1.",
        epilog=_PLOT_LR_EXAMPLES, formatter_class=_DefaultsFormatter,
    )
    p.add_argument("--lr", type=_positive_float("--lr"), default=0.1, help="model learning rate")
    p.add_argument("--swa-lr", type=_positive_float("--swa-lr"), default=0.001,
                   help="SWA learning rate")
    start = p.add_mutually_exclusive_group()
    start.add_argument("--swa-epoch-start", type=_positive_int("--swa-epoch-start"), default=None,
                       metavar="N", help="first SWA epoch, counted from 1: Lightning's swa_epoch_start "
                       "(default: 2)")
    start.add_argument("--swa-start", type=int, default=None, metavar="K",
                       help="deprecated: the first SWA epoch's 0-based index; the same as "
                       "--swa-epoch-start K+1")
    p.add_argument("--anneal-epochs", type=int, default=10, help="epochs of the anneal")
    p.add_argument("--strategy", choices=("cos", "linear"), default="cos", help="anneal shape")
    p.add_argument("--epochs", type=_positive_int("--epochs"), default=20, help="epochs drawn")
    p.add_argument("--before", choices=("constant", "cosine"), default="constant",
                   help="learning rate before the SWA start")
    p.add_argument("--cycle", type=_positive_int("--cycle"), default=None, metavar="EPOCHS",
                   help="cyclic SWA phase (weightavg.SWA(cycle=...)): each cycle goes from the "
                   "rate at the SWA start down to --swa-lr (default: no cycle)")
    p.add_argument("--demo", action="store_true",
                   help="draw the demo's schedules (SGD cosine and SWA; other options ignored)")
    p.add_argument("-o", "--output", type=Path, default=Path("lr_schedule.png"), metavar="PNG",
                   help="output PNG")
    p.add_argument("-f", "--force", action="store_true", help="replace the output PNG if it exists")
    p.add_argument("--json", action="store_true",
                   help="print the per-epoch learning rates as JSON (no matplotlib needed)")
    p.set_defaults(func=cmd_plot_lr)

    from ._posthoc import add_posthoc_parser  # weightavg posthoc (its own module)

    add_posthoc_parser(sub)
    return parser


# ----------------------------------------------------------------------------- demo


def cmd_demo(args: argparse.Namespace) -> int:
    """``weightavg demo``: check ``--out``, run the comparison, write the files, print the table."""
    from ..demo._command import run_command

    return run_command(args)


# ----------------------------------------------------------------------------- average


def cmd_average(args: argparse.Namespace) -> int:
    """``weightavg average``: average checkpoints into one, written atomically."""
    from ._average import average_checkpoints
    from ._weighted import cmd_weighted_average, wants_weighted

    if wants_weighted(args):
        return cmd_weighted_average(args)
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
        if report["format"].startswith("hf"):
            copied = ", ".join(report["copied_files"]) or "none"
            left = ", ".join(report["not_copied_files"]) or "none"
            print(f"files copied from {report['inputs'][-1]}: {copied}; left out: {left}")
    return 0


# ----------------------------------------------------------------------------- plot-lr


def _swa_start_index(args: argparse.Namespace) -> int:
    """The first SWA epoch's 0-based index from --swa-epoch-start (1-based) or --swa-start."""
    if args.swa_start is not None:
        print(f"weightavg plot-lr: warning: --swa-start is deprecated (a 0-based index): "
              f"--swa-start {args.swa_start} is --swa-epoch-start {args.swa_start + 1}", file=sys.stderr)
        if not 0 <= args.swa_start < args.epochs:
            raise bad_arg("--swa-start", args.swa_start, f"an epoch index in [0, {args.epochs - 1}]")
        return int(args.swa_start)
    n = 2 if args.swa_epoch_start is None else args.swa_epoch_start
    if not 1 <= n <= args.epochs:
        raise bad_arg("--swa-epoch-start", n, f"an epoch in [1, {args.epochs}] (--epochs {args.epochs})")
    return int(n) - 1


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
                 f"first SWA epoch {start + 1} (of {cfg.epochs}, from 1), anneal {cfg.anneal_strategy} "
                 f"{cfg.anneal_epochs} ep"]
        params: dict[str, Any] = {"demo": True, "lr": cfg.lr, "swa_lr": cfg.swa_lr,
                                  "swa_epoch_start": start + 1, "anneal_epochs": cfg.anneal_epochs,
                                  "strategy": cfg.anneal_strategy, "epochs": cfg.epochs, "before": "cosine"}
    else:
        start = _swa_start_index(args)
        if args.anneal_epochs < 0:
            raise bad_arg("--anneal-epochs", args.anneal_epochs, "a non-negative int")
        lrs = swa_schedule(args.epochs, lr=args.lr, swa_start=start, swa_lr=args.swa_lr,
                           anneal_epochs=args.anneal_epochs, strategy=args.strategy,
                           before=args.before, cycle=args.cycle)
        schedules = {"learning rate": lrs}
        notes = [f"model_lr: {args.lr:g}", f"swa_lr: {args.swa_lr:g}",
                 f"swa_epoch_start: {start + 1} (epochs from 1)",
                 f"cycle: {args.cycle} epochs" if args.cycle else f"annealing_epochs: {args.anneal_epochs}",
                 f"annealing_strategy: {args.strategy}"]
        params = {"demo": False, "lr": args.lr, "swa_lr": args.swa_lr, "swa_epoch_start": start + 1,
                  "anneal_epochs": args.anneal_epochs, "strategy": args.strategy,
                  "epochs": args.epochs, "before": args.before, "cycle": args.cycle}
    params["epochs_counted_from"] = 1  # schedules[name][i] is the rate of epoch i + 1
    if args.json:
        print(json.dumps({"params": params, "schedules": schedules}, indent=1))
        return 0
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:
        raise _MissingMatplotlib()
    check_output(args.output, force=args.force)  # before drawing anything
    from ..demo._report import plot_schedule

    kind = "cyclic SWA" if not args.demo and args.cycle else "SWALR"
    with atomic_output(args.output, force=args.force) as tmp:
        plot_schedule(schedules, tmp, title=f"Learning rate per epoch ({kind})", swa_start=start,
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


class _Terminated(BaseException):
    """SIGTERM (or SIGHUP) arrived: unwinds like Ctrl-C, so that temporary files are removed."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _raise_terminated(signum: int, frame: Any) -> None:
    raise _Terminated(signum)


@contextlib.contextmanager
def _signals() -> Any:
    """Ctrl-C raises KeyboardInterrupt and SIGTERM/SIGHUP raise _Terminated while a command runs."""
    if sys.platform == "win32" or not _main_thread():
        yield
        return
    wanted: dict[int, Any] = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: _raise_terminated}
    if hasattr(signal, "SIGHUP"):
        wanted[signal.SIGHUP] = _raise_terminated
    old: dict[int, Any] = {}
    for sig, handler in wanted.items():
        with contextlib.suppress(ValueError, OSError):
            old[sig] = signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, handler in old.items():
            with contextlib.suppress(ValueError, OSError, TypeError):
                signal.signal(sig, handler)


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _stdout_gone() -> int:
    """stdout was closed by its reader (``weightavg ... --json | head``): exit quietly, like ``cat``."""
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    return 128 + 13  # SIGPIPE's conventional status


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``weightavg`` command line; returns the exit status."""
    t0 = time.perf_counter()
    command = "command"
    format_warning = warnings.formatwarning
    with _signals(), warnings.catch_warnings():
        one_line_warnings()
        try:
            parser = build_parser()
            try:
                args = parser.parse_args(argv)
            except SystemExit as e:  # --help, --version (0) or a usage error (2)
                return int(e.code) if isinstance(e.code, int) else (0 if e.code is None else 2)
            if getattr(args, "func", None) is None:
                parser.print_help(sys.stderr)
                return 2
            command = args.command
            rc = int(args.func(args))
            sys.stdout.flush()
            return rc
        except KeyboardInterrupt:
            print(f"weightavg {command}: interrupted after {time.perf_counter() - t0:.0f} s", file=sys.stderr)
            return 130
        except _Terminated as t:
            name = "terminated" if t.signum == signal.SIGTERM else "hung up"
            print(f"weightavg {command}: {name} after {time.perf_counter() - t0:.0f} s", file=sys.stderr)
            return 128 + t.signum
        except BrokenPipeError:
            return _stdout_gone()
        except (WeightAvgError, OSError) as err:
            print(f"weightavg {command}: error: {_one_line(err)}", file=sys.stderr)
            return 1
        finally:
            warnings.formatwarning = format_warning
