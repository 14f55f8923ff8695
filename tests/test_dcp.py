"""Reading DCP checkpoints without trusting them, and streaming them out as safetensors."""

from __future__ import annotations

import io
import json
import os
import pickle
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file

from weightavg._dcp import export_dcp, is_dcp_checkpoint, iter_dcp_tensors, read_dcp_metadata
from weightavg._files import OutputError
from weightavg.cli._average import CheckpointError

MARKER = "pwned"


def _touch(path: str) -> None:  # what a malicious pickle would call
    Path(path).write_text("ran")


class _Evil:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (_touch, (self.marker,))


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "net.0.weight": torch.randn(5, 3, generator=g),
        "net.0.bias": torch.randn(5, generator=g),
        "net.1.weight": torch.randn(4, 5, generator=g).to(torch.bfloat16),
        "net.bn.num_batches_tracked": torch.tensor(7),
        "scalar": torch.tensor(2.5),
    }


def _save(path: Path, state: dict) -> Path:
    with warnings.catch_warnings():  # "no process group": the single-process save is intended
        warnings.simplefilter("ignore")
        dcp.save(state, checkpoint_id=path)
    return path


@pytest.fixture
def ckpt(tmp_path) -> Path:
    state = {"averages": {"default": _tensors()}, "num_updates": 3, "config": {"rule": "ema"}}
    return _save(tmp_path / "ckpt", state)


def test_iter_yields_every_tensor_whole_and_skips_non_tensors(ckpt) -> None:
    assert is_dcp_checkpoint(ckpt) and not is_dcp_checkpoint(ckpt / ".metadata")
    got = dict(iter_dcp_tensors(ckpt, prefix="averages.default."))
    ref = _tensors()
    assert list(got) == sorted(ref)
    for k, v in ref.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k], v), k
    info = read_dcp_metadata(ckpt)
    assert "num_updates" not in info and "config.rule" not in info  # pickled entries: never read
    assert [n for n, _ in iter_dcp_tensors(ckpt, prefix="averages.default.", names=["scalar"])] == ["scalar"]


def test_export_single_file_equals_the_tensors(ckpt, tmp_path) -> None:
    out = export_dcp(ckpt, tmp_path / "avg.safetensors", prefix="averages.default.", metadata={"note": "x"})
    got = load_file(out)
    ref = _tensors()
    assert set(got) == set(ref)
    for k, v in ref.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k], v), k
    from safetensors import safe_open

    with safe_open(str(out), "pt") as f:
        assert f.metadata() == {"format": "pt", "note": "x"}


def test_export_hf_directory_sharded_with_index_and_dtype(ckpt, tmp_path) -> None:
    out = export_dcp(ckpt, tmp_path / "hf", prefix="averages.default.", max_shard_size=64, dtype=torch.bfloat16)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1 and sorted(p.name for p in out.iterdir()) == sorted([*files, "model.safetensors.index.json"])
    got: dict[str, torch.Tensor] = {}
    for f in files:
        part = load_file(out / f)
        assert all(index["weight_map"][k] == f for k in part)
        got.update(part)
    ref = _tensors()
    assert set(got) == set(ref)
    for k, v in ref.items():
        want = v.to(torch.bfloat16) if v.is_floating_point() else v  # integers keep their dtype
        assert got[k].dtype == want.dtype and torch.equal(got[k], want), k
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in got.values())
    # small enough for one file: model.safetensors, no index
    one = export_dcp(ckpt, tmp_path / "hf1", prefix="averages.default.")
    assert sorted(p.name for p in one.iterdir()) == ["model.safetensors"]


def _rewrite_metadata(ckpt: Path, edit) -> None:
    with open(ckpt / ".metadata", "rb") as f:
        md = pickle.load(f)  # the test's own checkpoint
    edit(md)
    with open(ckpt / ".metadata", "wb") as f:
        pickle.dump(md, f)


def test_malicious_metadata_is_refused_without_running_code(ckpt, tmp_path) -> None:
    marker = tmp_path / MARKER
    with open(ckpt / ".metadata", "wb") as f:
        pickle.dump(_Evil(str(marker)), f)
    for call in (lambda: read_dcp_metadata(ckpt), lambda: list(iter_dcp_tensors(ckpt)),
                 lambda: export_dcp(ckpt, tmp_path / "o.safetensors")):
        with pytest.raises(CheckpointError, match=r"refusing to load tests\.test_dcp\._touch"):
            call()
    assert not marker.exists()
    assert not (tmp_path / "o.safetensors").exists()


def test_malicious_object_nested_inside_real_metadata_is_refused(ckpt, tmp_path) -> None:
    marker = tmp_path / MARKER

    def edit(md) -> None:
        md.planner_data = {"x": _Evil(str(marker))}

    _rewrite_metadata(ckpt, edit)
    with pytest.raises(CheckpointError, match="refusing to load"):
        read_dcp_metadata(ckpt)
    assert not marker.exists()


def test_metadata_cannot_set_attributes_on_allowed_classes(ckpt) -> None:
    from torch.distributed.checkpoint.metadata import Metadata

    # GLOBAL Metadata (an allowed class), then BUILD (None, {"version": "x"}) on the class itself:
    # with a plain find_class allow-list this sets Metadata.version for the rest of the process
    payload = (b"\x80\x02ctorch.distributed.checkpoint.metadata\nMetadata\n"
               b"N}X\x07\x00\x00\x00versionX\x01\x00\x00\x00xs\x86b.")
    (ckpt / ".metadata").write_bytes(payload)
    try:
        with pytest.raises(CheckpointError, match="refusing to set the state of <class"):
            read_dcp_metadata(ckpt)
        assert Metadata.version is None
    finally:
        Metadata.version = None  # type: ignore[misc]


def test_pickled_non_tensor_entries_are_never_unpickled(tmp_path) -> None:
    marker = tmp_path / MARKER
    ckpt = _save(tmp_path / "ckpt", {"w": torch.ones(3), "obj": _Evil(str(marker))})
    assert not marker.exists()
    assert [n for n, _ in iter_dcp_tensors(ckpt)] == ["w"]
    export_dcp(ckpt, tmp_path / "o.safetensors")
    assert not marker.exists()


def test_data_file_outside_the_checkpoint_is_refused(ckpt, tmp_path) -> None:
    def edit(md) -> None:
        for info in md.storage_data.values():
            info.relative_path = "../outside.distcp"

    (tmp_path / "outside.distcp").write_bytes(b"x")
    _rewrite_metadata(ckpt, edit)
    with pytest.raises(CheckpointError, match="not a plain name inside the checkpoint"):
        read_dcp_metadata(ckpt)


def test_symlinked_data_file_leading_out_is_refused(ckpt, tmp_path) -> None:
    data = next(ckpt.glob("*.distcp"))
    moved = tmp_path / "elsewhere.distcp"
    os.replace(data, moved)
    os.symlink(moved, data)
    with pytest.raises(CheckpointError, match="leads outside the checkpoint"):
        read_dcp_metadata(ckpt)


def test_not_a_checkpoint_and_no_tensor_under_prefix(ckpt, tmp_path) -> None:
    with pytest.raises(CheckpointError, match="not a DCP checkpoint"):
        read_dcp_metadata(tmp_path)
    with pytest.raises(CheckpointError, match=r"no tensor under prefix 'nope\.'"):
        read_dcp_metadata(ckpt, prefix="nope.")
    (ckpt / ".metadata").write_bytes(b"not a pickle")
    with pytest.raises(CheckpointError, match="not readable DCP metadata"):
        read_dcp_metadata(ckpt)


def test_export_is_atomic(ckpt, tmp_path, monkeypatch) -> None:
    import weightavg._dcp as mod

    out = tmp_path / "hf"
    out.mkdir()
    (out / "old.txt").write_text("keep")
    with pytest.raises(OutputError, match="exists: pass --force"):
        export_dcp(ckpt, out, prefix="averages.default.")
    real = mod._write_safetensors
    calls = []

    def failing(file, *a, **k):  # the second shard fails after the first was written
        calls.append(file)
        if len(calls) == 2:
            raise OSError("disk full")
        return real(file, *a, **k)

    monkeypatch.setattr(mod, "_write_safetensors", failing)
    with pytest.raises(OutputError, match="disk full"):  # the shared writer names the output
        export_dcp(ckpt, out, prefix="averages.default.", max_shard_size=64, force=True)
    assert sorted(p.name for p in out.iterdir()) == ["old.txt"]  # untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "hf"]  # no temporary left
    monkeypatch.setattr(mod, "_write_safetensors", real)
    export_dcp(ckpt, out, prefix="averages.default.", force=True)
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors"]


def test_a_corrupt_chunk_is_a_clear_error_and_writes_nothing(ckpt, tmp_path) -> None:
    data = next(ckpt.glob("*.distcp"))
    raw = bytearray(data.read_bytes())
    info = read_dcp_metadata(ckpt)["averages.default.net.1.weight"]
    start = info.chunks[0][3]
    raw[start : start + 4] = b"\x80\x02}q"  # a pickle where a torch.save record should be
    data.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=r"'averages\.default\.net\.1\.weight': chunk is not a torch\.save"):
        export_dcp(ckpt, tmp_path / "o.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_tensors_are_read_lazily_one_at_a_time(ckpt) -> None:
    # the last tensor's chunk is corrupt: every tensor before it still comes out, the error only
    # when the stream reaches it (nothing is read ahead)
    info = read_dcp_metadata(ckpt, prefix="averages.default.")
    last = list(info)[-1]
    data = ckpt / info[last].chunks[0][2]
    raw = bytearray(data.read_bytes())
    raw[info[last].chunks[0][3]] = 0
    data.write_bytes(bytes(raw))
    stream = iter_dcp_tensors(ckpt, prefix="averages.default.")
    got = [next(stream)[0] for _ in range(len(info) - 1)]
    assert got == list(info)[:-1]
    with pytest.raises(CheckpointError, match=last):
        next(stream)


def test_bad_arguments_name_the_argument(ckpt, tmp_path) -> None:
    import weightavg as wa

    with pytest.raises(wa.ConfigError, match="max_shard_size"):
        export_dcp(ckpt, tmp_path / "o", max_shard_size="lots")
    with pytest.raises(wa.ConfigError, match="metadata"):
        export_dcp(ckpt, tmp_path / "o", metadata={"a": 1})  # type: ignore[dict-item]
    with pytest.raises(CheckpointError, match="inside the checkpoint"):
        export_dcp(ckpt, ckpt / "o.safetensors")


def test_file_slice_reads_only_its_window() -> None:
    from weightavg._dcp import _FileSlice

    f = io.BytesIO(b"0123456789")
    s = io.BufferedReader(_FileSlice(f, 3, 4))
    assert s.read() == b"3456"
    s.seek(1)
    assert s.read(2) == b"45"
