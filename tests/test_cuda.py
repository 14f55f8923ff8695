"""The engine on a CUDA device (skipped without one): the same results as on CPU, no host sync.

``WEIGHTAVG_TEST_DEVICE=cpu`` runs the device-independent tests against the CPU (to check the
tests themselves on a machine without a GPU).
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
from torch import nn

import weightavg as wa

DEVICE = os.environ.get("WEIGHTAVG_TEST_DEVICE", "cuda")
pytestmark = pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(), reason="needs CUDA")

RULES = {
    "mean": lambda: wa.mean(),
    "ema": lambda: wa.ema(0.9),
    "half_life": lambda: wa.ema(half_life=3),
    "ema_warmup": lambda: wa.ema_warmup(power=0.75),
    "karras_ema": lambda: wa.karras_ema(gamma=6.94),
    "custom": lambda: wa.custom(lambda n: 1.0 / (n + 2)),
    "mean_sq": lambda: wa.mean(power=2),
    "inplace": lambda: wa.inplace(lambda a, new, n: torch._foreach_lerp_(list(a), list(new), 0.25)),
}


def model_on(device: str, dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(300, 300), nn.BatchNorm1d(300), nn.ReLU(), nn.Linear(300, 4))
    return m.to(device=device, dtype=dtype)


def drive(model: nn.Module, avgs: list[wa.Averager], n: int, bad: frozenset[int] = frozenset(), start: int = 0) -> None:
    g = torch.Generator().manual_seed(0)
    for i in range(n):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=g).to(p.device, p.dtype))
            if i in bad:
                model[0].weight[0, 0] = float("nan")
        for a in avgs:
            a.update(model, step=start + 2 * i + 1)
        with torch.no_grad():
            model[0].weight.nan_to_num_(0.0)


def assert_close(dev: wa.Averager, cpu: wa.Averager, tol: float = 1e-6) -> None:
    for slot in cpu.rules:
        want = cpu.averaged_tensors(slot)
        for k, v in dev.averaged_tensors(slot).items():
            torch.testing.assert_close(v.cpu().double(), want[k].double(), rtol=tol, atol=tol, msg=f"{slot} {k}")


@pytest.mark.parametrize("rule", [*RULES, "several"])
def test_every_rule_on_the_device_equals_cpu(rule: str) -> None:
    rules = {k: f() for k, f in RULES.items() if k != "inplace"} if rule == "several" else {rule: RULES[rule]()}
    on_dev, on_cpu = model_on(DEVICE), model_on("cpu")
    dev = wa.Averager(on_dev, rule=rules, nonfinite="skip")
    cpu = wa.Averager(on_cpu, rule=rules, nonfinite="skip")
    if DEVICE == "cuda":
        assert dev.check == ("host" if rule == "inplace" else "deferred")
    drive(on_dev, [dev], 8, frozenset({3}))
    drive(on_cpu, [cpu], 8, frozenset({3}))
    assert (dev.num_updates, dev.num_skipped) == (cpu.num_updates, cpu.num_skipped) == (7, 1)
    assert_close(dev, cpu)


@pytest.mark.parametrize("policy", ["ema", "ema_warmup", "swa"])
def test_policies_on_the_device_equal_cpu(policy: str) -> None:
    def run(device: str) -> dict[str, torch.Tensor]:
        model = model_on(device)
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        p: wa.AveragingPolicy
        if policy == "ema":
            p = wa.EMA(smoothing=0.9)
        elif policy == "ema_warmup":
            p = wa.EMA(half_life="5ba", warmup=True)
        else:
            p = wa.SWA(swa_start="1ep", update_interval="1ba", recompute_bn=False)
        p.begin(model, opt, steps_per_epoch=4, total_steps=12)
        g = torch.Generator().manual_seed(1)
        for _ in range(3):
            for _ in range(4):
                x = torch.randn(8, 300, generator=g).to(device)
                model(x).pow(2).mean().backward()
                opt.step()
                opt.zero_grad()
            p.on_epoch_end()
        return {k: v.cpu() for k, v in p.export_state_dict().items()}

    got, want = run(DEVICE), run("cpu")
    for k, v in want.items():
        torch.testing.assert_close(got[k].double(), v.double(), rtol=1e-5, atol=1e-6, msg=k)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("nonfinite", ["raise", "allow"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("device", [None, "cpu"], ids=["on-device", "offloaded"])
def test_no_host_sync_in_100_updates(nonfinite: str, dtype: torch.dtype, device: str | None) -> None:
    # offloaded (averages on the host): no sync in the caller's thread; the worker polls an event
    model = model_on("cuda", dtype)
    avg = wa.Averager(model, rule={"swa": wa.mean(), "ema": wa.ema(0.99), "k": wa.karras_ema(gamma=7.0)},
                      nonfinite=nonfinite, device=device)  # type: ignore[arg-type]
    avg.update(model)  # binding, scratch and staging (allocation is not a sync, but keep the first call out)
    avg.settle()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(100):
            avg.update(model)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert avg.num_updates == 101 and avg.num_skipped == 0


def test_bf16_model_on_the_device_equals_cpu() -> None:
    on_dev, on_cpu = model_on(DEVICE, torch.bfloat16), model_on("cpu", torch.bfloat16)
    rules = {"e": wa.ema(0.9), "m": wa.mean()}
    dev = wa.Averager(on_dev, rule=rules, nonfinite="skip")
    cpu = wa.Averager(on_cpu, rule=rules, nonfinite="skip")
    drive(on_dev, [dev], 6, frozenset({2}))
    drive(on_cpu, [cpu], 6, frozenset({2}))
    assert_close(dev, cpu, tol=1e-5)


@pytest.mark.parametrize("nonfinite", ["raise", "allow"])
def test_cpu_offload_equals_the_on_device_average(nonfinite: str) -> None:
    model = model_on(DEVICE)
    rules = {"e": wa.ema(0.9), "m": wa.mean()}
    off = wa.Averager(model, rule=rules, device="cpu", nonfinite=nonfinite)  # type: ignore[arg-type]
    on = wa.Averager(model, rule=rules, nonfinite=nonfinite)  # type: ignore[arg-type]
    drive(model, [off, on], 6)
    for slot in rules:
        assert all(v.device.type == "cpu" for v in off.averaged_tensors(slot).values())
    assert_close(off, on, tol=1e-6)
    if DEVICE == "cuda":  # the update ran beside the caller, through pinned staging
        assert off.check == "deferred"
        staging = off._executor.staging  # type: ignore[attr-defined]
        assert staging and all(buf.is_pinned() for buf in staging if buf is not None)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("rule", [*RULES, "several"])
def test_overlapped_offload_takes_the_value_at_the_update(rule: str) -> None:
    # the training stream overwrites the parameters right after each update (big kernels queued
    # behind the copies): the snapshot must hold the values as of the update, under every rule
    rules = {k: f() for k, f in RULES.items()} if rule == "several" else RULES[rule]()
    model = model_on("cuda")
    off = wa.Averager(model, rule=rules, device="cpu", nonfinite="skip")
    ref = wa.Averager(model_on("cpu"), rule=rules, nonfinite="skip", check="host")
    host = model_on("cpu")
    g = torch.Generator().manual_seed(0)
    for i in range(8):
        with torch.no_grad():
            for p, q in zip(model.parameters(), host.parameters(), strict=True):
                step = torch.randn(p.shape, generator=g)
                p.add_(step.cuda())
                q.add_(step)
            if i == 3:
                model[0].weight[0, 0] = float("nan")
                host[0].weight[0, 0] = float("nan")
        off.update(model, step=3 * i + 1)
        ref.update(host, step=3 * i + 1)
        with torch.no_grad():
            for _ in range(20):  # queued at once, behind the snapshot's copies
                for p in model.parameters():
                    p.mul_(1.01).nan_to_num_(0.0)
            model[0].weight.nan_to_num_(0.0)
            for p in model.parameters():
                p.div_(1.01 ** 20)
            host[0].weight.nan_to_num_(0.0)
        for p, q in zip(model.parameters(), host.parameters(), strict=True):
            with torch.no_grad():
                q.copy_(p.cpu())
    assert off.num_skipped == 1 and off.num_updates == 7
    assert_close(off, ref, tol=1e-6)


def test_swapped_in_and_state_on_the_device() -> None:
    model = model_on(DEVICE)
    avg = wa.Averager(model, rule=wa.ema(0.5))
    drive(model, [avg], 4)
    before = copy.deepcopy(model.state_dict())
    with avg.swapped_in(model):
        for k, v in avg.averaged_tensors().items():
            assert torch.equal(model.state_dict()[k], v.to(model.state_dict()[k].dtype))
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    resumed = wa.Averager(model, rule=wa.ema(0.5))
    resumed.load_state_dict(avg.state_dict())
    drive(model, [avg, resumed], 3, start=100)
    assert_close(resumed, avg, tol=0.0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.xfail(strict=False, reason="CUDA-graph capture of the deferred update: written without a GPU, unverified")
def test_cuda_graph_capture_of_a_deferred_update() -> None:
    # feasible for rules whose weight depends only on the device counter n (mean, ema with a
    # constant decay): storage, scratch and counters are static, nothing is read on the host;
    # time-dependent rules (half_life, karras_ema, schedules) bake the captured step in
    model = model_on("cuda")
    rules = {"m": wa.mean(), "e": wa.ema(0.9)}
    graphed = wa.Averager(model, rule=rules)
    eager = wa.Averager(model, rule=rules)
    assert graphed.check == "deferred"
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):  # warm up: binding, plan, scratch
            graphed.update(model)
            eager.update(model)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graphed.update(model)
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=g).to("cuda"))
        graph.replay()
        eager.update(model)
    torch.cuda.synchronize()
    assert graphed.num_updates == eager.num_updates == 8
    assert_close(graphed, eager, tol=0.0)
