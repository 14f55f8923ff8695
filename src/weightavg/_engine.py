"""The averaging engine: named averaged copies of a model's tensors, and their counters.

Everything that keeps an average in weightavg (SWA, EMA, SWAG moments, the trainer callbacks, the
``swa_utils`` drop-in, the checkpoint averager) is a thin layer over :class:`Averager`.

The engine is split along its seams:

- :mod:`weightavg._names`: canonical names of a source's tensors (wrappers looked through).
- :mod:`weightavg._storage`: what is tracked and where it lives (:class:`~weightavg._storage.FlatStorage`:
  selection, groups, flat buffers per rule; :func:`make_contiguous`).
- :mod:`weightavg._binding`: a source bound to the storage (:class:`~weightavg._binding.Binder`:
  pairing by name, caching, storage-change detection).
- :mod:`weightavg._executor`: how an update runs (:class:`~weightavg._executor.LocalExecutor`:
  check on the host, plans, per-group arithmetic; :func:`~weightavg._executor.make_executor` chooses).
- :mod:`weightavg._deferred`: the sibling executor whose non-finite check stays on the device
  (masked updates, device counters, refusals reported when the Averager settles before a read).
- :mod:`weightavg._exchange`: putting an average into a live model and back (in-place exchange).
- :mod:`weightavg._sharded`: the siblings for models with DTensor parameters (FSDP2, HSDP, tensor
  parallel): storage of the local shards, binding of ``to_local()`` views, a check agreed by all ranks.
- here: :class:`Averager`, which owns the rules, the counters and the state, and reads the averages
  (swap, copy, export, all-reduce, checkpoints).

Layout (why it is fast):
    Tracked tensors are grouped by (source device, source dtype). Each group's averages live in
    one flat buffer per rule (``storage[rule][group]``, float32 by default); each tracked tensor is a
    view into it. Small tensors (< 8Ki elements) are stored first and updated *packed*: one
    ``torch.cat`` gathers them into a bounded scratch buffer (≤ 1Mi elements, allocated once) and one
    ``lerp_`` per rule updates the whole run. Big tensors of the average's own dtype are updated with
    one ``torch._foreach_lerp_`` per rule; others stream through the scratch in chunks. Packed runs
    are gathered and applied 64Ki elements at a time, so each run is still in L2 when it is used. An update
    therefore costs a handful of kernel launches per group, whatever the number of tensors, never
    allocates a temporary the size of the model, and reads every source tensor once (twice with the
    non-finite check, which must read the whole model before anything is written).

    The first update from a model collects its tensors once (a binding) and flattens the work into a
    plan: a list of ``cat``/``lerp_`` calls on prebuilt views, so that later updates run no Python
    over groups, chunks or entries (with the cache cold after a training step, that Python cost as
    much as the arithmetic on a 1M-parameter model).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ._binding import Binder, _Binding, is_stale
from ._errors import ConfigError, MismatchError, NonFiniteError, StateError, bad_arg, describe_mismatch
from ._exchange import Swap
from ._executor import CheckMode, NonFinitePolicy, make_executor
from ._names import Source, canonical_name, named_tensors, source_tensors, state_dict_names, tied_names, unwrap_model
from ._rules import Rule, UpdateInfo, WeightFn, weight_fns
from ._sharded import ShardedBinder, ShardedStorage, has_dtensor, refuse_sharded
from ._storage import BufferPolicy, FlatStorage, make_contiguous

__all__ = ["Averager", "canonical_name", "make_contiguous", "named_tensors", "unwrap_model"]

FORMAT_VERSION = 1


#: the same C function as ``torch.is_inference_mode_enabled``, without the lookup in torch's namespace
_inference_mode_enabled = torch.is_inference_mode_enabled
#: what ``update`` passes to an executor that reads no UpdateInfo (never a real one: all fields -1)
_UNREAD_INFO = UpdateInfo(-1, -1, -1)


class Averager:
    """Averaged copies of a model's tensors, updated with one or several rules.

    Args:
        model: the module (or a mapping name -> tensor) whose tensors are averaged. Wrappers
            (DDP, DataParallel, ``torch.compile``) are looked through; names are canonical.
        rule: a :class:`Rule` (``weightavg.mean()``, ``weightavg.ema(...)``...) or a mapping
            name -> rule to keep several averages updated in one pass (e.g. SWA and two EMAs).
        params: ``"all"`` floating-point parameters (default) or ``"trainable"`` ones only.
        include: glob pattern(s) on canonical names; only matching tensors are tracked.
        exclude: glob pattern(s) on canonical names that are not tracked.
        buffers: policy for floating-point persistent buffers: ``"average"`` (default), ``"copy"``
            (keep the latest value) or ``"ignore"``. Integer/bool buffers (e.g. BatchNorm's
            ``num_batches_tracked``) are always copied, never averaged, unless ignored.
            Copied tensors of a module follow the model last updated from: they are read when
            the average is read (swap, export, state_dict), not on every update.
            Non-persistent buffers are never touched.
        dtype: dtype of the averages (default float32, whatever the model's dtype: a bf16 model
            gets a float32 average that keeps moving). ``None`` keeps each tensor's own dtype.
        device: where the averages live (default: with each source tensor); e.g. ``"cpu"``.
        nonfinite: what an update whose source holds NaN/Inf does: ``"raise"`` (default, the
            update is refused with :class:`NonFiniteError`), ``"skip"`` (refused and counted in
            ``num_skipped``) or ``"allow"`` (no check). The check reads the source once more.
        check: where the non-finite check is decided: ``"host"`` (each update reads one number
            from the device and refuses at once, naming the tensors), ``"deferred"`` (the flag
            stays on the device: the update is applied masked, rules' counters advance on the
            device, and refusals are reported at the next read of the averager: ``num_updates``,
            ``num_skipped``, ``state_dict``, ``swapped_in``, exports, ``summary`` or :meth:`settle`),
            or ``"auto"`` (default: deferred when everything lives on one CUDA device and every
            rule is a built-in one, host otherwise). Averages on the host of a model on an
            accelerator (``device="cpu"``) are updated beside training unless ``check="host"``:
            ``update()`` queues a copy of the sources into a pinned host buffer and returns, a
            worker thread folds it in, and the next update or read waits for it (refusals are
            reported at that read, as with ``"deferred"``; every rule works).
            On a sharded model the check also all-reduces one flag over the world (every rank must
            update together), so that every rank refuses or skips alike; the deferred check
            all-reduces the device flag without a host read, the host check reads it.

    A model whose parameters are DTensors (FSDP2 ``fully_shard``, HSDP, tensor parallel) is
    averaged shard by shard: each rank stores and updates its local elements only, with no
    communication, and reads return DTensors (see :mod:`weightavg._sharded`).

    Examples:
        >>> import torch, weightavg
        >>> model = torch.nn.Linear(3, 1)
        >>> avg = weightavg.Averager(model, rule=weightavg.ema(decay=0.9))
        >>> avg.update(model)
        True
        >>> with torch.no_grad():
        ...     _ = model.weight.add_(1.0)
        >>> avg.update(model)
        True
        >>> with avg.swapped_in(model):
        ...     pass  # evaluate the averaged weights here
        >>> avg.num_updates
        2

        Reading, writing and checkpointing the average:

        >>> sorted(avg.averaged_tensors()), avg.flat_layout()["bias"]
        (['bias', 'weight'], (3, 4, torch.Size([1])))
        >>> avg.flat().shape, avg.config()["rules"]["default"]["kind"]
        (torch.Size([4]), 'ema')
        >>> exported = avg.export_state_dict()   # loads into the unwrapped model
        >>> avg.settle(); avg.sync_copies()     # counters and copied tensors up to date now
        >>> state = avg.state_dict()
        >>> again = weightavg.Averager(model, rule=weightavg.ema(decay=0.9))
        >>> again.load_state_dict(state); again.follow(model)  # exact resume
        >>> torch.equal(again.flat(), avg.flat())
        True
        >>> avg.load_from(model, ["bias"])        # overwrite one stored average
        >>> avg.copy_to(model)                    # the average into the model, permanently
        >>> avg.refresh()                         # re-read the model's tensors after replacing some
        >>> for part in avg.summary().split("; "):
        ...     print(part)
        weightavg.Averager: 2 tensors (4 elements) averaged in float32 on cpu, 0 copied
        buffers='average'
        rules: default=ema(decay=0.9)
        updates: 2
        >>> avg.reset(); avg.num_updates
        0

    Raises:
        ConfigError: a bad ``rule``, ``params``, ``buffers``, ``nonfinite``, ``check`` or
            ``dtype``; a model with tensors on the meta device, with no tensor to track, or with
            two different tensors under one name.
    """

    def __init__(
        self,
        model: Source,
        rule: Rule | Mapping[str, Rule] | None = None,
        *,
        params: Literal["all", "trainable"] = "all",
        include: str | Sequence[str] | None = None,
        exclude: str | Sequence[str] | None = None,
        buffers: BufferPolicy = "average",
        dtype: torch.dtype | None = torch.float32,
        device: torch.device | str | None = None,
        nonfinite: NonFinitePolicy = "raise",
        check: CheckMode = "auto",
    ) -> None:
        from ._rules import mean

        if rule is None:
            rule = mean()
        if isinstance(rule, Mapping):
            rules = dict(rule)
            if not rules:
                raise bad_arg("rule", rule, "a rule or a non-empty mapping name -> rule")
        else:
            rules = {"default": rule}
        for slot, r in rules.items():
            if not isinstance(slot, str) or not isinstance(r, Rule):
                raise bad_arg(f"rule[{slot!r}]" if len(rules) > 1 else "rule", r,
                              "a weightavg rule such as weightavg.mean() or weightavg.ema(0.999)")
        check_options(params=params, buffers=buffers, nonfinite=nonfinite, dtype=dtype)
        if check not in ("auto", "host", "deferred"):
            raise bad_arg("check", check, "'auto', 'host' or 'deferred'")
        self.rules: dict[str, Rule] = rules
        self.params = params
        self.include = _patterns("include", include)
        self.exclude = _patterns("exclude", exclude)
        self.buffers: BufferPolicy = buffers
        self.dtype = dtype
        self.device = torch.device(device) if device is not None else None
        self.nonfinite: NonFinitePolicy = nonfinite

        # counters (Python ints; with the deferred check they are brought up to date by _settle)
        self._num_updates = 0
        self._num_skipped = 0
        self._refused_seen = 0  # refusals the deferred executor had reported at the last settle
        self.step = 0
        self.last_step: int | None = None

        # what is tracked and where it lives; how sources bind to it; how an update runs
        tensors = source_tensors(model)
        meta = [n for n, (t, _) in tensors.items() if t.is_meta]
        if meta:
            raise ConfigError(
                f"model has {len(meta)} tensor(s) on the meta device ({', '.join(meta[:5])}"
                f"{', ...' if len(meta) > 5 else ''}), which hold no values; expected a materialised model "
                "(e.g. call model.to_empty(device=...) and load its weights before building the Averager)")
        # storage made under torch.inference_mode() (a validation hook) would be inference tensors,
        # which later updates outside it could not write; a model with DTensors (FSDP2, tensor
        # parallel) keeps its local shards (weightavg._sharded)
        sharded = has_dtensor(tensors)
        storage_cls = ShardedStorage if sharded else FlatStorage
        with torch.inference_mode(False):
            self._store = storage_cls(tensors, list(self.rules), params=params, include=self.include,
                                      exclude=self.exclude, buffers=buffers, dtype=dtype, device=self.device)
        if not self._store.entries:
            raise bad_arg("model", type(model).__name__,
                          "a model with at least one tensor to track (check params/include/exclude)")
        self._groups = self._store.groups  # aliases, read-only
        self._entries = self._store.entries
        self._binder = ShardedBinder(self._store) if sharded else Binder(self._store)
        # other names of tied tracked tensors (each is tracked once, under its first name)
        self._tied = ({n: names for n, names in tied_names(model).items() if n in self._store.entries}
                      if isinstance(model, nn.Module) else {})
        with torch.inference_mode(False):
            self._executor = make_executor(self._store, self.rules, nonfinite, check)
        self.check: CheckMode = "deferred" if self._executor.deferred else "host"
        # built-in rules are weighed from three ints, with no UpdateInfo built per update, where
        # nothing reads one (see Executor.reads_info: the host executors, unless a rule is in-place)
        self._weight_fns: list[tuple[str, WeightFn]] | None = (
            None if self._executor.reads_info else weight_fns(self.rules))

        # copied tensors of a module source are read lazily (see sync_copies)
        self._pending_copy: _Binding | None = None
        self._swap: tuple[str, Swap] | None = None  # (rule, state) while swapped_in is active

    # ------------------------------------------------------------------ binding a source

    def _bind(self, source: Source) -> _Binding:
        return self._binder.bind(source)

    def refresh(self) -> None:
        """Forget the source tensors collected from models; the next call collects them again.

        The engine collects a model's tensors once. Moving or casting the whole model is detected,
        and so is any assignment of a parameter, buffer or submodule (``module.weight =
        nn.Parameter(...)``, ``load_state_dict(..., assign=True)``): the next call collects the
        tensors again and checks their names and shapes. Call this after changing a tensor's
        storage behind the module's back (``param.data = ...``, ``param.set_(...)``), which is
        detected only for the first tensor of each (device, dtype) group.
        """
        self._binder.refresh()

    # ------------------------------------------------------------------ update

    def update(self, model: Source, *, step: int | None = None) -> bool:
        """Fold the model's current tensors into every average.

        Args:
            model: the module (wrapped or not) or mapping name -> tensor to average in.
            step: the training step of this snapshot (e.g. the optimizer step). Rules that depend
                on time (``half_life``, ``karras_ema``, warmup) use it; default: previous step + 1.

        Returns:
            True if the update was applied, False if it was skipped (``nonfinite="skip"``). With
            the deferred check (``check="deferred"``, the default on CUDA) always True: the update
            is applied on the device unless the source holds NaN/Inf, which is reported (raised or
            counted) at the next read of the averager.

        Raises:
            ConfigError: ``step`` is not a non-negative int, or is below the previous update's.
            MismatchError: the model's tensors do not pair by name/shape with the tracked ones.
            NonFiniteError: the source holds NaN/Inf and ``nonfinite="raise"`` (host check only;
                deferred refusals are reported by reads, see :meth:`settle`).
            StateError: called inside :meth:`swapped_in` (the average is in the model then).
        """
        if _inference_mode_enabled():
            # views and scratch made under inference mode could not be written outside it later
            with torch.inference_mode(False):
                return self.update(model, step=step)
        if self._swap is not None:
            self._not_swapped("update()")
        deferred = self._executor.deferred
        # with the deferred check the last *applied* step is on the device: steps are checked
        # against the last attempted one
        previous = self.step if deferred and self.step else self.last_step
        if step is None:
            step = self.step + 1
        elif isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise bad_arg("step", step, "a non-negative int")
        elif previous is not None and step < previous:
            raise bad_arg("step", step, f"a step >= the previous update's step {previous}")
        binding = self._binder.bind(model)
        if deferred:  # weights and counters are formed on the device
            self._executor.execute(binding, {}, UpdateInfo(0, step, 0))
        else:
            last = self.last_step
            n = self._num_updates
            since = step - last if last is not None else max(step, 1)
            fns = self._weight_fns
            if fns is None:
                info = UpdateInfo(n, step, since)
                weights = {}
                for slot, r in self.rules.items():
                    weights[slot] = r.weight(info)
            else:  # built-in rules: no UpdateInfo to build (cold, it costs as much as a torch call)
                info = _UNREAD_INFO
                weights = {}
                for slot, fn in fns:
                    weights[slot] = fn(n, step, since)
            if not self._executor.execute(binding, weights, info):
                self._num_skipped += 1
                return False
            self._num_updates += 1
            self.last_step = step
        self.step = step
        # copied tensors (integer buffers...) of a module are only read when the average is read:
        # a model with 1000 BatchNorm layers would otherwise spend a third of each update on them
        if isinstance(model, nn.Module):
            self._pending_copy = binding
        else:
            self._pending_copy = None
            self._executor.copy(binding)
        return True

    # ------------------------------------------------------------------ counters

    @property
    def num_updates(self) -> int:
        """Updates applied (snapshots in the average). Settles a deferred check first (see :meth:`settle`)."""
        self._settle()
        return self._num_updates

    @num_updates.setter
    def num_updates(self, value: int) -> None:
        self._num_updates = value

    @property
    def num_skipped(self) -> int:
        """Updates refused because the model held NaN/Inf (``nonfinite="skip"``). Settles first."""
        self._settle()
        return self._num_skipped

    @num_skipped.setter
    def num_skipped(self, value: int) -> None:
        self._num_skipped = value

    def settle(self) -> None:
        """Bring the counters up to date and report refused updates now (see the class example).

        Only does something with the deferred check (``check="deferred"``, the default on CUDA):
        one device-to-host read of the device counters. Every read of the averager does this first.

        Raises:
            NonFiniteError: updates were refused since the last settle and ``nonfinite="raise"``
                (the average skipped them; the counters are up to date when it is raised).
        """
        self._settle()

    def _settle(self) -> None:
        ex = self._executor
        if not ex.deferred or not ex.pending:  # type: ignore[attr-defined]
            return
        n, last, refused, first = ex.settle()  # type: ignore[attr-defined]
        new = refused - self._refused_seen
        self._refused_seen = refused
        self._num_updates = n
        self.last_step = last
        self._num_skipped += new
        if new and self.nonfinite == "raise":
            raise NonFiniteError(
                f"{new} update(s) refused since the last read (the first at step {first}): the model held "
                "NaN or Inf; the average skipped them (pass nonfinite='skip' to count such updates silently)")

    def sync_copies(self) -> None:
        """Bring copied tensors (integer buffers, ``buffers="copy"``) up to date now.

        They are read from the module last updated from; every read of the average (swap, export,
        ``state_dict``, ``averaged_tensors``) does this first, so call it only to pin their values
        to this moment (e.g. right after an update).
        """
        pending = self._pending_copy
        if pending is not None:
            if is_stale(pending):  # a tensor of the module was replaced since: read the new one
                model = pending.model_ref()
                if model is not None:
                    pending = self._pending_copy = self._bind(model)
            self._executor.copy(pending)

    def follow(self, model: nn.Module) -> None:
        """Let copied tensors follow ``model`` from now on, as after an update from it.

        After :meth:`load_state_dict` the loaded copies stand until the next update; a resumed run
        calls this so that its copies read the live model, exactly as the uninterrupted run does.
        """
        if self.num_updates:
            self._pending_copy = self._bind(model)

    # ------------------------------------------------------------------ reading the averages

    def _slot(self, which: str | None) -> str:
        if which is None:
            if len(self.rules) == 1:
                return next(iter(self.rules))
            raise bad_arg("which", which, f"one of {sorted(self.rules)} (this averager keeps several)")
        if which not in self.rules:
            raise bad_arg("which", which, f"one of {sorted(self.rules)}")
        return which

    def _not_swapped(self, what: str, slot: str | None = None) -> None:
        if self._swap is not None and (slot is None or slot == self._swap[0]):
            raise StateError(f"{what} inside swapped_in(): the average is in the model until the block exits")

    def _require_update(self) -> None:
        if self.num_updates == 0:
            raise StateError("the averager holds no average yet: call update(model) at least once")

    def averaged_tensors(self, which: str | None = None) -> dict[str, Tensor]:
        """Canonical name -> the stored average (a view, in the averager's dtype and device).

        Returns:
            A dict of views (DTensors for the sharded tensors of a sharded model).

        Raises:
            ConfigError: ``which`` is not one of the rules.

        Copied tensors (integer buffers, ``buffers="copy"``) are included with their latest value.
        Writing into these views changes the average. For a sharded model the averages of its
        DTensors are DTensors with the same mesh, placements and global shape, whose local tensor is
        this rank's stored shard (no copy, no communication).
        """
        return self._store.present(self._local_averages(which))

    def _local_averages(self, which: str | None) -> dict[str, Tensor]:
        """Canonical name -> the stored view (for a sharded model: this rank's local shard)."""
        slot = self._slot(which)
        self._settle()
        self.sync_copies()
        views = self._store.views(slot)
        if self._swap is not None and self._swap[0] == slot:
            return self._swap[1].reads(views)  # exchanged parameters: their average is in the model
        return views

    def flat_layout(self) -> dict[str, tuple[int, int, torch.Size]]:
        """Where each averaged tensor sits in :meth:`flat`'s vector: name -> (start, stop, shape).

        Returns:
            A dict in storage order.

        Only averaged (floating-point) tensors take part, in storage order; copied tensors
        (integer buffers, ``buffers="copy"``) do not.
        """
        return self._store.flat_layout()

    @torch.no_grad()
    def flat(
        self,
        model: Source | None = None,
        *,
        which: str | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> Tensor:
        """The averaged tensors as one fresh 1-D tensor, laid out as :meth:`flat_layout` says.

        Args:
            model: if given, read *this source's current values* of the averaged tensors instead
                of the averages (paired by name and checked as in :meth:`update`), e.g. to form a
                deviation ``θ − θ̄`` with one subtraction.
            which: the rule whose averages are read (without ``model``).
            dtype: dtype of the result (default: the averages' dtype, promoted across groups).
            device: device of the result (default: where the first averaged group lives).

        Returns:
            A new tensor (never a view of the averages): writing to it changes nothing.

        Raises:
            StateError: no averaged tensor, no update yet, or inside :meth:`swapped_in`.
            ConfigError: ``which`` given with ``model``, or not one of the rules.
            MismatchError: ``model`` does not pair with the tracked tensors.
        """
        groups = [(gi, g) for gi, g in enumerate(self._groups) if g.averaged]
        if not groups:
            raise StateError("the averager tracks no averaged (floating-point) tensor")
        if model is None:
            self._require_update()
            slot = self._slot(which)
            self._not_swapped("flat()", slot)
            parts = [self._store.flat[slot][gi] for gi, _ in groups]
        else:
            if which is not None:
                raise bad_arg("which", which, "None when model is given (model values are read)")
            binding = self._bind(model)
            parts = [torch.cat([t.reshape(-1) for t in binding.srcs[gi]]) for gi, _ in groups]
        if dtype is None:
            dtype = groups[0][1].dtype
            for _, g in groups[1:]:
                dtype = torch.promote_types(dtype, g.dtype)
        dev = torch.device(device) if device is not None else groups[0][1].dev
        out = torch.empty(sum(g.numel for _, g in groups), dtype=dtype, device=dev)
        off = 0
        for part in parts:
            out[off : off + part.numel()].copy_(part)
            off += part.numel()
        return out

    def export_state_dict(
        self, model: nn.Module | None = None, *, which: str | None = None, full: bool = False,
        rank0_only: bool = False, cpu: bool = False,
    ) -> dict[str, Tensor]:
        """The averaged weights as a state dict that loads into the *unwrapped* model.

        Tensors are fresh copies in each source tensor's own dtype. With ``model``, entries the
        averager does not track (ignored buffers, frozen parameters, excluded names) are filled
        from it, so the result loads with ``strict=True``. Every name of a shared (tied) tensor
        carries its average (as in ``state_dict()``, those names share one tensor).

        For a sharded model (DTensor parameters) the averages of sharded tensors are DTensors with
        the parameters' placements (each rank copies its own shard: no communication), unless:

        Args:
            full: gather each sharded tensor into a full plain tensor, one tensor at a time (a
                collective per tensor: every rank must call this), so the extra memory at any
                moment is one full tensor (on every rank, less with ``rank0_only``).
            rank0_only: with torch.distributed initialised, keep the tensors on rank 0 only (the
                other ranks take part in the gathers and return ``{}``).
            cpu: move the exported tensors to the host.

        Returns:
            Name -> fresh tensor (``{}`` on ranks other than 0 with ``rank0_only``).

        Raises:
            StateError: no update yet.
            ConfigError: ``model`` is not an ``nn.Module``, or ``which`` not one of the rules.
        """
        self._require_update()
        keep = True
        if rank0_only:
            import torch.distributed as dist

            keep = not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
        store = self._store

        def export(name: str, t: Tensor, copy: bool = True) -> Tensor:
            if full:
                t = store.gather(name, t)  # full_tensor() of a Replicate() DTensor is an alias: copy
            t = t.detach()
            return t.to(device="cpu" if cpu else t.device, copy=copy)

        out: dict[str, Tensor] = {}
        tied = self._tied
        if model is not None:
            if not isinstance(model, nn.Module):
                raise bad_arg("model", type(model).__name__, "a torch.nn.Module or None")
            names = state_dict_names(model)
            for k, v in unwrap_model(model).state_dict().items():
                name = names.get(k) or canonical_name(k)
                if name not in self._entries:  # filled from the model (tracked names come next)
                    t = export(name, v)
                    if keep:
                        out[name] = t
            tied = tied_names(model)
        locals_ = self._local_averages(which)
        for name, t in locals_.items():
            # convert the local shard, then present it (a sharded entry's copy is a DTensor too)
            local = t.to(self._entries[name].dtype, copy=True)
            avg = store.present({name: local})[name]
            if full or cpu:
                avg = export(name, avg, copy=False)  # `local` is a fresh copy already
            if not keep:
                continue
            out[name] = avg
            for other in tied.get(name, ()):
                out[other] = avg
        return out

    @torch.no_grad()
    def copy_to(self, model: nn.Module, *, which: str | None = None) -> None:
        """Write the averages into the model's tensors, in place (permanently).

        Raises:
            StateError: no update yet, or inside :meth:`swapped_in`.
            MismatchError: the model does not pair with the tracked tensors.
        """
        self._require_update()
        tensors = self._paired(model)
        for name, avg in self._local_averages(which).items():
            tensors[name].copy_(avg)

    def _paired(self, model: nn.Module) -> dict[str, Tensor]:
        if not isinstance(model, nn.Module):
            raise bad_arg("model", type(model).__name__, "a torch.nn.Module")
        self._store.before_write(model)  # sharded: FSDP2 units resharded, so writes reach the shards
        return self._binder.paired(self._bind(model))

    @contextlib.contextmanager
    @torch.no_grad()
    def swapped_in(self, model: nn.Module, *, which: str | None = None) -> Iterator[nn.Module]:
        """Put the averaged weights into the live model, in place, and restore them on exit.

        The model keeps its Parameter objects (optimizers and compiled graphs keep working). On
        exit, also when the body raises, every tracked tensor gets its training value back. Changes
        the body makes to buffers (e.g. :func:`recompute_bn` on running statistics) are undone too;
        use :meth:`load_from` inside the block to keep them in the average.

        Memory: a parameter whose average has its dtype and device is exchanged with it in place,
        through one scratch of 64Ki elements (no copy of the model); other tensors (buffers,
        parameters averaged in another dtype) are backed up in the model's dtype. The block must
        not write to parameters (a warning says so: their average would take the written value),
        nor call :meth:`update` (a :class:`StateError`).

        Yields:
            ``model`` itself, holding the averages for the block.

        Raises:
            StateError: no update yet, or already inside a swap.
            MismatchError: the model does not pair with the tracked tensors.
        """
        self._require_update()
        slot = self._slot(which)
        self._not_swapped("swapped_in()")
        tensors = self._paired(model)
        swap = Swap(tensors, self._local_averages(slot), self._param_names(model))
        swap.enter()
        self._swap = (slot, swap)
        try:
            yield model
        finally:
            self._swap = None
            self._store.before_write(model)  # sharded: FSDP2 units resharded, so the restore reaches the shards
            swap.exit()

    @torch.no_grad()
    def load_from(
        self, model: nn.Module, names: Sequence[str] | None = None, *, which: str | None = None
    ) -> None:
        """Overwrite stored averages with the model's current values (e.g. refreshed BN statistics).

        Args:
            model: the source module.
            names: canonical names to take (default: every tracked buffer).
            which: the rule whose average is written (copied tensors are shared by all rules).

        Raises:
            StateError: no update yet.
            ConfigError: a name that is not tracked, or ``which`` not one of the rules.
            MismatchError: the model does not pair with the tracked tensors.
        """
        self._require_update()
        tensors = self._paired(model)
        if names is None:
            names = [n for n in self._entries if n not in self._param_names(model)]
        unknown = [n for n in names if n not in self._entries]
        if unknown:
            raise bad_arg("names", unknown[:10], "canonical names tracked by this averager")
        stored = self._local_averages(which)
        swap = self._swap[1] if self._swap is not None and self._swap[0] == self._slot(which) else None
        for n in names:
            if swap is not None and n in swap.exchanged_set:
                swap.loaded.add(n)  # the average is in the model: it stays there on exit
            else:
                stored[n].copy_(tensors[n])

    @torch.no_grad()
    def all_reduce(self, group: Any = None) -> None:
        """Replace every average by its mean over the ranks of ``group`` (torch.distributed).

        One collective per storage group (not per tensor). This is SWAP's last step (average the
        workers' independently trained weights) and reconciles averages that drifted across ranks.
        Copied tensors are left as they are. Every rank must call it, with the same configuration.

        Raises:
            StateError: torch.distributed is not initialised, or no update happened yet.
            ConfigError: a sharded averager (its ranks hold different shards).

        Examples:
            A job of one process (gloo) shows the call; every rank of a real job runs it.

            >>> import os, tempfile, torch, weightavg
            >>> import torch.distributed as dist
            >>> store = os.path.join(tempfile.mkdtemp(), "store")
            >>> dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
            >>> avg = weightavg.Averager(torch.nn.Linear(2, 1))
            >>> try:
            ...     _ = avg.update(torch.nn.Linear(2, 1)); avg.all_reduce()
            ... finally:
            ...     dist.destroy_process_group()
            >>> avg.num_updates
            1
        """
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise StateError("all_reduce needs an initialised torch.distributed process group")
        self._require_update()
        self._not_swapped("all_reduce()")
        refuse_sharded(self._store, "Averager.all_reduce (it would mix different shards)")
        world = dist.get_world_size(group)
        for slot in self.rules:
            for gi, g in enumerate(self._groups):
                if g.averaged:
                    flat = self._store.flat[slot][gi]
                    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
                    flat.div_(world)

    def _param_names(self, model: nn.Module) -> set[str]:
        return {n for n, (_, is_p) in named_tensors(model).items() if is_p}

    # ------------------------------------------------------------------ checkpointing

    def config(self) -> dict[str, Any]:
        """Plain-data description of the configuration (saved in checkpoints).

        Returns:
            A JSON-able dict (rules, selection, dtype, device, ``nonfinite``...); a resumed state
            must match it.
        """
        return {
            "rules": {s: r.config() for s, r in self.rules.items()},
            "params": self.params,
            "include": list(self.include),
            "exclude": list(self.exclude),
            "buffers": self.buffers,
            "dtype": str(self.dtype) if self.dtype is not None else None,
            "nonfinite": self.nonfinite,
        }

    def state_dict(self) -> dict[str, Any]:
        """Counters, configuration and averages: enough to continue exactly after a restart.

        Tensors are views that share one flat storage per group (``torch.save`` writes it once).
        ``averages`` is present from construction on (zeros until the first update), so that
        ``torch.distributed.checkpoint.load`` can load into a fresh averager's state. For a sharded
        model the averages of sharded tensors are DTensors (see :meth:`averaged_tensors`): DCP writes
        each shard once and reshards on load; the structure is the same as without sharding.

        Returns:
            A dict of plain data and tensors (``torch.load(..., weights_only=True)`` reads it back).
        """
        state = {
            "format": "weightavg.Averager",
            "format_version": FORMAT_VERSION,
            "config": self.config(),
            "num_updates": self.num_updates,
            "num_skipped": self.num_skipped,
            "step": self.step,
            "last_step": self.last_step,
            "averages": {s: self.averaged_tensors(s) for s in self.rules},
        }
        rank = self._store.rank()
        if rank is not None:  # sharded: whose local shards a torch.save of this state holds
            state["rank"] = rank
        return state

    @torch.no_grad()
    def load_state_dict(self, state: Mapping[str, Any], *, strict: bool = True) -> None:
        """Restore what :meth:`state_dict` returned.

        Raises:
            StateError: not an Averager state, or an unsupported format version.
            MismatchError: different rules (with ``strict``) or different tracked names/shapes.
        """
        self._not_swapped("load_state_dict()")
        if not isinstance(state, Mapping) or state.get("format") != "weightavg.Averager":
            raise StateError("state is not a weightavg.Averager state_dict (missing 'format' key)")
        version = state.get("format_version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise StateError(f"state has format_version={version!r}; this weightavg reads <= {FORMAT_VERSION}")
        cfg = state["config"]
        mine = self.config()
        if strict and cfg["rules"] != mine["rules"]:
            raise MismatchError(f"state was saved with rules {cfg['rules']}, this averager has {mine['rules']}"
                                " (pass strict=False to load anyway)")
        averages = state["averages"]
        if averages:
            for slot in self.rules:
                if slot not in averages:
                    raise MismatchError(f"state has no average for rule {slot!r} (it has {sorted(averages)})")
                saved = averages[slot]
                missing = sorted(set(self._entries) - set(saved))
                unexpected = sorted(set(saved) - set(self._entries))
                reshaped = [(n, tuple(saved[n].shape), tuple(self._store.full_shape(n))) for n in self._entries
                            if n in saved and saved[n].shape != self._store.full_shape(n)]
                if missing or unexpected or reshaped:
                    raise MismatchError("state does not match the tracked tensors: "
                                        + describe_mismatch(missing, unexpected, reshaped,
                                                            left="averager", right="state"))
            for slot in self.rules:
                mine_t = self._local_averages(slot)
                for n, t in averages[slot].items():
                    self._store.load_entry(n, mine_t[n], t, state.get("rank"))
        self._pending_copy = None  # the loaded copies stand until the next update
        self._num_updates = int(state["num_updates"])
        self._num_skipped = int(state.get("num_skipped", 0))
        self.step = int(state["step"])
        ls = state.get("last_step")
        self.last_step = int(ls) if ls is not None else None
        if self._executor.deferred:
            self._executor.load_counters(self._num_updates, self.last_step)  # type: ignore[attr-defined]
            self._refused_seen = 0

    def reset(self) -> None:
        """Forget the average: the next update copies again (refusals not yet reported are dropped)."""
        self._num_updates = 0
        self._num_skipped = 0
        self.step = 0
        self.last_step = None
        self._pending_copy = None
        if self._executor.deferred:
            self._executor.load_counters(0, None)  # type: ignore[attr-defined]
            self._refused_seen = 0

    # ------------------------------------------------------------------ describing

    @property
    def names(self) -> list[str]:
        """Canonical names of the tracked tensors."""
        return list(self._entries)

    def summary(self) -> str:
        """One line describing what is tracked, to log.

        Returns:
            ``"weightavg.Averager: ..."``: tracked and copied tensors, elements, dtype, device,
            buffer policy, rules and the number of updates.
        """
        avg = [e for g in self._groups if g.averaged for e in g.entries]
        cp = [e for g in self._groups if not g.averaged for e in g.entries]
        dtypes = sorted({str(g.dtype).replace("torch.", "") for g in self._groups if g.averaged})
        devs = sorted({str(g.dev) for g in self._groups})
        rules = ", ".join(f"{s}={r!r}" for s, r in self.rules.items())
        return (f"weightavg.Averager: {len(avg)} tensors ({sum(e.numel for e in avg):,} elements) "
                f"averaged in {'/'.join(dtypes) or '-'} on {'/'.join(devs)}, {len(cp)} copied; "
                f"buffers={self.buffers!r}; rules: {rules}; updates: {self.num_updates}")

    def __repr__(self) -> str:
        n = sum(e.numel for e in self._entries.values())
        rules = self.rules["default"] if list(self.rules) == ["default"] else self.rules
        return (f"Averager(rule={rules!r}, params={self.params!r}, buffers={self.buffers!r}, "
                f"dtype={self.dtype}, device={self.device}, nonfinite={self.nonfinite!r}, "
                f"tracked={len(self._entries)} tensors/{n:,} elements, num_updates={self._num_updates})")


def check_options(
    *, params: object = "all", buffers: object = "average", nonfinite: object = "raise",
    dtype: object = torch.float32,
) -> None:
    """Validate the Averager's option values (also used by layers that build an Averager later)."""
    if params not in ("all", "trainable"):
        raise bad_arg("params", params, "'all' or 'trainable'")
    if buffers not in ("average", "copy", "ignore"):
        raise bad_arg("buffers", buffers, "'average', 'copy' or 'ignore'")
    if nonfinite not in ("raise", "skip", "allow"):
        raise bad_arg("nonfinite", nonfinite, "'raise', 'skip' or 'allow'")
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise bad_arg("dtype", dtype, "a floating torch.dtype or None")


def _patterns(name: str, value: str | Sequence[str] | None) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if isinstance(value, Sequence) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise bad_arg(name, value, "a glob pattern or a list of glob patterns on canonical names")
