"""Low-precision quantizer and hooks (SWALP) against closed forms; every draw seeded."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import weightavg as wa
from weightavg.lowp import LowPrecision, _grid_step, quantize, swap_average

SETTINGS = settings(max_examples=60, deadline=None, derandomize=True)


@SETTINGS
@given(bits=st.integers(min_value=2, max_value=24), seed=st.integers(0, 10_000),
       scale=st.floats(min_value=1e-4, max_value=1e4))
def test_values_lie_on_the_grid_and_in_the_symmetric_range(bits: int, seed: int, scale: float) -> None:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(257, generator=g) * scale
    step = _grid_step(x, bits)
    top = 2 ** (bits - 1) - 1
    for rounding in ("stochastic", "nearest"):
        q = quantize(x, bits, rounding=rounding, generator=g)
        k = q.double() / step
        assert torch.equal(k, k.round())  # on the grid
        assert k.abs().max() <= top  # sign and magnitude: -2^(bits-1) is never used
        bound = step if rounding == "stochastic" else step / 2
        inside = x.abs() <= top * step
        assert ((q.double() - x.double()).abs()[inside] <= bound).all()


@SETTINGS
@given(bits=st.integers(min_value=2, max_value=24), seed=st.integers(0, 10_000),
       scale=st.floats(min_value=1e-4, max_value=1e4), block=st.sampled_from(["tensor", "row"]),
       dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]))
def test_quantize_is_idempotent(bits: int, seed: int, scale: float, block: str, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(9, 17, generator=g, dtype=torch.float64) * scale).to(dtype)
    for rounding in ("nearest", "stochastic"):
        q = quantize(x, bits, block=block, rounding=rounding, generator=g)
        assert torch.equal(quantize(q, bits, block=block, rounding=rounding, generator=g), q)


def test_negative_extreme_keeps_the_block_exponent() -> None:
    # issue 16: -1.9 used to round to -2 = -2^(E+1), which raised the exponent on re-quantization
    q = quantize(torch.tensor([-1.9, 0.3]), 4, rounding="nearest")
    assert q.tolist() == [-1.75, 0.25]
    assert quantize(q, 4, rounding="nearest").tolist() == [-1.75, 0.25]


def test_nearest_rounds_ties_half_to_even() -> None:
    # block maximum 100 -> e = 6, 8 bits -> step 2^(6-6) = 1
    x = torch.tensor([100.0, 0.5, 1.5, 2.5, -2.5, -3.5, 3.25])
    assert quantize(x, 8, rounding="nearest").tolist() == [100.0, 0.0, 2.0, 2.0, -2.0, -4.0, 3.0]


@pytest.mark.parametrize("bits", [2, 8, 16, 20, 24])
def test_stochastic_rounding_is_unbiased_at_every_width(bits: int) -> None:
    # values across the whole block, including ones close to the top of the grid where
    # floor(s + u) in float32 used to round s + u itself (24 bits: bias 0.125 step)
    n = 4000
    g = torch.Generator().manual_seed(bits)
    step = 2.0 ** (0 - bits + 2)  # block maximum in [1, 2) -> e = 0
    top = 2 ** (bits - 1) - 1
    x = torch.cat([torch.tensor([1.5]), torch.rand(40, generator=g) * 2.6 - 1.3,
                   1.5 - torch.rand(20, generator=g) * 3 * step]).float()
    x = x.clamp(-top * step, top * step)
    q = quantize(x.expand(n, -1).contiguous(), bits, block="row", generator=g)
    k = q.double() / step
    assert torch.equal(k, k.round()) and k.abs().max() <= top
    s = x.double() / step
    frac = s - s.floor()
    # the mean of n draws has standard deviation sqrt(f(1-f)/n) steps; allow 5 of them
    err = (k.mean(0) - s).abs()
    assert (err <= 5 * (frac * (1 - frac) / n).sqrt() + 1e-9).all(), err.max()
    on_grid = frac == 0
    assert torch.equal(q[:, on_grid], x[on_grid].expand(n, -1))  # values on the grid never move


def test_stochastic_rounding_at_2_bits_hits_both_neighbours_with_the_right_odds() -> None:
    x = torch.tensor([1.0, 0.25]).expand(20_000, 2).contiguous()  # step 1: 0.25 -> 1 w.p. 1/4
    q = quantize(x, 2, block="row", generator=torch.Generator().manual_seed(0))
    p = float(q[:, 1].mean())
    assert abs(p - 0.25) <= 5 * math.sqrt(0.25 * 0.75 / 20_000)
    assert set(q[:, 1].unique().tolist()) == {0.0, 1.0}


def test_empty_tensors_pass_through() -> None:
    for shape in ((0,), (0, 3), (3, 0)):
        q = quantize(torch.empty(shape), 8, block="row")
        assert q.shape == shape


def test_generator_reproducible_and_global_rng_untouched() -> None:
    x = torch.randn(50, generator=torch.Generator().manual_seed(1))
    state = torch.get_rng_state()
    a = quantize(x, 8, generator=torch.Generator().manual_seed(3))
    b = quantize(x, 8, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    assert torch.equal(torch.get_rng_state(), state)


def test_row_blocks_have_their_own_exponent_and_1d_is_one_block() -> None:
    x = torch.stack([torch.full((4,), 1000.0) + torch.arange(4.0), torch.full((4,), 1e-3)])
    q = quantize(x, 8, block="row", rounding="nearest")
    assert (q[1] != 0).all()  # a shared whole-tensor exponent would flush the small row to 0
    assert (quantize(x, 8, rounding="nearest")[1] == 0).all()
    v = torch.tensor([1000.0, 1e-3])
    assert torch.equal(quantize(v, 8, block="row", rounding="nearest"), quantize(v, 8, rounding="nearest"))


def test_float64_inputs_are_quantized_in_float64() -> None:
    x = torch.tensor([1.0, 1.0 + 2.0**-40], dtype=torch.float64)
    q = quantize(x, 24, rounding="nearest")  # step 2^-22: both round to 1, no float32 detour needed
    assert q.dtype == torch.float64 and q.tolist() == [1.0, 1.0]
    y = torch.tensor([1.5, 2.0**-22 * 3 + 2.0**-60], dtype=torch.float64)
    assert quantize(y, 24, rounding="nearest")[1].item() == 2.0**-22 * 3


def test_float32_average_filters_quantization_noise() -> None:
    """SWALP's mechanism: the fp32 mean of stochastic 8-bit copies is far closer than one copy."""
    x = torch.randn(1000, generator=torch.Generator().manual_seed(2))
    g = torch.Generator().manual_seed(1)
    holder = {"w": quantize(x, 8, generator=g)}
    avg = wa.Averager(holder, rule=wa.mean())
    for _ in range(400):
        holder["w"] = quantize(x, 8, generator=g)
        avg.update(holder)
    one = (holder["w"] - x).abs().mean()
    averaged = (avg.averaged_tensors()["w"] - x).abs().mean()
    assert averaged < one / 8


def _on_grid(t: torch.Tensor, bits: int, block: str = "tensor") -> bool:
    rows = t.reshape(t.shape[0], -1) if block == "row" and t.dim() > 1 else t.reshape(1, -1)
    for r in rows:
        k = r.double() / _grid_step(r, bits)
        if not torch.equal(k, k.round()):
            return False
    return True


@pytest.mark.parametrize("block", ["tensor", "row"])
def test_low_precision_hooks_quantize_weights_grads_and_state(block: str) -> None:
    torch.manual_seed(0)
    model = nn.Linear(8, 4)
    with torch.no_grad():
        model.weight[0] *= 64  # rows of very different scales
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    lp = LowPrecision(opt, bits=6, block=block, generator=torch.Generator().manual_seed(0))
    seen = {}
    opt.register_step_pre_hook(lambda o, a, k: seen.update(grad=model.weight.grad.clone()))
    model(torch.randn(3, 8)).sum().backward()
    opt.step()
    for t in (model.weight.detach(), seen["grad"], opt.state[model.weight]["momentum_buffer"]):
        assert _on_grid(t, 6, block)
    if block == "row":
        assert not _on_grid(model.weight.detach(), 6, "tensor")  # rows really have their own grids
    lp.remove()
    model(torch.randn(3, 8)).sum().backward()
    opt.step()
    assert not _on_grid(model.weight.detach(), 6, block)


@pytest.mark.parametrize("order", ["policy first", "low precision first"])
def test_the_average_sees_quantized_weights_whatever_the_order(order: str) -> None:
    # issue 16 defect 1: optimizer post-hooks run in registration order
    torch.manual_seed(0)
    model = nn.Linear(8, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    swa = wa.SWA(swa_start=0, update_interval=1, recompute_bn=False)
    if order == "policy first":
        swa.begin(model, opt)
        LowPrecision(opt, bits=4, generator=torch.Generator().manual_seed(0))
    else:
        LowPrecision(opt, bits=4, generator=torch.Generator().manual_seed(0))
        swa.begin(model, opt)
    model(torch.randn(5, 8)).pow(2).sum().backward()
    opt.step()
    assert swa.num_updates == 1
    avg = swa.averager.averaged_tensors()
    assert torch.equal(avg["weight"], model.weight.detach())
    assert torch.equal(avg["bias"], model.bias.detach())
    assert _on_grid(avg["weight"], 4)


def test_activation_and_error_quantization_match_a_hand_written_reference() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.Linear(6, 3))
    ref = nn.Sequential(nn.Linear(5, 6), nn.Linear(6, 3))
    ref.load_state_dict(model.state_dict())
    x = torch.randn(4, 5)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    LowPrecision(opt, bits=8, modules=[model[0]], act_bits=4, err_bits=5,
                 generator=torch.Generator().manual_seed(7))
    model(x).pow(2).sum().backward()

    g = torch.Generator().manual_seed(7)
    with torch.no_grad():  # LowPrecision starts from quantized weights, in parameter order
        for p in ref.parameters():
            p.copy_(quantize(p, 8, generator=g))
    h = ref[0](x)
    hq = quantize(h.detach(), 4, block="row", generator=g).requires_grad_()
    ref[1](hq).pow(2).sum().backward()
    err = quantize(hq.grad, 5, block="row", generator=g)
    h.backward(err)
    torch.testing.assert_close(model[0].weight.grad, ref[0].weight.grad, rtol=0, atol=0)
    torch.testing.assert_close(model[1].weight.grad, ref[1].weight.grad, rtol=0, atol=0)
    # the activation itself: each example on its own 4-bit grid
    out = model[0](x)
    assert _on_grid(out.detach(), 4, "row")


def test_activation_hooks_can_be_switched_off_and_removed() -> None:
    model = nn.Sequential(nn.Linear(5, 6), nn.ReLU())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(3, 5, generator=torch.Generator().manual_seed(0))
    lp = LowPrecision(opt, bits=8, modules=list(model), act_bits=0, err_bits=0)
    torch.testing.assert_close(model(x), model[1](x @ model[0].weight.T + model[0].bias))
    lp.remove()
    lp = LowPrecision(opt, bits=8, modules=[model[0]], act_bits=3)
    assert _on_grid(model[0](x).detach(), 3, "row")
    lp.remove()
    assert not _on_grid(model[0](x).detach(), 3, "row")


@pytest.mark.parametrize(("kw", "match"), [({"bits": 1}, "bits=1"), ({"block": "col"}, "block='col'"),
                                           ({"rounding": "up"}, "rounding='up'"), ({"bits": 25}, "bits=25")])
def test_bad_arguments(kw, match) -> None:
    with pytest.raises(wa.ConfigError, match=match):
        quantize(torch.ones(2), **kw)


@pytest.mark.parametrize(("kw", "match"), [({"act_bits": 1}, "act_bits=1"), ({"err_bits": 30}, "err_bits=30"),
                                           ({"act_block": "col"}, "act_block='col'"),
                                           ({"modules": [3]}, r"modules\[0\]=")])
def test_low_precision_bad_arguments(kw, match) -> None:
    opt = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1)
    with pytest.raises(wa.ConfigError, match=match):
        LowPrecision(opt, **kw)


def test_swap_average_without_a_process_group_says_what_to_do() -> None:
    with pytest.raises(wa.StateError, match="init_process_group") as info:
        swap_average(nn.Linear(2, 2))
    assert "all_reduce" not in str(info.value)
