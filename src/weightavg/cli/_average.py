"""Offline averaging of saved checkpoints (``weightavg average``).

Inputs: torch files (read with ``weights_only=True``), safetensors files, or Hugging Face model
directories (single-file or sharded, safetensors or ``.bin``). They stream through one
:class:`weightavg.Averager` built from a ``{name: tensor}`` mapping, so memory stays at about one
model whatever the number of inputs; the averaging arithmetic is the engine's.
"""

from __future__ import annotations

import collections
import datetime
import json
import os
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from .. import __version__
from .._engine import Averager, canonical_name
from .._errors import MismatchError, NonFiniteError, WeightAvgError, bad_arg
from .._files import InputError, atomic_output, check_output, input_path, load_torch_untrusted, member
from .._rules import ema, mean

__all__ = ["CheckpointError", "average_checkpoints", "load_checkpoint", "read_signature"]

Kind = Literal["torch", "safetensors", "hf", "dcp"]
_SAFETENSORS_NAMES = ("model.safetensors",)
_BIN_NAMES = ("pytorch_model.bin",)
_BN_STATS = ("running_mean", "running_var")

# Files of a Hugging Face model directory that the output takes from the last input: configs,
# tokenizer and processor files, the model card and licence. Nothing else is copied: no weights that
# were not averaged (other formats, stale shards), no training state (optimizer, scheduler, RNG,
# weightavg_state.pt, trainer_state.json), no code, no dotfiles, no symbolic links.
_COPIED_FILES = frozenset({
    "config.json", "generation_config.json",
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "vocab.txt", "merges.txt", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model",
    "sentencepiece.model", "source.spm", "target.spm", "chat_template.jinja", "chat_template.json",
    "preprocessor_config.json", "processor_config.json", "image_processor_config.json",
    "feature_extractor_config.json", "video_preprocessor_config.json",
    "README.md", "LICENSE", "LICENSE.txt", "LICENSE.md", "NOTICE", "USE_POLICY.md",
})
# Entries of a nested torch checkpoint (--key) that describe the model, kept in the output next to
# the averaged weights; everything else (epoch, global_step, loops, callbacks, optimizer_states,
# lr_schedulers, precision-plugin and datamodule state...) is training state of one input: dropped.
_KEPT_ENTRIES = frozenset({
    "pytorch-lightning_version", "hyper_parameters", "hparams_name", "hparams_type",
    "datamodule_hyper_parameters", "datamodule_hparams_name", "datamodule_hparams_type",
    "config", "model_config", "hparams", "args", "model_args",
})
_MAX_DEPTH = 100  # nesting refused beyond this (pickles can build million-deep or cyclic nests)
_SUGGEST_NODES = 100_000  # containers looked at to suggest a --key


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


def _read_index(path: Path, index: Path, ext: str) -> dict[str, str]:
    """The ``weight_map`` of a shard index, each file checked (plain name, inside, regular file)."""
    try:
        data = json.loads(index.read_bytes())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{index}: not a readable shard index: {' '.join(str(err).split())[:200]}") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index}: not a shard index: expected a JSON object with a non-empty "
                              "'weight_map' of tensor name -> shard file name")
    for name, fname in weight_map.items():
        if not isinstance(fname, str):
            raise CheckpointError(f"{index}: weight_map[{name!r}] is {type(fname).__name__}, expected a "
                                  "shard file name")
        member(path, fname, what=f"{index.name} (weight_map[{name!r}])")
        if not fname.endswith(ext):
            raise CheckpointError(f"{index}: weight_map[{name!r}] names {fname!r}: a shard of this index "
                                  f"must be a {ext} file")
    return dict(weight_map)


def _hf_input(path: Path) -> _Input:
    try:
        names = sorted(os.listdir(path))
    except OSError as err:
        raise CheckpointError(f"{path}: cannot list the directory ({err.strerror or err})") from None
    for fmt, ext in (("safetensors", ".safetensors"), ("torch", ".bin")):
        indexes = [n for n in names if n.endswith(f"{ext}.index.json") and not n.startswith(".")]
        if len(indexes) > 1:
            raise CheckpointError(f"{path}: holds {len(indexes)} shard indexes ({', '.join(indexes)}): "
                                  "cannot tell which one describes the model")
        if len(indexes) == 1:
            index = member(path, indexes[0], what="its shard index")
            weight_map = _read_index(path, index, ext)
            files = list(dict.fromkeys(weight_map.values()))
            return _Input(path, "hf", [path / f for f in files], fmt,  # type: ignore[arg-type]
                          index, weight_map)
    for fmt, known, ext in (("safetensors", _SAFETENSORS_NAMES, ".safetensors"), ("torch", _BIN_NAMES, ".bin")):
        for n in known:
            if n in names:
                return _Input(path, "hf", [member(path, n, what="its weights")], fmt)  # type: ignore[arg-type]
        found = [n for n in names if n.endswith(ext) and not n.startswith(".") and n != "training_args.bin"
                 and not n.startswith(("optimizer", "scheduler", "scaler", "rng_state"))]
        if len(found) == 1:
            return _Input(path, "hf", [member(path, found[0], what="its weights")], fmt)  # type: ignore[arg-type]
        if len(found) > 1:
            shown = ", ".join(found[:6]) + (", ..." if len(found) > 6 else "")
            raise CheckpointError(
                f"{path}: holds {len(found)} *{ext} files ({shown}) but no {known[0]} and no "
                f"*{ext}.index.json: cannot tell which file holds the model (shards need their index)")
    raise CheckpointError(
        f"{path} is a directory without model weights: expected model.safetensors, "
        "pytorch_model.bin, or a *.safetensors.index.json / *.bin.index.json shard index"
    )


def _detect(path: Path) -> _Input:
    try:
        input_path(path)
    except InputError as err:
        raise CheckpointError(str(err)) from None
    if path.is_dir():
        from .._dcp import is_dcp_checkpoint

        if is_dcp_checkpoint(path):  # torch.distributed.checkpoint: read by weightavg.cli._stream
            return _Input(path, "dcp")
        return _hf_input(path)
    if path.suffix == ".safetensors":
        return _Input(path, "safetensors", [path], "safetensors")
    return _Input(path, "torch", [path], "torch")


def _torch_load(path: Path) -> Any:
    """``torch.load(weights_only=True)``, memory-mapped when the file allows it (one-line errors)."""
    try:
        return load_torch_untrusted(path)
    except InputError as err:
        raise CheckpointError(str(err)) from None


def _safetensors_open(path: Path) -> Any:
    try:
        from safetensors import safe_open
    except ImportError as err:
        raise CheckpointError(f"{path}: reading safetensors needs the 'safetensors' package: "
                              "pip install 'weightavg[safetensors]'") from err
    try:
        input_path(path)
        return safe_open(str(path), framework="pt", device="cpu")
    except InputError as err:
        raise CheckpointError(str(err)) from None
    except Exception as err:
        msg = " ".join(str(err).split())
        raise CheckpointError(f"{path}: cannot read this safetensors file (truncated or corrupt?): "
                              f"{msg[:200]}") from err


def _children(node: Any) -> Iterator[tuple[str, Any]]:
    if isinstance(node, Mapping):
        for k, v in node.items():
            yield str(k), v
    elif isinstance(node, (list, tuple)):
        for i, v in enumerate(node):
            yield str(i), v


def _tensor_holders(obj: Any, prefix: str = "", limit: int = 5) -> list[str]:
    """Dotted keys under which ``obj`` holds a flat mapping of tensors (to suggest --key).

    Breadth-first and iterative, each container looked at once (a pickle can reference one dict
    from many places, or from itself), at most :data:`_SUGGEST_NODES` containers and
    :data:`_MAX_DEPTH` levels: bounded time whatever the file.
    """
    out: list[str] = []
    seen: set[int] = set()
    queue = collections.deque([(obj, prefix, 0)])
    budget = _SUGGEST_NODES
    while queue and len(out) < limit and budget > 0:
        node, where, depth = queue.popleft()
        if id(node) in seen or depth > _MAX_DEPTH or not isinstance(node, Mapping):
            continue
        seen.add(id(node))
        budget -= 1
        for k, v in node.items():
            if isinstance(v, Mapping) and v and id(v) not in seen:
                if all(isinstance(t, Tensor) for t in v.values()):
                    out.append(f"{where}{k}")
                    seen.add(id(v))
                else:
                    queue.append((v, f"{where}{k}.", depth + 1))
    return out


def _inspect(obj: Any, where: str, path: Path) -> bool:
    """Whether ``obj`` holds a tensor anywhere; refuses nesting deeper than :data:`_MAX_DEPTH`.

    Iterative, each container looked at once (cycles and shared references are fine).
    """
    seen: set[int] = set()
    stack = [(obj, 0)]
    found = False
    while stack:
        node, depth = stack.pop()
        if isinstance(node, Tensor):
            found = True
            continue
        if not isinstance(node, (Mapping, list, tuple)) or id(node) in seen:
            continue
        if depth >= _MAX_DEPTH:
            raise CheckpointError(f"{path}: entry {where!r} nests deeper than {_MAX_DEPTH} levels: refused")
        seen.add(id(node))
        stack.extend((v, depth + 1) for _, v in _children(node))
    return found


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
                    holders = _tensor_holders(obj)
                    hint = (f"; it holds tensors under {', '.join(repr(h) for h in holders)}: pass "
                            f"--key {holders[0]}") if holders else ""
                    raise CheckpointError(f"{path}: no entry {key!r} (--key); top-level keys: "
                                          f"{', '.join(keys[:12]) or '(none)'}{hint}")
                node = node[part]
        obj = node
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: holds an object of type {type(obj).__name__}, not a mapping "
                              "of name -> tensor")
    bad = next(((k, type(v).__name__) for k, v in obj.items() if not isinstance(v, Tensor)), None)
    if bad is not None:
        holders = _tensor_holders(obj, f"{key}." if key else "")
        hint = (f"; it holds tensors under {', '.join(repr(h) for h in holders)}: pass "
                f"--key {holders[0]}") if holders else ""
        where = f"entry {key!r}" if key else "it"
        raise CheckpointError(f"{path}: {where} is not a flat mapping of name -> tensor "
                              f"(entry {bad[0]!r} is of type {bad[1]}){hint}")
    if not obj:
        raise CheckpointError(f"{path}: holds no tensors")
    return obj


def load_checkpoint(path: str | os.PathLike[str], key: str | None = None) -> dict[str, Tensor]:
    """Read the ``{name: tensor}`` weights of one checkpoint (torch, safetensors or HF directory).

    torch files are read with ``weights_only=True`` (memory-mapped when possible).

    Raises:
        CheckpointError: the path is missing, refused (see the README's "Security" section) or
            does not hold a mapping of tensors.
    """
    inp = _detect(Path(path))
    return _load(inp, key)


def _load(inp: _Input, key: str | None) -> dict[str, Tensor]:
    if inp.kind == "dcp":  # the whole selection (greedy soups need state dicts): not streamed
        from ._stream import load_dcp

        return load_dcp(inp.path, key)
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
                                          f"corrupt?): {' '.join(str(err).split())[:200]}") from err
        else:
            part = dict(_select(_torch_load(f), key if inp.kind == "torch" else None, f))
        if inp.index is not None:
            _check_shard(inp, f, part)
        dup = set(part) & set(out)
        if dup:
            raise CheckpointError(f"{inp.path}: tensor {sorted(dup)[0]!r} is in several shards")
        out.update(part)
    return out


def _check_shard(inp: _Input, f: Path, names: Mapping[str, Any]) -> None:
    assert inp.index is not None
    listed = {n for n, fname in inp.weight_map.items() if fname == f.name}
    extra = sorted(set(names) - listed)
    missing = sorted(listed - set(names))
    if extra or missing:
        what = (f"holds {extra[0]!r}, which the index places elsewhere or not at all" if extra
                else f"lacks {missing[0]!r}, which the index places there")
        raise CheckpointError(f"{inp.index}: does not match its shards: {f.name} {what}")


def read_signature(inp: _Input, key: str | None) -> dict[str, tuple[tuple[int, ...], str]]:
    """Name -> (shape, dtype) of an input, reading as little as the format allows."""
    if inp.file_format == "safetensors":
        if key is not None:
            raise bad_arg("--key", key, f"no --key for safetensors inputs ({inp.path} is flat)")
        sig: dict[str, tuple[tuple[int, ...], str]] = {}
        for f in inp.files:
            with _safetensors_open(f) as st:
                names = list(st.keys())
                if inp.index is not None:
                    _check_shard(inp, f, dict.fromkeys(names))
                for k in names:
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


# ----------------------------------------------------------------------------- output


def _save_torch(obj: Any, path: Path) -> None:
    with open(path, "wb") as f:  # write errors (disk full...) surface as OSError
        torch.save(obj, f)


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
            if isinstance(k, str) and isinstance(v, Mapping):
                meta[k] = {str(a): b for a, b in v.items() if isinstance(b, (int, float, str, bool))}
    root = dict(meta.get("", {}))
    root["weightavg"] = note
    meta[""] = root
    out._metadata = meta  # type: ignore[attr-defined]
    return out


def _ties(tensors: Mapping[str, Tensor]) -> dict[str, str]:
    """Name -> first name of the same tensor, for names that share one storage (tied weights)."""
    first: dict[tuple[Any, ...], str] = {}
    out: dict[str, str] = {}
    for n, t in tensors.items():
        if t.numel() == 0:
            continue
        try:
            ptr = t.untyped_storage().data_ptr()
        except (RuntimeError, NotImplementedError):
            continue
        sig = (ptr, t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if sig in first:
            out[n] = first[sig]
        else:
            first[sig] = n
    return out


def _retie(tensors: dict[str, Tensor], ties: Mapping[str, str]) -> dict[str, Tensor]:
    """``tensors`` with each tied name pointing at its first name's tensor (one storage in the file)."""
    out = dict(tensors)
    for n, src in ties.items():
        if n in out and src in out and torch.equal(out[n], out[src]):
            out[n] = out[src]
    return out


def _nested_torch(
    tensors: dict[str, Tensor], last: Any, key: str, note: dict[str, Any], path: Path
) -> tuple[dict[str, Any], list[str]]:
    """The averaged weights at ``key`` with the last input's model description, and nothing else.

    Kept next to the weights: the top-level entries of :data:`_KEPT_ENTRIES` that hold no
    tensors (Lightning's ``hyper_parameters``, ``pytorch-lightning_version``...). Dropped, and
    returned: everything else, i.e. one input's training state (``epoch``, ``global_step``,
    ``loops``, ``callbacks``, ``optimizer_states``, ``lr_schedulers``...) and other weights. The
    output is marked weights-only: it cannot resume a training run.
    """
    route = [key] if key in last else key.split(".")
    dropped: list[str] = []

    def rebuild(node: Mapping[str, Any], rest: list[str], prefix: str) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in node.items():
            if k == rest[0]:
                out[k] = (_flat_torch(tensors, v, json.dumps(note)) if len(rest) == 1
                          else rebuild(v, rest[1:], f"{prefix}{k}."))
            elif not prefix and k in _KEPT_ENTRIES and not _inspect(v, str(k), path):
                out[k] = v
            else:
                dropped.append(f"{prefix}{k}")
        return out

    out = rebuild(last, route, "")
    out["weightavg"] = {**note, "weights_only": True}
    return out, dropped


# ----------------------------------------------------------------------------- averaging


def _describe(ema_decay: float | None, last: int | None, weights: Sequence[float] | None,
              n_inputs: int) -> tuple[str, str]:
    """The method name and its description, for an output's note and summary."""
    method = "ema" if ema_decay is not None else ("last_k" if last is not None else "mean")
    method = "weighted" if weights is not None else method
    description = {"mean": "uniform average",
                   "weighted": f"weighted average (weights {[round(w, 6) for w in weights or []]})",
                   "last_k": f"uniform average of the last {last} of {n_inputs}",
                   "ema": f"EMA (decay {ema_decay:g})" if ema_decay is not None else ""}[method]
    return method, description


def _nonfinite(tensors: Mapping[str, Tensor], names: Sequence[str]) -> list[str]:
    return [n for n in names if not bool(torch.isfinite(tensors[n]).all())]


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
            model directories (all of one kind); or ``torch.distributed.checkpoint`` directories,
            alone or with safetensors inputs, streamed tensor by tensor into safetensors (see
            :func:`weightavg.cli._stream.average_streaming`).
        output: the output file (directory for Hugging Face inputs); it may not be, nor contain,
            one of the inputs.
        last: average only the last ``last`` inputs, uniformly (LAWA).
        ema_decay: instead of a uniform mean, an EMA over the inputs in order (first one copied):
            ``avg ← decay · avg + (1 − decay) · next``.
        key: entry holding the weights in nested torch checkpoints (dots for deeper levels).
        force: replace ``output`` if it exists.
        warn: also issue the returned warnings with :func:`warnings.warn` (the CLI prints them).
        weights: one non-negative weight per input: ``Σ wᵢ xᵢ / Σ wᵢ`` (zero-weight inputs are
            not read).

    Returns:
        A JSON-ready summary (what was averaged, counts, files copied, entries dropped, warnings).

    Raises:
        CheckpointError: unreadable or refused input, no floating-point weights, NaN/Inf in an
            input.
        MismatchError: inputs with different names, shapes or dtypes (all differences listed).
        ConfigError: bad ``last``/``ema_decay``/``key``.
        weightavg._files.OutputError: the output exists (without ``force``), equals or contains
            an input, or cannot be written; nothing is replaced then.

    .. note::
        Floating tensors are averaged in float32 (float64 when an input holds float64) through
        :class:`weightavg.Averager` and written back in their own dtype; integer, bool and empty
        tensors are copied from the last input. BatchNorm running statistics are averaged like any
        tensor and a warning says to recompute them (:func:`weightavg.recompute_bn`).
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
    items = [_detect(p) for p in used]
    kinds = {i.kind for i in items}
    if "dcp" in kinds:  # DCP checkpoints (sharded runs): streamed tensor by tensor into safetensors
        from ._stream import average_streaming

        return average_streaming(items, out, inputs=paths, last=last, ema_decay=ema_decay, key=key,
                                 force=force, warn=warn, weights=weights)
    if "hf" in kinds and len(kinds) > 1:
        raise CheckpointError("inputs mix Hugging Face directories and files: give one kind")
    if len({i.file_format for i in items}) > 1 or (len(kinds) > 1):
        raise CheckpointError("inputs mix torch and safetensors files: give one format")
    layout = items[-1]  # the output takes the last input's format, layout and model files
    # refuse an existing output, or one that is or contains an input, before any work
    check_output(out, directory=layout.kind == "hf", force=force, inputs=paths)

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
    floating_set = {n for n, (shape, d) in ref.items()
                    if d.startswith(("float", "bfloat", "complex")) and 0 not in shape}
    floating = [n for n in names if n in floating_set]
    if not floating:
        kinds_seen = sorted({d for _, d in ref.values()})
        raise CheckpointError(
            f"{items[0].path}: nothing to average: its {len(names)} tensor(s) are all integer, bool or "
            f"empty ({', '.join(kinds_seen)}); weightavg average averages floating-point weights only")
    acc_dtype = torch.float64 if any(ref[n][1] == "float64" for n in floating) else torch.float32

    # 2. stream the inputs through one Averager (floating, non-empty tensors only)
    rule = ema(decay=float(ema_decay)) if ema_decay is not None else mean()
    if weights is not None:
        rule = weighted_mean_rule(weights)
    avg: Averager | None = None
    tensors: dict[str, Tensor] = {}
    for inp in items:
        tensors = {}  # drop the previous input before reading the next one
        tensors = _load(inp, key)
        part = {n: tensors[n] for n in floating}
        try:
            if avg is None:
                avg = Averager(part, rule=rule, dtype=acc_dtype)
            avg.update(part)
        except NonFiniteError:
            bad = _nonfinite(part, floating)
            raise CheckpointError(
                f"{inp.path}: holds NaN or Inf in {len(bad)} tensor(s): {', '.join(bad[:5])}"
                f"{' ...' if len(bad) > 5 else ''}; weightavg average refuses non-finite inputs: leave "
                "this checkpoint out of the list (or use --last K to average only later ones)") from None
        del part
    assert avg is not None
    averaged = avg.export_state_dict()
    # input order, original names; integer, bool and empty tensors from the last input
    result = {n: averaged[canonical_name(n)] if n in floating_set else tensors[n] for n in names}
    del averaged, tensors

    method, description = _describe(ema_decay, last, weights, len(paths))
    copied = [n for n in names if n not in floating_set]
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
    dropped: list[str] = []
    files: dict[str, list[str]] = {"copied": [], "not_copied": []}
    if layout.kind == "hf":
        with atomic_output(out, directory=True, force=force, inputs=paths, notes=notes) as tmp:
            files = _write_hf(result, layout, tmp, note)
    elif layout.kind == "safetensors":
        meta = _safetensors_metadata(layout.path)
        meta["weightavg"] = json.dumps(note)
        with atomic_output(out, force=force, inputs=paths, notes=notes) as tmp:
            _save_safetensors(result, tmp, meta)
    else:
        template = _torch_load(layout.path)
        result = _retie(result, _ties(_select(template, key, layout.path)))
        if key is not None:
            obj, dropped = _nested_torch(result, template, key, note, layout.path)
            if dropped:  # lands in obj["weightavg"] too (the same list)
                notes.append(f"entries other than --key {key!r} and the model's description were not "
                             f"written (training state or weights of one input; the output is "
                             f"weights-only): {', '.join(dropped)}")
        else:
            obj = _flat_torch(result, template, json.dumps(note))
        del template
        with atomic_output(out, force=force, inputs=paths, notes=notes) as tmp:
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
        "copied_files": files["copied"],
        "not_copied_files": files["not_copied"],
        "warnings": notes,
    }


def _write_hf(tensors: dict[str, Tensor], layout: _Input, tmp: Path, note: dict[str, Any]) -> dict[str, list[str]]:
    """Write the averaged weights in the last input's layout and copy its allowlisted files.

    Returns the names of the files copied from the last input and of those left out.
    """
    weight_files = {f.name for f in layout.files}
    if layout.index is not None:
        weight_files.add(layout.index.name)
    copied: list[str] = []
    skipped: list[str] = []
    for name in sorted(os.listdir(layout.path)):
        if name in weight_files:
            continue
        if name not in _COPIED_FILES:
            skipped.append(name)
            continue
        try:
            src = member(layout.path, name, what="a file to copy")
            if src.is_symlink():
                raise InputError(f"{src}: a symbolic link")
        except InputError:
            skipped.append(name)  # never copy a link or anything but a regular file
            continue
        with open(src, "rb") as fin, open(tmp / name, "wb") as fout:
            while chunk := fin.read(1 << 20):
                fout.write(chunk)
        copied.append(name)
    note = {**note, "copied_files_from": str(layout.path), "copied_files": copied, "not_copied": skipped}
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
            part = _retie(part, _ties(_select(_torch_load(layout.path / fname), None, layout.path / fname)))
            _save_torch(_flat_torch(part, None, text), tmp / fname)
        os.chmod(tmp / fname, 0o666 & ~_umask())
    if layout.index is not None:
        index = json.loads(layout.index.read_bytes())
        index.setdefault("metadata", {})
        if not isinstance(index["metadata"], dict):
            index["metadata"] = {}
        index["metadata"]["weightavg"] = note
        index["weight_map"] = layout.weight_map
        (tmp / layout.index.name).write_text(json.dumps(index, indent=2) + "\n")
    return {"copied": copied, "not_copied": skipped}


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask

