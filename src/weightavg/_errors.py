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
    """Base class of every error weightavg raises on purpose."""


class ConfigError(WeightAvgError, ValueError):
    """An argument has a value the function cannot accept."""


class MismatchError(WeightAvgError, ValueError):
    """Two sets of named tensors do not pair up (missing, unexpected or reshaped names)."""


class NonFiniteError(WeightAvgError, FloatingPointError):
    """An update was refused because its source holds NaN or Inf."""


class StateError(WeightAvgError, RuntimeError):
    """An operation was called in a state that does not allow it (e.g. before any update)."""


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
