"""Offline averaging of saved checkpoints (``weightavg average``).

Inputs: torch files (read with ``weights_only=True``), safetensors files, or Hugging Face model
directories (single-file or sharded, safetensors or ``.bin``). They stream through one
:class:`weightavg.Averager` built from a ``{name: tensor}`` mapping, so memory stays at about one
model whatever the number of inputs; the averaging arithmetic is the engine's.
"""

from __future__ import annotations

import collections
import contextlib
import datetime
import json
import os
import shutil
import tempfile
import warnings
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from .. import __version__
from .._engine import Averager, canonical_name
from .._errors import MismatchError, NonFiniteError, WeightAvgError, bad_arg
from .._rules import ema, mean

__all__ = ["CheckpointError", "average_checkpoints", "load_checkpoint", "read_signature"]

Kind = Literal["torch", "safetensors", "hf"]
_SAFETENSORS_NAMES = ("model.safetensors",)
_BIN_NAMES = ("pytorch_model.bin",)
# files of a training run's checkpoint directory that belong to one input only: not copied
_TRAINING_STATE = ("optimizer.pt", "optimizer.bin", "scheduler.pt", "scaler.pt", "trainer_state.json",
                   "training_args.bin")
_BN_STATS = ("running_mean", "running_var")


class CheckpointError(WeightAvgError):
    """A checkpoint cannot be read, does not hold weights, or cannot be written."""


# ----------------------------------------------------------------------------- inputs


@dataclass
class _Input:
    path: Path
    kind: Kind
    files: list[Path] = field(default_factory=list)  # weight files (HF: in index order)
    file_format: Literal["torch", "safetensors"] = "torch"
    index: Path | None = None  # HF sharded: the index json
    weight_map: dict[str, str] = field(default_factory=dict)  # HF sharded: name -> file name


def _hf_input(path: Path) -> _Input:
    for fmt, ext in (("safetensors", ".safetensors"), ("torch", ".bin")):
        indexes = sorted(path.glob(f"*{ext}.index.json"))
        if len(indexes) == 1:
            try:
                weight_map = json.loads(indexes[0].read_text())["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as err:
                raise CheckpointError(f"{indexes[0]}: not a readable shard index ({err})") from err
            files = list(dict.fromkeys(weight_map.values()))
            return _Input(path, "hf", [path / f for f in files], fmt,  # type: ignore[arg-type]
                          indexes[0], dict(weight_map))
    for fmt, names, pattern in (("safetensors", _SAFETENSORS_NAMES, "*.safetensors"),
                                ("torch", _BIN_NAMES, "*.bin")):
        for n in names:
            if (path / n).is_file():
                return _Input(path, "hf", [path / n], fmt)  # type: ignore[arg-type]
        found = [p for p in sorted(path.glob(pattern)) if p.name not in _TRAINING_STATE]
        if len(found) == 1:
            return _Input(path, "hf", found, fmt)  # type: ignore[arg-type]
    raise CheckpointError(
        f"{path} is a directory without model weights: expected model.safetensors, "
        "pytorch_model.bin, or a *.safetensors.index.json / *.bin.index.json shard index"
    )


def _detect(path: Path) -> _Input:
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    if path.is_dir():
        return _hf_input(path)
    if path.suffix == ".safetensors":
        return _Input(path, "safetensors", [path], "safetensors")
    return _Input(path, "torch", [path], "torch")


def _torch_load(path: Path) -> Any:
    """``torch.load(weights_only=True)``, memory-mapped when the file allows it."""
    try:
        mmap = zipfile.is_zipfile(path)
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as err:
        if type(err).__name__ == "UnpicklingError":
            raise CheckpointError(
                f"{path}: refused: it holds Python objects that are not plain weights, and torch "
                "files are only read with weights_only=True (re-save it as a state_dict or "
                "safetensors from code you trust)"
            ) from err
        msg = " ".join(str(err).split())
        raise CheckpointError(f"{path}: cannot read this torch file (truncated or corrupt?): "
                              f"{msg[:200]}") from err


def _safetensors_open(path: Path) -> Any:
    try:
        from safetensors import safe_open
    except ImportError as err:
        raise CheckpointError(f"{path}: reading safetensors needs the 'safetensors' package: "
                              "pip install 'weightavg[safetensors]'") from err
    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except Exception as err:
        msg = " ".join(str(err).split())
        raise CheckpointError(f"{path}: cannot read this safetensors file (truncated or corrupt?): "
                              f"{msg[:200]}") from err


def _tensor_holders(obj: Any, prefix: str = "", depth: int = 0) -> list[str]:
    """Dotted keys under which ``obj`` holds a flat mapping of tensors (to suggest --key)."""
    out: list[str] = []
    if not isinstance(obj, Mapping) or depth > 3:
        return out
    for k, v in obj.items():
        if isinstance(v, Mapping) and v:
            if all(isinstance(t, Tensor) for t in v.values()):
                out.append(f"{prefix}{k}")
            else:
                out += _tensor_holders(v, f"{prefix}{k}.", depth + 1)
    return out


def _select(obj: Any, key: str | None, path: Path) -> Mapping[str, Tensor]:
    """The flat ``{name: tensor}`` mapping of a loaded torch object (``key`` picks a nested one)."""
    if key is not None:
        node = obj
        if isinstance(node, Mapping) and key in node:
            node = node[key]
        else:
            for part in key.split("."):
                if not isinstance(node, Mapping) or part not in node:
                    keys = sorted(map(str, node)) if isinstance(node, Mapping) else []
                    raise CheckpointError(f"{path}: no entry {key!r} (--key); top-level keys: "
                                          f"{', '.join(keys[:12]) or '(none)'}")
                node = node[part]
        obj = node
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: holds an object of type {type(obj).__name__}, not a mapping "
                              "of name -> tensor")
    bad = [(k, type(v).__name__) for k, v in obj.items() if not isinstance(v, Tensor)]
    if bad:
        holders = _tensor_holders(obj)
        hint = (f"; it holds tensors under {', '.join(repr(h) for h in holders[:5])}: pass "
                f"--key {holders[0]}") if holders else ""
        where = f"entry {key!r}" if key else "it"
        raise CheckpointError(f"{path}: {where} is not a flat mapping of name -> tensor "
                              f"(entry {bad[0][0]!r} is of type {bad[0][1]}){hint}")
    if not obj:
        raise CheckpointError(f"{path}: holds no tensors")
    return obj


def load_checkpoint(path: str | os.PathLike[str], key: str | None = None) -> dict[str, Tensor]:
    """Read the ``{name: tensor}`` weights of one checkpoint (torch, safetensors or HF directory).

    torch files are read with ``weights_only=True`` (memory-mapped when possible).
    """
    inp = _detect(Path(path))
    return _load(inp, key)


def _load(inp: _Input, key: str | None) -> dict[str, Tensor]:
    if inp.kind != "torch" and key is not None:
        raise bad_arg("--key", key, f"no --key for {inp.kind} inputs ({inp.path} is flat)")
    out: dict[str, Tensor] = {}
    for f in inp.files:
        if inp.file_format == "safetensors":
            with _safetensors_open(f) as st:
                try:
                    part = {k: st.get_tensor(k) for k in st.keys()}  # noqa: SIM118 - not a dict
                except Exception as err:
                    raise CheckpointError(f"{f}: cannot read this safetensors file (truncated or "
                                          f"corrupt?): {err}") from err
        else:
            part = dict(_select(_torch_load(f), key if inp.kind == "torch" else None, f))
        dup = set(part) & set(out)
        if dup:
            raise CheckpointError(f"{inp.path}: tensor {sorted(dup)[0]!r} is in several shards")
        out.update(part)
    return out


def read_signature(inp: _Input, key: str | None) -> dict[str, tuple[tuple[int, ...], str]]:
    """Name -> (shape, dtype) of an input, reading as little as the format allows."""
    if inp.file_format == "safetensors":
        if key is not None:
            raise bad_arg("--key", key, f"no --key for safetensors inputs ({inp.path} is flat)")
        sig: dict[str, tuple[tuple[int, ...], str]] = {}
        for f in inp.files:
            with _safetensors_open(f) as st:
                for k in st.keys():  # noqa: SIM118 - safe_open is not a dict
                    sl = st.get_slice(k)
                    sig[k] = (tuple(sl.get_shape()), str(sl.get_dtype()).lower())
        return _normalize_sig(sig)
    tensors = _load(inp, key)  # memory-mapped for zip files: cheap
    return {k: (tuple(v.shape), _dtype_name(v.dtype)) for k, v in tensors.items()}


_ST_DTYPES = {"f64": "float64", "f32": "float32", "f16": "float16", "bf16": "bfloat16",
              "i64": "int64", "i32": "int32", "i16": "int16", "i8": "int8", "u8": "uint8",
              "bool": "bool", "f8_e4m3": "float8_e4m3fn", "f8_e5m2": "float8_e5m2"}


def _normalize_sig(sig: dict[str, tuple[tuple[int, ...], str]]) -> dict[str, tuple[tuple[int, ...], str]]:
    return {k: (s, _ST_DTYPES.get(d, d)) for k, (s, d) in sig.items()}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _compare(ref: dict[str, tuple[tuple[int, ...], str]], other: dict[str, tuple[tuple[int, ...], str]],
             name: str, ref_name: str) -> str | None:
    missing = sorted(set(ref) - set(other))
    extra = sorted(set(other) - set(ref))
    shapes = [f"{k} {ref[k][0]} vs {other[k][0]}" for k in ref if k in other and ref[k][0] != other[k][0]]
    dtypes = [f"{k} {ref[k][1]} vs {other[k][1]}" for k in ref if k in other and ref[k][1] != other[k][1]]
    if not (missing or extra or shapes or dtypes):
        return None

    def few(items: list[str]) -> str:
        return ", ".join(items[:8]) + (f", ... ({len(items) - 8} more)" if len(items) > 8 else "")

    parts = []
    if missing:
        parts.append(f"{len(missing)} missing: {few(missing)}")
    if extra:
        parts.append(f"{len(extra)} unexpected: {few(extra)}")
    if shapes:
        parts.append(f"{len(shapes)} with other shapes ({ref_name} vs this): {few(shapes)}")
    if dtypes:
        parts.append(f"{len(dtypes)} with other dtypes ({ref_name} vs this): {few(dtypes)}")
    return f"{name} differs from {ref_name}: " + "; ".join(parts)


# ----------------------------------------------------------------------------- atomic output


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _tmp_sibling(out: Path, directory: bool) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    if directory:
        return Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    os.close(fd)
    return Path(tmp)


@contextlib.contextmanager
def _atomic_output(out: Path, *, directory: bool, force: bool) -> Iterator[Path]:
    """Yield a temporary path next to ``out``; on success it replaces ``out`` in one rename.

    On any failure (including KeyboardInterrupt) the temporary file or directory is removed and
    ``out`` is left as it was.
    """
    if out.exists() and not force:
        raise CheckpointError(f"{out} exists: pass --force to replace it")
    if out.exists() and out.is_dir() != directory:
        kind = "a directory" if out.is_dir() else "a file"
        raise CheckpointError(f"{out} is {kind}: the output here is {'a directory' if directory else 'a file'}")
    tmp = _tmp_sibling(out, directory)
    try:
        yield tmp
        # mkstemp/mkdtemp create private (0600/0700) paths: give the output the usual permissions
        os.chmod(tmp, (0o777 if directory else 0o666) & ~_umask())
        if directory:
            if out.exists():
                old = _tmp_sibling(out, True)
                os.rmdir(old)
                os.replace(out, old)
                os.replace(tmp, out)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, out)
        else:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, out)
    except BaseException:
        if directory:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        raise


def _save_torch(obj: Any, path: Path) -> None:
    torch.save(obj, path)


def _save_safetensors(tensors: dict[str, Tensor], path: Path, metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)


def _safetensors_metadata(path: Path) -> dict[str, str]:
    with _safetensors_open(path) as st:
        return dict(st.metadata() or {})


def _flat_torch(tensors: dict[str, Tensor], template: Any, note: str) -> collections.OrderedDict[str, Tensor]:
    """An OrderedDict state dict; the note goes in its ``_metadata`` (kept by ``torch.load``)."""
    out: collections.OrderedDict[str, Tensor] = collections.OrderedDict(tensors)
    meta: collections.OrderedDict[str, Any] = collections.OrderedDict()
    old = getattr(template, "_metadata", None)
    if isinstance(old, Mapping):
        for k, v in old.items():
            meta[k] = dict(v) if isinstance(v, Mapping) else v
    root = dict(meta.get("", {}))
    root["weightavg"] = note
    meta[""] = root
    out._metadata = meta  # type: ignore[attr-defined]
    return out


def _holds_tensor(obj: Any) -> bool:
    if isinstance(obj, Tensor):
        return True
    if isinstance(obj, Mapping):
        return any(_holds_tensor(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return any(_holds_tensor(v) for v in obj)
    return False


def _nested_torch(
    tensors: dict[str, Tensor], last: Any, key: str, note: dict[str, Any]
) -> tuple[dict[str, Any], list[str]]:
    """The last input's structure with the averaged weights at ``key``.

    Other entries that hold tensors (optimizer states...) belong to one input only: dropped.
    """
    path = [key] if key in last else key.split(".")
    dropped: list[str] = []

    def rebuild(node: Mapping[str, Any], rest: list[str], prefix: str) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in node.items():
            if k == rest[0]:
                if len(rest) == 1:
                    out[k] = _flat_torch(tensors, v, json.dumps(note))
                else:
                    out[k] = rebuild(v, rest[1:], f"{prefix}{k}.")
            elif _holds_tensor(v):
                dropped.append(f"{prefix}{k}")
            else:
                out[k] = v
        return out

    out = rebuild(last, path, "")
    out["weightavg"] = note
    return out, dropped


# ----------------------------------------------------------------------------- averaging


def average_checkpoints(
    inputs: Sequence[str | os.PathLike[str]],
    output: str | os.PathLike[str],
    *,
    last: int | None = None,
    ema_decay: float | None = None,
    key: str | None = None,
    force: bool = False,
    warn: bool = True,
    weights: Sequence[float] | None = None,
) -> dict[str, Any]:
    """Average checkpoints and write the result atomically in the inputs' format.

    Args:
        inputs: checkpoints in averaging order: torch files, ``.safetensors`` files or Hugging Face
            model directories (all of one kind).
        output: the output file (directory for Hugging Face inputs).
        last: average only the last ``last`` inputs, uniformly (LAWA).
        ema_decay: instead of a uniform mean, an EMA over the inputs in order (first one copied):
            ``avg ← decay · avg + (1 − decay) · next``.
        key: entry holding the weights in nested torch checkpoints (dots for deeper levels).
        force: replace ``output`` if it exists.
        warn: also issue the returned warnings with :func:`warnings.warn` (the CLI prints them).
        weights: one non-negative weight per input: ``Σ wᵢ xᵢ / Σ wᵢ`` (zero-weight inputs are
            not read).

    Returns:
        A JSON-ready summary (what was averaged, counts, warnings).

    Raises:
        CheckpointError: unreadable input, refused pickle, no weights, output exists.
        MismatchError: inputs with different names, shapes or dtypes (all differences listed).
        ConfigError: bad ``last``/``ema_decay``/``key``.

    .. note::
        Floating tensors are averaged in float32 (float64 when an input holds float64) through
        :class:`weightavg.Averager` and written back in their own dtype; integer and bool tensors
        are copied from the last input. BatchNorm running statistics are averaged like any tensor
        and a warning says to recompute them (:func:`weightavg.recompute_bn`).
    """
    paths = [Path(p) for p in inputs]
    out = Path(output)
    if not paths:
        raise bad_arg("inputs", [], "at least one checkpoint")
    if last is not None and ema_decay is not None:
        raise bad_arg("--last/--ema", (last, ema_decay), "at most one of them")
    if last is not None and (isinstance(last, bool) or not isinstance(last, int)
                             or not 1 <= last <= len(paths)):
        raise bad_arg("--last", last, f"an int in [1, {len(paths)}] (the number of inputs)")
    if ema_decay is not None and not (isinstance(ema_decay, (int, float)) and 0.0 <= ema_decay < 1.0):
        raise bad_arg("--ema", ema_decay, "a decay in [0, 1)")
    if key is not None and not key:
        raise bad_arg("--key", key, "a non-empty entry name such as state_dict")
    used = paths[-last:] if last is not None else paths
    if weights is not None:  # explicit weights (weightavg._window: the rule and the schedules)
        from .._window import weighted_mean_rule

        if last is not None or ema_decay is not None:
            raise bad_arg("--weights", list(weights), "no --last/--ema with explicit weights")
        if len(weights) != len(paths) or any(not (isinstance(w, (int, float)) and w >= 0) for w in weights):
            raise bad_arg("--weights", list(weights), f"{len(paths)} non-negative numbers (one per input)")
        used = [p for p, w in zip(paths, weights, strict=True) if w > 0]
        weights = [float(w) for w in weights if w > 0]
        weighted_mean_rule(weights)  # validates (a positive, finite total)
    resolved_out = out.resolve()
    items = [_detect(p) for p in used]
    kinds = {i.kind for i in items}
    if "hf" in kinds and len(kinds) > 1:
        raise CheckpointError("inputs mix Hugging Face directories and files: give one kind")
    if len({i.file_format for i in items}) > 1 or (len(kinds) > 1):
        raise CheckpointError("inputs mix torch and safetensors files: give one format")
    if out.exists() and not force:
        raise CheckpointError(f"{out} exists: pass --force to replace it")
    if any(p.resolve() == resolved_out for p in used) and not force:
        raise CheckpointError(f"{out} is one of the inputs: pass --force to replace it")

    # 1. names, shapes and dtypes of every input, before any averaging
    sigs = [read_signature(i, key) for i in items]
    problems = [msg for i, s in zip(items[1:], sigs[1:], strict=True)
                if (msg := _compare(sigs[0], s, str(i.path), str(items[0].path))) is not None]
    if problems:
        raise MismatchError("checkpoints do not match: " + " | ".join(problems))
    ref = sigs[0]
    names = list(ref)
    canon = {canonical_name(n): n for n in names}
    if len(canon) != len(names):
        raise CheckpointError("tensor names collide once 'module.'/'_orig_mod.' prefixes are "
                              "removed; cannot pair them by name")
    floating = [n for n, (_, d) in ref.items() if d.startswith(("float", "bfloat", "complex"))]
    acc_dtype = torch.float64 if any(ref[n][1] == "float64" for n in floating) else torch.float32

    # 2. stream the inputs through one Averager
    rule = ema(decay=float(ema_decay)) if ema_decay is not None else mean()
    if weights is not None:
        rule = weighted_mean_rule(weights)
    avg: Averager | None = None
    for inp in items:
        tensors = _load(inp, key)
        try:
            if avg is None:
                avg = Averager(tensors, rule=rule, dtype=acc_dtype)
            avg.update(tensors)
        except NonFiniteError as err:
            raise CheckpointError(f"{inp.path}: holds NaN or Inf: {err}") from err
        del tensors
    assert avg is not None
    averaged = avg.export_state_dict()
    result = {canon[c]: averaged[c] for c in canon}  # input order, original names
    del averaged

    method = "ema" if ema_decay is not None else ("last_k" if last is not None else "mean")
    method = "weighted" if weights is not None else method
    description = {"mean": "uniform average",
                   "weighted": f"weighted average (weights {[round(w, 6) for w in weights or []]})",
                   "last_k": f"uniform average of the last {last} of {len(paths)}",
                   "ema": f"EMA (decay {ema_decay:g})" if ema_decay is not None else ""}[method]
    copied = [n for n in names if n not in floating]
    note: dict[str, Any] = {
        "tool": f"weightavg {__version__}",
        "method": method,
        "description": description,
        "last_k": last,
        "ema_decay": ema_decay,
        "weights": weights,
        "inputs": [str(p) for p in used],
        "num_inputs": len(used),
        "accumulation_dtype": _dtype_name(acc_dtype),
        "copied_from_last_input": copied[:50],
        "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    notes: list[str] = []
    bn = [n for n in floating if n.rsplit(".", 1)[-1] in _BN_STATS]
    if bn:
        notes.append(f"{len(bn)} BatchNorm statistics (e.g. {bn[0]}) were averaged like weights; "
                    "they are not the statistics of the averaged weights: recompute them "
                    "(weightavg.recompute_bn) before evaluating")
    note["warnings"] = notes

    # 3. write atomically, in the inputs' format
    layout = items[-1]  # the output takes the last input's format, layout and extra files
    dropped: list[str] = []
    if layout.kind == "hf":
        with _atomic_output(out, directory=True, force=force) as tmp:
            _write_hf(result, layout, tmp, note)
    elif layout.kind == "safetensors":
        meta = _safetensors_metadata(layout.path)
        meta["weightavg"] = json.dumps(note)
        with _atomic_output(out, directory=False, force=force) as tmp:
            _save_safetensors(result, tmp, meta)
    else:
        template = _torch_load(layout.path)
        if key is not None:
            obj, dropped = _nested_torch(result, template, key, note)
            if dropped:  # lands in obj["weightavg"] too (the same list)
                notes.append(f"entries holding tensors other than --key {key!r} were not written "
                            f"(they belong to one input): {', '.join(dropped)}")
        else:
            obj = _flat_torch(result, template, json.dumps(note))
        del template
        with _atomic_output(out, directory=False, force=force) as tmp:
            _save_torch(obj, tmp)
    if warn:
        for w in notes:
            warnings.warn(w, UserWarning, stacklevel=2)
    return {
        "output": str(out),
        "format": layout.kind if layout.kind != "hf" else f"hf ({layout.file_format})",
        "method": method,
        "method_description": description,
        "last_k": last,
        "ema_decay": ema_decay,
        "weights": weights,
        "inputs": [str(p) for p in used],
        "num_averaged_tensors": len(floating),
        "num_copied_tensors": len(copied),
        "copied_tensors": copied,
        "accumulation_dtype": _dtype_name(acc_dtype),
        "dropped_entries": dropped,
        "warnings": notes,
    }


def _write_hf(tensors: dict[str, Tensor], layout: _Input, tmp: Path, note: dict[str, Any]) -> None:
    weight_files = {f.name for f in layout.files}
    if layout.index is not None:
        weight_files.add(layout.index.name)
    skipped = []
    for f in sorted(layout.path.iterdir()):
        if not f.is_file() or f.name in weight_files:
            continue
        if f.name in _TRAINING_STATE or f.name.startswith("rng_state"):
            skipped.append(f.name)
            continue
        shutil.copy2(f, tmp / f.name)
    note = {**note, "copied_files_from": str(layout.path), "not_copied": skipped}
    text = json.dumps(note)
    if layout.index is None:
        groups = {layout.files[0].name: list(tensors)}
    else:
        groups = {}
        for n in tensors:
            groups.setdefault(layout.weight_map[n], []).append(n)
    for fname, names in groups.items():
        part = {n: tensors[n] for n in names}
        if layout.file_format == "safetensors":
            meta = _safetensors_metadata(layout.path / fname)
            meta["weightavg"] = text
            _save_safetensors(part, tmp / fname, meta)
        else:
            _save_torch(_flat_torch(part, None, text), tmp / fname)
        os.chmod(tmp / fname, 0o666 & ~_umask())
    if layout.index is not None:
        index = json.loads(layout.index.read_text())
        index.setdefault("metadata", {})["weightavg"] = note
        (tmp / layout.index.name).write_text(json.dumps(index, indent=2) + "\n")
