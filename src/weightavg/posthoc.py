"""Post-hoc EMA (Karras et al., EDM2, CVPR 2024): choose the EMA length after training.

:class:`PostHocEMA` tracks power-function EMAs (weights ∝ τ^γ over the run so far, one γ per
``sigma_rels`` entry) in one engine pass and writes snapshots of each into a directory described by
a manifest. :func:`reconstruct` then builds the EMA of another length from those snapshots: the
snapshots' averaging profiles ``pᵢ(τ) = (γᵢ+1) τ^γᵢ / tᵢ^(γᵢ+1)`` on ``(0, tᵢ]`` are combined as
``Σ cᵢ pᵢ`` to fit the target profile in least squares (closed-form inner products, float64), the
coefficients are normalised to sum to 1, and the same combination of the snapshots' weights is the
reconstructed EMA.

Why it is exact on the discrete run: the ``karras_ema`` rule updates with ``β = (t_prev/t)^(γ+1)``,
so the tracked EMA at time ``t`` is ``∫₀ᵗ p(τ) θ(τ) dτ`` with ``θ`` held constant between updates.
A combination of snapshots is therefore ``∫ (Σ cᵢ pᵢ) θ``, which equals the target EMA up to the
profile residual (reported as a relative L2 norm: how well this σ_rel is representable from these
snapshots).

Directory layout: ``manifest.json`` (the only authority on what belongs to the run: files not in
it are ignored, files in it are checked against their SHA-256) and one safetensors file per
snapshot (float16 by default). Snapshots are read with safetensors only, never with pickle.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ._accumulate import WeightedSum
from ._duration import Duration
from ._engine import named_tensors
from ._errors import ConfigError, StateError, WeightAvgError, bad_arg
from ._files import InputError, atomic_output, is_plain_name, member
from ._policy import AveragingPolicy, TimeLike, _Time
from ._rules import Rule, karras_ema, sigma_rel_to_gamma

__all__ = [
    "PostHocEMA",
    "Reconstruction",
    "SnapshotError",
    "gamma_to_sigma_rel",
    "profile_coefficients",
    "read_manifest",
    "reconstruct",
]

MANIFEST = "manifest.json"
FORMAT = "weightavg.PostHocEMA"
FORMAT_VERSION = 1
_BN_STATS = ("running_mean", "running_var")
_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32,
           "float64": torch.float64}


class SnapshotError(WeightAvgError):
    """A post-hoc EMA directory, manifest or snapshot cannot be used (missing, altered, unsafe).

    Examples:
        >>> import tempfile
        >>> from weightavg.posthoc import SnapshotError, read_manifest
        >>> try:
        ...     read_manifest(tempfile.mkdtemp())
        ... except SnapshotError as e:
        ...     print("no manifest" if "no manifest.json" in str(e) else e)
        no manifest
    """


# ----------------------------------------------------------------------------- files


def _member(directory: Path, name: object) -> Path:
    """``directory / name`` for a plain file name from a manifest; refuses anything that could leave it.

    A missing file is returned as is (the caller reports it in its own words); the checks are the
    shared ones of :func:`weightavg._files.member`.

    Raises:
        SnapshotError: not a plain file name (separators, ``..``, hidden, NUL), or a path that is
            not a regular file inside ``directory`` (links out of it and special files are refused).
    """
    if not is_plain_name(name):
        raise SnapshotError(f"{directory}: manifest names {name!r}: expected a plain file name inside "
                            "the directory (no separators, no '..', not hidden)")
    assert isinstance(name, str)
    if not os.path.lexists(directory / name):
        return directory / name
    try:
        return member(directory, name, what="the manifest")
    except InputError as err:
        raise SnapshotError(str(err)) from None


def _atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (the shared writer: a temporary sibling, fsync, one rename).

    On any failure (KeyboardInterrupt and SIGTERM included) the temporary file is removed and
    ``path`` is left as it was.
    """
    with atomic_output(path, force=True) as tmp:
        tmp.write_bytes(data)


def _require_safetensors() -> None:
    import importlib.util

    if importlib.util.find_spec("safetensors") is None:
        raise ConfigError("post-hoc EMA and disk snapshots need the 'safetensors' package: "
                          "pip install 'weightavg[safetensors]'")


def _serialize(tensors: Mapping[str, Tensor], metadata: dict[str, str]) -> bytes:
    from safetensors.torch import save

    return bytes(save({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata))


def _read_snapshot(directory: Path, entry: Mapping[str, Any]) -> dict[str, Tensor]:
    """One snapshot's tensors, checked against the manifest's checksum (safetensors only)."""
    from safetensors.torch import load

    path = _member(directory, entry.get("file"))
    try:
        with open(path, "rb", opener=_no_follow) as f:
            data = f.read()
    except FileNotFoundError as err:
        raise SnapshotError(f"{path}: listed in the manifest but missing") from err
    except OSError as err:
        raise SnapshotError(f"{path}: cannot read it ({err})") from err
    digest = hashlib.sha256(data).hexdigest()
    if entry.get("sha256") and digest != entry["sha256"]:
        raise SnapshotError(f"{path}: SHA-256 {digest[:12]}… differs from the manifest's "
                            f"{str(entry['sha256'])[:12]}… (altered, truncated or from another run)")
    try:
        return dict(load(data))
    except Exception as err:
        raise SnapshotError(f"{path}: not a readable safetensors file ({' '.join(str(err).split())[:200]})") from err


def _no_follow(path: str, flags: int) -> int:
    return os.open(path, flags | getattr(os, "O_NOFOLLOW", 0))


def read_manifest(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """The manifest of a post-hoc EMA directory, validated (every file name a plain member).

    Returns:
        The parsed ``manifest.json``: ``sigma_rels``, ``gammas``, ``tensors`` (name -> shape,
        dtype) and ``snapshots`` (one entry per file: ``file``, ``step``, ``gamma``, ``sha256``...).

    Raises:
        SnapshotError: no manifest, not JSON, another format, or unsafe/malformed entries.

    Examples:
        See :class:`PostHocEMA` for a directory to read;

        >>> from weightavg.posthoc import read_manifest
        >>> read_manifest  # doctest: +ELLIPSIS
        <function read_manifest at ...>
    """
    d = Path(directory)
    path = _member(d, MANIFEST)
    try:
        with open(path, "rb", opener=_no_follow) as f:
            manifest = json.loads(f.read().decode("utf-8"))
    except FileNotFoundError as err:
        raise SnapshotError(f"{d}: no {MANIFEST} (not a weightavg.PostHocEMA directory?)") from err
    except (OSError, ValueError) as err:
        raise SnapshotError(f"{path}: not a readable JSON manifest ({err})") from err
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise SnapshotError(f"{path}: not a {FORMAT} manifest")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise SnapshotError(f"{path}: format_version={version!r}; this weightavg reads <= {FORMAT_VERSION}")
    snaps = manifest.get("snapshots")
    if not isinstance(snaps, list) or not isinstance(manifest.get("tensors"), dict):
        raise SnapshotError(f"{path}: malformed (no 'snapshots' list or 'tensors' table)")
    for s in snaps:
        if not isinstance(s, dict):
            raise SnapshotError(f"{path}: malformed snapshot entry {s!r}")
        _member(d, s.get("file"))
        for k in ("step", "gamma"):
            v = s.get(k)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise SnapshotError(f"{path}: snapshot {s.get('file')!r} has {k}={v!r}")
        if s["step"] <= 0 or s["gamma"] <= -1:
            raise SnapshotError(f"{path}: snapshot {s.get('file')!r} has step={s['step']!r}, "
                                f"gamma={s['gamma']!r} (expected step > 0, gamma > -1)")
    return manifest


# ----------------------------------------------------------------------------- profiles


def gamma_to_sigma_rel(gamma: float) -> float:
    """Relative standard deviation of the power-function EMA with exponent ``gamma`` (> −1).

    The inverse of :func:`weightavg.sigma_rel_to_gamma`: ``σ_rel = √((γ+1) / ((γ+2)² (γ+3)))``.

    Returns:
        σ_rel, a float in (0, φ^(−5/2) ≈ 0.30028].

    Raises:
        ConfigError: ``gamma`` is not a number > −1.

    Examples:
        >>> import weightavg
        >>> from weightavg.posthoc import gamma_to_sigma_rel
        >>> round(gamma_to_sigma_rel(weightavg.sigma_rel_to_gamma(0.1)), 6)
        0.1
    """
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not gamma > -1:
        raise bad_arg("gamma", gamma, "a number > -1")
    g = float(gamma)
    return math.sqrt((g + 1) / ((g + 2) ** 2 * (g + 3)))


def _log_dot(t_a: Tensor, g_a: Tensor, t_b: Tensor, g_b: Tensor) -> Tensor:
    """log ∫ p_a p_b for power profiles p(τ) = (γ+1) τ^γ / t^(γ+1) on (0, t] (broadcasting, float64)."""
    m = torch.minimum(t_a, t_b)
    s = g_a + g_b + 1.0
    return (torch.log((g_a + 1.0) * (g_b + 1.0) / s) + s * torch.log(m)
            - (g_a + 1.0) * torch.log(t_a) - (g_b + 1.0) * torch.log(t_b))


def profile_coefficients(
    steps: Sequence[float], gammas: Sequence[float], target_step: float, target_gamma: float
) -> tuple[list[float], float]:
    """Least-squares coefficients of snapshot profiles fitting a target profile, and the residual.

    Solves ``min_c ‖Σ cᵢ pᵢ − p‖₂`` over ``τ`` with the closed-form inner products
    ``∫ pᵢ pⱼ = (γᵢ+1)(γⱼ+1) min(tᵢ,tⱼ)^(γᵢ+γⱼ+1) / ((γᵢ+γⱼ+1) tᵢ^(γᵢ+1) tⱼ^(γⱼ+1))`` in float64,
    then normalises ``c`` to sum to 1 (EDM2), so the reconstruction is a weighted average.

    Returns:
        ``(coefficients, relative_residual)`` where the residual is ``‖Σ cᵢ pᵢ − p‖ / ‖p‖`` of the
        normalised coefficients (0: the target is exactly representable).

    Raises:
        ConfigError: no snapshot, a snapshot after ``target_step``, or a degenerate solution.

    Examples:
        >>> from weightavg.posthoc import profile_coefficients
        >>> c, residual = profile_coefficients([100], [6.94], 100, 6.94)  # the target itself
        >>> [round(x, 6) for x in c], round(residual, 6)
        ([1.0], 0.0)
    """
    if not steps:
        raise bad_arg("steps", list(steps), "at least one snapshot")
    if len(steps) != len(gammas):
        raise bad_arg("gammas", len(gammas), f"one per snapshot ({len(steps)})")
    if any(s > target_step for s in steps):
        raise bad_arg("steps", max(steps), f"snapshots at or before the target step {target_step}")
    f64 = torch.float64
    t = torch.tensor([float(s) for s in steps], dtype=f64) / float(target_step)  # times in (0, 1]
    g = torch.tensor([float(x) for x in gammas], dtype=f64)
    tr = torch.ones((), dtype=f64)
    gr = torch.tensor(float(target_gamma), dtype=f64)
    a = torch.exp(_log_dot(t[:, None], g[:, None], t[None, :], g[None, :]))
    b = torch.exp(_log_dot(t, g, tr, gr))
    # scale rows/columns to unit diagonal: the Gram matrix of long and short profiles spans decades
    d = torch.sqrt(torch.diagonal(a))
    sol = torch.linalg.lstsq((a / d[:, None] / d[None, :]), (b / d)[:, None], driver="gelsd").solution
    c = sol[:, 0] / d
    total = c.sum()
    if not torch.isfinite(c).all() or abs(float(total)) < 1e-12:
        raise ConfigError(f"cannot fit the profile with gamma={target_gamma:g} at step {target_step}: "
                          "the least-squares coefficients are degenerate")
    c = c / total
    pp = (gr + 1.0) ** 2 / (2.0 * gr + 1.0)  # ∫ p² with t = 1
    r2 = float(c @ a @ c - 2.0 * (c @ b) + pp)
    rel = math.sqrt(max(r2, 0.0) / float(pp))
    return [float(x) for x in c], rel


# ----------------------------------------------------------------------------- the policy


class PostHocEMA(AveragingPolicy):
    """Power-function EMAs tracked in one engine pass, with snapshots for post-hoc reconstruction.

    Every ``update_interval`` each EMA (one per ``sigma_rels`` entry, rule
    :func:`~weightavg.karras_ema`) takes the weights in; every ``snapshot_every`` each EMA is written
    as a safetensors file into ``directory`` and listed in its ``manifest.json``. After (or during)
    training, :func:`weightavg.posthoc.reconstruct` or ``weightavg posthoc DIR`` builds the EMA of
    any σ_rel from them.

    .. note::
        The EMA with exponent γ at time ``t`` weighs the iterate at ``τ`` by ``(γ+1) τ^γ / t^(γ+1)``;
        its width relative to ``t`` is ``σ_rel`` (``sigma_rel_to_gamma``). Time is counted in
        optimizer steps from the start of the run.

    Args:
        directory: where snapshots and the manifest go (created; a directory holding another run's
            manifest is refused unless ``overwrite=True`` or this policy resumes that run).
        sigma_rels: the σ_rel of each tracked EMA (default ``(0.05, 0.10)``, as EDM2).
        snapshot_every: time between snapshots (a duration, e.g. ``'1ep'``, ``'5000ba'``).
        update_interval: time between EMA updates (default every step).
        snapshot_dtype: dtype of floating tensors in the snapshots (default float16).
        eval_sigma_rel: which tracked EMA :meth:`averaged` and ``final="averaged"`` use (default
            the first of ``sigma_rels``).
        overwrite: allow a fresh run in a directory that holds another run's manifest (its
            entries are dropped; its files are left alone until overwritten).
        **kwargs: see :class:`~weightavg.AveragingPolicy` (``eval_with``, ``final``, averager
            options). ``recompute_bn`` is not supported: BatchNorm statistics are averaged along
            with the weights (``buffers='average'``).

    Raises:
        ConfigError: bad σ_rel, durations, dtype or directory; ``start``/``end`` or
            ``recompute_bn=True`` given; a sharded (DTensor) model at :meth:`begin`.

    Examples:
        Two EMAs, a snapshot every 2 steps, then the EMA of another σ_rel rebuilt from the files
        (needs ``safetensors``):

        >>> import tempfile, torch
        >>> from weightavg.posthoc import PostHocEMA, reconstruct
        >>> model = torch.nn.Linear(2, 1)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> d = tempfile.mkdtemp()
        >>> phema = PostHocEMA(d, sigma_rels=(0.05, 0.15), snapshot_every="2ba")
        >>> phema.begin(model, opt)
        >>> for _ in range(6):
        ...     model(torch.randn(4, 2)).sum().backward(); opt.step(); opt.zero_grad()
        >>> state = phema.state_dict()  # checkpoint it with the model
        >>> with phema.averaged() as m:  # the σ_rel=0.05 EMA inside, restored on exit
        ...     _ = m(torch.randn(1, 2))
        >>> phema.end()
        >>> r = reconstruct(d, sigma_rel=0.10, warn=False)
        >>> r.step, sorted(r.state_dict)
        (6, ['bias', 'weight'])

    References:
        Karras et al., *Analyzing and Improving the Training Dynamics of Diffusion Models*,
        CVPR 2024.
    """

    _kind = "posthoc_ema"

    def __init__(
        self,
        directory: str | os.PathLike[str],
        sigma_rels: Sequence[float] = (0.05, 0.10),
        snapshot_every: TimeLike = "1ep",
        update_interval: TimeLike = 1,
        *,
        snapshot_dtype: torch.dtype = torch.float16,
        eval_sigma_rel: float | None = None,
        overwrite: bool = False,
        **kwargs: Any,
    ) -> None:
        if kwargs.get("recompute_bn"):
            raise bad_arg("recompute_bn", True, "False: post-hoc EMA snapshots average BatchNorm "
                          "statistics with the weights (recompute them after reconstruction)")
        for k in ("start", "end"):
            if k in kwargs:
                raise bad_arg(k, kwargs[k], "not given: power-function EMAs average from step 0")
        kwargs["recompute_bn"] = False
        if isinstance(directory, bool) or not isinstance(directory, (str, os.PathLike)):
            raise bad_arg("directory", directory, "a directory path")
        if isinstance(sigma_rels, (int, float)) or not isinstance(sigma_rels, Sequence) or not sigma_rels:
            raise bad_arg("sigma_rels", sigma_rels, "a non-empty sequence of numbers in (0, 0.408)")
        gammas = [_gamma_of(s) for s in sigma_rels]
        if len(set(sigma_rels)) != len(sigma_rels):
            raise bad_arg("sigma_rels", list(sigma_rels), "distinct values")
        if snapshot_dtype not in _DTYPES.values():
            raise bad_arg("snapshot_dtype", snapshot_dtype, "torch.float16, bfloat16, float32 or float64")
        if eval_sigma_rel is None:
            eval_sigma_rel = float(sigma_rels[0])
        if eval_sigma_rel not in sigma_rels:
            raise bad_arg("eval_sigma_rel", eval_sigma_rel, f"one of sigma_rels {list(sigma_rels)}")
        self.snapshot_every = Duration.parse(snapshot_every, name="snapshot_every")
        if self.snapshot_every.value <= 0:
            raise bad_arg("snapshot_every", snapshot_every, "a positive duration")
        super().__init__(start=0, end=None, update_interval=update_interval, **kwargs)
        self.directory = Path(directory)
        self.sigma_rels = [float(s) for s in sigma_rels]
        self.gammas = gammas
        self.snapshot_dtype = snapshot_dtype
        self.eval_sigma_rel = float(eval_sigma_rel)
        self.overwrite = bool(overwrite)
        self.snapshots: list[dict[str, Any]] = []  # manifest entries written by this run
        self._t_snapshot: _Time = _Time(1, "epoch")
        self._tensor_table: dict[str, dict[str, Any]] = {}
        self._resumed = False

    @property
    def _slots(self) -> list[str]:
        return [f"p{i}" for i in range(len(self.sigma_rels))]

    @property
    def _eval_slot(self) -> str:
        return self._slots[self.sigma_rels.index(self.eval_sigma_rel)]

    def _extra_repr(self) -> str:
        return (f"directory={str(self.directory)!r}, sigma_rels={self.sigma_rels!r}, "
                f"snapshot_every='{self.snapshot_every}', ")

    def _make_rule(self, resolve: Callable[[Duration, str], _Time]) -> Rule:
        self._t_snapshot = resolve(self.snapshot_every, "snapshot_every")
        if self._t_snapshot.value <= 0:
            raise bad_arg("snapshot_every", str(self.snapshot_every), "at least one step or epoch")
        rules = {slot: karras_ema(gamma=g) for slot, g in zip(self._slots, self.gammas, strict=True)}
        return rules  # type: ignore[return-value]  # the engine keeps several rules in one pass

    # ------------------------------------------------------------------ begin / end

    def begin(self, model: nn.Module, optimizers: Any = None, **kwargs: Any) -> None:
        """Start tracking; see :meth:`weightavg.AveragingPolicy.begin`.

        Raises:
            ConfigError: a sharded (DTensor) model, a directory holding another run, or
                ``safetensors`` not installed.
        """
        if isinstance(model, nn.Module) and _is_sharded(model):
            raise ConfigError("PostHocEMA does not support sharded (DTensor/FSDP2) models yet: "
                              "snapshots of a sharded run need distributed checkpoints")
        _require_safetensors()
        self._resumed = False
        super().begin(model, optimizers, **kwargs)
        self._tensor_table = self._describe(model)
        if _rank() == 0:
            self.directory.mkdir(parents=True, exist_ok=True)
            if not self._resumed:
                existing = self.directory / MANIFEST
                if (existing.exists() or existing.is_symlink()) and not self.overwrite:
                    self.detach()
                    raise ConfigError(f"{self.directory} already holds a post-hoc EMA manifest of another "
                                      "run: give a new directory, resume that run (load its state), "
                                      "or pass overwrite=True")
        if not self._resumed:
            self.snapshots = []  # a fresh run (also a second fit with this policy)
        if _rank() == 0:
            self._write_manifest()

    def _describe(self, model: nn.Module) -> dict[str, dict[str, Any]]:
        assert self.averager is not None
        info = named_tensors(model)
        return {name: {"shape": list(info[name][0].shape),
                       "dtype": str(info[name][0].dtype).replace("torch.", ""),
                       "param": bool(info[name][1])}
                for name in self.averager.names}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` (the manifest is rewritten to the restored entries).

        Raises:
            StateError: not a policy state, a newer format, another policy's state, or other
                ``sigma_rels``.
            SnapshotError: a restored manifest entry that is not a plain file name in the directory.

        Examples:
            >>> import tempfile, torch
            >>> from weightavg.posthoc import PostHocEMA
            >>> model, d = torch.nn.Linear(2, 1), tempfile.mkdtemp()
            >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
            >>> a = PostHocEMA(d, snapshot_every="1ba")
            >>> a.begin(model, opt)
            >>> model(torch.randn(3, 2)).sum().backward(); opt.step()
            >>> state = a.state_dict()
            >>> a.end()
            >>> b = PostHocEMA(d, snapshot_every="1ba")  # a resumed run, same directory
            >>> b.load_state_dict(state)
            >>> b.begin(model, opt)
            >>> len(b.snapshots)  # the two EMAs' snapshots at step 1
            2
        """
        super().load_state_dict(state)
        if self.model is not None and self.averager is not None and _rank() == 0:
            self._write_manifest()

    @torch.no_grad()
    def end(self) -> None:
        """End of training: a last snapshot (if new weights came in since the last one), then ``final``.

        Raises:
            StateError: the policy was not begun.
        """
        self._require_begun()
        if self.has_average and (not self.snapshots or self.snapshots[-1]["step"] < self._ema_step()):
            self._snapshot()
        if self.has_average and self.final == "averaged":
            assert self.averager is not None and self.model is not None
            self.averager.copy_to(self.model, which=self._eval_slot)
        self.detach()
        self._ended = True

    @contextlib.contextmanager
    def averaged(self, *, collective: bool = True) -> Iterator[nn.Module]:
        """The model with the EMA of ``eval_sigma_rel`` in it, restored on exit.

        ``collective`` is accepted for the front ends (see :meth:`AveragingPolicy.averaged`); this
        policy runs no collective here either way.

        Yields:
            The model, holding the EMA (or its own weights before the first update).

        Raises:
            StateError: the policy was not begun.
        """
        self._require_begun()
        assert self.model is not None
        if not self.has_average:
            yield self.model
            return
        assert self.averager is not None
        with self.averager.swapped_in(self.model, which=self._eval_slot):
            yield self.model

    # ------------------------------------------------------------------ snapshots

    def _step_event(self) -> None:
        super()._step_event()
        t = self._t_snapshot
        if t.unit == "step" and self.steps % t.value == 0:
            self._snapshot()

    def on_epoch_end(self) -> None:
        """Tell the policy that an epoch ended (snapshots every whole epochs are taken here).

        Examples:
            >>> import tempfile, torch
            >>> from weightavg.posthoc import PostHocEMA
            >>> model = torch.nn.Linear(2, 1)
            >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
            >>> phema = PostHocEMA(tempfile.mkdtemp(), snapshot_every="1ep")
            >>> phema.begin(model, opt)
            >>> model(torch.randn(3, 2)).sum().backward(); opt.step()
            >>> phema.on_epoch_end()  # one snapshot per tracked EMA
            >>> len(phema.snapshots)
            2
            >>> phema.end()
        """
        super().on_epoch_end()
        t = self._t_snapshot
        if t.unit == "epoch" and self.epochs % t.value == 0:
            self._snapshot()

    def _ema_step(self) -> int:
        assert self.averager is not None
        return int(self.averager.last_step or 0)

    @torch.no_grad()
    def _snapshot(self) -> None:
        """Write every tracked EMA as it stands (rank 0 only; no collective on this path)."""
        if not self.has_average:
            return
        assert self.averager is not None
        step = self._ema_step()
        if self.snapshots and self.snapshots[-1]["step"] >= step:
            return  # no update since the last snapshot: the same EMA
        rank0 = _rank() == 0
        entries: list[dict[str, Any]] = []
        try:
            for i, (slot, s, g) in enumerate(zip(self._slots, self.sigma_rels, self.gammas, strict=True)):
                entry: dict[str, Any] = {"file": f"phema-{i}-{step:010d}.safetensors", "step": step,
                                         "optimizer_step": self.steps, "epoch": self.epochs,
                                         "sigma_rel": s, "gamma": g, "profile": i, "sha256": None}
                if rank0:
                    tensors = {n: (t.to(self.snapshot_dtype) if t.is_floating_point() else t).cpu()
                               for n, t in self.averager.averaged_tensors(slot).items()}
                    # one metadata key: safetensors orders several keys differently in every process
                    meta = json.dumps({"format": FORMAT, "step": step, "sigma_rel": s, "gamma": g},
                                      sort_keys=True)
                    data = _serialize(tensors, {"weightavg": meta})
                    entry["sha256"] = hashlib.sha256(data).hexdigest()
                    entry["bytes"] = len(data)
                    _atomic_write(_member(self.directory, entry["file"]), data)
                entries.append(entry)
            if rank0:
                self._write_manifest(self.snapshots + entries)
        except OSError as err:  # a full disk must not kill training: this snapshot is skipped
            warnings.warn(f"PostHocEMA: the snapshot at step {step} was not written ({err}); the "
                          "manifest still lists the earlier ones and training goes on", UserWarning,
                          stacklevel=2)
            return
        self.snapshots.extend(entries)

    def _write_manifest(self, snapshots: list[dict[str, Any]] | None = None) -> None:
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "time_unit": "step",
            "sigma_rels": self.sigma_rels,
            "gammas": self.gammas,
            "dtype": str(self.snapshot_dtype).replace("torch.", ""),
            "update_interval": str(self.update_interval),
            "snapshot_every": str(self.snapshot_every),
            "tensors": self._tensor_table,
            "snapshots": self.snapshots if snapshots is None else snapshots,
        }
        _atomic_write(self.directory / MANIFEST, (json.dumps(manifest, indent=1) + "\n").encode())

    # ------------------------------------------------------------------ checkpointing

    def state_dict(self) -> dict[str, Any]:
        """The policy's state (EMAs, counters) and the manifest entries written so far.

        Returns:
            A dict of tensors and plain data for ``torch.save`` (``weights_only`` loadable); see
            :meth:`load_state_dict` for an example.
        """
        state = super().state_dict()
        if "posthoc" not in state:
            state["posthoc"] = {"snapshots": [dict(s) for s in self.snapshots],
                                "sigma_rels": list(self.sigma_rels)}
        return state

    def _apply_state(self, state: Mapping[str, Any]) -> None:
        super()._apply_state(state)
        ph = state.get("posthoc")
        if ph is None or (not ph.get("snapshots") and state.get("averager") is None):
            return  # a fresh state (e.g. the HF adapter's initial state)
        if [float(s) for s in ph["sigma_rels"]] != self.sigma_rels:
            raise StateError(f"post-hoc EMA state tracks sigma_rels={ph['sigma_rels']}, this policy "
                             f"{self.sigma_rels}")
        self.snapshots = [dict(s) for s in ph["snapshots"]]
        for s in self.snapshots:
            _member(self.directory, s["file"])
        self._resumed = True


def _rank() -> int:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return int(dist.get_rank())
    return 0


def _is_sharded(model: nn.Module) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        return False
    return any(isinstance(p, DTensor) for p in model.parameters())


# ----------------------------------------------------------------------------- reconstruction


@dataclass
class Reconstruction:
    """One reconstructed EMA, returned by :func:`reconstruct` (see :class:`PostHocEMA` for a run).

    Examples:
        >>> import tempfile, torch
        >>> from weightavg.posthoc import PostHocEMA, reconstruct
        >>> model, d = torch.nn.Linear(2, 1), tempfile.mkdtemp()
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> phema = PostHocEMA(d, sigma_rels=(0.05, 0.15), snapshot_every="2ba")
        >>> phema.begin(model, opt)
        >>> for _ in range(4):
        ...     model(torch.randn(4, 2)).sum().backward(); opt.step(); opt.zero_grad()
        >>> phema.end()
        >>> r = reconstruct(d, sigma_rel=0.05, warn=False)  # a tracked profile: exact
        >>> r.relative_residual < 1e-6, round(sum(r.coefficients.values()), 6)
        (True, 1.0)
        >>> sorted(r.summary())
        ['buffers_from', 'coefficients', 'gamma', 'relative_residual', 'sigma_rel', 'step', 'warnings']

    Attributes:
        state_dict: the weights (tracked tensors, in the model's own dtypes): parameters
            reconstructed, buffers taken from ``buffers_from``.
        sigma_rel, gamma: the target profile.
        step: the target time (optimizer steps).
        coefficients: snapshot file -> its coefficient (summing to 1).
        relative_residual: ``‖Σ cᵢ pᵢ − p‖ / ‖p‖`` of the profiles (how representable it is).
        buffers_from: the snapshot file whose buffers were taken (None: the model has none).
        warnings: what the caller should know (poor fit, BatchNorm statistics).
    """

    state_dict: dict[str, Tensor]
    sigma_rel: float
    gamma: float
    step: int
    coefficients: dict[str, float]
    relative_residual: float
    buffers_from: str | None
    warnings: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """JSON-ready description (everything but the tensors).

        Returns:
            A dict of the attributes except ``state_dict``.
        """
        return {"sigma_rel": self.sigma_rel, "gamma": self.gamma, "step": self.step,
                "relative_residual": self.relative_residual, "coefficients": self.coefficients,
                "buffers_from": self.buffers_from, "warnings": list(self.warnings)}


def _gamma_of(sigma_rel: float) -> float:
    """``sigma_rel_to_gamma`` checked by the forward formula (σ_rel above ~0.30 has no profile)."""
    g = sigma_rel_to_gamma(sigma_rel)
    if not math.isclose(gamma_to_sigma_rel(g), float(sigma_rel), rel_tol=1e-6):
        raise bad_arg("sigma_rel", sigma_rel, "a value a power-function EMA reaches (about 0 < sigma_rel "
                      "< 0.30)")
    return g


def _targets(sigma_rel: float | Sequence[float] | None, gamma: float | Sequence[float] | None
             ) -> list[tuple[float, float]]:
    if (sigma_rel is None) == (gamma is None):
        raise bad_arg("sigma_rel/gamma", (sigma_rel, gamma), "exactly one of them")
    if sigma_rel is not None:
        values = [sigma_rel] if isinstance(sigma_rel, (int, float)) else list(sigma_rel)
        if not values:
            raise bad_arg("sigma_rel", sigma_rel, "at least one value")
        return [(float(s), _gamma_of(s)) for s in values]
    assert gamma is not None
    gs = [gamma] if isinstance(gamma, (int, float)) else list(gamma)
    if not gs:
        raise bad_arg("gamma", gamma, "at least one value")
    return [(gamma_to_sigma_rel(g), float(g)) for g in gs]


@torch.no_grad()
def reconstruct(
    directory: str | os.PathLike[str],
    sigma_rel: float | Sequence[float] | None = None,
    step: int | None = None,
    *,
    gamma: float | Sequence[float] | None = None,
    max_residual: float = 0.05,
    warn: bool = True,
) -> Reconstruction | list[Reconstruction]:
    """Reconstruct the power-function EMA of any σ_rel at ``step`` from a :class:`PostHocEMA` run.

    Only snapshots listed in the manifest, at or before ``step``, are used; each is read once
    (checksum verified, safetensors only) and folded into one float64 accumulator per requested
    profile, so memory is those accumulators plus one snapshot.

    Args:
        directory: the policy's directory.
        sigma_rel: target σ_rel, or several (one reconstruction each, in one pass).
        step: target time in optimizer steps (default: the latest snapshot's).
        gamma: target exponent(s) instead of ``sigma_rel``.
        max_residual: relative profile residual above which a warning says the fit is poor.
        warn: also issue the warnings with :func:`warnings.warn`.

    Returns:
        A :class:`Reconstruction` (a list of them when ``sigma_rel``/``gamma`` is a sequence).

    Raises:
        SnapshotError: no usable manifest, a snapshot missing, altered or unsafe.
        ConfigError: bad targets, ``step`` before the first snapshot, no snapshot yet, or
            ``safetensors`` not installed.

    Examples:
        >>> import tempfile, torch
        >>> from weightavg.posthoc import PostHocEMA, reconstruct
        >>> model, d = torch.nn.Linear(2, 1), tempfile.mkdtemp()
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> phema = PostHocEMA(d, sigma_rels=(0.05, 0.15), snapshot_every="2ba")
        >>> phema.begin(model, opt)
        >>> for _ in range(4):
        ...     model(torch.randn(4, 2)).sum().backward(); opt.step(); opt.zero_grad()
        >>> phema.end()
        >>> rs = reconstruct(d, sigma_rel=[0.08, 0.12], step=2, warn=False)  # two, in one pass
        >>> [(round(r.sigma_rel, 2), r.step, sorted(r.state_dict)) for r in rs]
        [(0.08, 2, ['bias', 'weight']), (0.12, 2, ['bias', 'weight'])]
    """
    _require_safetensors()
    d = Path(directory)
    manifest = read_manifest(d)
    targets = _targets(sigma_rel, gamma)
    snaps = manifest["snapshots"]
    if not snaps:
        raise ConfigError(f"{d}: the manifest lists no snapshot yet")
    first = min(int(s["step"]) for s in snaps)
    if step is None:
        step = max(int(s["step"]) for s in snaps)
    if isinstance(step, bool) or not isinstance(step, int) or step <= 0:
        raise bad_arg("step", step, "a positive number of optimizer steps")
    if step < first:
        raise bad_arg("step", step, f"a time at or after the first snapshot (step {first}): "
                                    "nothing was saved before it")
    used = [s for s in snaps if int(s["step"]) <= step]
    results: list[Reconstruction] = []
    coeffs: list[list[float]] = []
    for s_rel, g in targets:
        c, rel = profile_coefficients([float(s["step"]) for s in used], [float(s["gamma"]) for s in used],
                                      float(step), g)
        coeffs.append(c)
        notes = []
        if rel > max_residual:
            notes.append(f"sigma_rel={s_rel:g} at step {step} is poorly representable from these "
                         f"snapshots: relative profile residual {rel:.3g} > {max_residual:g} (snapshots "
                         "closer in sigma_rel or time, or more of them, fit better)")
        results.append(Reconstruction({}, s_rel, g, step, {s["file"]: ci for s, ci in zip(used, c, strict=True)},
                                      rel, None, notes))

    table: dict[str, Any] = manifest["tensors"]
    params = [n for n, info in table.items() if info.get("param")]
    # buffers: the latest snapshot at or before the target, of the profile closest to each target
    latest = max(int(s["step"]) for s in used)
    sums: list[WeightedSum | None] = [None] * len(targets)
    buffers: list[dict[str, Tensor]] = [{} for _ in targets]
    for j, entry in enumerate(used):
        tensors = _read_snapshot(d, entry)
        _check_snapshot(d, entry, tensors, table)
        floats = {n: tensors[n] for n in params}
        for k, c in enumerate(coeffs):
            acc = sums[k]
            if acc is None:
                acc = sums[k] = WeightedSum(floats, dtype=torch.float64)
            acc.add(floats, c[j])
        if int(entry["step"]) == latest:
            for k, (s_rel, _) in enumerate(targets):
                cur = results[k].buffers_from
                cur_entry = next((s for s in used if s["file"] == cur), None)
                closer = cur_entry is None or (abs(float(entry["sigma_rel"]) - s_rel)
                                               < abs(float(cur_entry["sigma_rel"]) - s_rel))
                if closer:
                    results[k].buffers_from = entry["file"] if len(table) > len(params) else None
                    buffers[k] = {n: t for n, t in tensors.items() if n not in params}
        del tensors, floats
    dtypes = {n: _DTYPES.get(str(info.get("dtype")), torch.float32) for n, info in table.items()}
    for k, res in enumerate(results):
        acc = sums[k]
        assert acc is not None
        out = acc.result(dtypes=dtypes)
        for n, t in buffers[k].items():
            out[n] = t.to(dtypes[n]) if t.is_floating_point() and n in dtypes else t
        res.state_dict = {n: out[n] for n in table if n in out}
        bn = [n for n in buffers[k] if n.rsplit(".", 1)[-1] in _BN_STATS]
        if bn:
            res.warnings.append(f"{len(bn)} BatchNorm statistics (e.g. {bn[0]}) come from snapshot "
                                f"{res.buffers_from} (averaged like weights, another profile): they are "
                                "not the statistics of the reconstructed weights: recompute them "
                                "(weightavg.recompute_bn) before evaluating")
        if warn:
            for w in res.warnings:
                warnings.warn(w, UserWarning, stacklevel=3)  # past torch.no_grad
    single = isinstance(sigma_rel, (int, float)) or isinstance(gamma, (int, float))
    return results[0] if single else results


def _check_snapshot(d: Path, entry: Mapping[str, Any], tensors: Mapping[str, Tensor],
                    table: Mapping[str, Any]) -> None:
    missing = sorted(set(table) - set(tensors))
    shapes = [n for n, info in table.items() if n in tensors and list(tensors[n].shape) != list(info["shape"])]
    if missing or shapes:
        raise SnapshotError(f"{d / str(entry['file'])}: does not match the manifest's tensors "
                            f"(missing: {missing[:5]}, other shapes: {shapes[:5]})")


def plot_profiles(results: Sequence[Reconstruction], manifest: Mapping[str, Any], path: str | os.PathLike[str]
                  ) -> None:
    """Draw each target profile and its reconstruction from the snapshots (needs matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise ConfigError("--plot needs matplotlib: pip install matplotlib") from err
    by_file = {s["file"]: s for s in manifest["snapshots"]}
    fig, ax = plt.subplots(figsize=(7, 4))
    for res in results:
        n = 400
        taus = [res.step * (i + 0.5) / n for i in range(n)]
        target = [(res.gamma + 1) * (x / res.step) ** res.gamma / res.step for x in taus]
        recon = [0.0] * n
        for f, c in res.coefficients.items():
            s = by_file[f]
            t, g = float(s["step"]), float(s["gamma"])
            for i, x in enumerate(taus):
                if x <= t:
                    recon[i] += c * (g + 1) * (x / t) ** g / t
        (line,) = ax.plot(taus, target, label=f"target σ_rel={res.sigma_rel:g}")
        ax.plot(taus, recon, "--", color=line.get_color(),
                label=f"reconstructed (residual {res.relative_residual:.2g})")
    ax.set_xlabel("training step τ")
    ax.set_ylabel("weight of the iterate at τ")
    ax.set_title(f"post-hoc EMA profiles at step {results[0].step}" if results else "post-hoc EMA")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.fspath(path), dpi=120, format="png")
    plt.close(fig)
