"""Durations in training time: '1ep', '5ba', '0.7dur', '100sp', '2000tok' (Composer's grammar)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal, Union

from ._errors import ConfigError, bad_arg

__all__ = ["Duration", "Unit"]

Unit = Literal["ep", "ba", "sp", "tok", "dur"]
_UNITS: dict[str, Unit] = {
    "ep": "ep", "epoch": "ep", "epochs": "ep",
    "ba": "ba", "batch": "ba", "batches": "ba", "step": "ba", "steps": "ba",
    "sp": "sp", "sample": "sp", "samples": "sp",
    "tok": "tok", "token": "tok", "tokens": "tok",
    "dur": "dur",
}
_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)(?:e([+-]?\d+))?\s*([a-z]+)\s*$")

DurationLike = Union["Duration", str, int]

#: the largest value a Duration may hold in any unit: step counters are int64.
MAX_VALUE = 2**63 - 1


@dataclass(frozen=True, order=False)
class Duration:
    """An amount of training time: ``value`` in ``unit``.

    ``unit`` is ``"ep"`` (epochs), ``"ba"`` (batches = optimizer steps), ``"sp"`` (samples),
    ``"tok"`` (tokens) or ``"dur"`` (fraction of the whole run, in [0, 1]). Integer units hold
    whole numbers; ``"ep"`` may be fractional (``'0.5ep'``). Every value is finite, non-negative and
    at most ``2**63 - 1``; building one directly validates as :meth:`parse` does.

    Raises:
        ConfigError: an unknown unit, or a value that is negative, NaN, infinite, above ``2**63 - 1``,
            above 1 for ``"dur"``, or fractional for ``"ba"``/``"sp"``/``"tok"``.

    Examples:
        >>> Duration.parse("5ba")
        Duration(value=5, unit='ba')
        >>> Duration.parse("0.7dur").value
        0.7
    """

    value: float
    unit: Unit

    def __post_init__(self) -> None:
        if self.unit not in ("ep", "ba", "sp", "tok", "dur"):
            raise bad_arg("unit", self.unit, "one of 'ep', 'ba', 'sp', 'tok', 'dur'")
        v = self.value
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0 or v != v:
            raise bad_arg("value", v, "a non-negative number")
        if v > MAX_VALUE:  # also catches inf; a huge int never reaches float() (OverflowError)
            raise bad_arg("value", v, f"a finite number at most {MAX_VALUE} (2**63 - 1, the largest step count)")
        if self.unit == "dur" and v > 1:
            raise bad_arg("value", v, "a fraction in [0, 1] for unit 'dur'")
        if self.unit in ("ba", "sp", "tok"):
            if isinstance(v, float) and not v.is_integer():
                raise bad_arg("value", v, f"a whole number of {self.unit}")
            object.__setattr__(self, "value", int(v))

    @classmethod
    def parse(cls, text: DurationLike, *, name: str = "duration", int_unit: Unit = "ba") -> Duration:
        """Parse ``'1ep'``, ``'5ba'``, ``'0.7dur'``, ``'100sp'``, ``'2000tok'`` or a plain int.

        Args:
            text: the duration; a plain int counts ``int_unit`` (batches by default).
            name: the argument's name, used in error messages.
            int_unit: unit of a plain int.

        Returns:
            A :class:`Duration` (``text`` itself when it is one).

        Raises:
            ConfigError: unknown unit, malformed number, negative, non-finite or absurd value
                (above ``2**63 - 1``), 'dur' above 1, a fractional count of an integer unit.
        """
        if isinstance(text, Duration):
            return text
        if isinstance(text, bool):
            raise bad_arg(name, text, "a duration such as '1ep', '5ba', '0.7dur' or an int")
        if isinstance(text, int):
            if text < 0:
                raise bad_arg(name, text, "a non-negative int")
            return cls(text, int_unit)
        if not isinstance(text, str):
            raise bad_arg(name, text, "a duration such as '1ep', '5ba', '0.7dur' or an int")
        m = _RE.match(text.lower())
        if not m or m.group(3) not in _UNITS:
            raise bad_arg(name, text, "<number><unit> with unit one of ep, ba, sp, tok, dur "
                                      "(e.g. '1ep', '5ba', '0.7dur', '100sp', '2000tok')")
        # a plain integer stays exact (float() would round counts above 2**53); anything else is one
        # float() of the whole literal: '1e400' becomes inf (refused by __post_init__) instead of
        # raising OverflowError, and '1e-400' becomes 0
        number, exponent = m.group(1), m.group(2)
        value: float = int(number) if number.isdigit() and not exponent else float(
            number + (f"e{exponent}" if exponent else ""))
        try:
            return cls(value, _UNITS[m.group(3)])
        except ConfigError as err:
            raise bad_arg(name, text, str(err).split("expected ", 1)[-1].rstrip(".")) from err

    def __str__(self) -> str:
        v = self.value
        text = str(int(v)) if float(v).is_integer() else repr(float(v))
        return f"{text}{self.unit}"

    def to_steps(self, *, steps_per_epoch: int | None = None, total_steps: int | None = None,
                 samples_per_step: int | None = None, tokens_per_step: int | None = None) -> int:
        """This duration in optimizer steps, given what the loop knows.

        Returns:
            The number of optimizer steps: ``ep`` and ``dur`` rounded to the nearest step, ``sp``
            and ``tok`` rounded down.

        Raises:
            ConfigError: the loop cannot count this unit (e.g. 'dur' without ``total_steps``).

        Examples:
            >>> from weightavg import Duration
            >>> Duration.parse("1.5ep").to_steps(steps_per_epoch=100)
            150
            >>> Duration.parse("0.75dur").to_steps(total_steps=1000)
            750
            >>> Duration.parse("1000sp").to_steps(samples_per_step=64)
            15
        """
        need = {"ep": ("steps_per_epoch", steps_per_epoch), "dur": ("total_steps", total_steps),
                "sp": ("samples_per_step", samples_per_step), "tok": ("tokens_per_step", tokens_per_step)}
        if self.unit == "ba":
            return int(self.value)
        arg, known = need[self.unit]
        if known is None or known <= 0:
            raise ConfigError(f"cannot convert {self} to steps: the loop does not know {arg} "
                              f"(give max_steps/total steps, steps per epoch, or use another unit)")
        if self.unit in ("ep", "dur"):
            return round(self.value * known)
        return int(self.value) // known
