"""``weightavg demo`` from its parsed command line: check ``--out``, train, write, report.

The order is what keeps a long run's results safe: ``--out`` is checked before any training; the
table files (``results.md``, ``results.json``) are written before any plot is drawn; a plot that
fails is reported by name on stderr, the others are still drawn, and the exit status is 1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .._errors import bad_arg
from ._methods import default_methods
from ._progress import make_progress
from ._report import DEMO_FILES, Outputs, print_table, result_json, write_outputs
from ._run import DemoConfig, run_demo

__all__ = ["check_out_dir", "config_from_args", "run_command"]

#: seeds of the default run (``--model mlp``); the CNN and ``--quick`` use fewer
DEFAULT_SEEDS = DemoConfig.seeds
QUICK = {"seeds": 2, "epochs": 8, "swag_samples": 5}
CNN_SEEDS = 3
CNN_EVAL_EVERY = 5


def config_from_args(args: argparse.Namespace) -> DemoConfig:
    """The :class:`DemoConfig` of a parsed ``weightavg demo`` command line (validated).

    Raises:
        weightavg.ConfigError: a setting is out of range (the message names it).
    """
    if args.methods is None:
        methods = default_methods()
    else:
        methods = tuple(m.strip().lower() for m in args.methods.split(",") if m.strip())
        if not methods:
            raise bad_arg("--methods", args.methods, "a comma-separated list such as swa,ema")

    def pick(value: int | None, quick: int, cnn: int, default: int) -> int:
        if value is not None:
            return value
        return quick if args.quick else cnn if args.model == "cnn" else default

    cfg = DemoConfig(
        dataset=args.dataset,
        model=args.model,
        seeds=pick(args.seeds, QUICK["seeds"], CNN_SEEDS, DEFAULT_SEEDS),
        epochs=pick(args.epochs, QUICK["epochs"], DemoConfig.epochs, DemoConfig.epochs),
        swag_samples=pick(args.swag_samples, QUICK["swag_samples"], DemoConfig.swag_samples,
                          DemoConfig.swag_samples),
        methods=methods,
        swa_lr=args.swa_lr,
        swa_start=args.swa_start,
        anneal_epochs=args.anneal_epochs,
        threads=args.threads,
        eval_every=args.eval_every if args.eval_every is not None else (
            CNN_EVAL_EVERY if args.model == "cnn" else 1),
    )
    cfg.validate()
    return cfg


def check_out_dir(out: Path) -> None:
    """Check, before any training, that the demo can write its files into the folder ``out``.

    ``out`` may exist (a folder; the demo's own files in it are replaced, nothing else is touched)
    or not (it is created, with its parents, when the results are written).

    Raises:
        weightavg.ConfigError: naming ``--out``, when ``out`` is an existing file, lies under a
            file, is not writable, or holds a folder where the demo writes one of its files.
    """
    p = Path(out)
    if p.exists():
        if not p.is_dir():
            raise bad_arg("--out", str(p), "a folder for the demo's files (or a path to create); "
                          "this is an existing file")
        for name in DEMO_FILES:
            f = p / name
            if f.is_dir() and not f.is_symlink():
                raise bad_arg("--out", str(p), f"a folder where the demo can write {name}; "
                              f"{f} is a folder")
        if not os.access(p, os.W_OK | os.X_OK):
            raise bad_arg("--out", str(p), "a folder you can write to")
        return
    if p.is_symlink():
        raise bad_arg("--out", str(p), "a folder or a path to create; this is a dangling symlink")
    for parent in p.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise bad_arg("--out", str(p), f"a path that can be created; {parent} is a file")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise bad_arg("--out", str(p), f"a path that can be created; {parent} is not writable")
            return


def _outputs_lines(out: Path, outputs: Outputs) -> list[str]:
    """What happened to files already in ``out`` (empty for a fresh folder)."""
    lines = []
    if outputs.replaced:
        lines.append(f"Replaced the demo's files of an earlier run in {out}: {', '.join(outputs.replaced)}.")
    if outputs.removed:
        lines.append(f"Removed the earlier run's {', '.join(outputs.removed)} from {out} "
                     "(not drawn this run; other files are left alone).")
    return lines


def run_command(args: argparse.Namespace) -> int:
    """Run ``weightavg demo`` for parsed ``args``; returns the exit status.

    0 when every requested file was written; 1 when a plot could not be drawn (named on stderr;
    the table, ``results.md``, ``results.json`` and the other plots are still written).

    Raises:
        weightavg.ConfigError: a bad option or ``--out`` (before any training).
    """
    cfg = config_from_args(args)
    check_out_dir(args.out)
    progress = make_progress(args.progress)
    result = run_demo(cfg, progress)
    outputs = write_outputs(result, args.out, plots=not args.no_plots)
    notes = _outputs_lines(args.out, outputs)
    if args.json:
        print(json.dumps(result_json(result, outputs.files, outputs.plot_errors), indent=1))
        for line in notes:
            print(line, file=sys.stderr)
    else:
        print_table(result)
        if args.quick:
            print("(--quick is a smoke test: too few epochs and seeds for these numbers to mean "
                  "anything; run 'weightavg demo' for the real comparison)")
        print("Files: " + ", ".join(outputs.files))
        for line in notes:
            print(line)
        if outputs.note:
            print(outputs.note)
    for name, reason in outputs.plot_errors.items():
        print(f"weightavg demo: error: could not draw {name}: {reason} (the results and the other "
              "files were written)", file=sys.stderr)
    return 1 if outputs.plot_errors else 0
