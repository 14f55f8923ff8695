"""Bayesian model averaging, MultiSWAG/MultiSWA and scale selection against slow loops."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import weightavg as wa
from weightavg.swag import MultiSWA, MultiSWAG, bma_predict, select_scale

from .conftest import ConvBN, sgd_steps


def data(seed: int = 0, n: int = 24, width: int = 8, batch: int = 8) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, width, generator=g)
    y = torch.randint(0, 3, (n,), generator=g)
    return [(x[i : i + batch], y[i : i + batch]) for i in range(0, n, batch)]


def trained_swag(seed: int = 0, steps: int = 6, max_rank: int = 4) -> tuple[wa.SWAG, ConvBN]:
    torch.manual_seed(seed)
    net = ConvBN()
    swag = wa.SWAG(net, max_rank=max_rank)
    for _ in sgd_steps(net, steps, lr=0.3, seed=seed):
        swag.collect(net)
    return swag, net


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def slow_bma(swag: wa.SWAG, net: nn.Module, test, bn, s: int, scale: float, seed: int,
             diag_only: bool = False) -> torch.Tensor:
    """One draw at a time, written by hand: sample, recompute BN, softmax, average."""
    g = torch.Generator().manual_seed(seed)
    probs = []
    for _ in range(s):
        swag.sample_into(net, scale, diag_only=diag_only, generator=g)
        wa.recompute_bn(net, bn)
        net.eval()
        with torch.no_grad():
            probs.append(torch.cat([torch.softmax(net(x).double(), -1) for x, _ in test]))
    return torch.stack(probs).mean(0)


@pytest.mark.parametrize("diag_only", [False, True])
def test_bma_averages_probabilities_with_bn_recomputed_per_draw(diag_only: bool) -> None:
    swag, net = trained_swag()
    test, bn = data(1), data(2)
    net.train()
    before = state(net)
    got = bma_predict(swag, net, test, num_samples=5, bn_data=bn, scale=0.5, diag_only=diag_only,
                      generator=torch.Generator().manual_seed(3))
    after = state(net)
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights and BN stats restored
    assert net.training
    ref = slow_bma(swag, ConvBN().train(), test, bn, 5, 0.5, 3, diag_only)
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-9)
    assert torch.allclose(got.sum(1), torch.ones(got.shape[0], dtype=got.dtype))


def test_bma_bounds_bn_batches() -> None:
    swag, net = trained_swag()
    test, bn = data(1), data(2)
    got = bma_predict(swag, net, test, num_samples=2, bn_data=bn, bn_batches=1,
                      generator=torch.Generator().manual_seed(0))
    ref = slow_bma(swag, ConvBN(), test, bn[:1], 2, 0.5, 0)
    torch.testing.assert_close(got, ref)


def test_bma_scale_zero_is_the_swa_model() -> None:
    swag, net = trained_swag()
    test, bn = data(1), data(2)
    got = bma_predict(swag, net, test, num_samples=3, bn_data=bn, scale=0.0)
    swa = ConvBN()
    swag.write(swa, swag.mean())
    wa.recompute_bn(swa, bn)
    swa.eval()
    with torch.no_grad():
        ref = torch.cat([torch.softmax(swa(x).double(), -1) for x, _ in test])
    torch.testing.assert_close(got, ref)


def test_multiswag_with_one_member_equals_swag() -> None:
    swag, net = trained_swag()
    test, bn = data(1), data(2)
    a = bma_predict(swag, net, test, num_samples=4, bn_data=bn, generator=torch.Generator().manual_seed(1))
    b = bma_predict(MultiSWAG([swag]), net, test, num_samples=4, bn_data=bn,
                    generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)


def test_multiswag_weights_members_equally_and_streams_from_disk(tmp_path) -> None:
    members = [trained_swag(seed=s, steps=4 + 3 * s)[0] for s in range(3)]
    net = ConvBN()
    test, bn = data(1), data(2)
    g = torch.Generator().manual_seed(5)
    got = bma_predict(MultiSWAG(members), net, test, num_samples=2, bn_data=bn, generator=g)
    g = torch.Generator().manual_seed(5)
    per_member = [bma_predict(m, net, test, num_samples=2, bn_data=bn, generator=g) for m in members]
    torch.testing.assert_close(got, torch.stack(per_member).mean(0))
    paths = []
    for i, m in enumerate(members):
        paths.append(tmp_path / f"m{i}.pt")
        m.save(paths[-1])
    from_disk = bma_predict(MultiSWAG(paths), net, test, num_samples=2, bn_data=bn,
                            generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(from_disk, got, rtol=0, atol=0)


def test_multiswa_is_the_ensemble_of_swa_means() -> None:
    members = [trained_swag(seed=s)[0] for s in range(2)]
    net = ConvBN()
    test, bn = data(1), data(2)
    got = bma_predict(MultiSWA(members), net, test, bn_data=bn)
    refs = []
    for m in members:
        swa = ConvBN()
        m.write(swa, m.mean())
        wa.recompute_bn(swa, bn)
        swa.eval()
        with torch.no_grad():
            refs.append(torch.cat([torch.softmax(swa(x).double(), -1) for x, _ in test]))
    torch.testing.assert_close(got, torch.stack(refs).mean(0))
    with pytest.raises(wa.ConfigError, match="num_samples=3"):
        bma_predict(MultiSWA(members), net, test, bn_data=bn, num_samples=3)


def test_select_scale_uses_common_random_numbers() -> None:
    swag, net = trained_swag()
    val, bn = data(1), data(2)
    labels = torch.cat([y for _, y in val])
    best, table = select_scale(swag, net, val, labels, scales=(0.0, 0.5, 0.5, 4.0), num_samples=3,
                               bn_data=bn, generator=torch.Generator().manual_seed(0))
    assert set(table) == {0.0, 0.5, 4.0}
    assert best == min(table, key=table.__getitem__)
    probs = bma_predict(swag, net, val, num_samples=3, bn_data=bn, scale=0.5,
                        generator=torch.Generator().manual_seed(0))
    assert table[0.5] == wa.metrics.nll(probs, labels)


def test_bma_bad_input() -> None:
    swag, net = trained_swag()
    test, bn = data(1), data(2)
    with pytest.raises(wa.ConfigError, match="num_samples=0"):
        bma_predict(swag, net, test, num_samples=0, bn_data=bn)
    with pytest.raises(wa.ConfigError, match="bn_data=None"):
        bma_predict(swag, net, test)
    with pytest.raises(wa.ConfigError, match="scale=-1"):
        bma_predict(swag, net, test, bn_data=bn, scale=-1)
    empty = wa.SWAG(ConvBN(), max_rank=2)
    with pytest.raises(wa.StateError, match="collect"):
        bma_predict(empty, net, test, bn_data=bn)
    with pytest.raises(wa.MismatchError):
        bma_predict(swag, ConvBN(channels=5), test, bn_data=bn)
    with pytest.raises(wa.ConfigError, match="members"):
        MultiSWAG([])


def test_plot_reliability() -> None:
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    from weightavg.swag import plot_reliability

    probs = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8], [0.45, 0.55]])
    labels = torch.tensor([0, 1, 1, 1])
    ax = plot_reliability(probs, labels, num_bins=5, label="toy")
    line = ax.get_lines()[1]
    rel = wa.metrics.reliability(probs, labels, num_bins=5)
    keep = rel.count > 0
    assert list(line.get_xdata()) == pytest.approx(rel.confidence[keep].tolist())
    assert list(line.get_ydata()) == pytest.approx(rel.accuracy[keep].tolist())
    assert "ECE" in line.get_label()
