"""weightavg.swa_utils against torch.optim.swa_utils on the same sequences, and its differences."""

from __future__ import annotations

import copy
import io
import pickle
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.optim import swa_utils as T
from torch.utils._python_dispatch import TorchDispatchMode

import weightavg as wa
from weightavg import swa_utils as W

from .conftest import ConvBN
from .reference import ema_closed_form, mean_of

# ----------------------------------------------------------------------------- helpers


def train_steps(model: nn.Module, n: int, seed: int = 0) -> Iterator[int]:
    """n SGD steps on random data, BN running stats moving (train mode)."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model.train()
    for i in range(n):
        model(torch.randn(16, 8, generator=g)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        yield i


def float_state(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in sd.items() if v.is_floating_point()}


def assert_state_close(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor],
                       tol: float = 0.0, keys: list[str] | None = None) -> None:
    keys = keys if keys is not None else list(ref)
    assert keys, "nothing compared"
    for k in keys:
        torch.testing.assert_close(got[k], ref[k], rtol=tol, atol=tol, msg=k)


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def user_avg_fn(avg: torch.Tensor, new: torch.Tensor, n: torch.Tensor | int) -> torch.Tensor:
    return avg * 0.7 + new * 0.3


def user_multi_avg_fn(avgs: list[torch.Tensor], news: list[torch.Tensor], n: Any) -> None:
    torch._foreach_mul_(avgs, 0.6)
    torch._foreach_add_(avgs, news, alpha=0.4)


# (torch kwargs, weightavg kwargs, tolerance): the same averaging asked of both
FNS: list[Any] = [
    pytest.param({}, {}, 1e-6, id="default-swa"),
    pytest.param({"multi_avg_fn": T.get_swa_multi_avg_fn()},
                 {"multi_avg_fn": W.get_swa_multi_avg_fn()}, 1e-6, id="swa-multi"),
    pytest.param({"avg_fn": T.get_swa_avg_fn()}, {"avg_fn": W.get_swa_avg_fn()}, 1e-6, id="swa-single"),
    pytest.param({"multi_avg_fn": T.get_ema_multi_avg_fn(0.9)},
                 {"multi_avg_fn": W.get_ema_multi_avg_fn(0.9)}, 0.0, id="ema-multi"),
    pytest.param({"avg_fn": T.get_ema_avg_fn(0.8)}, {"avg_fn": W.get_ema_avg_fn(0.8)}, 1e-6,
                 id="ema-single"),
    pytest.param({"avg_fn": user_avg_fn}, {"avg_fn": user_avg_fn}, 0.0, id="user-avg_fn"),
    pytest.param({"multi_avg_fn": user_multi_avg_fn}, {"multi_avg_fn": user_multi_avg_fn}, 0.0,
                 id="user-multi_avg_fn"),
    pytest.param({"multi_avg_fn": T.get_ema_multi_avg_fn(0.95)},
                 {"multi_avg_fn": T.get_ema_multi_avg_fn(0.95)}, 0.0, id="torch-fn-in-ours"),
]


# ----------------------------------------------------------------------------- averages vs torch


@pytest.mark.parametrize("use_buffers", [False, True], ids=["params", "buffers"])
@pytest.mark.parametrize(("tkw", "wkw", "tol"), FNS)
def test_averages_equal_torch(tkw: dict, wkw: dict, tol: float, use_buffers: bool) -> None:
    model = ConvBN()
    if use_buffers:  # torch averages (or crashes on) the integer counter: see the difference tests
        model.bn.num_batches_tracked = None
    ref = T.AveragedModel(model, use_buffers=use_buffers, **tkw)
    ours = W.AveragedModel(model, use_buffers=use_buffers, **wkw)
    for _ in train_steps(model, 7):
        ref.update_parameters(model)
        ours.update_parameters(model)
    got, want = ours.state_dict(), ref.state_dict()
    assert list(got) == list(want)  # same layout: n_averaged, module.*
    assert int(got["n_averaged"]) == int(want["n_averaged"]) == 7
    assert_state_close(got, want, tol, keys=list(float_state(want)))
    if not use_buffers:  # integer buffers: both copy the model's
        assert int(got["module.bn.num_batches_tracked"]) == int(want["module.bn.num_batches_tracked"]) == 7


def test_swa_and_ema_equal_closed_forms() -> None:
    """Independent of torch: the mean of the snapshots, and the EMA closed form."""
    model = ConvBN()
    swa = W.AveragedModel(model)
    emas = W.AveragedModel(model, multi_avg_fn=W.get_ema_multi_avg_fn(0.8), use_buffers=True)
    snaps = []
    for _ in train_steps(model, 6):
        swa.update_parameters(model)
        emas.update_parameters(model)
        snaps.append({f"module.{k}": v for k, v in snapshot(model).items()})
    params = [f"module.{n}" for n, _ in model.named_parameters()]
    for k, v in mean_of(snaps).items():
        if k in params:
            torch.testing.assert_close(swa.state_dict()[k].double(), v, rtol=1e-6, atol=1e-7)
    ref = ema_closed_form([float_state(s) for s in snaps], 0.8)
    for k, v in ref.items():  # parameters and float buffers
        torch.testing.assert_close(emas.state_dict()[k].double(), v, rtol=1e-6, atol=1e-7)


def test_user_fns_get_the_count_as_a_tensor_like_torch() -> None:
    seen: dict[str, list[tuple[int, torch.dtype, torch.device]]] = {"torch": [], "ours": []}

    def recorder(key: str) -> Callable[..., None]:
        def fn(avgs: list[torch.Tensor], news: list[torch.Tensor], n: torch.Tensor) -> None:
            assert isinstance(n, torch.Tensor)
            seen[key].append((int(n), n.dtype, n.device))
            torch._foreach_lerp_(avgs, news, 0.5)
        return fn

    model = nn.Linear(3, 2)
    ref = T.AveragedModel(model, multi_avg_fn=recorder("torch"))
    ours = W.AveragedModel(model, multi_avg_fn=recorder("ours"))
    for _ in range(4):
        with torch.no_grad():
            model.weight.add_(1.0)
        ref.update_parameters(model)
        ours.update_parameters(model)
    assert seen["ours"] == seen["torch"] == [(n, torch.int64, torch.device("cpu")) for n in (1, 2, 3)]
    assert_state_close(ours.state_dict(), ref.state_dict())


def test_our_fns_work_in_torch_averagedmodel() -> None:
    """get_*_avg_fn from weightavg are torch-compatible callables too."""
    for wfn, tfn, key in [(W.get_ema_multi_avg_fn(0.9), T.get_ema_multi_avg_fn(0.9), "multi_avg_fn"),
                          (W.get_swa_multi_avg_fn(), T.get_swa_multi_avg_fn(), "multi_avg_fn"),
                          (W.get_ema_avg_fn(0.9), T.get_ema_avg_fn(0.9), "avg_fn"),
                          (W.get_swa_avg_fn(), T.get_swa_avg_fn(), "avg_fn")]:
        model = ConvBN()
        a = T.AveragedModel(model, **{key: wfn})
        b = T.AveragedModel(model, **{key: tfn})
        for _ in train_steps(model, 5):
            a.update_parameters(model)
            b.update_parameters(model)
        assert_state_close(a.state_dict(), b.state_dict(), 1e-6)


def test_known_fns_take_the_engine_rules() -> None:
    assert W.get_ema_multi_avg_fn(0.9).weightavg_rule.config() == wa.ema(0.9).config()  # type: ignore[attr-defined]
    assert W.get_swa_avg_fn().weightavg_rule.config() == wa.mean().config()  # type: ignore[attr-defined]
    ours = W.AveragedModel(nn.Linear(2, 2), avg_fn=W.get_ema_avg_fn(0.5))
    assert ours._rule.config() == wa.ema(0.5).config()
    ours = W.AveragedModel(nn.Linear(2, 2), avg_fn=user_avg_fn)
    assert ours._rule.config()["kind"] == "inplace"


def test_ema_decay_one_keeps_first_snapshot() -> None:
    model = nn.Linear(2, 2)
    first = snapshot(model)
    ours = W.AveragedModel(model, multi_avg_fn=W.get_ema_multi_avg_fn(1.0))
    ref = T.AveragedModel(model, multi_avg_fn=T.get_ema_multi_avg_fn(1.0))
    for _ in range(3):
        ours.update_parameters(model)
        ref.update_parameters(model)
        with torch.no_grad():
            model.weight.add_(1.0)
    assert_state_close(ours.module.state_dict(), first)
    assert_state_close(ours.state_dict(), ref.state_dict())


def test_bf16_model_averages_in_bf16_like_torch() -> None:
    model = ConvBN().to(torch.bfloat16)
    ref = T.AveragedModel(model, multi_avg_fn=T.get_ema_multi_avg_fn(0.9))
    ours = W.AveragedModel(model, multi_avg_fn=W.get_ema_multi_avg_fn(0.9))
    for i in range(5):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.1 * (i + 1))
        ref.update_parameters(model)
        ours.update_parameters(model)
    assert ours.module.fc.weight.dtype == torch.bfloat16
    assert_state_close(ours.state_dict(), ref.state_dict(), keys=list(float_state(ref.state_dict())))


def test_device_argument_and_wrappers() -> None:
    model = ConvBN()
    ours = W.AveragedModel(model, device="cpu")
    ref = T.AveragedModel(model, device="cpu")
    wrapped = nn.DataParallel(model)  # CPU-only: a pass-through wrapper with `module.` names
    for _ in train_steps(model, 3):
        ours.update_parameters(wrapped)
        ref.update_parameters(wrapped)
    assert ours.n_averaged.device == torch.device("cpu")
    assert_state_close(ours.state_dict(), ref.state_dict(), 1e-6,
                       keys=list(float_state(ref.state_dict())))


# ----------------------------------------------------------------------------- built on the engine


def test_module_tensors_are_the_engine_storage() -> None:
    model = ConvBN()
    ours = W.AveragedModel(model, use_buffers=True)
    views = ours._avg.averaged_tensors()  # type: ignore[union-attr]
    tensors = wa.named_tensors(ours.module)
    assert set(views) == set(tensors)
    for name, view in views.items():
        assert tensors[name][0].data_ptr() == view.data_ptr(), name
    # before any update the module holds the model's values, as torch's deepcopy does
    assert_state_close(ours.module.state_dict(), model.state_dict())
    for _ in train_steps(model, 2):
        ours.update_parameters(model)
    for name, view in ours._avg.averaged_tensors().items():  # type: ignore[union-attr]
        assert tensors[name][0].data_ptr() == view.data_ptr(), name
        torch.testing.assert_close(ours.state_dict()[f"module.{name}"], view)
    assert ours.module.fc.weight.requires_grad == model.fc.weight.requires_grad


def test_to_and_copies_keep_averaging_correctly() -> None:
    """.double(), deepcopy and pickle replace the module's tensors; averaging goes on exactly."""
    model = ConvBN()
    ref = T.AveragedModel(model)
    ours = W.AveragedModel(model)
    steps = train_steps(model, 9)
    for _ in range(3):
        next(steps)
        ref.update_parameters(model)
        ours.update_parameters(model)
    clone = copy.deepcopy(ours)
    pickled = pickle.loads(pickle.dumps(ours))
    ref.double()
    ours.double()
    assert ours.module.fc.weight.dtype == torch.float64
    for _ in steps:
        ref.update_parameters(model)
        for m in (ours, clone, pickled):
            m.update_parameters(model)
    want = ref.state_dict()
    assert ours.module.fc.weight.dtype == torch.float64
    assert int(clone.n_averaged) == int(pickled.n_averaged) == int(ours.n_averaged) == 9
    for m in (ours, clone, pickled):
        got = m.state_dict()
        assert_state_close({k: v.double() for k, v in float_state(got).items()},
                           {k: v.double() for k, v in float_state(want).items()}, 1e-6)
    # the clone is independent of the original
    assert clone.module.fc.weight.data_ptr() != ours.module.fc.weight.data_ptr()


def test_training_model_changing_dtype_is_followed() -> None:
    model = nn.Linear(4, 3)
    ref = T.AveragedModel(model)
    ours = W.AveragedModel(model)
    ref.update_parameters(model)
    ours.update_parameters(model)
    model.double()
    for _ in range(3):
        with torch.no_grad():
            model.weight.add_(0.5)
        ref.update_parameters(model)
        ours.update_parameters(model)
    assert ours.module.weight.dtype == torch.float32  # the average keeps its own dtype, as torch's
    assert_state_close(ours.state_dict(), ref.state_dict(), 1e-6)


def test_nonfinite_option() -> None:
    model = nn.Linear(2, 2)
    ours = W.AveragedModel(model, nonfinite="skip")
    ours.update_parameters(model)
    before = snapshot(ours)
    with torch.no_grad():
        model.weight[0, 0] = float("nan")
    ours.update_parameters(model)
    assert_state_close(ours.state_dict(), before)
    assert int(ours.n_averaged) == 1
    strict = W.AveragedModel(model, nonfinite="raise")
    with pytest.raises(wa.NonFiniteError, match="weight"):
        strict.update_parameters(model)
    allowing = W.AveragedModel(model)  # default: as torch, no check
    allowing.update_parameters(model)
    assert torch.isnan(allowing.module.weight).any()


# ----------------------------------------------------------------------------- checkpoints


def continue_both(a: nn.Module, b: nn.Module, model: nn.Module, n: int, seed: int) -> None:
    for _ in train_steps(model, n, seed=seed):
        a.update_parameters(model)  # type: ignore[operator]
        b.update_parameters(model)  # type: ignore[operator]


@pytest.mark.parametrize("use_buffers", [False, True])
@pytest.mark.parametrize("direction", ["torch-to-ours", "ours-to-torch"])
def test_checkpoint_interchange(direction: str, use_buffers: bool) -> None:
    model = ConvBN()
    writer_cls, reader_cls = ((T.AveragedModel, W.AveragedModel) if direction == "torch-to-ours"
                              else (W.AveragedModel, T.AveragedModel))
    writer = writer_cls(model, use_buffers=use_buffers)
    for _ in train_steps(model, 4):
        writer.update_parameters(model)
    buf = io.BytesIO()
    torch.save(writer.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    reader = reader_cls(ConvBN(), use_buffers=use_buffers)  # fresh: other initial weights
    reader.load_state_dict(state)
    assert int(reader.n_averaged) == 4
    # both go on with the same snapshots: SWA weights 1/(n+1) need the loaded count
    continue_both(writer, reader, model, 3, seed=1)
    want, got = writer.state_dict(), reader.state_dict()
    assert int(got["n_averaged"]) == 7
    assert_state_close(got, want, 1e-6, keys=list(float_state(want)))


def test_load_after_updates_sets_the_count() -> None:
    model = nn.Linear(3, 3)
    ours = W.AveragedModel(model)
    ref = T.AveragedModel(model)
    for _ in range(5):
        ours.update_parameters(model)  # ours counts 5
    for _ in range(2):
        ref.update_parameters(model)
    ours.load_state_dict(ref.state_dict())  # back to 2
    with torch.no_grad():
        model.weight.add_(3.0)
    ours.update_parameters(model)
    ref.update_parameters(model)
    assert int(ours.n_averaged) == 3
    assert_state_close(ours.state_dict(), ref.state_dict(), 1e-6)


# ----------------------------------------------------------------------------- differences


def test_difference_integer_buffers_are_copied_not_averaged() -> None:
    model = ConvBN()
    ref = T.AveragedModel(model, multi_avg_fn=T.get_ema_multi_avg_fn(0.9), use_buffers=True)
    ours = W.AveragedModel(model, multi_avg_fn=W.get_ema_multi_avg_fn(0.9), use_buffers=True)
    for _ in train_steps(model, 6):
        ref.update_parameters(model)
        ours.update_parameters(model)
    assert int(ours.module.bn.num_batches_tracked) == int(model.bn.num_batches_tracked) == 6
    assert int(ref.module.bn.num_batches_tracked) != 6  # torch truncates an average of counters
    assert ours.module.bn.num_batches_tracked.dtype == torch.int64
    # torch's SWA over lists crashes on the counter; ours copies it
    ref = T.AveragedModel(model, multi_avg_fn=T.get_swa_multi_avg_fn(), use_buffers=True)
    ours = W.AveragedModel(model, multi_avg_fn=W.get_swa_multi_avg_fn(), use_buffers=True)
    for _ in train_steps(model, 2):
        ref.update_parameters(model)  # first update copies
        ours.update_parameters(model)
        break
    with pytest.raises(RuntimeError, match="addcdiv"):
        ref.update_parameters(model)
    ours.update_parameters(model)
    assert int(ours.module.bn.num_batches_tracked) == int(model.bn.num_batches_tracked)


def test_difference_pairing_by_name() -> None:
    avg_of = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    other = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4), nn.Linear(4, 4))
    ref = T.AveragedModel(avg_of)
    ref.update_parameters(other)  # torch: zips by position, truncates silently
    ours = W.AveragedModel(avg_of)
    with pytest.raises(wa.MismatchError) as err:
        ours.update_parameters(other)
    msg = str(err.value)
    assert "1.weight" in msg and "2.weight" in msg and "3.bias" in msg
    assert int(ours.n_averaged) == 0
    reshaped = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 5))
    with pytest.raises(wa.MismatchError, match=r"1\.weight"):
        ours.update_parameters(reshaped)


class OpLog(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.ops.append(str(func.overloadpacket.__name__))
        return func(*args, **(kwargs or {}))


def ops_of_update(avg: nn.Module, model: nn.Module) -> list[str]:
    with OpLog() as log:
        avg.update_parameters(model)  # type: ignore[operator]
    return log.ops


def test_difference_no_host_read_of_the_count() -> None:
    """``_local_scalar_dense`` is the op behind item()/bool()/int(): a device-to-host sync."""
    model = ConvBN()
    ours, ref = W.AveragedModel(model), T.AveragedModel(model)
    for _ in train_steps(model, 2):
        ours.update_parameters(model)
        ref.update_parameters(model)
    assert "_local_scalar_dense" in ops_of_update(ref, model)
    assert "_local_scalar_dense" not in ops_of_update(ours, model)
    assert int(ours.n_averaged) == 3
    # the buffer is a mirror: writing it by hand changes nothing (documented)
    ours.n_averaged.fill_(0)
    ours.update_parameters(model)
    assert int(ours.n_averaged) == 4


def test_difference_fused_update_on_cpu() -> None:
    """Kernels per update do not grow with the number of tensors (torch: one op chain each)."""
    model = nn.Sequential(*[nn.Linear(3, 3) for _ in range(200)])  # 400 tensors
    ours, ref = W.AveragedModel(model), T.AveragedModel(model)
    for m in (ours, ref):
        m.update_parameters(model)
    ours_ops = ops_of_update(ours, model)
    ref_ops = ops_of_update(ref, model)
    assert ours_ops.count("lerp_") <= 2 and len(ours_ops) < 20, ours_ops
    assert len(ref_ops) > 400
    assert_state_close(ours.state_dict(), ref.state_dict(), 1e-6)


def test_difference_nonpersistent_buffers_are_copied() -> None:
    model = ConvBN()
    ours = W.AveragedModel(model, use_buffers=True)
    ref = T.AveragedModel(model, use_buffers=True)
    for value in (1.0, 5.0, 9.0):
        model.scratch.fill_(value)
        ours.update_parameters(model)
        ref.update_parameters(model)
    torch.testing.assert_close(ours.module.scratch, torch.full((2,), 9.0))
    torch.testing.assert_close(ref.module.scratch, torch.full((2,), 5.0))  # torch: (1+5+9)/3
    assert "module.scratch" not in ours.state_dict()


# ----------------------------------------------------------------------------- SWALR


def lr_sequence(cls: type, n_steps: int, swa_lr: Any, anneal_epochs: int, strategy: str,
                changes: dict[int, float] | None = None, groups: int = 2,
                lr: float = 1.0) -> list[list[float]]:
    params = [nn.Parameter(torch.zeros(1)) for _ in range(groups)]
    opt = torch.optim.SGD([{"params": [p], "lr": lr * (i + 1)} for i, p in enumerate(params)])
    sched = cls(opt, swa_lr=swa_lr, anneal_epochs=anneal_epochs, anneal_strategy=strategy)
    out = [[g["lr"] for g in opt.param_groups]]
    for s in range(n_steps):
        opt.step()
        if changes and s in changes:
            for g in opt.param_groups:
                g["lr"] = changes[s]
        sched.step()
        out.append([g["lr"] for g in opt.param_groups])
        assert sched.get_last_lr() == out[-1]
    return out


@pytest.mark.parametrize("strategy", ["cos", "linear"])
@pytest.mark.parametrize("anneal_epochs", [0, 1, 5])
@pytest.mark.parametrize("swa_lr", [0.05, [0.05, 0.2]], ids=["scalar", "list"])
@pytest.mark.parametrize("changes", [None, {2: 0.5, 6: 3.0}], ids=["plain", "lr-changed"])
def test_swalr_equals_torch(strategy: str, anneal_epochs: int, swa_lr: Any, changes: Any) -> None:
    want = lr_sequence(T.SWALR, 10, swa_lr, anneal_epochs, strategy, changes)
    got = lr_sequence(W.SWALR, 10, swa_lr, anneal_epochs, strategy, changes)
    assert got == want  # exactly
    assert got[-1] == ([swa_lr] * 2 if not isinstance(swa_lr, list) else swa_lr)


@settings(max_examples=60, deadline=None)
@given(
    strategy=st.sampled_from(["cos", "linear"]),
    anneal_epochs=st.integers(0, 8),
    swa_lr=st.floats(0.0, 2.0),
    lr=st.floats(1e-4, 5.0),
    n_steps=st.integers(1, 14),
    changes=st.dictionaries(st.integers(0, 13), st.floats(1e-3, 4.0), max_size=3),
)
def test_swalr_property_equals_torch(strategy: str, anneal_epochs: int, swa_lr: float, lr: float,
                                     n_steps: int, changes: dict[int, float]) -> None:
    want = lr_sequence(T.SWALR, n_steps, swa_lr, anneal_epochs, strategy, changes, 1, lr)
    got = lr_sequence(W.SWALR, n_steps, swa_lr, anneal_epochs, strategy, changes, 1, lr)
    assert got == want


@pytest.mark.parametrize("direction", ["torch-to-ours", "ours-to-torch"])
def test_swalr_state_dict_interchange(direction: str) -> None:
    src_cls, dst_cls = ((T.SWALR, W.SWALR) if direction == "torch-to-ours" else (W.SWALR, T.SWALR))

    def make(cls: type, strategy: str) -> tuple[torch.optim.Optimizer, Any]:
        opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
        return opt, cls(opt, swa_lr=0.1, anneal_epochs=6, anneal_strategy=strategy)

    opt_a, a = make(src_cls, "linear")
    for _ in range(3):
        opt_a.step()
        a.step()
    opt_b, b = make(dst_cls, "cos")
    opt_b.load_state_dict(opt_a.state_dict())
    b.load_state_dict(a.state_dict())
    assert b.anneal_func(0.5) == pytest.approx(0.5)  # linear came with the state
    for _ in range(5):
        opt_a.step()
        a.step()
        opt_b.step()
        b.step()
        assert a.get_last_lr() == b.get_last_lr()


def test_swalr_get_lr_outside_step_warns_like_torch() -> None:
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = W.SWALR(opt, swa_lr=0.1)
    with pytest.warns(UserWarning, match="get_last_lr"):
        sched.get_lr()
    assert sched.anneal_strategy == "cos"


# ----------------------------------------------------------------------------- update_bn


def test_update_bn_equals_torch() -> None:
    model = ConvBN()
    for _ in train_steps(model, 3):
        pass
    g = torch.Generator().manual_seed(3)
    loader = [(torch.randn(8, 8, generator=g) * 2 + 1, torch.zeros(8)) for _ in range(4)]
    loader.append(torch.randn(5, 8, generator=g))  # a bare tensor batch too
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    a.eval()
    b.eval()
    a.bn.momentum = b.bn.momentum = 0.3
    T.update_bn(loader, a)
    W.update_bn(loader, b)
    assert_state_close(b.state_dict(), a.state_dict(), 0.0)
    assert not b.training and b.bn.momentum == 0.3
    assert int(b.bn.num_batches_tracked) == 5


def test_update_bn_on_averaged_model_and_restores_on_error() -> None:
    model = ConvBN()
    ours = W.AveragedModel(model)
    ref = T.AveragedModel(model)
    for _ in train_steps(model, 3):
        ours.update_parameters(model)
        ref.update_parameters(model)
    loader = [torch.randn(8, 8) for _ in range(3)]
    T.update_bn(loader, ref)
    W.update_bn(loader, ours)
    assert_state_close(ours.state_dict(), ref.state_dict(), 1e-6,
                       keys=list(float_state(ref.state_dict())))

    def failing() -> Iterator[torch.Tensor]:
        yield torch.randn(8, 8)
        raise RuntimeError("loader broke")

    ours.eval()
    with pytest.raises(RuntimeError, match="loader broke"):
        W.update_bn(failing(), ours)
    assert not ours.training and ours.module.bn.momentum == 0.1
    W.update_bn([], nn.Linear(2, 2))  # no BatchNorm: nothing to do


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("call", "match"),
    [
        pytest.param(lambda: W.AveragedModel(nn.Linear(2, 2), avg_fn=user_avg_fn,
                                             multi_avg_fn=user_multi_avg_fn), "avg_fn/multi_avg_fn",
                     id="both-fns"),
        pytest.param(lambda: W.AveragedModel(nn.Linear(2, 2), avg_fn=3), "avg_fn=3", id="avg_fn"),
        pytest.param(lambda: W.AveragedModel("model"), "model='str'", id="model"),  # type: ignore[arg-type]
        pytest.param(lambda: W.AveragedModel(nn.Linear(2, 2), use_buffers="yes"), "use_buffers",
                     id="use_buffers"),
        pytest.param(lambda: W.AveragedModel(nn.Linear(2, 2)).update_parameters({}), "model=",
                     id="update-model"),
        pytest.param(lambda: W.get_ema_multi_avg_fn(1.5), "decay=1.5", id="decay-high"),
        pytest.param(lambda: W.get_ema_avg_fn(-0.1), "decay=-0.1", id="decay-low"),
        pytest.param(lambda: W.SWALR(_opt(2), swa_lr=[0.1]), r"swa_lr=\[0.1\].*2 numbers", id="swa_lr-len"),
        pytest.param(lambda: W.SWALR(_opt(1), swa_lr=-1.0), "swa_lr=-1.0", id="swa_lr-neg"),
        pytest.param(lambda: W.SWALR(_opt(1), swa_lr="high"), "swa_lr='high'", id="swa_lr-str"),
        pytest.param(lambda: W.SWALR(_opt(1), 0.1, anneal_epochs=-1), "anneal_epochs=-1", id="epochs-neg"),
        pytest.param(lambda: W.SWALR(_opt(1), 0.1, anneal_epochs=2.5), "anneal_epochs=2.5",
                     id="epochs-float"),
        pytest.param(lambda: W.SWALR(_opt(1), 0.1, anneal_strategy="exp"), "anneal_strategy='exp'",
                     id="strategy"),
    ],
)
def test_bad_input_names_the_argument(call: Callable[[], Any], match: str) -> None:
    with pytest.raises(wa.ConfigError, match=match) as err:
        call()
    assert isinstance(err.value, ValueError)
    assert "expected" in str(err.value)


def _opt(groups: int) -> torch.optim.Optimizer:
    return torch.optim.SGD([{"params": [nn.Parameter(torch.zeros(1))]} for _ in range(groups)], lr=0.1)


def test_swalr_tensor_lrs_like_torch() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        seqs = []
        for cls in (T.SWALR, W.SWALR):
            opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=torch.tensor(1.0))
            sched = cls(opt, swa_lr=torch.tensor(0.2), anneal_epochs=3)
            lrs = []
            for _ in range(4):
                opt.step()
                sched.step()
                lrs.append(float(opt.param_groups[0]["lr"]))
            seqs.append(lrs)
    assert seqs[0] == seqs[1]
