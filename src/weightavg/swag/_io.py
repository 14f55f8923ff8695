"""Saving and loading posterior states: torch (``weights_only``) or safetensors, written atomically."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .._errors import StateError, bad_arg

__all__ = ["load_state", "save_state"]

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

    The file is written next to its destination under a temporary name, then renamed over it, so
    a crash never leaves a half-written file.
    """
    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
    os.close(fd)
    try:
        if _is_safetensors(dest):
            from safetensors.torch import save_file

            tensors: dict[str, Tensor] = {}
            skeleton = _split(state, tensors)
            save_file(tensors, tmp, metadata={"weightavg": json.dumps(skeleton)})
        else:
            torch.save(dict(state), tmp)
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def load_state(path: PathLike) -> dict[str, Any]:
    """Read what :func:`save_state` wrote (``torch.load(weights_only=True)`` or safetensors)."""
    src = Path(path)
    if not src.is_file():
        raise bad_arg("path", str(path), "an existing file written by save()")
    if _is_safetensors(src):
        from safetensors import safe_open

        with safe_open(str(src), framework="pt") as f:
            meta = f.metadata() or {}
            if "weightavg" not in meta:
                raise StateError(f"{src} is a safetensors file without weightavg metadata")
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
        out = _join(json.loads(meta["weightavg"]), tensors)
    else:
        out = torch.load(src, map_location="cpu", weights_only=True)
    if not isinstance(out, dict):
        raise StateError(f"{src} does not hold a state dict")
    return out

