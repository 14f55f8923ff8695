"""The split of a policy state into tensors (for torch.distributed.checkpoint) and the rest (for a
trainer's rank-0 state), used by the Lightning and Hugging Face front ends on sharded models."""

from __future__ import annotations

import pytest
import torch

import weightavg as wa
from weightavg._frontend_state import any_dtensor, flat_tensors, rank_fixed, strip_tensors, with_tensors


def _state() -> dict:
    model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.BatchNorm1d(3))
    policy = wa.EMA(smoothing=0.5)
    policy.begin(model, torch.optim.SGD(model.parameters(), lr=0.1), total_steps=4)
    return policy.state_dict()


def test_split_and_merge_round_trip_every_tensor_and_counter() -> None:
    state = _state()
    flat = flat_tensors("ema", state)
    assert "ema.averager.averages.default.0.weight" in flat  # DCP's own "." joining, names kept whole
    assert "ema.averager.averages.default.1.num_batches_tracked" in flat
    skeleton = strip_tensors(state)
    assert not any(isinstance(v, torch.Tensor) for v in skeleton["averager"]["averages"]["default"].values())
    assert skeleton["steps"] == state["steps"] and skeleton["averager"]["config"] == state["averager"]["config"]
    copies = {k: v.clone() + 1 for k, v in flat.items()}
    merged = with_tensors(skeleton, "ema", state, copies)
    for k, v in flat_tensors("ema", merged).items():
        assert v is copies[k]
    assert strip_tensors(merged) == skeleton
    assert not any_dtensor(state)


def test_a_state_saved_for_another_model_is_a_mismatch_naming_the_key() -> None:
    state = _state()
    skeleton = strip_tensors(state)
    del skeleton["averager"]["averages"]["default"]["0.bias"]
    with pytest.raises(wa.MismatchError, match=r"ema\.averager\.averages\.default\.0\.bias"):
        with_tensors(skeleton, "ema", state, flat_tensors("ema", state))


def test_rank_fixed_takes_the_live_rank() -> None:
    saved = {"averager": {"rank": 0, "num_updates": 3}}
    assert rank_fixed(saved, {"averager": {"rank": 1}})["averager"] == {"rank": 1, "num_updates": 3}
    assert rank_fixed({"averager": {"num_updates": 3}}, {"averager": {}}) == {"averager": {"num_updates": 3}}
