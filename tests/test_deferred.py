"""The deferred non-finite check (``check="deferred"``, the default on CUDA), run on CPU.

Reference: the host-checked averager with ``nonfinite="skip"`` fed the same snapshots, which
skips the refused update outright. The deferred one applies every update masked and forms the
rules' weights from device counters; the averages must be bitwise equal (``torch.equal``).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

import weightavg as wa
from weightavg import _deferred

RULES = {
    "mean": lambda: wa.mean(),
    "ema": lambda: wa.ema(0.9),
    "ema_schedule": lambda: wa.ema(lambda s: min(0.99, 1 - 1 / (s + 1))),
    "half_life": lambda: wa.ema(half_life=3),
    "ema_warmup": lambda: wa.ema_warmup(inv_gamma=1.0, power=0.75),
    "karras_ema": lambda: wa.karras_ema(gamma=6.94),
    "custom": lambda: wa.custom(lambda n: 1.0 / (n + 2), name="slow_mean"),
    "mean_sq": lambda: wa.mean(power=2),
}


def make_model(dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    # big tensors (≥ 64Ki: chunked), small packed ones, float and integer buffers
    return nn.Sequential(nn.Linear(300, 300), nn.BatchNorm1d(300), nn.Linear(300, 4)).to(dtype)


def drive(model: nn.Module, avgs: list[wa.Averager], n: int, bad: set[int], seed: int = 0, start: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for i in range(n):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=g).to(p.dtype))
            if i in bad:
                model[0].weight[1, 2] = float("nan") if i % 2 else float("inf")
        for a in avgs:
            a.update(model, step=start + 3 * i + 1)  # steps spaced: interval-aware rules see the gaps
        with torch.no_grad():
            model[0].weight.nan_to_num_(0.0, posinf=0.0)


def assert_same(a: wa.Averager, b: wa.Averager) -> None:
    for slot in a.rules:
        x, y = a.averaged_tensors(slot), b.averaged_tensors(slot)
        for k in y:
            assert torch.equal(x[k], y[k]), (slot, k, (x[k].double() - y[k].double()).abs().max())


@pytest.mark.parametrize("rule", [*RULES, "several"])
@pytest.mark.parametrize("bad", [{4}, {0, 5, 6}])
def test_deferred_skip_equals_a_run_without_the_bad_update(rule: str, bad: set[int]) -> None:
    rules = {k: f() for k, f in RULES.items()} if rule == "several" else {rule: RULES[rule]()}
    model = make_model()
    dev = wa.Averager(model, rule=rules, nonfinite="skip", check="deferred")
    ref = wa.Averager(model, rule=rules, nonfinite="skip", check="host")
    assert dev.check == "deferred" and ref.check == "host"
    drive(model, [dev, ref], 9, bad)
    assert dev.num_skipped == ref.num_skipped == len(bad)
    assert dev.num_updates == ref.num_updates == 9 - len(bad)
    assert dev.last_step == ref.last_step
    assert_same(dev, ref)


@pytest.mark.parametrize(("dtype", "avg_dtype"), [(torch.bfloat16, torch.float32), (torch.float16, None)])
def test_deferred_with_conversions_and_contiguous_sources(
    dtype: torch.dtype, avg_dtype: torch.dtype | None
) -> None:
    rules = {"e": wa.ema(0.8), "m": wa.mean(), "sq": wa.mean(power=2)}
    for contiguous in (False, True):
        model = make_model(dtype)
        if contiguous:
            wa.make_contiguous(model)
        dev = wa.Averager(model, rule=rules, nonfinite="skip", check="deferred", dtype=avg_dtype)
        ref = wa.Averager(model, rule=rules, nonfinite="skip", check="host", dtype=avg_dtype)
        drive(model, [dev, ref], 6, {2})
        assert dev.num_skipped == 1
        assert_same(dev, ref)


def test_custom_rule_beyond_the_pending_window(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_deferred, "_MAX_PENDING", 3)
    rules = {"c": wa.custom(lambda n: 1.0 / (n + 1)), "e": wa.ema(0.5)}
    model = make_model()
    dev = wa.Averager(model, rule=rules, nonfinite="skip", check="deferred")
    ref = wa.Averager(model, rule=rules, nonfinite="skip", check="host")
    drive(model, [dev, ref], 12, {1, 2, 7})
    assert_same(dev, ref)


def test_refusal_surfaces_at_the_next_read_not_at_the_update(monkeypatch: pytest.MonkeyPatch) -> None:
    def read(avg: wa.Averager, model: nn.Module, what: str) -> None:
        if what == "num_updates":
            _ = avg.num_updates
        elif what == "num_skipped":
            _ = avg.num_skipped
        elif what == "state_dict":
            avg.state_dict()
        elif what == "swapped_in":
            with avg.swapped_in(model):
                pass
        elif what == "export":
            avg.export_state_dict()
        elif what == "summary":
            avg.summary()
        elif what == "averaged_tensors":
            avg.averaged_tensors()
        else:
            avg.settle()

    for what in ["num_updates", "num_skipped", "state_dict", "swapped_in", "export", "summary", "settle",
                 "averaged_tensors"]:
        model = make_model()
        dev = wa.Averager(model, rule=wa.ema(0.9), check="deferred")  # nonfinite="raise"
        ref = wa.Averager(model, rule=wa.ema(0.9), nonfinite="skip", check="host")
        calls: list[int] = []
        real = dev._executor.settle  # type: ignore[attr-defined]

        def counted(real: Any = real, calls: list[int] = calls) -> Any:
            calls.append(1)
            return real()

        monkeypatch.setattr(dev._executor, "settle", counted)
        drive(model, [dev, ref], 6, {3})  # no exception: the update never reads the flag
        assert calls == []
        with pytest.raises(wa.NonFiniteError, match=r"1 update\(s\) refused .*step 10"):
            read(dev, model, what)
        assert calls == [1]
        # reported once; the counters and the average are right
        assert (dev.num_updates, dev.num_skipped, dev.last_step) == (5, 1, 16)
        assert_same(dev, ref)


def test_deferred_state_resumes_and_resets_exactly() -> None:
    rules = {"k": wa.karras_ema(gamma=5.0), "c": wa.custom(lambda n: 0.5 if n else 1.0)}
    model = make_model()
    dev = wa.Averager(model, rule=rules, nonfinite="skip", check="deferred")
    ref = wa.Averager(model, rule=rules, nonfinite="skip", check="host")
    drive(model, [dev, ref], 5, {2})
    state = dev.state_dict()
    resumed = wa.Averager(model, rule=rules, nonfinite="skip", check="deferred")
    resumed.load_state_dict(state)
    drive(model, [resumed, ref], 4, {1}, seed=1, start=20)
    assert (resumed.num_updates, resumed.num_skipped) == (ref.num_updates, ref.num_skipped)
    assert_same(resumed, ref)
    resumed.reset()
    ref.reset()
    drive(model, [resumed, ref], 3, {0}, seed=2)
    assert_same(resumed, ref)
    assert resumed.num_updates == 2


def test_check_option_is_validated_and_chosen() -> None:
    model = nn.Linear(2, 2)
    assert wa.Averager(model).check == "host"  # CPU: host by default
    assert wa.Averager(model, check="deferred", nonfinite="allow").check == "host"  # nothing to check
    with pytest.raises(wa.ConfigError, match="check"):
        wa.Averager(model, check="device")  # type: ignore[arg-type]
    with pytest.raises(wa.ConfigError, match=r"check.*in-place"):
        wa.Averager(model, rule=wa.inplace(lambda a, n, k: None), check="deferred")


def test_accelerator_layout_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    # the plan an accelerator gets (whole-region probe, large pieces), cut small to have several
    monkeypatch.setattr(_deferred, "_cpu_layout", lambda device: False)
    monkeypatch.setattr(_deferred, "_DEVICE_CHUNK", 50_000)
    rules = {k: f() for k, f in RULES.items()}
    for dtype in (torch.float32, torch.bfloat16):
        model = make_model(dtype)
        dev = wa.Averager(model, rule=rules, nonfinite="skip", check="deferred")
        ref = wa.Averager(model, rule=rules, nonfinite="skip", check="host")
        drive(model, [dev, ref], 6, {2, 3})
        assert dev.num_skipped == 2
        assert_same(dev, ref)
