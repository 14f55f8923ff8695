"""What a source is made of: canonical names of a model's parameters and persistent buffers.

Part of the engine (see :mod:`weightavg._engine`): wrappers are looked through, names are made
canonical, and a source (a module or a mapping name -> tensor) becomes ``name -> (tensor, is_param)``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Union

from torch import Tensor, nn

from ._errors import bad_arg

__all__ = ["Source", "canonical_name", "named_tensors", "source_tensors", "unwrap_model"]

Source = Union[nn.Module, Mapping[str, Tensor]]  # noqa: UP007 (a runtime alias on Python 3.10)


def unwrap_model(model: nn.Module) -> nn.Module:
    """Strip DistributedDataParallel / DataParallel / torch.compile wrappers (any nesting)."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
            continue
        orig = getattr(model, "_orig_mod", None)
        if isinstance(orig, nn.Module) and type(model).__name__ == "OptimizedModule":
            model = orig
            continue
        return model


def canonical_name(name: str) -> str:
    """Canonical tensor name: ``_orig_mod.`` components and leading ``module.`` prefixes removed."""
    parts = [p for p in name.split(".") if p != "_orig_mod"]
    while len(parts) > 1 and parts[0] == "module":
        parts = parts[1:]
    return ".".join(parts)


def named_tensors(model: nn.Module) -> dict[str, tuple[Tensor, bool]]:
    """Canonical name -> (tensor, is_parameter) for parameters and *persistent* buffers.

    Shared (tied) tensors appear once, under their first name.
    """
    model = unwrap_model(model)
    out: dict[str, tuple[Tensor, bool]] = {}
    seen: set[int] = set()
    for mod_name, mod in model.named_modules(remove_duplicate=True):
        prefix = mod_name + "." if mod_name else ""
        for pname, p in mod._parameters.items():
            if p is None or id(p) in seen:
                continue
            seen.add(id(p))
            out[canonical_name(prefix + pname)] = (p, True)
        for bname, b in mod._buffers.items():
            if b is None or bname in mod._non_persistent_buffers_set or id(b) in seen:
                continue
            seen.add(id(b))
            out[canonical_name(prefix + bname)] = (b, False)
    return out


def source_tensors(source: Source, what: str = "model") -> dict[str, tuple[Tensor, bool]]:
    """Canonical name -> (tensor, is_parameter) of a module or a mapping (mapping: floating = param)."""
    if isinstance(source, nn.Module):
        return named_tensors(source)
    if isinstance(source, Mapping):
        out: dict[str, tuple[Tensor, bool]] = {}
        for k, v in source.items():
            if not isinstance(v, Tensor):
                continue
            out[canonical_name(str(k))] = (v, v.is_floating_point())
        return out
    raise bad_arg(what, type(source).__name__, "a torch.nn.Module or a mapping of name -> Tensor")
