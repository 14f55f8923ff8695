"""Hugging Face ``Trainer`` front end for weight averaging: a callback plus a small Trainer mixin.

Import this module explicitly (``import weightavg.transformers``); ``import weightavg`` never loads
transformers. Every decision is taken by the policy (:class:`weightavg.SWA`, :class:`weightavg.EMA`);
the callback only turns the trainer's events into policy calls, and the mixin does what a callback
cannot (swap weights around evaluation and saving, read and write checkpoint folders):

* train start -> ``policy.begin(model, optimizer, total_steps=max_steps, steps_per_epoch=...,
  bn_data=...)``. The policy hooks the real torch optimizer (under accelerate's
  ``AcceleratedOptimizer``), so an update follows each optimizer step: one per
  ``gradient_accumulation_steps`` micro-batches, none for a step skipped by AMP's GradScaler;
* end of an epoch -> ``policy.on_epoch_end()`` (before the epoch's evaluation and save); a pass
  that ``max_steps`` or a callback stops mid-epoch is not an epoch end;
* ``evaluate()`` -> inside ``policy.averaged()`` (BatchNorm statistics recomputed from at most
  ``bn_batches`` training batches when stale), with the training weights, or both
  (``eval_with="both"``: averaged metrics under ``eval_<name>_``, e.g. ``eval_swa_loss``);
* ``save_model()`` and checkpoints -> the saved model (``save_pretrained``) holds the averaged
  weights; each checkpoint folder also gets ``weightavg_state.pt`` (policy counters, averages and,
  when the model files hold averaged weights, the training weights), written atomically;
* ``train(resume_from_checkpoint=...)`` -> training weights and policy state restored: the run
  ends with the same averages as an uninterrupted one;
* train end -> ``policy.end()``: final BatchNorm refresh, the model holds the averaged weights
  (``final="averaged"``), so ``trainer.save_model()`` writes them.

Examples:
    >>> from transformers import TrainingArguments
    >>> from weightavg.transformers import SWA, WeightAveragingTrainer
    >>> trainer = WeightAveragingTrainer(
    ...     model=model, args=TrainingArguments("out", max_steps=1000), train_dataset=train,
    ...     eval_dataset=val, callbacks=[SWA(swa_start="0.75dur", update_interval="10ba")],
    ... )  # doctest: +SKIP
    >>> trainer.train()  # doctest: +SKIP
    >>> trainer.save_model("swa-model")  # averaged weights  # doctest: +SKIP

To use another Trainer class (``Seq2SeqTrainer``, TRL's trainers...), mix
:class:`WeightAveragingMixin` in first: ``class MyTrainer(WeightAveragingMixin, Seq2SeqTrainer)``.
FSDP2 (``fsdp_config={"version": 2}``, accelerate's ``fully_shard``) and DeepSpeed ZeRO stages 0-2 are
supported: each rank averages its own shards, and checkpoints keep them in ``weightavg_dcp/``
(``torch.distributed.checkpoint``, written by every rank). FSDP1 and DeepSpeed ZeRO-3 are refused
with a :class:`~weightavg.ConfigError`.
"""

from __future__ import annotations

import contextlib
import math
import os
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, IterableDataset, RandomSampler

try:
    from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments
except ModuleNotFoundError as _err:  # name the extra, not just the missing module
    if (_err.name or "").split(".")[0] not in ("transformers", "accelerate"):
        raise
    raise ModuleNotFoundError(
        f"weightavg.transformers needs Hugging Face transformers and accelerate ({_err.name} is not "
        "installed): pip install 'weightavg[transformers]'", name=_err.name) from None

from ._errors import ConfigError, StateError, bad_arg
from ._files import atomic_output, load_torch_untrusted
from ._frontend_state import any_dtensor, flat_tensors, rank_fixed, strip_tensors, with_tensors
from ._policy import EMA as _EMAPolicy
from ._policy import SWA as _SWAPolicy
from ._policy import AveragingPolicy

if TYPE_CHECKING:
    _TrainerBase = Trainer
else:
    _TrainerBase = object

__all__ = ["EMA", "STATE_NAME", "SWA", "WeightAveraging", "WeightAveragingMixin", "WeightAveragingTrainer"]

STATE_NAME = "weightavg_state.pt"
"""File name of the weight-averaging state inside a Trainer checkpoint folder."""

SHARDED_NAME = "weightavg_dcp"
"""Folder of a sharded (FSDP2) run's averages inside a Trainer checkpoint folder (a
``torch.distributed.checkpoint`` directory; keys ``<policy name>.averager.averages.<rule>.<name>``)."""

FORMAT = "weightavg.transformers"
FORMAT_VERSION = 1
_CHECKPOINT_PREFIX = "checkpoint"  # transformers.trainer_utils.PREFIX_CHECKPOINT_DIR


def _writes_weights(policy: AveragingPolicy) -> bool:
    """Whether the policy puts averaged weights into the model (evaluation or end)."""
    return policy.eval_with != "training" or policy.final == "averaged"


def _active(policy: AveragingPolicy) -> bool:
    """Begun, not ended, and holding at least one snapshot."""
    return policy.active and policy.has_average


class _BNBatches:
    """Training batches for BatchNorm recomputation, in a fixed order on every pass.

    A fresh plain DataLoader over the trainer's training set each time (never the prepared
    training loader, whose iteration state belongs to the training loop), shuffled with a
    generator seeded by ``args.seed``: every recomputation, in an interrupted run or not, reads the
    same batches.
    """

    def __init__(self, trainer: Trainer) -> None:
        self._trainer = weakref.ref(trainer)
        self._cache: tuple[Any, Callable[[Any], Any]] | None = None

    def _dataset_and_collator(self, trainer: Trainer) -> tuple[Any, Callable[[Any], Any]]:
        if self._cache is None:
            dataset, collator = trainer.train_dataset, trainer.data_collator
            try:  # the Trainer's own column removal (private API: tolerate its absence)
                import datasets

                if isinstance(dataset, datasets.Dataset):
                    dataset = trainer._remove_unused_columns(dataset, description="BatchNorm")
                else:
                    collator = trainer._get_collator_with_removed_columns(collator, description="BatchNorm")
            except (ImportError, AttributeError):
                with contextlib.suppress(AttributeError):
                    collator = trainer._get_collator_with_removed_columns(collator, description="BatchNorm")
            self._cache = (dataset, collator)
        return self._cache

    def __iter__(self) -> Iterator[Any]:
        trainer = self._trainer()
        if trainer is None or trainer.train_dataset is None:
            return iter(())
        dataset, collator = self._dataset_and_collator(trainer)
        batch_size = trainer.args.per_device_train_batch_size
        if isinstance(dataset, IterableDataset):
            return iter(DataLoader(dataset, batch_size=batch_size, collate_fn=collator))
        sampler = RandomSampler(dataset, generator=torch.Generator().manual_seed(trainer.args.seed))
        drop_last = len(dataset) > batch_size  # a batch of one breaks BatchNorm in train mode
        return iter(DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=collator,
                               drop_last=drop_last))


class WeightAveraging(TrainerCallback):
    """A Trainer callback driving one averaging policy; needs :class:`WeightAveragingTrainer`
    (or :class:`WeightAveragingMixin`) to evaluate, save and resume with the averages.

    Args:
        policy: a :class:`weightavg.SWA`, :class:`weightavg.EMA` or other
            :class:`weightavg.AveragingPolicy`; its options choose what evaluation sees
            (``eval_with``), what the model holds at the end (``final``), BatchNorm refreshes...
            Its ``name`` keys its state in checkpoints and names the metrics of the averaged
            weights (``eval_<name>_loss``); give several policies different names.
        bn_data: batches for BatchNorm recomputation (default: the training set, shuffled with
            ``args.seed``, collated like training batches, moved to ``args.device``).
        bn_forward_fn: ``fn(model, batch)`` running one batch (default: ``model(**batch)`` for
            dicts, ``model(batch[0])`` for tuples).

    To choose when to update, override ``should_update(step_idx=None, epoch_idx=None)`` here or on
    the policy.

    Raises:
        ConfigError: ``policy`` is not a weightavg policy, or ``bn_forward_fn`` not callable.

    Examples:
        The callback is built here; the Trainer lines need a model and a dataset, so they are not
        run in the doctests (the Hugging Face guide runs a whole example).

        >>> import weightavg
        >>> from weightavg.transformers import WeightAveraging
        >>> cb = WeightAveraging(weightavg.EMA(half_life="100ba", name="ema"))
        >>> cb.policy.name
        'ema'
        >>> trainer = WeightAveragingTrainer(model=model, args=args, train_dataset=ds,  # doctest: +SKIP
        ...                                  callbacks=[cb])
    """

    def __init__(
        self,
        policy: AveragingPolicy,
        *,
        bn_data: Iterable[Any] | None = None,
        bn_forward_fn: Callable[[nn.Module, Any], Any] | None = None,
    ) -> None:
        if not isinstance(policy, AveragingPolicy):
            raise bad_arg("policy", type(policy).__name__, "a weightavg policy such as weightavg.SWA(...)")
        if bn_forward_fn is not None and not callable(bn_forward_fn):
            raise bad_arg("bn_forward_fn", bn_forward_fn, "a callable fn(model, batch) or None")
        self.policy = policy
        self._bn_data = bn_data
        self._bn_forward_fn = bn_forward_fn
        self._initial_state = policy.state_dict()  # what a new train() without resume starts from
        self._trainer: weakref.ref[Trainer] | None = None
        self._resumed = False  # the policy state came from a checkpoint in this train() call
        self._epoch_mark = 0
        self._sharded_pending: tuple[Mapping[str, Any], str] | None = None  # (counters, DCP folder)
        if type(self).should_update is not WeightAveraging.should_update:
            policy.should_update = self.should_update  # type: ignore[method-assign]

    def should_update(self, step_idx: int | None = None, epoch_idx: int | None = None) -> bool:
        """Whether to update after step ``step_idx`` / epoch ``epoch_idx`` (default: the policy's).

        Returns:
            True when the policy's schedule updates the average at that point; always False
            before training begins (the schedule is resolved against the run's length then).

        Examples:
            >>> from weightavg.transformers import EMA
            >>> EMA(half_life="100ba").should_update(step_idx=1)  # not begun yet
            False
        """
        return type(self.policy).should_update(self.policy, step_idx=step_idx, epoch_idx=epoch_idx)

    @property
    def key(self) -> str:
        """The policy's key in ``weightavg_state.pt``."""
        return self.policy.name

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.policy!r})"

    # ------------------------------------------------------------------ set by the trainer mixin

    def _attach(self, trainer: Trainer) -> None:
        self._trainer = weakref.ref(trainer)
        self._resumed = False
        self._sharded_pending = None
        self.policy.detach()
        self.policy.load_state_dict(self._initial_state)  # a new run starts from scratch

    def _detach(self) -> None:
        self._trainer = None
        self.policy.detach()

    def _load(self, state: Mapping[str, Any]) -> None:
        self.policy.load_state_dict(state)
        self._resumed = True

    def _load_sharded_later(self, counters: Mapping[str, Any], folder: str) -> None:
        """The policy's tensors are in the DCP folder: loaded at train begin, once the policy has
        begun (its averager then has the model's sharding, and ``dcp.load`` reshards into it)."""
        self._sharded_pending = (counters, folder)
        self._resumed = True

    def _load_sharded(self) -> None:
        import torch.distributed.checkpoint as dcp

        assert self._sharded_pending is not None
        counters, folder = self._sharded_pending
        self._sharded_pending = None
        live = self.policy.state_dict()
        flat = flat_tensors(self.key, live)
        dcp.load(flat, checkpoint_id=folder)  # in place, each rank its shards (every rank calls it)
        self.policy.load_state_dict(rank_fixed(with_tensors(counters, self.key, live, flat), live))

    # ------------------------------------------------------------------ events

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       **kwargs: Any) -> None:
        trainer = self._trainer() if self._trainer is not None else None
        if trainer is None:
            raise ConfigError(
                f"{type(self).__name__} needs a trainer that evaluates, saves and resumes with the averaged "
                "weights: use weightavg.transformers.WeightAveragingTrainer, or mix "
                "weightavg.transformers.WeightAveragingMixin into your Trainer class "
                "(class MyTrainer(WeightAveragingMixin, Trainer))")
        if state.global_step > 0 and not self._resumed:
            raise StateError(f"training resumes at step {state.global_step} but the policy "
                             f"{self.policy.name!r} got no state from the checkpoint")
        model = kwargs.get("model")
        model = trainer.model if model is None else model
        optimizer = kwargs.get("optimizer")
        optimizer = trainer.optimizer if optimizer is None else optimizer
        if not isinstance(model, nn.Module):
            raise bad_arg("model", type(model).__name__, "the Trainer's torch.nn.Module")
        loader = kwargs.get("train_dataloader")
        gas = args.gradient_accumulation_steps
        steps_per_epoch: int | None = None
        with contextlib.suppress(TypeError):
            if loader is not None and len(loader) > 0:
                steps_per_epoch = max(math.ceil(len(loader) / gas), 1)  # as Trainer counts them
        total_steps = state.max_steps if state.max_steps and state.max_steps > 0 else None
        batch = getattr(trainer, "_train_batch_size", None) or args.per_device_train_batch_size
        self.policy.begin(
            model, optimizer,
            total_steps=total_steps, steps_per_epoch=steps_per_epoch,
            samples_per_step=int(batch * gas * max(args.world_size, 1)),
            bn_data=self._bn_data if self._bn_data is not None else _BNBatches(trainer),
            bn_forward_fn=self._bn_forward_fn, bn_device=args.device,
        )
        if self._sharded_pending is not None:
            self._load_sharded()
        if self._resumed and steps_per_epoch is not None:
            # A checkpoint saved at an epoch's last step precedes that epoch's end event, and the
            # resumed Trainer starts the next epoch directly: deliver the event now.
            while self.policy.epochs < state.global_step // steps_per_epoch:
                self.policy.on_epoch_end()
        self._epoch_mark = state.global_step  # global_step at the last epoch end (or the start)

    def on_epoch_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                     **kwargs: Any) -> None:
        p = self.policy
        if not p.active or state.global_step <= self._epoch_mark:
            return  # not training, or a pass without a single step
        epoch = float(state.epoch or 0.0)
        complete = abs(epoch - round(epoch)) < 1e-9  # the pass reached the end of the data
        # a pass cut short by max_steps or a callback's stop is not an epoch end: a checkpoint
        # written after it (save_strategy="epoch") must resume exactly, and the resumed Trainer
        # finishes that epoch; an iterable dataset that ran out is one (its epoch is fractional)
        if complete or not control.should_training_stop:
            self._epoch_mark = state.global_step
            p.on_epoch_end()

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                     **kwargs: Any) -> None:
        if self.policy.active:
            self.policy.end()


class SWA(WeightAveraging):
    """Trainer callback for :class:`weightavg.SWA` (same arguments, plus ``bn_data`` and
    ``bn_forward_fn``).

    Examples:
        >>> cb = SWA(swa_start="0.75dur", update_interval="10ba")  # doctest: +SKIP
    """

    def __init__(self, *args: Any, bn_data: Iterable[Any] | None = None,
                 bn_forward_fn: Callable[[nn.Module, Any], Any] | None = None, **kwargs: Any) -> None:
        super().__init__(_SWAPolicy(*args, **kwargs), bn_data=bn_data, bn_forward_fn=bn_forward_fn)


class EMA(WeightAveraging):
    """Trainer callback for :class:`weightavg.EMA` (same arguments, plus ``bn_data`` and
    ``bn_forward_fn``).

    Examples:
        >>> cb = EMA(half_life="200ba")  # doctest: +SKIP
    """

    def __init__(self, *args: Any, bn_data: Iterable[Any] | None = None,
                 bn_forward_fn: Callable[[nn.Module, Any], Any] | None = None, **kwargs: Any) -> None:
        super().__init__(_EMAPolicy(*args, **kwargs), bn_data=bn_data, bn_forward_fn=bn_forward_fn)


class WeightAveragingMixin(_TrainerBase):
    """Trainer mixin: evaluation, saving and resuming with the :class:`WeightAveraging` callbacks.

    Put it first among the bases: ``class MyTrainer(WeightAveragingMixin, Seq2SeqTrainer)``.
    It overrides ``train`` (attach the callbacks, reset or restore their policies),
    ``evaluate`` (averaged weights, training weights or both), ``_save`` (the saved model holds
    the averaged weights while training), ``_save_checkpoint`` (writes ``weightavg_state.pt``) and
    ``_load_from_checkpoint`` (restores the training weights and the policies).

    Examples:
        The mixin combines with any Trainer subclass; building one needs a model, training
        arguments and a dataset, so only the class line runs here:

        >>> import transformers
        >>> from weightavg.transformers import WeightAveragingMixin
        >>> class MyTrainer(WeightAveragingMixin, transformers.Seq2SeqTrainer):
        ...     pass
        >>> trainer = MyTrainer(model=model, args=args, train_dataset=ds)  # doctest: +SKIP
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._wa_saved_averaged = False
        self._wa_saving = False  # inside save_model's averaged() (every rank entered it)
        self._wa_check()

    # ------------------------------------------------------------------ callbacks & checks

    def _wa_callbacks(self) -> list[WeightAveraging]:
        return [cb for cb in self.callback_handler.callbacks if isinstance(cb, WeightAveraging)]

    def _wa_check(self) -> None:
        """Configuration errors, at construction and again at train start."""
        cbs = self._wa_callbacks()
        if not cbs:
            return
        seen: dict[str, WeightAveraging] = {}
        for cb in cbs:
            if cb.key in seen:
                same = seen[cb.key].policy is cb.policy
                raise bad_arg("name", cb.key, "a policy given to one callback only" if same else
                              "a name per policy: several weight-averaging callbacks share it "
                              "(e.g. EMA(..., name='ema_fast'))")
            seen[cb.key] = cb
        self._wa_check_sharding()
        writers = [cb.policy for cb in cbs if _writes_weights(cb.policy)]
        if self.args.load_best_model_at_end and any(p.final == "averaged" for p in writers):
            raise bad_arg("final", "averaged",
                          "'training' with load_best_model_at_end=True: the final averaged weights would "
                          "replace the best checkpoint's weights (which hold the averaged weights of that "
                          "step when eval_with is not 'training')")

    def _wa_check_sharding(self) -> None:
        """FSDP2 and DeepSpeed ZeRO 0-2 are averaged; FSDP1 and ZeRO-3 are refused."""
        state = getattr(getattr(self, "accelerator", None), "state", None)
        if getattr(self, "is_fsdp_enabled", False):
            version = getattr(getattr(state, "fsdp_plugin", None), "fsdp_version", 1)
            if version != 2:
                raise ConfigError(
                    f"weightavg.transformers averages FSDP2 models, but this Trainer uses FSDP{version} "
                    "(FullyShardedDataParallel, whose flat parameter shards cannot be averaged): set "
                    "fsdp_config={'version': 2} (accelerate's fully_shard; needs accelerate >= 1.6)")
        if getattr(self, "is_deepspeed_enabled", False):
            plugin = getattr(state, "deepspeed_plugin", None)
            stage = getattr(plugin, "zero_stage", None)
            if stage is None:
                config = getattr(getattr(self.args, "hf_deepspeed_config", None), "config", None) or {}
                stage = config.get("zero_optimization", {}).get("stage")
            if stage == 3:
                raise ConfigError(
                    "weightavg.transformers cannot average DeepSpeed ZeRO stage 3 (each rank holds opaque "
                    "partitions of the parameters): use ZeRO stage 1 or 2 (full parameters on every rank), "
                    "or FSDP2 (fsdp_config={'version': 2})")

    def _wa_writer(self) -> AveragingPolicy | None:
        """The policy whose averaged weights the model shows now (evaluation, saving), if any."""
        for cb in self._wa_callbacks():
            if _writes_weights(cb.policy) and _active(cb.policy):
                return cb.policy
        return None

    # ------------------------------------------------------------------ training

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any) -> Any:
        """``Trainer.train``, with the weight-averaging callbacks attached (see the class)."""
        self._wa_check()
        cbs = self._wa_callbacks()
        for cb in cbs:
            cb._attach(self)
        if cbs and resume_from_checkpoint and getattr(self, "is_deepspeed_enabled", False):
            # the Trainer resumes DeepSpeed through its engine, never through _load_from_checkpoint
            folder = resume_from_checkpoint
            if folder is True:
                from transformers.trainer_utils import get_last_checkpoint

                folder = get_last_checkpoint(self.args.output_dir)
            if isinstance(folder, str):
                self._wa_load_state(folder, None)
        try:
            return super().train(resume_from_checkpoint, *args, **kwargs)
        finally:
            for cb in cbs:
                cb._detach()

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        self._wa_load_state(resume_from_checkpoint, model)

    def _wa_load_state(self, resume_from_checkpoint: str, model: nn.Module | None) -> None:
        """Read ``weightavg_state.pt`` (and, for a sharded run, schedule ``weightavg_dcp/``)."""
        cbs = self._wa_callbacks()
        if not cbs:
            return
        path = os.path.join(resume_from_checkpoint, STATE_NAME)
        if not os.path.isfile(path):
            raise StateError(
                f"checkpoint {resume_from_checkpoint!r} has no {STATE_NAME}: it was not written with "
                "weight averaging, so the averages cannot continue exactly. To start averaging afresh "
                "from its weights, load them into the model and call train() without resume_from_checkpoint")
        state = load_torch_untrusted(Path(path))  # weights_only, the torch floor, one-line errors
        if not isinstance(state, Mapping) or state.get("format") != FORMAT:
            raise StateError(f"{path} is not a weightavg.transformers state (missing 'format' key)")
        version = state.get("format_version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise StateError(f"{path} has format_version={version!r}; this weightavg reads <= {FORMAT_VERSION}")
        policies = state["policies"]
        missing = [cb.key for cb in cbs if cb.key not in policies]
        if missing:
            raise StateError(f"{path} holds the policies {sorted(policies)}, not {missing}: "
                             "policy names must match those of the run that saved the checkpoint")
        training = state.get("training_weights")
        if training is not None:  # the model files hold averaged weights: put the training ones back
            target = model if model is not None else self.model
            if target is None:
                raise StateError("the trainer has no model to load the training weights into")
            target.load_state_dict(training)
        if state.get("sharded"):
            folder = os.path.join(resume_from_checkpoint, SHARDED_NAME)
            if not os.path.isfile(os.path.join(folder, ".metadata")):
                raise StateError(f"{path} says the averages are sharded in {folder}, which is missing or incomplete")
            for cb in cbs:
                cb._load_sharded_later(policies[cb.key], folder)
            return
        for cb in cbs:
            cb._load(policies[cb.key])

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """``Trainer.save_model`` with the averaged weights in the model while training.

        Every rank calls ``save_model`` (checkpoints included) while only the saving rank calls
        ``_save``: the averaged weights are swapped in here, where BatchNorm statistics may be
        pooled across ranks (a collective every rank joins); ``_save`` then writes what is in
        the model and runs no collective.
        """
        policy = self._wa_writer()
        if policy is None or self._wa_saving:
            super().save_model(output_dir, _internal_call)
            return
        with policy.averaged():
            self._wa_saving = True
            try:
                super().save_model(output_dir, _internal_call)
            finally:
                self._wa_saving = False

    def _save(self, output_dir: str | None = None, state_dict: dict[str, Tensor] | None = None) -> None:
        if self._wa_saving:  # save_model swapped the averaged weights in on every rank
            super()._save(output_dir, state_dict)
            self._wa_saved_averaged = state_dict is None
            return
        policy = self._wa_writer() if state_dict is None else None
        if policy is None:
            self._wa_saved_averaged = False
            super()._save(output_dir, state_dict)
            return
        # called outside save_model, possibly on one rank only: no collective (the statistics of
        # the last collective evaluation/save if no update happened since, else this rank's own)
        with policy.averaged(collective=False):
            super()._save(output_dir, state_dict)
        self._wa_saved_averaged = True

    def _save_checkpoint(self, model: nn.Module, trial: Any, *args: Any, **kwargs: Any) -> None:
        self._wa_saved_averaged = False
        super()._save_checkpoint(model, trial, *args, **kwargs)  # 4.x passes metrics= too
        cbs = self._wa_callbacks()
        if not cbs or self.model is None:
            return
        folder = os.path.join(self._get_output_dir(trial=trial), f"{_CHECKPOINT_PREFIX}-{self.state.global_step}")
        policies = {cb.key: cb.policy.state_dict() for cb in cbs}
        sharded = any_dtensor(policies)
        if sharded:  # every rank writes its shards (this method runs on every rank)
            self._wa_save_sharded(folder, policies)
            policies = {k: strip_tensors(v) for k, v in policies.items()}
        if not self.args.should_save:
            return
        state: dict[str, Any] = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "global_step": self.state.global_step,
            "policies": policies,
            "sharded": sharded,
            # under FSDP the Trainer's own model files (save_fsdp_model, outside the swap) hold the
            # training weights; the swapped-in full save does not replace them
            "training_weights": ({k: v.detach() for k, v in self.model.state_dict().items()}
                                 if self._wa_saved_averaged and not getattr(self, "is_fsdp_enabled", False)
                                 else None),
        }
        _atomic_save(state, os.path.join(folder, STATE_NAME))

    def _wa_save_sharded(self, folder: str, policies: dict[str, Any]) -> None:
        """The policies' tensors (DTensors: each rank its shards) into ``<folder>/weightavg_dcp`` with
        ``torch.distributed.checkpoint``, written beside and renamed into place by the saving
        process once complete (``weightavg_state.pt``, written after, marks the checkpoint whole)."""
        import shutil

        import torch.distributed as dist
        import torch.distributed.checkpoint as dcp

        final = os.path.join(folder, SHARDED_NAME)
        tmp = final + ".tmp"
        main = self.args.should_save
        if main and os.path.lexists(tmp):
            shutil.rmtree(tmp)
        dist.barrier()  # nobody writes into a stale folder being removed
        flat: dict[str, Tensor] = {}
        for key, st in policies.items():
            flat.update(flat_tensors(key, st))
        dcp.save(flat, checkpoint_id=tmp)  # returns once the metadata is written
        if main:
            old = final + ".old"
            if os.path.lexists(final):
                os.replace(final, old)
            os.replace(tmp, final)
            if os.path.lexists(old):
                shutil.rmtree(old)

    # ------------------------------------------------------------------ evaluation

    def evaluate(self, eval_dataset: Any = None, ignore_keys: list[str] | None = None,
                 metric_key_prefix: str = "eval", **kwargs: Any) -> dict[str, float]:
        """``Trainer.evaluate`` with what the policy's ``eval_with`` chooses, while training.

        ``"averaged"``: the averaged weights, metrics under their usual names. ``"both"``: first
        the averaged weights (metrics ``<prefix>_<name>_*``, e.g. ``eval_swa_loss``, logged but
        not passed to ``on_evaluate`` alone), then the training weights; the returned metrics
        and ``on_evaluate`` hold both sets. Before the first snapshot the averaged model is the
        training model: it is evaluated once, and its metrics come under both names (so that
        ``metric_for_best_model="eval_swa_loss"`` works from the first evaluation). Outside
        training the model is evaluated as it is.
        """
        policy = next((cb.policy for cb in self._wa_callbacks()
                       if cb.policy.eval_with != "training" and cb.policy.active), None)
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        if policy is None or isinstance(dataset, dict):  # dicts come back here one dataset at a time
            return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix, **kwargs)
        if policy.eval_with == "averaged":
            with policy.averaged():
                return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix, **kwargs)
        handler = self.callback_handler
        original = handler.on_evaluate
        if not policy.has_average:
            # no average yet: the averaged model is the training model, so its metrics are the
            # training model's (one pass), under both names from the first evaluation on
            head, named = f"{metric_key_prefix}_", f"{metric_key_prefix}_{policy.name}_"

            def copied(args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       metrics: dict[str, float], **kw: Any) -> TrainerControl:
                twins = {named + k[len(head):]: v for k, v in metrics.items() if k.startswith(head)}
                metrics.update(twins)
                self.log(twins)
                return original(args, state, control, metrics, **kw)

            with _replaced(handler, "on_evaluate", copied):
                return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix, **kwargs)

        def silent(args: TrainingArguments, state: TrainerState, control: TrainerControl,
                   metrics: dict[str, float], **kw: Any) -> TrainerControl:
            return control

        with _replaced(handler, "on_evaluate", silent), policy.averaged():
            averaged = super().evaluate(eval_dataset, ignore_keys, f"{metric_key_prefix}_{policy.name}", **kwargs)

        def merged(args: TrainingArguments, state: TrainerState, control: TrainerControl,
                   metrics: dict[str, float], **kw: Any) -> TrainerControl:
            metrics.update(averaged)
            return original(args, state, control, metrics, **kw)

        with _replaced(handler, "on_evaluate", merged):
            metrics = super().evaluate(eval_dataset, ignore_keys, metric_key_prefix, **kwargs)
        metrics.update(averaged)
        return metrics


class WeightAveragingTrainer(WeightAveragingMixin, Trainer):
    """``transformers.Trainer`` with :class:`WeightAveragingMixin`: pass the :class:`SWA` /
    :class:`EMA` callbacks in ``callbacks=[...]``.

    Examples:
        Not run in the doctests: it needs a model, training arguments and a dataset (the Hugging
        Face guide runs a whole example).

        >>> from weightavg.transformers import EMA, WeightAveragingTrainer
        >>> trainer = WeightAveragingTrainer(model=model, args=args, train_dataset=ds,  # doctest: +SKIP
        ...                                  callbacks=[EMA(half_life="100ba")])
        >>> trainer.train()  # doctest: +SKIP
    """


@contextlib.contextmanager
def _replaced(obj: Any, name: str, value: Any) -> Iterator[None]:
    """Set an instance attribute for the duration of the block, then put back what was there."""
    missing = object()
    before = obj.__dict__.get(name, missing)
    setattr(obj, name, value)
    try:
        yield
    finally:
        if before is missing:
            delattr(obj, name)
        else:
            setattr(obj, name, before)


def _atomic_save(obj: Any, path: str) -> None:
    """``torch.save`` through the shared atomic writer (a temporary sibling, fsync, one rename;
    permissions follow the umask, as for the Trainer's own files)."""
    with atomic_output(Path(path), force=True) as tmp:
        torch.save(obj, tmp)
