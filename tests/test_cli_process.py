"""The command line as a user meets it (issue #10): the real `python -m weightavg` in a subprocess.

Signals, exit statuses, what reaches stderr (tracebacks, warnings, "Broken pipe") and the files
left behind are only visible from outside the process.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import OrderedDict
from pathlib import Path

import pytest
import torch

PNG = b"\x89PNG\r\n\x1a\n"


def _cli(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "weightavg", *args], capture_output=True, text=True,
                          env=env, timeout=timeout, check=False)


def _error_line(p: subprocess.CompletedProcess[str]) -> str:
    assert p.returncode == 1, (p.returncode, p.stderr)
    assert "Traceback" not in p.stderr, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr
    return lines[0]


def _state(seed: int) -> OrderedDict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return OrderedDict([("fc.weight", torch.randn(4, 3, generator=g)), ("fc.bias", torch.randn(4, generator=g))])


# ----------------------------------------------------------------------------- 4. signals


def test_ctrl_c_while_torch_imports_prints_no_traceback(tmp_path: Path) -> None:
    torch.save(_state(0), tmp_path / "a.pt")
    proc = subprocess.Popen([sys.executable, "-m", "weightavg", "average", str(tmp_path / "a.pt"), "-o",
                             str(tmp_path / "o.pt")], stderr=subprocess.PIPE, text=True)
    time.sleep(0.4)  # torch takes a second or more to import
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert proc.returncode in (130, -signal.SIGINT), (proc.returncode, err)  # -2: before Python's handler
    assert not (tmp_path / "o.pt").exists()


def test_sigterm_while_torch_imports_is_quiet(tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "weightavg", "plot-lr", "--json"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    time.sleep(0.4)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert "Traceback" not in err, err
    assert proc.returncode in (143, -signal.SIGTERM, 0), (proc.returncode, err)


# ----------------------------------------------------------------------------- 5. Trainer state not copied


def test_trainer_checkpoint_state_is_not_copied(tmp_path: Path) -> None:
    st = pytest.importorskip("safetensors.torch")
    dirs = []
    for i in range(2):
        d = tmp_path / f"checkpoint-{i}"
        d.mkdir()
        st.save_file(dict(_state(i)), str(d / "model.safetensors"))
        (d / "config.json").write_text("{}")
        torch.save({"averager": _state(i)}, d / "weightavg_state.pt")  # this project's own training state
        for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json", "training_args.bin"):
            (d / name).write_bytes(b"x")
        dirs.append(d)
    p = _cli("average", *map(str, dirs), "-o", str(tmp_path / "avg"))
    assert p.returncode == 0, p.stderr
    assert sorted(x.name for x in (tmp_path / "avg").iterdir()) == ["config.json", "model.safetensors"]
    assert "weightavg_state.pt" in p.stdout.split("left out:")[1]


# ----------------------------------------------------------------------------- 7, 8, 11: plot-lr


def test_plot_lr_never_overwrites_without_force(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    out = tmp_path / "model.ckpt"
    out.write_bytes(b"an existing checkpoint")
    line = _error_line(_cli("plot-lr", "-o", str(out)))
    assert f"{out} exists: pass --force to replace it" in line
    assert out.read_bytes() == b"an existing checkpoint"
    p = _cli("plot-lr", "-o", str(out), "--force")
    assert p.returncode == 0, p.stderr
    assert out.read_bytes()[:8] == PNG
    assert [x.name for x in tmp_path.iterdir()] == ["model.ckpt"]


def _swalr_reference(epochs: int, first_swa_epoch_0based: int) -> list[float]:
    from torch.optim.swa_utils import SWALR

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    ref, swa = [], None
    for e in range(epochs):
        if e == first_swa_epoch_0based:
            swa = SWALR(opt, swa_lr=0.001, anneal_epochs=10, anneal_strategy="cos")
        ref.append(opt.param_groups[0]["lr"])
        opt.step()
        if swa is not None:
            swa.step()
    return ref


def test_plot_lr_swa_epoch_start_is_lightnings_one_based_epoch() -> None:
    # Lightning's StochasticWeightAveraging(swa_epoch_start=2) starts SWALR in epoch 2 counted from
    # 1, i.e. at current_epoch == 1 (its `swa_start` is swa_epoch_start - 1)
    p = _cli("plot-lr", "--lr", "0.1", "--swa-lr", "0.001", "--swa-epoch-start", "2", "--anneal-epochs", "10",
             "--epochs", "20", "--json")
    assert p.returncode == 0, p.stderr
    data = json.loads(p.stdout)
    assert data["params"]["swa_epoch_start"] == 2 and data["params"]["epochs_counted_from"] == 1
    assert data["schedules"]["learning rate"] == pytest.approx(_swalr_reference(20, 1), rel=1e-12)
    # the old 0-based option still works, says what it means, and gives the same curve
    p = _cli("plot-lr", "--swa-start", "1", "--epochs", "20", "--json")
    assert p.returncode == 0 and "--swa-start 1 is --swa-epoch-start 2" in p.stderr
    assert json.loads(p.stdout)["schedules"] == data["schedules"]
    line = _error_line(_cli("plot-lr", "--swa-epoch-start", "21", "--epochs", "20"))
    assert "--swa-epoch-start=21 is invalid: expected an epoch in [1, 20]" in line


def test_plot_lr_help_shows_defaults() -> None:
    p = _cli("plot-lr", "--help")
    assert p.returncode == 0
    text = " ".join(p.stdout.split())
    for default in ("(default: 0.1)", "(default: 0.001)", "(default: 10)", "(default: cos)", "(default: 20)",
                    "(default: constant)", "(default: lr_schedule.png)", "(default: 2)"):
        assert default in text, default


# ----------------------------------------------------------------------------- 9. tied weights


def test_tied_weights_stay_tied_in_bin_and_pt_outputs(tmp_path: Path) -> None:
    dirs = []
    for i in range(2):
        emb = torch.randn(5, 3, generator=torch.Generator().manual_seed(i))
        sd = {"transformer.wte.weight": emb, "lm_head.weight": emb, "ln.weight": torch.ones(3)}  # GPT-2's tie
        d = tmp_path / f"ck{i}"
        d.mkdir()
        torch.save(sd, d / "pytorch_model.bin")
        (d / "config.json").write_text("{}")
        torch.save(sd, tmp_path / f"flat{i}.pt")
        dirs.append(d)
    p = _cli("average", *map(str, dirs), "-o", str(tmp_path / "avg"))
    assert p.returncode == 0, p.stderr
    p = _cli("average", str(tmp_path / "flat0.pt"), str(tmp_path / "flat1.pt"), "-o", str(tmp_path / "avg.pt"))
    assert p.returncode == 0, p.stderr
    for f in (tmp_path / "avg" / "pytorch_model.bin", tmp_path / "avg.pt"):
        out = torch.load(f, weights_only=True)
        ptr = out["transformer.wte.weight"].untyped_storage().data_ptr()
        assert out["lm_head.weight"].untyped_storage().data_ptr() == ptr
        ref = (torch.load(dirs[0] / "pytorch_model.bin")["lm_head.weight"]
               + torch.load(dirs[1] / "pytorch_model.bin")["lm_head.weight"]) / 2
        torch.testing.assert_close(out["lm_head.weight"], ref)
    size = (tmp_path / "avg.pt").stat().st_size
    assert size < (tmp_path / "flat0.pt").stat().st_size + 2048  # stored once, like the inputs


# ----------------------------------------------------------------------------- 10. messages


def test_key_suggestion_is_the_full_dotted_key(tmp_path: Path) -> None:
    for i in range(2):
        torch.save({"model": {"net": _state(i), "step": 3}, "epoch": 1}, tmp_path / f"c{i}.pt")
    line = _error_line(_cli("average", str(tmp_path / "c0.pt"), str(tmp_path / "c1.pt"), "--key", "model",
                            "-o", str(tmp_path / "o.pt")))
    assert "pass --key model.net" in line
    line = _error_line(_cli("average", str(tmp_path / "c0.pt"), str(tmp_path / "c1.pt"), "--key", "nope",
                            "-o", str(tmp_path / "o.pt")))
    assert "no entry 'nope'" in line and "--key model.net" in line


def test_text_file_named_pt_is_not_a_torch_file(tmp_path: Path) -> None:
    (tmp_path / "notes.pt").write_text("hello, these are my notes\n")
    torch.save(_state(0), tmp_path / "a.pt")
    line = _error_line(_cli("average", str(tmp_path / "a.pt"), str(tmp_path / "notes.pt"),
                            "-o", str(tmp_path / "o.pt")))
    assert f"{tmp_path / 'notes.pt'}: not a torch file" in line


def test_nan_refusal_suggests_what_the_cli_offers(tmp_path: Path) -> None:
    a, b = _state(0), _state(1)
    b["fc.bias"][1] = float("inf")
    torch.save(a, tmp_path / "a.pt")
    torch.save(b, tmp_path / "b.pt")
    line = _error_line(_cli("average", str(tmp_path / "a.pt"), str(tmp_path / "b.pt"), "-o", str(tmp_path / "o.pt")))
    assert "b.pt: holds NaN or Inf in 1 tensor(s): fc.bias" in line
    assert "nonfinite" not in line and "--last" in line


def test_directory_with_two_safetensors_and_no_index(tmp_path: Path) -> None:
    st = pytest.importorskip("safetensors.torch")
    d = tmp_path / "ck"
    d.mkdir()
    st.save_file({"a": torch.ones(2)}, str(d / "part-a.safetensors"))
    st.save_file({"b": torch.ones(2)}, str(d / "part-b.safetensors"))
    line = _error_line(_cli("average", str(d), "-o", str(tmp_path / "o")))
    assert "holds 2 *.safetensors files (part-a.safetensors, part-b.safetensors)" in line
    assert "no *.safetensors.index.json" in line


def test_integer_only_inputs_are_an_error_not_a_silent_no_op(tmp_path: Path) -> None:
    for i in range(2):
        torch.save({"steps": torch.tensor(i), "ids": torch.arange(4)}, tmp_path / f"c{i}.pt")
    line = _error_line(_cli("average", str(tmp_path / "c0.pt"), str(tmp_path / "c1.pt"), "-o", str(tmp_path / "o.pt")))
    assert "nothing to average" in line and "int64" in line
    assert not (tmp_path / "o.pt").exists()


def test_output_errors_name_the_users_path(tmp_path: Path) -> None:
    torch.save(_state(0), tmp_path / "a.pt")
    (tmp_path / "file").write_text("x")
    out = tmp_path / "file" / "avg.pt"  # its parent is a file
    line = _error_line(_cli("average", str(tmp_path / "a.pt"), "-o", str(out)))
    assert f"cannot write {out}" in line and ".tmp" not in line


def test_json_into_a_closed_pipe_is_quiet(tmp_path: Path) -> None:
    for i in range(2):
        torch.save(_state(i), tmp_path / f"c{i}.pt")
    cmd = (f"{sys.executable} -m weightavg average {tmp_path / 'c0.pt'} {tmp_path / 'c1.pt'} "
           f"-o {tmp_path / 'o.pt'} --json | true")  # `true` exits without reading
    p = subprocess.run(["sh", "-c", cmd], capture_output=True, text=True, timeout=300, check=False)
    assert "Broken pipe" not in p.stderr and "BrokenPipeError" not in p.stderr and "Traceback" not in p.stderr
    assert (tmp_path / "o.pt").exists()


# ----------------------------------------------------------------------------- 11. Lightning .ckpt, numpy


def test_averaged_lightning_checkpoint_is_weights_only_and_loads(tmp_path: Path) -> None:
    pl = pytest.importorskip("lightning.pytorch")
    import lightning

    class Net(pl.LightningModule):
        def __init__(self, width: int = 3) -> None:
            super().__init__()
            self.save_hyperparameters()
            self.fc = torch.nn.Linear(width, 4)

    states = []
    for i in range(2):
        torch.manual_seed(i)
        m = Net()
        states.append({f"fc.{k}": v for k, v in m.fc.state_dict().items()})
        torch.save({"epoch": 4, "global_step": 40, "pytorch-lightning_version": lightning.__version__,
                    "state_dict": m.state_dict(), "loops": {"fit_loop": {"epoch_progress": {"current": 4}}},
                    "callbacks": {"ModelCheckpoint": {"best": 0.5}},
                    "optimizer_states": [{"state": {}, "param_groups": []}],
                    "lr_schedulers": [{"last_epoch": 4}], "MixedPrecision": {"scale": 1024.0},
                    "hparams_name": "kwargs", "hyper_parameters": {"width": 3}}, tmp_path / f"e{i}.ckpt")
    p = _cli("average", str(tmp_path / "e0.ckpt"), str(tmp_path / "e1.ckpt"), "--key", "state_dict",
             "-o", str(tmp_path / "avg.ckpt"))
    assert p.returncode == 0, p.stderr
    ck = torch.load(tmp_path / "avg.ckpt", weights_only=True)
    assert sorted(ck) == ["hparams_name", "hyper_parameters", "pytorch-lightning_version", "state_dict", "weightavg"]
    assert ck["weightavg"]["weights_only"] is True
    for gone in ("loops", "epoch", "lr_schedulers", "optimizer_states", "callbacks", "MixedPrecision"):
        assert gone in p.stderr
    model = Net.load_from_checkpoint(tmp_path / "avg.ckpt", weights_only=True)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, (states[0][k] + states[1][k]) / 2)


def test_no_numpy_warning_on_a_torch_only_install(tmp_path: Path) -> None:
    # a torch-only install has no numpy: torch then warns "Failed to initialize NumPy" when it imports
    (tmp_path / "sitecustomize.py").write_text(
        "import sys\n"
        "class _NoNumpy:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'numpy' or name.startswith('numpy.'):\n"
        "            raise ModuleNotFoundError(\"No module named 'numpy'\")\n"
        "sys.meta_path.insert(0, _NoNumpy())\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    probe = subprocess.run([sys.executable, "-c", "import torch"], capture_output=True, text=True, env=env,
                           check=False, timeout=300)
    if "NumPy" not in probe.stderr:
        pytest.skip("this torch does not warn without numpy")
    p = _cli("plot-lr", "--json", env=env)
    assert p.returncode == 0, p.stderr
    assert "NumPy" not in p.stderr and p.stderr == "", p.stderr
