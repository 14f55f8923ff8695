"""The averaging engine against independent references."""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

import weightavg as wa
from weightavg import _executor, _storage

from .conftest import ConvBN, sgd_steps
from .reference import ema_closed_form, mean_of, power_profile_weights, weighted_loop


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def float_params(model: nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters()]


def run(model: nn.Module, avg: wa.Averager, n: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    snaps = []
    for _ in sgd_steps(model, n, seed=seed):
        model.train()
        model(torch.randn(4, 8))  # moves BN running stats too
        avg.update(model)
        snaps.append(snapshot(model))
    return snaps


def assert_close_to(avg_tensors: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], names, tol=1e-6):
    for n in names:
        torch.testing.assert_close(avg_tensors[n].double(), ref[n].double(), rtol=tol, atol=tol, msg=n)


# ----------------------------------------------------------------------------- rules vs references


def test_mean_equals_closed_form_and_torch_swa(convbn: ConvBN) -> None:
    ref_torch = AveragedModel(convbn)
    avg = wa.Averager(convbn, rule=wa.mean())
    snaps = []
    for _ in sgd_steps(convbn, 7):
        avg.update(convbn)
        ref_torch.update_parameters(convbn)
        snaps.append(snapshot(convbn))
    got = avg.averaged_tensors()
    assert_close_to(got, mean_of(snaps), float_params(convbn))
    for n, p in ref_torch.module.named_parameters():
        torch.testing.assert_close(got[n], p.detach(), rtol=1e-6, atol=1e-7)
    assert avg.num_updates == 7


def test_ema_equals_closed_form_and_torch(convbn: ConvBN) -> None:
    ref_torch = AveragedModel(convbn, multi_avg_fn=get_ema_multi_avg_fn(0.9))
    avg = wa.Averager(convbn, rule=wa.ema(decay=0.9))
    snaps = []
    for _ in sgd_steps(convbn, 6):
        avg.update(convbn)
        ref_torch.update_parameters(convbn)
        snaps.append(snapshot(convbn))
    got = avg.averaged_tensors()
    assert_close_to(got, ema_closed_form(snaps, 0.9), float_params(convbn))
    for n, p in ref_torch.module.named_parameters():
        torch.testing.assert_close(got[n], p.detach(), rtol=1e-6, atol=1e-7)


def test_smoothing_is_decay() -> None:
    assert wa.ema(smoothing=0.99).weight(wa.UpdateInfo(3, 4, 1)) == pytest.approx(0.01)


def test_half_life_halves_a_snapshot_weight() -> None:
    """After half_life steps (updated every step, or every k steps) a snapshot weighs half."""
    h = 12
    for every in (1, 3, 4):
        rule = wa.ema(half_life=h)
        # weight of the first post-copy snapshot after it, as the product of decays
        w0 = rule.weight(wa.UpdateInfo(1, every, every))
        remaining = 1.0
        step = every
        while step < every + h:
            step += every
            remaining *= 1.0 - rule.weight(wa.UpdateInfo(2, step, every))
        assert remaining == pytest.approx(0.5), every
        assert w0 == pytest.approx(1 - 2 ** (-every / h))


def test_half_life_is_interval_aware_in_the_engine() -> None:
    """Updating every 4 steps with half_life=8 decays like every step with half_life=8."""
    lin = nn.Linear(3, 2)
    a1 = wa.Averager(lin, rule=wa.ema(half_life=8))
    a4 = wa.Averager(lin, rule=wa.ema(half_life=8))
    a1.update(lin, step=0)
    a4.update(lin, step=0)
    with torch.no_grad():
        lin.weight.add_(1.0)
    for s in range(1, 9):
        a1.update(lin, step=s)
    for s in (4, 8):
        a4.update(lin, step=s)
    # after 8 steps of a constant new value, both have moved by 1 − 2^(−8/8) = 0.5
    d1 = a1.averaged_tensors()["weight"] - (lin.weight.detach() - 1.0)
    d4 = a4.averaged_tensors()["weight"] - (lin.weight.detach() - 1.0)
    torch.testing.assert_close(d1, torch.full_like(d1, 0.5))
    torch.testing.assert_close(d4, torch.full_like(d4, 0.5))


def test_ema_warmup_matches_formula() -> None:
    rule = wa.ema_warmup(inv_gamma=1.0, power=0.75, max_decay=0.999)
    for step in (2, 10, 100, 10_000_000):
        s = step - 1
        expected = min(1 - (1 + s) ** -0.75, 0.999)
        assert 1 - rule.weight(wa.UpdateInfo(5, step, 1)) == pytest.approx(expected)


def test_ema_warmup_forgets_init_faster_than_plain_decay() -> None:
    """The brief: a plain 0.999 decay over 1500 steps still weighs the initial weights ~22 %."""
    plain, warm = 1.0, 1.0
    for step in range(2, 1501):
        plain *= 1 - wa.ema(decay=0.999).weight(wa.UpdateInfo(1, step, 1))
        warm *= 1 - wa.ema_warmup().weight(wa.UpdateInfo(1, step, 1))
    assert plain == pytest.approx(0.999**1499)
    assert 0.2 < plain < 0.25
    assert warm < 0.01


@pytest.mark.parametrize("every", [1, 3, 10])
def test_karras_power_ema_follows_profile(every: int) -> None:
    gamma = 6.94
    lin = nn.Linear(1, 1, bias=False)
    avg = wa.Averager(lin, rule=wa.karras_ema(gamma=gamma), dtype=torch.float64)
    steps = list(range(every, 61, every))
    values = torch.randn(len(steps), dtype=torch.float64)
    for s, v in zip(steps, values, strict=True):
        with torch.no_grad():
            lin.weight.fill_(float(v))
        avg.update(lin, step=s)
    w = power_profile_weights(steps, gamma)
    expected = sum(wi * float(vi) for wi, vi in zip(w, values, strict=True))
    assert float(avg.averaged_tensors()["weight"]) == pytest.approx(expected, rel=1e-6)


def test_sigma_rel_to_gamma_known_values() -> None:
    # the defining equation, and EDM2's published pairs σ_rel 0.05 ↔ γ 16.97, 0.10 ↔ γ 6.94
    for sr in (0.05, 0.1, 0.2):
        g = wa.sigma_rel_to_gamma(sr)
        assert (g + 1) / ((g + 2) ** 2 * (g + 3)) == pytest.approx(sr**2, rel=1e-9)
    assert wa.sigma_rel_to_gamma(0.05) == pytest.approx(16.97, abs=0.01)
    assert wa.sigma_rel_to_gamma(0.10) == pytest.approx(6.94, abs=0.01)


def test_custom_weight_and_inplace_rules_match_loop(convbn: ConvBN) -> None:
    def w(n: int) -> float:
        return 1.0 / (n + 2)

    def ema_inplace(avgs, news, n):
        for a, x in zip(avgs, news, strict=True):
            a.mul_(0.5).add_(x.to(a.dtype), alpha=0.5)

    avg = wa.Averager(convbn, rule={"c": wa.custom(w), "i": wa.inplace(ema_inplace)})
    snaps = []
    for _ in sgd_steps(convbn, 5):
        avg.update(convbn)
        snaps.append(snapshot(convbn))
    names = float_params(convbn)
    assert_close_to(avg.averaged_tensors("c"), weighted_loop(snaps, lambda n, i: w(n)), names)
    assert_close_to(avg.averaged_tensors("i"), ema_closed_form(snaps, 0.5), names)


def test_several_rules_share_one_pass(convbn: ConvBN) -> None:
    rules = {"swa": wa.mean(), "fast": wa.ema(decay=0.5), "slow": wa.ema(decay=0.9)}
    together = wa.Averager(convbn, rule=rules)
    alone = {k: wa.Averager(convbn, rule=r) for k, r in rules.items()}
    for _ in sgd_steps(convbn, 5):
        together.update(convbn)
        for a in alone.values():
            a.update(convbn)
    for k, a in alone.items():
        for n, t in a.averaged_tensors().items():
            assert torch.equal(together.averaged_tensors(k)[n], t), (k, n)


# ----------------------------------------------------------------------------- packing, big tensors


class ManySmall(nn.Module):
    def __init__(self, blocks: int = 40, big: int = 300) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Conv1d(4, 4, 3, padding=1), nn.BatchNorm1d(4)) for _ in range(blocks)
        )
        self.big = nn.Linear(big, big)  # 90_300 elements: above the packing threshold

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for b in self.blocks:
            x = torch.relu(b(x))
        return x


@pytest.mark.parametrize("scratch", [pytest.param(1000, id="unstaged-check"), pytest.param(1 << 20, id="staged")])
def test_packed_and_big_paths_agree_with_slow_loop(monkeypatch: pytest.MonkeyPatch, scratch: int) -> None:
    """Force several chunks, both check modes and the chunked big path; compare with a loop."""
    monkeypatch.setattr(_storage, "_CHUNK", 300)
    monkeypatch.setattr(_executor, "_SCRATCH", scratch)
    monkeypatch.setattr(_executor, "_BIG_CHUNK", 40_000)
    model = ManySmall()
    avg = wa.Averager(model, rule=wa.ema(decay=0.7))
    g = avg._groups[0]
    assert len(g.chunks) > 1 and g.n_packed < len(g.entries)
    snaps = []
    gen = torch.Generator().manual_seed(1)
    for _ in range(4):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=gen))
        model(torch.randn(2, 4, 5, generator=gen))
        avg.update(model)
        snaps.append(snapshot(model))
    ref = ema_closed_form(snaps, 0.7)
    got = avg.averaged_tensors()
    for n in got:
        if n.endswith("num_batches_tracked"):
            assert torch.equal(got[n], snaps[-1][n])
        else:
            torch.testing.assert_close(got[n].double(), ref[n], rtol=1e-5, atol=1e-5, msg=n)


@pytest.mark.parametrize("nonfinite", ["raise", "allow"])
@pytest.mark.parametrize("scratch", [pytest.param(1000, id="unstaged-check"), pytest.param(1 << 20, id="staged")])
def test_planned_update_matches_general_path(monkeypatch: pytest.MonkeyPatch, scratch: int, nonfinite: str) -> None:
    """The flattened plan (the fast path) and the general per-group path give the same averages."""
    monkeypatch.setattr(_storage, "_CHUNK", 300)
    monkeypatch.setattr(_executor, "_SCRATCH", scratch)
    model = ManySmall()
    rules = {"ema": wa.ema(decay=0.7), "swa": wa.mean()}
    planned = wa.Averager(model, rule=rules, nonfinite=nonfinite)  # type: ignore[arg-type]
    general = wa.Averager(model, rule=rules, nonfinite=nonfinite)  # type: ignore[arg-type]
    general._executor.plannable = False  # type: ignore[attr-defined]
    runs = []
    run = _executor._run
    monkeypatch.setattr(_executor, "_run", lambda ops, w: (runs.append(len(ops)), run(ops, w)))
    gen = torch.Generator().manual_seed(2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. a gather into a scratch of the wrong size resizes it, warning
        for _ in range(4):
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(torch.randn(p.shape, generator=gen))
            planned.update(model)
            general.update(model)
    assert len(runs) == 3  # the plan ran, for every update but the first (a copy: the general path)
    assert planned._binder.bindings[id(model)].plan is not None
    assert general._binder.bindings[id(model)].plan is None
    for slot in rules:
        want = general.averaged_tensors(slot)
        for n, t in planned.averaged_tensors(slot).items():
            torch.testing.assert_close(t, want[n], rtol=1e-6, atol=1e-7, msg=(slot, n))


@pytest.mark.parametrize("n_big", [2, 9], ids=["lerp-each", "foreach"])
def test_planned_big_tensors_match_closed_form(n_big: int) -> None:
    """Up to _FEW big tensors take one lerp_ each, more one foreach; both follow the closed form."""
    assert (n_big > _executor._FEW) == (n_big == 9)
    model = nn.Sequential(*[nn.Linear(256, 256, bias=False) for _ in range(n_big)])  # 65,536 each: big
    avg = wa.Averager(model, rule=wa.ema(decay=0.6))
    gen = torch.Generator().manual_seed(3)
    snaps = []
    for _ in range(4):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=gen))
        avg.update(model)
        snaps.append(snapshot(model))
    plan = avg._binder.bindings[id(model)].plan
    assert plan is not None and {op[0] for op in plan.plain} == {_executor._FOREACH if n_big == 9 else _executor._LERP}
    ref = ema_closed_form(snaps, 0.6)
    for n, t in avg.averaged_tensors().items():
        torch.testing.assert_close(t.double(), ref[n], rtol=1e-5, atol=1e-5, msg=n)


@pytest.mark.parametrize("where", ["packed", "big"])
def test_planned_update_refuses_nonfinite_in_small_and_big_tensors(where: str) -> None:
    model = ManySmall()
    avg = wa.Averager(model, rule={"ema": wa.ema(decay=0.7), "swa": wa.mean()})
    avg.update(model)
    avg.update(model)
    assert avg._binder.bindings[id(model)].plan is not None
    before = {slot: {k: v.clone() for k, v in avg.averaged_tensors(slot).items()} for slot in avg.rules}
    big = [n for n, p in model.named_parameters() if p.numel() >= _storage._BIG]
    small = [n for n, p in model.named_parameters() if p.numel() < _storage._BIG]
    name = (big if where == "big" else small)[-1]
    with torch.no_grad():
        model.get_parameter(name).view(-1)[-1] = float("inf")
    with pytest.raises(wa.NonFiniteError, match=name.replace(".", r"\.")):
        avg.update(model)
    for slot in avg.rules:
        for k, v in avg.averaged_tensors(slot).items():
            assert torch.equal(v, before[slot][k]), (slot, k)


def test_bf16_model_gets_a_moving_fp32_average() -> None:
    """A bf16 shadow with decay 0.9999 does not move; ours (fp32) moves as the closed form says."""
    lin = nn.Linear(64, 64).to(torch.bfloat16)
    avg = wa.Averager(lin, rule=wa.ema(decay=0.9999))
    avg.update(lin)
    start = avg.averaged_tensors()["weight"].clone()
    assert start.dtype == torch.float32
    with torch.no_grad():
        lin.weight.add_(1.0)
    bf16_shadow = start.to(torch.bfloat16)
    for _ in range(1000):
        avg.update(lin)
        bf16_shadow.lerp_(lin.weight.detach(), 1e-4)
    moved = avg.averaged_tensors()["weight"] - start
    expected = 1 - 0.9999**1000  # ≈ 0.095
    torch.testing.assert_close(moved.mean().item(), expected, rtol=0.05, atol=0.0)
    # a naive bf16 shadow gets stuck once half an ulp exceeds the step (the defect we avoid)
    naive_moved = (bf16_shadow.float() - start.to(torch.bfloat16).float()).mean().item()
    assert naive_moved < 0.3 * expected
    # export is in the model's dtype
    assert avg.export_state_dict()["weight"].dtype == torch.bfloat16


def test_dtype_none_keeps_model_dtype() -> None:
    lin = nn.Linear(3, 3).double()
    avg = wa.Averager(lin, dtype=None)
    avg.update(lin)
    assert avg.averaged_tensors()["weight"].dtype == torch.float64


# ----------------------------------------------------------------------------- buffers


def test_integer_buffers_copied_not_averaged(convbn: ConvBN) -> None:
    avg = wa.Averager(convbn, rule=wa.mean())
    snaps = run(convbn, avg, 5)
    got = avg.averaged_tensors()
    assert got["bn.num_batches_tracked"].dtype == torch.int64
    assert int(got["bn.num_batches_tracked"]) == int(snaps[-1]["bn.num_batches_tracked"]) == 10
    # float buffers are averaged under the default policy
    torch.testing.assert_close(got["bn.running_mean"].double(), mean_of(snaps)["bn.running_mean"])
    # torch's AveragedModel(use_buffers=True) truncates the integer mean: the defect we avoid
    assert "scratch" not in got  # non-persistent buffers are left alone


@pytest.mark.parametrize(("policy", "expect"), [("average", "mean"), ("copy", "last"), ("ignore", None)])
def test_buffer_policies(convbn: ConvBN, policy: str, expect: str | None) -> None:
    avg = wa.Averager(convbn, buffers=policy)
    snaps = run(convbn, avg, 4)
    got = avg.averaged_tensors()
    if expect is None:
        assert not any(n.startswith("bn.running") or "num_batches" in n for n in got)
        return
    ref = mean_of(snaps)["bn.running_var"] if expect == "mean" else snaps[-1]["bn.running_var"]
    torch.testing.assert_close(got["bn.running_var"].double(), ref.double())


def test_trainable_only_and_patterns(convbn: ConvBN) -> None:
    convbn.conv.weight.requires_grad_(False)
    assert "conv.weight" not in wa.Averager(convbn, params="trainable").names
    assert "conv.weight" in wa.Averager(convbn).names
    only_fc = wa.Averager(convbn, include="fc.*", buffers="ignore")
    assert sorted(only_fc.names) == ["fc.bias", "fc.weight"]
    no_bias = wa.Averager(convbn, exclude=["*.bias"], buffers="ignore")
    assert sorted(no_bias.names) == ["bn.weight", "conv.weight", "fc.weight"]


def test_tied_weights_tracked_once() -> None:
    emb = nn.Embedding(5, 3)
    head = nn.Linear(3, 5, bias=False)
    head.weight = emb.weight
    model = nn.ModuleDict({"emb": emb, "head": head})
    avg = wa.Averager(model)
    assert avg.names == ["emb.weight"]


# ----------------------------------------------------------------------------- names and wrappers


def test_wrapped_and_unwrapped_models_pair_by_canonical_name(convbn: ConvBN) -> None:
    dp = nn.DataParallel(convbn)  # CPU: a plain wrapper with the "module." prefix
    avg = wa.Averager(dp)
    assert "conv.weight" in avg.names and not any(n.startswith("module.") for n in avg.names)
    avg.update(convbn)
    avg.update(dp)
    assert avg.num_updates == 2
    sd = avg.export_state_dict(convbn)
    convbn.load_state_dict(sd, strict=True)


def test_canonical_names() -> None:
    assert wa.canonical_name("module._orig_mod.layer.0.weight") == "layer.0.weight"
    assert wa.canonical_name("encoder._orig_mod.weight") == "encoder.weight"
    assert wa.canonical_name("module.module.w") == "w"
    assert wa.canonical_name("body.module.w") == "body.module.w"  # an inner 'module' is a real name


def test_torch_compiled_model(convbn: ConvBN) -> None:
    compiled = torch.compile(convbn, backend="eager")
    avg = wa.Averager(compiled, rule=wa.ema(decay=0.5))
    x = torch.randn(4, 8)
    compiled(x)
    avg.update(compiled)
    with torch.no_grad():
        for p in convbn.parameters():
            p.add_(1.0)
    avg.update(convbn)  # the unwrapped model pairs with the compiled one's names
    ref = copy.deepcopy(convbn)
    with avg.swapped_in(compiled):
        out_avg = compiled(x)
        params_inside = [p.detach().clone() for p in convbn.parameters()]
    avg.copy_to(ref)
    ref.train()
    torch.testing.assert_close(out_avg, ref(x))
    for p, q in zip(params_inside, ref.parameters(), strict=True):
        torch.testing.assert_close(p, q.detach())


def test_structurally_different_model_raises_with_names(convbn: ConvBN) -> None:
    avg = wa.Averager(convbn)
    other = nn.Sequential(nn.Linear(8, 4))
    with pytest.raises(wa.MismatchError, match=r"missing from the model: .*conv\.weight") as err:
        avg.update(other)
    assert "0.weight" in str(err.value)  # unexpected names listed too
    wider = ConvBN(channels=5)
    with pytest.raises(wa.MismatchError, match=r"different shapes.*conv\.weight \(4, 1, 3\) vs \(5, 1, 3\)"):
        avg.update(wider)


def test_moved_model_is_detected(convbn: ConvBN) -> None:
    avg = wa.Averager(convbn)
    avg.update(convbn)
    convbn.double()  # replaces every parameter's storage
    with pytest.raises(wa.MismatchError, match="float64"):
        avg.update(convbn)


# ----------------------------------------------------------------------------- swap / copy / export


def test_swap_restores_weights_even_when_body_raises(convbn: ConvBN) -> None:
    avg = wa.Averager(convbn)
    run(convbn, avg, 3)
    before = snapshot(convbn)
    params_before = [id(p) for p in convbn.parameters()]
    seen_inside = {}

    def body() -> None:
        with avg.swapped_in(convbn):
            seen_inside.update(snapshot(convbn))
            convbn.bn.running_mean.fill_(123.0)
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        body()
    for n, t in avg.averaged_tensors().items():
        assert torch.equal(seen_inside[n].to(t.dtype), t), n
    after = snapshot(convbn)
    for k in before:
        assert torch.equal(before[k], after[k]), k
    assert [id(p) for p in convbn.parameters()] == params_before


def test_export_loads_strict_into_unwrapped_model(convbn: ConvBN) -> None:
    avg = wa.Averager(nn.DataParallel(convbn), buffers="ignore")
    run(convbn, avg, 3)
    fresh = ConvBN()
    fresh.load_state_dict(avg.export_state_dict(convbn), strict=True)
    assert torch.equal(fresh.fc.weight, avg.averaged_tensors()["fc.weight"])
    assert torch.equal(fresh.bn.running_mean, convbn.bn.running_mean)  # filled from the model


def test_copy_to_and_load_from(convbn: ConvBN) -> None:
    avg = wa.Averager(convbn)
    run(convbn, avg, 3)
    target = ConvBN()
    avg.copy_to(target)
    assert torch.equal(target.conv.weight, avg.averaged_tensors()["conv.weight"])
    target.bn.running_mean.fill_(7.0)
    avg.load_from(target)
    assert torch.equal(avg.averaged_tensors()["bn.running_mean"], torch.full((4,), 7.0))
    assert not torch.equal(avg.averaged_tensors()["conv.weight"], torch.zeros(4, 1, 3))


def test_use_before_update_raises(convbn: ConvBN) -> None:
    avg = wa.Averager(convbn)
    with pytest.raises(wa.StateError, match="update"), avg.swapped_in(convbn):
        pass
    with pytest.raises(wa.StateError):
        avg.export_state_dict()


# ----------------------------------------------------------------------------- non-finite


def test_nonfinite_update_refused_and_average_unchanged(convbn: ConvBN) -> None:
    avg = wa.Averager(convbn)
    run(convbn, avg, 2)
    before = {k: v.clone() for k, v in avg.averaged_tensors().items()}
    with torch.no_grad():
        convbn.fc.bias[0] = float("nan")
    with pytest.raises(wa.NonFiniteError, match=r"fc\.bias"):
        avg.update(convbn)
    assert avg.num_updates == 2
    for k, v in avg.averaged_tensors().items():
        assert torch.equal(v, before[k]), k


def test_nonfinite_skip_counts(convbn: ConvBN) -> None:
    avg = wa.Averager(convbn, nonfinite="skip")
    run(convbn, avg, 1)
    with torch.no_grad():
        convbn.conv.weight[0, 0, 0] = float("inf")
    assert avg.update(convbn) is False
    assert (avg.num_updates, avg.num_skipped) == (1, 1)


def test_large_finite_values_are_not_mistaken_for_overflow() -> None:
    lin = nn.Linear(200, 200)
    with torch.no_grad():
        lin.weight.fill_(3e36)  # the sum overflows float32, every value is finite
    avg = wa.Averager(lin)
    assert avg.update(lin)


# ----------------------------------------------------------------------------- checkpointing


def test_state_dict_round_trip_continues_bit_identically(convbn: ConvBN) -> None:
    rules = {"swa": wa.mean(), "ema": wa.ema(half_life=3), "k": wa.karras_ema(gamma=3.0)}
    straight = wa.Averager(convbn, rule=rules)
    model_b = copy.deepcopy(convbn)
    resumed = wa.Averager(model_b, rule=rules)
    for i, _ in enumerate(sgd_steps(convbn, 6)):
        straight.update(convbn, step=2 * i + 1)
    for i, _ in enumerate(sgd_steps(model_b, 3)):
        resumed.update(model_b, step=2 * i + 1)
    buf = io.BytesIO()
    torch.save({"avg": resumed.state_dict(), "model": model_b.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    model_d = ConvBN()
    model_d.load_state_dict(ckpt["model"])
    restored = wa.Averager(model_d, rule=rules)
    restored.load_state_dict(ckpt["avg"])
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.SGD(model_d.parameters(), lr=0.1)  # plain SGD: no optimizer state to resume
    for i in range(6):
        x = torch.randn(16, 8, generator=g)  # replay the data stream to the same position
        if i < 3:
            continue
        model_d(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        restored.update(model_d, step=2 * i + 1)
    for slot in rules:
        for n, t in straight.averaged_tensors(slot).items():
            assert torch.equal(restored.averaged_tensors(slot)[n], t), (slot, n)
    assert (restored.num_updates, restored.step, restored.last_step) == (6, 11, 11)


def test_load_state_dict_rejects_other_rules_and_names(convbn: ConvBN) -> None:
    avg = wa.Averager(convbn, rule=wa.ema(decay=0.9))
    avg.update(convbn)
    sd = avg.state_dict()
    with pytest.raises(wa.MismatchError, match="rules"):
        wa.Averager(convbn, rule=wa.mean()).load_state_dict(sd)
    with pytest.raises(wa.MismatchError, match=r"conv\.weight"):
        wa.Averager(nn.Linear(8, 3), rule=wa.ema(decay=0.9)).load_state_dict(sd)
    with pytest.raises(wa.StateError, match="format"):
        avg.load_state_dict({"n_averaged": 3})


def test_mapping_source() -> None:
    a = {"w": torch.ones(3), "step": torch.tensor(1)}
    b = {"w": torch.full((3,), 3.0), "step": torch.tensor(2)}
    avg = wa.Averager(a, rule=wa.mean())
    avg.update(a)
    avg.update(b)
    assert torch.equal(avg.averaged_tensors()["w"], torch.full((3,), 2.0))
    assert int(avg.averaged_tensors()["step"]) == 2
    with pytest.raises(wa.MismatchError, match="w2"):
        avg.update({"w2": torch.ones(3), "step": torch.tensor(3)})


# ----------------------------------------------------------------------------- properties


@settings(max_examples=25, deadline=None)
@given(
    perm=st.permutations(list(range(6))),
    scale=st.floats(min_value=1e-3, max_value=1e3),
)
def test_mean_is_order_independent(perm: list[int], scale: float) -> None:
    gen = torch.Generator().manual_seed(0)
    snaps = [{"w": torch.randn(50, generator=gen) * scale} for _ in range(6)]
    a = wa.Averager(snaps[0], rule=wa.mean())
    b = wa.Averager(snaps[0], rule=wa.mean())
    for s in snaps:
        a.update(s)
    for i in perm:
        b.update(snaps[i])
    torch.testing.assert_close(a.averaged_tensors()["w"], b.averaged_tensors()["w"],
                               rtol=1e-5, atol=1e-6 * scale)


@settings(max_examples=20, deadline=None)
@given(
    n_before=st.integers(min_value=1, max_value=5),
    n_after=st.integers(min_value=1, max_value=5),
    decay=st.floats(min_value=0.0, max_value=0.999),
    seed=st.integers(min_value=0, max_value=1000),
)
def test_state_round_trip_property(n_before: int, n_after: int, decay: float, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    snaps = [{"w": torch.randn(7, 3, generator=gen), "n": torch.tensor(i)} for i in range(n_before + n_after)]
    rules = {"m": wa.mean(), "e": wa.ema(decay=decay)}
    straight = wa.Averager(snaps[0], rule=rules)
    first = wa.Averager(snaps[0], rule=rules)
    for s in snaps:
        straight.update(s)
    for s in snaps[:n_before]:
        first.update(s)
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    buf.seek(0)
    second = wa.Averager(snaps[0], rule=rules)
    second.load_state_dict(torch.load(buf, weights_only=True))
    for s in snaps[n_before:]:
        second.update(s)
    for slot in rules:
        for k, v in straight.averaged_tensors(slot).items():
            assert torch.equal(second.averaged_tensors(slot)[k], v)


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: wa.ema(decay=1.0), r"decay=1\.0 is invalid: expected a number in \[0, 1\)"),
        (lambda: wa.ema(decay=-0.1), r"decay=-0\.1"),
        (lambda: wa.ema(half_life=-3), r"half_life=-3 is invalid: expected a positive"),
        (lambda: wa.ema(), r"exactly one"),
        (lambda: wa.ema(0.9, half_life=3), r"exactly one"),
        (lambda: wa.karras_ema(gamma=-2), r"gamma=-2"),
        (lambda: wa.Averager(nn.Linear(2, 2), buffers="avg"),
         r"buffers='avg' is invalid: expected 'average', 'copy' or 'ignore'"),
        (lambda: wa.Averager(nn.Linear(2, 2), params="frozen"), r"params='frozen'"),
        (lambda: wa.Averager(nn.Linear(2, 2), nonfinite="warn"), r"nonfinite='warn'"),
        (lambda: wa.Averager(nn.Linear(2, 2), dtype=torch.int32), r"dtype=torch\.int32"),
        (lambda: wa.Averager(nn.Linear(2, 2), rule=0.999), r"rule=0\.999 is invalid"),
        (lambda: wa.Averager("model"), r"model='str' is invalid: expected a torch\.nn\.Module"),
        (lambda: wa.Averager(nn.Linear(2, 2), include="nothing*"), r"at least one tensor"),
    ],
)
def test_bad_input_names_argument_value_and_expectation(call, match: str) -> None:
    with pytest.raises(wa.ConfigError, match=match):
        call()


def test_update_step_must_not_go_back(convbn: ConvBN) -> None:
    avg = wa.Averager(convbn)
    avg.update(convbn, step=10)
    with pytest.raises(wa.ConfigError, match=r"step=5"):
        avg.update(convbn, step=5)


def test_repr_and_summary(convbn: ConvBN) -> None:
    avg = wa.Averager(convbn, rule=wa.ema(half_life=100))
    assert "ema(half_life=100)" in repr(avg)
    s = avg.summary()
    assert "averaged in float32" in s and "buffers='average'" in s and "1 copied" in s
    assert s.endswith("updates: 0"), s
    avg.update(convbn)
    assert avg.summary().endswith("updates: 1")


# ----------------------------------------------------------------------------- contiguous sources


def _twin_models(dtype: torch.dtype = torch.float32) -> tuple[ManySmall, ManySmall]:
    a = ManySmall(blocks=12).to(dtype)
    b = copy.deepcopy(a)
    wa.make_contiguous(b)
    return a, b


def test_make_contiguous_keeps_parameters_values_and_optimizer() -> None:
    a, b = _twin_models()
    params_before = list(b.parameters())
    opt = torch.optim.SGD(b.parameters(), lr=0.1)
    wa.make_contiguous(b)  # idempotent
    assert [id(p) for p in b.parameters()] == [id(p) for p in params_before]
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb)
    storages = {p.untyped_storage().data_ptr() for p in b.parameters()}
    assert len(storages) == 1
    b(torch.randn(2, 4, 5)).sum().backward()
    opt.step()  # the optimizer still updates the (moved) parameters
    assert not torch.equal(b.blocks[0][0].weight, a.blocks[0][0].weight)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_contiguous_sources_take_one_span_and_match_packed_path(dtype: torch.dtype) -> None:
    a, b = _twin_models(dtype)
    rules = {"ema": wa.ema(decay=0.8), "swa": wa.mean()}
    avg_a, avg_b = wa.Averager(a, rule=rules), wa.Averager(b, rule=rules)
    g = torch.Generator().manual_seed(0)
    for _ in range(4):
        with torch.no_grad():
            for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
                d = torch.randn(pa.shape, generator=g).to(dtype)
                pa.add_(d)
                pb.add_(d)
        avg_a.update(a)
        avg_b.update(b)
    binding = avg_b._binder.bindings[id(b)]
    assert all(s is not None for s, grp in zip(binding.spans, avg_b._groups, strict=True) if grp.averaged)
    assert all(s is None for s in avg_a._binder.bindings[id(a)].spans)
    for slot in rules:
        for n, t in avg_a.averaged_tensors(slot).items():
            assert torch.equal(avg_b.averaged_tensors(slot)[n], t), (slot, n)


def test_contiguous_path_refuses_nonfinite_and_falls_back_when_tiling_breaks() -> None:
    a, b = _twin_models()
    avg_a, avg_b = wa.Averager(a, rule=wa.ema(decay=0.5)), wa.Averager(b, rule=wa.ema(decay=0.5))
    avg_a.update(a)
    avg_b.update(b)
    with torch.no_grad():
        b.blocks[3][1].bias[0] = float("nan")
    with pytest.raises(wa.NonFiniteError, match=r"blocks\.3\.1\.bias"):
        avg_b.update(b)
    with torch.no_grad():
        b.blocks[3][1].bias[0] = a.blocks[3][1].bias[0]
        b.blocks[5][0].weight.data = b.blocks[5][0].weight.data.clone() + 1.0  # breaks the tiling
        a.blocks[5][0].weight.add_(1.0)
    avg_b.refresh()
    avg_a.update(a)
    avg_b.update(b)
    assert avg_b._binder.bindings[id(b)].spans[0] is None  # generic path now
    for n, t in avg_a.averaged_tensors().items():
        assert torch.equal(avg_b.averaged_tensors()[n], t), n


@pytest.mark.parametrize("plannable", [True, False], ids=["plan", "general"])
@pytest.mark.parametrize("scratch", [pytest.param(1000, id="region-above-scratch"),
                                     pytest.param(1 << 20, id="region-in-scratch")])
def test_checked_update_gathers_each_packed_source_once_in_bounded_scratch(
    monkeypatch: pytest.MonkeyPatch, scratch: int, plannable: bool
) -> None:
    """A checked update gathers every packed chunk once when the packed region fits the scratch (the
    check's gathers are kept for the update: as many gathers as an unchecked update); a region above
    the scratch is gathered again by the update rather than kept (never a scratch of the region's
    size: no model-sized temporary)."""
    monkeypatch.setattr(_storage, "_CHUNK", 300)
    monkeypatch.setattr(_executor, "_SCRATCH", scratch)
    model = ManySmall()
    avgs = {nf: wa.Averager(model, rule=wa.ema(decay=0.7), nonfinite=nf) for nf in ("raise", "allow")}
    for a in avgs.values():
        a._executor.plannable = plannable  # type: ignore[attr-defined]
        a.update(model)  # the first update copies
    cats: list[int] = []
    cat = torch.cat
    monkeypatch.setattr(torch, "cat", lambda *a, **k: (cats.append(1), cat(*a, **k))[1])
    counts = {}
    for nf, a in avgs.items():
        cats.clear()
        a.update(model)
        counts[nf] = len(cats)
    packed = max(g.packed_numel for g in avgs["raise"]._store.groups)  # type: ignore[attr-defined]
    assert counts["allow"] > 1
    assert counts["raise"] == counts["allow"] * (1 if packed <= scratch else 2)
    largest = max(b.numel() for b in avgs["raise"]._executor.scratch.values())  # type: ignore[attr-defined]
    assert (largest < packed) == (packed > scratch)


@pytest.mark.parametrize("bad", ["f32", "f64"])
def test_nan_is_refused_in_either_dtype_when_many_tensors_are_checked(bad: str) -> None:
    """More checked tensors than are read one by one (11 > _FEW), in two dtypes: their partial
    sums are combined per dtype first, and a NaN in either dtype's tensors refuses the update."""

    class Mixed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.f32 = nn.ParameterList(nn.Parameter(torch.ones(10_000)) for _ in range(6))
            self.f64 = nn.ParameterList(nn.Parameter(torch.ones(10_000, dtype=torch.float64)) for _ in range(5))

    model = Mixed()
    assert 2 * _executor._FEW > 11 > _executor._FEW
    avg = wa.Averager(model, rule=wa.ema(decay=0.5), nonfinite="skip")
    assert avg.update(model)
    with torch.no_grad():
        getattr(model, bad)[3][7] = float("nan")
    assert not avg.update(model)
    assert (avg.num_updates, avg.num_skipped) == (1, 1)
