"""The engine's update path under every kind of rule, through the public API (issue #17 gaps 9, 10).

References are slow float64 loops over the snapshots written here: the mean of squares for
``power=2`` on each storage path (packed small tensors, big tensors, contiguous sources), an
in-place-only rule set, skipped non-finite updates, and ``update(step=)``. The built-in rules'
fast path (weights from three ints, no ``UpdateInfo`` per update) against each rule's ``weight`` of
the documented ``UpdateInfo``, counted here.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import weightavg as wa


class SmallAndBig(nn.Module):
    """Small tensors (packed) and one tensor of 300·300 = 90,000 ≥ 2^16 elements (the big-tensor path)."""

    def __init__(self) -> None:
        super().__init__()
        self.small = nn.Linear(3, 2)
        self.big = nn.Linear(300, 300, bias=False)


def snapshots(model: nn.Module, n: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Set the model to n random states in turn; yield a float64 copy of each."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn(p.shape, generator=g))
        out.append({k: v.detach().double().clone() for k, v in model.named_parameters()})
    return out


def run_snapshots(model: nn.Module, avg: wa.Averager, n: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    seen = []
    for _ in range(n):
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn(p.shape, generator=g))
        seen.append({k: v.detach().double().clone() for k, v in model.named_parameters()})
        avg.update(model)
    return seen


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("contiguous", [False, True], ids=["packed+big", "contiguous"])
def test_power_2_averages_squares_on_every_path(dtype: torch.dtype, contiguous: bool) -> None:
    model = SmallAndBig()
    if contiguous:
        wa.make_contiguous(model)
    avg = wa.Averager(model, rule={"m1": wa.mean(), "m2": wa.mean(power=2), "e2": wa.ema(0.5, power=2)},
                      dtype=dtype)
    seen = run_snapshots(model, avg, 3)
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-12, "atol": 1e-12}
    for name in ("small.weight", "small.bias", "big.weight"):
        xs = [s[name] for s in seen]
        mean1 = sum(xs) / 3
        mean2 = sum(x * x for x in xs) / 3
        ema2 = 0.25 * xs[0] ** 2 + 0.25 * xs[1] ** 2 + 0.5 * xs[2] ** 2  # copy, then .5/.5 twice
        torch.testing.assert_close(avg.averaged_tensors("m1")[name].double(), mean1, **tol)
        torch.testing.assert_close(avg.averaged_tensors("m2")[name].double(), mean2, **tol)
        torch.testing.assert_close(avg.averaged_tensors("e2")[name].double(), ema2, **tol)


def test_power_2_alone_on_a_big_tensor() -> None:
    model = SmallAndBig()
    avg = wa.Averager(model, rule=wa.mean(power=2), dtype=torch.float64)
    seen = run_snapshots(model, avg, 2, seed=5)
    got = avg.averaged_tensors()["big.weight"]
    torch.testing.assert_close(got, (seen[0]["big.weight"] ** 2 + seen[1]["big.weight"] ** 2) / 2)
    assert bool((got >= 0).all())  # squares, not values


@pytest.mark.parametrize("contiguous", [False, True])
def test_an_in_place_only_rule_set(contiguous: bool) -> None:
    calls: list[int] = []

    def running_max(avg: list[torch.Tensor], new: list[torch.Tensor], n: int) -> None:
        calls.append(n)
        for a, x in zip(avg, new, strict=True):
            torch.maximum(a, x.to(a.dtype), out=a)

    model = SmallAndBig()
    if contiguous:
        wa.make_contiguous(model)
    avg = wa.Averager(model, rule={"max": wa.inplace(running_max)}, dtype=torch.float64)
    seen = run_snapshots(model, avg, 3, seed=1)
    assert calls == [1, 2]  # the first update copies without calling fn
    for name in ("small.weight", "big.weight"):
        ref = torch.maximum(torch.maximum(seen[0][name], seen[1][name]), seen[2][name])
        torch.testing.assert_close(avg.averaged_tensors("max")[name], ref, rtol=0, atol=0)


def test_num_skipped_counts_every_skipped_update() -> None:
    model = nn.Linear(3, 2)
    avg = wa.Averager(model, nonfinite="skip", dtype=torch.float64)
    assert avg.update(model) is True
    before = {k: v.clone() for k, v in avg.averaged_tensors().items()}
    good = copy.deepcopy(model.state_dict())
    with torch.no_grad():
        model.weight[0, 0] = float("nan")
    assert avg.update(model) is False
    with torch.no_grad():
        model.bias[1] = float("inf")
    assert avg.update(model) is False
    assert avg.update(model) is False
    assert (avg.num_skipped, avg.num_updates) == (3, 1)
    for k, v in avg.averaged_tensors().items():
        assert torch.equal(v, before[k])
    model.load_state_dict(good)
    assert avg.update(model) is True
    assert (avg.num_skipped, avg.num_updates) == (3, 2)


@pytest.mark.parametrize(("step", "match"), [
    (-1, r"step=-1 is invalid: expected a non-negative int"),
    (True, r"step=True is invalid"),
    (2.0, r"step=2\.0 is invalid"),
    ("3", r"step='3' is invalid"),
])
def test_update_step_must_be_a_non_negative_int(step: object, match: str) -> None:
    model = nn.Linear(2, 1)
    avg = wa.Averager(model)
    with pytest.raises(wa.ConfigError, match=match):
        avg.update(model, step=step)  # type: ignore[arg-type]
    assert avg.num_updates == 0


def test_equal_steps_are_allowed_and_count_zero_time() -> None:
    # half-life rule: Δ = 0 steps since the previous update → decay 2^0 = 1 → the average does not move;
    # the equal mean counts the snapshot regardless of time
    lin = nn.Linear(1, 1, bias=False)
    avg = wa.Averager(lin, rule={"hl": wa.ema(half_life=2), "m": wa.mean()}, dtype=torch.float64)
    for step, v in ((0, 1.0), (4, 3.0), (4, 7.0)):
        with torch.no_grad():
            lin.weight.fill_(v)
        avg.update(lin, step=step)
    # hl: 1 → (Δ = 4: decay ¼) ¼·1 + ¾·3 = 2.5 → (Δ = 0) 2.5
    assert float(avg.averaged_tensors("hl")["weight"]) == pytest.approx(2.5, rel=1e-12)
    assert float(avg.averaged_tensors("m")["weight"]) == pytest.approx(11 / 3, rel=1e-12)
    assert (avg.num_updates, avg.step, avg.last_step) == (3, 4, 4)
    with pytest.raises(wa.ConfigError, match=r"step=3 is invalid: expected a step >= the previous update's step 4"):
        avg.update(lin, step=3)


def test_default_step_is_previous_plus_one() -> None:
    lin = nn.Linear(1, 1, bias=False)
    avg = wa.Averager(lin, rule=wa.ema(half_life=1), dtype=torch.float64)
    for v in (0.0, 4.0):
        with torch.no_grad():
            lin.weight.fill_(v)
        avg.update(lin)
    # Δ = 1 half-life: ½·0 + ½·4
    assert float(avg.averaged_tensors()["weight"]) == pytest.approx(2.0)
    assert avg.step == 2


def test_repr_and_summary_say_what_is_tracked() -> None:
    m = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    avg = wa.Averager(m, rule={"swa": wa.mean(), "e": wa.ema(half_life=100)})
    assert repr(avg) == ("Averager(rule={'swa': mean(), 'e': ema(half_life=100)}, params='all', "
                         "buffers='average', dtype=torch.float32, device=None, nonfinite='raise', "
                         "tracked=7 tensors/33 elements, num_updates=0)")
    # 4·3 + 4 (linear) + 4 + 4 (affine) + 4 + 4 (running stats) = 32 averaged, num_batches_tracked copied
    assert avg.summary() == ("weightavg.Averager: 6 tensors (32 elements) averaged in float32 on cpu, 1 copied; "
                             "buffers='average'; rules: swa=mean(), e=ema(half_life=100); updates: 0")
    avg.update(m)
    assert avg.summary().endswith("updates: 1") and repr(avg).endswith("num_updates=1)")


@pytest.mark.parametrize("contiguous", [False, True], ids=["packed+big", "contiguous"])
@pytest.mark.parametrize("rule", ["ema", "mean"])
def test_first_update_after_reset_copies_over_nan_and_inf(contiguous: bool, rule: str) -> None:
    # with nonfinite="allow" the average takes NaN/Inf in; after reset() the next update is a copy
    # (weight 1) and must overwrite them exactly: a lerp with weight 1 would keep NaN (NaN·0 = NaN)
    model = SmallAndBig()
    if contiguous:
        wa.make_contiguous(model)
    avg = wa.Averager(model, rule=wa.ema(0.9) if rule == "ema" else wa.mean(), nonfinite="allow")
    with torch.no_grad():
        for i, p in enumerate(model.parameters()):
            p.fill_(math.nan if i % 2 else math.inf)
    avg.update(model)
    avg.update(model)
    assert all(not torch.isfinite(t).any() for t in avg.averaged_tensors().values())
    avg.reset()
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape))
    avg.update(model)
    got = avg.averaged_tensors()
    for k, v in model.named_parameters():
        assert torch.equal(got[k], v.detach()), k


class RecordingMean:
    """A user-defined rule (the Rule protocol): the equal mean, recording what it is shown."""

    power = 1

    def __init__(self) -> None:
        self.seen: list[wa.UpdateInfo] = []

    def weight(self, info: wa.UpdateInfo) -> float:
        self.seen.append(info)
        return 1.0 / (info.num_averaged + 1)

    def config(self) -> dict:
        return {"kind": "recording"}


def test_a_user_rule_sees_the_documented_update_info() -> None:
    # steps_since_last: the step itself on a first update (at least 1), then the distance in steps
    lin = nn.Linear(2, 2)
    rule = RecordingMean()
    avg = wa.Averager(lin, rule=rule)
    for s in (0, 3, 3, 10):
        avg.update(lin, step=s)
    avg.reset()
    avg.update(lin, step=7)
    avg.update(lin)
    got = [(i.num_averaged, i.step, i.steps_since_last) for i in rule.seen]
    assert got == [(0, 0, 1), (1, 3, 3), (2, 3, 0), (3, 10, 7), (0, 7, 7), (1, 8, 1)]


def test_update_under_inference_mode_returns_true_and_averages() -> None:
    lin = nn.Linear(3, 2)
    avg = wa.Averager(lin, rule=wa.mean(), dtype=torch.float64)
    seen = run_snapshots(lin, avg, 1)
    with torch.inference_mode():
        assert avg.update(lin) is True
        seen.append({k: v.detach().double().clone() for k, v in lin.named_parameters()})
    for k, t in avg.averaged_tensors().items():
        torch.testing.assert_close(t, (seen[0][k] + seen[1][k]) / 2)


def test_deferred_update_returns_true_and_checks_steps_against_the_last_attempt() -> None:
    lin = nn.Linear(3, 2)
    avg = wa.Averager(lin, rule=wa.ema(0.5), check="deferred", nonfinite="skip")
    assert avg.update(lin, step=4) is True
    with torch.no_grad():
        lin.weight[0, 0] = float("nan")
    assert avg.update(lin, step=10) is True  # refused on the device, reported at the next read
    with pytest.raises(wa.ConfigError, match=r"step=5 is invalid: expected a step >= the previous update's step 10"):
        avg.update(lin, step=5)
    assert (avg.num_updates, avg.num_skipped) == (1, 1)
    with torch.no_grad():
        lin.weight[0, 0] = 0.0
    avg.update(lin, step=11)
    assert (avg.num_updates, avg.num_skipped) == (2, 1)  # a refusal is counted once


def test_a_mapping_source_copies_its_integer_tensors_at_the_update() -> None:
    # a mapping's tensors are read during update(): changing them afterwards changes nothing
    src = {"w": torch.ones(3), "count": torch.tensor(5)}
    avg = wa.Averager(src, rule=wa.mean())
    avg.update(src)
    src["count"].fill_(9)
    src["w"].fill_(4.0)
    got = avg.averaged_tensors()
    assert int(got["count"]) == 5
    assert torch.equal(got["w"], torch.ones(3))


@pytest.mark.parametrize("nonfinite", ["raise", "allow"])
def test_non_contiguous_small_sources_average_like_a_loop(nonfinite: str) -> None:
    # a transposed parameter is not a 1-D view: the packed gather reshapes it (the general path)
    model = SmallAndBig()
    model.small.weight = nn.Parameter(torch.randn(3, 2).t())
    assert not model.small.weight.is_contiguous()
    avg = wa.Averager(model, rule={"ema": wa.ema(0.6), "sq": wa.mean(power=2)}, dtype=torch.float64,
                      nonfinite=nonfinite)  # type: ignore[arg-type]
    seen = run_snapshots(model, avg, 3)
    for k in ("small.weight", "small.bias"):
        ema = seen[0][k]
        for s in seen[1:]:
            ema = 0.6 * ema + 0.4 * s[k]
        torch.testing.assert_close(avg.averaged_tensors("ema")[k], ema)
        torch.testing.assert_close(avg.averaged_tensors("sq")[k], sum(s[k] ** 2 for s in seen) / 3)


def test_the_per_tensor_scan_runs_only_after_the_cheap_check_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    # the check sums the averaged sources (one host read); only a non-finite total pays for the
    # per-tensor scan that names the culprits. A NaN in a copied (not averaged) buffer is no reason
    from weightavg._executor import LocalExecutor

    scans: list[int] = []
    scan = LocalExecutor._nonfinite_names
    monkeypatch.setattr(LocalExecutor, "_nonfinite_names", lambda self, b: scans.append(1) or scan(self, b))
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    model[1].running_mean.fill_(math.nan)
    avg = wa.Averager(model, rule={"ema": wa.ema(0.5), "sq": wa.mean(power=2)}, buffers="copy", check="host")
    for _ in range(3):
        assert avg.update(model)
    assert scans == []
    assert torch.isnan(avg.averaged_tensors("ema")["1.running_mean"]).all()  # copied as it is
    # float16 sources near the top of their range: a float16 sum would overflow; minimum and maximum don't
    half = nn.Linear(64, 64).half()
    with torch.no_grad():
        half.weight.fill_(6e4)
    wa.Averager(half, check="host").update(half)
    assert scans == []
    with torch.no_grad():
        model[0].weight[0, 0] = math.nan
    with pytest.raises(wa.NonFiniteError, match=r"1 tensor\(s\): 0\.weight"):
        avg.update(model)
    assert scans == [1]


def test_a_non_contiguous_copied_buffer_is_copied_exactly() -> None:
    class WithBuffer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(2, 2)
            self.register_buffer("counts", torch.arange(6).view(2, 3).t())  # integer, non-contiguous
            self.register_buffer("steps", torch.arange(4))

    model = WithBuffer()
    assert not model.counts.is_contiguous()
    avg = wa.Averager(model, rule=wa.ema(0.5))
    for i in range(2):
        model.counts.add_(i + 1)
        avg.update(model)
    got = avg.averaged_tensors()
    assert torch.equal(got["counts"], model.counts)
    assert torch.equal(got["steps"], model.steps)


def test_a_source_with_nothing_to_average_only_copies() -> None:
    # integer tensors only: nothing is checked or averaged, the copies follow the source
    src = {"n": torch.tensor(3), "m": torch.arange(4)}
    avg = wa.Averager(src)
    assert avg.update(src)
    src["m"] += 1
    assert avg.update(src)
    got = avg.averaged_tensors()
    assert int(got["n"]) == 3 and torch.equal(got["m"], torch.arange(1, 5))


@pytest.mark.filterwarnings("error")  # e.g. a scratch of the wrong size, resized by an out= (with a warning)
def test_big_tensors_stream_in_pieces_on_the_general_path() -> None:
    # 520·520 = 270,400 elements: more than one piece of the general path's stream (2^18)
    model = nn.Linear(520, 520, bias=False)
    avg = wa.Averager(model, rule={"sq": wa.mean(power=2), "ema": wa.ema(0.5)}, dtype=torch.float64)
    seen = run_snapshots(model, avg, 3)
    ema = seen[0]["weight"]
    for s in seen[1:]:
        ema = 0.5 * ema + 0.5 * s["weight"]
    torch.testing.assert_close(avg.averaged_tensors("ema")["weight"], ema)
    torch.testing.assert_close(avg.averaged_tensors("sq")["weight"], sum(s["weight"] ** 2 for s in seen) / 3)


@pytest.mark.parametrize("culprit", ["f32", "f64"])
def test_nan_in_any_dtype_group_is_refused(culprit: str) -> None:
    # the partial values of each (dtype, device) group are reduced apart, then together
    model = nn.ModuleDict({"f32": nn.Linear(3, 2), "f64": nn.Linear(2, 2).double()})
    avg = wa.Averager(model, rule=wa.ema(0.5), check="host")
    avg.update(model)
    with torch.no_grad():
        model[culprit].weight[0, 0] = math.nan
    for _ in range(2):  # the first after a copy, then the planned update
        with pytest.raises(wa.NonFiniteError, match=culprit):
            avg.update(model)


# ----------------------------------------------------------------------------- the built-in rules' fast path
# update() weighs the built-in rules from (num_averaged, step, since) ints, without an UpdateInfo;
# any other rule object, a subclass included, is asked weight(UpdateInfo(...)) itself.


def built_in_rules() -> dict[str, wa.Rule]:
    """One rule of every built-in kind (and every form of ema), keyed by a slot name."""
    return {
        "mean": wa.mean(), "mean2": wa.mean(power=2), "ema": wa.ema(0.9), "half_life": wa.ema(half_life=3.0),
        "schedule": wa.ema(lambda s: s / (s + 10)), "warmup": wa.ema_warmup(power=0.75, start_step=2),
        "karras": wa.karras_ema(gamma=2.0), "custom": wa.custom(lambda n: 1 / (n + 2)),
        "inplace": wa.inplace(lambda avg, new, n: None),
    }


def same_weight(a: float, b: float) -> bool:
    return a == b or (math.isnan(a) and math.isnan(b))


@settings(max_examples=200, deadline=None, derandomize=True)
@given(n=st.integers(0, 50), step=st.integers(0, 10_000), since=st.integers(0, 10_000))
def test_a_built_in_rules_fast_weight_is_its_weight_of_the_update_info(n: int, step: int, since: int) -> None:
    for name, rule in built_in_rules().items():
        fast = rule._weight(n, step, since)  # type: ignore[attr-defined]
        assert same_weight(fast, rule.weight(wa.UpdateInfo(n, step, since))), name


def spy_weights(avg: wa.Averager) -> list[dict[str, float]]:
    """The weights each update hands the executor (recorded on the instance)."""
    seen: list[dict[str, float]] = []
    ex = avg._executor
    real = ex.execute

    def execute(binding, weights, info):  # type: ignore[no-untyped-def]
        seen.append(dict(weights))
        return real(binding, weights, info)

    ex.execute = execute  # type: ignore[method-assign]
    return seen


@settings(max_examples=25, deadline=None, derandomize=True)
@given(first=st.integers(0, 4), gaps=st.lists(st.integers(0, 6), min_size=1, max_size=7))
def test_the_weights_of_built_in_rules_are_those_of_the_documented_update_info(first: int, gaps: list[int]) -> None:
    # the reference counts updates and steps here and asks each rule weight(UpdateInfo(...))
    steps = [first]
    for g in gaps:
        steps.append(steps[-1] + g)
    lin = nn.Linear(2, 2)
    rules = built_in_rules()
    singles = {name: wa.Averager(lin, rule=rule) for name, rule in rules.items()}  # one rule: a dict literal
    # several: a loop without an UpdateInfo; with an in-place rule the executor reads one
    multi = wa.Averager(lin, rule={name: r for name, r in rules.items() if name != "inplace"})
    with_inplace = wa.Averager(lin, rule=rules)
    seen = {name: spy_weights(a) for name, a in singles.items()}
    seen_multi = spy_weights(multi)
    seen_with_inplace = spy_weights(with_inplace)
    expected: list[dict[str, float]] = []
    last = None
    for n, step in enumerate(steps):
        info = wa.UpdateInfo(n, step, step - last if last is not None else max(step, 1))
        expected.append({name: rule.weight(info) for name, rule in rules.items()})
        last = step
        for a in (*singles.values(), multi, with_inplace):
            assert a.update(lin, step=step) is True
    for name in rules:
        got = [w["default"] for w in seen[name]]
        want = [w[name] for w in expected]
        assert all(same_weight(g, w) for g, w in zip(got, want, strict=True)), (name, got, want)
    for records, slots in ((seen_multi, [k for k in rules if k != "inplace"]), (seen_with_inplace, list(rules))):
        assert len(records) == len(expected)
        for got_w, want_w in zip(records, expected, strict=True):
            assert list(got_w) == slots
            assert all(same_weight(got_w[k], want_w[k]) for k in slots), (got_w, want_w)


def test_a_subclass_of_a_built_in_rule_is_asked_its_own_weight_with_an_update_info() -> None:
    seen: list[wa.UpdateInfo] = []

    class Halves(type(wa.ema(0.9))):  # type: ignore[misc]
        """A user's subclass overriding weight: each update moves halfway."""

        def weight(self, info: wa.UpdateInfo) -> float:
            seen.append(info)
            return 1.0 if info.num_averaged == 0 else 0.5

    lin = nn.Linear(1, 1, bias=False)
    avg = wa.Averager(lin, rule=Halves(decay=0.9), dtype=torch.float64)
    for step, v in ((2, 4.0), (5, 8.0), (6, 0.0)):
        with torch.no_grad():
            lin.weight.fill_(v)
        avg.update(lin, step=step)
    assert float(avg.averaged_tensors()["weight"]) == 3.0  # 4 → (4+8)/2 = 6 → (6+0)/2 = 3 (decay 0.9: 3.96)
    assert seen == [wa.UpdateInfo(0, 2, 2), wa.UpdateInfo(1, 5, 3), wa.UpdateInfo(2, 6, 1)]
    assert all(type(i) is wa.UpdateInfo for i in seen)
