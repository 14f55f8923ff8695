"""Subspace inference: PCA/random subspaces, elliptical slice sampling and VI vs closed forms."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import weightavg as wa
from weightavg.swag import (
    SubspaceInference,
    bma_predict,
    elliptical_slice,
    pca_subspace,
    random_subspace,
)


def swag_of(net: nn.Module, n: int = 8, max_rank: int = 5, seed: int = 0) -> wa.SWAG:
    g = torch.Generator().manual_seed(seed)
    swag = wa.SWAG(net, max_rank=max_rank)
    for _ in range(n):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(0.1 * torch.randn(p.shape, generator=g))
        swag.collect(net)
    return swag


# ----------------------------------------------------------------------------- subspaces


def test_pca_rows_are_orthogonal_with_norms_equal_to_singular_values() -> None:
    swag = swag_of(nn.Linear(4, 3), n=8, max_rank=5)
    d = swag.deviations().double()
    k = swag.num_columns
    sv = np.linalg.svd(d.numpy() / math.sqrt(k - 1), compute_uv=False)
    full = pca_subspace(swag)
    b = full.basis
    gram = b @ b.T
    np.testing.assert_allclose(gram.numpy(), np.diag(sv**2), atol=1e-12)
    np.testing.assert_allclose(b.norm(dim=1).numpy(), sv, rtol=1e-10)
    np.testing.assert_allclose(full.singular_values.numpy(), sv, rtol=1e-10)
    # the full-rank PCA basis spans exactly SWAG's low-rank covariance
    torch.testing.assert_close(b.T @ b, d.T @ d / (k - 1), rtol=1e-9, atol=1e-12)
    assert torch.equal(full.shift, swag.mean())
    top2 = pca_subspace(swag, rank=2)
    assert top2.rank == 2
    torch.testing.assert_close(top2.basis, b[:2])


def test_random_subspace_rows_are_orthogonal_with_given_norm() -> None:
    swag = swag_of(nn.Linear(4, 3))
    sub = random_subspace(swag, 3, scale=2.5, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(sub.basis @ sub.basis.T, 6.25 * torch.eye(3, dtype=torch.float64))
    z = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    torch.testing.assert_close(sub.point(z), swag.mean() + z @ sub.basis)


# ----------------------------------------------------------------------------- ESS


def within_mc_error(xs: torch.Tensor, mean: torch.Tensor, k: float = 4.0) -> bool:
    """|sample mean − mean| < k standard errors, the errors from 20 batch means (autocorrelation)."""
    bm = xs[: xs.shape[0] // 20 * 20].reshape(20, -1, xs.shape[1]).mean(1)
    se = bm.std(0) / math.sqrt(20)
    return bool(((xs.mean(0) - mean).abs() < k * se).all())


def gaussian_posterior(a: torch.Tensor, y: torch.Tensor, noise: float, prior: float, temp: float = 1.0):
    """Closed form of N(0, prior² I) × N(y; A z, noise²·temp): (mean, covariance)."""
    prec = torch.eye(a.shape[1], dtype=torch.float64) / prior**2 + a.T @ a / (noise**2 * temp)
    cov = torch.linalg.inv(prec)
    return cov @ a.T @ y / (noise**2 * temp), cov


def test_elliptical_slice_recovers_linear_gaussian_posterior() -> None:
    g = torch.Generator().manual_seed(0)
    a = torch.randn(6, 2, generator=g, dtype=torch.float64)
    y = a @ torch.tensor([0.8, -0.5], dtype=torch.float64) + 0.7 * torch.randn(6, generator=g,
                                                                            dtype=torch.float64)
    mean, cov = gaussian_posterior(a, y, 0.7, 1.5)

    def loglik(z: torch.Tensor) -> float:
        return float(-0.5 * ((y - a @ z) ** 2).sum() / 0.7**2)

    global_state = torch.get_rng_state()
    xs = elliptical_slice(loglik, torch.zeros(2, dtype=torch.float64), num_samples=6000,
                          prior_std=1.5, burn_in=100, generator=torch.Generator().manual_seed(1))
    assert torch.equal(torch.get_rng_state(), global_state)
    sd = cov.diagonal().sqrt()
    assert within_mc_error(xs, mean), (xs.mean(0), mean)
    torch.testing.assert_close(torch.cov(xs.T), cov, rtol=0.1, atol=0.05 * float(sd.min() ** 2))


# ----------------------------------------------------------------------------- in a model


class Regression:
    """y = Linear(3, 1)(x) + noise; θ(z) is linear in z, so the subspace posterior is Gaussian."""

    noise = 0.5

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(3)
        self.net = nn.Linear(3, 1)
        self.swag = swag_of(self.net, n=6, max_rank=4, seed=1)
        self.x = torch.randn(12, 3, generator=g)
        self.y = self.x @ torch.tensor([[1.0], [-1.0], [0.5]]) + 0.2 + self.noise * torch.randn(
            12, 1, generator=g)
        self.data = [(self.x, self.y)]

    def loglik(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return -0.5 * ((out - y) ** 2).sum() / self.noise**2

    def closed_form(self, sub, prior: float, temp: float):
        x = self.x.double()
        cols = []
        for row in sub.basis:
            t = self.swag.unflatten(row)
            cols.append(x @ t["weight"].T + t["bias"])
        jac = torch.cat(cols, dim=1)  # (N, rank)
        t0 = self.swag.unflatten(sub.shift)
        resid = (self.y.double() - (x @ t0["weight"].T + t0["bias"])).squeeze(1)
        return gaussian_posterior(jac, resid, self.noise, prior, temp)


@pytest.mark.parametrize(("prior", "temp"), [(1.0, 1.0), (0.3, 4.0)])
def test_subspace_ess_and_vi_recover_the_tempered_posterior(prior: float, temp: float) -> None:
    reg = Regression()
    sub = random_subspace(reg.swag, 2, generator=torch.Generator().manual_seed(2))
    mean, cov = reg.closed_form(sub, prior, temp)
    sd = cov.diagonal().sqrt()
    si = SubspaceInference(reg.net, sub, temperature=temp, prior_scale=prior,
                           log_likelihood=reg.loglik)
    before = {k: v.clone() for k, v in reg.net.state_dict().items()}
    xs = si.sample_ess(reg.data, 4000, burn_in=50, generator=torch.Generator().manual_seed(0))
    assert all(torch.equal(before[k], v) for k, v in reg.net.state_dict().items())  # untouched
    assert within_mc_error(xs, mean), (xs.mean(0), mean)
    torch.testing.assert_close(torch.cov(xs.T), cov, rtol=0.15, atol=0.05 * float(sd.min() ** 2))

    mu, std = si.fit_vi(reg.data, epochs=3000, lr=0.02, num_mc=4,
                        generator=torch.Generator().manual_seed(0))
    # mean-field VI on a Gaussian target: exact mean, std = 1/√(precision_ii)
    assert bool(((mu - mean).abs() < 0.1 * sd).all()), (mu, mean)
    torch.testing.assert_close(std, torch.linalg.inv(cov).diagonal().rsqrt(), rtol=0.15, atol=0)


def test_bma_over_subspace_samples() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    swag = swag_of(net, n=5, max_rank=4)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 4, generator=g)
    y = torch.randint(0, 3, (16,), generator=g)
    data = [(x[:8], y[:8]), (x[8:], y[8:])]
    si = SubspaceInference(net, pca_subspace(swag), temperature=2.0)
    with pytest.raises(wa.StateError, match="sample_ess"):
        bma_predict(si, net, data)
    zs = si.sample_ess(data, 6, burn_in=2, generator=g)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    got = bma_predict(si, net, data)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    ref = []
    for z in zs:
        theta = si.subspace.point(z)
        swag.write(net, theta)
        with torch.no_grad():
            ref.append(torch.softmax(net(x).double(), -1))
    torch.testing.assert_close(got, torch.stack(ref).mean(0))
    si.fit_vi(data, epochs=2)
    assert bma_predict(si, net, data, num_samples=3, generator=g).shape == (16, 3)


def test_subspace_bad_input() -> None:
    net = nn.Linear(3, 2)
    one = swag_of(net, n=1, max_rank=3)
    with pytest.raises(wa.StateError, match="at least 2 deviation columns"):
        pca_subspace(one)
    swag = swag_of(net, n=4, max_rank=3)
    with pytest.raises(wa.ConfigError, match="rank=4"):
        pca_subspace(swag, rank=4)
    with pytest.raises(wa.ConfigError, match="rank=0"):
        random_subspace(swag, 0)
    with pytest.raises(wa.ConfigError, match="temperature=0"):
        SubspaceInference(net, pca_subspace(swag), temperature=0)
    with pytest.raises(wa.ConfigError, match="prior_scale=-1"):
        SubspaceInference(net, pca_subspace(swag), prior_scale=-1)
    with pytest.raises(wa.MismatchError):
        SubspaceInference(nn.Linear(4, 2), pca_subspace(swag))
    with pytest.raises(wa.ConfigError, match="prior_std"):
        elliptical_slice(lambda z: 0.0, torch.zeros(2), num_samples=1, prior_std=0.0)


def test_inference_restores_every_modules_own_mode() -> None:
    # a frozen BatchNorm and an eval-mode dropout inside a model in train mode stay as they were
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Dropout(0.3), nn.Linear(8, 3))
    swag = swag_of(net, n=5, max_rank=4)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 4, generator=g)
    y = torch.randint(0, 3, (16,), generator=g)
    data = [(x[:8], y[:8]), (x[8:], y[8:])]
    net.train()
    net[1].eval()
    net[2].eval()
    modes = [m.training for m in net.modules()]
    si = SubspaceInference(net, pca_subspace(swag), temperature=2.0)
    si.log_likelihood(torch.zeros(si.subspace.rank, dtype=torch.float64), data)
    assert [m.training for m in net.modules()] == modes
    si.fit_vi(data, epochs=1, generator=g)
    assert [m.training for m in net.modules()] == modes
    si.sample_ess(data, 2, burn_in=1, generator=g)
    bma_predict(si, net, data, bn_data=[x])
    assert [m.training for m in net.modules()] == modes
    wa.swag.predict_probs(net, [x])
    assert [m.training for m in net.modules()] == modes
    bma_predict(swag, net, [x], num_samples=2, bn_data=[x], generator=g)
    assert [m.training for m in net.modules()] == modes
