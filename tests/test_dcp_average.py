"""``weightavg average`` over DCP checkpoint directories: streamed, safe, atomic (single process).

The multi-rank case (checkpoints written by 2 gloo ranks of an FSDP2 model) is in
tests/distributed/test_dcp_average_sharded.py.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import warnings
import weakref
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file

import weightavg
from weightavg import _dcp
from weightavg._errors import MismatchError
from weightavg._files import OutputError
from weightavg.cli._average import CheckpointError, average_checkpoints


def _save(path: Path, state: dict) -> Path:
    with warnings.catch_warnings():  # "no process group": the single-process save is intended
        warnings.simplefilter("ignore")
        dcp.save(state, checkpoint_id=path)
    return path


def _model_state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "net.0.weight": torch.randn(5, 3, generator=g),
        "net.0.bias": torch.randn(5, generator=g),
        "net.1.weight": torch.randn(4, 5, generator=g).to(torch.bfloat16),
        "bn.num_batches_tracked": torch.tensor(seed),
    }


def _averager_ckpts(tmp_path: Path, n: int = 3) -> tuple[list[Path], list[dict[str, torch.Tensor]]]:
    """n DCP checkpoints of an Averager's state (``{"avg": state_dict}``) and their averages."""
    paths, avgs = [], []
    for i in range(n):
        model = torch.nn.Linear(3, 4)
        torch.manual_seed(i)
        a = weightavg.Averager(model, rule=weightavg.ema(0.5))
        a.update(model)
        with torch.no_grad():
            model.weight.add_(1.0)
        a.update(model)
        avgs.append({k: v.clone() for k, v in a.export_state_dict().items()})
        paths.append(_save(tmp_path / f"avg{i}", {"avg": a.state_dict(), "step": i}))
    return paths, avgs


def test_dcp_of_averager_states_average_to_the_mean_of_their_averages(tmp_path) -> None:
    paths, avgs = _averager_ckpts(tmp_path)
    out = tmp_path / "out.safetensors"
    report = average_checkpoints(paths, out, warn=False)
    got = load_file(out)
    assert set(got) == set(avgs[0]) and report["num_averaged_tensors"] == 2
    for k in got:
        ref = torch.stack([a[k] for a in avgs]).double().mean(0).float()
        torch.testing.assert_close(got[k], ref, rtol=0, atol=1e-6)


def test_model_state_dcp_mixed_with_safetensors_and_ema(tmp_path) -> None:
    states = [_model_state(s) for s in range(3)]
    a = _save(tmp_path / "a", {"model": states[0], "optim": {"lr": 0.1}})
    b = tmp_path / "b.safetensors"
    save_file(states[1], str(b))
    c = _save(tmp_path / "c", {"model": states[2]})
    out = tmp_path / "hf"
    report = average_checkpoints([a, b, c], out, ema_decay=0.25, key="model", warn=False)
    assert report["format"] == "hf (safetensors)"
    got = load_file(out / "model.safetensors")
    for k, v in states[0].items():
        if not v.is_floating_point():
            assert torch.equal(got[k], states[2][k])  # copied from the last input
            continue
        ref = states[0][k].double()
        for s in states[1:]:
            ref = 0.25 * ref + 0.75 * s[k].double()
        assert got[k].dtype == v.dtype
        torch.testing.assert_close(got[k].double(), ref.to(v.dtype).double(), rtol=1e-2 if v.dtype ==
                                   torch.bfloat16 else 1e-6, atol=1e-6)


def test_tensors_are_read_one_at_a_time_and_dropped(tmp_path, monkeypatch) -> None:
    """Streaming: each input tensor is read once, and no earlier one is alive when the next is read."""
    paths = [_save(tmp_path / f"m{i}", _model_state(i)) for i in range(4)]
    calls: list[str] = []
    alive: list[weakref.ref] = []
    most = [0]
    read = _dcp.DCPReader.read

    def counting(self, name):
        most[0] = max(most[0], sum(r() is not None for r in alive))
        calls.append(name)
        t = read(self, name)
        alive.append(weakref.ref(t))
        return t

    monkeypatch.setattr(_dcp.DCPReader, "read", counting)
    average_checkpoints(paths, tmp_path / "o.safetensors", warn=False)
    # 3 floating tensors from each of 4 inputs, the integer one from the last input only
    assert len(calls) == 3 * 4 + 1
    assert most[0] == 0  # never more than the tensor being read: memory ~ one tensor, not the model


def test_a_crafted_metadata_is_refused_by_the_cli_without_running_code(tmp_path) -> None:
    good = _save(tmp_path / "good", _model_state(0))
    bad = _save(tmp_path / "bad", _model_state(1))
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (bad / ".metadata").write_bytes(pickle.dumps(Evil()))
    out = tmp_path / "o.safetensors"
    r = subprocess.run([sys.executable, "-m", "weightavg", "average", str(good), str(bad), "-o", str(out)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "refusing to load" in r.stderr, r.stderr
    assert not marker.exists() and not out.exists()


def test_a_data_file_linked_out_of_the_checkpoint_is_refused(tmp_path) -> None:
    ck = _save(tmp_path / "ck", _model_state(0))
    outside = tmp_path / "secret.distcp"
    data = next(ck.glob("*.distcp"))
    outside.write_bytes(data.read_bytes())
    data.unlink()
    data.symlink_to(outside)
    with pytest.raises(CheckpointError, match="outside the checkpoint"):
        average_checkpoints([ck, ck], tmp_path / "o.safetensors", warn=False)
    assert not (tmp_path / "o.safetensors").exists()


def test_refusals_name_what_is_wrong(tmp_path) -> None:
    a = _save(tmp_path / "a", _model_state(0))
    b = _save(tmp_path / "b", {k: v for k, v in _model_state(1).items() if k != "net.0.bias"})
    with pytest.raises(MismatchError, match=r"net\.0\.bias"):
        average_checkpoints([a, b], tmp_path / "o.safetensors", warn=False)
    pt = tmp_path / "c.pt"
    torch.save(_model_state(2), pt)
    with pytest.raises(CheckpointError, match="torch file cannot be averaged together with DCP"):
        average_checkpoints([a, pt], tmp_path / "o.safetensors", warn=False)
    with pytest.raises(CheckpointError, match=r"name the output \*\.safetensors"):
        average_checkpoints([a, a], tmp_path / "o.pt", warn=False)
    with pytest.raises(CheckpointError, match="inside the input"):
        average_checkpoints([a, a], a / "o.safetensors", warn=False)
    with pytest.raises(CheckpointError, match="no tensor under --key 'model'"):
        average_checkpoints([a, a], tmp_path / "o.safetensors", key="model", warn=False)
    (tmp_path / "exists.safetensors").write_bytes(b"x")
    with pytest.raises(OutputError, match="exists"):
        average_checkpoints([a, a], tmp_path / "exists.safetensors", warn=False)
    nan = _model_state(3)
    nan["net.0.bias"][1] = float("nan")
    n = _save(tmp_path / "n", nan)
    with pytest.raises(CheckpointError, match=r"NaN or Inf in tensor 'net.0.bias'"):
        average_checkpoints([a, n], tmp_path / "o.safetensors", warn=False)
    assert not (tmp_path / "o.safetensors").exists()


def test_several_rules_need_key(tmp_path) -> None:
    model = torch.nn.Linear(2, 2)
    a = weightavg.Averager(model, rule={"ema": weightavg.ema(0.9), "swa": weightavg.mean()})
    a.update(model)
    ck = _save(tmp_path / "ck", {"swa_cb": a.state_dict()})
    with pytest.raises(CheckpointError, match=r"several rules .*--key swa_cb\.averages\.ema"):
        average_checkpoints([ck, ck], tmp_path / "o.safetensors", warn=False)
    average_checkpoints([ck, ck], tmp_path / "o.safetensors", key="swa_cb.averages.swa", warn=False)
    got = load_file(tmp_path / "o.safetensors")
    torch.testing.assert_close(got["weight"], model.weight.detach())


def test_float32_averages_and_a_bf16_checkpoint_average_in_float32_written_as_the_last(tmp_path) -> None:
    """A DCP of an averager holds float32 shadows of bf16 weights: floating dtypes may differ."""
    g = torch.Generator().manual_seed(5)
    a32 = {"w": torch.randn(3, 4, generator=g)}
    b16 = {"w": torch.randn(3, 4, generator=g).to(torch.bfloat16)}
    a = _save(tmp_path / "a", {"averages": {"default": a32}})
    b = tmp_path / "b.safetensors"
    save_file(b16, str(b))
    report = average_checkpoints([a, b], tmp_path / "o.safetensors", warn=False)
    got = load_file(tmp_path / "o.safetensors")["w"]
    assert got.dtype == torch.bfloat16 and report["accumulation_dtype"] == "float32"
    assert torch.equal(got, ((a32["w"] + b16["w"].float()) / 2).to(torch.bfloat16))
    i32 = _save(tmp_path / "i", {"w": torch.ones(3, 4, dtype=torch.int32)})
    with pytest.raises(MismatchError, match="other dtypes"):
        average_checkpoints([a, i32], tmp_path / "o2.safetensors", warn=False)
