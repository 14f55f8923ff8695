"""SWAG: a Gaussian posterior over weights fitted to the SGD trajectory (Maddox et al., 2019)."""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from .._engine import Averager, Source, named_tensors, unwrap_model
from .._errors import MismatchError, StateError, bad_arg, describe_mismatch
from .._rules import mean
from .._sharded import refuse_sharded
from ._io import PathLike, dtype_from_name, load_state, save_state

__all__ = ["SWAG", "last_layer"]

FORMAT_VERSION = 1
DEFAULT_NUM_SAMPLES = 30


def last_layer(model: nn.Module) -> list[str]:
    """Canonical names of the parameters of the model's last module that owns parameters.

    "Last" is the order in which modules were registered (``model.named_modules()``), which is
    the forward order for ``nn.Sequential`` and for most hand-written models, but not for every
    model: check the returned names, or pass names/patterns to ``include`` yourself.

    Returns:
        The names, to pass as ``SWAG(model, include=...)`` for a last-layer posterior.

    Raises:
        ConfigError: ``model`` is not an ``nn.Module`` or has no parameter.

    Examples:
        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> last_layer(net)
        ['2.weight', '2.bias']
    """
    if not isinstance(model, nn.Module):
        raise bad_arg("model", type(model).__name__, "a torch.nn.Module")
    model = unwrap_model(model)
    owner: nn.Module | None = None
    for mod in model.modules():
        if any(p is not None for p in mod._parameters.values()):
            owner = mod
    if owner is None:
        raise bad_arg("model", type(model).__name__, "a model with at least one parameter")
    own = {id(p) for p in owner._parameters.values() if p is not None}
    return [n for n, (t, is_p) in named_tensors(model).items() if is_p and id(t) in own]


def model_targets(layout: Mapping[str, tuple[int, int, torch.Size]],
                  model: nn.Module) -> dict[str, Tensor]:
    """The model's tensor for each name of ``layout``, checked by name and shape."""
    if not isinstance(model, nn.Module):
        raise bad_arg("model", type(model).__name__, "a torch.nn.Module")
    tensors = named_tensors(model)
    missing = sorted(n for n in layout if n not in tensors)
    reshaped = [(n, tuple(shape), tuple(tensors[n][0].shape))
                for n, (_, _, shape) in layout.items()
                if n in tensors and tensors[n][0].shape != shape]
    if missing or reshaped:
        raise MismatchError("model does not match the posterior's tensors (paired by name): "
                            + describe_mismatch(missing, [], reshaped, left="posterior"))
    return {n: tensors[n][0] for n in layout}


def check_scale(scale: float) -> float:
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) \
            or scale < 0:
        raise bad_arg("scale", scale, "a finite float >= 0 (the variance multiplier)")
    return float(scale)


def check_num_samples(num_samples: int | None, default: int) -> int:
    if num_samples is None:
        return default
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise bad_arg("num_samples", num_samples, "a positive int (posterior samples to draw)")
    return num_samples


class SWAG:
    """SWAG posterior: SWA mean, diagonal variance and the last ``max_rank`` deviation columns.

    Collect snapshots (typically once per epoch of a constant- or cyclic-learning-rate phase) with
    :meth:`collect`; then draw weights with :meth:`sample`/:meth:`sample_into`, or average
    predictions with :func:`weightavg.swag.bma_predict`. The first and second moments are kept by
    one :class:`weightavg.Averager` in float64 (so the variance ``E[θ²] − E[θ]²`` does not cancel
    for float32 weights); the deviation columns live in a ring buffer of ``max_rank`` rows.

    .. note::
        After ``n`` collections of ``θ_1 … θ_n`` (flattened tracked tensors):
        ``θ̄ = (1/n) Σ θ_i``, ``Σ_diag = max((1/n) Σ θ_i² − θ̄², var_clamp)`` (population
        variance). Deviation convention (the reference's): at collection ``i`` the column
        ``d_i = θ_i − θ̄_i`` is stored, where ``θ̄_i`` is the running mean *including* ``θ_i``;
        ``D = [d_{n−K+1} … d_n]`` holds the ``K = min(n, max_rank)`` most recent columns. A
        sample is ``θ = θ̄ + √scale · (Σ_diag^½ ⊙ z₁ + D z₂ / √(K − 1))`` with ``z₁ ~ N(0, I_P)``,
        ``z₂ ~ N(0, I_K)``, so ``Cov(θ) = scale · (Σ_diag + D Dᵀ / (K − 1))``; ``scale = 0.5`` is
        the paper's ``½(Σ_diag + Σ_low-rank)``. With ``K < 2`` (or ``diag_only=True``) the
        low-rank term is left out (SWAG-Diag). The covariance is never formed.

    Args:
        model: the module whose weights get a posterior (the same architecture must be passed
            to every later call; tensors are paired by name).
        max_rank: ``K``, the number of deviation columns kept (0: SWAG-Diag only).
        params: ``"all"`` floating-point parameters or ``"trainable"`` ones.
        include: glob pattern(s) or canonical names to track only those, e.g.
            ``include=weightavg.swag.last_layer(model)`` for last-layer SWAG or ``"fc.*"``.
        exclude: glob pattern(s) not to track. Buffers (BatchNorm statistics) are never tracked:
            recompute them for each sample (:func:`bma_predict` does).
        var_clamp: lower bound of the diagonal variance (the reference's 1e-30).
        deviation_dtype: dtype of the stored columns (float32; they hold small differences, so
            float32 loses nothing that matters and halves the memory).
        device: where the moments and columns live (default: with the model's tensors).

    Examples:
        >>> import torch, weightavg
        >>> net = torch.nn.Linear(3, 2)
        >>> swag = weightavg.SWAG(net, max_rank=5)
        >>> for _ in range(4):
        ...     with torch.no_grad():
        ...         _ = net.weight.add_(0.01 * torch.randn(2, 3))
        ...     swag.collect(net)
        >>> swag.num_columns
        4
        >>> g = torch.Generator().manual_seed(0)
        >>> swag.sample_into(net, scale=0.5, generator=g)

        The moments, a draw and its density, and a checkpoint round trip:

        >>> swag.mean().shape, swag.variance().dtype, swag.deviations().shape  # P = 8 weights
        (torch.Size([8]), torch.float64, torch.Size([4, 8]))
        >>> theta = swag.sample(scale=0.5, generator=g)
        >>> swag.write(net, theta)  # the same as sample_into
        >>> sorted(swag.unflatten(theta))
        ['bias', 'weight']
        >>> swag.log_prob(swag.mean()) > swag.log_prob(theta)
        True
        >>> [i for i in swag.draws(net, 3, generator=g)]  # the net holds draw i inside the loop
        [0, 1, 2]
        >>> again = weightavg.SWAG.from_state_dict(swag.state_dict(), net)
        >>> torch.equal(again.deviations(), swag.deviations()), again.config()["max_rank"]
        (True, 5)
        >>> again.load_state_dict(swag.state_dict())  # into an existing posterior
        >>> import os, tempfile
        >>> path = os.path.join(tempfile.mkdtemp(), "swag.pt")
        >>> swag.save(path)
        >>> weightavg.SWAG.load(path, net).num_collected
        4
        >>> swag.reset(); swag.num_collected
        0

    Raises:
        ConfigError: a bad ``max_rank``, ``var_clamp`` or ``deviation_dtype``, or a model with no
            floating-point tensor to track (a sharded model too: SWAG refuses DTensors).

    References:
        Maddox, Garipov, Izmailov, Vetrov, Wilson. A Simple Baseline for Bayesian Uncertainty in
        Deep Learning. NeurIPS 2019.
    """

    def __init__(
        self,
        model: Source,
        *,
        max_rank: int = 20,
        params: Literal["all", "trainable"] = "all",
        include: str | Sequence[str] | None = None,
        exclude: str | Sequence[str] | None = None,
        var_clamp: float = 1e-30,
        deviation_dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        if isinstance(max_rank, bool) or not isinstance(max_rank, int) or max_rank < 0:
            raise bad_arg("max_rank", max_rank, "an int >= 0 (deviation columns to keep)")
        if isinstance(var_clamp, bool) or not isinstance(var_clamp, (int, float)) \
                or not math.isfinite(var_clamp) or var_clamp < 0:
            raise bad_arg("var_clamp", var_clamp, "a finite float >= 0")
        if not (isinstance(deviation_dtype, torch.dtype) and deviation_dtype.is_floating_point):
            raise bad_arg("deviation_dtype", deviation_dtype, "a floating torch.dtype")
        self.max_rank = max_rank
        self.var_clamp = float(var_clamp)
        self.deviation_dtype = deviation_dtype
        # first and second moments: one engine, float64 so that E[θ²] − E[θ]² keeps its digits
        self.averager = Averager(
            model, rule={"mean": mean(), "sq": mean(power=2)}, params=params, include=include,
            exclude=exclude, buffers="ignore", dtype=torch.float64, device=device,
        )
        refuse_sharded(self.averager._store, "weightavg.swag.SWAG")
        self._layout = self.averager.flat_layout()
        if not self._layout:
            raise bad_arg("model", type(model).__name__,
                          "a model with floating-point parameters to track")
        self.num_parameters = max(stop for _, stop, _ in self._layout.values())
        # ring buffer: (max_rank, P) rows in deviation_dtype, allocated at the first collection;
        # row (head - num_columns + i) % max_rank is the i-th oldest stored column
        self._columns: Tensor | None = None
        self._head = 0
        self._num_columns = 0

    # ------------------------------------------------------------------ collecting

    @torch.no_grad()
    def collect(self, model: Source) -> None:
        """Fold the model's current weights into the moments and store one deviation column.

        Costs O(P) time and memory (two float64 temporaries), independent of ``max_rank``.

        Raises:
            MismatchError: the model's tensors do not pair by name/shape with the tracked ones.
            NonFiniteError: the weights hold NaN/Inf (nothing is changed).
        """
        self.averager.update(model)
        if self.max_rank == 0:
            return
        dev = self.averager.flat(model)  # θ_n, float64
        dev.sub_(self.averager.flat(which="mean"))  # θ_n − θ̄_n (running mean including θ_n)
        cols = self._storage(dev.device)
        cols[self._head].copy_(dev)
        self._head = (self._head + 1) % self.max_rank
        self._num_columns = min(self._num_columns + 1, self.max_rank)

    def reset(self) -> None:
        """Forget every collected snapshot (moments and columns); the configuration stays."""
        self.averager.reset()
        self._head = 0
        self._num_columns = 0

    def _storage(self, device: torch.device) -> Tensor:
        if self._columns is None:
            self._columns = torch.zeros(self.max_rank, self.num_parameters,
                                        dtype=self.deviation_dtype, device=device)
        return self._columns

    def _order(self) -> Tensor:
        """Ring-buffer rows of the stored columns, oldest first."""
        k, big_k = self._num_columns, self.max_rank
        return torch.tensor([(self._head - k + i) % big_k for i in range(k)], dtype=torch.long)

    # ------------------------------------------------------------------ reading the posterior

    @property
    def num_collected(self) -> int:
        """Snapshots folded into the moments so far."""
        return self.averager.num_updates

    @property
    def num_columns(self) -> int:
        """``K_eff``: deviation columns stored now (``min(num_collected, max_rank)``)."""
        return self._num_columns

    @property
    def layout(self) -> dict[str, tuple[int, int, torch.Size]]:
        """Name -> (start, stop, shape) of each tracked tensor in the flat vectors."""
        return dict(self._layout)

    @property
    def names(self) -> list[str]:
        """Canonical names of the tracked tensors."""
        return list(self._layout)

    def _require(self) -> None:
        if self.num_collected == 0:
            raise StateError("the SWAG posterior is empty: call collect(model) at least once "
                             "before sampling or reading it")

    def mean(self) -> Tensor:
        """``θ̄``, the SWA mean, as a fresh flat float64 tensor.

        Returns:
            A (P,) float64 tensor (a copy: changing it changes nothing here).

        Raises:
            StateError: nothing collected yet.
        """
        self._require()
        return self.averager.flat(which="mean")

    def variance(self, *, clamp: bool = True) -> Tensor:
        """``Σ_diag = E[θ²] − θ̄²`` (float64, flat), clamped below at ``var_clamp`` by default.

        Returns:
            A fresh (P,) float64 tensor.

        Raises:
            StateError: nothing collected yet.
        """
        self._require()
        m = self.averager.flat(which="mean")
        var = self.averager.flat(which="sq").sub_(m.mul_(m))
        return var.clamp_min_(self.var_clamp) if clamp else var

    def deviations(self) -> Tensor:
        """The stored columns ``D`` as a (K_eff, P) tensor, one row per column, oldest first.

        Returns:
            A fresh tensor in ``deviation_dtype`` ((0, P) before any collection or with ``max_rank=0``).
        """
        if self._columns is None or self._num_columns == 0:
            return torch.zeros(0, self.num_parameters, dtype=self.deviation_dtype)
        return self._columns[self._order().to(self._columns.device)].clone()

    def unflatten(self, flat: Tensor) -> dict[str, Tensor]:
        """Name -> view of ``flat`` shaped like the tracked tensor (no copy).

        Returns:
            A dict of views into ``flat``, in the tracked order.

        Raises:
            ConfigError: ``flat`` is not a (P,) tensor.
        """
        if not isinstance(flat, Tensor) or flat.shape != (self.num_parameters,):
            raise bad_arg("flat", getattr(flat, "shape", type(flat).__name__),
                          f"a 1-D tensor of {self.num_parameters} elements")
        return {n: flat[a:b].view(shape) for n, (a, b, shape) in self._layout.items()}

    # ------------------------------------------------------------------ sampling

    @torch.no_grad()
    def sample(
        self, scale: float = 0.5, *, diag_only: bool = False, generator: torch.Generator | None = None
    ) -> Tensor:
        """Draw one weight vector ``θ`` (flat, float64; see the class note for the formula).

        Args:
            scale: variance multiplier (``0`` returns the SWA mean exactly and draws nothing).
            diag_only: SWAG-Diag: leave out the low-rank term.
            generator: source of the normal draws (on the posterior's device); the global RNG is
                left alone when one is given. ``z₁`` (P values) is drawn first, then ``z₂``
                (``K_eff`` values, paired with the columns oldest first).

        Returns:
            A fresh (P,) float64 tensor; :meth:`unflatten` names its parts, :meth:`write` puts it
            into a model.

        Raises:
            ConfigError: ``scale`` is not a finite number ≥ 0.
            StateError: nothing collected yet.
        """
        scale = check_scale(scale)
        self._require()
        theta = self.averager.flat(which="mean")
        if scale == 0.0:
            return theta
        noise = self.variance().sqrt_()
        z1 = torch.randn(noise.shape, generator=generator, dtype=noise.dtype, device=noise.device)
        noise.mul_(z1)
        k = self._num_columns
        if not diag_only and k >= 2 and self._columns is not None:
            z2 = torch.randn(k, generator=generator, dtype=noise.dtype, device=noise.device)
            z2.div_(math.sqrt(k - 1))
            # D z₂ one column at a time, oldest first: O(P) memory, float64 accumulation, and the
            # same result whatever the ring buffer's rotation (e.g. after a state_dict round-trip)
            for i, row in enumerate(self._order().tolist()):
                noise.addcmul_(self._columns[row], z2[i : i + 1])
        return theta.add_(noise, alpha=math.sqrt(scale))

    def _targets(self, model: nn.Module) -> dict[str, Tensor]:
        return model_targets(self._layout, model)

    @torch.no_grad()
    def write(self, model: nn.Module, flat: Tensor) -> None:
        """Copy a flat weight vector (e.g. from :meth:`sample`) into the model, in place, by name.

        Raises:
            ConfigError: ``flat`` is not a (P,) tensor.
            MismatchError: the model lacks a tracked tensor or has it in another shape.
        """
        targets = self._targets(model)
        for n, view in self.unflatten(flat).items():
            targets[n].copy_(view)

    @torch.no_grad()
    def sample_into(
        self,
        model: nn.Module,
        scale: float = 0.5,
        *,
        diag_only: bool = False,
        generator: torch.Generator | None = None,
    ) -> None:
        """Draw weights (:meth:`sample`) and write them into the model's tensors in place.

        Only tracked tensors change; BatchNorm statistics are *not* recomputed (use
        :func:`weightavg.recompute_bn` afterwards, or :func:`bma_predict`).

        Raises:
            ConfigError: ``scale`` is not a finite number ≥ 0.
            StateError: nothing collected yet.
            MismatchError: the model lacks a tracked tensor or has it in another shape.
        """
        targets = self._targets(model)
        for n, view in self.unflatten(self.sample(scale, diag_only=diag_only,
                                                  generator=generator)).items():
            targets[n].copy_(view)

    def draws(
        self,
        model: nn.Module,
        num_samples: int | None = None,
        *,
        scale: float = 0.5,
        diag_only: bool = False,
        generator: torch.Generator | None = None,
    ) -> Iterator[int]:
        """Write ``num_samples`` draws into the model one after the other (the BMA protocol).

        Arguments are checked at once; the returned iterator yields ``0 … num_samples−1`` and,
        after each item, the model holds the next draw. When it finishes or is closed, the tracked
        tensors get their original values back.

        Returns:
            An iterator over the draw indices.

        Raises:
            ConfigError: ``num_samples`` or ``scale`` out of range.
            StateError: nothing collected yet.
        """
        n = check_num_samples(num_samples, DEFAULT_NUM_SAMPLES)
        scale = check_scale(scale)
        self._require()
        targets = self._targets(model)
        return self._draw_iter(model, targets, n, scale, diag_only, generator)

    def _draw_iter(self, model: nn.Module, targets: dict[str, Tensor], n: int, scale: float,
                   diag_only: bool, generator: torch.Generator | None) -> Iterator[int]:
        backup = {k: t.detach().clone() for k, t in targets.items()}
        try:
            for i in range(n):
                self.sample_into(model, scale, diag_only=diag_only, generator=generator)
                yield i
        finally:
            with torch.no_grad():
                for k, t in targets.items():
                    t.copy_(backup[k])

    # ------------------------------------------------------------------ exact density

    @torch.no_grad()
    def log_prob(self, theta: Tensor, scale: float = 0.5, *, diag_only: bool = False) -> float:
        """Exact ``log N(θ; θ̄, scale·(Σ_diag + D Dᵀ/(K−1)))`` of a flat weight vector.

        .. note::
            With ``V = Σ_diag``, ``U = D/√(K−1)`` and ``r = θ − θ̄``: by the matrix determinant
            lemma ``log det(V + UUᵀ) = Σ log V + log det C`` with ``C = I + Uᵀ V⁻¹ U`` (K×K),
            and by Woodbury ``rᵀ(V + UUᵀ)⁻¹r = rᵀV⁻¹r − bᵀ C⁻¹ b`` with ``b = Uᵀ V⁻¹ r``.
            Cost O(P·K²), memory O(P·K) in float64: meant for small models or last layers.

        Returns:
            The log density (natural log), a float.

        Raises:
            ConfigError: ``scale`` not > 0, or ``theta`` not a (P,) tensor.
            StateError: nothing collected yet.
        """
        scale = check_scale(scale)
        if scale == 0.0:
            raise bad_arg("scale", scale, "a float > 0 (the density of scale=0 is degenerate)")
        self._require()
        if not isinstance(theta, Tensor) or theta.shape != (self.num_parameters,):
            raise bad_arg("theta", getattr(theta, "shape", type(theta).__name__),
                          f"a flat tensor of {self.num_parameters} elements")
        v = self.variance()
        r = theta.to(v.dtype, copy=True).to(v.device).sub_(self.averager.flat(which="mean"))
        p = v.numel()
        logdet = float(v.log().sum()) + p * math.log(scale)
        quad = float((r * r / v).sum())
        k = self._num_columns
        if not diag_only and k >= 2:
            u = self.deviations().to(v.device, torch.float64).div_(math.sqrt(k - 1))  # (K, P)
            uv = u / v  # Uᵀ V⁻¹, (K, P)
            c = torch.eye(k, dtype=v.dtype, device=v.device) + uv @ u.T
            chol = torch.linalg.cholesky(c)
            logdet += 2.0 * float(chol.diagonal().log().sum())
            b = uv @ r
            y = torch.cholesky_solve(b[:, None], chol).squeeze(1)
            quad -= float(b @ y)
        return -0.5 * (p * math.log(2 * math.pi) + logdet + quad / scale)

    # ------------------------------------------------------------------ checkpointing

    def config(self) -> dict[str, Any]:
        """Plain-data configuration (saved in checkpoints).

        Returns:
            A dict: ``max_rank``, ``params``, ``include``, ``exclude``, ``var_clamp``, ``deviation_dtype``.
        """
        cfg = self.averager.config()
        return {
            "max_rank": self.max_rank,
            "params": cfg["params"],
            "include": cfg["include"],
            "exclude": cfg["exclude"],
            "var_clamp": self.var_clamp,
            "deviation_dtype": str(self.deviation_dtype).replace("torch.", ""),
        }

    def state_dict(self) -> dict[str, Any]:
        """Moments, stored columns (by name, oldest first) and counters.

        Returns:
            A dict of tensors and plain data (``torch.save``/``weights_only`` safe; :meth:`save`
            writes it).
        """
        d = self.deviations()
        k = d.shape[0]
        return {
            "format": "weightavg.SWAG",
            "format_version": FORMAT_VERSION,
            "config": self.config(),
            "averager": self.averager.state_dict(),
            "num_columns": k,
            "columns": {n: d[:, a:b].reshape(k, *shape) for n, (a, b, shape) in self._layout.items()},
        }

    @torch.no_grad()
    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (columns are paired by name).

        Raises:
            StateError: not a SWAG state, or a newer format.
            MismatchError: different tracked names or shapes, or more columns than ``max_rank``.
        """
        if not isinstance(state, Mapping) or state.get("format") != "weightavg.SWAG":
            raise StateError("state is not a weightavg.SWAG state_dict (missing 'format' key)")
        version = state.get("format_version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise StateError(f"state has format_version={version!r}; this weightavg reads "
                             f"<= {FORMAT_VERSION}")
        k = int(state["num_columns"])
        if k > self.max_rank:
            raise MismatchError(f"state holds {k} deviation columns but this SWAG keeps at most "
                                f"max_rank={self.max_rank}")
        cols = state["columns"]
        missing = sorted(set(self._layout) - set(cols))
        unexpected = sorted(set(cols) - set(self._layout))
        reshaped = [(n, tuple(cols[n].shape), (k, *shape)) for n, (_, _, shape) in self._layout.items()
                    if n in cols and tuple(cols[n].shape) != (k, *shape)]
        if missing or unexpected or reshaped:
            raise MismatchError("state's deviation columns do not match the tracked tensors: "
                                + describe_mismatch(missing, unexpected, reshaped,
                                                    left="posterior", right="state"))
        self.averager.load_state_dict(state["averager"])
        if self.max_rank:
            any_avg = next(iter(self.averager.averaged_tensors("mean").values()))
            store = self._storage(any_avg.device)
            store.zero_()
            for n, (a, b, _) in self._layout.items():
                store[:k, a:b].copy_(cols[n].reshape(k, b - a))
        self._num_columns = k
        self._head = k % self.max_rank if self.max_rank else 0

    def save(self, path: PathLike) -> None:
        """Write :meth:`state_dict` to ``path`` atomically (``.safetensors``: safetensors).

        Any other suffix writes a torch file that ``torch.load(..., weights_only=True)`` reads.
        """
        save_state(self.state_dict(), path)

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any], model: Source,
                        *, device: torch.device | str | None = None) -> SWAG:
        """Build a SWAG with the saved configuration for ``model`` and load ``state`` into it.

        Returns:
            A new :class:`SWAG` holding the saved posterior.

        Raises:
            StateError: not a SWAG state, or a newer format.
            MismatchError: ``model``'s tensors do not pair with the saved ones.
        """
        if not isinstance(state, Mapping) or state.get("format") != "weightavg.SWAG":
            raise StateError("state is not a weightavg.SWAG state_dict (missing 'format' key)")
        cfg = state["config"]
        dtype = dtype_from_name(cfg.get("deviation_dtype", "float32"))
        swag = cls(model, max_rank=int(cfg["max_rank"]), params=cfg["params"],
                   include=cfg["include"] or None, exclude=cfg["exclude"] or None,
                   var_clamp=float(cfg["var_clamp"]), deviation_dtype=dtype, device=device)
        swag.load_state_dict(state)
        return swag

    @classmethod
    def load(cls, path: PathLike, model: Source, *, device: torch.device | str | None = None) -> SWAG:
        """Read a posterior written by :meth:`save` (``weights_only`` torch load or safetensors).

        Returns:
            A new :class:`SWAG` holding the saved posterior.

        Raises:
            ConfigError: ``path`` is not an existing file.
            StateError: not a readable SWAG state (corrupt, truncated, another format).
            MismatchError: ``model``'s tensors do not pair with the saved ones.
        """
        return cls.from_state_dict(load_state(path), model, device=device)

    def __repr__(self) -> str:
        return (f"SWAG(max_rank={self.max_rank}, tracked={len(self._layout)} tensors/"
                f"{self.num_parameters:,} elements, collected={self.num_collected}, "
                f"columns={self.num_columns})")
