"""Low-precision quantizer (SWALP) against closed forms."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import weightavg as wa
from weightavg.lowp import LowPrecision, _grid_step, quantize


@settings(max_examples=30, deadline=None)
@given(bits=st.integers(min_value=3, max_value=12), seed=st.integers(0, 10_000),
       scale=st.floats(min_value=1e-4, max_value=1e4))
def test_values_lie_on_the_grid_and_in_range(bits: int, seed: int, scale: float) -> None:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(257, generator=g) * scale
    step = _grid_step(x, bits)
    for rounding in ("stochastic", "nearest"):
        q = quantize(x, bits, rounding=rounding, generator=g)
        k = q.double() / step
        assert torch.equal(k, k.round())  # on the grid
        assert k.min() >= -(2 ** (bits - 1)) and k.max() <= 2 ** (bits - 1) - 1
        bound = step if rounding == "stochastic" else step / 2
        inside = x.abs() <= (2 ** (bits - 1) - 1) * step
        assert ((q - x).abs()[inside] <= bound * (1 + 1e-6)).all()


def test_nearest_is_idempotent() -> None:
    x = torch.randn(100)
    q = quantize(x, 6, rounding="nearest")
    assert torch.equal(quantize(q, 6, rounding="nearest"), q)


def test_stochastic_rounding_is_unbiased() -> None:
    x = torch.tensor([0.3, -0.71, 0.05, 0.999]).repeat(4000, 1)  # rows are identical draws
    g = torch.Generator().manual_seed(0)
    q = quantize(x, 4, block="row", generator=g)
    step = _grid_step(x[0], 4)
    # inside the range, the mean of 4000 draws: E = x, std of the mean ≤ step / (2·√4000)
    torch.testing.assert_close(q.mean(0)[:3], x[0, :3], rtol=0, atol=4 * step / (2 * 4000**0.5))
    # the block maximum lies above the top of the grid (7·step = 0.875) and is clamped
    assert torch.all(q[:, 3] == 7 * step)


def test_generator_reproducible_and_global_rng_untouched() -> None:
    x = torch.randn(50)
    state = torch.get_rng_state()
    a = quantize(x, 8, generator=torch.Generator().manual_seed(3))
    b = quantize(x, 8, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    assert torch.equal(torch.get_rng_state(), state)


def test_row_blocks_have_their_own_exponent() -> None:
    x = torch.stack([torch.full((4,), 1000.0) + torch.arange(4.0), torch.full((4,), 1e-3)])
    q = quantize(x, 8, block="row", rounding="nearest")
    assert (q[1] != 0).all()  # a shared whole-tensor exponent would flush the small row to 0
    assert (quantize(x, 8, rounding="nearest")[1] == 0).all()


def test_float32_average_filters_quantization_noise() -> None:
    """SWALP's mechanism: the fp32 mean of stochastic 8-bit copies is far closer than one copy."""
    x = torch.randn(1000)
    g = torch.Generator().manual_seed(1)
    holder = {"w": quantize(x, 8, generator=g)}
    avg = wa.Averager(holder, rule=wa.mean())
    for _ in range(400):
        holder["w"] = quantize(x, 8, generator=g)
        avg.update(holder)
    one = (holder["w"] - x).abs().mean()
    averaged = (avg.averaged_tensors()["w"] - x).abs().mean()
    assert averaged < one / 8


def test_low_precision_hooks_quantize_weights_grads_and_state() -> None:
    model = nn.Linear(8, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    lp = LowPrecision(opt, bits=6, generator=torch.Generator().manual_seed(0))
    seen = {}
    opt.register_step_pre_hook(lambda o, a, k: seen.update(grad=model.weight.grad.clone()))
    model(torch.randn(3, 8)).sum().backward()
    opt.step()
    for t in (model.weight.detach(), seen["grad"], opt.state[model.weight]["momentum_buffer"]):
        k = t / _grid_step(t, 6)
        torch.testing.assert_close(k, k.round(), rtol=0, atol=1e-4)
    lp.remove()
    model(torch.randn(3, 8)).sum().backward()
    opt.step()
    k = model.weight.detach() / _grid_step(model.weight.detach(), 6)
    assert not torch.allclose(k, k.round(), atol=1e-4)


@pytest.mark.parametrize(("kw", "match"), [({"bits": 1}, "bits=1"), ({"block": "col"}, "block='col'"),
                                           ({"rounding": "up"}, "rounding='up'")])
def test_bad_arguments(kw, match) -> None:
    with pytest.raises(wa.ConfigError, match=match):
        quantize(torch.ones(2), **kw)
