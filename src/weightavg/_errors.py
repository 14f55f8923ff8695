"""Exceptions raised by weightavg. Every one derives from :class:`WeightAvgError`."""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "MismatchError",
    "NonFiniteError",
    "StateError",
    "WeightAvgError",
]


class WeightAvgError(Exception):
    """Base class of every error weightavg raises on purpose.

    Examples:
        >>> import weightavg
        >>> try:
        ...     weightavg.ema(decay=1.5)
        ... except weightavg.WeightAvgError as e:
        ...     print(type(e).__name__)
        ConfigError
    """


class ConfigError(WeightAvgError, ValueError):
    """An argument has a value the function cannot accept.

    Also a :class:`ValueError`. The message names the argument, what came and what was expected.

    Examples:
        >>> import weightavg
        >>> try:
        ...     weightavg.mean(power=3)
        ... except ValueError as e:
        ...     print(e)
        power=3 is invalid: expected 1 (values) or 2 (squares).
    """


class MismatchError(WeightAvgError, ValueError):
    """Two sets of named tensors do not pair up (missing, unexpected or reshaped names).

    Also a :class:`ValueError`; the message lists the names that differ.

    Examples:
        >>> import torch, weightavg
        >>> avg = weightavg.Averager(torch.nn.Linear(2, 1))
        >>> try:
        ...     avg.update(torch.nn.Linear(3, 1))
        ... except weightavg.MismatchError:
        ...     print("refused")
        refused
    """


class NonFiniteError(WeightAvgError, FloatingPointError):
    """An update was refused because its source holds NaN or Inf.

    Also a :class:`FloatingPointError`. Raised under ``nonfinite="raise"`` (the default);
    ``"skip"`` refuses and counts the update instead.

    Examples:
        >>> import torch, weightavg
        >>> m = torch.nn.Linear(2, 1)
        >>> avg = weightavg.Averager(m)
        >>> with torch.no_grad():
        ...     _ = m.weight.fill_(float("nan"))
        >>> try:
        ...     avg.update(m)
        ... except weightavg.NonFiniteError:
        ...     print("refused")
        refused
    """


class StateError(WeightAvgError, RuntimeError):
    """An operation was called in a state that does not allow it (e.g. before any update).

    Also a :class:`RuntimeError`.

    Examples:
        >>> import torch, weightavg
        >>> avg = weightavg.Averager(torch.nn.Linear(2, 1))
        >>> try:
        ...     avg.copy_to(torch.nn.Linear(2, 1))  # before any update: no average yet
        ... except weightavg.StateError:
        ...     print("not yet")
        not yet
    """


def bad_arg(name: str, value: object, expected: str) -> ConfigError:
    """Build the standard message: which argument, what came, what was expected."""
    return ConfigError(f"{name}={value!r} is invalid: expected {expected}.")


def describe_mismatch(
    missing: list[str],
    unexpected: list[str],
    reshaped: list[tuple[str, tuple[int, ...], tuple[int, ...]]],
    *,
    left: str = "averager",
    right: str = "model",
    limit: int = 20,
) -> str:
    """Render a name-pairing failure with the names that differ (at most ``limit`` of each)."""

    def names(items: list[str]) -> str:
        shown = ", ".join(items[:limit])
        return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")

    parts = []
    if missing:
        parts.append(f"{len(missing)} tracked by the {left} but missing from the {right}: {names(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} in the {right} but not tracked by the {left}: {names(unexpected)}")
    if reshaped:
        rows = [f"{n} {tuple(a)} vs {tuple(b)}" for n, a, b in reshaped]
        parts.append(f"{len(reshaped)} with different shapes ({left} vs {right}): {names(rows)}")
    return "; ".join(parts)
