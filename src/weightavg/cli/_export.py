"""``weightavg export``: write the averaged weights of a DCP checkpoint as safetensors.

A DCP checkpoint of an :class:`~weightavg.Averager` (or of a policy holding one) stores the
averages under ``[<policy key>.]averages.<rule>.<name>``. This command finds that prefix (or takes
``--prefix`` / ``--rule``) and streams the tensors one at a time into a ``.safetensors`` file or a
Hugging Face directory (sharded files plus an index), atomically, through
:func:`weightavg._dcp.export_dcp`: the metadata is read with a restricted unpickler and pickled
entries are never read.
"""

from __future__ import annotations

import argparse
import re
import sys
from typing import Any

import torch

from .._errors import bad_arg

__all__ = ["add_export_parser", "cmd_export", "find_prefix"]

_EXAMPLES = """\
examples:
  weightavg export ckpt/avg_dcp -o avg.safetensors          # the averages of the only rule
  weightavg export ckpt/avg_dcp -o hf_dir/ --rule ema --dtype bfloat16 --max-shard-size 2GB
  weightavg export ckpt/train_dcp -o avg.safetensors --prefix "swa.averager.averages.default."

Reads a torch.distributed.checkpoint directory written on any number of ranks (e.g.
dcp.save({"avg": avg.state_dict()}, checkpoint_id=...)); peak memory is about one tensor.
"""

_AVG = re.compile(r"^(?P<head>(?:.*\.)?averages\.)(?P<rule>[^.]+)\.")


def find_prefix(names: list[str], rule: str | None = None) -> str:
    """The unique ``...averages.<rule>.`` prefix of a checkpoint's tensor names.

    Raises:
        ConfigError: none found, or several (and ``rule`` does not pick one).
    """
    found: dict[str, str] = {}
    for n in names:
        m = _AVG.match(n)
        if m is not None:
            found.setdefault(m.group("head") + m.group("rule") + ".", m.group("rule"))
    if rule is not None:
        found = {p: r for p, r in found.items() if r == rule}
    if len(found) == 1:
        return next(iter(found))
    if not found:
        what = f"averages of rule {rule!r}" if rule else "weightavg averages ('...averages.<rule>.<name>')"
        raise bad_arg("checkpoint", f"{len(names)} tensors", f"a DCP checkpoint holding {what}; pass --prefix")
    raise bad_arg("--rule/--prefix", rule, f"one of the prefixes found: {sorted(found)}")


def add_export_parser(sub: Any) -> None:
    """Register ``weightavg export`` on the subparsers ``sub``."""
    p = sub.add_parser(
        "export", help="write the averages of a DCP (sharded) checkpoint as safetensors, streaming",
        description="Export the averaged weights stored in a torch.distributed.checkpoint directory "
        "(e.g. of an FSDP2 run) as one .safetensors file or a Hugging Face directory.",
        epilog=_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("checkpoint", help="the DCP checkpoint directory")
    p.add_argument("-o", "--output", required=True, help="a .safetensors file or a directory")
    p.add_argument("--rule", default=None, help="which rule's averages (when the averager keeps several)")
    p.add_argument("--prefix", default=None, help="export the tensors whose names start with it (stripped)")
    p.add_argument("--dtype", default=None, choices=("float32", "float16", "bfloat16"),
                   help="convert floating-point tensors")
    p.add_argument("--max-shard-size", default=None, help="bytes per file of a directory output (e.g. 5GB)")
    p.add_argument("--force", action="store_true", help="replace the output if it exists")
    p.set_defaults(func=cmd_export)


def cmd_export(args: argparse.Namespace) -> int:
    """``weightavg export``: stream a DCP checkpoint's averages into safetensors."""
    from .._dcp import export_dcp, read_dcp_metadata

    prefix = args.prefix
    if prefix is None:
        prefix = find_prefix(sorted(read_dcp_metadata(args.checkpoint)), args.rule)
    elif args.rule is not None:
        raise bad_arg("--rule", args.rule, "not given together with --prefix")
    dtype = getattr(torch, args.dtype) if args.dtype else None
    out = export_dcp(args.checkpoint, args.output, prefix=prefix, dtype=dtype,
                     max_shard_size=args.max_shard_size, force=args.force)
    n = len(read_dcp_metadata(args.checkpoint, prefix=prefix))
    print(f"wrote {out}: {n} tensors from {args.checkpoint} (prefix {prefix!r})", file=sys.stdout)
    return 0
