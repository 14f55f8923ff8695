"""SWA / EMA policies in a plain PyTorch loop, against independent references."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from torch import nn
from torch.optim.swa_utils import SWALR, AveragedModel

import weightavg as wa
from weightavg.functional import compute_ema

from .reference import ema_closed_form, mean_of

SPE = 4  # steps per epoch in these loops


class Net(nn.Module):
    """Linear + BatchNorm + Linear on 6 features."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.bn = nn.BatchNorm1d(8)
        self.fc2 = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.bn(self.fc1(x))))


def batches(n: int = SPE, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 6, generator=g), torch.randint(0, 2, (8,), generator=g)) for _ in range(n)]


def params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def train_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> None:
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    opt.zero_grad()


def run_epochs(policy: wa.AveragingPolicy, epochs: int, *, lr: float = 0.1, data=None, total=None,
               sched_fn=None, on_step=None, bn_data=None):
    """Train Net for `epochs` epochs of SPE steps; return (model, opt, per-step params, lrs used)."""
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    sched = sched_fn(opt) if sched_fn else None
    data = data if data is not None else batches()
    policy.begin(model, opt, steps_per_epoch=SPE, total_steps=total or epochs * SPE,
                 bn_data=bn_data if bn_data is not None else data)
    snaps, lrs = [], []
    seen = []
    opt.register_step_pre_hook(lambda o, a, k: seen.append(o.param_groups[0]["lr"]))
    for _ in range(epochs):
        for x, y in data:
            train_step(model, opt, x, y)
            snaps.append(params(model))
            if on_step:
                on_step()
        if sched:
            sched.step()
        policy.on_epoch_end()
    lrs = seen
    return model, opt, snaps, lrs


# ----------------------------------------------------------------------------- SWA windows


def test_swa_epoch_snapshots_are_exactly_the_window_epochs() -> None:
    # swa_start='2ep': epochs 2, 3, 4 (0-based) are averaged, at their ends; nothing before
    swa = wa.SWA(swa_start="2ep", recompute_bn=False)
    _, _, snaps, _ = run_epochs(swa, 5)
    ends = [snaps[SPE * (e + 1) - 1] for e in (2, 3, 4)]
    ref = mean_of(ends)
    got = swa.averager.averaged_tensors()
    for k, v in ref.items():
        torch.testing.assert_close(got[k].double(), v, rtol=1e-6, atol=1e-6)
    assert swa.num_updates == 3


def test_swa_step_interval_matches_torch_averaged_model() -> None:
    # Composer's example: swa_start='1ep', swa_end='2ep', update_interval='5ba' (here 2ba)
    swa = wa.SWA(swa_start="1ep", swa_end="2ep", update_interval="2ba", recompute_bn=False)
    _, _, snaps, _ = run_epochs(swa, 3)
    source = Net()
    ref = AveragedModel(source)
    picked = [i for i in range(len(snaps)) if SPE <= i < 2 * SPE and (i + 1 - SPE) % 2 == 0]
    assert picked == [5, 7]
    for i in picked:
        source.load_state_dict(snaps[i], strict=False)
        ref.update_parameters(source)
    got = swa.averager.averaged_tensors()
    for k, v in ref.module.named_parameters():
        torch.testing.assert_close(got[k], v.detach())


@pytest.mark.parametrize(
    ("start", "end", "interval", "expected"),
    [
        pytest.param(0, None, 1, list(range(1, 13)), id="every-step"),
        pytest.param(3, 9, 2, [5, 7, 9], id="steps-window"),
        pytest.param("1ep", "2ep", "1ba", [5, 6, 7, 8], id="epoch-window"),
        pytest.param("0.5dur", None, 3, [9, 12], id="dur-start"),
    ],
)
def test_should_update_steps(start, end, interval, expected) -> None:
    got = []

    class Recording(wa.SWA):
        def should_update(self, step_idx=None, epoch_idx=None) -> bool:
            ok = super().should_update(step_idx=step_idx, epoch_idx=epoch_idx)
            if ok and step_idx is not None:
                got.append(step_idx + 1)
            return ok

    run_epochs(Recording(swa_start=start, swa_end=end, update_interval=interval, recompute_bn=False), 3)
    assert got == expected


def test_should_update_override_takes_control() -> None:
    class Odd(wa.SWA):
        def should_update(self, step_idx=None, epoch_idx=None) -> bool:
            return step_idx is not None and step_idx % 2 == 1

    swa = Odd(swa_start=0, recompute_bn=False)
    _, _, snaps, _ = run_epochs(swa, 2)
    ref = mean_of([snaps[i] for i in (1, 3, 5, 7)])
    for k, v in ref.items():
        torch.testing.assert_close(swa.averager.averaged_tensors()[k].double(), v, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- EMA


def test_ema_half_life_with_interval_matches_slow_loop() -> None:
    ema = wa.EMA(half_life="6ba", update_interval="2ba", ema_start=2)
    _, _, snaps, _ = run_epochs(ema, 3)
    # updates after steps 4, 6, 8, 10, 12; decay per update 2^(-2/6) (interval-aware)
    picked = [snaps[t - 1] for t in (4, 6, 8, 10, 12)]
    ref = ema_closed_form(picked, 2 ** (-2 / 6))
    got = ema.averager.averaged_tensors()
    for k, v in ref.items():
        torch.testing.assert_close(got[k].double(), v, rtol=1e-6, atol=1e-6)


def test_ema_smoothing_and_composer_defaults() -> None:
    ema = wa.EMA(smoothing=0.8)
    assert str(ema.update_interval) == "1ba"
    assert str(wa.EMA(half_life="1ep").update_interval) == "1ep"  # one unit of the half-life
    _, _, snaps, _ = run_epochs(ema, 2)
    ref = ema_closed_form(snaps, 0.8)
    for k, v in ref.items():
        torch.testing.assert_close(ema.averager.averaged_tensors()[k].double(), v, rtol=1e-6, atol=1e-6)


def test_ema_warmup_forgets_the_start_quickly() -> None:
    ema = wa.EMA(smoothing=0.99, warmup=True, warmup_power=1.0)
    _, _, snaps, _ = run_epochs(ema, 2)
    # decay_s = min(0.99, 1 - 1/(1+s)) with s = step - 1 - 1 (timm): a slow loop
    ref = {k: v.double() for k, v in snaps[0].items()}
    for t in range(2, 9):
        s = max(0, t - 1)
        d = min(0.99, 1 - (1 + s) ** -1.0)
        ref = {k: d * ref[k] + (1 - d) * snaps[t - 1][k].double() for k in ref}
    for k, v in ref.items():
        torch.testing.assert_close(ema.averager.averaged_tensors()[k].double(), v, rtol=1e-6, atol=1e-6)


def test_compute_ema_matches_composer_formula_and_copies_int_buffers() -> None:
    torch.manual_seed(0)
    model, data = Net(), batches()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ema_model = copy.deepcopy(model)
    ref = {k: v.detach().double().clone() for k, v in ema_model.state_dict().items()}
    for x, y in data:
        train_step(model, opt, x, y)
        compute_ema(model, ema_model, smoothing=0.9)
        for k, v in model.state_dict().items():
            ref[k] = v.double().clone() if not v.is_floating_point() else 0.9 * ref[k] + 0.1 * v.double()
    for k, v in ema_model.state_dict().items():
        torch.testing.assert_close(v.double(), ref[k], rtol=1e-6, atol=1e-6, msg=k)
    assert ema_model.bn.num_batches_tracked.dtype == torch.long
    assert int(ema_model.bn.num_batches_tracked) == len(data)
    with torch.no_grad():  # ema_model belongs to the user: an outside change is honoured
        ema_model.fc2.bias.fill_(1.0)
    compute_ema(model, ema_model, smoothing=0.5)
    torch.testing.assert_close(ema_model.fc2.bias, 0.5 + 0.5 * model.fc2.bias.detach())


# ----------------------------------------------------------------------------- optimizer steps


def test_gradient_accumulation_counts_optimizer_steps_not_micro_batches() -> None:
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ema = wa.EMA(smoothing=0.5)
    ema.begin(model, opt)
    snaps = []
    for i, (x, y) in enumerate(batches(8)):
        (nn.functional.cross_entropy(model(x), y) / 4).backward()
        if (i + 1) % 4 == 0:
            opt.step()
            opt.zero_grad()
            snaps.append(params(model))
    assert ema.steps == 2 and ema.num_updates == 2
    ref = ema_closed_form(snaps, 0.5)
    for k, v in ref.items():
        torch.testing.assert_close(ema.averager.averaged_tensors()[k].double(), v, rtol=1e-6, atol=1e-6)


def test_steps_skipped_by_grad_scaler_are_not_counted() -> None:
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ema = wa.EMA(smoothing=0.5)
    ema.begin(model, opt)
    scaler = torch.amp.GradScaler("cpu")
    for i in range(4):
        scaler.scale(model(torch.randn(2, 3)).sum()).backward()
        if i == 1:
            model.weight.grad[0, 0] = float("inf")  # overflow: the scaler skips this step
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
    assert ema.steps == 3 and ema.num_updates == 3


def test_two_optimizers_count_one_step_when_both_stepped() -> None:
    # GAN-like: D steps twice per G step; the policy over the whole model counts G's pace
    torch.manual_seed(0)
    g, d = nn.Linear(2, 2), nn.Linear(2, 1)
    both = nn.ModuleDict({"g": g, "d": d})
    opt_g = torch.optim.SGD(g.parameters(), lr=0.1)
    opt_d = torch.optim.SGD(d.parameters(), lr=0.1)
    ema_all = wa.EMA(smoothing=0.5, eval_with="training", final="training")
    ema_all.begin(both, [opt_d, opt_g])
    ema_g = wa.EMA(smoothing=0.5)  # a second policy on the generator alone, its own optimizer
    ema_g.begin(g, opt_g)
    g_snaps = []
    for _ in range(3):
        for _ in range(2):
            d(g(torch.randn(4, 2))).mean().backward()
            opt_d.step()
            opt_d.zero_grad()
        (-d(g(torch.randn(4, 2)))).mean().backward()
        opt_g.step()
        opt_g.zero_grad()
        opt_d.zero_grad()
        g_snaps.append(params(g))
    assert ema_all.steps == 3 and ema_all.num_updates == 3
    assert ema_g.steps == 3
    ref = ema_closed_form(g_snaps, 0.5)
    for k, v in ref.items():
        torch.testing.assert_close(ema_g.averager.averaged_tensors()[k].double(), v, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(ema_all.averager.averaged_tensors()["g." + k].double(), v,
                                   rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- learning rate


def test_without_swa_lr_the_learning_rate_is_untouched() -> None:
    def cosine(opt):
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=5)

    _, _, _, with_swa = run_epochs(wa.SWA(swa_start="1ep", recompute_bn=False), 5, sched_fn=cosine)
    torch.manual_seed(0)
    opt = torch.optim.SGD(Net().parameters(), lr=0.1, momentum=0.9)
    sched = cosine(opt)
    ref = []
    for _ in range(5):
        ref += [opt.param_groups[0]["lr"]] * SPE
        opt.step()
        sched.step()
    assert with_swa == ref


def test_swa_lr_per_epoch_matches_torch_swalr_blog_loop() -> None:
    # the blog's loop: CosineAnnealingLR until swa_start, then SWALR(swa_lr=0.05), stepped per epoch
    epochs, swa_start = 9, 3
    torch.manual_seed(0)
    opt = torch.optim.SGD(Net().parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    swa_sched = None
    ref = []
    for epoch in range(epochs):
        ref += [opt.param_groups[0]["lr"]] * SPE
        opt.step()
        if epoch >= swa_start - 1:
            if swa_sched is None:
                sched.step()  # the epoch before the SWA phase ends with the user's step
                swa_sched = SWALR(opt, swa_lr=0.05, anneal_epochs=3)
            else:
                swa_sched.step()
        else:
            sched.step()

    def cosine(opt):
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)

    # ours: the user's scheduler keeps stepping; the policy sets the SWA rate inside the window
    swa = wa.SWA(swa_start=f"{swa_start}ep", swa_lr=0.05, anneal_steps="3ep", recompute_bn=False)
    _, _, _, got = run_epochs(swa, epochs, sched_fn=cosine)
    assert got == pytest.approx(ref, rel=1e-12)


def test_swa_lr_per_step_anneal_and_list_per_group() -> None:
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.SGD([{"params": model.fc1.parameters(), "lr": 0.1},
                           {"params": [*model.bn.parameters(), *model.fc2.parameters()], "lr": 0.2}])
    swa = wa.SWA(swa_start=2, swa_lr=[0.01, 0.02], anneal_steps=4, anneal_strategy="linear",
                 recompute_bn=False, update_interval=1)
    swa.begin(model, opt, bn_data=batches())
    used = []
    opt.register_step_pre_hook(lambda o, a, k: used.append([g["lr"] for g in o.param_groups]))
    for x, y in batches(8):
        train_step(model, opt, x, y)
    expected = [[0.1, 0.2], [0.1, 0.2]] + [
        [wa._schedules.swa_anneal_lr(a, b, i, 4, "linear") for a, b in ((0.1, 0.01), (0.2, 0.02))]
        for i in range(6)]
    assert [lr for row in used for lr in row] == pytest.approx([lr for row in expected for lr in row])
    with pytest.raises(wa.ConfigError, match=r"swa_lr.*2 floats"):
        wa.SWA(swa_start=0, swa_lr=[0.1, 0.2, 0.3]).begin(model, opt)


def test_cyclic_swa_averages_at_every_cycle_minimum() -> None:
    swa = wa.SWA(swa_start="1ep", swa_lr=0.01, cycle=3, anneal_strategy="linear", recompute_bn=False)
    _, _, snaps, lrs = run_epochs(swa, 4)
    phase = lrs[SPE:]
    expected = [wa._schedules.swa_cyclic_lr(0.1, 0.01, i, 3, "linear") for i in range(len(phase))]
    assert phase == pytest.approx(expected)
    minima = [SPE + i for i in range(len(phase)) if i % 3 == 2]  # step index using lr = 0.01
    assert all(lrs[i] == pytest.approx(0.01) for i in minima)
    ref = mean_of([snaps[i] for i in minima])
    assert swa.num_updates == len(minima)
    for k, v in ref.items():
        torch.testing.assert_close(swa.averager.averaged_tensors()[k].double(), v, rtol=1e-6, atol=1e-6)


def test_swa_anneal_lr_scheduler_matches_torch_swalr() -> None:
    for strategy, anneal in (("cos", 3), ("linear", 5), ("cos", 0)):
        opt_a = torch.optim.SGD(nn.Linear(2, 1).parameters(), lr=0.3)
        opt_b = torch.optim.SGD(nn.Linear(2, 1).parameters(), lr=0.3)
        a = wa.SWAAnnealLR(opt_a, swa_lr=0.02, anneal_steps=anneal, anneal_strategy=strategy)
        b = SWALR(opt_b, swa_lr=0.02, anneal_epochs=anneal, anneal_strategy=strategy)
        for _ in range(8):
            assert a.get_last_lr() == pytest.approx(b.get_last_lr(), rel=1e-12)
            opt_a.step(), opt_b.step(), a.step(), b.step()
        state = a.state_dict()
        c = wa.SWAAnnealLR(torch.optim.SGD(nn.Linear(2, 1).parameters(), lr=0.3), swa_lr=0.02,
                           anneal_steps=anneal, anneal_strategy=strategy)
        c.load_state_dict(state)
        assert c.start_lrs == a.start_lrs


def test_anneal_scheduler_composes_with_the_users_scheduler() -> None:
    opt = torch.optim.SGD(nn.Linear(2, 1).parameters(), lr=1.0)
    user = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    swa = wa.SWAAnnealLR(opt, swa_lr=0.1, anneal_steps=2, anneal_strategy="linear", start=2)
    lrs = []
    for _ in range(5):
        opt.step()
        user.step()
        swa.step()
        lrs.append(opt.param_groups[0]["lr"])
    # the user's schedule until the phase (1 -> 0.5 -> 0.25), then from 0.25 down to 0.1
    assert lrs == pytest.approx([0.5, 0.25, 0.175, 0.1, 0.1])


# ----------------------------------------------------------------------------- BatchNorm


def test_averaged_weights_get_fresh_bn_without_touching_training_state() -> None:
    swa = wa.SWA(swa_start="1ep", bn_batches=None)
    data = batches(SPE, seed=1)
    xs = torch.cat([x for x, _ in data])
    # a shuffling loader draws from the global RNG when iterated: the policy must hide that
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(xs), batch_size=8, shuffle=True)
    model, opt, _, _ = run_epochs(swa, 3, data=data, bn_data=loader)
    assert swa.bn_stale
    before = copy.deepcopy(model.state_dict())
    opt_before = copy.deepcopy(opt.state_dict())
    rng = torch.get_rng_state()
    # reference: a copy holding the averaged weights sees all batches as one (momentum 1)
    ref = copy.deepcopy(model)
    ref.load_state_dict(swa.averager.export_state_dict(model))
    ref.train()
    ref.bn.momentum = 1.0
    with torch.no_grad():
        ref(xs)
    ref.bn.momentum = 0.1
    floats = [k for k, v in ref.state_dict().items() if v.is_floating_point()]
    with swa.averaged() as m:
        assert m is model
        for k in floats:
            torch.testing.assert_close(m.state_dict()[k], ref.state_dict()[k], msg=k)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert torch.equal(torch.get_rng_state(), rng)
    assert str(opt.state_dict()) == str(opt_before)
    assert swa.steps == 3 * SPE and swa.epochs == 3
    exported = swa.export_state_dict()
    torch.testing.assert_close(exported["bn.running_var"], ref.bn.running_var)
    swa.end()  # final: the model holds the averaged weights and fresh statistics
    assert not swa.bn_stale
    for k in floats:
        torch.testing.assert_close(model.state_dict()[k], ref.state_dict()[k], msg=k)


def test_final_training_keeps_training_weights() -> None:
    swa = wa.SWA(swa_start="1ep", final="training", recompute_bn=False)
    model, _, snaps, _ = run_epochs(swa, 2)
    swa.end()
    assert torch.equal(model.fc1.weight, snaps[-1]["fc1.weight"])


# ----------------------------------------------------------------------------- resume


def _resumable_run(make_policy, stop_at: int | None, total_epochs: int = 4) -> dict[str, torch.Tensor]:
    """Train; if stop_at is given, checkpoint after that many steps and resume in fresh objects."""
    data = batches(SPE, seed=3)
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.7)
    policy = make_policy()
    policy.begin(model, opt, steps_per_epoch=SPE, total_steps=SPE * total_epochs, bn_data=data)
    step = 0
    for epoch in range(total_epochs):
        for i, (x, y) in enumerate(data):
            if epoch * SPE + i < step:
                continue  # batches consumed before the interruption
            train_step(model, opt, x, y)
            step += 1
            if step == stop_at:
                buf = io.BytesIO()
                torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                            "policy": policy.state_dict(), "step": step}, buf)
                policy.detach()
                buf.seek(0)
                ck = torch.load(buf, weights_only=True)
                model = Net()
                model.load_state_dict(ck["model"])
                opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
                opt.load_state_dict(ck["opt"])
                sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.7)
                sched.load_state_dict(ck["sched"])
                policy = make_policy()
                policy.load_state_dict(ck["policy"])  # before begin: kept until begin
                policy.begin(model, opt, steps_per_epoch=SPE, total_steps=SPE * total_epochs, bn_data=data)
        sched.step()
        policy.on_epoch_end()
        with policy.averaged():
            pass  # an evaluation every epoch (BN refresh) must not disturb anything
    policy.end()
    return {**model.state_dict(), **{f"opt.{k}": v for k, v in opt.state_dict()["state"][0].items()}}


POLICIES = {
    "swa-epochs-lr": lambda: wa.SWA(swa_start="2ep", swa_lr=0.05, anneal_steps="1ep", bn_batches=2),
    "swa-steps-cyclic": lambda: wa.SWA(swa_start=5, swa_lr=0.01, cycle=3, bn_batches=2),
    "ema-half-life": lambda: wa.EMA(half_life="3ba", ema_start=3, update_interval=2),
}


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)`:UserWarning")
@pytest.mark.parametrize("kind", list(POLICIES))
def test_resume_is_bit_identical_wherever_interrupted(kind: str) -> None:
    # every interruption point: before the window, at its opening, inside it, at epoch ends
    make = POLICIES[kind]
    full = _resumable_run(make, None)
    for stop_at in range(1, 16):
        resumed = _resumable_run(make, stop_at)
        for k, v in full.items():
            assert torch.equal(v, resumed[k]), (stop_at, k)


def test_state_dict_before_begin_and_kind_check() -> None:
    swa = wa.SWA(swa_start=0, recompute_bn=False)
    _, _, _, _ = run_epochs(swa, 1)
    state = swa.state_dict()
    with pytest.raises(wa.StateError, match="'swa' policy"):
        wa.EMA().load_state_dict(state)
    other = wa.SWA(swa_start=0, recompute_bn=False)
    other.load_state_dict(state)
    assert other.state_dict() is not state and other.state_dict()["steps"] == SPE


# ----------------------------------------------------------------------------- configuration errors


@pytest.mark.parametrize(
    ("build", "match"),
    [
        pytest.param(lambda: wa.SWA(swa_start="2ep", swa_end="1ep"), "swa_start='2ep'.*before swa_end", id="start>end"),
        pytest.param(lambda: wa.SWA(swa_start="1fortnight"), "swa_start", id="unit"),
        pytest.param(lambda: wa.SWA(update_interval=0), "update_interval", id="interval0"),
        pytest.param(lambda: wa.SWA(anneal_strategy="step"), "anneal_strategy", id="strategy"),
        pytest.param(lambda: wa.SWA(swa_lr=-1.0), "swa_lr", id="negative-lr"),
        pytest.param(lambda: wa.SWA(cycle=3), "swa_lr", id="cycle-needs-swa-lr"),
        pytest.param(lambda: wa.EMA(half_life="10ba", smoothing=0.9), "half_life/smoothing", id="ema-both"),
        pytest.param(lambda: wa.EMA(smoothing=1.0), "smoothing", id="smoothing-range"),
        pytest.param(lambda: wa.EMA(eval_with="ema"), "eval_with", id="eval-with"),
    ],
)
def test_bad_configuration_fails_at_construction(build, match) -> None:
    with pytest.raises(wa.ConfigError, match=match):
        build()


def _begin(policy: wa.AveragingPolicy, **kw) -> None:
    model = nn.Linear(2, 2)
    policy.begin(model, torch.optim.SGD(model.parameters(), lr=0.1), **kw)


@pytest.mark.parametrize(
    ("policy", "kw", "match"),
    [
        pytest.param(wa.SWA(swa_start="0.7dur"), {}, "swa_start='0.7dur'.*total_steps", id="dur-no-total"),
        pytest.param(wa.SWA(swa_start="100sp"), {}, "swa_start='100sp'.*samples_per_step", id="samples"),
        pytest.param(wa.SWA(swa_start="0.5ep"), {}, "swa_start='0.5ep'.*steps_per_epoch", id="half-epoch"),
        pytest.param(wa.EMA(half_life="2ep"), {}, "half_life='2ep'", id="ema-epoch-half-life"),
        pytest.param(wa.SWA(swa_start="2ep", swa_end="0.1dur"), {"total_steps": 40, "steps_per_epoch": 10},
                     "before swa_end", id="start>end-resolved"),
        pytest.param(wa.SWA(swa_start=0, swa_lr=[0.1, 0.2]), {}, "swa_lr.*1 floats", id="swa-lr-length"),
    ],
)
def test_bad_configuration_fails_at_begin(policy, kw, match) -> None:
    with pytest.raises(wa.ConfigError, match=match):
        _begin(policy, **kw)


def test_batchnorm_without_bn_data_fails_at_begin() -> None:
    model = Net()
    with pytest.raises(wa.ConfigError, match="bn_data"):
        wa.SWA().begin(model, torch.optim.SGD(model.parameters(), lr=0.1), total_steps=10)
    with pytest.raises(wa.ConfigError, match="buffers"):
        wa.SWA(buffers="ignore").begin(model, torch.optim.SGD(model.parameters(), lr=0.1), total_steps=10,
                                       bn_data=batches())
    wa.EMA().begin(model, torch.optim.SGD(model.parameters(), lr=0.1))  # EMA averages BN stats


def test_two_policies_writing_the_same_model_fail_at_begin() -> None:
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    first = wa.EMA(smoothing=0.9)
    first.begin(model, opt)
    with pytest.raises(wa.ConfigError, match="two policies write averaged weights"):
        wa.EMA(half_life="5ba").begin(model.fc1, opt)  # a sub-model overlaps too
    wa.EMA(half_life="5ba", eval_with="training", final="training").begin(model, opt)
    first.end()
    wa.EMA(half_life="5ba").begin(model, opt)  # the first one is done


def test_time_units_counted_without_epoch_length() -> None:
    # whole epochs need no steps_per_epoch (iterable datasets): counted from on_epoch_end
    model = nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    swa = wa.SWA(swa_start="1ep", update_interval="1ep")
    swa.begin(model, opt)
    for _ in range(3):
        for _ in range(int(3 + math.floor(torch.rand(1).item() * 3))):  # uneven epochs
            model(torch.randn(2, 2)).sum().backward()
            opt.step()
            opt.zero_grad()
        swa.on_epoch_end()
    assert swa.num_updates == 2


def test_fused_optimizer_steps_skipped_by_grad_scaler_are_not_counted() -> None:
    # a fused optimizer is called by GradScaler even on overflow (it skips inside the kernel)
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    opt = torch.optim.Adam(model.parameters(), lr=0.1, fused=True)
    ema = wa.EMA(smoothing=0.5)
    ema.begin(model, opt)
    scaler = torch.amp.GradScaler("cpu")
    calls = []
    opt.register_step_post_hook(lambda o, a, k: calls.append(1))
    for i in range(4):
        scaler.scale(model(torch.randn(2, 3)).sum()).backward()
        if i == 1:
            model.weight.grad[0, 0] = float("inf")
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
    assert len(calls) == 4  # the hooks did run four times
    assert ema.steps == 3 and ema.num_updates == 3


def test_begin_again_starts_a_fresh_run() -> None:
    swa = wa.SWA(swa_start=0, update_interval=1, recompute_bn=False)
    run_epochs(swa, 1)
    assert swa.steps == SPE and swa.num_updates == SPE
    run_epochs(swa, 1)  # a second fit with the same policy object
    assert swa.steps == SPE and swa.epochs == 1 and swa.num_updates == SPE


def test_swa_with_a_custom_avg_fn_in_torch_convention() -> None:
    # Lightning/torch avg_fn(averaged, new, num_averaged): here an EMA with decay 0.75
    def avg_fn(avg: torch.Tensor, new: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        assert isinstance(n, torch.Tensor)
        return 0.75 * avg + 0.25 * new

    swa = wa.SWA(swa_start=0, update_interval=1, avg_fn=avg_fn, recompute_bn=False)
    _, _, snaps, _ = run_epochs(swa, 2)
    ref = ema_closed_form(snaps, 0.75)
    for k, v in ref.items():
        torch.testing.assert_close(swa.averager.averaged_tensors()[k].double(), v, rtol=1e-6, atol=1e-6)


def test_compute_ema_updates_ema_model_in_place_and_follows_it() -> None:
    """One copy (ema_model's tensors are the engine's storage); outside changes and casts honoured."""
    torch.manual_seed(0)
    model, data = Net(), batches()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ema_model = copy.deepcopy(model)
    params = [id(p) for p in ema_model.parameters()]
    compute_ema(model, ema_model, smoothing=0.8)
    with torch.no_grad():  # an in-place change with the same smoothing is honoured
        ema_model.fc2.bias.fill_(2.0)
    train_step(model, opt, *data[0])
    compute_ema(model, ema_model, smoothing=0.8)
    torch.testing.assert_close(ema_model.fc2.bias, 0.8 * 2.0 + 0.2 * model.fc2.bias.detach())
    assert [id(p) for p in ema_model.parameters()] == params
    ema_model.double()  # new storage: the next call starts again from the cast values
    model.double()
    before = ema_model.fc2.weight.detach().clone()
    compute_ema(model, ema_model, smoothing=0.8)
    torch.testing.assert_close(ema_model.fc2.weight, 0.8 * before + 0.2 * model.fc2.weight.detach().double())
    assert ema_model.fc2.weight.dtype == torch.float64
