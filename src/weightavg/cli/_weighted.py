"""``weightavg average`` options for weighted averages and greedy soups.

``--weights W1,W2,...`` (explicit), ``--schedule uniform|linear|minus-sqrt`` (over all inputs, or
the last ``--last K``), and ``--greedy --eval MODULE:FUNCTION`` (a greedy model soup; the function
receives a state dict and returns a score, higher is better).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .._errors import ConfigError, bad_arg

__all__ = ["add_average_flags", "cmd_weighted_average", "load_function", "wants_weighted"]


def _weight_list(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--weights={text!r}: expected numbers separated by commas") from None


def add_average_flags(p: argparse.ArgumentParser) -> None:
    """Add ``--weights``, ``--schedule``, ``--greedy`` and ``--eval`` to the ``average`` parser."""
    p.add_argument("--weights", type=_weight_list, default=None, metavar="W1,W2,...",
                   help="explicit non-negative weights, one per input (sum(w*x)/sum(w))")
    p.add_argument("--schedule", choices=("uniform", "linear", "minus-sqrt"), default=None,
                   help="window weights over the inputs (or the last --last K): uniform (LAWA), "
                   "linear (newest heaviest) or minus-sqrt (WSM: emulates a 1-sqrt(x) cooldown)")
    p.add_argument("--greedy", action="store_true",
                   help="greedy soup: inputs sorted by their own --eval score, each kept only if the "
                   "soup's score does not drop")
    p.add_argument("--eval", dest="eval_fn", default=None, metavar="MODULE:FUNCTION",
                   help="scoring function for --greedy: receives a state dict, returns a number "
                   "(higher is better); MODULE may be a dotted module or a path/to/file.py")


def wants_weighted(args: argparse.Namespace) -> bool:
    """Whether the ``average`` command line uses one of these options."""
    return bool(getattr(args, "weights", None) is not None or getattr(args, "schedule", None)
                or getattr(args, "greedy", False) or getattr(args, "eval_fn", None))


def load_function(spec: str) -> Callable[..., Any]:
    """The function named by ``MODULE:FUNCTION`` (code the user asked to run).

    Raises:
        ConfigError: a malformed spec, a module that cannot be imported, or no such function.
    """
    module_name, sep, fn_name = spec.rpartition(":")
    if not sep or not module_name or not fn_name:
        raise bad_arg("--eval", spec, "MODULE:FUNCTION (e.g. my_eval:accuracy or scripts/eval.py:score)")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name)
            if not path.is_file():
                raise bad_arg("--eval", spec, f"an existing Python file ({path} not found)")
            loaded = importlib.util.spec_from_file_location(path.stem, path)
            if loaded is None or loaded.loader is None:
                raise bad_arg("--eval", spec, "an importable Python file")
            module = importlib.util.module_from_spec(loaded)
            loaded.loader.exec_module(module)
        else:
            if "" not in sys.path and "." not in sys.path:
                sys.path.insert(0, "")  # the current directory, as `python -m` does
            module = importlib.import_module(module_name)
    except ImportError as err:
        raise bad_arg("--eval", spec, f"an importable module ({err})") from err
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise bad_arg("--eval", spec, f"a function {fn_name!r} in {module_name}")
    return fn


def cmd_weighted_average(args: argparse.Namespace) -> int:
    """``weightavg average`` with ``--weights``/``--schedule`` or ``--greedy --eval``."""
    from .._window import window_weights
    from ..soup import greedy_soup
    from ._average import average_checkpoints

    if args.greedy != (args.eval_fn is not None):
        raise bad_arg("--greedy/--eval", (args.greedy, args.eval_fn), "both or neither")
    exclusive = [n for n, v in (("--weights", args.weights is not None), ("--schedule", args.schedule),
                                ("--greedy", args.greedy), ("--ema", args.ema is not None)) if v]
    if len(exclusive) > 1:
        raise ConfigError(f"{' and '.join(exclusive)} cannot be combined: give one way of weighting")
    inputs = list(args.inputs)
    greedy: dict[str, Any] | None = None
    weights: list[float] | None = None
    last = args.last
    if args.weights is not None:
        if last is not None:
            raise bad_arg("--weights", args.weights, "no --last (give a weight of 0 to leave inputs out)")
        weights = args.weights
    elif args.schedule:
        k = last if last is not None else len(inputs)
        if k > len(inputs):
            raise bad_arg("--last", k, f"at most the number of inputs ({len(inputs)})")
        weights = [0.0] * (len(inputs) - k) + window_weights(args.schedule, k)
        last = None
    else:
        if last is not None:
            inputs = inputs[-last:]
            last = None
        fn = load_function(args.eval_fn)
        soup = greedy_soup(inputs, fn, key=args.key)
        greedy = soup.summary()
        inputs = [inputs[i] for i in sorted(soup.members)]
    report = average_checkpoints(inputs, args.output, last=last, key=args.key, force=args.force,
                                 warn=False, weights=weights)
    if greedy is not None:
        report["greedy"] = greedy
        report["method"] = "greedy_soup"
        report["method_description"] = (f"greedy soup: {len(inputs)} of {len(args.inputs)} inputs kept "
                                         f"(score {greedy['soup_score']:.6g})")
    if args.schedule:
        report["schedule"] = args.schedule
    for w in report["warnings"]:
        print(f"weightavg average: warning: {w}", file=sys.stderr)
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print(f"wrote {report['output']}: {report['method_description']}; "
              f"{report['num_averaged_tensors']} tensors averaged, {report['num_copied_tensors']} "
              "copied from the last input")
        if greedy is not None:
            for row in greedy["history"]:
                print(f"  {'kept   ' if row['kept'] else 'dropped'} {row['input']}: own score "
                      f"{row['own_score']:.6g}, soup with it {row['soup_score_with_it']:.6g}")
    return 0
