"""``weightavg posthoc``: reconstruct post-hoc EMAs from a :class:`weightavg.PostHocEMA` directory."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from .._errors import bad_arg

__all__ = ["add_posthoc_parser", "cmd_posthoc"]

_EXAMPLES = """\
examples:
  weightavg posthoc runs/phema --sigma-rel 0.08 -o ema_0.08.safetensors
  weightavg posthoc runs/phema --sigma-rel 0.03,0.08,0.15 -o sweep/     # one file per sigma_rel
  weightavg posthoc runs/phema --sigma-rel 0.1 --step 20000 -o ema.safetensors --plot fit.png
  weightavg posthoc runs/phema --sigma-rel 0.05,0.2 --dry-run --json     # coefficients only

Only the snapshots listed in the directory's manifest.json, at or before the target step, are
used (each checked against its SHA-256, read with safetensors only). The relative residual says
how well the target profile is representable from them; above --max-residual a warning is printed.
Buffers (BatchNorm statistics...) come from the latest snapshot at or before the target.
"""


def _sigma_list(text: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--sigma-rel={text!r}: expected numbers separated by commas") from None
    if not values:
        raise argparse.ArgumentTypeError("--sigma-rel: expected at least one value")
    return values


def add_posthoc_parser(sub: Any) -> None:
    """Register the ``posthoc`` subcommand on the ``weightavg`` subparsers."""
    p = sub.add_parser(
        "posthoc", help="reconstruct the EMA of any length from PostHocEMA snapshots",
        description="Post-hoc EMA (Karras et al. 2024): least-squares reconstruction of power-function "
        "EMAs of the requested sigma_rel from the snapshots of a weightavg.PostHocEMA run.",
        epilog=_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("directory", type=Path, metavar="DIR", help="the PostHocEMA directory (manifest.json)")
    p.add_argument("--sigma-rel", type=_sigma_list, required=True, metavar="S[,S...]",
                   help="target sigma_rel value(s), comma-separated")
    p.add_argument("--step", type=int, default=None, metavar="N",
                   help="target time in optimizer steps (default: the latest snapshot)")
    p.add_argument("-o", "--output", type=Path, default=None, metavar="OUT",
                   help="output .safetensors file (one sigma_rel) or directory (several)")
    p.add_argument("--plot", type=Path, default=None, metavar="PNG",
                   help="draw target and reconstructed profiles (needs matplotlib)")
    p.add_argument("--max-residual", type=float, default=0.05,
                   help="warn above this relative profile residual (default 0.05)")
    p.add_argument("--dry-run", action="store_true", help="solve and report, write no weights")
    p.add_argument("-f", "--force", action="store_true", help="replace OUT if it exists")
    p.add_argument("--json", action="store_true", help="print a JSON summary on stdout")
    p.set_defaults(func=cmd_posthoc)


def cmd_posthoc(args: argparse.Namespace) -> int:
    """Run ``weightavg posthoc``; returns the exit status."""
    from .. import posthoc
    from .._files import atomic_output, check_output
    from ._average import _save_safetensors

    if args.output is None and not args.dry_run:
        raise bad_arg("-o/--output", None, "an output path (or --dry-run)")
    sigmas: list[float] = args.sigma_rel
    if args.output is not None and not args.dry_run:  # refuse a bad output before reading anything
        check_output(args.output, directory=args.output.suffix != ".safetensors" or len(sigmas) > 1,
                     force=args.force, inputs=[args.directory])
    if args.plot is not None:
        check_output(args.plot, force=args.force, inputs=[args.directory])
    results = posthoc.reconstruct(args.directory, sigma_rel=sigmas, step=args.step,
                                  max_residual=args.max_residual, warn=False)
    assert isinstance(results, list)
    files: list[str] = []
    if not args.dry_run:
        out: Path = args.output
        if len(results) == 1 and out.suffix == ".safetensors":
            r = results[0]
            with atomic_output(out, force=args.force, inputs=[args.directory]) as tmp:
                _save_safetensors(r.state_dict, tmp, {"weightavg": json.dumps(r.summary())})
            files.append(str(out))
        else:
            with atomic_output(out, directory=True, force=args.force, inputs=[args.directory]) as tmp:
                for r in results:
                    name = f"ema-sigma_rel-{r.sigma_rel:g}-step-{r.step}.safetensors"
                    _save_safetensors(r.state_dict, tmp / name, {"weightavg": json.dumps(r.summary())})
                    files.append(str(out / name))
                (tmp / "summary.json").write_text(json.dumps([r.summary() for r in results], indent=1) + "\n")
    if args.plot is not None:
        with atomic_output(args.plot, force=args.force, inputs=[args.directory]) as tmp:
            posthoc.plot_profiles(results, posthoc.read_manifest(args.directory), tmp)
    for r in results:
        for w in r.warnings:
            print(f"weightavg posthoc: warning: {w}", file=sys.stderr)
    if args.json:
        print(json.dumps({"outputs": files, "reconstructions": [r.summary() for r in results],
                          "plot": str(args.plot) if args.plot else None}, indent=1))
    else:
        for r in results:
            used = sum(1 for c in r.coefficients.values() if c != 0.0)
            print(f"sigma_rel={r.sigma_rel:g} (gamma={r.gamma:.3g}) at step {r.step}: {used} snapshots, "
                  f"relative profile residual {r.relative_residual:.2e}")
        for f in files:
            print(f"wrote {f}")
    return 0
