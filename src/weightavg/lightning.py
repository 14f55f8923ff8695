"""Lightning callbacks for weight averaging: thin shells over :mod:`weightavg` policies.

Import this module explicitly (``import weightavg.lightning``); ``import weightavg`` never loads
Lightning. Every decision is taken by the policy (:class:`weightavg.SWA`, :class:`weightavg.EMA`);
the callback only turns the trainer's events into policy calls:

* train start -> ``policy.begin(module, optimizers, total_steps, steps_per_epoch, bn_data)``; the
  policy hooks the optimizers, so updates follow real optimizer steps (gradient accumulation,
  skipped AMP steps, several optimizers and manual optimization all count correctly);
* last training batch of an epoch -> ``policy.on_epoch_end()`` (before the epoch's validation, so
  validation sees the epoch's snapshot);
* validation -> run inside ``policy.averaged()`` (BatchNorm statistics recomputed when stale), with
  the training weights, or both (averaged metrics logged under ``policy.log_prefix``);
* checkpoints -> ``state_dict`` holds the averaged weights (what ``load_from_checkpoint`` gives),
  ``current_model_state`` the training weights, the callback state the policy's counters and
  averages; resuming continues exactly. On a sharded (FSDP2) model under ``ModelParallelStrategy``
  the averages are each rank's shards: a distributed checkpoint holds them in its ``state_dict``
  under ``weightavg.<policy name>.`` (written by every rank; the model entries stay the training
  weights), a full checkpoint holds them gathered, as an unsharded run does;
* train end -> ``policy.end()``: final BatchNorm refresh, the module holds the averaged weights.

Examples:
    >>> import lightning.pytorch as pl
    >>> from weightavg.lightning import SWA, EMA, StochasticWeightAveraging
    >>> trainer = pl.Trainer(max_epochs=3, callbacks=[SWA(swa_start="1ep", swa_end="2ep",
    ...                                                   update_interval="5ba")])  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import math
import operator
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

try:
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import Callback
    from lightning.pytorch.trainer.states import TrainerFn
except ModuleNotFoundError as _err:  # name the extra, not just the missing module
    if not (_err.name or "").startswith("lightning"):
        raise
    raise ModuleNotFoundError(
        f"weightavg.lightning needs Lightning ({_err.name} is not installed): "
        "pip install 'weightavg[lightning]'", name=_err.name) from None

from ._bn import _stat_layers
from ._duration import Duration
from ._errors import ConfigError, StateError, bad_arg
from ._frontend_state import any_dtensor, flat_tensors, rank_fixed, strip_tensors, with_tensors
from ._policy import EMA as _EMAPolicy
from ._policy import SWA as _SWAPolicy
from ._policy import AveragingPolicy
from ._sharded import is_dtensor

__all__ = ["EMA", "SWA", "StochasticWeightAveraging", "WeightAveraging"]


class _TrainBatches:
    """The trainer's training batches, looked up when iterated (they exist only once fit runs)."""

    def __init__(self, trainer: pl.Trainer) -> None:
        self.trainer = trainer

    def __iter__(self) -> Iterator[Any]:
        loaders = self.trainer.train_dataloader
        if loaders is None:
            return iter(())
        if isinstance(loaders, (list, tuple)):
            loaders = loaders[0]
        elif isinstance(loaders, dict):
            loaders = next(iter(loaders.values()))
        return iter(loaders)


class WeightAveraging(Callback):
    """A Lightning callback driving one averaging policy.

    Args:
        policy: a :class:`weightavg.SWA`, :class:`weightavg.EMA` or other
            :class:`weightavg.AveragingPolicy` (its options choose what validation sees, what
            the module holds at the end, BatchNorm refreshes...).
        target: dotted attribute of the LightningModule to average (e.g. ``"generator"``,
            ``"student"``); default: the whole module. Only optimizers holding parameters of the
            target are hooked.
        bn_data: batches for BatchNorm recomputation (default: the training dataloader).
        bn_forward_fn: ``fn(module, batch)`` running one batch for BatchNorm recomputation
            (default: ``module(batch[0])`` for tuples, ``module(**batch)`` for dicts).

    A LightningModule without ``forward`` (valid in Lightning) gets BatchNorm recomputed through
    its ``training_step`` (no gradient, logging muted), as Lightning's own SWA callback does; under
    manual optimization (whose ``training_step`` steps optimizers) pass ``bn_forward_fn``.

    Non-finite weights: the policy's default ``nonfinite="skip"`` skips (and counts, with a
    warning) updates from weights holding NaN/Inf; training never stops because of its average.

    Under manual optimization bounded by ``max_steps`` (which counts every optimizer's steps),
    ``'dur'`` times of the window are fractions of ``max_steps`` on ``trainer.global_step``.

    With a spawning strategy (``ddp_spawn``), training and the averages live in the worker
    processes; this process's module gets rank 0's final weights back (the averaged ones with
    ``final="averaged"``), and the averages are in the checkpoints' callback state.

    To choose when to update, override ``should_update(step_idx=None, epoch_idx=None)`` here
    (Lightning's convention) or on the policy.

    Raises:
        ConfigError: ``policy`` is not a weightavg policy, or ``target`` not a dotted name.

    Examples:
        Building the callback runs here; the ``fit`` line is not run in the doctests because it
        needs a LightningModule and a dataloader (the Lightning guide runs a whole example).

        >>> import weightavg
        >>> from weightavg.lightning import WeightAveraging
        >>> cb = WeightAveraging(weightavg.EMA(half_life="50ba"), target="student")
        >>> cb.should_update(step_idx=0)  # before fit: the window has not opened
        False
        >>> trainer = lightning.Trainer(callbacks=[cb]); trainer.fit(module, loader)  # doctest: +SKIP
    """

    def __init__(
        self,
        policy: AveragingPolicy,
        *,
        target: str | None = None,
        bn_data: Iterable[Any] | None = None,
        bn_forward_fn: Callable[[nn.Module, Any], Any] | None = None,
    ) -> None:
        if not isinstance(policy, AveragingPolicy):
            raise bad_arg("policy", type(policy).__name__, "a weightavg policy such as weightavg.SWA(...)")
        if target is not None and not (isinstance(target, str) and target):
            raise bad_arg("target", target, "a dotted attribute name of the LightningModule or None")
        self.policy = policy
        self.target = target
        self._bn_data = bn_data
        self._bn_forward_fn = bn_forward_fn
        self._epoch_fired: int | None = None  # trainer.current_epoch whose end was reported
        self._restored = False  # state came from a checkpoint for the coming fit
        self._eval_stack = contextlib.ExitStack()
        self._patched_loop: tuple[Any, Any] | None = None
        # sharded (FSDP2) resume: the policy state without its tensors and their key in the
        # distributed checkpoint's "state_dict", loaded once the policy has begun
        self._sharded_pending: tuple[Any, str] | None = None
        self._ckpt_path: Any = None
        # fixed at construction (the policy's times may be settled later), distinct for every
        # configuration: several averaging callbacks can share a checkpoint
        self._state_key = self._generate_state_key(policy=repr(policy), target=target)
        if type(self).should_update is not WeightAveraging.should_update:
            policy.should_update = self.should_update  # type: ignore[method-assign]

    def __getstate__(self) -> dict[str, Any]:
        # pickled to worker processes (ddp_spawn): the run and its averages will live there, so
        # say so in this process's policy, whose begin() is never called
        self.policy._elsewhere = (
            "this callback was sent to worker processes (a spawning strategy such as ddp_spawn), "
            "where training ran and the averages lived; this process's module holds rank 0's final "
            "weights (the averaged ones with final='averaged'), and the averages and counters are "
            "in the callback state of the checkpoints saved during fit. Use strategy='ddp' to keep "
            "them in this process")
        state = self.__dict__.copy()
        state["_eval_stack"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._eval_stack = contextlib.ExitStack()
        self.policy._elsewhere = None

    # ------------------------------------------------------------------ policy hook

    def should_update(self, step_idx: int | None = None, epoch_idx: int | None = None) -> bool:
        """Whether to update after step ``step_idx`` / epoch ``epoch_idx`` (default: the policy's).

        Returns:
            True to update now (see :meth:`weightavg.AveragingPolicy.should_update`).
        """
        return type(self.policy).should_update(self.policy, step_idx=step_idx, epoch_idx=epoch_idx)

    @property
    def state_key(self) -> str:
        return self._state_key

    def _module(self, pl_module: pl.LightningModule) -> nn.Module:
        if self.target is None:
            return pl_module
        try:
            module = operator.attrgetter(self.target)(pl_module)
        except AttributeError as err:
            raise bad_arg("target", self.target, f"an attribute of {type(pl_module).__name__}") from err
        if not isinstance(module, nn.Module):
            raise bad_arg("target", self.target, "the name of a torch.nn.Module attribute")
        return module

    # ------------------------------------------------------------------ fit

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # not on_fit_start: the training data and the restored loop state (a resumable dataloader's
        # position) must be in place before the trainer is asked for its number of batches
        if not self._restored:
            self._epoch_fired = None  # a fresh fit (the policy starts from scratch too)
        self._restored = False
        model = self._module(pl_module)
        owned = {id(p) for p in model.parameters()}
        optimizers = [o for o in trainer.optimizers
                      if any(id(p) in owned for g in o.param_groups for p in g["params"])]
        optimizers = optimizers or list(trainer.optimizers)  # none: the policy says what is wrong
        total = trainer.estimated_stepping_batches
        clock = None
        if not pl_module.automatic_optimization and trainer.max_steps is not None and trainer.max_steps > 0:
            # max_steps counts every optimizer.step() (global_step); the policy counts rounds
            total, clock = trainer.max_steps, self._global_step(trainer)
        total_steps = int(total) if isinstance(total, (int, float)) and math.isfinite(total) and total > 0 else None
        n_batches = trainer.num_training_batches
        steps_per_epoch = (math.ceil(n_batches / trainer.accumulate_grad_batches)
                           if isinstance(n_batches, (int, float)) and math.isfinite(n_batches) and n_batches > 0
                           else None)
        self._configure(trainer)
        self._check_sharded_key(trainer, pl_module)
        self.policy.begin(
            model, optimizers, total_steps=total_steps, steps_per_epoch=steps_per_epoch,
            bn_data=self._bn_data if self._bn_data is not None else _TrainBatches(trainer),
            bn_forward_fn=self._bn_forward(pl_module, model), bn_device=pl_module.device, clock=clock,
        )
        if self._sharded_pending is not None:
            skeleton, key = self._sharded_pending
            self._sharded_pending = None
            self._load_sharded(skeleton, key)
        if self.policy.eval_with == "both":
            self._patch_validation(trainer, pl_module)

    def _configure(self, trainer: pl.Trainer) -> None:
        """Settle arguments that depend on the trainer (hook for subclasses)."""

    def _check_sharded_key(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """A sharded model's averages go into the distributed checkpoint under
        ``weightavg.<policy name>.``: refuse, before the first step, a key another averaging callback
        or the model already uses (at save time it would cost the run up to that checkpoint)."""
        if not any(is_dtensor(p) for p in pl_module.parameters()):
            return
        key = self._sharded_key()
        host: Any = trainer  # Trainer.callbacks is a plain attribute the stubs do not declare
        for other in host.callbacks:
            if other is not self and isinstance(other, WeightAveraging) and other._sharded_key() == key:
                raise bad_arg("policy.name", self.policy.name,
                              f"a name no other averaging callback uses (two policies named {self.policy.name!r} "
                              f"would both save their sharded averages under the checkpoint key {key!r}; "
                              "e.g. EMA(..., name='ema2'))")
        taken = next((n for n, _ in [*pl_module.named_parameters(), *pl_module.named_buffers()]
                      if n == key or n.startswith(key + ".")), None)
        if taken is not None:
            raise bad_arg("policy.name", self.policy.name,
                          f"a name whose checkpoint key {key!r} the model does not use (it has a tensor {taken!r})")

    @staticmethod
    def _global_step(trainer: pl.Trainer) -> Callable[[], int]:
        return lambda: int(trainer.global_step)

    def _bn_forward(self, pl_module: pl.LightningModule, model: nn.Module) -> Callable[[nn.Module, Any], Any] | None:
        """``bn_forward_fn``, or ``training_step`` for a module without ``forward`` (as Lightning)."""
        if self._bn_forward_fn is not None or model is not pl_module:
            return self._bn_forward_fn
        if not (self.policy._recompute_enabled() and _stat_layers(model)):
            return None
        if type(pl_module).forward is not pl.LightningModule.forward:
            return None
        if not pl_module.automatic_optimization:
            raise ConfigError(
                f"bn_forward_fn=None is invalid here: {type(pl_module).__name__} has no forward() and uses "
                "manual optimization (its training_step steps the optimizers), so BatchNorm statistics "
                "of the averaged weights cannot be recomputed through it; pass bn_forward_fn=fn(module, "
                "batch) running one batch, or recompute_bn=False")
        return _training_step_forward

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        progress = trainer.fit_loop.epoch_loop.batch_progress
        if progress.is_last_batch or progress.current.ready == trainer.num_training_batches:
            self._epoch_end(trainer)  # before the epoch-end validation runs

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch_end(trainer)

    def _epoch_end(self, trainer: pl.Trainer) -> None:
        if self._epoch_fired != trainer.current_epoch and self.policy.active:
            self._epoch_fired = trainer.current_epoch
            self.policy.on_epoch_end()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._eval_stack.close()
        self._unpatch_validation()
        self.policy.end()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._eval_stack.close()
        self._unpatch_validation()
        self.policy.detach()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._eval_stack.close()
        self._unpatch_validation()

    # ------------------------------------------------------------------ validation

    def _fitting(self, trainer: pl.Trainer) -> bool:
        p = self.policy
        return trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking and p.active

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.policy.eval_with == "averaged" and self._fitting(trainer) and self.policy.has_average:
            self._eval_stack.enter_context(self.policy.averaged())

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._eval_stack.close()

    def _patch_validation(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """``eval_with="both"``: each validation runs first with the averaged weights, metrics
        prefixed and other callbacks hidden, then normally (so checkpoint/early-stopping
        callbacks see both sets of metrics, once)."""
        self._unpatch_validation()
        loop = trainer.fit_loop.epoch_loop.val_loop
        original = loop.run

        def run() -> Any:
            if self._fitting(trainer) and self.policy.has_average:
                self._averaged_validation(trainer, pl_module, original)
            elif self._fitting(trainer):
                # no average yet: the averaged model is the training model; its metrics exist
                # from the first validation (monitors of "swa/val_loss" need them)
                return self._twice_logged(pl_module, original)
            return original()

        loop.run = run  # type: ignore[method-assign]
        self._patched_loop = (loop, original)

    def _twice_logged(self, pl_module: pl.LightningModule, run: Callable[[], Any]) -> Any:
        prefix = self.policy.log_prefix
        log = pl_module.log

        def both_log(name: str, value: Any, *args: Any, **kwargs: Any) -> None:
            log(name, value, *args, **kwargs)
            log(prefix + name, value, *args, **kwargs)

        try:
            pl_module.log = both_log  # type: ignore[method-assign]
            return run()
        finally:
            del pl_module.log

    def _unpatch_validation(self) -> None:
        if self._patched_loop is not None:
            loop, _ = self._patched_loop
            with contextlib.suppress(AttributeError):
                del loop.run  # the instance attribute; the class method shows again
            self._patched_loop = None

    def _averaged_validation(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                             run: Callable[[], Any]) -> None:
        prefix = self.policy.log_prefix
        log = pl_module.log
        host: Any = trainer  # Trainer.callbacks is a plain attribute the stubs do not declare
        callbacks = host.callbacks

        def prefixed_log(name: str, value: Any, *args: Any, **kwargs: Any) -> None:
            log(prefix + name, value, *args, **kwargs)

        try:
            host.callbacks = []
            pl_module.log = prefixed_log  # type: ignore[method-assign]
            with self.policy.averaged():
                run()
        finally:
            host.callbacks = callbacks
            del pl_module.log

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, Any]:
        return {"policy": self.policy.state_dict(), "epoch_fired": self._epoch_fired}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        key = state_dict.get("sharded_in")
        if key is not None:  # the tensors are in the distributed checkpoint: loaded at train start
            self._sharded_pending = (state_dict["policy"], key)
        else:
            self._sharded_pending = None
            self.policy.load_state_dict(state_dict["policy"])
        self._epoch_fired = state_dict.get("epoch_fired")
        self._restored = True

    def _writes_weights(self) -> bool:
        p = self.policy
        return p.eval_with != "training" or p.final == "averaged"

    def _sharded_key(self) -> str:
        """Where the policy's tensors go in a distributed checkpoint's ``state_dict``."""
        return f"weightavg.{self.policy.name}"

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        p = self.policy
        state = p.state_dict()
        if any_dtensor(state):
            self._save_sharded(checkpoint, state)
            return
        if not p.active or not p.has_average or not self._writes_weights():
            return
        averaged = p.export_state_dict()
        prefix = f"{self.target}." if self.target else ""
        training: dict[str, Tensor] = checkpoint["state_dict"]
        checkpoint.setdefault("current_model_state", training)
        merged = dict(training)
        for k, v in averaged.items():
            if prefix + k in merged:
                merged[prefix + k] = v
        checkpoint["state_dict"] = merged

    def _save_sharded(self, checkpoint: dict[str, Any], state: dict[str, Any]) -> None:
        """Sharded averages (FSDP2, ``ModelParallelStrategy``): the policy's tensors join the model's
        DTensors in ``checkpoint["state_dict"]``, which the strategy writes with
        ``torch.distributed.checkpoint`` (each rank its shards); the callback state, which only
        rank 0 writes, keeps the counters. The model entries stay the training weights (what
        resuming needs); the averages are under ``weightavg.<policy name>.averager.averages.<rule>.``.
        """
        model_sd = checkpoint.get("state_dict")
        if not isinstance(model_sd, dict) or not any_dtensor(model_sd):
            self._save_gathered(checkpoint, state)
            return
        key = self._sharded_key()
        flat = flat_tensors(key, state)
        clash = next((k for k in flat if k in model_sd), None)
        if clash is not None:
            raise ConfigError(
                f"checkpoint key {clash!r} is taken (by another averaging callback whose policy is named "
                f"{self.policy.name!r}, or by the model): give each policy its own name, e.g. EMA(..., name='ema2')")
        model_sd.update(flat)
        mine = checkpoint.get("callbacks", {}).get(self.state_key)
        if isinstance(mine, dict):
            mine["policy"] = strip_tensors(state)
            mine["sharded_in"] = key

    def _save_gathered(self, checkpoint: dict[str, Any], state: dict[str, Any]) -> None:
        """Sharded averages in a full checkpoint (``ModelParallelStrategy(save_distributed_checkpoint=
        False)``: one file, written by rank 0): every rank takes part in gathering the policy's
        tensors one at a time (``full_tensor()``), rank 0 keeps them on the CPU. On resume each rank
        copies its slice of the full tensors (no communication)."""
        rank0 = not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0

        def full(tree: Any) -> Any:
            if isinstance(tree, Tensor):
                t = tree.full_tensor() if is_dtensor(tree) else tree  # type: ignore[attr-defined]
                return t.detach().to("cpu", copy=True) if rank0 else None
            if isinstance(tree, dict):
                return {k: full(v) for k, v in tree.items()}
            return tree

        mine = checkpoint.get("callbacks", {}).get(self.state_key)
        if isinstance(mine, dict):
            mine["policy"] = full(state)
        p = self.policy
        if not p.active or not p.has_average or not self._writes_weights():
            return
        averaged = full(p.export_state_dict())  # the averaged weights, gathered like the model's
        if not rank0:
            return
        prefix = f"{self.target}." if self.target else ""
        training: dict[str, Tensor] = checkpoint["state_dict"]
        checkpoint.setdefault("current_model_state", training)
        checkpoint["state_dict"] = {k: averaged.get(k[len(prefix):], v) if k.startswith(prefix) else v
                                    for k, v in training.items()}

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        self._ckpt_path = trainer.ckpt_path
        current = checkpoint.get("current_model_state")
        if current is not None and trainer.state.fn == TrainerFn.FITTING:
            if any(is_dtensor(p) for p in pl_module.parameters()):
                # full tensors into a sharded module: each rank keeps its slice
                from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

                set_model_state_dict(pl_module, current, options=StateDictOptions(full_state_dict=True))
            else:
                pl_module.load_state_dict(current)

    def _load_sharded(self, skeleton: Any, key: str) -> None:
        """Fill the begun policy's tensors from the distributed checkpoint (in place, resharded by
        DCP), then apply the counters saved in the callback state."""
        import torch.distributed.checkpoint as dcp

        if self._ckpt_path is None:
            raise StateError("the callback state says the averages are in a distributed checkpoint, but the "
                             "trainer did not say which (trainer.ckpt_path is None)")
        live = self.policy.state_dict()
        flat = flat_tensors(key, live)
        dcp.load({"state_dict": flat}, checkpoint_id=self._ckpt_path)
        self.policy.load_state_dict(rank_fixed(with_tensors(skeleton, key, live, flat), live))

class SWA(WeightAveraging):
    """Lightning callback for :class:`weightavg.SWA` (same arguments, plus ``target``,
    ``bn_data`` and ``bn_forward_fn``).

    Examples:
        >>> cb = SWA(swa_start="1ep", swa_end="2ep", update_interval="5ba")  # doctest: +SKIP
    """

    def __init__(self, *args: Any, target: str | None = None, bn_data: Iterable[Any] | None = None,
                 bn_forward_fn: Callable[[nn.Module, Any], Any] | None = None, **kwargs: Any) -> None:
        super().__init__(_SWAPolicy(*args, **kwargs), target=target, bn_data=bn_data,
                         bn_forward_fn=bn_forward_fn)


class EMA(WeightAveraging):
    """Lightning callback for :class:`weightavg.EMA` (same arguments, plus ``target``,
    ``bn_data`` and ``bn_forward_fn``).

    Examples:
        >>> cb = EMA(half_life="50ba")  # doctest: +SKIP
    """

    def __init__(self, *args: Any, target: str | None = None, bn_data: Iterable[Any] | None = None,
                 bn_forward_fn: Callable[[nn.Module, Any], Any] | None = None, **kwargs: Any) -> None:
        super().__init__(_EMAPolicy(*args, **kwargs), target=target, bn_data=bn_data,
                         bn_forward_fn=bn_forward_fn)


class StochasticWeightAveraging(SWA):
    """Drop-in for ``lightning.pytorch.callbacks.StochasticWeightAveraging``, without its defects.

    Takes Lightning's arguments; differences: ``swa_lrs`` may be ``None`` (the learning rate is
    then left alone), your LR scheduler keeps running (the SWA rate is set before each optimizer
    step inside the SWA phase), any number of optimizers, ``max_steps`` and iterable datasets
    work, validation sees the averaged weights with fresh BatchNorm statistics, the snapshots are
    the ends of epochs ``swa_start ... last`` (no pre-SWA snapshot, the last epoch included), and
    there is no extra BatchNorm epoch (statistics are recomputed from at most ``bn_batches``
    training batches, without an optimizer step).

    Args:
        swa_lrs: the SWA learning rate: a float or one per param group (``None``: untouched).
        swa_epoch_start: int ``n`` (> 0): SWA starts at the ``n``-th epoch (0-based index
            ``n − 1``); float in (0, 1]: at epoch ``int(f · max_epochs)`` (1-based), or at
            fraction ``f`` of ``max_steps`` when training is bounded by steps only.
        annealing_epochs: epochs of the anneal to ``swa_lrs``.
        annealing_strategy: ``"cos"`` or ``"linear"``.
        avg_fn: ``avg_fn(averaged, new, num_averaged) -> Tensor`` per tensor (default: equal mean).
        device: where the average lives (default: with the module).
        **kwargs: more :class:`weightavg.SWA` options (``eval_with``, ``bn_batches``, ``target``...).

    Raises:
        ConfigError: a bad ``swa_epoch_start`` or ``annealing_epochs``, or any :class:`weightavg.SWA`
            option.

    Examples:
        The callback is built here; training with it needs a LightningModule, so that line is
        not run in the doctests.

        >>> from weightavg.lightning import StochasticWeightAveraging
        >>> cb = StochasticWeightAveraging(swa_lrs=0.05, swa_epoch_start=0.75)
        >>> trainer = lightning.Trainer(max_epochs=20, callbacks=[cb])  # doctest: +SKIP
    """

    def __init__(
        self,
        swa_lrs: float | Sequence[float] | None = None,
        swa_epoch_start: int | float = 0.8,
        annealing_epochs: int = 10,
        annealing_strategy: str = "cos",
        avg_fn: Callable[[Tensor, Tensor, Tensor], Tensor] | None = None,
        device: torch.device | str | None = None,
        **kwargs: Any,
    ) -> None:
        if isinstance(swa_epoch_start, bool) or not isinstance(swa_epoch_start, (int, float)):
            raise bad_arg("swa_epoch_start", swa_epoch_start, "an int > 0 or a float in (0, 1]")
        if isinstance(swa_epoch_start, int):
            if swa_epoch_start < 1:
                raise bad_arg("swa_epoch_start", swa_epoch_start, "an int > 0 or a float in (0, 1]")
            start: Any = Duration(swa_epoch_start - 1, "ep")
        else:
            if not 0.0 < swa_epoch_start <= 1.0:
                raise bad_arg("swa_epoch_start", swa_epoch_start, "an int > 0 or a float in (0, 1]")
            start = Duration(swa_epoch_start, "dur")  # settled against max_epochs at fit start
        if isinstance(annealing_epochs, bool) or not isinstance(annealing_epochs, int) or annealing_epochs < 0:
            raise bad_arg("annealing_epochs", annealing_epochs, "a non-negative int")
        self.swa_epoch_start = swa_epoch_start
        super().__init__(swa_start=start, swa_lr=swa_lrs, anneal_steps=Duration(annealing_epochs, "ep"),
                         anneal_strategy=annealing_strategy, avg_fn=avg_fn, device=device, **kwargs)

    def _configure(self, trainer: pl.Trainer) -> None:
        f = self.swa_epoch_start
        if isinstance(f, float) and trainer.max_epochs is not None and trainer.max_epochs > 0:
            # Lightning's rule: the int(f * max_epochs)-th epoch (1-based)
            self.policy.window_start = Duration(max(int(trainer.max_epochs * f) - 1, 0), "ep")


def _training_step_forward(module: nn.Module, batch: Any) -> Any:
    """BatchNorm forward through ``training_step`` (no gradient; ``log`` and ``log_dict`` muted)."""
    assert isinstance(module, pl.LightningModule)

    def mute(*args: Any, **kwargs: Any) -> None:
        return None

    module.log = mute  # type: ignore[method-assign]
    module.log_dict = mute  # type: ignore[method-assign]
    try:
        with torch.no_grad():
            return module.training_step(batch, 0)
    finally:
        del module.log
        del module.log_dict
