"""The demo: its statistics, schedules, pairing of runs, its SWA/EMA policies, and `weightavg demo --quick`."""

from __future__ import annotations

import builtins
import contextlib
import copy
import io
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from weightavg.cli import main
from weightavg.demo import DemoConfig, load_data, make_model
from weightavg.demo import _methods as demo_methods
from weightavg.demo._lr import cosine_lr, swa_schedule
from weightavg.demo._run import _run_seed
from weightavg.demo._stats import betainc, mean_std, paired_test, t_two_sided_p

pytest.importorskip("mnist1d")
pytest.importorskip("sklearn")

PNG = b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------- statistics


@settings(max_examples=60, deadline=None)
@given(
    a=st.floats(0.05, 40.0),
    b=st.floats(0.05, 40.0),
    x=st.floats(0.0, 1.0),
)
def test_betainc_matches_scipy(a: float, b: float, x: float) -> None:
    special = pytest.importorskip("scipy.special")
    assert betainc(a, b, x) == pytest.approx(float(special.betainc(a, b, x)), rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("df", [1, 2, 4, 9, 30])
@pytest.mark.parametrize("t", [0.0, 0.3, 1.0, 2.5, 6.0, 40.0])
def test_t_two_sided_p_matches_scipy(t: float, df: int) -> None:
    stats = pytest.importorskip("scipy.stats")
    assert t_two_sided_p(t, df) == pytest.approx(float(2 * stats.t.sf(t, df)), rel=1e-9, abs=1e-14)


@settings(max_examples=40, deadline=None)
@given(pairs=st.lists(st.tuples(st.floats(-5, 5), st.floats(-5, 5)), min_size=2, max_size=12))
def test_paired_test_without_scipy_matches_ttest_rel(pairs: list[tuple[float, float]]) -> None:
    stats = pytest.importorskip("scipy.stats")
    a = [p[0] for p in pairs]
    b = [p[1] for p in pairs]
    diffs = [x - y for x, y in pairs]
    if mean_std(diffs)[1] < 1e-9:
        return  # constant differences: scipy gives NaN, we give 0 or 1 (tested below)
    real_import = builtins.__import__

    def no_scipy(name: str, *args, **kwargs):  # type: ignore[no-untyped-def]
        if name == "scipy" or name.startswith("scipy."):
            raise ImportError("scipy hidden by the test")
        return real_import(name, *args, **kwargs)

    with mock.patch.object(builtins, "__import__", no_scipy):
        ours = paired_test(a, b)
    ref = stats.ttest_rel(a, b)
    assert ours.p_value == pytest.approx(float(ref.pvalue), rel=1e-7, abs=1e-12)
    assert ours.diff_mean == pytest.approx(sum(diffs) / len(diffs))
    assert ours.wins == sum(d > 0 for d in diffs)


def test_paired_test_edge_cases() -> None:
    assert math.isnan(paired_test([1.0], [0.0]).p_value)
    assert paired_test([1.0, 2.0], [1.0, 2.0]).p_value == 1.0
    assert math.isnan(paired_test([2.0, 3.0], [1.0, 2.0]).p_value)  # constant difference: t undefined
    with pytest.raises(ValueError, match="equal lengths"):
        paired_test([1.0], [1.0, 2.0])


# ----------------------------------------------------------------------------- schedules


def _torch_swa_lrs(epochs: int, lr: float, swa_start: int, swa_lr: float, anneal: int,
                   strategy: str, before: str) -> list[float]:
    """Reference: torch's CosineAnnealingLR/constant, then SWALR, stepped once per epoch."""
    from torch.optim.swa_utils import SWALR

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs) if before == "cosine" else None
    out = []
    swa = None
    for e in range(epochs):
        if e == swa_start:
            swa = SWALR(opt, swa_lr=swa_lr, anneal_epochs=anneal, anneal_strategy=strategy)
        out.append(opt.param_groups[0]["lr"])
        opt.step()  # (no gradient: a no-op that keeps the scheduler's call-order check quiet)
        if swa is not None:
            swa.step()
        elif sched is not None:
            sched.step()
    return out


@pytest.mark.parametrize(
    ("epochs", "lr", "swa_start", "swa_lr", "anneal", "strategy", "before"),
    [
        pytest.param(20, 0.1, 2, 0.001, 10, "cos", "constant", id="blog-figure-1"),
        pytest.param(20, 0.1, 2, 0.1, 10, "cos", "constant", id="same-lr"),
        pytest.param(20, 0.01, 5, 0.1, 3, "linear", "constant", id="rising-linear"),
        pytest.param(60, 0.1, 30, 0.03, 3, "cos", "cosine", id="demo"),
        pytest.param(60, 0.1, 45, 0.03, 3, "cos", "cosine", id="demo-start-0.75"),
        pytest.param(10, 0.1, 0, 0.05, 1, "linear", "cosine", id="start-0"),
    ],
)
def test_swa_schedule_matches_torch_swalr(
    epochs: int, lr: float, swa_start: int, swa_lr: float, anneal: int, strategy: str, before: str
) -> None:
    ours = swa_schedule(epochs, lr=lr, swa_start=swa_start, swa_lr=swa_lr, anneal_epochs=anneal,
                        strategy=strategy, before=before)
    ref = _torch_swa_lrs(epochs, lr, swa_start, swa_lr, anneal, strategy, before)
    assert ours == pytest.approx(ref, rel=1e-9, abs=1e-12)


def test_cosine_lr_matches_torch() -> None:
    ref = _torch_swa_lrs(60, 0.1, 60, 0.03, 3, "cos", "cosine")
    assert [cosine_lr(0.1, e, 60) for e in range(60)] == pytest.approx(ref, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"swa_start": 21}, "swa_start"),
        ({"swa_lr": 0.0}, "swa_lr"),
        ({"anneal_epochs": -1}, "anneal_epochs"),
        ({"strategy": "exp"}, "anneal_strategy"),
        ({"before": "step"}, "before"),
    ],
)
def test_swa_schedule_rejects_bad_arguments(kwargs: dict, match: str) -> None:
    args = {"lr": 0.1, "swa_start": 2, "swa_lr": 0.01, "anneal_epochs": 3, **kwargs}
    with pytest.raises(ValueError, match=match):
        swa_schedule(20, **args)


# ----------------------------------------------------------------------------- pairing of the runs


class _Spy(demo_methods.Method):
    """Records the model's weights at trajectory start, after every step and after every epoch."""

    label = "spy"

    def __init__(self, cfg: object = None) -> None:
        super().__init__(cfg)
        self.at_start: dict[str, torch.Tensor] = {}
        self.after: dict[int, dict[str, torch.Tensor]] = {}
        self.after_steps: dict[int, dict[str, torch.Tensor]] = {}

    def start(self, model: torch.nn.Module, ctx: demo_methods.EvalContext) -> None:
        self.at_start = {k: v.clone() for k, v in model.state_dict().items()}

    def after_step(self, model: torch.nn.Module, step: int) -> None:
        self.after_steps[step] = {k: v.clone() for k, v in model.named_parameters()}

    def after_epoch(self, model: torch.nn.Module, epoch: int) -> None:
        self.after[epoch] = {k: v.clone() for k, v in model.state_dict().items()}


class _SpySGD(_Spy):
    key = "spy_sgd"
    trajectory = "sgd"


class _SpySWA(_Spy):
    key = "spy_swa"
    trajectory = "swa"


@pytest.fixture(scope="module")
def digits():  # type: ignore[no-untyped-def]
    return load_data("digits")


def _ctx(data, cfg: DemoConfig) -> demo_methods.EvalContext:  # type: ignore[no-untyped-def]
    spe = math.ceil(data.x_train.shape[0] / cfg.batch_size)
    return demo_methods.EvalContext(bn_batches=[data.x_train], x_test=data.x_test,
                                    swa_start=cfg.swa_start_epoch, total_steps=cfg.epochs * spe,
                                    steps_per_epoch=spe)


def _with_bn_of_torch(model: torch.nn.Module, params: dict[str, torch.Tensor], data) -> dict[str, torch.Tensor]:  # type: ignore[no-untyped-def]
    """Reference: ``params`` put into a copy of ``model``, BN statistics from torch's ``update_bn``.

    The training set is one batch, as in :func:`_ctx` (layers after the first BatchNorm see inputs
    normalised with their batch's statistics, so the split matters there).
    """
    from torch.optim.swa_utils import update_bn

    ref = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            p.copy_(params[name])
    update_bn([data.x_train], ref)
    return ref.state_dict()


def _assert_matches(ours: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> None:
    assert set(ours) == set(ref)
    for name, value in ref.items():
        if value.is_floating_point():  # (num_batches_tracked: an integer count, not compared)
            torch.testing.assert_close(ours[name].double(), value.double(), rtol=1e-5, atol=1e-6,
                                       msg=lambda m, name=name: f"{name}: {m}")


def test_swa_branch_shares_weights_optimizer_and_batch_order(digits, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setitem(demo_methods.METHODS, "spy_sgd", _SpySGD)
    monkeypatch.setitem(demo_methods.METHODS, "spy_swa", _SpySWA)
    cfg = DemoConfig(dataset="digits", seeds=1, epochs=6, swa_start=0.5,
                     methods=("swa", "spy_sgd", "spy_swa"))
    res, methods = _run_seed(3, cfg, digits, _ctx(digits, cfg), None, "t")
    sgd, swa = methods["spy_sgd"], methods["spy_swa"]
    S = cfg.swa_start_epoch
    # the branch starts from the SGD weights after epoch S-1 ...
    for k, v in sgd.after[S - 1].items():
        torch.testing.assert_close(swa.at_start[k], v, rtol=0, atol=0)
    # ... and SWALR's first epoch uses the SGD run's learning rate: with the same momentum buffers
    # and the same batch order, epoch S is bit-identical on both runs
    for k, v in sgd.after[S].items():
        torch.testing.assert_close(swa.after[S][k], v, rtol=0, atol=0)
    # later epochs differ (SWALR anneals to swa_lr)
    assert any(not torch.equal(swa.after[S + 1][k], v) for k, v in sgd.after[S + 1].items())
    assert set(res.metrics) == {"sgd", "swa", "spy_sgd", "spy_swa"}


def test_swa_policy_averages_once_per_epoch_of_the_swa_phase(digits, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setitem(demo_methods.METHODS, "spy_swa", _SpySWA)
    cfg = DemoConfig(dataset="digits", seeds=1, epochs=6, swa_start=0.5, methods=("swa", "spy_swa"))
    _, methods = _run_seed(0, cfg, digits, _ctx(digits, cfg), None, "t")
    spy, swa = methods["spy_swa"], methods["swa"]
    epochs = sorted(spy.after)
    assert epochs == list(range(cfg.swa_start_epoch, cfg.epochs))
    policy = swa.policy
    assert policy.num_updates == len(epochs) == 3
    assert not policy.active  # ended with the branch
    # weights: the equal mean of the branch's weights at its epoch ends (numpy-free float64 loop);
    # BatchNorm statistics: recomputed for those weights, as torch's update_bn does
    model = make_model(cfg.model, digits.num_features, digits.num_classes)
    model.load_state_dict(spy.after[epochs[-1]])
    mean = {name: torch.stack([spy.after[e][name].double() for e in epochs]).mean(0)
            for name, _ in model.named_parameters()}
    _assert_matches(policy.export_state_dict(), _with_bn_of_torch(model, mean, digits))


def test_ema_policy_is_the_warmed_up_ema_of_every_step(digits, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setitem(demo_methods.METHODS, "spy_sgd", _SpySGD)
    cfg = DemoConfig(dataset="digits", seeds=1, epochs=3, methods=("ema", "spy_sgd"))
    _, methods = _run_seed(2, cfg, digits, _ctx(digits, cfg), None, "t")
    spy, policy = methods["spy_sgd"], methods["ema"].policy
    steps = sorted(spy.after_steps)
    assert steps == list(range(1, cfg.epochs * math.ceil(digits.x_train.shape[0] / cfg.batch_size) + 1))
    assert policy.num_updates == len(steps)
    # reference: the first step copies; step t >= 2 mixes with decay min(0.999, 1 - t^-0.75)
    # (timm/diffusers' warmup 1 - (1 + t')^-power with t' = t - 1 updates before it)
    ref = {k: v.double() for k, v in spy.after_steps[1].items()}
    for t in steps[1:]:
        d = min(0.999, 1.0 - t ** -0.75)
        ref = {k: d * v + (1.0 - d) * spy.after_steps[t][k].double() for k, v in ref.items()}
    model = make_model(cfg.model, digits.num_features, digits.num_classes)
    _assert_matches(policy.export_state_dict(), _with_bn_of_torch(model, ref, digits))


@pytest.mark.parametrize(
    ("epochs", "swa_start", "anneal", "strategy"),
    [
        pytest.param(8, 0.5, 3, "cos", id="demo-like"),
        pytest.param(6, 0.5, 0, "linear", id="anneal-0"),
        pytest.param(7, 0.3, 10, "linear", id="anneal-past-end"),
    ],
)
def test_learning_rate_of_every_step_is_the_plotted_schedule(
    digits, epochs: int, swa_start: float, anneal: int, strategy: str  # type: ignore[no-untyped-def]
) -> None:
    """On the branch the policy sets the rate; it must be what lr_schedule.png and plot-lr draw."""
    cfg = DemoConfig(dataset="digits", seeds=1, epochs=epochs, swa_start=swa_start, swa_lr=0.02,
                     anneal_epochs=anneal, anneal_strategy=strategy, methods=("swa",))
    res, _ = _run_seed(0, cfg, digits, _ctx(digits, cfg), None, "t")
    plotted = cfg.lr_schedules()
    spe = math.ceil(digits.x_train.shape[0] / cfg.batch_size)
    for traj in ("sgd", "swa"):
        used = res.step_lrs[traj]
        assert len(used) == epochs
        for e, lrs in enumerate(used):
            assert len(lrs) == spe
            assert lrs == pytest.approx([plotted[traj][e]] * spe, rel=1e-12, abs=0), (traj, e)
    reached = max(1, anneal) < epochs - cfg.swa_start_epoch  # the anneal ends before the run does
    assert (plotted["swa"][-1] == pytest.approx(0.02)) is reached


def test_run_is_deterministic(digits) -> None:  # type: ignore[no-untyped-def]
    cfg = DemoConfig(dataset="digits", seeds=1, epochs=4, methods=("swa", "ema"))
    a, _ = _run_seed(1, cfg, digits, _ctx(digits, cfg), None, "t")
    b, _ = _run_seed(1, cfg, digits, _ctx(digits, cfg), None, "t")
    assert a.metrics == b.metrics


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"methods": ("swa", "adam")}, "methods"),
        ({"methods": ("swa", "swa")}, "methods"),
        ({"epochs": 1}, "epochs"),
        ({"swa_start": 1.0}, "swa_start"),
        ({"anneal_epochs": -1}, "anneal_epochs"),
        ({"model": "resnet"}, "model"),
        ({"seeds": 0}, "seeds"),
    ],
)
def test_config_rejects_bad_settings(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        DemoConfig(**kwargs).validate()


# ----------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    out = tmp_path_factory.mktemp("demo")
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        rc = main(["demo", "--quick", "--out", str(out), "--progress", "plain"])
    return rc, stdout.getvalue(), stderr.getvalue(), out


@pytest.mark.slow
def test_demo_quick_prints_the_table(quick_run) -> None:  # type: ignore[no-untyped-def]
    rc, stdout, stderr, _ = quick_run
    assert rc == 0, stderr
    lines = stdout.splitlines()
    header = next(line for line in lines if "Method" in line and "Acc. %" in line)
    for col in ("Δ acc. (p)", "NLL", "Δ NLL (p)", "ECE %", "Δ ECE (p)", "s/seed"):
        assert col in header
    rows = {line.split()[0]: line for line in lines
            if line.split() and line.split()[0] in {"SGD", "SWA", "EMA", "SWAG"} and "±" in line}
    assert {"SGD", "SWA", "EMA"} <= set(rows)
    for label, row in rows.items():
        assert len(re.findall(r"\d+\.\d+ ± \d+\.\d+", row)) == 3, row  # acc, NLL, ECE
        if label != "SGD":
            assert len(re.findall(r"[+−]\d+\.\d+ \((?:<0\.001|\d\.\d{3}|n/a)\)", row)) == 3, row
    assert "Wall time:" in stdout
    assert "seed 0: test accuracy" in stderr  # progress goes to stderr


@pytest.mark.slow
def test_demo_quick_writes_the_files(quick_run) -> None:  # type: ignore[no-untyped-def]
    rc, stdout, _, out = quick_run
    assert rc == 0
    for name in ("results.md", "results.json", "lr_schedule.png", "test_error.png", "reliability.png"):
        path = out / name
        assert path.is_file(), name
        assert str(path) in stdout  # the printed file list names it
    for name in ("lr_schedule.png", "test_error.png", "reliability.png"):
        assert (out / name).read_bytes()[:8] == PNG
    assert not list(out.glob(".*tmp"))  # atomic writes leave no temporary behind
    md = (out / "results.md").read_text()
    table = [line for line in md.splitlines() if line.startswith("|")]
    assert table[0].startswith("| Method | Acc. % |")
    assert len(table) == 2 + sum(1 for line in table[2:] if line.startswith("| S") or line.startswith("| E"))
    result = json.loads((out / "results.json").read_text())
    assert result["config"]["seeds"] == 2
    assert result["config"]["epochs"] == 8
    methods = result["methods"]
    assert {"sgd", "swa", "ema"} <= set(methods)
    for key, entry in methods.items():
        for metric in ("accuracy", "nll", "ece", "train_time_s"):
            assert len(entry[metric]["per_seed"]) == 2
            assert entry[metric]["mean"] == pytest.approx(sum(entry[metric]["per_seed"]) / 2)
        if key != "sgd":
            vs = entry["vs_sgd"]["accuracy"]
            assert vs["diff_mean"] == pytest.approx(
                entry["accuracy"]["mean"] - methods["sgd"]["accuracy"]["mean"])
            if vs["p_value"] is None:  # differences identical in both seeds: t undefined
                assert vs["diff_std"] == 0.0
            else:
                assert 0.0 <= vs["p_value"] <= 1.0
    assert len(result["lr_schedules"]["swa"]) == 8
    assert len(methods["sgd"]["test_error_curve"]["mean"]) == 8


def test_demo_json_without_matplotlib(tmp_path: Path, monkeypatch, capsys) -> None:  # type: ignore[no-untyped-def]
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "matplotlib" else real(name, *a))
    rc = main(["demo", "--dataset", "digits", "--seeds", "1", "--epochs", "4", "--methods", "swa",
               "--out", str(tmp_path), "--progress", "none", "--json"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    result = json.loads(captured.out)
    assert set(result["methods"]) == {"sgd", "swa"}
    assert result["methods"]["swa"]["vs_sgd"]["accuracy"]["p_value"] is None  # one seed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json", "results.md"]
    md = (tmp_path / "results.md").read_text()
    assert "run with --seeds 3 or more" in md


def test_demo_text_without_matplotlib_says_how_to_get_plots(tmp_path: Path, monkeypatch, capsys) -> None:  # type: ignore[no-untyped-def]
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "matplotlib" else real(name, *a))
    rc = main(["demo", "--dataset", "digits", "--seeds", "1", "--epochs", "3", "--methods", "ema",
               "--out", str(tmp_path), "--progress", "none"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "pip install 'weightavg[demo]'" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--methods", "swa,adam"], "methods='adam' is invalid"),
        (["--swa-start", "0.99", "--epochs", "4"], "swa_start=0.99 is invalid"),
    ],
)
def test_demo_bad_options_fail_with_one_line(argv: list[str], message: str, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    rc = main(["demo", "--out", str(tmp_path), *argv])
    err = capsys.readouterr().err
    assert rc == 1
    assert message in err
    assert len(err.strip().splitlines()) == 1
    assert "Traceback" not in err


# ----------------------------------------------------------------------------- the command, end to end

_REPO = Path(__file__).resolve().parents[1]
_DEMO_FILES = ("results.md", "results.json", "lr_schedule.png", "test_error.png", "reliability.png")


def _cli(argv: list[str], *, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    """The real ``weightavg`` command in a fresh interpreter."""
    return subprocess.run([sys.executable, "-m", "weightavg", *argv], capture_output=True, text=True,
                          timeout=timeout, cwd=_REPO, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def _assert_complete(out: Path, *, plots: bool = True) -> dict:  # type: ignore[type-arg]
    names = _DEMO_FILES if plots else _DEMO_FILES[:2]
    for name in names:
        assert (out / name).is_file(), name
    for name in _DEMO_FILES[2:]:
        if plots:
            assert (out / name).read_bytes()[:8] == PNG, name
        else:
            assert not (out / name).exists(), name
    result = json.loads((out / "results.json").read_text())
    assert sorted(Path(f).name for f in result["files"]) == sorted(names)
    return result


@pytest.mark.slow
@pytest.mark.parametrize("argv", [
    pytest.param(["--quick", "--eval-every", "2"], id="eval-every-2"),
    pytest.param(["--quick", "--model", "cnn", "--methods", "swa,ema"], id="cnn"),
])
def test_demo_curves_evaluated_every_n_epochs_are_plotted(argv: list[str], tmp_path: Path) -> None:
    """Regression: NaN entries of unevaluated epochs reached set_ylim and lost every result."""
    proc = _cli(["demo", *argv, "--out", str(tmp_path), "--progress", "none"])
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    result = _assert_complete(tmp_path)
    curve = result["methods"]["sgd"]["test_error_curve"]["mean"]
    every = result["config"]["eval_every"]
    assert every > 1
    assert [i for i, v in enumerate(curve) if v is not None] == [
        e for e in range(len(curve)) if (e + 1) % every == 0 or e == len(curve) - 1]
    assert "| SWA |" in (tmp_path / "results.md").read_text()


# Every documented option and option value at --quick scale (each combination a few seconds).
_COMBOS = [
    pytest.param(["--model", "cnn", "--eval-every", "3", "--methods", "swa,ema", "--seeds", "1"],
                 id="cnn-every-3"),
    pytest.param(["--dataset", "digits", "--methods", "swa,ema"], id="digits"),
    pytest.param(["--dataset", "digits", "--model", "cnn", "--eval-every", "4", "--methods", "swa"],
                 id="digits-cnn"),
    pytest.param(["--methods", "ema", "--eval-every", "8", "--no-plots"], id="ema-no-plots"),
    pytest.param(["--methods", "swag", "--swag-samples", "2", "--eval-every", "5", "--json"], id="swag-json"),
    pytest.param(["--methods", "sgd", "--eval-every", "2"], id="sgd-only"),
    pytest.param(["--seeds", "1", "--epochs", "5", "--swa-start", "0.4", "--swa-lr", "0.05",
                  "--anneal-epochs", "0", "--methods", "swa"], id="one-seed-swa-options"),
    pytest.param(["--seeds", "3", "--epochs", "4", "--methods", "swa", "--threads", "1",
                  "--progress", "plain"], id="three-seeds-threads"),
    pytest.param(["--methods", "swa", "--epochs", "4", "--progress", "rich"], id="rich"),
    pytest.param(["--methods", "swa", "--epochs", "4", "--progress", "tqdm", "--json", "--no-plots"],
                 id="tqdm-json-no-plots"),
    pytest.param(["--methods", "swa", "--epochs", "4", "--progress", "auto"], id="auto"),
]


@pytest.mark.slow
@pytest.mark.parametrize("argv", _COMBOS)
def test_demo_option_combinations(argv: list[str], tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    rc = main(["demo", "--quick", *argv, "--out", str(tmp_path)])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    assert "warning" not in cap.err
    result = _assert_complete(tmp_path, plots="--no-plots" not in argv)
    if "--json" in argv:
        assert json.loads(cap.out)["methods"] == result["methods"]
    else:
        assert "Wall time:" in cap.out
    cfg = result["config"]
    assert len(result["seeds"]) == cfg["seeds"]
    for entry in result["methods"].values():
        assert len(entry["accuracy"]["per_seed"]) == cfg["seeds"]
        assert len(entry["test_error_curve"]["mean"]) == cfg["epochs"]


def test_demo_out_existing_file_fails_before_training(tmp_path: Path) -> None:
    target = tmp_path / "taken.txt"
    target.write_text("keep me")
    proc = _cli(["demo", "--quick", "--out", str(target), "--progress", "plain"])
    assert proc.returncode == 1
    assert "--out" in proc.stderr and str(target) in proc.stderr
    assert "seed 0" not in proc.stderr  # nothing was trained
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert target.read_text() == "keep me"


@pytest.mark.parametrize("kind", ["file-in-path", "result-is-a-folder"])
def test_demo_out_unusable_paths_fail_before_training(kind: str, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    if kind == "file-in-path":
        (tmp_path / "file").write_text("x")
        out = tmp_path / "file" / "run"
    else:
        out = tmp_path / "run"
        (out / "results.json").mkdir(parents=True)
    started = []
    with mock.patch("weightavg.demo.run_demo", side_effect=lambda *a, **k: started.append(1)), \
            mock.patch("weightavg.demo._command.run_demo", side_effect=lambda *a, **k: started.append(1)):
        rc = main(["demo", "--quick", "--out", str(out), "--progress", "none"])
    err = capsys.readouterr().err
    assert rc == 1 and not started
    assert "--out" in err


@pytest.mark.slow
def test_demo_reused_out_replaces_only_its_own_files(tmp_path: Path) -> None:
    for name in _DEMO_FILES:
        (tmp_path / name).write_bytes(b"stale from an earlier run")
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "old.png").write_bytes(b"mine too")
    proc = _cli(["demo", "--quick", "--methods", "swa", "--no-plots", "--out", str(tmp_path),
                 "--progress", "none"])
    assert proc.returncode == 0, proc.stderr
    _assert_complete(tmp_path, plots=False)  # the stale PNGs are gone
    assert (tmp_path / "notes.txt").read_text() == "mine"
    assert (tmp_path / "old.png").read_bytes() == b"mine too"
    said = (proc.stdout + proc.stderr).lower()
    assert "replaced" in said and "results.md" in said
    for name in _DEMO_FILES[2:]:
        assert name in said  # each removed stale plot is named


def test_demo_results_survive_a_failing_plot(tmp_path: Path, monkeypatch, capsys) -> None:  # type: ignore[no-untyped-def]
    from weightavg.demo import _report

    drawn: list[str] = []

    def boom(result, path):  # type: ignore[no-untyped-def]
        # results are on disk before any plot is drawn
        assert (path.parent / "results.json").is_file() and (path.parent / "results.md").is_file()
        drawn.append(path.name)
        raise ValueError("Axis limits cannot be NaN or Inf")

    monkeypatch.setattr(_report, "_plot_error", boom)
    (tmp_path / "test_error.png").write_bytes(b"stale")
    rc = main(["demo", "--dataset", "digits", "--seeds", "2", "--epochs", "4", "--methods", "swa",
               "--out", str(tmp_path), "--progress", "none"])
    cap = capsys.readouterr()
    assert drawn == ["test_error.png"]
    assert rc == 1  # something asked for was not written: the status says so
    assert "test_error.png" in cap.err and "Axis limits" in cap.err
    assert "Traceback" not in cap.err
    assert "| SWA |" in (tmp_path / "results.md").read_text()
    assert "Wall time:" in cap.out  # the table is still printed
    result = json.loads((tmp_path / "results.json").read_text())
    assert "test_error.png" not in " ".join(result["files"])
    assert not (tmp_path / "test_error.png").exists()  # no stale plot next to new results
    for name in ("lr_schedule.png", "reliability.png"):
        assert (tmp_path / name).read_bytes()[:8] == PNG


# ----------------------------------------------------------------------------- what the files say


def _fake_result(*, seeds: int = 3, epochs: int = 10, eval_every: int = 1, swa_start: float = 0.7,
                 methods: tuple[str, ...] = ("swa", "swag")):  # type: ignore[no-untyped-def]
    """A DemoResult with hand-made numbers (no training)."""
    from weightavg.demo._run import DemoResult, SeedResult

    cfg = DemoConfig(seeds=seeds, epochs=epochs, eval_every=eval_every, swa_start=swa_start,
                     methods=methods)
    keys = cfg.method_keys()
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 10, (300,), generator=g)
    out = []
    for s in range(seeds):
        r = SeedResult(seed=s)
        for i, k in enumerate(keys):
            logits = torch.randn(300, 10, generator=g, dtype=torch.float64)
            logits[torch.arange(300), y] += 2.0 + 0.3 * i
            logits *= (1.0, 3.0, 8.0)[s % 3]  # seeds from under- to over-confident: pooling changes the ECE
            r.probs[k] = torch.softmax(logits, 1)
            r.metrics[k] = {"accuracy": float((r.probs[k].argmax(1) == y).double().mean()),
                            "nll": float(-r.probs[k][torch.arange(300), y].log().mean()),
                            "ece": metrics_ece(r.probs[k], y)}
            r.train_time_s[k] = 1.0
            curve = [math.nan] * epochs
            evaluated = [e for e in range(epochs) if (e + 1) % eval_every == 0 or e == epochs - 1]
            if k == "swag":
                evaluated = [epochs - 1]
            elif k != "sgd":
                evaluated = [e for e in evaluated if e >= cfg.swa_start_epoch]
            for e in evaluated:
                curve[e] = 0.9 * math.exp(-e / 2) + 0.2 - 0.01 * i + 0.005 * s
            r.curves[k] = curve
        out.append(r)
    return DemoResult(config=cfg, data_description="fake", labels={k: k.upper() for k in keys},
                      descriptions=dict.fromkeys(keys, ""),
                      trajectories={k: "sgd" if k == "sgd" else "swa" for k in keys},
                      seeds=out, y_test=y, wall_time_s=1.0, threads=1)


def metrics_ece(probs: torch.Tensor, labels: torch.Tensor) -> float:
    from weightavg import metrics

    return metrics.ece(probs, labels, num_bins=15)


def test_results_json_wins_count_the_better_direction() -> None:
    from weightavg.demo._report import result_json

    res = _fake_result(seeds=4, methods=("swa",))
    for i, s in enumerate(res.seeds):  # SWA: higher accuracy in 3/4, lower NLL in 4/4, lower ECE in 1/4
        s.metrics["sgd"] = {"accuracy": 0.70, "nll": 0.80, "ece": 0.05}
        s.metrics["swa"] = {"accuracy": 0.72 if i else 0.69, "nll": 0.70 - 0.01 * i,
                            "ece": 0.04 if i == 0 else 0.06}
    vs = result_json(res)["methods"]["swa"]["vs_sgd"]
    assert (vs["accuracy"]["wins"], vs["nll"]["wins"], vs["ece"]["wins"]) == (3, 4, 1)
    assert (vs["accuracy"]["better"], vs["nll"]["better"], vs["ece"]["better"]) == ("higher", "lower", "lower")


def test_reliability_titles_name_the_table_ece() -> None:
    from weightavg import metrics
    from weightavg.demo._report import _reliability_figure

    res = _fake_result(seeds=3)
    fig = _reliability_figure(res)
    titles = [ax.get_title() for ax in fig.axes]
    for key, title in zip(res.labels, titles, strict=True):
        table_ece = 100 * sum(s.metrics[key]["ece"] for s in res.seeds) / 3
        pooled = 100 * metrics.ece(torch.cat([s.probs[key] for s in res.seeds]),
                                   torch.cat([res.y_test] * 3), num_bins=15)
        assert abs(table_ece - pooled) > 0.05  # the two differ: both must be labelled
        assert f"{table_ece:.1f}" in title and "mean of seeds" in title, title
        assert f"{pooled:.1f}" in title and "pooled" in title, title


@pytest.mark.parametrize(("epochs", "eval_every", "swa_start"), [(8, 1, 0.75), (60, 5, 0.75), (10, 3, 0.3)])
def test_test_error_figure_shows_every_point(epochs: int, eval_every: int, swa_start: float) -> None:
    from matplotlib.collections import PolyCollection

    from weightavg.demo._report import _error_figure

    res = _fake_result(epochs=epochs, eval_every=eval_every, swa_start=swa_start)
    fig = _error_figure(res)
    main_ax, zoom = fig.axes[:2]
    assert main_ax.get_xlim() != zoom.get_xlim()  # the zoom shows less than the whole run
    for ax in (main_ax, zoom):
        x0, x1 = ax.get_xlim()
        y0, y1 = ax.get_ylim()
        assert all(map(math.isfinite, (x0, x1, y0, y1)))
        # SWAG's end-of-run marker is inside the panel, not on its edge
        assert x0 < epochs - 0.2 and epochs + 0.2 < x1
        # no curve or band clipped: every drawn point of the visible epochs is inside the limits
        for line in ax.get_lines():
            if "SWA start" in str(line.get_label()):
                continue  # the vertical marker, in axes coordinates
            for x, y in zip(line.get_xdata(), line.get_ydata(), strict=True):
                if x0 <= x <= x1:
                    assert y0 <= y <= y1, (line.get_label(), x, y, (y0, y1))
        for coll in ax.collections:  # mean ± std bands and error bars
            segments = [p.vertices for p in coll.get_paths()] if isinstance(coll, PolyCollection) \
                else list(getattr(coll, "get_segments", list)())
            for seg in segments:
                for x, y in seg:
                    if x0 <= x <= x1:
                        assert y0 - 1e-9 <= y <= y1 + 1e-9, (x, y, (y0, y1))
        labels = [t.get_text() for t in ax.texts] + [h.get_label() for h in ax.get_lines()]
        assert any("SWA start" in t for t in labels), labels


def test_progress_and_result_lines_number_seeds_alike(digits) -> None:  # type: ignore[no-untyped-def]
    from weightavg.demo import run_demo

    class Record:
        def __init__(self) -> None:
            self.adv: list[str] = []
            self.logs: list[str] = []

        def start(self, total: int) -> None: ...

        def advance(self, description: str) -> None:
            self.adv.append(description)

        def log(self, text: str) -> None:
            self.logs.append(text)

        def close(self) -> None: ...

    rec = Record()
    res = run_demo(DemoConfig(dataset="digits", seeds=2, epochs=3, methods=("ema",)), rec)
    in_progress = {int(m) for d in rec.adv for m in re.findall(r"seed (\d+)", d)}
    in_results = {int(m) for t in rec.logs for m in re.findall(r"seed (\d+)", t)}
    assert in_progress == in_results == {s.seed for s in res.seeds} == {0, 1}


# ----------------------------------------------------------------------------- examples

_EXAMPLES = _REPO / "examples"


def test_composer_ema_example_prints_the_raw_model_baseline(capsys) -> None:  # type: ignore[no-untyped-def]
    import importlib.util

    spec = importlib.util.spec_from_file_location("example_composer_ema_demo", _EXAMPLES / "composer_ema.py")
    assert spec is not None and spec.loader is not None
    ex = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ex)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(96, 64, generator=g)
    y = (x[:, 0] > 0).long()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    ex.main(loader, (x[:32], y[:32]))
    out = capsys.readouterr().out
    assert re.search(r"raw model \(no EMA\) \d\.\d{3}", out), out
    assert re.search(r"EMA \d\.\d{3}", out), out


def test_lightning_swa_example_says_where_it_wrote(tmp_path: Path) -> None:
    pytest.importorskip("lightning")
    target = tmp_path / "f.png"
    proc = subprocess.run([sys.executable, str(_EXAMPLES / "lightning_swa.py"), "--plot", str(target)],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert target.read_bytes()[:8] == PNG
    assert f"wrote {target}" in proc.stdout
