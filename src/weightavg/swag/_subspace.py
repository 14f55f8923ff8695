"""Inference in a low-dimensional affine subspace around the SWA solution (Izmailov et al., 2019)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._engine import unwrap_model
from .._errors import StateError, bad_arg
from .._sharded import refuse_dtensor_model
from ._bma import _move, eval_mode
from ._swag import SWAG, check_num_samples, model_targets

__all__ = ["Subspace", "SubspaceInference", "elliptical_slice", "pca_subspace", "random_subspace"]

LogLik = Callable[[Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class Subspace:
    """The affine subspace ``θ(z) = shift + zᵀ·basis`` of weight space.

    Attributes:
        shift: (P,) float64 point the subspace goes through (the SWA mean).
        basis: (rank, P) float64 rows spanning it.
        layout: name -> (start, stop, shape) of each tensor in the flat vectors.
        singular_values: (rank,) for a PCA subspace (the row norms), else None.

    Examples:
        >>> import torch, weightavg
        >>> from weightavg.swag import pca_subspace
        >>> net = torch.nn.Linear(2, 2)
        >>> swag = weightavg.SWAG(net, max_rank=4)
        >>> for _ in range(4):
        ...     with torch.no_grad():
        ...         _ = net.weight.add_(0.1 * torch.randn(2, 2))
        ...     swag.collect(net)
        >>> sub = pca_subspace(swag, rank=2)
        >>> sub.rank, sub.basis.shape
        (2, torch.Size([2, 6]))
        >>> torch.equal(sub.point(torch.zeros(2)), swag.mean())  # z = 0 is the SWA mean
        True
    """

    shift: Tensor
    basis: Tensor
    layout: Mapping[str, tuple[int, int, torch.Size]]
    singular_values: Tensor | None = None

    @property
    def rank(self) -> int:
        return int(self.basis.shape[0])

    def point(self, z: Tensor) -> Tensor:
        """``shift + zᵀ basis`` (flat, float64; differentiable in ``z``).

        Returns:
            A (P,) float64 weight vector (see :meth:`weightavg.SWAG.write` to put it in a model).

        Raises:
            ConfigError: ``z`` is not a (rank,) tensor.
        """
        if not isinstance(z, Tensor) or z.shape != (self.rank,):
            raise bad_arg("z", getattr(z, "shape", type(z).__name__), f"a ({self.rank},) tensor")
        return self.shift + z.to(self.basis) @ self.basis


def _check_rank(rank: int, upper: int, what: str) -> int:
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= upper:
        raise bad_arg("rank", rank, f"an int in [1, {upper}] ({what})")
    return rank


def pca_subspace(swag: SWAG, rank: int | None = None) -> Subspace:
    """PCA subspace of the SWAG deviations, through the SWA mean.

    .. note::
        With ``D`` the (K, P) stored deviation rows and ``D/√(K−1) = U S Vᵀ`` (thin SVD), the
        basis rows are ``s_i v_iᵀ`` for the ``rank`` largest singular values: orthogonal rows whose
        norms are the singular values of ``D/√(K−1)``, so that with ``rank = K``
        ``basisᵀ basis = DᵀD/(K−1)``, SWAG's low-rank covariance. Cost O(K²P).

    Args:
        swag: a posterior with at least 2 stored columns.
        rank: number of principal directions (default: all ``K``).

    Returns:
        A :class:`Subspace` with ``singular_values``.

    Raises:
        ConfigError: ``swag`` is not a :class:`SWAG`, or ``rank`` not in ``[1, K]``.
        StateError: fewer than 2 stored columns.

    Examples:
        >>> import torch, weightavg
        >>> from weightavg.swag import pca_subspace
        >>> net = torch.nn.Linear(2, 2)
        >>> swag = weightavg.SWAG(net, max_rank=4)
        >>> for _ in range(4):
        ...     with torch.no_grad():
        ...         _ = net.weight.add_(0.1 * torch.randn(2, 2))
        ...     swag.collect(net)
        >>> sub = pca_subspace(swag)
        >>> d = swag.deviations().double()
        >>> torch.allclose(sub.basis.T @ sub.basis, d.T @ d / 3)  # SWAG's low-rank covariance
        True
    """
    if not isinstance(swag, SWAG):
        raise bad_arg("swag", type(swag).__name__, "a weightavg.SWAG posterior")
    k = swag.num_columns
    if k < 2:
        raise StateError(f"a PCA subspace needs at least 2 deviation columns; the SWAG has {k} "
                         "(collect more snapshots, with max_rank >= 2)")
    rank = _check_rank(k if rank is None else rank, k, "at most the stored columns")
    d = swag.deviations().double().div_(math.sqrt(k - 1))
    _, s, vh = torch.linalg.svd(d, full_matrices=False)
    s = s[:rank]
    basis = s[:, None] * vh[:rank]
    return Subspace(swag.mean().to(d.device), basis, swag.layout, s.clone())


def random_subspace(
    swag: SWAG, rank: int, *, scale: float = 1.0, generator: torch.Generator | None = None
) -> Subspace:
    """Random subspace through the SWA mean: ``rank`` orthogonal rows of norm ``scale``.

    Directions are uniformly distributed (QR of a Gaussian matrix); the baseline of the subspace
    paper against which PCA subspaces are compared.

    Returns:
        A :class:`Subspace` (``singular_values`` None).

    Raises:
        ConfigError: ``swag`` is not a :class:`SWAG`, ``rank`` not in ``[1, P]``, or ``scale``
            not a finite float > 0.

    Examples:
        >>> import torch, weightavg
        >>> from weightavg.swag import random_subspace
        >>> net = torch.nn.Linear(3, 2)
        >>> swag = weightavg.SWAG(net, max_rank=0)
        >>> swag.collect(net)
        >>> sub = random_subspace(swag, 2, scale=3.0, generator=torch.Generator().manual_seed(0))
        >>> torch.allclose(sub.basis @ sub.basis.T, 9 * torch.eye(2, dtype=torch.float64))
        True
    """
    if not isinstance(swag, SWAG):
        raise bad_arg("swag", type(swag).__name__, "a weightavg.SWAG posterior")
    rank = _check_rank(rank, swag.num_parameters, "at most the number of parameters")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0 \
            or not math.isfinite(scale):
        raise bad_arg("scale", scale, "a finite float > 0 (norm of the basis rows)")
    shift = swag.mean()
    g = torch.randn(swag.num_parameters, rank, generator=generator, dtype=torch.float64,
                    device=shift.device)
    q, _ = torch.linalg.qr(g)
    return Subspace(shift, q.T.contiguous().mul_(float(scale)), swag.layout, None)


def elliptical_slice(
    log_likelihood: Callable[[Tensor], float | Tensor],
    initial: Tensor,
    *,
    num_samples: int,
    prior_std: float | Tensor = 1.0,
    burn_in: int = 0,
    generator: torch.Generator | None = None,
    max_shrinks: int = 10_000,
) -> Tensor:
    """Elliptical slice sampling for a zero-mean Gaussian prior ``N(0, diag(prior_std²))``.

    .. note::
        One step from ``f``: draw ``ν`` from the prior and ``log y = log L(f) + log u``; propose
        ``f' = f cos ω + ν sin ω`` with ``ω ~ U[0, 2π)`` and shrink the bracket ``[ω − 2π, ω]``
        towards 0 until ``log L(f') > log y``. The chain leaves ``prior × likelihood`` invariant
        and has no step size to tune (Murray, Adams & MacKay, 2010).

    Args:
        log_likelihood: ``z -> log L(z)`` (a float or a 0-d tensor).
        initial: (d,) starting point with a finite log-likelihood.
        num_samples: states to return (after ``burn_in`` discarded ones).
        prior_std: scalar or (d,) standard deviations of the prior.
        burn_in: steps run and discarded first.
        generator: random source; the global RNG is left alone when one is given.
        max_shrinks: safety bound on bracket shrinks in one step.

    Returns:
        (num_samples, d) float64 samples.

    Raises:
        ConfigError: ``num_samples``, ``burn_in``, ``initial`` or ``prior_std`` out of range, or
            a log-likelihood that is not finite at ``initial``.
        StateError: a step's bracket shrank ``max_shrinks`` times without an acceptable point.

    Examples:
        A Gaussian likelihood times a Gaussian prior: the posterior is known in closed form
        (prior N(0, 1), likelihood N(z; 2, 1): posterior N(1, 1/2)).

        >>> import torch
        >>> from weightavg.swag import elliptical_slice
        >>> z = elliptical_slice(lambda z: -0.5 * float((z - 2.0) ** 2), torch.zeros(1),
        ...                      num_samples=500, burn_in=20, generator=torch.Generator().manual_seed(0))
        >>> z.shape, abs(float(z.mean()) - 1.0) < 0.1
        (torch.Size([500, 1]), True)
    """
    num_samples = check_num_samples(num_samples, 1)
    if isinstance(burn_in, bool) or not isinstance(burn_in, int) or burn_in < 0:
        raise bad_arg("burn_in", burn_in, "an int >= 0")
    if not isinstance(initial, Tensor) or initial.dim() != 1:
        raise bad_arg("initial", getattr(initial, "shape", type(initial).__name__), "a 1-D tensor")
    f = initial.detach().double().clone()
    std = torch.as_tensor(prior_std, dtype=torch.float64, device=f.device)
    if not bool(torch.all(std > 0)) or std.dim() > 1 or (std.dim() == 1 and std.shape != f.shape):
        raise bad_arg("prior_std", prior_std, f"a float > 0 or a ({f.numel()},) tensor of them")

    def loglik(z: Tensor) -> float:
        return float(log_likelihood(z))

    cur = loglik(f)
    if not math.isfinite(cur):
        raise bad_arg("initial", "a point", "a point with a finite log-likelihood")
    out = torch.empty(num_samples, f.numel(), dtype=torch.float64, device=f.device)

    def uniform() -> float:
        return float(torch.rand((), generator=generator, dtype=torch.float64))

    for step in range(burn_in + num_samples):
        nu = torch.randn(f.shape, generator=generator, dtype=torch.float64, device=f.device) * std
        log_y = cur + math.log(uniform() or 1e-300)
        omega = uniform() * 2 * math.pi
        lo, hi = omega - 2 * math.pi, omega
        for _ in range(max_shrinks):
            prop = f * math.cos(omega) + nu * math.sin(omega)
            val = loglik(prop)
            if val > log_y:
                f, cur = prop, val
                break
            if omega < 0:
                lo = omega
            else:
                hi = omega
            omega = lo + uniform() * (hi - lo)
        else:
            raise StateError(f"elliptical slice sampling found no point above the slice in "
                             f"{max_shrinks} shrinks (is the log-likelihood finite near the state?)")
        if step >= burn_in:
            out[step - burn_in] = f
    return out


def _cross_entropy_loglik(outputs: Tensor, targets: Tensor) -> Tensor:
    return -F.cross_entropy(outputs, targets, reduction="sum")


class SubspaceInference:
    """Posterior over the coordinates ``z`` of a :class:`Subspace`, by ESS or by simple VI.

    .. note::
        Target: ``log p(z | data) = (1/T) Σ_batches log p(y | x, θ(z)) − ‖z‖² / (2 σ_p²) + const``
        with temperature ``T`` and prior scale ``σ_p``. The model runs in eval mode (BatchNorm
        uses its stored statistics, dropout is off) through ``torch.func.functional_call``, so the
        model's own tensors are never modified while fitting.

    Args:
        model: the module (same architecture as the subspace's posterior).
        subspace: from :func:`pca_subspace` or :func:`random_subspace`.
        temperature: ``T > 0`` (the subspace paper tempers the likelihood; 1 = plain Bayes).
        prior_scale: ``σ_p > 0``, standard deviation of the isotropic Gaussian prior on ``z``.
        log_likelihood: ``fn(outputs, targets) -> summed log-likelihood of the batch``
            (default: minus the summed cross-entropy, for classification).
        device: move each batch there first.

    Raises:
        ConfigError: ``subspace`` not a :class:`Subspace`, a bad ``temperature``/``prior_scale``,
            or a sharded (DTensor) model.
        MismatchError: the model's tensors do not pair with the subspace's layout.

    Examples:
        >>> import torch, weightavg
        >>> from weightavg.swag import pca_subspace
        >>> net = torch.nn.Linear(2, 2)
        >>> swag = weightavg.SWAG(net, max_rank=4)
        >>> for _ in range(4):
        ...     with torch.no_grad():
        ...         _ = net.weight.add_(0.1 * torch.randn(2, 2))
        ...     swag.collect(net)
        >>> sub = pca_subspace(swag, rank=2)
        >>> si = weightavg.SubspaceInference(net, sub, temperature=2.0)
        >>> data = [(torch.randn(8, 2), torch.randint(0, 2, (8,)))]
        >>> z0 = torch.zeros(2, dtype=torch.float64)
        >>> bool(si.log_likelihood(z0, data) < 0), round(float(si.log_prior(z0)), 4)  # -log(2π)
        (True, -1.8379)
        >>> si.sample_ess(data, num_samples=5, burn_in=2, generator=torch.Generator().manual_seed(0)).shape
        torch.Size([5, 2])
        >>> len(list(si.draws(net)))  # the 5 stored samples, written into net in turn
        5
        >>> mu, sigma = si.fit_vi(data, epochs=3, generator=torch.Generator().manual_seed(0))
        >>> mu.shape, bool((sigma > 0).all())
        (torch.Size([2]), True)

    References:
        Izmailov, Maddox, Kirichenko, Garipov, Vetrov, Wilson. Subspace Inference for Bayesian
        Deep Learning. UAI 2019.
    """

    def __init__(
        self,
        model: nn.Module,
        subspace: Subspace,
        *,
        temperature: float = 1.0,
        prior_scale: float = 1.0,
        log_likelihood: LogLik | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        if not isinstance(subspace, Subspace):
            raise bad_arg("subspace", type(subspace).__name__, "a weightavg.swag.Subspace")
        for name, v in (("temperature", temperature), ("prior_scale", prior_scale)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0 \
                    or not math.isfinite(v):
                raise bad_arg(name, v, "a finite float > 0")
        refuse_dtensor_model(model, "weightavg.swag.SubspaceInference")
        self._targets = model_targets(subspace.layout, model)  # checks names and shapes
        self.model = model
        self.subspace = subspace
        self.temperature = float(temperature)
        self.prior_scale = float(prior_scale)
        self.loglik_fn: LogLik = log_likelihood or _cross_entropy_loglik
        self.device = torch.device(device) if device is not None else None
        self.samples: Tensor | None = None  # (S, rank) from ESS
        self.vi_mean: Tensor | None = None
        self.vi_std: Tensor | None = None
        self.method: str | None = None

    # ------------------------------------------------------------------ densities

    def _params(self, z: Tensor) -> dict[str, Tensor]:
        theta = self.subspace.point(z)
        return {n: theta[a:b].view(shape).to(self._targets[n].dtype)
                for n, (a, b, shape) in self.subspace.layout.items()}

    def log_likelihood(self, z: Tensor, data: Iterable[Any]) -> Tensor:
        """``Σ_batches log p(y | x, θ(z))`` (untempered; differentiable in ``z`` under grad).

        Returns:
            A 0-d float64 tensor on the CPU.

        Raises:
            ConfigError: a batch is not an ``(inputs, targets)`` pair.
        """
        module = unwrap_model(self.model)
        params = self._params(z)
        total = torch.zeros((), dtype=torch.float64)
        with eval_mode(module):
            for batch in data:
                x, y = self._split(batch)
                out = torch.func.functional_call(module, params, (x,))
                total = total + self.loglik_fn(out, y).double().cpu()
        return total

    def _split(self, batch: Any) -> tuple[Any, Tensor]:
        if not isinstance(batch, (list, tuple)) or len(batch) < 2:
            raise bad_arg("data", type(batch).__name__, "batches of (inputs, targets)")
        b = _move(batch, self.device)
        return b[0], b[1]

    def log_prior(self, z: Tensor) -> Tensor:
        """``log N(z; 0, σ_p² I)``.

        Returns:
            A 0-d float64 tensor.
        """
        d = z.numel()
        s = self.prior_scale
        return -0.5 * (z.double() ** 2).sum() / s**2 - d * math.log(s) - 0.5 * d * math.log(2 * math.pi)

    # ------------------------------------------------------------------ ESS

    @torch.no_grad()
    def sample_ess(
        self,
        data: Iterable[Any],
        num_samples: int = 50,
        *,
        burn_in: int = 10,
        generator: torch.Generator | None = None,
        initial: Tensor | None = None,
    ) -> Tensor:
        """Run elliptical slice sampling on the tempered posterior; keep and return the samples.

        ``data`` is read in full for every likelihood evaluation (a few per sample).

        Returns:
            The (num_samples, rank) float64 samples, also kept as ``samples`` for :meth:`draws`.

        Raises:
            ConfigError: bad ``num_samples``/``burn_in``/``initial``, batches that are not
                ``(inputs, targets)`` pairs, or a likelihood not finite at the starting point.
            StateError: a step's bracket shrank too often (see :func:`elliptical_slice`).
        """
        z0 = torch.zeros(self.subspace.rank, dtype=torch.float64) if initial is None else initial
        temp = self.temperature
        self.samples = elliptical_slice(
            lambda z: self.log_likelihood(z, data) / temp, z0, num_samples=num_samples,
            prior_std=self.prior_scale, burn_in=burn_in, generator=generator)
        self.method = "ess"
        return self.samples

    # ------------------------------------------------------------------ VI

    def fit_vi(
        self,
        data: Iterable[Any],
        *,
        epochs: int = 50,
        lr: float = 1e-2,
        num_mc: int = 1,
        init_std: float | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Fit a mean-field Gaussian ``q(z) = N(μ, diag σ²)`` by maximising the tempered ELBO.

        .. note::
            ``ELBO = E_q[(1/T) log p(data | θ(z))] − KL(q ‖ N(0, σ_p² I))``, estimated per batch as
            ``(N/B)·(1/T)·Σ_batch log p`` with ``num_mc`` reparameterised draws and optimised with
            Adam, its learning rate cosine-annealed from ``lr`` to 0 over all steps.
            ``KL = Σ_i log(σ_p/σ_i) + (σ_i² + μ_i²)/(2σ_p²) − ½``.

        Returns:
            ``(μ, σ)``, also kept as ``vi_mean`` / ``vi_std`` for :meth:`draws`.

        Raises:
            ConfigError: ``epochs``/``num_mc`` not positive ints, ``lr`` not > 0, or ``data``
                without examples or with batches that are not ``(inputs, targets)`` pairs.
        """
        for name, v in (("epochs", epochs), ("num_mc", num_mc)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise bad_arg(name, v, "a positive int")
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
            raise bad_arg("lr", lr, "a float > 0")
        n_total, n_batches = 0, 0
        for batch in data:
            n_total += int(self._split(batch)[1].shape[0])
            n_batches += 1
        if n_total == 0:
            raise bad_arg("data", "no examples", "at least one (inputs, targets) batch")
        rank, s = self.subspace.rank, self.prior_scale
        std0 = 0.1 * s if init_std is None else float(init_std)
        mu = torch.zeros(rank, dtype=torch.float64, requires_grad=True)
        log_std = torch.full((rank,), math.log(std0), dtype=torch.float64, requires_grad=True)
        opt = torch.optim.Adam([mu, log_std], lr=lr)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * n_batches)
        module = unwrap_model(self.model)
        with eval_mode(module):
            for _ in range(epochs):
                for batch in data:
                    x, y = self._split(batch)
                    scale_n = n_total / int(y.shape[0])
                    std = log_std.exp()
                    ll = torch.zeros((), dtype=torch.float64)
                    for _ in range(num_mc):
                        eps = torch.randn(rank, generator=generator, dtype=torch.float64)
                        out = torch.func.functional_call(module, self._params(mu + std * eps), (x,))
                        ll = ll + self.loglik_fn(out, y).double().cpu()
                    ll = ll * (scale_n / num_mc / self.temperature)
                    kl = (math.log(s) - log_std + (std**2 + mu**2) / (2 * s**2) - 0.5).sum()
                    loss = kl - ll
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                    sched.step()
        self.vi_mean = mu.detach().clone()
        self.vi_std = log_std.detach().exp()
        self.method = "vi"
        return self.vi_mean, self.vi_std

    # ------------------------------------------------------------------ BMA protocol

    def draws(
        self,
        model: nn.Module,
        num_samples: int | None = None,
        *,
        generator: torch.Generator | None = None,
    ) -> Iterator[int]:
        """Write posterior draws ``θ(z_s)`` into the model one after the other (restored after).

        After :meth:`sample_ess`: the stored samples (all of them by default, or the first
        ``num_samples``). After :meth:`fit_vi`: ``num_samples`` fresh draws from ``q`` (default 30).

        Returns:
            An iterator over the draw indices; the model holds draw ``i`` at item ``i``.

        Raises:
            StateError: nothing fitted yet.
            ConfigError: ``num_samples`` out of range (more than the ESS samples kept).
            MismatchError: the model's tensors do not pair with the subspace's layout.
        """
        if self.method is None:
            raise StateError("nothing fitted yet: call sample_ess(...) or fit_vi(...) first")
        targets = model_targets(self.subspace.layout, model)
        if self.method == "ess":
            assert self.samples is not None
            n = check_num_samples(num_samples, self.samples.shape[0])
            if n > self.samples.shape[0]:
                raise bad_arg("num_samples", n, f"at most the {self.samples.shape[0]} ESS samples")
            zs = self.samples[:n]
        else:
            assert self.vi_mean is not None and self.vi_std is not None
            n = check_num_samples(num_samples, 30)
            eps = torch.randn(n, self.subspace.rank, generator=generator, dtype=torch.float64)
            zs = self.vi_mean + self.vi_std * eps
        return self._iter(targets, zs)

    @torch.no_grad()
    def _iter(self, targets: dict[str, Tensor], zs: Tensor) -> Iterator[int]:
        backup = {n: t.detach().clone() for n, t in targets.items()}
        try:
            for i in range(zs.shape[0]):
                theta = self.subspace.point(zs[i])
                for n, (a, b, shape) in self.subspace.layout.items():
                    targets[n].copy_(theta[a:b].view(shape))
                yield i
        finally:
            with torch.no_grad():
                for n, t in targets.items():
                    t.copy_(backup[n])

    def __repr__(self) -> str:
        return (f"SubspaceInference(rank={self.subspace.rank}, temperature={self.temperature}, "
                f"prior_scale={self.prior_scale}, fitted={self.method})")
