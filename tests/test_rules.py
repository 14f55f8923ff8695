"""Rules (how one update combines) against closed forms, through the public API.

Each test pins a behaviour a mutation of ``_rules.py`` would change (issue #17 gaps 2–5): the
expected numbers are written out by hand or computed from the paper's formula here, never by
calling the function under test.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import weightavg as wa
from weightavg import UpdateInfo

GOLDEN = (1 + 5**0.5) / 2
SIGMA_MAX = GOLDEN**-2.5  # sup of σ_rel(γ) = sqrt((γ+1) / ((γ+2)² (γ+3))), reached at γ* = φ − 2


def sigma_rel(gamma: float) -> float:
    """EDM2's relative standard deviation of the power-function profile τ^γ (eq. in Karras et al. 2024)."""
    return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


def run(rule: wa.Rule, values: list[float], steps: list[int] | None = None) -> float:
    """Average the scalar sequence ``values`` (at ``steps``) with ``rule`` through the engine, in float64."""
    lin = nn.Linear(1, 1, bias=False)
    avg = wa.Averager(lin, rule=rule, dtype=torch.float64)
    for i, v in enumerate(values):
        with torch.no_grad():
            lin.weight.fill_(v)
        avg.update(lin, step=None if steps is None else steps[i])
    return float(avg.averaged_tensors()["weight"])


# ----------------------------------------------------------------------------- mean


def test_mean_weight_is_one_over_n_plus_one() -> None:
    r = wa.mean()
    assert [r.weight(UpdateInfo(n, n + 1, 1)) for n in range(4)] == [1.0, 0.5, 1 / 3, 0.25]
    assert r.power == 1 and wa.mean(power=2).power == 2


@pytest.mark.parametrize("power", [0, 3, 1.5, "2"])
def test_mean_power_must_be_1_or_2(power: object) -> None:
    with pytest.raises(wa.ConfigError, match=rf"power={power!r} is invalid: expected 1 \(values\) or 2"):
        wa.mean(power=power)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- ema


def test_ema_constant_decay_closed_form() -> None:
    # avg_1 = x_1; avg_k = d·avg_{k-1} + (1−d)·x_k
    xs = [3.0, -1.0, 2.0, 5.0]
    d = 0.75
    expected = xs[0]
    for x in xs[1:]:
        expected = d * expected + (1 - d) * x
    assert run(wa.ema(d), xs) == pytest.approx(expected, rel=1e-12)
    assert run(wa.ema(smoothing=d), xs) == pytest.approx(expected, rel=1e-12)
    assert wa.ema(0.0).weight(UpdateInfo(3, 4, 1)) == 1.0  # decay 0 follows the model


def test_ema_decay_schedule_runs_and_is_evaluated_at_the_step() -> None:
    # decay(step) = 1 − 1/step: d(2) = .5, d(5) = .8, d(9) = 8/9
    seen: list[int] = []

    def decay(step: int) -> float:
        seen.append(step)
        return 1 - 1 / step

    r = wa.ema(decay=decay)
    assert r.weight(UpdateInfo(0, 1, 1)) == 1.0 and seen == []  # the first update copies, unasked
    assert r.weight(UpdateInfo(1, 5, 4)) == pytest.approx(0.2) and seen == [5]
    # through the engine at steps 1, 2, 5, 9: a = 4; (4+2)/2 = 3; .8·3 + .2·(−2) = 2; (8·2 + 11)/9 = 3
    assert run(wa.ema(decay=decay), [4.0, 2.0, -2.0, 11.0], steps=[1, 2, 5, 9]) == pytest.approx(3.0, rel=1e-12)
    assert wa.ema(decay=decay).config() == {"kind": "ema", "decay": "schedule", "power": 1}


@pytest.mark.parametrize("bad", [1.0, 1.5, -0.01, math.nan, True])
def test_ema_decay_schedule_out_of_range_raises_at_update(bad: float) -> None:
    r = wa.ema(decay=lambda step: bad)
    assert r.weight(UpdateInfo(0, 1, 1)) == 1.0
    with pytest.raises(wa.ConfigError, match=r"decay\(step\)=.* is invalid: expected a number in \[0, 1\)"):
        r.weight(UpdateInfo(1, 2, 1))
    lin = nn.Linear(1, 1)
    avg = wa.Averager(lin, rule=wa.ema(decay=lambda step: bad))
    avg.update(lin)
    with pytest.raises(wa.ConfigError, match=r"decay\(step\)"):
        avg.update(lin)


def test_ema_half_life_is_interval_aware() -> None:
    r = wa.ema(half_life=4)
    # weight = 1 − 2^(−Δ/h): Δ = 4 halves, Δ = 8 quarters the old average
    assert r.weight(UpdateInfo(1, 8, 4)) == pytest.approx(0.5)
    assert r.weight(UpdateInfo(1, 12, 8)) == pytest.approx(0.75)
    assert r.weight(UpdateInfo(1, 5, 1)) == pytest.approx(1 - 2**-0.25)
    assert r.weight(UpdateInfo(0, 5, 5)) == 1.0


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"decay": 1.0}, r"decay=1\.0 is invalid: expected a number in \[0, 1\)"),
    ({"decay": True}, r"decay=True"),
    ({"decay": "0.9"}, r"decay='0\.9'"),
    ({"smoothing": 1.0}, r"smoothing=1\.0 is invalid"),
    ({"smoothing": -0.5}, r"smoothing=-0\.5"),
    ({"half_life": 0}, r"half_life=0 is invalid: expected a positive number"),
    ({"half_life": True}, r"half_life=True"),
    ({"half_life": math.inf}, r"half_life=inf is invalid: expected a finite positive"),
    ({"half_life": math.nan}, r"half_life=nan"),
    ({"decay": 0.9, "smoothing": 0.9}, r"decay/smoothing/half_life=\['decay', 'smoothing'\]"),
    ({"smoothing": 0.9, "half_life": 3}, r"exactly one"),
    ({}, r"decay/smoothing/half_life=None is invalid: expected exactly one"),
    ({"decay": 0.9, "power": 3}, r"power=3"),
])
def test_ema_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(wa.ConfigError, match=match):
        wa.ema(**kwargs)


def test_ema_power_2_is_kept() -> None:
    assert wa.ema(0.5, power=2).power == 2
    assert wa.ema(half_life=2, power=2).power == 2
    assert wa.ema(smoothing=0.5, power=2).config() == {"kind": "ema", "decay": 0.5, "power": 2}
    assert wa.ema(0.5).power == 1


# ----------------------------------------------------------------------------- config and repr


@pytest.mark.parametrize(("rule", "config", "text"), [
    (wa.mean(), {"kind": "mean", "power": 1}, "mean()"),
    (wa.mean(power=2), {"kind": "mean", "power": 2}, "mean(power=2)"),
    (wa.ema(0.9), {"kind": "ema", "decay": 0.9, "power": 1}, "ema(decay=0.9)"),
    (wa.ema(half_life=50), {"kind": "ema", "half_life": 50.0, "power": 1}, "ema(half_life=50)"),
    (wa.ema_warmup(inv_gamma=2, power=0.75, max_decay=0.99, min_decay=0.1, start_step=3),
     {"kind": "ema_warmup", "inv_gamma": 2.0, "warmup_power": 0.75, "max_decay": 0.99, "min_decay": 0.1,
      "start_step": 3, "power": 1},
     "ema_warmup(inv_gamma=2, power=0.75, max_decay=0.99, min_decay=0.1)"),
    (wa.karras_ema(gamma=7), {"kind": "karras_ema", "gamma": 7.0, "power": 1}, "karras_ema(gamma=7)"),
])
def test_config_and_repr(rule: wa.Rule, config: dict, text: str) -> None:
    assert rule.config() == config
    assert repr(rule) == text


def test_custom_and_inplace_config_and_repr() -> None:
    def half(n: int) -> float:
        return 0.5

    def noop(avg: object, new: object, n: int) -> None:
        return None

    assert wa.custom(half).config() == {"kind": "custom", "name": "half"}
    assert repr(wa.custom(half, name="h")) == "custom(h)"
    assert wa.inplace(noop).config() == {"kind": "inplace", "name": "noop"}
    assert repr(wa.inplace(noop, name="n")) == "inplace(n)"
    assert "schedule" in repr(wa.ema(decay=half)) or "half" in repr(wa.ema(decay=half))


@pytest.mark.parametrize(("saved", "loaded"), [
    (wa.ema(0.9), wa.ema(0.99)),
    (wa.mean(), wa.mean(power=2)),
    (wa.ema(half_life=10), wa.ema(half_life=20)),
    (wa.karras_ema(gamma=7), wa.karras_ema(gamma=6)),
    (wa.ema_warmup(), wa.ema_warmup(inv_gamma=2)),
    (wa.ema_warmup(), wa.ema_warmup(start_step=5)),
])
def test_loading_a_state_saved_with_other_rule_parameters_raises(saved: wa.Rule, loaded: wa.Rule) -> None:
    lin = nn.Linear(2, 1)
    a = wa.Averager(lin, rule=saved)
    a.update(lin)
    b = wa.Averager(lin, rule=loaded)
    with pytest.raises(wa.MismatchError, match="state was saved with rules"):
        b.load_state_dict(a.state_dict())
    c = wa.Averager(lin, rule=saved)
    c.load_state_dict(a.state_dict())  # the same parameters load
    assert c.num_updates == 1


# ----------------------------------------------------------------------------- ema_warmup


def warmup_decay(step: int, *, inv_gamma: float = 1.0, power: float = 2 / 3, max_decay: float = 0.9999,
                 min_decay: float = 0.0, start_step: int = 0) -> float:
    """timm/diffusers' formula, written out: 1 − (1 + s/inv_gamma)^(−power), s = max(0, step − start − 1)."""
    s = max(0, step - start_step - 1)
    d = 1 - (1 + s / inv_gamma) ** -power
    return min(max(d, min_decay), max_decay)


@pytest.mark.parametrize(("kwargs", "step", "decay"), [
    ({"inv_gamma": 2.0, "power": 1.0}, 5, 1 - 1 / 3),      # s = 4: 1 − (1 + 2)^−1
    ({"inv_gamma": 0.5, "power": 1.0}, 3, 1 - 1 / 5),      # s = 2: 1 − (1 + 4)^−1
    ({"inv_gamma": 1.0, "power": 0.5}, 4, 0.5),            # s = 3: 1 − 4^−½
    ({"inv_gamma": 1.0, "power": 1.0, "start_step": 3}, 7, 1 - 1 / 4),  # s = 7 − 3 − 1 = 3
    ({"inv_gamma": 1.0, "power": 1.0, "start_step": 3}, 2, 0.0),        # s clamps at 0
    ({"inv_gamma": 1.0, "power": 1.0, "min_decay": 0.3}, 2, 0.5),       # s = 1: ½ above the floor
    ({"inv_gamma": 1.0, "power": 1.0, "min_decay": 0.6}, 2, 0.6),       # floor
    ({"inv_gamma": 1.0, "power": 1.0, "max_decay": 0.7}, 100, 0.7),     # ceiling
    ({}, 1 + 7, 1 - 8 ** (-2 / 3)),                                     # defaults: inv_gamma 1, power 2/3
    ({}, 10**12, 0.9999),                                               # default ceiling
])
def test_ema_warmup_decay_closed_form(kwargs: dict, step: int, decay: float) -> None:
    assert warmup_decay(step, **kwargs) == pytest.approx(decay, rel=1e-12)
    r = wa.ema_warmup(**kwargs)
    assert r.weight(UpdateInfo(1, step, 1)) == pytest.approx(1 - decay, rel=1e-12, abs=1e-15)


def test_ema_warmup_first_update_copies_even_with_a_decay_floor() -> None:
    r = wa.ema_warmup(min_decay=0.5)
    assert r.weight(UpdateInfo(0, 10, 10)) == 1.0
    # engine: the floor applies from the second update on: 8 → .5·8 + .5·2 = 5
    assert run(wa.ema_warmup(min_decay=0.5, power=1.0), [8.0, 2.0]) == pytest.approx(5.0)


def test_ema_warmup_defaults() -> None:
    assert wa.ema_warmup().config() == {
        "kind": "ema_warmup", "inv_gamma": 1.0, "warmup_power": 2 / 3, "max_decay": 0.9999,
        "min_decay": 0.0, "start_step": 0, "power": 1}


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"inv_gamma": 0}, r"inv_gamma=0 is invalid: expected a positive number"),
    ({"inv_gamma": -1.0}, r"inv_gamma=-1\.0"),
    ({"inv_gamma": "1"}, r"inv_gamma='1'"),
    ({"power": 0}, r"power=0 is invalid: expected a positive number"),
    ({"power": None}, r"power=None"),
    ({"max_decay": 1.0}, r"max_decay=1\.0 is invalid: expected a number in \[0, 1\)"),
    ({"min_decay": -0.1}, r"min_decay=-0\.1"),
    ({"min_decay": 0.5, "max_decay": 0.4}, r"min_decay=0\.5 is invalid: expected at most max_decay=0\.4"),
    ({"start_step": -1}, r"start_step=-1 is invalid: expected a non-negative int"),
    ({"start_step": 1.0}, r"start_step=1\.0"),
])
def test_ema_warmup_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(wa.ConfigError, match=match):
        wa.ema_warmup(**kwargs)


def test_ema_warmup_min_equal_max_is_a_constant_decay() -> None:
    r = wa.ema_warmup(min_decay=0.5, max_decay=0.5)
    assert [r.weight(UpdateInfo(1, s, 1)) for s in (1, 2, 50)] == [0.5, 0.5, 0.5]


# ----------------------------------------------------------------------------- karras_ema


def test_karras_gamma_zero_is_the_equal_mean() -> None:
    # τ^0: every snapshot weighs the same, also when the updates are unevenly spaced (β = t_prev/t only
    # gives the equal mean for evenly spaced steps: check with the engine at steps 1, 2, 3, ...)
    xs = [5.0, -3.0, 4.0, 10.0, 0.5]
    assert run(wa.karras_ema(gamma=0), xs) == pytest.approx(sum(xs) / len(xs), rel=1e-12)
    assert run(wa.karras_ema(gamma=0.0), xs) == pytest.approx(run(wa.mean(), xs), rel=1e-12)


def test_karras_weight_closed_form() -> None:
    r = wa.karras_ema(gamma=1.0)
    # β = (t_prev/t)^(γ+1): t = 4, prev = 2 → (1/2)² = ¼ → weight ¾
    assert r.weight(UpdateInfo(1, 4, 2)) == pytest.approx(0.75)
    assert r.weight(UpdateInfo(1, 3, 3)) == 1.0  # prev = 0: nothing before counts
    assert r.weight(UpdateInfo(0, 10, 1)) == 1.0  # first update copies
    assert wa.karras_ema(gamma=2.0).weight(UpdateInfo(5, 10, 5)) == pytest.approx(1 - 0.5**3)


@pytest.mark.parametrize("gamma", [-1, -1.0, -2, -1.5, math.inf, math.nan, True, "3"])
def test_karras_gamma_must_be_finite_above_minus_one(gamma: object) -> None:
    # γ = −1: β = (t_prev/t)^0 = 1 for every update, the average never leaves its first snapshot
    with pytest.raises(wa.ConfigError, match=r"gamma=.* is invalid: expected a finite number > -1"):
        wa.karras_ema(gamma=gamma)  # type: ignore[arg-type]


def test_karras_gamma_just_above_minus_one_is_accepted() -> None:
    assert wa.karras_ema(gamma=-0.99).config()["gamma"] == -0.99


@pytest.mark.parametrize("kwargs", [{}, {"gamma": 3.0, "sigma_rel": 0.1}])
def test_karras_needs_exactly_one_of_gamma_and_sigma_rel(kwargs: dict) -> None:
    with pytest.raises(wa.ConfigError, match=r"gamma/sigma_rel=.* is invalid: expected exactly one"):
        wa.karras_ema(**kwargs)


def test_karras_sigma_rel_gives_the_profile_with_that_std() -> None:
    r = wa.karras_ema(sigma_rel=0.1)
    g = r.config()["gamma"]
    assert sigma_rel(g) == pytest.approx(0.1, rel=1e-9)
    assert g == pytest.approx(6.94, abs=0.01)  # EDM2's pair


# ----------------------------------------------------------------------------- sigma_rel_to_gamma


def test_sigma_rel_supremum_is_phi_to_minus_five_halves() -> None:
    # d/dγ log σ² = 1/(γ+1) − 2/(γ+2) − 1/(γ+3) = 0  ⇔  (γ+2)² = (γ+2) + 1  ⇔  γ = φ − 2
    g_star = GOLDEN - 2
    assert sigma_rel(g_star) == pytest.approx(SIGMA_MAX, rel=1e-14)
    assert abs(SIGMA_MAX - 0.300283) < 1e-6
    grid = [-1 + 10**-k for k in range(1, 8)] + [g_star + d for d in (-1e-3, 1e-3, 0.1, 1, 10, 1e3)]
    assert max(sigma_rel(g) for g in grid) < SIGMA_MAX


@settings(max_examples=60, deadline=None, derandomize=True)
@given(st.floats(min_value=1e-4, max_value=SIGMA_MAX, exclude_max=True))
def test_sigma_rel_to_gamma_solves_the_equation_on_the_decreasing_branch(sr: float) -> None:
    g = wa.sigma_rel_to_gamma(sr)
    assert sigma_rel(g) == pytest.approx(sr, rel=1e-6)
    assert g >= GOLDEN - 2 - 1e-9  # the largest root
    assert g > -1


def test_sigma_rel_to_gamma_at_the_supremum_and_near_it() -> None:
    assert wa.sigma_rel_to_gamma(SIGMA_MAX) == pytest.approx(GOLDEN - 2, abs=1e-6)
    g = wa.sigma_rel_to_gamma(0.30)
    assert sigma_rel(g) == pytest.approx(0.30, rel=1e-9)
    assert g > GOLDEN - 2  # not the γ ≈ −1 the old bisection returned
    # and the rule built from it moves: weights ∝ τ^γ, not stuck at the first snapshot
    assert run(wa.karras_ema(sigma_rel=0.30), [0.0, 1.0, 1.0, 1.0]) > 0.5


@pytest.mark.parametrize("sr", [SIGMA_MAX * (1 + 1e-9), 0.3003, 0.35, 0.408, 0.5, 0, -0.1, math.nan, math.inf,
                                True, "0.1", None])
def test_sigma_rel_out_of_range_raises(sr: object) -> None:
    with pytest.raises(wa.ConfigError, match=r"sigma_rel=.* is invalid: expected a number in \(0, 0\.30028\]"):
        wa.sigma_rel_to_gamma(sr)  # type: ignore[arg-type]
    with pytest.raises(wa.ConfigError, match=r"sigma_rel="):
        wa.karras_ema(sigma_rel=sr)  # type: ignore[arg-type]


def test_sigma_rel_to_gamma_edm2_pairs() -> None:
    assert wa.sigma_rel_to_gamma(0.05) == pytest.approx(16.97, abs=0.01)
    assert wa.sigma_rel_to_gamma(0.01) > wa.sigma_rel_to_gamma(0.05) > wa.sigma_rel_to_gamma(0.2)
    # a tiny σ_rel needs a γ far above the initial bracket [γ*, 1]
    g = wa.sigma_rel_to_gamma(1e-3)
    assert sigma_rel(g) == pytest.approx(1e-3, rel=1e-9)
    assert g > 900


# ----------------------------------------------------------------------------- custom, inplace


def test_custom_weight_is_checked_and_called_with_num_averaged() -> None:
    calls: list[int] = []

    def w(n: int) -> float:
        calls.append(n)
        return 0.25

    r = wa.custom(w)
    assert r.weight(UpdateInfo(0, 1, 1)) == 1.0 and calls == []
    assert r.weight(UpdateInfo(3, 4, 1)) == 0.25 and calls == [3]
    assert wa.custom(lambda n: 0.0).weight(UpdateInfo(1, 2, 1)) == 0.0
    assert wa.custom(lambda n: 1.0).weight(UpdateInfo(1, 2, 1)) == 1.0
    assert r.power == 1
    for bad in (1.5, -0.1, math.nan):
        with pytest.raises(wa.ConfigError, match=r"weight_fn\(num_averaged\)=.* is invalid: expected a weight"):
            wa.custom(lambda n, bad=bad: bad).weight(UpdateInfo(1, 2, 1))


@pytest.mark.parametrize(("make", "match"), [
    (lambda: wa.custom(0.5), r"weight_fn=0\.5 is invalid: expected a callable"),
    (lambda: wa.inplace("f"), r"fn='f' is invalid: expected a callable"),
])
def test_custom_and_inplace_need_callables(make, match: str) -> None:
    with pytest.raises(wa.ConfigError, match=match):
        make()


def test_inplace_weight_is_copy_then_nan() -> None:
    r = wa.inplace(lambda a, n, k: None)
    assert r.weight(UpdateInfo(0, 1, 1)) == 1.0
    assert math.isnan(r.weight(UpdateInfo(1, 2, 1)))
    assert r.power == 1


def test_sigma_rel_near_the_supremum_finds_the_right_branch() -> None:
    # just below φ^(−5/2) both roots crowd around γ*: the one returned must be the larger (γ ≥ γ*)
    g_star = GOLDEN - 2
    for k in range(1, 200):
        sr = SIGMA_MAX * (1 - (k / 200) ** 3 * 0.1)  # dense near the top
        g = wa.sigma_rel_to_gamma(sr)
        assert g >= g_star - 1e-7, (sr, g)
        assert sigma_rel(g) == pytest.approx(sr, rel=1e-7)
