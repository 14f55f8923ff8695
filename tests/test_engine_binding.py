"""The engine's names and bindings: tied tensors, wrapper prefixes, replaced tensors, meta models."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import weightavg as wa
from weightavg.functional import compute_ema
from weightavg.swa_utils import AveragedModel


class Tied(nn.Module):
    """An embedding and an output head sharing one weight (GPT-2's ``wte``/``lm_head``)."""

    def __init__(self) -> None:
        super().__init__()
        self.wte = nn.Embedding(7, 4)
        self.mid = nn.Linear(4, 4)
        self.lm_head = nn.Linear(4, 7, bias=False)
        self.lm_head.weight = self.wte.weight


def _perturb(model: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen))
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ----------------------------------------------------------------------------- tied weights (#9.3)


def test_export_state_dict_gives_every_name_of_a_tied_tensor_its_average() -> None:
    model = Tied()
    avg = wa.Averager(model)  # mean
    snaps = []
    for seed in range(3):
        snaps.append(_perturb(model, seed))
        avg.update(model)
    mean = torch.stack([s["wte.weight"] for s in snaps]).mean(0)
    for exported in (avg.export_state_dict(model), avg.export_state_dict()):
        torch.testing.assert_close(exported["wte.weight"], mean)
        torch.testing.assert_close(exported["lm_head.weight"], mean)
    fresh = Tied()
    fresh.load_state_dict(avg.export_state_dict(model), strict=True)
    torch.testing.assert_close(fresh.lm_head.weight, mean)
    torch.testing.assert_close(fresh.wte.weight, mean)


def test_tied_gpt2_export_loads_the_average() -> None:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=8, vocab_size=31, n_positions=16)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg)
    assert model.lm_head.weight is model.transformer.wte.weight
    avg = wa.Averager(model)
    snaps = []
    for seed in range(2):
        snaps.append(_perturb(model, seed)["transformer.wte.weight"])
        avg.update(model)
    fresh = transformers.GPT2LMHeadModel(cfg)
    fresh.load_state_dict(avg.export_state_dict(model), strict=True)
    mean = torch.stack(snaps).mean(0)
    torch.testing.assert_close(fresh.lm_head.weight, mean)
    torch.testing.assert_close(fresh.transformer.wte.weight, mean)


def test_drop_ins_average_tied_weights_under_every_name() -> None:
    model = Tied()
    swa = AveragedModel(model)
    ema_model = copy.deepcopy(model)
    ema = model.wte.weight.detach().clone()
    snaps = []
    for seed in range(3):
        snaps.append(_perturb(model, seed)["wte.weight"])
        swa.update_parameters(model)
        compute_ema(model, ema_model, smoothing=0.5)
        ema = 0.5 * ema + 0.5 * snaps[-1]
    mean = torch.stack(snaps).mean(0)
    for name in ("wte.weight", "lm_head.weight"):
        torch.testing.assert_close(swa.module.state_dict()[name], mean)
        torch.testing.assert_close(ema_model.state_dict()[name], ema)


# ----------------------------------------------------------------------------- names (#9.4)


class ChildNamedModule(nn.Module):
    """A root parameter ``weight`` and a child *attribute* named ``module`` with its own ``weight``."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(3))
        self.module = nn.Linear(3, 3)


def test_a_child_named_module_keeps_its_prefix_and_both_weights_are_averaged() -> None:
    model = ChildNamedModule()
    assert set(wa.named_tensors(model)) == {"weight", "module.weight", "module.bias"}
    assert set(wa.named_tensors(nn.DataParallel(model))) == {"weight", "module.weight", "module.bias"}
    avg = wa.Averager(model)
    snaps = []
    for seed in range(3):
        snaps.append(_perturb(model, seed))
        avg.update(model)
    got = avg.averaged_tensors()
    for name in ("weight", "module.weight", "module.bias"):
        torch.testing.assert_close(got[name], torch.stack([s[name] for s in snaps]).mean(0), msg=name)
    fresh = ChildNamedModule()
    fresh.load_state_dict(avg.export_state_dict(model), strict=True)
    torch.testing.assert_close(fresh.weight, torch.stack([s["weight"] for s in snaps]).mean(0))


def test_wrappers_are_recognised_by_type_at_any_depth() -> None:
    inner = ChildNamedModule()
    outer = nn.Sequential(nn.DataParallel(inner), nn.Linear(3, 1))
    assert set(wa.named_tensors(outer)) == {"0.weight", "0.module.weight", "0.module.bias", "1.weight", "1.bias"}
    assert set(wa.named_tensors(nn.DataParallel(nn.DataParallel(inner)))) == set(wa.named_tensors(inner))


def test_mapping_keys_that_collide_once_prefixes_are_stripped_are_refused() -> None:
    sd = ChildNamedModule().state_dict()
    with pytest.raises(wa.ConfigError, match=r"'weight'.*'module\.weight'"):
        wa.Averager(sd)


def test_drop_ins_average_the_root_weight_next_to_a_child_named_module() -> None:
    model = ChildNamedModule()
    swa = AveragedModel(model)
    ema_model = copy.deepcopy(model)
    ema = model.weight.detach().clone()
    snaps = []
    for seed in range(3):
        snaps.append(_perturb(model, seed)["weight"])
        swa.update_parameters(model)
        compute_ema(model, ema_model, smoothing=0.5)
        ema = 0.5 * ema + 0.5 * snaps[-1]
    torch.testing.assert_close(swa.module.weight, torch.stack(snaps).mean(0))
    torch.testing.assert_close(ema_model.weight, ema)


# ----------------------------------------------------------------------------- replaced tensors (#9.5)


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))


def test_a_replaced_parameter_is_read_at_the_next_update() -> None:
    model = _net()
    avg = wa.Averager(model, rule=wa.ema(decay=0.5))
    avg.update(model)
    first = model[2].weight.detach().clone()
    model[2].weight = nn.Parameter(torch.full((2, 4), 3.0))  # the old Parameter is orphaned
    avg.update(model)
    torch.testing.assert_close(avg.averaged_tensors()["2.weight"], 0.5 * first + 0.5 * 3.0)
    with avg.swapped_in(model):
        torch.testing.assert_close(model[2].weight, 0.5 * first + 0.5 * 3.0)
    assert torch.equal(model[2].weight, torch.full((2, 4), 3.0))


def test_a_replaced_buffer_is_read_by_updates_and_by_lazily_copied_tensors() -> None:
    model = _net()
    avg = wa.Averager(model, rule=wa.mean(), buffers="copy")
    avg.update(model)
    model[1].running_mean = torch.full((4,), 5.0)
    model[1].num_batches_tracked = torch.tensor(7)
    got = avg.averaged_tensors()  # copied tensors follow the module last updated from
    assert torch.equal(got["1.running_mean"], torch.full((4,), 5.0))
    assert int(got["1.num_batches_tracked"]) == 7
    averaged = wa.Averager(model, rule=wa.mean())
    averaged.update(model)
    model[1].running_var = torch.full((4,), 3.0)
    averaged.update(model)
    torch.testing.assert_close(averaged.averaged_tensors()["1.running_var"], torch.full((4,), 2.0))


def test_a_replaced_tensor_of_another_shape_is_a_clear_error() -> None:
    model = _net()
    avg = wa.Averager(model)
    avg.update(model)
    model[2].weight = nn.Parameter(torch.zeros(2, 5))
    with pytest.raises(wa.MismatchError, match=r"2\.weight \(2, 4\) vs \(2, 5\)"):
        avg.update(model)


def test_swa_utils_averaged_model_follows_a_replaced_parameter() -> None:
    model = _net()
    swa = AveragedModel(model)
    swa.update_parameters(model)
    first = model[0].bias.detach().clone()
    model[0].bias = nn.Parameter(torch.full((4,), 2.0))
    swa.update_parameters(model)
    torch.testing.assert_close(swa.module[0].bias, (first + 2.0) / 2)


# ----------------------------------------------------------------------------- meta device (#9.14)


def test_a_model_on_the_meta_device_is_refused_at_construction() -> None:
    with torch.device("meta"):
        model = nn.Linear(3, 2)
    with pytest.raises(wa.ConfigError, match=r"meta device.*weight"):
        wa.Averager(model)


def test_registrations_in_other_modules_keep_the_binding() -> None:
    model = _net()
    avg = wa.Averager(model, rule=wa.ema(decay=0.5))
    avg.update(model)
    avg.update(model)
    binding = avg._binder.bindings[id(model)]
    assert binding.plan is not None
    other = _net()  # registers parameters, buffers and modules elsewhere
    other[0].weight = nn.Parameter(torch.zeros(4, 3))
    avg.update(model)
    assert avg._binder.bindings[id(model)] is binding  # no re-collection, the plan is kept
    model[0].bias = nn.Parameter(torch.zeros(4))
    avg.update(model)
    assert avg._binder.bindings[id(model)] is not binding
