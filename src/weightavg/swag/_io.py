"""Saving and loading posterior states: torch (``weights_only``) or safetensors, written atomically.

Files go through :mod:`weightavg._files`: written under a temporary name, flushed, renamed into
place (and the directory flushed); read with ``weights_only=True`` on a torch without known
bypasses, or as safetensors. Whatever a loaded state says is checked before use: a dtype is
taken from :data:`DTYPES` by name, never looked up on the ``torch`` module.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .._errors import StateError, bad_arg
from .._files import InputError, atomic_output, input_path, load_torch_untrusted

__all__ = ["DTYPES", "dtype_from_name", "load_state", "save_state"]

#: The dtypes a saved state may name (by their ``torch.<name>`` spelling).
DTYPES: dict[str, torch.dtype] = {
    "float64": torch.float64, "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
}


def dtype_from_name(name: object, *, path: object = "state") -> torch.dtype:
    """The floating dtype a saved state names; raises :class:`StateError` for any other string."""
    if isinstance(name, str) and name in DTYPES:
        return DTYPES[name]
    raise StateError(f"{path}: deviation_dtype {str(name)[:40]!r} is not one of {', '.join(DTYPES)}")

PathLike = str | os.PathLike[str]
_TENSOR = "__tensor__"


def _is_safetensors(path: Path) -> bool:
    return path.suffix == ".safetensors"


def _split(obj: Any, tensors: dict[str, Tensor]) -> Any:
    """Replace every tensor in a nested structure by a marker; collect tensors under fresh keys."""
    if isinstance(obj, Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = obj.detach().contiguous().clone()  # safetensors refuses shared storage
        return {_TENSOR: key}
    if isinstance(obj, Mapping):
        for k in obj:
            if not isinstance(k, str):
                raise bad_arg("state", k, "a state whose mapping keys are strings")
        return {k: _split(v, tensors) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_split(v, tensors) for v in obj]
    return obj


def _join(obj: Any, tensors: Mapping[str, Tensor]) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {_TENSOR}:
            return tensors[obj[_TENSOR]]
        return {k: _join(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_join(v, tensors) for v in obj]
    return obj


def save_state(state: Mapping[str, Any], path: PathLike) -> None:
    """Write a (nested) state dict atomically: a ``.safetensors`` path uses safetensors.

    The file is written next to its destination under a temporary name, flushed, then renamed
    over it (an existing file is replaced), so a crash never leaves a half-written file.

    Raises:
        weightavg._files.OutputError: the file cannot be written (disk full...); an existing file
            at ``path`` is then unchanged.
    """
    dest = Path(path)
    with atomic_output(dest, force=True) as tmp:
        if _is_safetensors(dest):
            from safetensors.torch import save_file

            tensors: dict[str, Tensor] = {}
            skeleton = _split(state, tensors)
            save_file(tensors, str(tmp), metadata={"weightavg": json.dumps(skeleton)})
        else:
            with open(tmp, "wb") as f:
                torch.save(dict(state), f)


def load_state(path: PathLike) -> dict[str, Any]:
    """Read what :func:`save_state` wrote (``torch.load(weights_only=True)`` or safetensors).

    Raises:
        ConfigError: ``path`` is not an existing file.
        StateError: the file is refused (a pickle holding Python objects, a torch older than
            the floor of :mod:`weightavg._files`, a FIFO or device), unreadable, or not a state
            written by :func:`save_state`; the message never suggests unsafe loading.
    """
    src = Path(path)
    if not src.is_file():
        raise bad_arg("path", str(path), "an existing file written by save()")
    try:
        input_path(src)
        if _is_safetensors(src):
            out = _load_safetensors(src)
        else:
            out = load_torch_untrusted(src, mmap=False)
    except InputError as err:
        raise StateError(str(err)) from None
    if not isinstance(out, dict):
        raise StateError(f"{src} does not hold a state dict")
    return out



def _load_safetensors(src: Path) -> Any:
    from safetensors import safe_open

    try:
        with safe_open(str(src), framework="pt") as f:
            meta = f.metadata() or {}
            if "weightavg" not in meta:
                raise StateError(f"{src} is a safetensors file without weightavg metadata")
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
        skeleton = json.loads(meta["weightavg"])
    except StateError:
        raise
    except Exception as err:
        msg = " ".join(str(err).split())[:200]
        raise StateError(f"{src}: cannot read this safetensors file (truncated or corrupt?): {msg}") from None
    try:
        return _join(skeleton, tensors)
    except (KeyError, TypeError) as err:
        raise StateError(f"{src}: its weightavg metadata does not match its tensors ({err!r})") from None
