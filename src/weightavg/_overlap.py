"""Offloaded averages updated while training goes on.

Part of the engine (see :mod:`weightavg._engine`). When the averages live on the host and the
sources on an accelerator (``Averager(model, device="cpu")`` for a model on CUDA, sharded or not),
an update costs a device-to-host transfer of the model and the host's arithmetic over it. The
:class:`OverlappedExecutor` does neither inside :meth:`weightavg.Averager.update`:

1. ``update()`` snapshots the sources into a host *staging* buffer (one per averaged group, in the
   sources' dtype, laid out as the storage, pinned): the copies are queued on a side stream after
   the work already queued on the current stream, and the current stream then waits for them (an
   event: no host synchronisation), so an optimizer step queued later cannot overwrite a source
   before it has been read. ``update()`` returns.
2. A worker thread waits for the copies, then folds the snapshot into the averages with the host
   executor (the non-finite check included), with the weights of that update's step formed from
   the worker's own counters: exact whatever the interval between updates and whatever was refused.
3. The next ``update()`` and every read of the averager (``settle``) wait for the worker first, so
   one update at most is in flight; refused updates are reported at the next read, as with the
   deferred check (:mod:`weightavg._deferred`), and an unexpected error of the worker is raised there.

Memory: the staging holds one host copy of the averaged tensors in their own dtype (allocated at the
first update, kept), besides the averages. For a sharded model each rank stages its local shards; a
checked update's verdict is agreed across the ranks from the worker, on a private gloo group made
when the executor is built (every rank builds it, and every rank's worker takes the same updates in
the same order), so the training's own communicator never sees it.

The same path runs on a CPU-only machine when :data:`OVERLAP_ON_CPU` is set (the tests do): the
snapshot is then a host copy made in ``update()``, and the worker is the same.
"""

from __future__ import annotations

import copy
import dataclasses
import threading
import time
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from ._binding import _Binding
from ._errors import NonFiniteError
from ._executor import Executor, LocalExecutor, NonFinitePolicy
from ._rules import Rule, UpdateInfo
from ._storage import FlatStorage

__all__ = ["OVERLAP_ON_CPU", "OverlappedExecutor", "offloaded"]

# Test hook: treat averaged groups whose sources are on the CPU as offloaded too (the logic of the
# accelerator path, run on a machine without one)
OVERLAP_ON_CPU = False
_POLL = 1e-4  # seconds between the worker's looks at a copy's event


def offloaded(storage: FlatStorage) -> bool:
    """Whether some averaged group lives on the host while its sources live on an accelerator."""
    return any(g.averaged and g.dev.type == "cpu" and (g.src_device.type != "cpu" or OVERLAP_ON_CPU)
               for g in storage.groups)


def _static() -> None:
    return None


class OverlappedExecutor(Executor):
    """Snapshots the sources in ``update()``; a worker thread folds them into the host averages.

    A ``deferred`` executor: the :class:`weightavg.Averager` calls :meth:`settle` before any read.

    Args:
        storage, rules, nonfinite: as for :class:`~weightavg._executor.LocalExecutor`.
    """

    deferred = True

    def __init__(self, storage: FlatStorage, rules: Mapping[str, Rule], nonfinite: NonFinitePolicy) -> None:
        from ._sharded import ShardedExecutor

        super().__init__(storage, rules, nonfinite)
        # copied (non-averaged) groups are written from the sources as they are, in the caller's thread
        self.direct: LocalExecutor = LocalExecutor(storage, rules, nonfinite)
        # the worker sees the averaged groups' sources where the staging is: on the host
        staged = copy.copy(storage)
        staged.groups = [dataclasses.replace(g, src_device=g.dev) if g.averaged else g for g in storage.groups]
        self.group = _private_group() if storage.sharded and nonfinite != "allow" else None
        self.inner: LocalExecutor = (ShardedExecutor(staged, rules, nonfinite, group=self.group)
                                     if storage.sharded else LocalExecutor(staged, rules, nonfinite))
        self.staging: list[Tensor | None] = []
        self.staged_binding: _Binding | None = None
        self._copies: tuple[_Binding, list[tuple[torch.device, list[Tensor], list[Tensor]]]] | None = None
        self._streams: dict[torch.device, Any] = {}
        # the worker's counters: applied, last applied step, refused (ever), first refused since settle
        self.n = 0
        self.last: int | None = None
        self.refused = 0
        self.first: int | None = None
        self.pending = 0  # updates handed to the worker since the last settle
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    # ------------------------------------------------------------------ the deferred interface

    def settle(self) -> tuple[int, int | None, int, int]:
        """Wait for the worker; (applied, last applied step or None, refused so far, first step
        refused since the previous settle, 0 if none).

        Raises:
            Exception: whatever the worker's last update raised, other than a refusal.
        """
        self.wait()
        first = self.first or 0
        self.first = None
        self.pending = 0
        return self.n, (self.last if self.n else None), self.refused, first

    def load_counters(self, num_averaged: int, last_step: int | None) -> None:
        """Set the counters (after loading a state or a reset); refusals and errors are forgotten."""
        self.wait(raise_error=False)
        self.n, self.last = num_averaged, last_step
        self.refused, self.first, self.pending = 0, None, 0

    def wait(self, *, raise_error: bool = True) -> None:
        """Wait until the worker has finished the update in flight, if any.

        Raises:
            Exception: what the update in flight raised (other than a refusal), with ``raise_error``.
        """
        thread = self._thread
        if thread is not None:
            thread.join()
            self._thread = None
        error, self._error = self._error, None
        if error is not None and raise_error:
            raise error

    # ------------------------------------------------------------------ update

    def execute(self, binding: _Binding, weights: dict[str, float], info: UpdateInfo) -> bool:
        """Snapshot ``binding``'s sources and hand the update at ``info.step`` to the worker
        (``weights`` are ignored: the worker forms them from its counters).

        Returns:
            True: accepted; a refusal is reported by :meth:`settle`.

        Raises:
            Exception: what the previous update raised in the worker (other than a refusal).
        """
        self.wait()
        ready = self._snapshot(binding)
        step = info.step
        thread = threading.Thread(target=self._work, args=(step, ready), name="weightavg-offload", daemon=True)
        self._thread = thread
        self.pending += 1
        thread.start()
        return True

    def copy(self, binding: _Binding) -> None:
        self.direct.copy(binding)

    def _work(self, step: int, ready: list[Any]) -> None:
        try:
            for event in ready:  # the snapshot's copies have landed (polled: no synchronising call)
                while not event.query():
                    time.sleep(_POLL)
            n, last = self.n, self.last
            info = UpdateInfo(n, step, step - last if last is not None else max(step, 1))
            weights = {slot: rule.weight(info) for slot, rule in self.rules.items()}
            try:
                applied = self.inner.execute(self.staged_binding, weights, info)  # type: ignore[arg-type]
            except NonFiniteError:
                applied = False
            if applied:
                self.n, self.last = n + 1, step
            else:
                self.refused += 1
                if self.first is None:
                    self.first = step
        except BaseException as e:  # reported at the next update or read, in the caller's thread
            self._error = e

    # ------------------------------------------------------------------ the snapshot

    def _snapshot(self, binding: _Binding) -> list[Any]:
        """Queue the copies of the sources into the staging; returns the events to wait for."""
        if self.staged_binding is None:
            self._make_staging()
        if self._copies is None or self._copies[0] is not binding:
            self._copies = (binding, self._copy_lists(binding))
        ready = []
        with torch.no_grad():
            for device, dsts, srcs in self._copies[1]:
                if device.type != "cuda":
                    torch._foreach_copy_(dsts, srcs)
                    continue
                current = torch.cuda.current_stream(device)
                side = self._streams.get(device)
                if side is None:
                    side = self._streams[device] = torch.cuda.Stream(device)
                side.wait_stream(current)  # the sources as the work queued so far leaves them
                with torch.cuda.stream(side):
                    torch._foreach_copy_(dsts, srcs, non_blocking=True)
                    done = torch.cuda.Event()
                    done.record(side)
                current.wait_event(done)  # later writes to the sources wait for the copies
                ready.append(done)
        return ready

    def _make_staging(self) -> None:
        groups = self.storage.groups
        with torch.inference_mode(False):
            self.staging = [
                torch.empty(g.numel, dtype=g.src_dtype, device=g.dev, pin_memory=g.src_device.type == "cuda")
                if g.averaged else None
                for g in groups
            ]
        srcs: list[list[Tensor]] = []
        spans: list[Tensor | None] = []
        for g, buf in zip(groups, self.staging, strict=True):
            if buf is None:
                srcs.append([])
                spans.append(None)
                continue
            srcs.append([buf[e.offset : e.offset + e.numel] for e in g.entries])
            spans.append(buf)
        n = len(groups)
        self.staged_binding = _Binding(_static, srcs, [None] * n, [0] * n, [True] * n, spans)

    def _copy_lists(self, binding: _Binding) -> list[tuple[torch.device, list[Tensor], list[Tensor]]]:
        """(source device, staging views, sources) per source device, for one binding."""
        by_device: dict[torch.device, tuple[list[Tensor], list[Tensor]]] = {}
        for gi, g in enumerate(self.storage.groups):
            buf = self.staging[gi]
            if buf is None:
                continue
            dsts, srcs = by_device.setdefault(g.src_device, ([], []))
            span = binding.spans[gi]
            if span is not None:  # the sources tile one range: one copy
                dsts.append(buf)
                srcs.append(span)
                continue
            for e, t in zip(g.entries, binding.srcs[gi]):  # noqa: B905 (a source per entry)
                dsts.append(buf[e.offset : e.offset + e.numel].view(t.shape))
                srcs.append(t)
        return [(dev, d, s) for dev, (d, s) in by_device.items()]


def _private_group() -> Any:
    """A gloo group of every rank, for the worker's agreement on a checked update (None when
    torch.distributed is not initialised)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return None
    return dist.new_group(backend="gloo")
