"""What a source is made of: canonical names of a model's parameters and persistent buffers.

Part of the engine (see :mod:`weightavg._engine`): wrappers are looked through, names are made
canonical, and a source (a module or a mapping name -> tensor) becomes ``name -> (tensor, is_param)``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Union

from torch import Tensor, nn

from ._errors import ConfigError, bad_arg

__all__ = [
    "Source", "canonical_name", "named_tensors", "source_tensors", "state_dict_names", "tied_names", "unwrap_model",
]

Source = Union[nn.Module, Mapping[str, Tensor]]  # noqa: UP007 (a runtime alias on Python 3.10)


def _wrapped(model: nn.Module) -> nn.Module | None:
    """The module a wrapper wraps (DDP, DataParallel, ``torch.compile``), recognised by type; else None."""
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        return model.module
    cls = type(model)
    if cls.__name__ == "OptimizedModule" and cls.__module__.startswith("torch._dynamo"):
        orig = getattr(model, "_orig_mod", None)
        if isinstance(orig, nn.Module):
            return orig
    return None


def unwrap_model(model: nn.Module) -> nn.Module:
    """Strip DistributedDataParallel / DataParallel / torch.compile wrappers (any nesting).

    Returns:
        The innermost wrapped module (``model`` itself when it wraps nothing).

    Examples:
        >>> import torch, weightavg
        >>> inner = torch.nn.Linear(2, 1)
        >>> weightavg.unwrap_model(torch.nn.DataParallel(inner)) is inner
        True
    """
    while (inner := _wrapped(model)) is not None:
        model = inner
    return model


def canonical_name(name: str) -> str:
    """Canonical form of a *string* key (e.g. a checkpoint's): ``_orig_mod.`` components and leading
    ``module.`` prefixes removed.

    A key carries no type, so this guesses the wrappers' prefixes; names read from a module
    (:func:`named_tensors`) skip only the components that real wrappers add.

    Returns:
        The key without wrapper components.

    Examples:
        >>> import weightavg
        >>> weightavg.canonical_name("module._orig_mod.encoder.weight")
        'encoder.weight'
    """
    parts = [p for p in name.split(".") if p != "_orig_mod"]
    while len(parts) > 1 and parts[0] == "module":
        parts = parts[1:]
    return ".".join(parts)


def _named_modules(model: nn.Module) -> list[tuple[str, str, nn.Module]]:
    """``named_modules()`` (each module once, same order) as (canonical name, own name, module).

    A wrapper (DDP, DataParallel, a compiled module) anywhere in the tree contributes no component
    to the canonical name: its wrapped module takes the wrapper's own name. The own name is the
    one ``named_modules()`` and ``state_dict()`` use.
    """
    out: list[tuple[str, str, nn.Module]] = []
    seen: set[int] = set()

    def visit(prefix: str, raw: str, mod: nn.Module) -> None:
        if id(mod) in seen:
            return
        seen.add(id(mod))
        out.append((prefix, raw, mod))
        inner = _wrapped(mod)
        for child_name, child in mod._modules.items():
            if child is None:
                continue
            child_raw = raw + "." + child_name if raw else child_name
            if inner is not None and child is inner:
                visit(prefix, child_raw, child)
            else:
                visit(prefix + "." + child_name if prefix else child_name, child_raw, child)

    visit("", "", model)
    return out


def _walk(model: nn.Module) -> Iterator[tuple[str, str, Tensor, bool]]:
    """Every (canonical name, state_dict key, tensor, is_parameter) of the persistent state of the
    unwrapped model, tied tensors under each of their names.

    Raises:
        ConfigError: two different tensors have one canonical name.
    """
    owner: dict[str, Tensor] = {}
    for mod_name, raw, mod in _named_modules(unwrap_model(model)):
        prefix = mod_name + "." if mod_name else ""
        raw_prefix = raw + "." if raw else ""
        for pname, p in mod._parameters.items():
            if p is not None:
                yield _claim(owner, prefix + pname, p), raw_prefix + pname, p, True
        for bname, b in mod._buffers.items():
            if b is not None and bname not in mod._non_persistent_buffers_set:
                yield _claim(owner, prefix + bname, b), raw_prefix + bname, b, False


def _claim(owner: dict[str, Tensor], name: str, t: Tensor) -> str:
    prev = owner.setdefault(name, t)
    if prev is not t:
        raise ConfigError(f"model has two different tensors named {name!r} once wrappers are looked "
                          "through; expected a model whose parameters and buffers have distinct names")
    return name


def state_dict_names(model: nn.Module) -> dict[str, str]:
    """``unwrap_model(model).state_dict()`` key -> canonical name, for parameters and persistent buffers."""
    return {raw: name for name, raw, _, _ in _walk(model)}


def named_tensors(model: nn.Module) -> dict[str, tuple[Tensor, bool]]:
    """Canonical name -> (tensor, is_parameter) for parameters and *persistent* buffers.

    Names are those of the unwrapped model (wrappers -- DDP, DataParallel, ``torch.compile`` --
    recognised by type, add no component). Shared (tied) tensors appear once, under their first
    name (see :func:`tied_names` for the others).

    Returns:
        A dict in ``state_dict`` order: canonical name -> (tensor, True for a parameter).

    Raises:
        ConfigError: two different tensors have one name.

    Examples:
        >>> import torch, weightavg
        >>> m = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
        >>> [(k, is_param) for k, (t, is_param) in weightavg.named_tensors(m).items() if k.startswith("1.")]
        ... # doctest: +NORMALIZE_WHITESPACE
        [('1.weight', True), ('1.bias', True), ('1.running_mean', False), ('1.running_var', False),
         ('1.num_batches_tracked', False)]
    """
    out: dict[str, tuple[Tensor, bool]] = {}
    seen: set[int] = set()
    for name, _, t, is_param in _walk(model):
        if id(t) not in seen:
            seen.add(id(t))
            out[name] = (t, is_param)
    return out


def tied_names(model: nn.Module) -> dict[str, list[str]]:
    """First name of each shared (tied) tensor -> its other names (in :func:`named_tensors` order)."""
    first: dict[int, str] = {}
    out: dict[str, list[str]] = {}
    for name, _, t, _ in _walk(model):
        head = first.setdefault(id(t), name)
        if head != name:
            out.setdefault(head, []).append(name)
    return out


def source_tensors(source: Source, what: str = "model") -> dict[str, tuple[Tensor, bool]]:
    """Canonical name -> (tensor, is_parameter) of a module or a mapping (mapping: floating = param).

    A module's FSDP2 units are resharded first, and FSDP1 / DeepSpeed ZeRO-3 refused (see
    :func:`weightavg._sharded.prepare_module`).
    """
    if isinstance(source, nn.Module):
        from ._sharded import prepare_module

        prepare_module(source)
        return named_tensors(source)
    if isinstance(source, Mapping):
        out: dict[str, tuple[Tensor, bool]] = {}
        for k, v in source.items():
            if not isinstance(v, Tensor):
                continue
            name = canonical_name(str(k))
            if name in out:
                first = next(str(j) for j in source if canonical_name(str(j)) == name)
                raise ConfigError(
                    f"{what} has keys {first!r} and {str(k)!r} that both name {name!r} once wrapper "
                    "prefixes ('module.', '_orig_mod.') are removed; expected keys with distinct "
                    "canonical names (pass the module itself, whose wrappers are recognised by type)")
            out[name] = (v, v.is_floating_point())
        return out
    raise bad_arg(what, type(source).__name__, "a torch.nn.Module or a mapping of name -> Tensor")
