"""Refusals of what weightavg cannot average, each naming the parameter (single process)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import weightavg as wa
from weightavg.swa_utils import AveragedModel


def _fsdp1_type() -> type:
    # FSDP1 cannot be built without a process group here: a stand-in recognised the same way
    # (by the class name and module torch uses)
    return type("FullyShardedDataParallel", (nn.Module,),
                {"__module__": "torch.distributed.fsdp.fully_sharded_data_parallel"})


def test_fsdp1_is_refused_pointing_to_fully_shard() -> None:
    wrapper = _fsdp1_type()()
    wrapper.add_module("inner", nn.Linear(3, 2))
    model = nn.Sequential(wrapper)
    with pytest.raises(wa.ConfigError, match=r"FSDP1(.|\n)*inner.weight(.|\n)*fully_shard"):
        wa.Averager(model)


def test_fsdp1_flat_parameter_is_refused() -> None:
    flat_param_type = type("FlatParameter", (nn.Parameter,), {})
    model = nn.Linear(3, 2)
    model._flat_param = flat_param_type(torch.zeros(8))  # registered like FSDP1 does
    model._parameters["_flat_param"] = model._flat_param
    with pytest.raises(wa.ConfigError, match=r"'_flat_param'(.|\n)*fully_shard"):
        wa.Averager(model)


@pytest.mark.parametrize("attr", ["ds_id", "ds_status"])
def test_deepspeed_zero3_partitioned_parameters_are_refused(attr: str) -> None:
    model = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 1))
    setattr(model[1].weight, attr, 7)
    with pytest.raises(wa.ConfigError, match=r"'1.weight'(.|\n)*ZeRO-3(.|\n)*stage 1 or 2"):
        wa.Averager(model)
    with pytest.raises(wa.ConfigError, match=r"'1\.weight'"):
        AveragedModel(model)


def test_deepspeed_zero_1_2_plain_parameters_just_work() -> None:
    model = nn.Linear(3, 2)
    avg = wa.Averager(model)
    assert avg.update(model)
