"""swap_average over gloo: same-model check on every rank, float64 kept, BatchNorm recomputed."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import weightavg as wa

from .test_engine_all_reduce import _free_port

pytestmark = pytest.mark.distributed


class _Shaped(nn.Module):
    def __init__(self, shape: tuple[int, int]) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(shape))
        self.bias = nn.Parameter(torch.zeros(4))


def _bn_net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 2), nn.BatchNorm1d(2))


def _bn_data(rank: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(50 + rank)
    return [torch.randn(6 + 2 * rank, 3, generator=g) * (1 + rank) for _ in range(3)]


def _errors(fn) -> str:  # type: ignore[no-untyped-def]
    try:
        fn()
    except wa.MismatchError as e:
        return str(e)
    return "no error"


def _worker(rank: int, world: int, port: int, out: str) -> None:
    from weightavg.lowp import swap_average

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        res: dict[str, object] = {}
        # different sizes: used to abort inside gloo; now the same clear error on every rank
        res["sizes"] = _errors(lambda: swap_average(nn.Linear(3 + rank, 2)))
        # same number of elements, different shapes: used to be averaged silently
        res["shapes"] = _errors(lambda: swap_average(_Shaped((4, 3) if rank == 0 else (3, 4))))
        # same shapes, different dtypes
        res["dtypes"] = _errors(lambda: swap_average(nn.Linear(2, 2).to(torch.float64 if rank else torch.float32)))
        # bn_data on one rank only would run the BatchNorm collective on that rank alone
        try:
            swap_average(_bn_net(0), bn_data=_bn_data(rank) if rank == 0 else None)
            res["bn_one_rank"] = "no error"
        except wa.ConfigError as e:
            res["bn_one_rank"] = str(e)
        # float64 stays float64 (the mean is exact in float64, not rounded through float32)
        torch.manual_seed(20 + rank)
        m64 = nn.Linear(3, 2).double()
        res["f64_before"] = {k: v.clone() for k, v in m64.state_dict().items()}
        swap_average(m64)
        res["f64_after"] = m64.state_dict()
        # SWAP's Algorithm 1: average, then recompute BatchNorm pooled over all ranks' batches
        net = _bn_net(rank)
        res["bn_before"] = {k: v.clone() for k, v in net.state_dict().items()}
        swap_average(net, bn_data=_bn_data(rank))
        res["bn_after"] = net.state_dict()
        torch.save(res, f"{out}/swap{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_swap_average_two_ranks(tmp_path) -> None:
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    r = [torch.load(tmp_path / f"swap{i}.pt", weights_only=True) for i in range(2)]
    for key in ("sizes", "shapes", "dtypes"):
        for rank in range(2):
            msg = r[rank][key]
            assert "ranks hold different models" in msg and "rank 0" in msg and "rank 1" in msg, (key, msg)
    for rank in range(2):
        assert "bn_data was given on rank(s) [0] only" in r[rank]["bn_one_rank"]
    assert "rank 0: 2 tensors, 8 elements" in r[0]["sizes"] and "rank 1: 2 tensors, 10 elements" in r[0]["sizes"]

    for name in ("weight", "bias"):
        a, b = r[0]["f64_before"][name], r[1]["f64_before"][name]
        expected = (a + b) / 2
        for rank in range(2):
            got = r[rank]["f64_after"][name]
            assert got.dtype == torch.float64
            assert torch.equal(got, expected)
        assert not torch.equal(expected.float().double(), expected)  # a float32 detour would show

    # reference: the mean of the two ranks' weights, BN statistics from all ranks' batches at once
    ref = _bn_net(0)
    ref.load_state_dict({k: (v + r[1]["bn_before"][k]) / 2 if v.is_floating_point() else v
                         for k, v in r[0]["bn_before"].items()})
    wa.recompute_bn(ref, _bn_data(0) + _bn_data(1))
    for rank in range(2):
        got = r[rank]["bn_after"]
        for name in ("0.weight", "3.bias", "1.weight"):
            torch.testing.assert_close(got[name], ref.state_dict()[name], rtol=1e-6, atol=1e-7)
        for name in ("1.running_mean", "1.running_var", "4.running_mean", "4.running_var"):
            torch.testing.assert_close(got[name], ref.state_dict()[name], rtol=1e-5, atol=1e-6, msg=name)
    for k in r[0]["bn_after"]:
        assert torch.equal(r[0]["bn_after"][k], r[1]["bn_after"][k]), k  # identical on every rank


def test_swap_average_one_rank_keeps_float64_and_warns_about_stale_batchnorm() -> None:
    from weightavg.lowp import swap_average

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        m = nn.Linear(5, 3).double()
        with torch.no_grad():
            m.weight.add_(1e-9)  # bits a float32 round trip loses
        before = {k: v.clone() for k, v in m.state_dict().items()}
        swap_average(m)
        for k, v in m.state_dict().items():
            assert torch.equal(v, before[k]), k  # the mean of one rank is the model itself
        with pytest.warns(UserWarning, match="bn_data"):
            swap_average(_bn_net(0))
    finally:
        dist.destroy_process_group()
