"""``check="deferred"`` on a sharded model (2 gloo ranks): the device flag is all-reduced, so a NaN in
one rank's shard refuses the update on every rank, the refusal surfaces at each rank's next read,
and the average equals a single-process reference that never saw that update."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

import weightavg as wa

from ._harness import count_collectives, full_state, reference_averages, run_ranks

pytestmark = pytest.mark.distributed

RULES = {"ema": wa.ema(0.5), "swa": wa.mean()}
STEPS, BAD = 5, 2  # the update of step BAD sees a NaN in rank 1's shard


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3))  # uneven shards over 2 ranks


def _run(rank: int, world: int) -> dict[str, object]:
    model = _model()
    fully_shard(model[0])
    fully_shard(model[2])
    fully_shard(model)
    raising = wa.Averager(model, rule=RULES, check="deferred")
    skipping = wa.Averager(model, rule=RULES, check="deferred", nonfinite="skip")
    unchecked = wa.Averager(model, rule=RULES, check="deferred", nonfinite="allow")
    out: dict[str, object] = {"checks": [raising.check, skipping.check, unchecked.check]}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(rank)
    snapshots, comm_checked, comm_allow, raised = [], [], [], []
    for step in range(STEPS):
        model(torch.randn(6, 4, generator=g)).square().mean().backward()
        opt.step()
        opt.zero_grad()
        w = model[0].weight.to_local()
        keep = w.detach().clone()
        if step == BAD and rank == 1:
            with torch.no_grad():
                w[0, 0] = float("nan")
        with count_collectives() as c:
            raising.update(model)
            skipping.update(model)
        comm_checked.append(c["dist.all_reduce"])
        with count_collectives() as c:
            unchecked.update(model)
        comm_allow.append(sum(c.values()))
        with torch.no_grad():
            w.copy_(keep)
        try:  # the next read reports the refusal (on every rank)
            raised.append(raising.num_updates)
        except wa.NonFiniteError as err:
            raised.append(str(err))
        snapshots.append(full_state(model) if step != BAD else None)
    out.update(comm_checked=comm_checked, comm_allow=comm_allow, raised=raised,
               counts=[(a.num_updates, a.num_skipped) for a in (raising, skipping)],
               snapshots=[s for s in snapshots if s is not None])
    out["full"] = {name: {s: {n: (t.full_tensor() if isinstance(t, DTensor) else t).clone()
                              for n, t in a.averaged_tensors(s).items()} for s in RULES}
                   for name, a in (("raising", raising), ("skipping", skipping))}
    return out


def test_deferred_check_on_a_sharded_model_refuses_on_every_rank(tmp_path) -> None:
    res = run_ranks(_run, 2, tmp_path)
    ref = reference_averages(_model(), res[0]["snapshots"], rule=RULES)
    for r in res:
        assert r["checks"] == ["deferred", "deferred", "host"]  # "allow" checks nothing
        assert r["comm_checked"] == [2] * STEPS  # one flag per checked update, on every rank
        assert r["comm_allow"] == [0] * STEPS  # the unchecked update communicates nothing
        assert [isinstance(x, str) for x in r["raised"]] == [s == BAD for s in range(STEPS)]
        assert "1 update(s) refused" in r["raised"][BAD]
        assert r["counts"] == [(STEPS - 1, 1), (STEPS - 1, 1)]  # refused = skipped, raised or not
        for name in ("raising", "skipping"):
            for s in RULES:
                for n, t in ref[s].items():
                    torch.testing.assert_close(r["full"][name][s][n], t, rtol=1e-6, atol=1e-7,
                                               msg=f"{name} {s} {n}")
