"""``weightavg average`` over DCP checkpoints: streamed tensor by tensor, never the whole model.

A ``torch.distributed.checkpoint`` (DCP) directory of a sharded run (FSDP2, tensor parallel) holds
each tensor in chunks written by the ranks. Here every input is opened once (the DCP metadata
through the restricted reader of :mod:`weightavg._dcp`, safetensors files through ``safe_open``),
and the output is produced one tensor at a time: the tensor is read from each input in turn and
folded by a one-tensor :class:`weightavg.Averager` (the engine's arithmetic), then written and
dropped. Peak memory is about one tensor in the accumulation dtype, one input tensor being read
and the write buffer, whatever the model's size and the number of inputs.

Which tensors of a DCP checkpoint are averaged (its *selection*, a name prefix that is stripped):

* ``--key K``: the tensors under ``K.`` (e.g. ``--key model`` for ``dcp.save({"model": sd, ...})``,
  ``--key averages.ema`` for one rule of an :class:`~weightavg.Averager` with several);
* otherwise, a checkpoint holding the state of an :class:`~weightavg.Averager` (or of a policy
  holding one: names ``[<policy>.]averages.<rule>.<name>``) gives the averages of its only rule
  (several rules: an error lists them and asks for ``--key``);
* otherwise all its tensors (a DCP of a model's state dict).

Non-tensor entries (counters, configuration; stored pickled) are never read.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import warnings
from collections.abc import Generator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .. import __version__
from .._dcp import _ST_DTYPES, DCPReader, DCPTensorInfo, read_dcp_metadata, write_stream
from .._engine import Averager
from .._errors import MismatchError, NonFiniteError
from .._files import check_output
from .._rules import ema, mean
from ._average import (
    _BN_STATS,
    CheckpointError,
    _compare,
    _describe,
    _dtype_name,
    _Input,
    _normalize_sig,
    _safetensors_open,
    read_signature,
)

__all__ = ["average_streaming", "dcp_prefix", "load_dcp"]


def dcp_prefix(path: Path, key: str | None) -> str:
    """The name prefix selecting a DCP checkpoint's weights (see the module docstring).

    Raises:
        CheckpointError: nothing under ``key``, or the averages of several rules and no ``key``.
    """
    from ._export import _AVG

    names = list(read_dcp_metadata(path))
    if key is not None:
        prefix = key if key.endswith(".") else f"{key}."
        if not any(n.startswith(prefix) for n in names):
            heads = sorted({n.split(".", 1)[0] for n in names})
            raise CheckpointError(f"{path}: no tensor under --key {key!r} in this DCP checkpoint; its "
                                  f"top-level entries holding tensors: {', '.join(heads[:12])}")
        return prefix
    found = sorted({m.group("head") + m.group("rule") for n in names if (m := _AVG.match(n)) is not None})
    if len(found) > 1:
        raise CheckpointError(f"{path}: holds the averages of several rules ({', '.join(found)}): pick one "
                              f"with --key (e.g. --key {found[0]})")
    return f"{found[0]}." if found else ""


def load_dcp(path: Path, key: str | None) -> dict[str, Tensor]:
    """All selected tensors of a DCP checkpoint, whole, in one dict (for callers that need a
    state dict, e.g. greedy soups; :func:`average_streaming` never holds them all)."""
    with DCPReader(path, prefix=dcp_prefix(path, key)) as reader:
        return {n: reader.read(n) for n in reader.infos}


class _Source:
    """One input, opened for reading single tensors by name."""

    def __init__(self, inp: _Input, key: str | None, stack: contextlib.ExitStack) -> None:
        self.path = inp.path
        self._dcp: DCPReader | None = None
        self._files: dict[str, Any] = {}  # name -> open safe_open handle
        if inp.kind == "dcp":
            self._dcp = stack.enter_context(DCPReader(inp.path, prefix=dcp_prefix(inp.path, key)))
            self.signature = _normalize_sig({n: (i.shape, _dtype_name(i.dtype)) for n, i in self._dcp.infos.items()})
            return
        if inp.file_format != "safetensors":
            raise CheckpointError(
                f"{inp.path}: a torch file cannot be averaged together with DCP checkpoints (DCP inputs "
                "are streamed tensor by tensor): convert it to safetensors, or give DCP and safetensors "
                "inputs only")
        # --key selects within DCP checkpoints; safetensors inputs are flat (their names must match)
        self.signature = read_signature(inp, None)
        handles = [stack.enter_context(_safetensors_open(f)) for f in inp.files]
        by_file = dict(zip((f.name for f in inp.files), handles, strict=True))
        for name in self.signature:
            self._files[name] = by_file[inp.weight_map[name]] if inp.weight_map else handles[0]

    def read(self, name: str) -> Tensor:
        """The whole tensor ``name``, on the CPU."""
        if self._dcp is not None:
            return self._dcp.read(name)
        try:
            return self._files[name].get_tensor(name)
        except Exception as err:
            raise CheckpointError(f"{self.path}: cannot read tensor {name!r} (truncated or corrupt?): "
                                  f"{' '.join(str(err).split())[:200]}") from err


def _floating(dtype: str) -> bool:
    return dtype.startswith(("float", "bfloat", "complex"))


def average_streaming(
    items: Sequence[_Input],
    out: Path,
    *,
    inputs: Sequence[Path],
    last: int | None,
    ema_decay: float | None,
    key: str | None,
    force: bool,
    warn: bool,
    weights: Sequence[float] | None,
) -> dict[str, Any]:
    """Average DCP checkpoints (and safetensors inputs) into safetensors, one tensor at a time.

    Called by :func:`weightavg.cli._average.average_checkpoints` (arguments already checked) when
    an input is a DCP directory. ``items`` are the inputs averaged, ``inputs`` every input named
    (the output may neither be nor contain nor lie inside one of them). The output is a
    ``.safetensors`` file, or a directory in the Hugging Face layout (``model.safetensors``, or
    5 GB shards plus ``model.safetensors.index.json``), written atomically.

    Names and shapes must agree across inputs; floating-point dtypes may differ (a DCP of an
    averager holds float32 shadows of bf16 weights): each tensor is accumulated in float32
    (float64 when an input holds it in float64) and written in the last input's dtype. Integer,
    bool and empty tensors are copied from the last input.

    Returns:
        The summary :func:`~weightavg.cli._average.average_checkpoints` returns.

    Raises:
        CheckpointError: an unreadable or refused input (a crafted ``.metadata`` is refused before
            anything in it runs), a torch file among the inputs, NaN/Inf in an input, an output
            that is not ``.safetensors`` or a directory.
        MismatchError: inputs whose names, shapes or (non-floating) dtypes differ.
        weightavg._files.OutputError: as for the other inputs; nothing is replaced then.
    """
    from .._window import weighted_mean_rule

    if out.suffix not in ("", ".safetensors") and not out.is_dir():
        raise CheckpointError(f"{out}: DCP checkpoints are averaged into safetensors: name the output "
                              "*.safetensors (one file) or a directory (Hugging Face layout)")
    directory = out.suffix != ".safetensors"
    for p in inputs:
        if out.resolve().is_relative_to(Path(p).resolve()):
            raise CheckpointError(f"{out} is inside the input {p}: choose another output")
    check_output(out, directory=directory, force=force, inputs=list(inputs))

    with contextlib.ExitStack() as stack:
        sources = [_Source(i, key, stack) for i in items]
        # 1. names, shapes and dtype kinds of every input, before reading any tensor data
        kinds = [{n: (s, d if not _floating(d) else "floating") for n, (s, d) in src.signature.items()}
                 for src in sources]
        problems = [msg for src, k in zip(sources[1:], kinds[1:], strict=True)
                    if (msg := _compare(kinds[0], k, str(src.path), str(sources[0].path))) is not None]
        if problems:
            raise MismatchError("checkpoints do not match: " + " | ".join(problems))
        ref = sources[-1].signature
        names = list(sources[0].signature)
        floating = [n for n in names if _floating(ref[n][1]) and 0 not in ref[n][0]]
        if not floating:
            raise CheckpointError(f"{sources[0].path}: nothing to average: its {len(names)} tensor(s) are "
                                  "all integer, bool or empty")
        acc = {n: torch.float64 if any(s.signature[n][1] == "float64" for s in sources) else torch.float32
               for n in floating}
        out_dtype: dict[str, Any] = {n: getattr(torch, ref[n][1], None) for n in names}
        bad = next((n for n, d in out_dtype.items() if d not in _ST_DTYPES), None)
        if bad is not None:
            raise CheckpointError(f"{sources[-1].path}: tensor {bad!r} is {ref[bad][1]}, which safetensors "
                                  "cannot store")
        if weights is not None:
            weights = [float(w) for w in weights]
            rule = weighted_mean_rule(weights)
        else:
            rule = ema(decay=float(ema_decay)) if ema_decay is not None else mean()
        floating_set = set(floating)

        def stream(order: list[str]) -> Generator[tuple[str, Tensor], None, None]:
            for n in order:
                if n not in floating_set:
                    yield n, sources[-1].read(n)
                    continue
                avg: Averager | None = None
                for src in sources:
                    t = src.read(n).to(acc[n])
                    try:
                        if avg is None:
                            avg = Averager({n: t}, rule=rule, dtype=acc[n])
                        avg.update({n: t})
                    except NonFiniteError:
                        raise CheckpointError(
                            f"{src.path}: holds NaN or Inf in tensor {n!r}; weightavg average refuses "
                            "non-finite inputs: leave this checkpoint out of the list") from None
                    del t
                assert avg is not None
                result = next(iter(avg.export_state_dict().values()))
                del avg
                yield n, result

        method, description = _describe(ema_decay, last, weights, len(inputs))
        copied = [n for n in names if n not in floating_set]
        notes: list[str] = []
        bn = [n for n in floating if n.rsplit(".", 1)[-1] in _BN_STATS]
        if bn:
            notes.append(f"{len(bn)} BatchNorm statistics (e.g. {bn[0]}) were averaged like weights; "
                         "they are not the statistics of the averaged weights: recompute them "
                         "(weightavg.recompute_bn) before evaluating")
        note: dict[str, Any] = {
            "tool": f"weightavg {__version__}", "method": method, "description": description,
            "last_k": last, "ema_decay": ema_decay, "weights": weights,
            "inputs": [str(i.path) for i in items], "num_inputs": len(items),
            "accumulation_dtype": "float64" if torch.float64 in acc.values() else "float32",
            "copied_from_last_input": copied[:50],
            "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "warnings": notes,
        }
        infos = [DCPTensorInfo(n, ref[n][0], out_dtype[n], ()) for n in names]
        write_stream(out, infos, out_dtype, stream, {"format": "pt", "weightavg": json.dumps(note)},
                     force=force, inputs=list(inputs))
    if warn:
        for w in notes:
            warnings.warn(w, UserWarning, stacklevel=3)
    return {
        "output": str(out),
        "format": "hf (safetensors)" if directory else "safetensors",
        "method": method,
        "method_description": description,
        "last_k": last,
        "ema_decay": ema_decay,
        "weights": weights,
        "inputs": [str(i.path) for i in items],
        "num_averaged_tensors": len(floating),
        "num_copied_tensors": len(copied),
        "copied_tensors": copied,
        "accumulation_dtype": note["accumulation_dtype"],
        "dropped_entries": [],
        "copied_files": [],
        "not_copied_files": [],
        "warnings": notes,
    }
