"""The methods the demo compares, each one entry of :data:`METHODS`.

A method rides on one of two training trajectories that share each seed's initial weights and
batch order:

* ``"sgd"``: the tuned SGD baseline (cosine learning rate over the whole run);
* ``"swa"``: a branch of the SGD run at the SWA start, continued with SWALR.

It sees the model after every optimizer step and every epoch, and turns the model into test-set
probabilities when asked. All averaging goes through :class:`weightavg.Averager`; adding a method
(e.g. SWAG) is one more factory in :data:`METHODS`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from .._bn import recompute_bn
from .._engine import Averager
from .._rules import ema_warmup, mean

__all__ = ["METHODS", "EvalContext", "Method", "available_methods", "default_methods", "predict_probs"]

Trajectory = Literal["sgd", "swa"]


@dataclass(frozen=True)
class EvalContext:
    """What a method needs to evaluate: BN-refresh batches, test inputs, and the SWA start."""

    bn_batches: list[Tensor]  # training inputs in fixed order, for recompute_bn
    x_test: Tensor
    swa_start: int  # first epoch of the SWA phase
    total_steps: int  # optimizer steps in the SGD run


@torch.no_grad()
def predict_probs(model: nn.Module, x: Tensor, batch_size: int = 1024) -> Tensor:
    """Class probabilities of ``model`` in eval mode (float64, shape (N, C))."""
    was_training = model.training
    model.eval()
    try:
        out = [torch.softmax(model(x[i : i + batch_size]).double(), dim=1)
               for i in range(0, x.shape[0], batch_size)]
    finally:
        model.train(was_training)
    return torch.cat(out)


def averaged_probs(avg: Averager, model: nn.Module, ctx: EvalContext) -> Tensor:
    """Probabilities of the averaged weights, with BatchNorm statistics recomputed for them."""
    with avg.swapped_in(model):
        recompute_bn(model, ctx.bn_batches)
        return predict_probs(model, ctx.x_test)


class Method:
    """Base class of a compared method (the SGD baseline itself: the model as trained).

    A factory in :data:`METHODS` builds one per seed from the demo's configuration
    (:class:`weightavg.demo.DemoConfig`).

    Attributes:
        key: name on the command line (``--methods``).
        label: name in the table.
        trajectory: the run it observes, ``"sgd"`` or ``"swa"``.
        description: one line for the report.
    """

    key = "sgd"
    label = "SGD"
    trajectory: Trajectory = "sgd"
    curve = True  # evaluated after every epoch for the test-error plot
    description = "the model at the end of the tuned SGD run (cosine learning rate)"

    def __init__(self, cfg: Any = None) -> None:
        self.cfg = cfg

    def start(self, model: nn.Module, ctx: EvalContext) -> None:
        """Called once when the trajectory starts (at the branch point for ``"swa"``)."""

    def after_step(self, model: nn.Module, step: int) -> None:
        """Called after each optimizer step; ``step`` counts from 1 over the whole run."""

    def after_epoch(self, model: nn.Module, epoch: int) -> None:
        """Called after each epoch (0-based)."""

    def predict(self, model: nn.Module, ctx: EvalContext) -> Tensor | None:
        """Test-set probabilities, or None when the method has nothing to evaluate yet."""
        return predict_probs(model, ctx.x_test)


class SWAMethod(Method):
    """SWA: an equal average of the weights at the end of each epoch of the SWA phase."""

    key = "swa"
    label = "SWA"
    trajectory: Trajectory = "swa"
    description = ("equal average of the weights at the end of every epoch of the SWA phase "
                   "(SWALR), BatchNorm statistics recomputed")

    def __init__(self, cfg: Any = None) -> None:
        super().__init__(cfg)
        self.avg: Averager | None = None
        self.swa_start = 0

    def start(self, model: nn.Module, ctx: EvalContext) -> None:
        self.avg = Averager(model, rule=mean())
        self.swa_start = ctx.swa_start

    def after_epoch(self, model: nn.Module, epoch: int) -> None:
        if self.avg is not None and epoch >= self.swa_start:
            self.avg.update(model)

    def predict(self, model: nn.Module, ctx: EvalContext) -> Tensor | None:
        if self.avg is None or self.avg.num_updates == 0:
            return None
        return averaged_probs(self.avg, model, ctx)


class EMAMethod(Method):
    """EMA of the SGD run's weights after every step, with a warmed-up decay."""

    key = "ema"
    label = "EMA"
    trajectory: Trajectory = "sgd"
    inv_gamma = 1.0
    power = 0.75
    max_decay = 0.999

    description = (f"EMA of the SGD run updated every step, decay 1-(1+step)^-{power} capped at "
                   f"{max_decay} (warmup), BatchNorm statistics recomputed")

    def __init__(self, cfg: Any = None) -> None:
        super().__init__(cfg)
        self.avg: Averager | None = None

    def start(self, model: nn.Module, ctx: EvalContext) -> None:
        rule = ema_warmup(inv_gamma=self.inv_gamma, power=self.power, max_decay=self.max_decay)
        self.avg = Averager(model, rule=rule)

    def after_step(self, model: nn.Module, step: int) -> None:
        if self.avg is not None:
            self.avg.update(model, step=step)

    def predict(self, model: nn.Module, ctx: EvalContext) -> Tensor | None:
        if self.avg is None or self.avg.num_updates == 0:
            return None
        return averaged_probs(self.avg, model, ctx)


class SWAGMethod(Method):
    """SWAG on the SWA branch: Bayesian model average over draws from the SWAG posterior.

    Collects once per epoch of the SWA phase (like SWA); predicts with ``num_samples`` draws at
    ``scale``, BatchNorm statistics recomputed for each draw. Evaluated at the end of the run only
    (each evaluation costs ``num_samples`` BatchNorm refreshes).
    """

    key = "swag"
    label = "SWAG"
    trajectory: Trajectory = "swa"
    curve = False
    max_rank = 20
    num_samples = 30
    scale = 0.5
    description = (f"SWAG (rank <= {max_rank}) on the SWA branch, collected once per epoch; "
                   f"Bayesian model average of --swag-samples draws (default {num_samples}) at scale "
                   f"{scale}, BatchNorm statistics recomputed per draw")

    def __init__(self, cfg: Any = None) -> None:
        super().__init__(cfg)
        self.swag: Any = None
        self.swa_start = 0
        self.num_samples = int(getattr(cfg, "swag_samples", SWAGMethod.num_samples))

    def start(self, model: nn.Module, ctx: EvalContext) -> None:
        from ..swag import SWAG

        self.swag = SWAG(model, max_rank=self.max_rank)
        self.swa_start = ctx.swa_start

    def after_epoch(self, model: nn.Module, epoch: int) -> None:
        if self.swag is not None and epoch >= self.swa_start:
            self.swag.collect(model)

    def predict(self, model: nn.Module, ctx: EvalContext) -> Tensor | None:
        if self.swag is None or self.swag.num_collected == 0:
            return None
        from ..swag import bma_predict

        gen = torch.Generator().manual_seed(12345)
        return bma_predict(self.swag, model, [ctx.x_test], num_samples=self.num_samples,
                           bn_data=ctx.bn_batches, scale=self.scale, generator=gen)


def _swag_factory() -> Callable[[Any], Method] | None:
    """The SWAG entry when ``weightavg.swag`` is importable (None otherwise)."""
    try:
        from ..swag import SWAG, bma_predict  # noqa: F401 - availability check
    except ImportError:
        return None
    return SWAGMethod


#: key -> factory of a fresh method (one per seed). SWAG joins when ``weightavg.swag`` exists.
METHODS: dict[str, Callable[[Any], Method]] = {"sgd": Method, "swa": SWAMethod, "ema": EMAMethod}


def default_methods() -> tuple[str, ...]:
    """The demo's default comparison: SGD, SWA, EMA, and SWAG when available."""
    return tuple(available_methods())


def available_methods() -> dict[str, Callable[[Any], Method]]:
    """The method factories usable here (SWAG only when it is installed)."""
    out = dict(METHODS)
    swag = _swag_factory()
    if swag is not None:
        out["swag"] = swag
    return out
