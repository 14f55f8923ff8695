"""Attacks on the files weightavg reads and writes (issue #15): one test per attack, built here.

Every crafted input is made in the test (no network). The command is run in-process through
``main`` where only its result matters, and as a real process (``python -m weightavg``) where
signals, exit statuses or the interpreter's own output are part of the behaviour.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections import OrderedDict
from pathlib import Path

import pytest
import torch

from weightavg.cli import _average, main

st = pytest.importorskip("safetensors.torch")

ROOT = Path(__file__).resolve().parents[1]


def _state(seed: int) -> OrderedDict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return OrderedDict([("fc.weight", torch.randn(4, 3, generator=g)), ("fc.bias", torch.randn(4, generator=g)),
                        ("head.weight", torch.randn(2, 4, generator=g))])


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    rc = main(argv)
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def _one_line_error(err: str) -> None:
    assert "Traceback" not in err, err
    lines = [ln for ln in err.strip().splitlines() if "warning:" not in ln]
    assert len(lines) == 1, err


def _hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def _hf_sharded(path: Path, seed: int, *, extra: dict[str, bytes] | None = None) -> None:
    """A sharded safetensors Hugging Face directory (two shards and their index)."""
    path.mkdir(parents=True)
    s = _state(seed)
    shards = {"model-00001-of-00002.safetensors": ["fc.weight", "fc.bias"],
              "model-00002-of-00002.safetensors": ["head.weight"]}
    for fname, keys in shards.items():
        st.save_file({k: s[k] for k in keys}, str(path / fname), metadata={"format": "pt"})
    (path / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: f for f, ks in shards.items() for k in ks}}))
    (path / "config.json").write_text(json.dumps({"model_type": "toy"}))
    for name, data in (extra or {}).items():
        (path / name).write_bytes(data)


def _set_index(path: Path, weight_map: object) -> None:
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


# ----------------------------------------------------------------------------- 1. path traversal


def test_index_cannot_name_a_file_outside_its_directory(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    # the README's layout: inputs and output side by side; ck1's index points into ck0
    a, b = tmp_path / "ck0", tmp_path / "ck1"
    _hf_sharded(a, 0)
    _hf_sharded(b, 1)
    wm = json.loads((b / "model.safetensors.index.json").read_text())["weight_map"]
    wm["head.weight"] = "../ck0/model-00002-of-00002.safetensors"
    _set_index(b, wm)
    victim = a / "model-00002-of-00002.safetensors"
    before = victim.read_bytes()
    for name in ("../ck0/model-00002-of-00002.safetensors", str(victim)):
        wm["head.weight"] = name
        _set_index(b, wm)
        rc, _, err = _run(["average", str(a), str(b), "-o", str(tmp_path / "ema"), "--force"], capsys)
        assert rc == 1, err
        assert "refused: only plain file names" in err and "model.safetensors.index.json" in err
        _one_line_error(err)
        assert victim.read_bytes() == before  # never read as an input, never rewritten
        assert not (tmp_path / "ema").exists()


@pytest.mark.parametrize("special", ["dev-zero", "fifo"])
def test_index_naming_a_device_or_fifo_is_refused_at_once(special: str, tmp_path: Path) -> None:
    a, b = tmp_path / "ck0", tmp_path / "ck1"
    _hf_sharded(a, 0)
    _hf_sharded(b, 1)
    for d in (a, b):
        shard = d / "model-00002-of-00002.safetensors"
        shard.unlink()
        if special == "fifo":
            os.mkfifo(shard)  # a plain name, but no regular file: reading it would block forever
        else:
            shard.symlink_to("/dev/zero")  # reading it would grow memory without bound
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "weightavg", "average", str(a), str(b), "-o", str(tmp_path / "o")],
                       capture_output=True, text=True, timeout=120, check=False)
    assert time.perf_counter() - t0 < 60
    assert p.returncode == 1, p.stderr
    assert "refused" in p.stderr and "model-00002-of-00002.safetensors" in p.stderr
    _one_line_error(p.stderr)


def test_a_named_input_that_is_a_device_is_refused(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    torch.save(_state(0), tmp_path / "a.pt")
    rc, _, err = _run(["average", str(tmp_path / "a.pt"), "/dev/zero", "-o", str(tmp_path / "o.pt")], capsys)
    assert rc == 1 and "/dev/zero: refused: it is a character device" in err


# ----------------------------------------------------------------------------- 2. symbolic links


def test_symlinks_out_of_an_input_are_never_copied_or_read(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    secret = tmp_path / "home" / "token"
    secret.parent.mkdir()
    secret.write_text("hf_SECRET_TOKEN")
    dirs = [tmp_path / "ck0", tmp_path / "ck1"]
    for i, d in enumerate(dirs):
        _hf_sharded(d, i)
        (d / "tokenizer.json").symlink_to(secret)  # a copied file name, pointing at a secret
    out = tmp_path / "avg"
    rc, stdout, err = _run(["average", *map(str, dirs), "-o", str(out)], capsys)
    assert rc == 0, err
    assert not (out / "tokenizer.json").exists()
    assert all("hf_SECRET" not in p.read_bytes().decode("latin-1") for p in out.iterdir())
    assert "tokenizer.json" in stdout.split("left out:")[1]  # reported as not copied
    # weights behind a link out of the directory are refused, not read
    outside = tmp_path / "elsewhere.safetensors"
    st.save_file({"head.weight": torch.zeros(2, 4)}, str(outside))
    shard = dirs[1] / "model-00002-of-00002.safetensors"
    shard.unlink()
    shard.symlink_to(outside)
    rc, _, err = _run(["average", *map(str, dirs), "-o", str(tmp_path / "avg2")], capsys)
    assert rc == 1 and "a symbolic link out of the input directory" in err
    _one_line_error(err)


# ----------------------------------------------------------------------------- 3. what the output inherits


def test_hf_output_copies_only_the_allowlist(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    junk = {
        "pytorch_model.bin": b"un-averaged weights", "model-00003-of-00003.safetensors": b"stale shard",
        "weightavg_state.pt": b"training state", "optimizer.pt": b"x", "scheduler.pt": b"x",
        "rng_state_0.pth": b"x", "trainer_state.json": b"{}", "training_args.bin": b"x",
        ".env": b"HF_TOKEN=hf_SECRET", "modeling_toy.py": b"import os", "notes.txt": b"private",
        "tokenizer.json": b"{}", "tokenizer_config.json": b"{}", "README.md": b"# model card",
        "generation_config.json": b"{}",
    }
    dirs = [tmp_path / "checkpoint-1", tmp_path / "checkpoint-2"]
    for i, d in enumerate(dirs):
        _hf_sharded(d, i, extra=junk)
    out = tmp_path / "avg"
    rc, stdout, err = _run(["average", *map(str, dirs), "-o", str(out), "--json"], capsys)
    assert rc == 0, err
    report = json.loads(stdout)
    allowed = ["README.md", "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"]
    weights = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "model.safetensors.index.json"]
    assert sorted(p.name for p in out.iterdir()) == sorted(allowed + weights)
    assert report["copied_files"] == allowed
    assert set(report["not_copied_files"]) == set(junk) - set(allowed)


# ----------------------------------------------------------------------------- 4. denial of service


def _fan_out(width: int, levels: int) -> dict[str, object]:
    node: dict[str, object] = {"leaf": "x"}
    for _ in range(levels):
        node = {f"k{i}": node for i in range(width)}  # one dict referenced `width` times (pickle memo)
    return node


@pytest.mark.parametrize("key", [None, "state_dict"])
def test_fan_out_pickle_is_walked_in_well_under_a_second(key: str | None, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    paths = []
    for i in range(2):
        paths.append(tmp_path / f"c{i}.pt")
        # 200^4 paths through 4 tiny dicts (never a problem for the pickle, a few KB), or 2^60 through 60
        torch.save({"state_dict": _state(i), "wide": _fan_out(200, 4), "deep": _fan_out(2, 60)}, paths[-1])
    assert paths[0].stat().st_size < 32_000  # mostly the zip container and the real weights
    argv = ["average", *map(str, paths), "-o", str(tmp_path / "o.pt")] + (["--key", key] if key else [])
    t0 = time.process_time()  # CPU time: the shared test machines' load does not count
    rc, _, err = _run(argv, capsys)
    elapsed = time.process_time() - t0
    if key is None:
        assert rc == 1 and "pass --key state_dict" in err
        _one_line_error(err)
    else:
        assert rc == 0, err
        assert "wide" in err and "deep" in err  # dropped, and said so
    assert elapsed < 1.0, elapsed


def test_deep_and_cyclic_nesting_beside_key(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    deep: list[object] = []
    for _ in range(3000):
        deep = [deep]
    cyclic: dict[str, object] = {}
    cyclic["self"] = cyclic
    old = sys.getrecursionlimit()
    sys.setrecursionlimit(20_000)  # only to write the crafted file
    try:
        for i in range(2):
            torch.save({"state_dict": _state(i), "deep": deep, "cyclic": cyclic}, tmp_path / f"c{i}.pt")
        torch.save({"state_dict": _state(2), "hyper_parameters": deep}, tmp_path / "hp.pt")
    finally:
        sys.setrecursionlimit(old)
    rc, _, err = _run(["average", str(tmp_path / "c0.pt"), str(tmp_path / "c1.pt"), "--key", "state_dict",
                       "-o", str(tmp_path / "o.pt")], capsys)
    assert rc == 0, err
    out = torch.load(tmp_path / "o.pt", weights_only=True)
    assert "deep" not in out and "cyclic" not in out
    rc, _, err = _run(["average", str(tmp_path / "hp.pt"), "--key", "state_dict", "-o", str(tmp_path / "p.pt")],
                      capsys)
    assert rc == 1 and "'hyper_parameters' nests deeper than" in err
    _one_line_error(err)


@pytest.mark.slow
def test_many_tiny_tensors_take_seconds(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    n = 100_000
    paths = []
    for i in range(2):
        paths.append(tmp_path / f"c{i}.safetensors")
        st.save_file({f"t{j}": torch.full((1,), float(i + j)) for j in range(n)}, str(paths[-1]))
    t0 = time.process_time()  # CPU time: the shared test machines' load does not count
    rc, stdout, err = _run(["average", *map(str, paths), "-o", str(tmp_path / "o.safetensors")], capsys)
    elapsed = time.process_time() - t0
    assert rc == 0, err
    assert f"{n} tensors averaged" in stdout
    out = st.load_file(str(tmp_path / "o.safetensors"))
    assert float(out["t7"]) == 7.5 and float(out[f"t{n - 1}"]) == n - 0.5
    assert elapsed < 40, elapsed  # hours with a list used for membership


# ----------------------------------------------------------------------------- 5. atomicity and durability


def _writer_script(body: str) -> str:
    return textwrap.dedent("""
        import os, sys
        from weightavg.cli import main
    """) + textwrap.dedent(body)


def _fresh_old_output(out: Path) -> None:
    import shutil

    if out.exists():
        shutil.rmtree(out)
    out.mkdir()
    (out / "old-marker").write_text("the previous output")


def _old_or_new(out: Path) -> str:
    names = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if names == ["old-marker"]:
        return "old"
    assert "config.json" in names and "model.safetensors.index.json" in names, f"{out}: {names}"
    return "new"


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2-exchange", "fallback"])
def test_force_replace_of_a_directory_survives_a_crash_at_any_step(exchange: bool, tmp_path: Path) -> None:
    dirs = [tmp_path / "ck0", tmp_path / "ck1"]
    for i, d in enumerate(dirs):
        _hf_sharded(d, i)
    out = tmp_path / "out"
    for step in range(1, 8):
        _fresh_old_output(out)
        # the process dies (os._exit: no cleanup at all) right after its `step`-th rename
        script = _writer_script(f"""
            count = [0]
            def crashing(real):
                def call(*a, **k):
                    r = real(*a, **k)
                    count[0] += 1
                    if count[0] == {step}:
                        os._exit(9)
                    return r
                return call
            os.rename = crashing(os.rename)
            os.replace = crashing(os.replace)
            try:
                from weightavg import _files
                _files._renameat2 = crashing(_files._renameat2) if {exchange} else (lambda *a: False)
            except ImportError:
                pass
            sys.exit(main(["average", {str(dirs[0])!r}, {str(dirs[1])!r}, "-o", {str(out)!r}, "--force"]))
        """)
        p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=False)
        assert p.returncode in (0, 9), p.stderr
        if not out.exists():  # only the fallback may leave this window: the next writer repairs it
            assert not exchange
            from weightavg import _files

            _files._recover(out)
        _old_or_new(out)
        if p.returncode == 0:  # finished before its `step`-th rename: every step was tried
            assert _old_or_new(out) == "new"
            break
    else:
        raise AssertionError("the write never finished")


def test_no_clobber_holds_at_the_moment_of_the_rename(tmp_path: Path, monkeypatch, capsys) -> None:  # type: ignore[no-untyped-def]
    torch.save(_state(0), tmp_path / "a.pt")
    torch.save(_state(1), tmp_path / "b.pt")
    out = tmp_path / "avg.pt"
    real = _average._save_torch

    def racing(obj, path):  # type: ignore[no-untyped-def]
        real(obj, path)
        out.write_bytes(b"the other run's output")  # another writer finishes first

    monkeypatch.setattr(_average, "_save_torch", racing)
    rc, _, err = _run(["average", str(tmp_path / "a.pt"), str(tmp_path / "b.pt"), "-o", str(out)], capsys)
    assert rc == 1 and "created while this run was writing" in err
    assert out.read_bytes() == b"the other run's output"
    assert _hidden(tmp_path) == []
    # the same for directories
    dirs = [tmp_path / "ck0", tmp_path / "ck1"]
    for i, d in enumerate(dirs):
        _hf_sharded(d, i)
    real_hf = _average._write_hf
    outd = tmp_path / "avgdir"

    def racing_hf(*a):  # type: ignore[no-untyped-def]
        r = real_hf(*a)
        outd.mkdir()
        (outd / "theirs").write_text("x")
        return r

    monkeypatch.setattr(_average, "_write_hf", racing_hf)
    rc, _, err = _run(["average", *map(str, dirs), "-o", str(outd)], capsys)
    assert rc == 1 and "created while this run was writing" in err
    assert sorted(p.name for p in outd.iterdir()) == ["theirs"]


def test_output_that_is_or_contains_an_input_is_refused_even_with_force(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    run = tmp_path / "run"
    (run / "ckpt").mkdir(parents=True)
    for i in range(2):
        torch.save(_state(i), run / "ckpt" / f"e{i}.pt")
    inputs = [str(run / "ckpt" / f"e{i}.pt") for i in range(2)]
    for out in (run, run / "ckpt", run / "ckpt" / "e1.pt", run / "ckpt" / ".." / "ckpt"):
        rc, _, err = _run(["average", *inputs, "-o", str(out), "--force"], capsys)
        assert rc == 1 and "refused" in err, err
        assert all(Path(p).exists() for p in inputs)
    (tmp_path / "elsewhere").mkdir()
    cwd = os.getcwd()
    os.chdir(tmp_path / "elsewhere")
    try:
        for out_name in (".", ".."):
            rc, _, err = _run(["average", *inputs, "-o", out_name, "--force"], capsys)
            assert rc == 1 and ("refused" in err or "give the output its own name" in err), err
    finally:
        os.chdir(cwd)
    assert all(Path(p).exists() for p in inputs)


def test_outputs_are_fsynced_files_and_directories(tmp_path: Path, monkeypatch, capsys) -> None:  # type: ignore[no-untyped-def]
    synced: list[str] = []
    real = os.fsync

    def tracking(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(os, "fsync", tracking)
    dirs = [tmp_path / "ck0", tmp_path / "ck1"]
    for i, d in enumerate(dirs):
        _hf_sharded(d, i)
    rc, _, err = _run(["average", *map(str, dirs), "-o", str(tmp_path / "avg")], capsys)
    assert rc == 0, err
    names = {Path(p).name for p in synced}
    assert {"model-00001-of-00002.safetensors", "config.json", "model.safetensors.index.json"} <= names
    assert str(tmp_path) in synced  # the directory entry of the output itself
    # SWAG.save: the file and its directory
    from weightavg.swag._io import save_state

    synced.clear()
    save_state({"a": torch.ones(2)}, tmp_path / "sub" / "post.pt")
    assert str(tmp_path / "sub") in synced and any(p.startswith(str(tmp_path / "sub" / ".post.pt")) for p in synced)


def _wait_for(path: Path, proc: subprocess.Popen[str], timeout: float = 120) -> None:
    t0 = time.perf_counter()
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.perf_counter() - t0 < timeout
        time.sleep(0.05)


def test_sigterm_during_the_write_leaves_nothing(tmp_path: Path) -> None:
    for i in range(2):
        torch.save(_state(i), tmp_path / f"c{i}.pt")
    ready = tmp_path / "ready"
    out = tmp_path / "out" / "avg.pt"
    script = _writer_script(f"""
        import time
        from pathlib import Path
        from weightavg.cli import _average
        def slow(obj, path):
            Path(path).write_bytes(b"PK partial")
            Path({str(ready)!r}).touch()
            time.sleep(60)
        _average._save_torch = slow
        sys.exit(main(["average", {str(tmp_path / "c0.pt")!r}, {str(tmp_path / "c1.pt")!r}, "-o", {str(out)!r}]))
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE, text=True)
    _wait_for(ready, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert "weightavg average: terminated" in err and "Traceback" not in err
    assert list(out.parent.iterdir()) == []


def test_sigterm_during_a_library_save_leaves_nothing(tmp_path: Path) -> None:
    ready = tmp_path / "ready"
    script = textwrap.dedent(f"""
        import time
        from pathlib import Path
        import torch
        from weightavg.swag import _io
        real = torch.save
        def slow(obj, f):
            real(obj, f)
            Path({str(ready)!r}).touch()
            time.sleep(60)
        _io.torch.save = slow
        _io.save_state({{"a": torch.ones(3)}}, {str(tmp_path / "post.pt")!r})
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE, text=True)
    _wait_for(ready, proc)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGTERM  # dies of the signal, as without weightavg
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ready"]


# ----------------------------------------------------------------------------- 6. robustness


def test_disk_full_names_the_output_not_the_temporary(tmp_path: Path, monkeypatch, capsys) -> None:  # type: ignore[no-untyped-def]
    for i in range(2):
        torch.save(_state(i), tmp_path / f"c{i}.pt")

    def full(obj, path):  # type: ignore[no-untyped-def]
        Path(path).write_bytes(b"PK partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(_average, "_save_torch", full)
    out = tmp_path / "avg.pt"
    rc, _, err = _run(["average", str(tmp_path / "c0.pt"), str(tmp_path / "c1.pt"), "-o", str(out)], capsys)
    assert rc == 1
    assert f"cannot write {out}: No space left on device" in err and ".tmp" not in err
    _one_line_error(err)
    assert _hidden(tmp_path) == [] and not out.exists()


@pytest.mark.parametrize(
    ("index", "message"),
    [
        (b"{not json", "not a readable shard index"),
        (b"[1, 2]", "expected a JSON object with a non-empty 'weight_map'"),
        (b'{"weight_map": {"fc.weight": 3}}', "weight_map['fc.weight'] is int"),
        (b'{"weight_map": {"fc.weight": "config.json"}}', "must be a .safetensors file"),
        (b'{"weight_map": {"fc.weight": "model-00001-of-00002.safetensors"}}', "does not match its shards"),
        (b'{"weight_map": {"fc.weight": "missing.safetensors"}}', "which is not in the directory"),
    ],
)
def test_malformed_index_is_a_one_line_error(index: bytes, message: str, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    dirs = [tmp_path / "ck0", tmp_path / "ck1"]
    for i, d in enumerate(dirs):
        _hf_sharded(d, i)
    (dirs[1] / "model.safetensors.index.json").write_bytes(index)
    rc, _, err = _run(["average", *map(str, dirs), "-o", str(tmp_path / "o")], capsys)
    assert rc == 1 and message in err, err
    assert "model.safetensors.index.json" in err
    _one_line_error(err)


def test_zero_size_tensors(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    paths = []
    for i in range(2):
        paths.append(tmp_path / f"c{i}.safetensors")
        st.save_file({"empty": torch.zeros(0, 4), "w": torch.full((3,), float(i)),
                      "e16": torch.zeros(0, dtype=torch.bfloat16)}, str(paths[-1]))
    rc, _, err = _run(["average", *map(str, paths), "-o", str(tmp_path / "o.safetensors")], capsys)
    assert rc == 0, err
    out = st.load_file(str(tmp_path / "o.safetensors"))
    assert out["empty"].shape == (0, 4) and out["e16"].dtype == torch.bfloat16
    assert torch.equal(out["w"], torch.full((3,), 0.5))


def test_swag_state_dtype_comes_from_an_allowlist(tmp_path: Path) -> None:
    from weightavg import StateError
    from weightavg.swag import SWAG

    model = torch.nn.Linear(3, 2)
    swag = SWAG(model, max_rank=2)
    for _ in range(3):
        swag.collect(model)
    state = swag.state_dict()
    for name in ("no_such_dtype", "load", "nn", "int64"):
        state["config"]["deviation_dtype"] = name
        with pytest.raises(StateError, match="deviation_dtype") as info:
            SWAG.from_state_dict(state, model)
        assert "\n" not in str(info.value)


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (Path.touch, (self.marker,))


def test_swag_load_of_a_malicious_file_never_suggests_unsafe_loading(tmp_path: Path) -> None:
    from weightavg import StateError
    from weightavg.swag import SWAG

    marker = tmp_path / "code-ran"
    torch.save({"format": "weightavg.SWAG", "x": _Payload(marker)}, tmp_path / "evil.pt")
    with pytest.raises(StateError) as info:
        SWAG.load(tmp_path / "evil.pt", torch.nn.Linear(3, 2))
    msg = str(info.value)
    assert "refused" in msg and "weights_only=False" not in msg and "\n" not in msg
    assert not marker.exists()


# ----------------------------------------------------------------------------- 7. torch floor


def test_old_torch_refuses_torch_pickles_but_reads_safetensors(tmp_path: Path, monkeypatch, capsys) -> None:  # type: ignore[no-untyped-def]
    for i in range(2):
        torch.save(_state(i), tmp_path / f"c{i}.pt")
        st.save_file(dict(_state(i)), str(tmp_path / f"c{i}.safetensors"))
    monkeypatch.setattr(torch, "__version__", "2.9.1+cpu")
    rc, _, err = _run(["average", str(tmp_path / "c0.pt"), str(tmp_path / "c1.pt"), "-o", str(tmp_path / "o.pt")],
                      capsys)
    assert rc == 1 and "torch 2.9.1+cpu has known ways around weights_only=True" in err
    assert "CVE-2025-32434" in err and "CVE-2026-24747" in err and "weights_only=False" not in err
    _one_line_error(err)
    rc, _, err = _run(["average", str(tmp_path / "c0.safetensors"), str(tmp_path / "c1.safetensors"),
                       "-o", str(tmp_path / "o.safetensors")], capsys)
    assert rc == 0, err
    from weightavg import StateError
    from weightavg.swag._io import load_state

    with pytest.raises(StateError, match="CVE-2026-24747"):
        load_state(tmp_path / "c0.pt")
    monkeypatch.setattr(torch, "__version__", "2.10.0")
    assert set(load_state(tmp_path / "c0.pt")) == set(_state(0))
