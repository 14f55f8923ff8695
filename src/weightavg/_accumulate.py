"""Engine-owned weighted sums ``Σ cᵢ · xᵢ`` of named tensor sources, with signed coefficients.

This is part of the engine: the post-hoc EMA reconstruction (its least-squares coefficients are
signed), the windowed averages (a running sum that adds the newest snapshot and subtracts the
evicted one, or a weighted pass over the window) and weighted checkpoint averages all accumulate
through :class:`WeightedSum`, which keeps its sum in an :class:`~weightavg.Averager` (one flat
buffer per (device, dtype) group, pairing by name, non-finite checks, checkpointing) driven by one
in-place rule. No other module does averaging arithmetic of its own.

The rule folds ``xᵢ`` in as ``acc += (cᵢ / c₀) · xᵢ`` (one ``_foreach_add_`` per storage group),
where ``c₀`` is the coefficient of the first non-zero term (that update copies ``x₀`` into ``acc``);
reading multiplies by ``c₀`` once. Only floating-point tensors are summed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from ._engine import Averager
from ._errors import StateError, bad_arg
from ._rules import inplace

__all__ = ["WeightedSum", "weighted_average"]

FORMAT = "weightavg.WeightedSum"


class WeightedSum:
    """``Σ cᵢ · xᵢ`` over sources ``xᵢ`` (mappings name -> floating tensor) that pair by name.

    Args:
        like: a mapping name -> tensor giving the names, shapes and dtypes summed (its floating
            tensors; others are ignored).
        dtype: accumulation dtype (default float64).
        device: where the sum lives (default: with each tensor of ``like``).
        nonfinite: the :class:`~weightavg.Averager` policy for sources holding NaN/Inf.
    """

    def __init__(
        self,
        like: Mapping[str, Tensor],
        *,
        dtype: torch.dtype = torch.float64,
        device: torch.device | str | None = None,
        nonfinite: str = "raise",
    ) -> None:
        floats = _floating(like)
        if not floats:
            raise bad_arg("like", sorted(like)[:5], "at least one floating-point tensor")
        self._coeff = 0.0  # the pending term's cᵢ / c₀ (read by the rule)
        self._scale = 0.0  # c₀ (0: nothing summed yet)
        ref = self

        def fold(acc: Sequence[Tensor], new: Sequence[Tensor], n: int) -> None:
            torch._foreach_add_(list(acc), list(new), alpha=ref._coeff)

        self._avg = Averager(floats, inplace(fold, name="weighted_sum"), dtype=dtype, device=device,
                             nonfinite=nonfinite)  # type: ignore[arg-type]
        self.terms = 0

    @property
    def names(self) -> list[str]:
        """Canonical names of the summed tensors."""
        return self._avg.names

    @torch.no_grad()
    def add(self, source: Mapping[str, Tensor], coeff: float) -> None:
        """``sum += coeff · source`` (floating tensors of ``source``, paired by name).

        Raises:
            ConfigError: ``coeff`` is not a finite number.
            MismatchError: the source's names or shapes differ from ``like``'s.
            NonFiniteError: the source holds NaN/Inf (with ``nonfinite="raise"``).
        """
        if isinstance(coeff, bool) or not isinstance(coeff, (int, float)) or not math.isfinite(coeff):
            raise bad_arg("coeff", coeff, "a finite number")
        self.terms += 1
        if coeff == 0.0:
            return
        floats = _floating(source)
        if self._scale == 0.0:
            self._scale = float(coeff)
            self._avg.reset()
            self._avg.update(floats)  # the first term copies: acc = x₀ (the sum is c₀ · acc)
            return
        self._coeff = float(coeff) / self._scale
        self._avg.update(floats)

    @property
    def empty(self) -> bool:
        """True while no non-zero term has been added."""
        return self._scale == 0.0

    @torch.no_grad()
    def result(self, factor: float = 1.0, *, dtypes: Mapping[str, torch.dtype] | None = None,
               device: torch.device | str | None = None) -> dict[str, Tensor]:
        """``factor · Σ cᵢ xᵢ`` as fresh tensors (each in ``dtypes[name]`` if given).

        Raises:
            StateError: nothing was added (or every coefficient was zero).
        """
        if self._scale == 0.0:
            raise StateError("the weighted sum holds no term yet (every coefficient was zero)")
        scale = factor * self._scale
        out: dict[str, Tensor] = {}
        for name, acc in self._avg.averaged_tensors().items():
            dt = dtypes[name] if dtypes is not None and name in dtypes else acc.dtype
            t = acc.mul(scale)
            out[name] = t.to(dtype=dt, device=device) if (dt != t.dtype or device is not None) else t
        return out

    def reset(self) -> None:
        """Forget every term."""
        self._avg.reset()
        self._scale = 0.0
        self.terms = 0

    def state_dict(self) -> dict[str, Any]:
        """The sum's exact state (tensors are views of the live sum)."""
        return {"format": FORMAT, "scale": self._scale, "terms": self.terms,
                "averager": self._avg.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`.

        Raises:
            StateError: not a WeightedSum state.
            MismatchError: other names or shapes.
        """
        if not isinstance(state, Mapping) or state.get("format") != FORMAT:
            raise StateError("state is not a weightavg WeightedSum state (missing 'format' key)")
        self._avg.load_state_dict(state["averager"])
        self._scale = float(state["scale"])
        self.terms = int(state["terms"])


def _floating(source: Mapping[str, Tensor]) -> dict[str, Tensor]:
    if not isinstance(source, Mapping):
        raise bad_arg("source", type(source).__name__, "a mapping of name -> Tensor")
    return {k: v for k, v in source.items() if isinstance(v, Tensor) and v.is_floating_point()}


@torch.no_grad()
def weighted_average(
    sources: Sequence[Mapping[str, Tensor]] | Any,
    weights: Sequence[float],
    *,
    dtype: torch.dtype = torch.float64,
) -> dict[str, Tensor]:
    """``Σ wᵢ xᵢ / Σ wᵢ`` of floating tensors, streaming (``sources`` may be a lazy iterable).

    Tensors come back in each source tensor's own dtype; non-floating tensors are taken from the
    last source.

    Raises:
        ConfigError: no source, weights of another length, a negative or non-finite weight, or a
            zero total.
    """
    ws = [float(w) for w in weights]
    if not ws or any(not math.isfinite(w) or w < 0 for w in ws) or sum(ws) <= 0:
        raise bad_arg("weights", list(weights), "non-negative finite numbers with a positive sum")
    total = math.fsum(ws)
    acc: WeightedSum | None = None
    last: Mapping[str, Tensor] | None = None
    count = 0
    for src, w in zip(sources, ws, strict=False):
        if acc is None:
            acc = WeightedSum(src, dtype=dtype)
        acc.add(src, w)
        last = src
        count += 1
    if count != len(ws) or acc is None or last is None:
        raise bad_arg("weights", len(ws), f"one weight per source ({count} sources)")
    dtypes = {k: v.dtype for k, v in last.items() if isinstance(v, Tensor)}
    out = acc.result(1.0 / total, dtypes=dtypes)
    for k, v in last.items():
        if isinstance(v, Tensor) and not v.is_floating_point():
            out[k] = v.clone()
    return out
