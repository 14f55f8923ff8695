"""Duration parsing (Composer's grammar)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from weightavg import ConfigError, Duration


@pytest.mark.parametrize(
    ("text", "value", "unit"),
    [("1ep", 1, "ep"), ("5ba", 5, "ba"), ("0.7dur", 0.7, "dur"), ("100sp", 100, "sp"),
     ("2000tok", 2000, "tok"), ("0.5ep", 0.5, "ep"), (" 3 ba ", 3, "ba"), ("1e3ba", 1000, "ba"),
     (12, 12, "ba"), ("1.0dur", 1.0, "dur")],
)
def test_parse(text, value, unit) -> None:
    d = Duration.parse(text)
    assert (d.value, d.unit) == (value, unit)


@pytest.mark.parametrize(
    ("text", "match"),
    [("3xx", r"duration='3xx' is invalid: expected <number><unit>"), ("ep", "ep"), ("-1ep", "-1ep"),
     ("1.5dur", "fraction"), ("2.5ba", "whole"), (-3, "non-negative"), (1.5, "1.5"), (True, "True"),
     (None, "None")],
)
def test_bad_durations(text, match) -> None:
    with pytest.raises(ConfigError, match=match):
        Duration.parse(text)


def test_error_names_argument() -> None:
    with pytest.raises(ConfigError, match=r"swa_start='3xx'"):
        Duration.parse("3xx", name="swa_start")


def test_to_steps() -> None:
    assert Duration.parse("2ep").to_steps(steps_per_epoch=50) == 100
    assert Duration.parse("0.75dur").to_steps(total_steps=400) == 300
    assert Duration.parse("256sp").to_steps(samples_per_step=32) == 8
    assert Duration.parse("7ba").to_steps() == 7
    with pytest.raises(ConfigError, match="total_steps"):
        Duration.parse("0.5dur").to_steps(steps_per_epoch=10)


@given(st.integers(min_value=0, max_value=10**9), st.sampled_from(["ep", "ba", "sp", "tok"]))
def test_round_trip_through_str(n: int, unit: str) -> None:
    d = Duration.parse(f"{n}{unit}")
    assert Duration.parse(str(d)) == d
