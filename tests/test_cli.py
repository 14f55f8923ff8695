"""The `weightavg` command line: `average`, `plot-lr`, help texts and exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path

import pytest
import torch

from weightavg.cli import _average, main

PNG = b"\x89PNG\r\n\x1a\n"


def _state(seed: int, dtype: torch.dtype = torch.float32) -> OrderedDict[str, torch.Tensor]:
    """A small state dict: float weights, BatchNorm statistics and an integer counter."""
    g = torch.Generator().manual_seed(seed)
    return OrderedDict(
        [
            ("fc.weight", torch.randn(4, 3, generator=g).to(dtype)),
            ("fc.bias", torch.randn(4, generator=g).to(dtype)),
            ("bn.running_mean", torch.randn(4, generator=g).to(dtype)),
            ("bn.running_var", torch.rand(4, generator=g).to(dtype) + 0.5),
            ("bn.num_batches_tracked", torch.tensor(100 + seed)),
            ("head.weight", torch.randn(2, 4, generator=g).to(dtype)),
        ]
    )


def _mean(states: list[OrderedDict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Reference: float64 mean of floating tensors, integers from the last state."""
    out = {}
    for k, v in states[-1].items():
        out[k] = torch.stack([s[k].double() for s in states]).mean(0) if v.is_floating_point() else v
    return out


def _ema(states: list[OrderedDict[str, torch.Tensor]], decay: float) -> dict[str, torch.Tensor]:
    """Reference: a loop over the inputs in float64, the first one copied."""
    out = {k: v.double() if v.is_floating_point() else v for k, v in states[0].items()}
    for s in states[1:]:
        for k, v in s.items():
            out[k] = decay * out[k] + (1 - decay) * v.double() if v.is_floating_point() else v
    return out


def _check(result: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
    """Names in order, dtypes kept; floats within float32 accumulation error (1 ulp of a 16-bit dtype)."""
    assert list(result) == list(ref)  # same names, same order
    rtol = 1e-6 if dtype == torch.float32 else torch.finfo(dtype).eps
    for k, v in ref.items():
        if v.is_floating_point():
            assert result[k].dtype == dtype, k
            torch.testing.assert_close(result[k].double(), v.to(dtype).double(), rtol=rtol, atol=1e-7)
        else:
            assert result[k].dtype == v.dtype
            assert torch.equal(result[k], v), k


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    rc = main(argv)
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def _no_leftovers(folder: Path) -> None:
    assert not [p.name for p in folder.iterdir() if p.name.startswith(".")], "temporary files left"


# ----------------------------------------------------------------------------- average: torch


@pytest.fixture
def torch_ckpts(tmp_path: Path) -> tuple[list[Path], list[OrderedDict[str, torch.Tensor]]]:
    states = [_state(i) for i in range(4)]
    paths = []
    for i, s in enumerate(states):
        paths.append(tmp_path / f"epoch_{i}.pt")
        torch.save(s, paths[-1])
    return paths, states


def test_average_torch_uniform(torch_ckpts, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    paths, states = torch_ckpts
    out = tmp_path / "avg.pt"
    rc, stdout, stderr = _run(["average", *map(str, paths), "-o", str(out)], capsys)
    assert rc == 0, stderr
    assert "uniform average of 4 checkpoint(s)" in stdout
    result = torch.load(out, weights_only=True)
    _check(result, _mean(states), torch.float32)
    assert result["bn.num_batches_tracked"].item() == 103  # copied from the last input
    note = json.loads(result._metadata[""]["weightavg"])
    assert note["method"] == "mean"
    assert note["inputs"] == [str(p) for p in paths]
    assert note["copied_from_last_input"] == ["bn.num_batches_tracked"]
    # BatchNorm statistics: averaged, with a warning to recompute them
    assert "BatchNorm statistics" in stderr and "recompute" in stderr
    # the output loads into a model with strict=True
    model = torch.nn.Module()
    model.fc = torch.nn.Linear(3, 4)
    model.bn = torch.nn.BatchNorm1d(4, affine=False)
    model.head = torch.nn.Linear(4, 2, bias=False)
    model.load_state_dict(result)
    _no_leftovers(tmp_path)


def test_average_torch_last_k_and_ema(torch_ckpts, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    paths, states = torch_ckpts
    out = tmp_path / "lawa.pt"
    rc, _, err = _run(["average", *map(str, paths), "--last", "2", "-o", str(out)], capsys)
    assert rc == 0, err
    _check(torch.load(out, weights_only=True), _mean(states[-2:]), torch.float32)
    out = tmp_path / "ema.pt"
    rc, _, err = _run(["average", *map(str, paths), "--ema", "0.75", "-o", str(out)], capsys)
    assert rc == 0, err
    result = torch.load(out, weights_only=True)
    ref = _ema(states, 0.75)
    for k, v in ref.items():
        torch.testing.assert_close(result[k].double(), v.double(), rtol=1e-6, atol=1e-6)
    assert json.loads(result._metadata[""]["weightavg"])["ema_decay"] == 0.75


def test_average_bfloat16_accumulates_in_float32(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    # 1.0 then 63 x 1.0625: late increments (1.0625 - avg)/(n + 1) fall below half of bf16's
    # spacing (2^-7 near 1), so a bf16 accumulator stalls near 1.05; float32 reaches the exact
    # mean 1.0615..., which rounds to 1.0625 once, at the end
    values = [1.0] + [1.0625] * 63
    paths = []
    for i, v in enumerate(values):
        paths.append(tmp_path / f"c{i:02d}.pt")
        torch.save(OrderedDict([("w", torch.full((8,), v, dtype=torch.bfloat16))]), paths[-1])
    out = tmp_path / "avg.pt"
    rc, _, err = _run(["average", *map(str, paths), "-o", str(out)], capsys)
    assert rc == 0, err
    result = torch.load(out, weights_only=True)["w"]
    assert result.dtype == torch.bfloat16
    exact = torch.tensor(sum(values) / len(values), dtype=torch.float64)
    assert torch.equal(result, torch.full((8,), float(exact.to(torch.bfloat16)), dtype=torch.bfloat16))
    assert float(result[0]) == 1.0625


def test_average_nested_lightning_checkpoint(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    states = [_state(i) for i in range(3)]
    paths = []
    for i, s in enumerate(states):
        paths.append(tmp_path / f"e{i}.ckpt")
        torch.save({"epoch": i, "state_dict": s, "hyper_parameters": {"lr": 0.1},
                    "optimizer_states": [{"state": {0: {"momentum_buffer": torch.ones(3)}}}]}, paths[-1])
    out = tmp_path / "avg.ckpt"
    rc, _, err = _run(["average", *map(str, paths), "-o", str(out)], capsys)
    assert rc == 1
    assert "pass --key state_dict" in err
    assert not out.exists()
    rc, _, err = _run(["average", *map(str, paths), "--key", "state_dict", "-o", str(out)], capsys)
    assert rc == 0, err
    result = torch.load(out, weights_only=True)
    _check(result["state_dict"], _mean(states), torch.float32)
    # the model's description is kept; one input's training state is not: the output is weights-only
    assert result["hyper_parameters"] == {"lr": 0.1}
    assert "optimizer_states" not in result and "epoch" not in result
    assert "optimizer_states" in err and "epoch" in err
    assert result["weightavg"]["method"] == "mean" and result["weightavg"]["weights_only"] is True
    rc, _, err = _run(["average", *map(str, paths), "--key", "model", "-o", str(out), "-f"], capsys)
    assert rc == 1 and "no entry 'model'" in err


def test_average_streams_one_input_at_a_time(torch_ckpts, tmp_path: Path, monkeypatch, capsys) -> None:  # type: ignore[no-untyped-def]
    import gc
    import weakref

    paths, states = torch_ckpts
    real = _average._load
    alive: list[weakref.ref] = []
    peak = []

    class Loaded(dict):
        pass

    def tracking_load(inp, key):  # type: ignore[no-untyped-def]
        gc.collect()
        peak.append(sum(r() is not None for r in alive))  # earlier inputs still referenced
        out = Loaded(real(inp, key))
        alive.append(weakref.ref(out))
        return out

    monkeypatch.setattr(_average, "_load", tracking_load)
    rc, _, err = _run(["average", *map(str, paths), "-o", str(tmp_path / "avg.pt")], capsys)
    assert rc == 0, err
    assert len(peak) >= len(paths)  # every input was loaded
    assert max(peak) == 0  # no earlier input is kept while the next one is read
    _check(torch.load(tmp_path / "avg.pt", weights_only=True), _mean(states), torch.float32)


def test_average_keeps_wrapper_prefixed_names(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    states = [OrderedDict((f"module._orig_mod.{k}", v) for k, v in _state(i).items()) for i in range(2)]
    for i, s in enumerate(states):
        torch.save(s, tmp_path / f"ddp{i}.pt")
    out = tmp_path / "avg.pt"
    rc, _, err = _run(["average", str(tmp_path / "ddp0.pt"), str(tmp_path / "ddp1.pt"), "-o", str(out)], capsys)
    assert rc == 0, err
    _check(torch.load(out, weights_only=True), _mean(states), torch.float32)


# ----------------------------------------------------------------------------- average: safetensors


def test_average_safetensors(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    st = pytest.importorskip("safetensors.torch")
    from safetensors import safe_open

    states = [_state(i, torch.float16) for i in range(3)]
    paths = []
    for i, s in enumerate(states):
        paths.append(tmp_path / f"s{i}.safetensors")
        st.save_file(dict(s), str(paths[-1]), metadata={"format": "pt"})
    out = tmp_path / "avg.safetensors"
    rc, _, err = _run(["average", *map(str, paths), "-o", str(out), "--json"], capsys)
    assert rc == 0, err
    result = st.load_file(str(out))
    _check(OrderedDict((k, result[k]) for k in states[0]), _mean(states), torch.float16)
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert meta["format"] == "pt"  # the input's metadata is kept
    assert json.loads(meta["weightavg"])["num_inputs"] == 3


# ----------------------------------------------------------------------------- average: HF directories


def _hf_dir(path: Path, state: OrderedDict[str, torch.Tensor], *, sharded: bool, fmt: str) -> None:
    st = pytest.importorskip("safetensors.torch")
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"model_type": "toy", "hidden": 4}))
    (path / "optimizer.pt").write_bytes(b"not copied")
    ext = "safetensors" if fmt == "safetensors" else "bin"
    stem = "model" if fmt == "safetensors" else "pytorch_model"
    names = list(state)
    shards = {f"{stem}-00001-of-00002.{ext}": names[:3], f"{stem}-00002-of-00002.{ext}": names[3:]} \
        if sharded else {f"{stem}.{ext}": names}
    for fname, keys in shards.items():
        part = {k: state[k] for k in keys}
        if fmt == "safetensors":
            st.save_file(part, str(path / fname), metadata={"format": "pt"})
        else:
            torch.save(part, path / fname)
    if sharded:
        index = {"metadata": {"total_size": 0}, "weight_map": {k: f for f, ks in shards.items() for k in ks}}
        (path / f"{stem}.{ext}.index.json").write_text(json.dumps(index))


@pytest.mark.parametrize(
    ("sharded", "fmt"),
    [pytest.param(False, "safetensors", id="single-safetensors"),
     pytest.param(True, "safetensors", id="sharded-safetensors"),
     pytest.param(False, "bin", id="single-bin"),
     pytest.param(True, "bin", id="sharded-bin")],
)
def test_average_hf_directories(sharded: bool, fmt: str, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    states = [_state(i) for i in range(3)]
    dirs = []
    for i, s in enumerate(states):
        dirs.append(tmp_path / f"checkpoint-{i}")
        _hf_dir(dirs[-1], s, sharded=sharded, fmt=fmt)
    out = tmp_path / "averaged"
    rc, _, err = _run(["average", *map(str, dirs), "-o", str(out)], capsys)
    assert rc == 0, err
    assert sorted(p.name for p in out.iterdir()) == sorted(
        p.name for p in dirs[-1].iterdir() if p.name != "optimizer.pt")
    assert json.loads((out / "config.json").read_text())["model_type"] == "toy"
    result = _average.load_checkpoint(out)
    _check(OrderedDict((k, result[k]) for k in states[0]), _mean(states), torch.float32)
    if sharded:
        index = json.loads(next(out.glob("*.index.json")).read_text())
        assert index["metadata"]["weightavg"]["num_inputs"] == 3
    _no_leftovers(tmp_path)


def test_average_real_transformers_directories(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=20, vocab_size=50, max_position_embeddings=16)
    models = []
    for i in range(2):
        torch.manual_seed(i)
        models.append(transformers.BertModel(cfg))
        models[-1].save_pretrained(tmp_path / f"m{i}", max_shard_size="20KB")
    out = tmp_path / "avg"
    rc, _, err = _run(["average", str(tmp_path / "m0"), str(tmp_path / "m1"), "-o", str(out)], capsys)
    assert rc == 0, err
    avg = transformers.BertModel.from_pretrained(out)
    for k, v in avg.state_dict().items():
        ref = (models[0].state_dict()[k].double() + models[1].state_dict()[k].double()) / 2
        torch.testing.assert_close(v.double(), ref, rtol=1e-6, atol=1e-8)


# ----------------------------------------------------------------------------- average: bad inputs


def test_average_mismatched_names_lists_the_differences(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    a, b, c = _state(0), _state(1), _state(2)
    b["extra.weight"] = torch.zeros(2)
    del b["head.weight"]
    c["fc.weight"] = torch.zeros(5, 3)
    c["fc.bias"] = c["fc.bias"].double()
    for name, s in (("a", a), ("b", b), ("c", c)):
        torch.save(s, tmp_path / f"{name}.pt")
    out = tmp_path / "avg.pt"
    rc, _, err = _run(["average", *(str(tmp_path / f"{n}.pt") for n in "abc"), "-o", str(out)], capsys)
    assert rc == 1
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "1 missing: head.weight" in err and "1 unexpected: extra.weight" in err
    assert "fc.weight (4, 3) vs (5, 3)" in err
    assert "fc.bias float32 vs float64" in err
    assert not out.exists()
    _no_leftovers(tmp_path)


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_average_truncated_file(fmt: str, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    paths = []
    for i in range(2):
        paths.append(tmp_path / f"c{i}.{fmt}")
        if fmt == "pt":
            torch.save(_state(i), paths[-1])
        else:
            st = pytest.importorskip("safetensors.torch")
            st.save_file(dict(_state(i)), str(paths[-1]))
    data = paths[1].read_bytes()
    paths[1].write_bytes(data[: len(data) // 2])
    out = tmp_path / f"avg.{fmt}"
    rc, _, err = _run(["average", *map(str, paths), "-o", str(out)], capsys)
    assert rc == 1
    assert f"{paths[1]}: cannot read" in err and "truncated or corrupt" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not out.exists()


class _Payload:
    """A pickle that runs code when unpickled (touches a marker file)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (Path.touch, (self.marker,))


def test_average_refuses_pickles_that_are_not_weights_only(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    marker = tmp_path / "code-ran"
    torch.save(_state(0), tmp_path / "good.pt")
    torch.save({"fc.weight": torch.zeros(4, 3), "evil": _Payload(marker)}, tmp_path / "evil.pt")
    assert not marker.exists()
    out = tmp_path / "avg.pt"
    rc, _, err = _run(["average", str(tmp_path / "good.pt"), str(tmp_path / "evil.pt"), "-o", str(out)], capsys)
    assert rc == 1
    assert "refused" in err and "weights_only=True" in err
    assert not marker.exists()  # the payload never ran
    assert not out.exists()


def test_average_refuses_nonfinite_input(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    a, b = _state(0), _state(1)
    b["fc.bias"][0] = float("nan")
    torch.save(a, tmp_path / "a.pt")
    torch.save(b, tmp_path / "b.pt")
    rc, _, err = _run(["average", str(tmp_path / "a.pt"), str(tmp_path / "b.pt"), "-o", str(tmp_path / "o.pt")],
                      capsys)
    assert rc == 1 and "b.pt: holds NaN or Inf" in err and "fc.bias" in err


@pytest.mark.parametrize(
    ("argv", "message", "code"),
    [
        (["--last", "5"], "--last=5 is invalid", 1),
        (["--ema", "1.0"], "--ema=1.0 is invalid", 1),
        (["--last", "0"], "--last must be a positive integer", 2),
        (["--last", "2", "--ema", "0.9"], "not allowed with argument", 2),
    ],
)
def test_average_bad_options(argv: list[str], message: str, code: int, torch_ckpts, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    paths, _ = torch_ckpts
    rc, _, err = _run(["average", *map(str, paths), "-o", str(tmp_path / "o.pt"), *argv], capsys)
    assert rc == code
    assert message in err


def test_average_missing_input_and_existing_output(torch_ckpts, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    paths, states = torch_ckpts
    rc, _, err = _run(["average", str(paths[0]), str(tmp_path / "nope.pt"), "-o", str(tmp_path / "o.pt")], capsys)
    assert rc == 1 and "nope.pt: no such file or directory" in err
    out = tmp_path / "o.pt"
    out.write_bytes(b"keep me")
    rc, _, err = _run(["average", *map(str, paths), "-o", str(out)], capsys)
    assert rc == 1 and "pass --force" in err
    assert out.read_bytes() == b"keep me"
    rc, _, err = _run(["average", *map(str, paths), "-o", str(out), "--force"], capsys)
    assert rc == 0, err
    _check(torch.load(out, weights_only=True), _mean(states), torch.float32)


# ----------------------------------------------------------------------------- average: interrupted writes


@pytest.mark.parametrize("exc", [KeyboardInterrupt, OSError])
def test_interrupted_torch_write_leaves_nothing(exc: type[BaseException], torch_ckpts, tmp_path: Path,
                                              monkeypatch, capsys) -> None:  # type: ignore[no-untyped-def]
    paths, _ = torch_ckpts
    out = tmp_path / "avg.pt"

    def half_then_fail(obj, path):  # type: ignore[no-untyped-def]
        Path(path).write_bytes(b"PK\x03\x04 partial")
        raise exc("disk full" if exc is OSError else None)

    monkeypatch.setattr(_average, "_save_torch", half_then_fail)
    rc, _, err = _run(["average", *map(str, paths), "-o", str(out)], capsys)
    assert rc == (130 if exc is KeyboardInterrupt else 1)
    assert ("interrupted" if exc is KeyboardInterrupt else "disk full") in err
    assert not out.exists()
    _no_leftovers(tmp_path)
    # an existing output survives an interrupted --force
    out.write_bytes(b"previous")
    rc, _, _ = _run(["average", *map(str, paths), "-o", str(out), "--force"], capsys)
    assert out.read_bytes() == b"previous"
    _no_leftovers(tmp_path)


def test_interrupted_hf_write_leaves_nothing(tmp_path: Path, monkeypatch, capsys) -> None:  # type: ignore[no-untyped-def]
    dirs = []
    for i in range(2):
        dirs.append(tmp_path / f"ck{i}")
        _hf_dir(dirs[-1], _state(i), sharded=True, fmt="safetensors")
    real = _average._save_safetensors
    calls = []

    def second_shard_fails(tensors, path, metadata):  # type: ignore[no-untyped-def]
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real(tensors, path, metadata)

    monkeypatch.setattr(_average, "_save_safetensors", second_shard_fails)
    out = tmp_path / "avg"
    rc, _, _ = _run(["average", *map(str, dirs), "-o", str(out)], capsys)
    assert rc == 130
    assert len(calls) == 2
    assert not out.exists()
    _no_leftovers(tmp_path)


# ----------------------------------------------------------------------------- plot-lr


def test_plot_lr_json_matches_swalr(capsys) -> None:  # type: ignore[no-untyped-def]
    from torch.optim.swa_utils import SWALR

    rc, out, err = _run(["plot-lr", "--lr", "0.1", "--swa-lr", "0.001", "--swa-start", "2",
                         "--anneal-epochs", "10", "--epochs", "20", "--json"], capsys)
    assert rc == 0, err
    lrs = json.loads(out)["schedules"]["learning rate"]
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    ref = []
    swa = None
    for e in range(20):
        if e == 2:
            swa = SWALR(opt, swa_lr=0.001, anneal_epochs=10, anneal_strategy="cos")
        ref.append(opt.param_groups[0]["lr"])
        opt.step()
        if swa is not None:
            swa.step()
    assert lrs == pytest.approx(ref, rel=1e-12)


def test_plot_lr_cyclic_json(capsys) -> None:  # type: ignore[no-untyped-def]
    rc, out, err = _run(["plot-lr", "--lr", "0.05", "--swa-lr", "0.005", "--swa-start", "10",
                         "--cycle", "4", "--strategy", "linear", "--epochs", "30", "--json"], capsys)
    assert rc == 0, err
    lrs = json.loads(out)["schedules"]["learning rate"]
    assert lrs[:10] == [0.05] * 10
    # Izmailov et al.'s cyclic schedule: linear from the top down to swa_lr at each cycle's end
    ref = [0.05 + (0.005 - 0.05) * ((i % 4) + 1) / 4 for i in range(20)]
    assert lrs[10:] == pytest.approx(ref, rel=1e-12)
    assert lrs[13] == pytest.approx(0.005) and lrs[17] == pytest.approx(0.005)


def test_plot_lr_png(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    pytest.importorskip("matplotlib")
    out = tmp_path / "lr.png"
    rc, stdout, err = _run(["plot-lr", "--strategy", "linear", "-o", str(out)], capsys)
    assert rc == 0, err
    assert out.read_bytes()[:8] == PNG
    assert str(out) in stdout
    out2 = tmp_path / "demo.png"
    assert main(["plot-lr", "--demo", "-o", str(out2)]) == 0
    assert out2.read_bytes()[:8] == PNG
    _no_leftovers(tmp_path)


def test_plot_lr_errors(tmp_path: Path, monkeypatch, capsys) -> None:  # type: ignore[no-untyped-def]
    rc, _, err = _run(["plot-lr", "--swa-start", "30", "--epochs", "20"], capsys)
    assert rc == 1 and "--swa-start=30 is invalid" in err
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "matplotlib" else real(name, *a))
    rc, _, err = _run(["plot-lr", "-o", str(tmp_path / "x.png")], capsys)
    assert rc == 1 and "pip install 'weightavg[plot]'" in err
    rc, out, _ = _run(["plot-lr", "--json"], capsys)  # the numbers need no matplotlib
    assert rc == 0 and len(json.loads(out)["schedules"]["learning rate"]) == 20


# ----------------------------------------------------------------------------- CLI quality


@pytest.mark.parametrize("command", ["demo", "average", "plot-lr"])
def test_help_has_examples(command: str, capsys) -> None:  # type: ignore[no-untyped-def]
    rc, out, _ = _run([command, "--help"], capsys)
    assert rc == 0
    assert "examples:" in out
    assert f"weightavg {command}" in out


def test_top_level_help_version_and_usage_errors(capsys) -> None:  # type: ignore[no-untyped-def]
    rc, out, _ = _run(["--help"], capsys)
    assert rc == 0 and all(c in out for c in ("demo", "average", "plot-lr"))
    rc, out, _ = _run(["--version"], capsys)
    assert rc == 0 and out.startswith("weightavg ")
    rc, _, err = _run([], capsys)
    assert rc == 2 and "usage" in err
    rc, _, err = _run(["frobnicate"], capsys)
    assert rc == 2 and "invalid choice" in err
    rc, _, err = _run(["demo", "--seeds", "zero"], capsys)
    assert rc == 2 and "--seeds must be a positive integer" in err


def test_python_dash_m_and_console_script(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    p = subprocess.run([sys.executable, "-m", "weightavg", "average", str(tmp_path / "missing.pt"),
                        "-o", str(tmp_path / "o.pt")], capture_output=True, text=True, env=env, check=False)
    assert p.returncode == 1
    assert p.stderr.strip() == f"weightavg average: error: {tmp_path / 'missing.pt'}: no such file or directory"
    script = Path(sys.executable).with_name("weightavg")
    if script.exists():
        p = subprocess.run([str(script), "--version"], capture_output=True, text=True, check=False)
        assert p.returncode == 0 and p.stdout.startswith("weightavg ")


def test_average_checkpoints_library_call_warns(torch_ckpts, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    paths, states = torch_ckpts
    with pytest.warns(UserWarning, match="BatchNorm statistics"):
        report = _average.average_checkpoints(paths, tmp_path / "lib.pt")
    assert report["num_averaged_tensors"] == 5 and report["copied_tensors"] == ["bn.num_batches_tracked"]
    _check(torch.load(tmp_path / "lib.pt", weights_only=True), _mean(states), torch.float32)
