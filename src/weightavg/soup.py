"""Model soups (Wortsman et al., ICML 2022): average fine-tuned models that share a start.

:func:`greedy_soup` scores every ingredient on its own, then walks them from best to worst and
keeps one only if the soup's score does not drop with it. The soup is a uniform average of the
kept ingredients, formed by the engine (an :class:`~weightavg.Averager` with the ``mean`` rule:
one model in memory for the soup, one for its backup, one being tried).
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Union

import torch
from torch import Tensor

from ._engine import Averager
from ._errors import ConfigError, NonFiniteError, bad_arg
from ._rules import mean

__all__ = ["Soup", "greedy_soup"]

Ingredient = Union[str, "os.PathLike[str]", Mapping[str, Tensor]]
Evaluate = Callable[[dict[str, Tensor]], float]


@dataclass
class Soup:
    """The result of :func:`greedy_soup`.

    Attributes:
        state_dict: the soup's weights (canonical names, each tensor in its own dtype).
        members: indices (into the inputs, as given) of the kept ingredients, in the order added.
        names: a name per input (its path, or ``"#i"`` for an in-memory state dict).
        scores: each input's own score, in input order.
        soup_score: the final soup's score.
        history: one row per ingredient tried after the first: index, score with it, kept.

    Examples:
        >>> import torch, weightavg
        >>> soup = weightavg.greedy_soup([{"w": torch.ones(2)}, {"w": torch.zeros(2)}],
        ...                              lambda sd: -float((sd["w"] - 0.5).abs().sum()))
        >>> soup.members, soup.state_dict["w"]
        ([0, 1], tensor([0.5000, 0.5000]))
    """

    state_dict: dict[str, Tensor]
    members: list[int]
    names: list[str]
    scores: list[float]
    soup_score: float
    history: list[dict[str, Any]] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """JSON-ready description (everything but the tensors).

        Returns:
            A dict with ``members`` (names of the kept inputs, in the order added), ``scores``
            (name -> own score), ``soup_score`` and ``history``.

        Examples:
            >>> import torch, weightavg
            >>> soup = weightavg.greedy_soup([{"w": torch.ones(1)}], lambda sd: float(sd["w"]))
            >>> soup.summary()
            {'members': ['#0'], 'scores': {'#0': 1.0}, 'soup_score': 1.0, 'history': []}
        """
        return {"members": [self.names[i] for i in self.members],
                "scores": dict(zip(self.names, self.scores, strict=True)),
                "soup_score": self.soup_score, "history": self.history}


def _load(item: Ingredient, key: str | None) -> dict[str, Tensor]:
    if isinstance(item, Mapping):
        return {str(k): v for k, v in item.items() if isinstance(v, Tensor)}
    from .cli._average import load_checkpoint  # weights_only / safetensors readers

    return load_checkpoint(item, key)


def _score(evaluate: Evaluate, sd: dict[str, Tensor], what: str) -> float:
    value = evaluate(sd)
    if isinstance(value, Tensor) and value.numel() == 1:
        value = float(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise bad_arg(f"evaluate({what})", value, "a finite number (higher is better)")
    return float(value)


@torch.no_grad()
def greedy_soup(
    models: Sequence[Ingredient],
    evaluate: Evaluate,
    *,
    key: str | None = None,
) -> Soup:
    """Greedy soup: ingredients sorted by their own score, each kept if the soup's score does not drop.

    Args:
        models: checkpoint paths (torch files read with ``weights_only=True``, safetensors, Hugging
            Face directories) or state dicts, all with the same names and shapes.
        evaluate: ``evaluate(state_dict) -> score``, higher is better (e.g. held-out accuracy).
            It receives canonical names (``module.``/``_orig_mod.`` prefixes removed).
        key: entry holding the weights in nested torch checkpoints.

    Returns:
        A :class:`Soup`.

    Raises:
        ConfigError: no model, ``evaluate`` not callable or returning a non-finite or non-numeric
            score, or the best ingredient holding NaN/Inf.
        MismatchError: ingredients that do not pair by name and shape.
        NonFiniteError: a later ingredient holds NaN/Inf.
        WeightAvgError: an unreadable checkpoint (its ``CheckpointError`` subclass) or a refused
            path (``InputError``).

    Examples:
        >>> import torch, weightavg
        >>> target = torch.tensor([1.0, 0.0])
        >>> def score(sd: dict) -> float:  # higher is better
        ...     return -float((sd["w"] - target).norm())
        >>> models = [{"w": torch.tensor([1.0, 0.2])}, {"w": torch.tensor([1.0, -0.2])},
        ...           {"w": torch.tensor([5.0, 5.0])}]
        >>> soup = weightavg.greedy_soup(models, score)
        >>> soup.members  # the far-off third ingredient would lower the score: left out
        [0, 1]
        >>> soup.state_dict["w"]
        tensor([1., 0.])
    """
    if isinstance(models, (str, os.PathLike, Mapping)) or not isinstance(models, Sequence) or not models:
        raise bad_arg("models", type(models).__name__, "a non-empty sequence of checkpoint paths or state dicts")
    if not callable(evaluate):
        raise bad_arg("evaluate", evaluate, "a callable state_dict -> score")
    names = [os.fspath(m) if isinstance(m, (str, os.PathLike)) else f"#{i}" for i, m in enumerate(models)]
    scores = []
    for i, m in enumerate(models):
        scores.append(_score(evaluate, _load(m, key), names[i]))
    order = sorted(range(len(models)), key=lambda i: -scores[i])  # stable: ties keep input order
    first = _load(models[order[0]], key)
    acc_dtype = torch.float64 if any(t.dtype == torch.float64 for t in first.values()) else torch.float32
    avg = Averager(first, mean(), dtype=acc_dtype)
    try:
        avg.update(first)
    except NonFiniteError as err:
        raise ConfigError(f"{names[order[0]]}: holds NaN or Inf ({err})") from err
    del first
    members = [order[0]]
    current = scores[order[0]]
    history: list[dict[str, Any]] = []
    for i in order[1:]:
        backup = copy.deepcopy(avg.state_dict())  # the soup without the candidate
        avg.update(_load(models[i], key))
        with_it = _score(evaluate, avg.export_state_dict(), f"soup + {names[i]}")
        kept = with_it >= current
        history.append({"input": names[i], "own_score": scores[i], "soup_score_with_it": with_it, "kept": kept})
        if kept:
            members.append(i)
            current = with_it
        else:
            avg.load_state_dict(backup)
        del backup
    return Soup(avg.export_state_dict(), members, names, scores, current, history)
