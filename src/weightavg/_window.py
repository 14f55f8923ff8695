"""Windowed averages along a run: the (weighted) average of the last ``k`` snapshots (LAWA, WSM).

:class:`WindowAverage` keeps a ring of the last ``k`` snapshots, taken every ``every``, on the host
(``offload="cpu"``, default), on disk (``offload="disk"``) or with the model (``offload=None``).
The average is formed when it is read (evaluation, export, end), never on the training path:

* ``weights="uniform"`` (LAWA): a running sum (float64) adds the newest snapshot and subtracts the
  evicted one, so reading costs one pass over the sum;
* ``"linear"`` (weights ∝ 1…n, newest heaviest), ``"minus-sqrt"`` (WSM: the discrete differences
  of ``1 − √x``, ``wᵢ = √(i/n) − √((i−1)/n)`` with ``i = 1`` the oldest, which emulates a
  ``1 − √x`` learning-rate cooldown over the window) or a callable ``n -> n weights``: one
  weighted pass over the ring.

Every sum goes through the engine (:class:`~weightavg._accumulate.WeightedSum`); snapshots are
engine copies (an :class:`~weightavg.Averager` with a copying rule per ring slot). The ring and the
running sum are part of the policy state, so a run resumed mid-window averages exactly as the
uninterrupted one.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, Union

import torch
from torch import Tensor, nn

from ._accumulate import WeightedSum
from ._duration import Duration
from ._engine import Averager, named_tensors
from ._errors import ConfigError, StateError, bad_arg
from ._policy import AveragingPolicy, TimeLike, _Time
from ._rules import Rule, custom, ema

__all__ = ["WindowAverage", "WindowWeights", "weighted_mean_rule", "window_weights"]

WindowWeights = Union[Literal["uniform", "linear", "minus-sqrt"], Callable[[int], Sequence[float]]]  # noqa: UP007 (runtime alias)
SCHEDULES = ("uniform", "linear", "minus-sqrt")


def window_weights(spec: WindowWeights, n: int) -> list[float]:
    """The weights of ``n`` snapshots, oldest first, normalised to sum to 1.

    Raises:
        ConfigError: an unknown name, or a callable returning other than ``n`` non-negative finite
            numbers with a positive sum.
    """
    if n <= 0:
        raise bad_arg("n", n, "a positive number of snapshots")
    if spec == "uniform":
        w = [1.0] * n
    elif spec == "linear":
        w = [float(i) for i in range(1, n + 1)]
    elif spec == "minus-sqrt":
        w = [math.sqrt(i / n) - math.sqrt((i - 1) / n) for i in range(1, n + 1)]
    elif callable(spec):
        got = spec(n)
        try:
            w = [float(x) for x in got]
        except (TypeError, ValueError) as err:
            raise bad_arg("weights(n)", got, f"a sequence of {n} numbers") from err
        if len(w) != n:
            raise bad_arg("weights(n)", got, f"{n} weights (one per snapshot, oldest first)")
    else:
        raise bad_arg("weights", spec, "'uniform', 'linear', 'minus-sqrt' or a callable n -> n weights")
    if any(not math.isfinite(x) or x < 0 for x in w) or sum(w) <= 0:
        raise bad_arg("weights", w, "non-negative finite numbers with a positive sum")
    total = math.fsum(w)
    return [x / total for x in w]


def weighted_mean_rule(weights: Sequence[float]) -> Rule:
    """A rule whose average after the ``i``-th update is ``Σ_{j≤i} wⱼ xⱼ / Σ_{j≤i} wⱼ``.

    The ``i``-th update lerps with ``wᵢ / Σ_{j≤i} wⱼ`` (an engine rule with explicit weights).
    Inputs with weight 0 must be left out by the caller, so every partial sum is positive.

    Raises:
        ConfigError: an empty list, a non-positive or non-finite weight.
    """
    ws = [float(w) for w in weights]
    if not ws or any(not math.isfinite(w) or w <= 0 for w in ws):
        raise bad_arg("weights", list(weights), "positive finite numbers (leave zero-weight inputs out)")
    partial = []
    acc = 0.0
    for w in ws:
        acc += w
        partial.append(acc)

    def weight(n: int) -> float:
        if n >= len(ws):
            raise bad_arg("weights", len(ws), f"one weight per input (update {n + 1} has none)")
        return min(1.0, ws[n] / partial[n])

    return custom(weight, name="weighted_mean")


class WindowAverage(AveragingPolicy):
    """The (weighted) average of the last ``k`` snapshots taken every ``every`` (LAWA, WSM).

    .. note::
        After snapshots ``θ₁ … θₙ`` (``n ≤ k`` the most recent, oldest first) the average is
        ``Σ wᵢ θᵢ`` with ``w = window_weights(weights, n)``: uniform ``1/n`` (LAWA, Sanyal et al.
        2023), linear ``∝ i``, or minus-sqrt ``√(i/n) − √((i−1)/n)`` (WSM: merging the window
        with these weights equals training through a ``1 − √x`` cooldown of the learning rate, to
        first order).

    Args:
        k: snapshots in the window (≥ 1).
        every: time between snapshots (a duration: ``'1ep'``, ``'1000ba'``...).
        weights: ``'uniform'`` (default), ``'linear'``, ``'minus-sqrt'`` or a callable
            ``n -> n`` weights (oldest first).
        offload: where snapshots live: ``'cpu'`` (default, host memory), ``'disk'`` (safetensors
            files in ``directory``) or ``None`` (with the model, e.g. on the GPU).
        directory: the snapshot directory for ``offload='disk'`` (under DDP each rank writes into
            its own ``rank<r>`` sub-directory).
        snapshot_dtype: dtype of the stored snapshots (default float32).
        start: when snapshots start (default 0).
        **kwargs: see :class:`~weightavg.AveragingPolicy` (``eval_with``, ``final``,
            ``recompute_bn`` (default True, as SWA), averager options).

    Raises:
        ConfigError: bad ``k``, ``every``, ``weights``, ``offload``, ``directory`` or
            ``snapshot_dtype``.

    Examples:
        The uniform average of the last 2 of 3 snapshots, one per optimizer step:

        >>> import torch, weightavg
        >>> model = torch.nn.Linear(1, 1, bias=False)
        >>> opt = torch.optim.SGD(model.parameters(), lr=1.0)
        >>> win = weightavg.WindowAverage(k=2, every="1ba", final="training")
        >>> win.begin(model, opt)
        >>> seen = []
        >>> for _ in range(3):
        ...     model(torch.ones(1, 1)).sum().backward(); opt.step(); opt.zero_grad()
        ...     seen.append(model.weight.item())
        >>> with win.averaged() as m:
        ...     abs(m.weight.item() - (seen[1] + seen[2]) / 2) < 1e-6
        True
        >>> state = win.state_dict()  # the ring and counters, for a checkpoint
        >>> win.window_size, win.num_updates
        (2, 3)
        >>> win.end()
    """

    _kind = "window"

    def __init__(
        self,
        k: int = 5,
        every: TimeLike = "1ep",
        weights: WindowWeights = "uniform",
        *,
        offload: Literal["cpu", "disk"] | None = "cpu",
        directory: str | os.PathLike[str] | None = None,
        snapshot_dtype: torch.dtype = torch.float32,
        start: TimeLike = 0,
        **kwargs: Any,
    ) -> None:
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise bad_arg("k", k, "a positive int (snapshots in the window)")
        if not callable(weights) and weights not in SCHEDULES:
            raise bad_arg("weights", weights, "'uniform', 'linear', 'minus-sqrt' or a callable n -> n weights")
        if callable(weights):
            window_weights(weights, 1)  # validates early
        if offload not in ("cpu", "disk", None):
            raise bad_arg("offload", offload, "'cpu', 'disk' or None")
        if offload == "disk" and directory is None:
            raise bad_arg("directory", None, "a directory for the snapshots (offload='disk')")
        if offload != "disk" and directory is not None:
            raise bad_arg("directory", directory, "None unless offload='disk'")
        if snapshot_dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            raise bad_arg("snapshot_dtype", snapshot_dtype, "torch.float16, bfloat16, float32 or float64")
        super().__init__(start=start, end=kwargs.pop("end", None), update_interval=every, **kwargs)
        self.k = k
        self.weights = weights
        self.offload = offload
        self.directory = Path(directory) if directory is not None else None
        self._dir: Path | None = self.directory  # per rank under DDP (see begin)
        self.snapshot_dtype = snapshot_dtype
        # ring (oldest first): host/device slots, or disk entries {"file", "sha256"}
        self._ring: list[Any] = []
        self._free: list[Averager] = []
        self._stage: Averager | None = None
        self._sum: WeightedSum | None = None
        self._pushes = 0
        self._dirty = True
        self._pinned: set[str] = set()  # disk files the last state_dict() refers to
        self._deferred: set[str] = set()  # evicted while pinned: deleted at the next state_dict()

    def _extra_repr(self) -> str:
        w = self.weights if isinstance(self.weights, str) else getattr(self.weights, "__name__", "callable")
        return f"k={self.k}, every='{self.update_interval}', weights={w!r}, offload={self.offload!r}, "

    def _make_rule(self, resolve: Callable[[Duration, str], _Time]) -> Rule:
        return ema(decay=0.0)  # the policy's averager holds the window average as last formed (a copy)

    # ------------------------------------------------------------------ begin

    def begin(self, model: nn.Module, optimizers: Any = None, **kwargs: Any) -> None:
        """Start; see :meth:`weightavg.AveragingPolicy.begin`.

        Raises:
            ConfigError: a sharded (DTensor) model, ``safetensors`` missing for
                ``offload='disk'``, or what :meth:`weightavg.AveragingPolicy.begin` raises.
        """
        self._ring, self._free, self._stage, self._sum = [], [], None, None
        self._pushes, self._dirty = 0, True
        from .posthoc import _is_sharded

        if isinstance(model, nn.Module) and _is_sharded(model):
            raise ConfigError("WindowAverage does not support sharded (DTensor/FSDP2) models yet")
        if self.directory is not None:
            from .posthoc import _require_safetensors

            _require_safetensors()
            # under DDP every rank keeps its own snapshots (no rank waits for another's files)
            dist = torch.distributed
            world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
            self._dir = self.directory / f"rank{dist.get_rank()}" if world > 1 else self.directory
        super().begin(model, optimizers, **kwargs)
        if self._dir is not None:
            self._dir.mkdir(parents=True, exist_ok=True)

    def _slot(self) -> Averager:
        assert self.model is not None
        if self._free:
            return self._free.pop()
        opts = dict(self._averager_kwargs)
        opts["dtype"] = self.snapshot_dtype
        if self.offload is not None:
            opts["device"] = "cpu"
        return Averager(self.model, ema(decay=0.0), **opts)

    # ------------------------------------------------------------------ snapshots

    @torch.no_grad()
    def _update(self) -> None:
        """Take a snapshot into the ring (the policy's update event)."""
        assert self.model is not None
        slot = self._stage if self.offload == "disk" and self._stage is not None else self._slot()
        # from a mapping, so that copied tensors (integer buffers) are taken now and do not follow
        # the live model afterwards as they do after an update from a module
        source = {n: t for n, (t, _) in named_tensors(self.model).items()}
        if not slot.update(source, step=max(self.steps, slot.step)):
            if self.offload == "disk":
                self._stage = slot
            else:
                self._free.append(slot)
            return  # skipped (nonfinite="skip")
        self._pushes += 1
        uniform = self.weights == "uniform"
        if self.offload == "disk":
            assert self._dir is not None
            self._stage = slot
            tensors = {n: t.clone() for n, t in slot.averaged_tensors().items()}
            try:
                entry = self._write(tensors)
            except OSError as err:  # a full disk must not kill training: this snapshot is skipped
                self._pushes -= 1
                warnings.warn(f"WindowAverage: the snapshot at step {self.steps} was not written ({err}); "
                              "the window keeps the earlier ones and training goes on", UserWarning,
                              stacklevel=2)
                return
            if uniform:
                self._running().add(tensors, 1.0)
            self._ring.append(entry)
        else:
            self._ring.append(slot)
            if uniform:
                self._running().add(slot.averaged_tensors(), 1.0)
        if len(self._ring) > self.k:
            old = self._ring.pop(0)
            if self.offload == "disk":
                if uniform:
                    self._running().add(self._read(old), -1.0)
                self._evict_file(old["file"])
            else:
                if uniform:
                    self._running().add(old.averaged_tensors(), -1.0)
                self._free.append(old)
        self._dirty = True
        if self._has_bn:
            self.bn_stale = True

    def _running(self) -> WeightedSum:
        if self._sum is None:
            like = self._like()
            self._sum = WeightedSum(like, dtype=torch.float64, device="cpu" if self.offload else None,
                                    nonfinite="allow")
        return self._sum

    def _like(self) -> dict[str, Tensor]:
        if self.offload == "disk":
            assert self._stage is not None
            return self._stage.averaged_tensors()
        slot = self._ring[-1] if self._ring else None
        assert isinstance(slot, Averager)
        return slot.averaged_tensors()

    def _write(self, tensors: Mapping[str, Tensor]) -> dict[str, Any]:
        from .posthoc import _atomic_write, _member, _serialize  # TODO(lead): the shared _files module

        assert self._dir is not None
        name = f"window-{self._pushes:010d}.safetensors"
        data = _serialize(tensors, {"weightavg": "WindowAverage snapshot"})
        _atomic_write(_member(self._dir, name), data)
        return {"file": name, "sha256": hashlib.sha256(data).hexdigest(), "step": self.steps}

    def _read(self, entry: Mapping[str, Any]) -> dict[str, Tensor]:
        from .posthoc import SnapshotError, _read_snapshot

        assert self._dir is not None
        try:
            return _read_snapshot(self._dir, entry)
        except SnapshotError as err:
            raise StateError(f"window snapshot unusable: {err}") from err

    def _evict_file(self, name: str) -> None:
        assert self._dir is not None
        if name in self._pinned:
            self._deferred.add(name)
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._dir / name)

    # ------------------------------------------------------------------ reading

    @property
    def num_updates(self) -> int:
        """Snapshots taken so far (the window holds the last ``k`` of them)."""
        return self._pushes

    @property
    def window_size(self) -> int:
        """Snapshots in the window now (``min(k, num_updates)``)."""
        return len(self._ring)

    @property
    def has_average(self) -> bool:
        """True once the window holds a snapshot."""
        return self.averager is not None and bool(self._ring)

    @torch.no_grad()
    def _materialise(self) -> None:
        """Form the window average into the policy's averager (one pass over the sum or the ring)."""
        if not self._dirty or not self._ring:
            return
        assert self.averager is not None and self.model is not None
        n = len(self._ring)
        if self.weights == "uniform":
            floats = self._running().result(1.0 / n)
        else:
            acc: WeightedSum | None = None
            for w, item in zip(window_weights(self.weights, n), self._ring, strict=True):
                src = self._read(item) if self.offload == "disk" else item.averaged_tensors()
                if acc is None:
                    acc = WeightedSum(src, dtype=torch.float64, device="cpu" if self.offload else None,
                                      nonfinite="allow")
                acc.add(src, w)
            assert acc is not None
            floats = acc.result()
        newest = self._read(self._ring[-1]) if self.offload == "disk" else self._ring[-1].averaged_tensors()
        # the policy's averager pairs with the model: its own dtypes and devices
        live = named_tensors(self.model)
        source: dict[str, Tensor] = {}
        for name in self.averager.names:
            t = floats.get(name, newest[name])
            ref = live[name][0]
            source[name] = t.to(dtype=ref.dtype, device=ref.device)
        self.averager.update(source)
        self._dirty = False

    @contextlib.contextmanager
    def averaged(self, *, collective: bool = True) -> Iterator[nn.Module]:
        """The model with the window average in it (BatchNorm statistics fresh), restored on exit.

        ``collective``: as for :meth:`AveragingPolicy.averaged`.

        Yields:
            The model, holding the window average (its own weights before the first snapshot).

        Raises:
            StateError: the policy was not begun.
        """
        self._require_begun()
        self._materialise()
        with super().averaged(collective=collective) as m:
            yield m

    @torch.no_grad()
    def end(self) -> None:
        """End of training: form the average, refresh BatchNorm statistics, apply ``final``.

        Raises:
            StateError: the policy was not begun.
        """
        self._require_begun()
        self._materialise()
        super().end()

    # ------------------------------------------------------------------ checkpointing

    def state_dict(self) -> dict[str, Any]:
        """Counters, the ring (host snapshots or disk file entries) and the running sum.

        Returns:
            A dict for ``torch.save`` (``weights_only`` loadable); ``load_state_dict`` restores it.
        """
        state = super().state_dict()
        if self.averager is None:
            return state
        if self.offload == "disk":
            ring: list[Any] = [dict(e) for e in self._ring]
            keep = {e["file"] for e in self._ring}
            for name in self._deferred - keep:
                with contextlib.suppress(FileNotFoundError):
                    assert self._dir is not None
                    os.unlink(self._dir / name)
            self._deferred &= keep
            self._pinned = keep
        else:
            ring = [s.state_dict() for s in self._ring]
        state["window"] = {"ring": ring, "pushes": self._pushes,
                           "sum": self._sum.state_dict() if self._sum is not None else None}
        return state

    def _apply_state(self, state: Mapping[str, Any]) -> None:
        super()._apply_state(state)
        win = state.get("window")
        self._ring, self._sum, self._dirty = [], None, True
        self._pushes = 0
        if not win:
            return
        self._pushes = int(win["pushes"])
        if self.offload == "disk":
            assert self._dir is not None
            from .posthoc import _member

            for e in win["ring"]:
                _member(self._dir, e["file"])
                if not (self._dir / e["file"]).is_file():
                    raise StateError(f"window snapshot {self._dir / e['file']} is missing: resume "
                                     "from the latest checkpoint of this run (older ones' files are gone)")
                self._ring.append(dict(e))
            self._pinned = {e["file"] for e in self._ring}
            self._stage = self._slot()
        else:
            for s in win["ring"]:
                slot = self._slot()
                slot.load_state_dict(s)
                self._ring.append(slot)
        if win.get("sum") is not None:
            like = self._read(self._ring[-1]) if self.offload == "disk" else self._ring[-1].averaged_tensors()
            self._sum = WeightedSum(like, dtype=torch.float64, device="cpu" if self.offload else None,
                                    nonfinite="allow")
            self._sum.load_state_dict(win["sum"])
        if self.weights == "uniform" and self._ring and self._sum is None:
            raise ConfigError("window state has snapshots but no running sum (saved with other weights?)")
