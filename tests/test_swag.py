"""SWAG posterior: moments, deviation columns, sampling, density and checkpoints vs references."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.optim.swa_utils import AveragedModel

import weightavg as wa
from weightavg.swag import last_layer

from .conftest import ConvBN, sgd_steps

# ----------------------------------------------------------------------------- helpers


class Vec(nn.Module):
    """One flat float32 parameter: the flat layout is the parameter itself."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(n))


def snapshots(n: int, p: int, *, seed: int = 0, loc: float = 0.0, std: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (loc + std * torch.randn(n, p, generator=g, dtype=torch.float64)).float()


def collect_all(swag: wa.SWAG, net: Vec, snaps: torch.Tensor) -> None:
    for s in snaps:
        with torch.no_grad():
            net.w.copy_(s)
        swag.collect(net)


def reference_columns(snaps: torch.Tensor, k: int) -> torch.Tensor:
    """The definition: d_i = θ_i − (θ_1 + … + θ_i)/i in float64, the last k of them, oldest first."""
    th = snaps.double()
    running = th.cumsum(0) / torch.arange(1, len(th) + 1, dtype=torch.float64)[:, None]
    dev = th - running
    return dev[len(th) - min(k, len(th)):]


def filled(n: int = 5, p: int = 6, max_rank: int = 3, seed: int = 0) -> tuple[wa.SWAG, Vec]:
    net = Vec(p)
    swag = wa.SWAG(net, max_rank=max_rank)
    collect_all(swag, net, snapshots(n, p, seed=seed))
    return swag, net


# ----------------------------------------------------------------------------- moments


def test_mean_equals_torch_swa_utils(convbn: ConvBN) -> None:
    swag = wa.SWAG(convbn, max_rank=4)
    ref = AveragedModel(convbn)
    for _ in sgd_steps(convbn, 9):
        swag.collect(convbn)
        ref.update_parameters(convbn)
    mean = swag.unflatten(swag.mean())
    params = dict(ref.module.named_parameters())
    assert set(mean) == set(params)  # parameters only: BN statistics are recomputed per sample
    for name, p in params.items():
        torch.testing.assert_close(mean[name].float(), p.detach(), rtol=1e-6, atol=1e-7, msg=name)


def test_variance_float32_stress_case_matches_numpy() -> None:
    """|mean| ≈ 1, std 1e-4 in float32: the reference's float32 E[θ²] − E[θ]² goes negative."""
    p, n = 2000, 40
    sign = torch.where(torch.arange(p) % 2 == 0, 1.0, -1.0)
    snaps = (snapshots(n, p, seed=3, std=1e-4) + sign).float()
    net = Vec(p)
    swag = wa.SWAG(net, max_rank=5)
    collect_all(swag, net, snaps)
    raw = swag.variance(clamp=False)
    assert int((raw < 0).sum()) == 0
    ref = np.var(snaps.numpy().astype(np.float64), axis=0)  # population variance
    np.testing.assert_allclose(raw.numpy(), ref, rtol=1e-6)
    np.testing.assert_allclose(swag.mean().numpy(), snaps.double().mean(0).numpy(), rtol=1e-12)

    # the float32 formula this guards against really does fail here
    naive = wa.Averager(net, rule={"m": wa.mean(), "sq": wa.mean(power=2)})
    for s in snaps:
        with torch.no_grad():
            net.w.copy_(s)
        naive.update(net)
    m32 = naive.flat(which="m")
    assert float(((naive.flat(which="sq") - m32 * m32) < 0).float().mean()) > 0.2


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 9), p=st.integers(1, 7), max_rank=st.integers(0, 6), seed=st.integers(0, 99))
def test_moments_and_columns_match_definition(n: int, p: int, max_rank: int, seed: int) -> None:
    net = Vec(p)
    swag = wa.SWAG(net, max_rank=max_rank)
    snaps = snapshots(n, p, seed=seed, loc=0.5)
    collect_all(swag, net, snaps)
    x = snaps.double().numpy()
    np.testing.assert_allclose(swag.mean().numpy(), x.mean(0), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(swag.variance(clamp=False).numpy(), x.var(0), rtol=1e-9, atol=1e-13)
    assert swag.num_collected == n
    assert swag.num_columns == min(n, max_rank)
    ref = reference_columns(snaps, max_rank) if max_rank else torch.zeros(0, p)
    torch.testing.assert_close(swag.deviations().double(), ref.double(), rtol=1e-6, atol=1e-7)


def test_include_last_layer_tracks_only_it(convbn: ConvBN) -> None:
    names = last_layer(convbn)
    assert names == ["fc.weight", "fc.bias"]
    swag = wa.SWAG(convbn, include=names, max_rank=3)
    assert swag.names == names
    for _ in sgd_steps(convbn, 4):
        swag.collect(convbn)
    before = {k: v.clone() for k, v in convbn.state_dict().items()}
    swag.sample_into(convbn, 1.0, generator=torch.Generator().manual_seed(1))
    after = convbn.state_dict()
    changed = sorted(k for k in before if not torch.equal(before[k], after[k]))
    assert changed == ["fc.bias", "fc.weight"]


# ----------------------------------------------------------------------------- sampling


@pytest.mark.parametrize(("n", "max_rank", "diag_only"), [
    pytest.param(4, 10, False, id="fewer-columns-than-max_rank"),
    pytest.param(9, 3, False, id="ring-buffer-wrapped"),
    pytest.param(6, 4, True, id="swag-diag"),
])
def test_monte_carlo_covariance_converges(n: int, max_rank: int, diag_only: bool) -> None:
    p, scale, draws = 5, 0.7, 20000
    swag, _ = filled(n, p, max_rank, seed=11)
    g = torch.Generator().manual_seed(5)
    xs = torch.stack([swag.sample(scale, diag_only=diag_only, generator=g) for _ in range(draws)])
    d = swag.deviations().double()
    k = swag.num_columns
    cov = torch.diag(swag.variance())
    if not diag_only:
        cov = cov + d.T @ d / (k - 1)
    cov = scale * cov
    emp = torch.cov(xs.T)
    # Monte-Carlo standard error of a covariance entry: sqrt((Σ_ii Σ_jj + Σ_ij²) / N)
    se = ((torch.outer(cov.diagonal(), cov.diagonal()) + cov**2) / draws).sqrt()
    assert bool(((emp - cov).abs() <= 5 * se).all()), (emp - cov).abs() / se
    mean_se = (cov.diagonal() / draws).sqrt()
    assert bool(((xs.mean(0) - swag.mean()).abs() <= 5 * mean_se).all())


def test_scale_zero_returns_the_swa_mean_exactly() -> None:
    swag, net = filled()
    g = torch.Generator().manual_seed(0)
    state = g.get_state()
    assert torch.equal(swag.sample(0.0, generator=g), swag.mean())
    assert torch.equal(g.get_state(), state)  # nothing drawn
    swag.sample_into(net, 0.0)
    assert torch.equal(net.w.detach(), swag.mean().float())


def test_generator_makes_draws_reproducible_and_leaves_global_rng_alone() -> None:
    swag, _ = filled()
    global_state = torch.get_rng_state()
    a = swag.sample(0.5, generator=torch.Generator().manual_seed(7))
    b = swag.sample(0.5, generator=torch.Generator().manual_seed(7))
    c = swag.sample(0.5, generator=torch.Generator().manual_seed(8))
    assert torch.equal(torch.get_rng_state(), global_state)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_rank_zero_and_single_column_sample_diagonal_only() -> None:
    swag0, _ = filled(5, 6, 0)
    swag1, _ = filled(1, 6, 3)  # one column: the low-rank term has no (K−1) to divide by
    for swag in (swag0, swag1):
        a = swag.sample(1.0, generator=torch.Generator().manual_seed(2))
        b = swag.sample(1.0, diag_only=True, generator=torch.Generator().manual_seed(2))
        assert torch.equal(a, b)
        assert bool(torch.isfinite(a).all())


def test_sample_into_pairs_by_name_not_position() -> None:
    class AB(nn.Module):
        def __init__(self, first: str) -> None:
            super().__init__()
            setattr(self, first, nn.Parameter(torch.zeros(3)))
            other = "b" if first == "a" else "a"
            setattr(self, other, nn.Parameter(torch.ones(3)))

    src, dst = AB("a"), AB("b")  # same names, registered in the other order
    swag = wa.SWAG(src, max_rank=2)
    swag.collect(src)
    swag.sample_into(dst, 0.0)
    assert torch.equal(dst.a.detach(), torch.zeros(3))
    assert torch.equal(dst.b.detach(), torch.ones(3))


# ----------------------------------------------------------------------------- exact density


@pytest.mark.parametrize(("n", "max_rank", "diag_only"), [
    pytest.param(6, 4, False, id="low-rank"),
    pytest.param(3, 8, False, id="partial-buffer"),
    pytest.param(6, 4, True, id="diag"),
    pytest.param(1, 4, False, id="one-column"),
])
def test_log_prob_matches_full_covariance_gaussian(n: int, max_rank: int, diag_only: bool) -> None:
    swag, _ = filled(n, 7, max_rank, seed=4)
    scale = 0.3
    cov = torch.diag(swag.variance())
    k = swag.num_columns
    if not diag_only and k >= 2:
        d = swag.deviations().double()
        cov = cov + d.T @ d / (k - 1)
    ref = torch.distributions.MultivariateNormal(swag.mean(), covariance_matrix=scale * cov)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        theta = swag.sample(scale, diag_only=diag_only, generator=g)
        assert swag.log_prob(theta, scale, diag_only=diag_only) == pytest.approx(
            float(ref.log_prob(theta)), rel=1e-9, abs=1e-8)


# ----------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("n", [0, 1, 2, 4, 7, 11])
def test_state_dict_round_trip_reproduces_samples_and_continues(n: int) -> None:
    p, max_rank = 6, 4
    snaps = snapshots(n + 3, p, seed=9)
    net = Vec(p)
    swag = wa.SWAG(net, max_rank=max_rank)
    collect_all(swag, net, snaps[:n])
    buf = io.BytesIO()
    torch.save(swag.state_dict(), buf)
    buf.seek(0)
    other = wa.SWAG.from_state_dict(torch.load(buf, weights_only=True), Vec(p))
    assert other.num_collected == swag.num_collected == n
    assert other.num_columns == swag.num_columns
    torch.testing.assert_close(other.deviations(), swag.deviations(), rtol=0, atol=0)
    if n:
        for s in (0.0, 0.5):
            a = swag.sample(s, generator=torch.Generator().manual_seed(3))
            b = other.sample(s, generator=torch.Generator().manual_seed(3))
            assert torch.equal(a, b)
    collect_all(swag, net, snaps[n:])  # resume: both continue identically
    collect_all(other, net, snaps[n:])
    assert torch.equal(swag.mean(), other.mean())
    assert torch.equal(swag.deviations(), other.deviations())
    a = swag.sample(0.5, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, other.sample(0.5, generator=torch.Generator().manual_seed(4)))


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_save_load_file(tmp_path, suffix: str, convbn: ConvBN) -> None:
    swag = wa.SWAG(convbn, max_rank=3)
    for _ in sgd_steps(convbn, 5):
        swag.collect(convbn)
    path = tmp_path / f"post{suffix}"
    swag.save(path)
    assert [f.name for f in tmp_path.iterdir()] == [path.name]  # no temp file left behind
    other = wa.SWAG.load(path, ConvBN())
    a = swag.sample(0.5, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, other.sample(0.5, generator=torch.Generator().manual_seed(1)))


# ----------------------------------------------------------------------------- bad input


def test_bad_arguments_get_clear_errors(convbn: ConvBN) -> None:
    with pytest.raises(wa.ConfigError, match="max_rank=-1"):
        wa.SWAG(convbn, max_rank=-1)
    with pytest.raises(wa.ConfigError, match="var_clamp"):
        wa.SWAG(convbn, var_clamp=-1.0)
    swag = wa.SWAG(convbn, max_rank=2)
    with pytest.raises(wa.StateError, match="collect"):
        swag.sample(0.5)
    with pytest.raises(wa.StateError, match="collect"):
        swag.sample_into(convbn)
    swag.collect(convbn)
    with pytest.raises(wa.ConfigError, match=r"scale=-0\.5"):
        swag.sample(-0.5)
    with pytest.raises(wa.ConfigError, match="scale=nan"):
        swag.sample(math.nan)
    with pytest.raises(wa.ConfigError, match="num_samples=0"):
        swag.draws(convbn, 0)
    with pytest.raises(wa.ConfigError, match="scale"):
        swag.log_prob(swag.mean(), 0.0)


def test_posterior_into_a_model_with_different_parameters(convbn: ConvBN) -> None:
    swag = wa.SWAG(convbn, max_rank=2)
    swag.collect(convbn)
    wider = ConvBN(channels=6)
    with pytest.raises(wa.MismatchError, match=r"conv.weight \(4, 1, 3\) vs \(6, 1, 3\)"):
        swag.sample_into(wider)
    with pytest.raises(wa.MismatchError):
        wa.SWAG.from_state_dict(swag.state_dict(), wider)
    other = nn.Sequential(nn.Linear(8, 3))
    with pytest.raises(wa.MismatchError, match=r"missing from the model: bn\.bias"):
        swag.sample_into(other)
    with pytest.raises(wa.MismatchError):
        swag.collect(other)
    small = wa.SWAG(convbn, max_rank=1)
    swag.collect(convbn)
    with pytest.raises(wa.MismatchError, match="max_rank=1"):
        small.load_state_dict(swag.state_dict())


def test_reset_forgets_everything() -> None:
    swag, net = filled(5, 6, 3)
    swag.reset()
    assert (swag.num_collected, swag.num_columns) == (0, 0)
    with pytest.raises(wa.StateError):
        swag.sample()
    snaps = snapshots(2, 6, seed=1)
    collect_all(swag, net, snaps)
    torch.testing.assert_close(swag.deviations().double(), reference_columns(snaps, 3).double())


def test_bfloat16_model_keeps_float64_moments() -> None:
    net = nn.Linear(4, 3).to(torch.bfloat16)
    swag = wa.SWAG(net, max_rank=3)
    snaps = []
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        with torch.no_grad():
            net.weight.add_((0.01 * torch.randn(3, 4, generator=g)).to(torch.bfloat16))
        swag.collect(net)
        snaps.append(net.weight.detach().double().clone())
    ref = torch.stack(snaps)
    mean = swag.unflatten(swag.mean())["weight"]
    var = swag.unflatten(swag.variance(clamp=False))["weight"]
    torch.testing.assert_close(mean, ref.mean(0), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(var, ref.var(0, unbiased=False), rtol=1e-9, atol=1e-14)
    swag.sample_into(net, 0.0)
    assert net.weight.dtype == torch.bfloat16
    assert torch.equal(net.weight.detach(), mean.to(torch.bfloat16))
