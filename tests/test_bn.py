"""recompute_bn against a hand computation, and its promises about modes and data."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import weightavg as wa


class Net(nn.Module):
    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.inp = nn.Conv1d(2, 3, 3, padding=1)
        self.norm = norm
        self.drop = nn.Dropout(0.5)
        self.head = nn.Linear(3, 2)
        self.seen: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        self.seen.append(h.detach().clone())
        h = self.drop(torch.relu(self.norm(h)))
        return self.head(h.mean(-1))


def batches(sizes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 2, 6, generator=g) * 3 + 1 for n in sizes]


def test_batchnorm_stats_are_sample_weighted_pooled_statistics() -> None:
    net = Net(nn.BatchNorm1d(3))
    data = batches([5, 17, 2])
    n = wa.recompute_bn(net, data)
    assert n == 24
    h = torch.cat(net.seen).transpose(0, 1).reshape(3, -1).double().numpy()  # (C, N*L)
    np.testing.assert_allclose(net.norm.running_mean.numpy(), h.mean(1), rtol=1e-5)
    np.testing.assert_allclose(net.norm.running_var.numpy(), h.var(1, ddof=1), rtol=1e-5)


def test_mean_matches_torch_update_bn_with_equal_batches() -> None:
    net = Net(nn.BatchNorm1d(3))
    ref = Net(nn.BatchNorm1d(3))
    ref.load_state_dict(net.state_dict())
    ref.drop.p = 0.0
    net.drop.p = 0.0
    data = batches([8, 8, 8])
    wa.recompute_bn(net, data)
    torch.optim.swa_utils.update_bn(data, ref)
    torch.testing.assert_close(net.norm.running_mean, ref.norm.running_mean)


def test_modes_momentum_and_dropout() -> None:
    net = Net(nn.BatchNorm1d(3, momentum=0.3))
    net.train()
    net.head.eval()
    out_modes = {}

    def fwd(model, batch):
        out_modes["drop"] = model.drop.training
        out_modes["norm"] = model.norm.training
        return model(batch)

    wa.recompute_bn(net, batches([4]), forward_fn=fwd)
    assert out_modes == {"drop": False, "norm": True}  # dropout stays off, only norms train
    assert net.training and net.drop.training and not net.head.training  # every mode restored
    assert net.norm.momentum == 0.3


def test_num_batches_bounds_the_data_read() -> None:
    net = Net(nn.BatchNorm1d(3))
    read = []

    def stream():
        for i, b in enumerate(batches([4] * 10)):
            read.append(i)
            yield b

    assert wa.recompute_bn(net, stream(), num_batches=3) == 12
    assert read == [0, 1, 2]


def test_no_norm_layer_returns_without_touching_data() -> None:
    def explode():
        raise AssertionError("data was read")
        yield  # pragma: no cover

    assert wa.recompute_bn(nn.Linear(2, 2), explode()) == 0
    assert not wa.has_running_stats(nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2, track_running_stats=False)))


def test_dict_and_tuple_batches() -> None:
    class KW(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn = nn.BatchNorm1d(2)

        def forward(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
            return self.bn(x * scale)

    m = KW()
    x = torch.randn(10, 2)
    wa.recompute_bn(m, [{"x": x, "scale": torch.ones(10, 1)}])
    torch.testing.assert_close(m.bn.running_mean, x.mean(0))
    m2 = nn.Sequential(nn.BatchNorm1d(2))
    wa.recompute_bn(m2, [(x, torch.zeros(10))])  # (inputs, labels)
    torch.testing.assert_close(m2[0].running_var, x.var(0, unbiased=True))


def test_instancenorm_running_stats_are_averages_of_per_instance_stats() -> None:
    norm = nn.InstanceNorm1d(3, track_running_stats=True)
    net = Net(norm)
    wa.recompute_bn(net, batches([3, 5]))
    h = torch.cat(net.seen).double()  # (N, C, L)
    torch.testing.assert_close(norm.running_mean.double(), h.mean(2).mean(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(norm.running_var.double(), h.var(2, unbiased=True).mean(0), rtol=1e-5, atol=1e-6)


def test_syncbatchnorm_on_one_process() -> None:
    net = Net(nn.SyncBatchNorm(3))
    wa.recompute_bn(net, batches([6, 6]))
    h = torch.cat(net.seen).transpose(0, 1).reshape(3, -1).double()
    torch.testing.assert_close(net.norm.running_mean.double(), h.mean(1), rtol=1e-5, atol=1e-6)


def test_stats_restored_when_forward_raises() -> None:
    net = Net(nn.BatchNorm1d(3))
    before = net.norm.running_mean.clone()

    def bad(model, batch):
        model(batch)
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        wa.recompute_bn(net, batches([4]), forward_fn=bad)
    assert torch.equal(net.norm.running_mean, before)


@pytest.mark.parametrize("num_batches", [0, -1, 1.5, True])
def test_bad_num_batches(num_batches) -> None:
    with pytest.raises(wa.ConfigError, match="num_batches"):
        wa.recompute_bn(Net(nn.BatchNorm1d(3)), batches([2]), num_batches=num_batches)


@pytest.mark.parametrize("data", [[], iter([]), "exhausted"])
def test_no_batches_is_an_error_and_leaves_the_statistics(data) -> None:
    net = Net(nn.BatchNorm1d(3))
    net.norm.running_mean.fill_(0.5)
    if data == "exhausted":
        data = iter(batches([4]))
        list(data)
    with pytest.raises(wa.ConfigError, match=r"data=.*yielded none"):
        wa.recompute_bn(net, data)
    assert torch.equal(net.norm.running_mean, torch.full((3,), 0.5))


def _pooled_reference(inputs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    c = inputs[0].shape[1]
    h = torch.cat([x.double().transpose(0, 1).reshape(c, -1) for x in inputs], dim=1)
    return h.mean(1), h.var(1, unbiased=True)


@pytest.mark.parametrize("kind", ["2d", "3d", "lazy", "shared", "float64", "bfloat16", "momentum_none"])
def test_statistics_equal_the_pooled_inputs_for_every_layer_kind(kind) -> None:
    torch.manual_seed(0)
    seen: list[torch.Tensor] = []
    norm: nn.Module
    if kind == "3d":
        norm, shape = nn.BatchNorm3d(3), (3, 2, 3, 2)
    elif kind == "lazy":
        norm, shape = nn.LazyBatchNorm2d(), (3, 4, 5)
    else:
        norm, shape = nn.BatchNorm2d(3, momentum=None if kind == "momentum_none" else 0.1), (3, 4, 5)
    norm.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().clone()))
    calls = 2 if kind == "shared" else 1

    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm = norm

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for i in range(calls):
                x = self.norm(x * (i + 1) + i)
            return x

    net = M()
    g = torch.Generator().manual_seed(1)
    data = [torch.randn(n, *shape, generator=g) * 2 + 3 for n in (4, 7, 2)]
    if kind == "lazy":
        net(data[0])
        seen.clear()
    dtype = {"float64": torch.float64, "bfloat16": torch.bfloat16}.get(kind)
    if dtype is not None:
        net.to(dtype)
        data = [x.to(dtype) for x in data]
    wa.recompute_bn(net, data)
    mean, var = _pooled_reference(seen)
    tol = {"rtol": 1e-2, "atol": 1e-2} if dtype is torch.bfloat16 else {"rtol": 1e-5, "atol": 1e-6}
    torch.testing.assert_close(norm.running_mean.double(), mean, **tol)
    torch.testing.assert_close(norm.running_var.double(), var, **tol)
    assert norm.momentum == (None if kind == "momentum_none" else 0.1)
    assert int(norm.num_batches_tracked) == 3 * calls + (1 if kind == "lazy" else 0)


def test_a_layer_the_forward_never_reaches_keeps_its_statistics() -> None:
    net = nn.ModuleDict({"a": nn.BatchNorm1d(2), "b": nn.BatchNorm1d(2)})
    net["b"].running_mean.fill_(7.0)
    x = torch.randn(6, 2)
    wa.recompute_bn(net, [x], forward_fn=lambda m, b: m["a"](b))
    torch.testing.assert_close(net["a"].running_mean, x.mean(0))
    assert torch.equal(net["b"].running_mean, torch.full((2,), 7.0))
