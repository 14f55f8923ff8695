"""recompute_bn's contracts through the public API (issue #17 gaps 6, 10): restore on error, the
returned sample count, the device move, unreached layers, InstanceNorm, argument checks."""

from __future__ import annotations

import copy
from collections import namedtuple

import pytest
import torch
from torch import nn

import weightavg as wa


class Net(nn.Module):
    def __init__(self, norm: nn.Module | None = None) -> None:
        super().__init__()
        self.inp = nn.Conv1d(2, 3, 3, padding=1)
        self.norm = norm if norm is not None else nn.BatchNorm1d(3)
        self.head = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        return self.head(torch.relu(self.norm(self.inp(x) * scale)).mean(-1))


def data(sizes: list[int], seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 2, 6, generator=g) * 2 + 1 for n in sizes]


def test_every_statistic_is_restored_when_the_forward_raises() -> None:
    net = Net()
    wa.recompute_bn(net, data([4]))  # non-trivial statistics and a non-zero counter
    before = {k: v.clone() for k, v in net.norm.state_dict().items()}
    assert int(before["num_batches_tracked"]) > 0 or before["running_var"].ne(1).any()
    calls = []

    def fails_on_second(model: nn.Module, batch: torch.Tensor) -> None:
        calls.append(1)
        model(batch * 5 + 3)  # moves every statistic
        if len(calls) == 2:
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        wa.recompute_bn(net, data([3, 3, 3]), forward_fn=fails_on_second)
    after = net.norm.state_dict()
    for k in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(after[k], before[k]), k


def test_modes_restored_when_the_forward_raises() -> None:
    net = Net()
    net.train()
    net.head.eval()

    def boom(model: nn.Module, batch: torch.Tensor) -> None:
        raise KeyError("x")

    with pytest.raises(KeyError):
        wa.recompute_bn(net, data([2]), forward_fn=boom)
    assert net.training and net.norm.training and net.inp.training and not net.head.training


@pytest.mark.parametrize("kind", ["tuple", "list", "namedtuple", "dict", "tensor"])
def test_returned_count_is_the_number_of_samples(kind: str) -> None:
    xs = data([5, 7, 1])
    pair = namedtuple("pair", "x y")
    make = {
        "tuple": lambda x: (x, torch.zeros(len(x))),
        "list": lambda x: [x, torch.zeros(len(x))],
        "namedtuple": lambda x: pair(x, torch.zeros(len(x))),
        "dict": lambda x: {"x": x},
        "tensor": lambda x: x,
    }[kind]
    assert wa.recompute_bn(Net(), [make(x) for x in xs]) == 13
    assert wa.recompute_bn(Net(), [make(x) for x in xs], num_batches=2) == 12


def test_dict_batches_are_passed_as_keyword_arguments() -> None:
    a, b = Net(), Net()
    b.load_state_dict(a.state_dict())
    xs = data([6, 6])
    wa.recompute_bn(a, [{"x": x, "scale": 2.0} for x in xs])
    wa.recompute_bn(b, [x * 2.0 for x in xs], forward_fn=lambda m, x: m(x / 2.0, scale=2.0))
    torch.testing.assert_close(a.norm.running_mean, b.norm.running_mean)
    torch.testing.assert_close(a.norm.running_var, b.norm.running_var)


def test_device_argument_moves_every_tensor_of_every_batch() -> None:
    # the batches start on the CPU and must arrive on the requested device (meta: no data needed)
    seen: list[tuple[str, ...]] = []

    def fwd(model: nn.Module, batch: dict) -> None:
        seen.append(tuple(v.device.type for v in (batch["x"], *batch["extra"])))
        model(torch.ones(2, 2, 6))

    n = wa.recompute_bn(Net(), [{"x": x, "extra": (x, x)} for x in data([2, 2])], device="meta", forward_fn=fwd)
    assert seen == [("meta", "meta", "meta")] * 2
    assert n == 4
    seen.clear()
    wa.recompute_bn(Net(), [{"x": x, "extra": (x,)} for x in data([2])], forward_fn=fwd)
    assert seen == [("cpu", "cpu")]  # no device: not moved


def test_a_norm_layer_the_forward_never_reaches_keeps_its_statistics() -> None:
    class TwoBranches(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.used = nn.BatchNorm1d(2)
            self.unused = nn.BatchNorm1d(2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.used(x)

    net = TwoBranches()
    with torch.no_grad():
        net.unused.running_mean.fill_(3.0)
        net.unused.running_var.fill_(5.0)
    x = torch.randn(10, 2, generator=torch.Generator().manual_seed(1)) + 4
    wa.recompute_bn(net, [x])
    assert net.unused.running_mean.tolist() == [3.0, 3.0]
    assert net.unused.running_var.tolist() == [5.0, 5.0]
    torch.testing.assert_close(net.used.running_mean, x.mean(0))
    torch.testing.assert_close(net.used.running_var, x.var(0, unbiased=True))


def test_instance_norm_one_batch_matches_torch() -> None:
    net = Net(nn.InstanceNorm1d(3, track_running_stats=True))
    ref = Net(nn.InstanceNorm1d(3, track_running_stats=True, momentum=1.0))
    ref.load_state_dict(net.state_dict())
    (x,) = data([5])
    n = wa.recompute_bn(net, [x])
    ref.train()
    with torch.no_grad():
        ref(x)  # momentum 1: running stats = this batch's (instance-averaged) statistics
    assert n == 5
    torch.testing.assert_close(net.norm.running_mean, ref.norm.running_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(net.norm.running_var, ref.norm.running_var, rtol=1e-5, atol=1e-6)


def test_three_layers_get_the_pooled_statistics_of_their_inputs() -> None:
    # reference: each layer's inputs recorded batch by batch (layers in train mode, as during the
    # recompute), then the mean and unbiased variance of all of them together
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 4), nn.BatchNorm1d(4),
                        nn.Linear(4, 2), nn.BatchNorm1d(2))
    g = torch.Generator().manual_seed(2)
    xs = [torch.randn(n, 3, generator=g) * 3 for n in (4, 9, 2)]
    ref = copy.deepcopy(net)
    inputs: dict[int, list[torch.Tensor]] = {1: [], 3: [], 5: []}
    for i in inputs:
        ref[i].register_forward_hook(lambda m, inp, out, i=i: inputs[i].append(inp[0].detach().clone()))
    ref.train()
    with torch.no_grad():
        for x in xs:
            ref(x)
    assert wa.recompute_bn(net, xs) == 15
    for i, seen in inputs.items():
        h = torch.cat(seen).double()
        torch.testing.assert_close(net[i].running_mean.double(), h.mean(0), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(net[i].running_var.double(), h.var(0, unbiased=True), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"num_batches": 0}, r"num_batches=0 is invalid: expected a positive int or None"),
    ({"num_batches": -1}, r"num_batches=-1"),
    ({"num_batches": True}, r"num_batches=True"),
    ({"num_batches": 1.5}, r"num_batches=1\.5"),
])
def test_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(wa.ConfigError, match=match):
        wa.recompute_bn(Net(), data([2]), **kwargs)


def test_model_must_be_a_module() -> None:
    with pytest.raises(wa.ConfigError, match=r"model='dict' is invalid: expected a torch\.nn\.Module"):
        wa.recompute_bn({}, data([2]))  # type: ignore[arg-type]


def test_unknown_batch_type_names_forward_fn() -> None:
    with pytest.raises(wa.ConfigError, match=r"data='int' is invalid: .*forward_fn"):
        wa.recompute_bn(Net(), [3])


def test_model_without_norm_layers_reads_no_data() -> None:
    def never() -> object:
        raise AssertionError("read")
        yield

    assert wa.recompute_bn(nn.Linear(2, 2), never()) == 0
    assert not wa.has_running_stats(nn.Linear(2, 2))
    assert wa.has_running_stats(Net())
    assert not wa.has_running_stats(nn.BatchNorm1d(2, track_running_stats=False))
    assert not wa.has_running_stats(nn.InstanceNorm1d(2))  # no running stats by default


@pytest.mark.parametrize("kind", ["tag first", "kwarg first", "zero-dim", "no tensor"])
def test_returned_count_looks_past_what_is_not_a_batch_of_samples(kind: str) -> None:
    # the count comes from the first tensor with a batch dimension; a 0-d tensor batch is one
    # sample; a batch holding no tensor counts 0 (the statistics are still recomputed)
    xs = data([5, 7])
    batches, fwd, expected = {
        "tag first": ([("tag", x) for x in xs], lambda m, b: m(b[1]), 12),
        "kwarg first": ([{"scale": 2.0, "x": x} for x in xs], None, 12),
        "zero-dim": ([torch.tensor(float(i)) for i in range(2)], lambda m, i: m(xs[int(i)]), 2),
        "no tensor": ([i for i in range(2)], lambda m, i: m(xs[i]), 0),
    }[kind]
    net = Net()
    ref = copy.deepcopy(net)
    assert wa.recompute_bn(net, batches, forward_fn=fwd) == expected
    scale = 2.0 if kind == "kwarg first" else 1.0
    wa.recompute_bn(ref, xs, forward_fn=lambda m, x: m(x, scale=scale))
    torch.testing.assert_close(net.norm.running_mean, ref.norm.running_mean)
    torch.testing.assert_close(net.norm.running_var, ref.norm.running_var)


def test_device_move_passes_what_is_not_a_tensor_unchanged() -> None:
    seen: list[tuple] = []

    def fwd(model: nn.Module, batch: tuple) -> None:
        x, label, extra = batch
        seen.append((x.device.type, label, extra))
        model(x if x.device.type == "cpu" else torch.ones(2, 2, 6))

    wa.recompute_bn(Net(), [(x, "a", 3) for x in data([2, 3])], device="cpu", forward_fn=fwd)
    assert seen == [("cpu", "a", 3)] * 2
    seen.clear()
    wa.recompute_bn(Net(), [(x, "b", None) for x in data([2])], device="meta", forward_fn=fwd)
    assert seen == [("meta", "b", None)]


@pytest.mark.parametrize("buffer", ["running_mean", "running_var"])
def test_nan_left_in_a_buffer_does_not_survive(buffer: str) -> None:
    # each batch is measured with momentum 1, and (1 - 1) * NaN is still NaN: the buffers are
    # reset first, so the result equals that of a model whose buffers were finite
    net = Net()
    ref = copy.deepcopy(net)
    getattr(net.norm, buffer).fill_(float("nan"))
    xs = data([4, 6])
    wa.recompute_bn(net, xs)
    wa.recompute_bn(ref, xs)
    torch.testing.assert_close(net.norm.running_mean, ref.norm.running_mean)
    torch.testing.assert_close(net.norm.running_var, ref.norm.running_var)


def test_num_batches_one_reads_one_batch() -> None:
    xs = data([3, 5])
    net = Net()
    ref = copy.deepcopy(net)
    assert wa.recompute_bn(net, iter(xs), num_batches=1) == 3
    wa.recompute_bn(ref, xs[:1])
    torch.testing.assert_close(net.norm.running_var, ref.norm.running_var)


def test_a_lazy_layer_not_yet_materialized_gets_the_statistics_of_its_inputs() -> None:
    net = nn.Sequential(nn.Conv1d(2, 3, 3, padding=1), nn.LazyBatchNorm1d())
    ref = nn.Sequential(copy.deepcopy(net[0]), nn.BatchNorm1d(3))
    xs = data([4, 6])
    assert wa.recompute_bn(net, xs) == 10
    wa.recompute_bn(ref, xs)
    torch.testing.assert_close(net[1].running_mean, ref[1].running_mean)
    torch.testing.assert_close(net[1].running_var, ref[1].running_var)


def test_low_precision_instance_norm_is_measured_from_its_inputs() -> None:
    # bfloat16 buffers cannot hold each batch's statistics: they are taken from the inputs in float64;
    # InstanceNorm's running statistics are the instance-weighted means of per-instance mean/variance
    net = Net(nn.InstanceNorm1d(3, track_running_stats=True)).to(torch.bfloat16)
    xs = [x.to(torch.bfloat16) for x in data([4, 2])]
    seen: list[torch.Tensor] = []
    net.norm.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().double()))
    wa.recompute_bn(net, xs)
    h = torch.cat(seen)  # (6 instances, 3 channels, 6 positions)
    torch.testing.assert_close(net.norm.running_mean.double(), h.mean(2).mean(0), rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(net.norm.running_var.double(), h.var(2).mean(0), rtol=1e-2, atol=1e-2)


def test_low_precision_batchnorm_statistics_are_rounded_once() -> None:
    # float16 buffers: the statistics are computed from the inputs in float64 and rounded once, so
    # they equal the float64 pooled statistics rounded to float16 (each batch's own statistics,
    # rounded to float16 and then pooled, would be off by an ulp here and there)
    net = nn.Sequential(nn.Conv1d(2, 16, 3, padding=1), nn.BatchNorm1d(16)).to(torch.float16)
    xs = [x.to(torch.float16) for x in data([3, 5, 2, 7])]
    seen: list[torch.Tensor] = []
    net[1].register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().double()))
    wa.recompute_bn(net, xs)
    h = torch.cat([x.transpose(0, 1).reshape(16, -1) for x in seen], dim=1)
    assert torch.equal(net[1].running_mean, h.mean(1).to(torch.float16))
    assert torch.equal(net[1].running_var, h.var(1).to(torch.float16))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["buffers", "measured"])
def test_unbatched_instance_norm_inputs_count_as_one_instance(dtype: torch.dtype) -> None:
    # a (C, L) input is one instance, a (N, C, L) input N of them: the running statistics are the
    # instance-weighted means of each instance's mean and unbiased variance
    norm = nn.InstanceNorm1d(3, track_running_stats=True).to(dtype)
    g = torch.Generator().manual_seed(3)
    batches = [torch.randn(3, 6, generator=g) * 2 + 1, torch.randn(4, 3, 6, generator=g) - 1]
    wa.recompute_bn(norm, [x.to(dtype) for x in batches])
    h = torch.cat([batches[0].unsqueeze(0), batches[1]]).to(dtype).double()  # 5 instances
    tol = {"rtol": 2e-2, "atol": 2e-2} if dtype == torch.bfloat16 else {"rtol": 1e-5, "atol": 1e-6}
    torch.testing.assert_close(norm.running_mean.double(), h.mean(2).mean(0), **tol)
    torch.testing.assert_close(norm.running_var.double(), h.var(2).mean(0), **tol)


@pytest.mark.parametrize("x", [[[1.0, 2.0, 3.0, 4.0], [3.0, 2.0, 0.0, 8.0]], [[1.0], [2.5], [7.0]]],
                         ids=["two samples", "one channel"])
def test_low_precision_batchnorm_of_a_few_values_has_their_variance(x: list) -> None:
    t = torch.tensor(x)
    norm = nn.BatchNorm1d(t.shape[1]).to(torch.float16)
    wa.recompute_bn(norm, [t.to(torch.float16)])
    assert torch.equal(norm.running_var, t.double().var(0).to(torch.float16))


def test_sync_ranks_without_torch_distributed_is_ignored() -> None:
    net = Net()
    ref = copy.deepcopy(net)
    xs = data([3, 4])
    assert wa.recompute_bn(net, xs, sync_ranks=True) == wa.recompute_bn(ref, xs) == 7
    assert torch.equal(net.norm.running_var, ref.norm.running_var)


@pytest.mark.parametrize("layer", [nn.BatchNorm1d, nn.SyncBatchNorm])
def test_one_batch_gives_the_layers_own_statistics(layer: type) -> None:
    # float32 buffers: each batch is measured by the layer's own kernel (momentum 1), not from its
    # inputs in float64: one batch leaves exactly what one train-mode forward with momentum 1 does
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 64), layer(64))
    ref = copy.deepcopy(net)
    x = torch.randn(9, 5) * 3 + 100
    wa.recompute_bn(net, [x])
    ref[1].momentum = 1.0
    ref.train()(x)
    assert torch.equal(net[1].running_mean, ref[1].running_mean)
    assert torch.equal(net[1].running_var, ref[1].running_var)


@pytest.mark.parametrize("missing", ["running_mean", "running_var"])
def test_a_layer_with_one_buffer_fails_with_torchs_error_and_every_buffer_is_restored(missing: str) -> None:
    # torch refuses to run a norm layer with one running buffer: recompute_bn must let that error
    # through (not fail earlier on the missing buffer) and leave every other buffer as it was
    net = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3), nn.Linear(3, 3), nn.BatchNorm1d(3))
    setattr(net[3], missing, None)
    net[1].running_mean.fill_(2.0)
    net[1].running_var.fill_(3.0)
    kept = [b.clone() for b in net.buffers()]
    with pytest.raises(ValueError, match="both be None or neither"):
        wa.recompute_bn(net, [torch.randn(4, 2)])
    assert all(torch.equal(a, b) for a, b in zip(kept, net.buffers(), strict=True))


def test_under_torch_distributed_only_sync_batchnorm_is_measured_from_its_inputs(tmp_path) -> None:
    # a process group of one (file store, no network): SyncBatchNorm, whose kernel would pool the
    # ranks' statistics in its buffers, is measured from its inputs in float64 (it cannot run on the
    # CPU under torch.distributed, so only the decision is checked); a plain BatchNorm still keeps
    # its own kernel's statistics, which differ in rounding from the float64 ones on this data
    import torch.distributed as dist

    from weightavg._bn import _measure_inputs

    if not dist.is_available() or dist.is_initialized():
        pytest.skip("needs torch.distributed, not already initialised")
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 64), nn.BatchNorm1d(64))
    ref = copy.deepcopy(net)
    x = torch.randn(9, 5) * 3 + 100
    assert _measure_inputs(nn.SyncBatchNorm(4)) is False  # not initialised: its buffers are its own
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        assert _measure_inputs(nn.SyncBatchNorm(4)) is True
        assert _measure_inputs(nn.BatchNorm1d(4)) is False
        wa.recompute_bn(net, [x])
    finally:
        dist.destroy_process_group()
    h = ref[0](x).detach().double()
    ref[1].momentum = 1.0
    ref.train()(x)
    assert not torch.equal(h.var(0).float(), ref[1].running_var)  # the two paths differ here
    assert torch.equal(net[1].running_mean, ref[1].running_mean)
    assert torch.equal(net[1].running_var, ref[1].running_var)
