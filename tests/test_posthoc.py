"""Post-hoc EMA: the policy's snapshots and manifest, and reconstruction from them."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import weightavg as wa
from weightavg import posthoc

pytest.importorskip("safetensors")


def _model() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))


def _train(policy: wa.PostHocEMA, model: nn.Module, steps: int, *, seed: int = 0,
           opt: torch.optim.Optimizer | None = None, start: int = 0) -> torch.optim.Optimizer:
    """SGD steps on data that depend only on (seed, step index): a resumed run sees the same data."""
    opt = opt or torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    if policy.model is None:
        policy.begin(model, opt)
    for i in range(start, start + steps):
        g = torch.Generator().manual_seed(seed * 100_003 + i)
        x = torch.randn(16, 4, generator=g)
        loss = (model(x) - x[:, :2]).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
    return opt


def _run(tmp: Path, steps: int = 120, sigma_rels=(0.05, 0.10, 0.15), every: int = 10) -> wa.PostHocEMA:
    torch.manual_seed(0)
    model = _model()
    policy = wa.PostHocEMA(tmp, sigma_rels=sigma_rels, snapshot_every=every, snapshot_dtype=torch.float32,
                           final="training")
    _train(policy, model, steps)
    return policy


def _keep_profiles(src: Path, dst: Path, profiles: set[int]) -> None:
    """A copy of a run's directory whose manifest lists only some profiles' snapshots."""
    dst.mkdir()
    man = json.loads((src / "manifest.json").read_text())
    man["snapshots"] = [s for s in man["snapshots"] if s["profile"] in profiles]
    for s in man["snapshots"]:
        shutil.copy(src / s["file"], dst / s["file"])
    (dst / "manifest.json").write_text(json.dumps(man))


def _rel_l2(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], names: list[str]) -> float:
    num = sum(float((a[n].double() - b[n].double()).pow(2).sum()) for n in names)
    den = sum(float(b[n].double().pow(2).sum()) for n in names)
    return math.sqrt(num / den)


# ----------------------------------------------------------------------------- profiles


@settings(max_examples=60, derandomize=True, deadline=None)
@given(st.floats(0.01, 0.2))  # the valid range above ~0.28 is being fixed in _rules.py (issue of `mut`)
def test_sigma_rel_gamma_round_trip(sigma_rel: float) -> None:
    g = wa.sigma_rel_to_gamma(sigma_rel)
    assert posthoc.gamma_to_sigma_rel(g) == pytest.approx(sigma_rel, rel=1e-9)
    # σ_rel from the profile's own moments (numerical integration of p(τ) = (γ+1) τ^γ on [0, 1])
    if g < 60:
        x = torch.linspace(0, 1, 200_001, dtype=torch.float64)
        p = (g + 1) * x**g
        mean = torch.trapezoid(p * x, x)
        var = torch.trapezoid(p * (x - mean) ** 2, x)
        assert float(var.sqrt()) == pytest.approx(sigma_rel, rel=1e-4)  # std relative to t (EDM2)


@pytest.mark.parametrize("every", [1, 3, 7])
def test_karras_recursion_equals_closed_form_weights(every: int) -> None:
    """Updated every k steps, the EMA weighs iterate τⱼ by (τⱼ^(γ+1) − τⱼ₋₁^(γ+1)) / t^(γ+1)."""
    gamma = wa.sigma_rel_to_gamma(0.1)
    steps = list(range(every, 60 + 1, every))
    n = len(steps)
    avg = wa.Averager({"w": torch.zeros(n, dtype=torch.float64)}, wa.karras_ema(gamma=gamma),
                      dtype=torch.float64)
    for j, t in enumerate(steps):
        avg.update({"w": torch.nn.functional.one_hot(torch.tensor(j), n).double()}, step=t)
    got = avg.averaged_tensors()["w"]
    t_end = steps[-1]
    prev = [0, *steps[:-1]]
    expected = torch.tensor([(t ** (gamma + 1) - p ** (gamma + 1)) / t_end ** (gamma + 1)
                             for t, p in zip(steps, prev, strict=True)], dtype=torch.float64)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-15)


def test_profile_inner_products_match_quadrature() -> None:
    """The closed form of ∫ pᵢ pⱼ against a numerical integral (independent reference)."""
    x = torch.linspace(0, 1, 400_001, dtype=torch.float64)[1:]
    cases = [(0.3, 2.0, 1.0, 5.0), (1.0, 6.9, 0.6, 3.5), (0.8, 0.5, 0.8, 12.0)]
    for ta, ga, tb, gb in cases:
        pa = torch.where(x <= ta, (ga + 1) * (x / ta) ** ga / ta, 0.0)
        pb = torch.where(x <= tb, (gb + 1) * (x / tb) ** gb / tb, 0.0)
        numeric = float(torch.trapezoid(pa * pb, x))
        closed = float(torch.exp(posthoc._log_dot(*(torch.tensor(v, dtype=torch.float64)
                                                    for v in (ta, ga, tb, gb)))))
        assert closed == pytest.approx(numeric, rel=2e-3)


def test_coefficients_are_normalised_and_one_hot_for_a_stored_profile() -> None:
    g1, g2 = wa.sigma_rel_to_gamma(0.05), wa.sigma_rel_to_gamma(0.1)
    steps = [10.0, 10.0, 20.0, 20.0]
    gammas = [g1, g2, g1, g2]
    c, rel = posthoc.profile_coefficients(steps, gammas, 20.0, g2)
    assert c == pytest.approx([0, 0, 0, 1], abs=1e-7)
    assert rel < 1e-6
    c, rel = posthoc.profile_coefficients(steps, gammas, 20.0, wa.sigma_rel_to_gamma(0.15))
    assert math.fsum(c) == pytest.approx(1.0, abs=1e-12)
    assert 0 < rel < 0.5
    with pytest.raises(wa.ConfigError, match="target step"):
        posthoc.profile_coefficients(steps, gammas, 15.0, g2)


# ----------------------------------------------------------------------------- reconstruction


def test_reconstructing_a_stored_profile_returns_that_snapshot(tmp_path: Path) -> None:
    _run(tmp_path)
    man = posthoc.read_manifest(tmp_path)
    last = next(s for s in man["snapshots"] if s["step"] == 120 and s["profile"] == 1)
    res = posthoc.reconstruct(tmp_path, sigma_rel=0.10, warn=False)
    assert isinstance(res, posthoc.Reconstruction)
    assert res.coefficients[last["file"]] == pytest.approx(1.0, abs=1e-7)
    assert sum(abs(v) for k, v in res.coefficients.items() if k != last["file"]) < 1e-6
    from safetensors.torch import load_file

    snap = load_file(str(tmp_path / last["file"]))
    for n, t in res.state_dict.items():
        torch.testing.assert_close(t, snap[n].to(t.dtype), rtol=1e-6, atol=1e-7)


def test_reconstruction_equals_a_directly_tracked_ema(tmp_path: Path) -> None:
    policy = _run(tmp_path / "run", steps=200)
    _keep_profiles(tmp_path / "run", tmp_path / "two", {0, 1})  # drop the tracked 0.15
    with pytest.warns(UserWarning, match="BatchNorm"):
        res = posthoc.reconstruct(tmp_path / "two", sigma_rel=0.15)
    assert isinstance(res, posthoc.Reconstruction)
    assert policy.averager is not None
    tracked = policy.averager.averaged_tensors("p2")
    params = [n for n, info in posthoc.read_manifest(tmp_path / "run")["tensors"].items() if info["param"]]
    err = _rel_l2(res.state_dict, tracked, params)
    assert res.relative_residual < 0.02
    assert err < 1e-3
    # a lone snapshot pair cannot do this: the residual says so, with a warning
    poor = posthoc.reconstruct(tmp_path / "two", gamma=0.5, step=10, warn=False)
    assert isinstance(poor, posthoc.Reconstruction)
    assert poor.relative_residual > 0.05
    assert any("poorly representable" in w for w in poor.warnings)


def test_only_snapshots_up_to_the_target_are_used(tmp_path: Path) -> None:
    _run(tmp_path)
    res = posthoc.reconstruct(tmp_path, sigma_rel=[0.07, 0.12], step=55, warn=False)
    assert isinstance(res, list) and len(res) == 2
    for r in res:
        assert r.step == 55
        steps = [int(f.split("-")[2].split(".")[0]) for f in r.coefficients]
        assert max(steps) <= 50 and len(steps) == 15  # 5 snapshot times x 3 profiles


def test_target_before_the_first_snapshot_is_a_clear_error(tmp_path: Path) -> None:
    _run(tmp_path)
    with pytest.raises(wa.ConfigError, match=r"step=5 .*first snapshot \(step 10\)"):
        posthoc.reconstruct(tmp_path, sigma_rel=0.1, step=5)


def test_stray_files_are_ignored(tmp_path: Path) -> None:
    _run(tmp_path)
    before = posthoc.reconstruct(tmp_path, sigma_rel=0.08, warn=False)
    from safetensors.torch import save_file

    assert isinstance(before, posthoc.Reconstruction)
    bogus = {n: torch.full_like(t, 1e6) for n, t in before.state_dict.items()}
    save_file(bogus, str(tmp_path / "phema-0-0000000060.safetensors.old"))
    save_file(bogus, str(tmp_path / "phema-0-0000000065.safetensors"))  # not in the manifest
    torch.save(bogus, tmp_path / "ema_0.pt")
    after = posthoc.reconstruct(tmp_path, sigma_rel=0.08, warn=False)
    assert isinstance(after, posthoc.Reconstruction)
    assert after.coefficients == before.coefficients
    for n in before.state_dict:
        assert torch.equal(before.state_dict[n], after.state_dict[n])


def test_altered_or_unsafe_snapshots_are_refused(tmp_path: Path) -> None:
    _run(tmp_path)
    man = json.loads((tmp_path / "manifest.json").read_text())
    victim = tmp_path / man["snapshots"][0]["file"]
    data = bytearray(victim.read_bytes())
    data[-1] ^= 1
    victim.write_bytes(bytes(data))
    with pytest.raises(posthoc.SnapshotError, match="SHA-256"):
        posthoc.reconstruct(tmp_path, sigma_rel=0.1)
    for bad in ("../outside.safetensors", "/etc/passwd", ".hidden", "a/b"):
        m2 = dict(man)
        m2["snapshots"] = [dict(man["snapshots"][0], file=bad)]
        (tmp_path / "manifest.json").write_text(json.dumps(m2))
        with pytest.raises(posthoc.SnapshotError, match="plain file name"):
            posthoc.reconstruct(tmp_path, sigma_rel=0.1)
    outside = tmp_path.parent / f"{tmp_path.name}-outside.safetensors"
    outside.write_bytes(b"x")
    (tmp_path / "link.safetensors").symlink_to(outside)
    m2 = dict(man)
    m2["snapshots"] = [dict(man["snapshots"][1], file="link.safetensors")]
    (tmp_path / "manifest.json").write_text(json.dumps(m2))
    with pytest.raises(posthoc.SnapshotError, match="symbolic link out of the input directory"):
        posthoc.reconstruct(tmp_path, sigma_rel=0.1)


def test_snapshot_files_are_safetensors_only(tmp_path: Path) -> None:
    """A pickle named like a snapshot (checksum matching) is not unpickled."""
    _run(tmp_path)
    man = json.loads((tmp_path / "manifest.json").read_text())
    f = tmp_path / man["snapshots"][0]["file"]
    torch.save({"x": torch.zeros(1)}, f)
    import hashlib

    man["snapshots"][0]["sha256"] = hashlib.sha256(f.read_bytes()).hexdigest()
    (tmp_path / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(posthoc.SnapshotError, match="safetensors"):
        posthoc.reconstruct(tmp_path, sigma_rel=0.1)


# ----------------------------------------------------------------------------- the policy


def test_manifest_and_snapshots(tmp_path: Path) -> None:
    policy = _run(tmp_path, steps=35, every=10)
    man = posthoc.read_manifest(tmp_path)
    assert man["time_unit"] == "step" and man["sigma_rels"] == [0.05, 0.1, 0.15]
    assert [s["step"] for s in man["snapshots"]] == [10] * 3 + [20] * 3 + [30] * 3
    policy.end()  # a last snapshot at step 35
    man = posthoc.read_manifest(tmp_path)
    assert [s["step"] for s in man["snapshots"]][-3:] == [35] * 3
    from safetensors import safe_open

    with safe_open(str(tmp_path / man["snapshots"][0]["file"]), "pt") as f:
        assert f.get_tensor("0.weight").dtype == torch.float32
        assert f.get_tensor("1.num_batches_tracked").dtype == torch.int64
    assert man["tensors"]["1.running_mean"]["param"] is False
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_float16_default_and_snapshot_every_epoch(tmp_path: Path) -> None:
    model = _model()
    policy = wa.PostHocEMA(tmp_path, snapshot_every="1ep")
    opt = _train(policy, model, 5)
    policy.on_epoch_end()
    _train(policy, model, 5, opt=opt, start=5)
    policy.on_epoch_end()
    man = posthoc.read_manifest(tmp_path)
    assert man["dtype"] == "float16"
    assert [s["step"] for s in man["snapshots"]] == [5, 5, 10, 10]


def test_fresh_run_refuses_another_runs_directory(tmp_path: Path) -> None:
    _run(tmp_path, steps=20)
    with pytest.raises(wa.ConfigError, match="already holds"):
        _run(tmp_path, steps=20)
    _run(tmp_path / "x", steps=20)
    policy = wa.PostHocEMA(tmp_path / "x", snapshot_every=10, overwrite=True)
    _train(policy, _model(), 10)
    assert len(posthoc.read_manifest(tmp_path / "x")["snapshots"]) == 2


def test_bad_arguments() -> None:
    with pytest.raises(wa.ConfigError, match="sigma_rel"):
        wa.PostHocEMA("d", sigma_rels=(0.5,))
    with pytest.raises(wa.ConfigError, match="sigma_rels"):
        wa.PostHocEMA("d", sigma_rels=0.1)  # type: ignore[arg-type]
    with pytest.raises(wa.ConfigError, match="eval_sigma_rel"):
        wa.PostHocEMA("d", eval_sigma_rel=0.2)
    with pytest.raises(wa.ConfigError, match="recompute_bn"):
        wa.PostHocEMA("d", recompute_bn=True)
    with pytest.raises(wa.ConfigError, match="snapshot_dtype"):
        wa.PostHocEMA("d", snapshot_dtype=torch.int8)


def test_resume_mid_run_is_bit_for_bit(tmp_path: Path) -> None:
    straight = _run(tmp_path / "a", steps=100)
    # interrupted at step 45 (checkpoint), then killed at 63 (snapshots at 50, 60 written), resumed
    torch.manual_seed(0)
    model = _model()
    policy = wa.PostHocEMA(tmp_path / "b", sigma_rels=(0.05, 0.10, 0.15), snapshot_every=10,
                           snapshot_dtype=torch.float32, final="training")
    opt = _train(policy, model, 45)
    ckpt = {"model": {k: v.clone() for k, v in model.state_dict().items()},
            "opt": opt.state_dict(), "policy": policy.state_dict()}
    ckpt = _roundtrip(ckpt, tmp_path / "ckpt.pt")
    _train(policy, model, 18, opt=opt, start=45)
    policy.detach()

    model2 = _model()
    model2.load_state_dict(ckpt["model"])
    opt2 = torch.optim.SGD(model2.parameters(), lr=0.05, momentum=0.9)
    opt2.load_state_dict(ckpt["opt"])
    resumed = wa.PostHocEMA(tmp_path / "b", sigma_rels=(0.05, 0.10, 0.15), snapshot_every=10,
                            snapshot_dtype=torch.float32, final="training")
    resumed.load_state_dict(ckpt["policy"])
    resumed.begin(model2, opt2)
    assert len(posthoc.read_manifest(tmp_path / "b")["snapshots"]) == 12  # up to step 40
    _train(resumed, model2, 55, opt=opt2, start=45)

    ma, mb = posthoc.read_manifest(tmp_path / "a"), posthoc.read_manifest(tmp_path / "b")
    assert ma["snapshots"] == mb["snapshots"]
    for s in ma["snapshots"]:
        assert (tmp_path / "a" / s["file"]).read_bytes() == (tmp_path / "b" / s["file"]).read_bytes()
    ra = posthoc.reconstruct(tmp_path / "a", sigma_rel=[0.07, 0.2], step=77, warn=False)
    rb = posthoc.reconstruct(tmp_path / "b", sigma_rel=[0.07, 0.2], step=77, warn=False)
    assert isinstance(ra, list) and isinstance(rb, list)
    for x, y in zip(ra, rb, strict=True):
        for n in x.state_dict:
            assert torch.equal(x.state_dict[n], y.state_dict[n])
    assert straight.averager is not None and resumed.averager is not None
    for slot in ("p0", "p1", "p2"):
        for n, t in straight.averager.averaged_tensors(slot).items():
            assert torch.equal(t, resumed.averager.averaged_tensors(slot)[n])


def _roundtrip(obj: dict, path: Path) -> dict:
    torch.save(obj, path)
    return torch.load(path, weights_only=True)


def test_averaged_and_final_use_eval_sigma_rel(tmp_path: Path) -> None:
    model = _model()
    policy = wa.PostHocEMA(tmp_path, sigma_rels=(0.05, 0.2), eval_sigma_rel=0.2, snapshot_every=100)
    _train(policy, model, 12)
    assert policy.averager is not None
    expected = {n: t.clone() for n, t in policy.averager.averaged_tensors("p1").items()}
    with policy.averaged() as m:
        torch.testing.assert_close(m[0].weight.detach(), expected["0.weight"])
    policy.end()
    torch.testing.assert_close(model[0].weight.detach(), expected["0.weight"])
    assert [s["step"] for s in posthoc.read_manifest(tmp_path)["snapshots"]] == [12, 12]


def test_sharded_models_are_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(posthoc, "_is_sharded", lambda m: True)
    with pytest.raises(wa.ConfigError, match="sharded"):
        wa.PostHocEMA(tmp_path).begin(_model())


def test_cli_posthoc(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from weightavg.cli._main import main

    _run(tmp_path / "run")
    assert main([
        "posthoc", str(tmp_path / "run"), "--sigma-rel", "0.07,0.12", "-o", str(tmp_path / "out"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert len(report["outputs"]) == 2 and len(report["reconstructions"]) == 2
    from safetensors.torch import load_file

    direct = posthoc.reconstruct(tmp_path / "run", sigma_rel=0.07, warn=False)
    assert isinstance(direct, posthoc.Reconstruction)
    written = load_file(report["outputs"][0])
    for n, t in direct.state_dict.items():
        assert torch.equal(written[n], t)
    assert main(["posthoc", str(tmp_path / "run"), "--sigma-rel", "0.1", "-o", str(tmp_path / "one.safetensors")]) == 0
    assert (tmp_path / "one.safetensors").is_file()
    assert main(["posthoc", str(tmp_path / "run"), "--sigma-rel", "0.1", "--step", "3", "-o",
                 str(tmp_path / "two.safetensors")]) == 1
    assert "first snapshot" in capsys.readouterr().err
    assert not (tmp_path / "two.safetensors").exists()


def test_a_failed_snapshot_write_does_not_stop_training(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = _model()
    policy = wa.PostHocEMA(tmp_path, snapshot_every=5)
    opt = _train(policy, model, 5)
    real = posthoc._atomic_write

    def full_disk(path: Path, data: bytes) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(posthoc, "_atomic_write", full_disk)
    with pytest.warns(UserWarning, match="step 10 was not written"):
        _train(policy, model, 5, opt=opt, start=5)
    monkeypatch.setattr(posthoc, "_atomic_write", real)
    _train(policy, model, 5, opt=opt, start=10)
    assert [s["step"] for s in posthoc.read_manifest(tmp_path)["snapshots"]] == [5, 5, 15, 15]
    assert posthoc.reconstruct(tmp_path, sigma_rel=0.08, warn=False)
