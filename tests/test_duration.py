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


# ----------------------------------------------------------------------------- issue #17 gap 7, issue #9 item 14


@pytest.mark.parametrize("text", ["10e308ep", "1e999ba", "1e400ba", "1e400sp", "2e308tok", "1e19ba",
                                  "9223372036854775808ba", "1e400dur"])
def test_non_finite_and_absurd_values_raise_a_named_error(text: str) -> None:
    # '10e308ep' used to parse as Duration(inf, 'ep'); '1e400ba' raised a bare OverflowError
    with pytest.raises(ConfigError, match=rf"swa_start={text!r} is invalid: expected "):
        Duration.parse(text, name="swa_start")


def test_largest_step_count_is_accepted() -> None:
    assert Duration.parse("9223372036854775807ba").value == 2**63 - 1
    assert Duration.parse("9007199254740993sp").value == 2**53 + 1  # exact, not rounded through float
    assert Duration.parse(2**63 - 1).value == 2**63 - 1
    assert Duration.parse("1e-400ba").value == 0  # underflows to zero, no error
    assert Duration.parse("5e-1ep").value == 0.5
    assert Duration.parse("2E+2ba").value == 200


@pytest.mark.parametrize(("value", "unit", "match"), [
    (float("inf"), "ep", r"value=inf is invalid: expected a finite number at most 9223372036854775807"),
    (float("inf"), "ba", r"value=inf is invalid: expected a finite number"),
    (2**63, "ba", r"value=9223372036854775808 is invalid"),
    (10**400, "tok", r"is invalid: expected a finite number"),
    (float("nan"), "ep", r"value=nan is invalid: expected a non-negative number"),
    (-1, "ba", r"value=-1 is invalid: expected a non-negative number"),
    (-0.5, "ep", r"value=-0\.5"),
    (True, "ba", r"value=True is invalid"),
    ("5", "ba", r"value='5' is invalid"),
    (2.5, "sp", r"value=2\.5 is invalid: expected a whole number of sp"),
    (1.5, "tok", r"whole number of tok"),
    (1.01, "dur", r"value=1\.01 is invalid: expected a fraction in \[0, 1\] for unit 'dur'"),
    (1, "epochs", r"unit='epochs' is invalid: expected one of 'ep', 'ba', 'sp', 'tok', 'dur'"),
])
def test_duration_built_directly_is_validated(value: object, unit: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        Duration(value, unit)  # type: ignore[arg-type]


def test_duration_built_directly_normalises_integer_units() -> None:
    d = Duration(3.0, "sp")
    assert d.value == 3 and type(d.value) is int and d == Duration(3, "sp")
    assert Duration(2**63 - 1, "ba").value == 2**63 - 1  # an int is not rounded through float
    assert Duration(0.5, "ep").value == 0.5 and Duration(1, "dur").value == 1
    assert Duration(0, "dur").value == 0 and Duration(0.0, "ep").value == 0.0
    assert str(Duration(0.25, "ep")) == "0.25ep" and str(Duration(2.0, "ep")) == "2ep"
    assert str(Duration(7, "tok")) == "7tok"


def test_to_steps_divides_samples_and_tokens_down_to_an_int() -> None:
    # '//' not '/': 100 samples at 32 per step is 3 whole steps, an int
    steps = Duration.parse("100sp").to_steps(samples_per_step=32)
    assert steps == 3 and type(steps) is int
    steps = Duration.parse("1000tok").to_steps(tokens_per_step=300)
    assert steps == 3 and type(steps) is int
    assert Duration.parse("96sp").to_steps(samples_per_step=32) == 3
    assert Duration.parse("31sp").to_steps(samples_per_step=32) == 0


def test_to_steps_rounds_epochs_and_fractions() -> None:
    assert Duration.parse("0.5ep").to_steps(steps_per_epoch=7) == 4  # round(3.5) → 4 (banker's: 4)
    assert Duration.parse("0.3ep").to_steps(steps_per_epoch=10) == 3
    assert Duration.parse("0.26dur").to_steps(total_steps=10) == 3
    assert Duration.parse("0.24dur").to_steps(total_steps=10) == 2
    assert Duration.parse("1dur").to_steps(total_steps=17) == 17
    assert Duration.parse("0dur").to_steps(total_steps=17) == 0
    assert type(Duration.parse("0.5ep").to_steps(steps_per_epoch=7)) is int
    assert Duration.parse("4ba").to_steps(steps_per_epoch=0, total_steps=0) == 4  # batches need nothing
    # a count of 1 is a count
    assert Duration.parse("3ep").to_steps(steps_per_epoch=1) == 3
    assert Duration.parse("5sp").to_steps(samples_per_step=1) == 5
    assert Duration.parse("1dur").to_steps(total_steps=1) == 1


@pytest.mark.parametrize(("text", "kwargs", "arg"), [
    ("2ep", {"steps_per_epoch": 0}, "steps_per_epoch"),
    ("2ep", {"steps_per_epoch": -3}, "steps_per_epoch"),
    ("2ep", {"total_steps": 100}, "steps_per_epoch"),
    ("0.5dur", {"total_steps": 0}, "total_steps"),
    ("64sp", {"samples_per_step": 0}, "samples_per_step"),
    ("64sp", {"tokens_per_step": 8}, "samples_per_step"),
    ("64tok", {}, "tokens_per_step"),
])
def test_to_steps_without_the_needed_count_raises(text: str, kwargs: dict, arg: str) -> None:
    with pytest.raises(ConfigError, match=rf"cannot convert {text} to steps: the loop does not know {arg}"):
        Duration.parse(text).to_steps(**kwargs)


@pytest.mark.parametrize(("text", "unit"), [
    ("3 epoch", "ep"), ("3epochs", "ep"), ("3batch", "ba"), ("3 batches", "ba"), ("3step", "ba"),
    ("3steps", "ba"), ("3sample", "sp"), ("3samples", "sp"), ("3token", "tok"), ("3TOKENS", "tok"),
    (".5ep", "ep"), ("3.ep", "ep"),
])
def test_unit_aliases(text: str, unit: str) -> None:
    d = Duration.parse(text)
    assert d.unit == unit
    assert d.value == (0.5 if text.startswith(".5") else 3)


def test_parse_keeps_a_duration_and_counts_plain_ints_in_int_unit() -> None:
    d = Duration(4, "sp")
    assert Duration.parse(d) is d
    assert Duration.parse(7, int_unit="ep") == Duration(7, "ep")
    assert Duration.parse(0) == Duration(0, "ba")
    for bad in (-1, -2):
        with pytest.raises(ConfigError, match=rf"start={bad} is invalid: expected a non-negative int"):
            Duration.parse(bad, name="start")
    with pytest.raises(ConfigError, match=r"start=False is invalid: expected a duration"):
        Duration.parse(False, name="start")
    with pytest.raises(ConfigError, match=r"start=2\.0 is invalid: expected a duration"):
        Duration.parse(2.0, name="start")
    with pytest.raises(ConfigError, match=r"start='1\.5dur' is invalid: expected a fraction in \[0, 1\] for unit 'dur'\.$"):  # noqa: E501
        Duration.parse("1.5dur", name="start")
    with pytest.raises(ConfigError, match=r"start='5xx' is invalid: expected <number><unit>"):
        Duration.parse("5xx", name="start")
