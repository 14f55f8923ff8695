"""Mixtures of independently trained posteriors: MultiSWAG and MultiSWA (Wilson & Izmailov, 2020)."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from .._errors import bad_arg
from ._swag import SWAG, check_num_samples, check_scale

__all__ = ["MultiSWA", "MultiSWAG"]

Member = SWAG | str | os.PathLike


class MultiSWAG:
    """Equal-weight mixture of ``M`` SWAG posteriors from independent training runs.

    Members are :class:`SWAG` objects or paths of files written by :meth:`SWAG.save`; a path is
    loaded only while its draws are used, so a mixture of large posteriors streams from disk with
    one member in memory at a time.

    .. note::
        ``p(θ) = (1/M) Σ_m N(θ; θ̄_m, scale·Σ_m)``: :func:`bma_predict` draws the same number of
        samples from every member, so each member carries weight ``1/M``.

    Args:
        members: the posteriors (or their files), at least one.

    Examples:
        >>> import torch, weightavg
        >>> nets = [torch.nn.Linear(2, 2) for _ in range(2)]
        >>> posts = []
        >>> for net in nets:
        ...     s = weightavg.SWAG(net, max_rank=2)
        ...     s.collect(net)
        ...     posts.append(s)
        >>> mix = weightavg.MultiSWAG(posts)
        >>> len(mix), mix.member(1, nets[0]) is posts[1]
        (2, True)
        >>> [s.num_collected for s in mix.iter_members(nets[0])]
        [1, 1]
        >>> list(mix.draws(nets[0], 2, scale=0.0))  # 2 draws per member
        [0, 1, 2, 3]

    Raises:
        ConfigError: ``members`` empty or not a sequence, or an entry neither a SWAG nor a path.

    References:
        Wilson, Izmailov. Bayesian Deep Learning and a Probabilistic Perspective of
        Generalization. NeurIPS 2020.
    """

    default_num_samples = 10

    def __init__(self, members: Sequence[Member]) -> None:
        if isinstance(members, (str, bytes, os.PathLike)) or not isinstance(members, Sequence) \
                or len(members) == 0:
            raise bad_arg("members", members, "a non-empty list of SWAG posteriors or file paths")
        for i, m in enumerate(members):
            if not isinstance(m, (SWAG, str, os.PathLike)):
                raise bad_arg(f"members[{i}]", type(m).__name__, "a SWAG posterior or a file path")
        self.members = list(members)

    def __len__(self) -> int:
        return len(self.members)

    def member(self, index: int, model: nn.Module) -> SWAG:
        """Member ``index`` as a :class:`SWAG` (read from disk when it is a path).

        Returns:
            The member's posterior (a fresh object for a path; see :meth:`SWAG.load` for what a
            file that cannot be read raises).
        """
        m = self.members[index]
        return m if isinstance(m, SWAG) else SWAG.load(m, model)

    def iter_members(self, model: nn.Module) -> Iterator[SWAG]:
        """The members one at a time (paths are loaded on demand and dropped afterwards).

        Yields:
            Each member as a :class:`SWAG`, in order.
        """
        for i in range(len(self.members)):
            yield self.member(i, model)

    def draws(
        self,
        model: nn.Module,
        num_samples: int | None = None,
        *,
        scale: float = 0.5,
        diag_only: bool = False,
        generator: torch.Generator | None = None,
    ) -> Iterator[int]:
        """Write ``num_samples`` draws *per member* into the model, member after member.

        The model's tracked tensors are restored when the iterator finishes or is closed.

        Returns:
            An iterator over the draw indices ``0 … M·num_samples − 1``.

        Raises:
            ConfigError: ``num_samples`` or ``scale`` out of range, or ``model`` not an ``nn.Module``.
        """
        n = check_num_samples(num_samples, self.default_num_samples)
        scale = check_scale(scale)
        if not isinstance(model, nn.Module):
            raise bad_arg("model", type(model).__name__, "a torch.nn.Module")
        return self._iter(model, n, scale, diag_only, generator)

    def _iter(self, model: nn.Module, n: int, scale: float, diag_only: bool,
              generator: torch.Generator | None) -> Iterator[int]:
        i = 0
        for member in self.iter_members(model):
            for _ in member.draws(model, n, scale=scale, diag_only=diag_only, generator=generator):
                yield i
                i += 1

    def __repr__(self) -> str:
        kinds = ["SWAG" if isinstance(m, SWAG) else "file" for m in self.members]
        return f"{type(self).__name__}(members={len(self.members)}: {', '.join(kinds)})"


class MultiSWA(MultiSWAG):
    """Equal-weight ensemble of the SWA means of ``M`` independently trained posteriors.

    The deterministic counterpart of :class:`MultiSWAG`: each member contributes its mean once
    (the same as ``MultiSWAG`` with ``scale=0`` and one draw per member).

    Raises:
        ConfigError: as :class:`MultiSWAG`.

    Examples:
        >>> import torch, weightavg
        >>> net = torch.nn.Linear(2, 1)
        >>> posts = []
        >>> for value in (0.0, 1.0):
        ...     with torch.no_grad():
        ...         _ = net.weight.fill_(value)
        ...     posts.append(weightavg.SWAG(net, max_rank=0))
        ...     posts[-1].collect(net)
        >>> seen = [net.weight.sum().item() for _ in weightavg.MultiSWA(posts).draws(net)]
        >>> seen  # each member's mean in turn
        [0.0, 2.0]
    """

    default_num_samples = 1

    def draws(
        self,
        model: nn.Module,
        num_samples: int | None = None,
        *,
        scale: float = 0.0,
        diag_only: bool = False,
        generator: torch.Generator | None = None,
    ) -> Iterator[int]:
        """Write each member's SWA mean into the model in turn (``num_samples`` must be 1).

        Returns:
            An iterator over the member indices; the model holds that member's mean at each one.

        Raises:
            ConfigError: ``num_samples`` other than 1/None, or ``scale`` other than 0.
        """
        if num_samples not in (None, 1):
            raise bad_arg("num_samples", num_samples, "1 or None (a MultiSWA member is one mean)")
        if scale != 0.0:
            raise bad_arg("scale", scale, "0 (MultiSWA uses the means; use MultiSWAG to sample)")
        return super().draws(model, 1, scale=0.0, generator=generator)
