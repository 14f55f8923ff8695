"""Checkpoints of a sharded average: DCP save on N ranks, load on M ranks (or in one process, into
the unsharded model's Averager), then continue bit-identically to an uninterrupted run."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch import Tensor, nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

import weightavg as wa

from ._harness import run_ranks

pytestmark = pytest.mark.distributed

TOTAL, BEFORE = 5, 3


def _rules() -> dict[str, wa.Rule]:
    return {"ema": wa.ema(0.7), "swa": wa.mean()}


def _model() -> nn.Module:
    torch.manual_seed(0)
    # (5, 4) and (2, 5) weights: uneven on 2 and 3 ranks, an empty shard on rank 2 of 3
    return nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 2))


def _snapshot(step: int) -> dict[str, Tensor]:
    """Deterministic full weights of step ``step`` (what training would have produced)."""
    g = torch.Generator().manual_seed(100 + step)
    out = {}
    for k, v in _model().state_dict().items():
        out[k] = torch.tensor(step) if k.endswith("num_batches_tracked") else torch.randn(v.shape, generator=g)
    return out


@torch.no_grad()
def _set(model: nn.Module, full: dict[str, Tensor]) -> None:
    """Write full tensors into a (possibly sharded) model, each rank its own slice (no communication)."""
    for k, t in [*model.named_parameters(), *model.named_buffers()]:
        if isinstance(t, DTensor):
            shape, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
            part = full[k]
            for d, (n, o) in enumerate(zip(shape, offset, strict=True)):
                part = part.narrow(d, o, n)
            t.to_local().copy_(part)
        else:
            t.copy_(full[k])


def _sharded(world: int) -> nn.Module:
    m = _model()
    if world:
        fully_shard(m[0])
        fully_shard(m[3])
        fully_shard(m)
    return m


def _full(avg: wa.Averager) -> dict[str, dict[str, Tensor]]:
    return {s: {n: (t.full_tensor() if isinstance(t, DTensor) else t).clone()
                for n, t in avg.averaged_tensors(s).items()} for s in avg.rules}


def _run(rank: int, world: int, path: str, phase: str) -> dict[str, object]:
    model = _sharded(world)
    avg = wa.Averager(model, rule=_rules())
    out: dict[str, object] = {}
    if phase == "load":
        state = avg.state_dict()
        dcp.load(state, checkpoint_id=path)
        avg.load_state_dict(state)
        out["loaded"] = _full(avg)
    steps = range(BEFORE) if phase == "save" else range(BEFORE, TOTAL) if phase == "load" else range(TOTAL)
    for step in steps:
        _set(model, _snapshot(step))
        avg.update(model)
    if phase == "save":
        dcp.save(avg.state_dict(), checkpoint_id=path)
        # a rank's plain torch.save (per-rank files, no resharding) reloads with weights_only=True
        mine = Path(path).parent / f"rank{rank}.pt"
        torch.save(avg.state_dict(), mine)
        again = wa.Averager(model, rule=_rules())
        again.load_state_dict(torch.load(mine, weights_only=True))
        out["torch_save"] = _full(again)
    out["final"] = _full(avg)
    out["counts"] = (avg.num_updates, avg.step, avg.last_step)
    return out


def _assert_same(a: dict[str, dict[str, Tensor]], b: dict[str, dict[str, Tensor]]) -> None:
    assert a.keys() == b.keys()
    for s in a:
        assert a[s].keys() == b[s].keys()
        for n in a[s]:
            assert torch.equal(a[s][n], b[s][n]), f"{s} {n}"


@pytest.mark.slow
@pytest.mark.parametrize(("before", "after"), [(2, 1), (2, 3), (1, 2)])
def test_dcp_saved_on_n_ranks_loads_on_m_and_continues_bit_identically(tmp_path: Path, before: int,
                                                                        after: int) -> None:
    ck = str(tmp_path / "ck")
    saved = run_ranks(_run, before, tmp_path / "save", ck, "save")
    for r in saved:
        _assert_same(r["torch_save"], r["final"])
    resumed = run_ranks(_run, after, tmp_path / "load", ck, "load")
    straight = run_ranks(_run, before, tmp_path / "straight", ck, "straight")
    for r in resumed:
        _assert_same(r["loaded"], saved[0]["final"])
        _assert_same(r["final"], straight[0]["final"])
        assert r["counts"] == straight[0]["counts"] == (TOTAL, TOTAL, TOTAL)


def test_a_sharded_checkpoint_loads_into_a_single_process_averager(tmp_path: Path) -> None:
    """The structure of state_dict() is the same sharded or not: a user evaluates on one machine."""
    ck = str(tmp_path / "ck")
    saved = run_ranks(_run, 3, tmp_path / "save", ck, "save")
    model = _model()
    avg = wa.Averager(model, rule=_rules())
    state = avg.state_dict()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no process group: DCP warns and loads in this process
        dcp.load(state, checkpoint_id=ck)
    avg.load_state_dict(state)
    _assert_same(_full(avg), saved[0]["final"])
    for step in range(BEFORE, TOTAL):
        _set(model, _snapshot(step))
        avg.update(model)
    straight = wa.Averager(_model(), rule=_rules())
    plain = _model()
    for step in range(TOTAL):
        _set(plain, _snapshot(step))
        straight.update(plain)
    _assert_same(_full(avg), _full(straight))


def test_cli_exports_the_averages_of_a_sharded_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from safetensors.torch import load_file

    from weightavg.cli._main import main

    ck = str(tmp_path / "ck")
    saved = run_ranks(_run, 3, tmp_path / "save", ck, "save")
    assert main(["export", ck, "-o", str(tmp_path / "x.safetensors")]) == 1  # two rules: which?
    assert "ema" in capsys.readouterr().err
    assert main(["export", ck, "-o", str(tmp_path / "ema.safetensors"), "--rule", "ema"]) == 0
    got = load_file(tmp_path / "ema.safetensors")
    _assert_same({"ema": got}, {"ema": saved[0]["final"]["ema"]})
