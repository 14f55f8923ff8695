"""Policy states in trainers' distributed checkpoints (shared by the Lightning and HF front ends).

A policy's :meth:`~weightavg.AveragingPolicy.state_dict` nests the averager's, whose averages are
DTensors on a sharded (FSDP2) model: each rank holds only its own shards. A trainer that writes
the callbacks' state from rank 0 alone (Lightning's ``meta.pt``) would lose the other ranks'
shards, so the front ends split the state in two: the tensors, under flat keys, go through
``torch.distributed.checkpoint`` (each rank writes its shards; resharded on load), and the rest
(counters, configuration), with ``None`` where the tensors were, stays in the trainer's own
per-run state. On resume the policy is begun first (so that its averager exists with the model's
sharding), ``dcp.load`` fills its live tensors in place, and the counters are applied.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

from ._errors import MismatchError
from ._sharded import is_dtensor

__all__ = ["any_dtensor", "flat_tensors", "rank_fixed", "strip_tensors", "with_tensors"]

Path = tuple[str, ...]


def _walk(tree: Any, path: Path, out: list[tuple[Path, Tensor]]) -> None:
    if isinstance(tree, Tensor):
        out.append((path, tree))
    elif isinstance(tree, Mapping):
        for k, v in tree.items():
            _walk(v, (*path, str(k)), out)


def _tensors(tree: Any) -> list[tuple[Path, Tensor]]:
    out: list[tuple[Path, Tensor]] = []
    _walk(tree, (), out)
    return out


def any_dtensor(tree: Any) -> bool:
    """True when a nested mapping holds a DTensor (a sharded policy's state)."""
    return any(is_dtensor(t) for _, t in _tensors(tree))


def flat_tensors(prefix: str, tree: Any) -> dict[str, Tensor]:
    """The tensors of a nested mapping under flat keys ``<prefix>.<k1>.<k2>...`` (DCP's own joining)."""
    return {".".join((prefix, *p)): t for p, t in _tensors(tree)}


def strip_tensors(tree: Any) -> Any:
    """A copy of the nested mappings with every tensor replaced by ``None``."""
    if isinstance(tree, Tensor):
        return None
    if isinstance(tree, Mapping):
        return {k: strip_tensors(v) for k, v in tree.items()}
    return tree


def with_tensors(skeleton: Any, prefix: str, live: Any, flat: Mapping[str, Tensor]) -> Any:
    """``skeleton`` (from :func:`strip_tensors`) with the tensors of ``flat`` put back at the paths
    the live state ``live`` has them.

    Raises:
        MismatchError: the saved state has no place for one of the live tensors (another model
            or another averager configuration).
    """
    def copy(t: Any) -> Any:
        return {k: copy(v) for k, v in t.items()} if isinstance(t, Mapping) else t

    out = copy(skeleton)
    for path, _ in _tensors(live):
        node = out
        for k in path[:-1]:
            if not isinstance(node, dict) or not isinstance(node.get(k), dict):
                raise MismatchError(f"the checkpoint's weight-averaging state has no {'.'.join((prefix, *path))!r}: "
                                    "it was saved for another model or averager configuration")
            node = node[k]
        if path[-1] not in node:
            raise MismatchError(f"the checkpoint's weight-averaging state has no {'.'.join((prefix, *path))!r}: "
                                "it was saved for another model or averager configuration")
        node[path[-1]] = flat[".".join((prefix, *path))]
    return out


def rank_fixed(state: Any, live: Any) -> Any:
    """``state`` whose averager ``"rank"`` is the live one: after ``dcp.load`` the shards are this
    rank's own, whichever rank wrote the counters."""
    if isinstance(state, dict) and isinstance(live, Mapping):
        av, lav = state.get("averager"), live.get("averager")
        if isinstance(av, dict) and isinstance(lav, Mapping) and "rank" in lav:
            av["rank"] = lav["rank"]
    return state
