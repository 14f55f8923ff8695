"""The methods the demo compares, each one entry of :data:`METHODS`.

A method rides on one of two training trajectories that share each seed's initial weights and
batch order:

* ``"sgd"``: the tuned SGD baseline (cosine learning rate over the whole run);
* ``"swa"``: a branch of the SGD run at the SWA start, trained under a :class:`weightavg.SWA`
  policy (:func:`swa_policy`): the policy sets the learning rate of the SWA phase, averages the
  weights at the end of every epoch and refreshes BatchNorm statistics before evaluations.

A method sees the model after every optimizer step and every epoch, and turns the model into
test-set probabilities when asked. SWA and EMA are the library's front end, the
:class:`weightavg.SWA` and :class:`weightavg.EMA` policies; SWAG uses :mod:`weightavg.swag`.
Adding a method is one more factory in :data:`METHODS`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from .._policy import EMA, SWA, AveragingPolicy

__all__ = ["METHODS", "EvalContext", "Method", "available_methods", "default_methods", "predict_probs",
           "swa_policy"]

Trajectory = Literal["sgd", "swa"]


@dataclass(frozen=True)
class EvalContext:
    """What a method needs: BN-refresh batches, test inputs, the SWA start, the run's policy."""

    bn_batches: list[Tensor]  # training inputs in fixed order, for recomputing BN statistics
    x_test: Tensor
    swa_start: int  # first epoch of the SWA phase
    total_steps: int  # optimizer steps in the SGD run
    steps_per_epoch: int | None = None  # optimizer steps per epoch
    swa: SWA | None = None  # on the SWA branch: the weightavg.SWA policy it trains under


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


def averaged_probs(policy: AveragingPolicy | None, ctx: EvalContext) -> Tensor | None:
    """Probabilities of a policy's averaged weights (BatchNorm statistics recomputed for them).

    None before the policy's first update.
    """
    if policy is None or not policy.has_average:
        return None
    with policy.averaged() as model:
        return predict_probs(model, ctx.x_test)


def swa_policy(cfg: Any) -> SWA:
    """The :class:`weightavg.SWA` policy the SWA branch trains under.

    It is begun on the branch at the SWA start, so its window opens at once (``swa_start=0``).
    Before each optimizer step it sets the learning rate: from the SGD run's rate at the branch
    point, annealed (``cfg.anneal_strategy``) to ``cfg.swa_lr`` over ``cfg.anneal_epochs`` epochs
    (one change per epoch), then held. At the end of every epoch it adds the weights to an equal
    average, and :meth:`~weightavg.SWA.averaged` recomputes the average's BatchNorm statistics from
    all of ``bn_data`` (``bn_batches=None``). The model keeps its training weights at the end
    (``final="training"``): the demo evaluates the average through ``averaged()``.

    ``anneal_epochs=0`` anneals over one epoch, as ``torch.optim.swa_utils.SWALR`` does (the
    policy itself would jump), so the run follows :func:`weightavg.demo.swa_schedule`.
    """
    return SWA(swa_start=0, update_interval="1ep", swa_lr=cfg.swa_lr,
               anneal_steps=f"{max(1, cfg.anneal_epochs)}ep", anneal_strategy=cfg.anneal_strategy,
               bn_batches=None, final="training")


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

    def end(self) -> None:
        """Called once when the trajectory ends, after its last prediction."""


class SWAMethod(Method):
    """SWA: the average of the branch's :class:`weightavg.SWA` policy (one snapshot per epoch)."""

    key = "swa"
    label = "SWA"
    trajectory: Trajectory = "swa"
    description = ("equal average of the weights at the end of every epoch of the SWA phase "
                   "(weightavg.SWA: anneal to swa_lr), BatchNorm statistics recomputed")

    def __init__(self, cfg: Any = None) -> None:
        super().__init__(cfg)
        self.policy: SWA | None = None

    def start(self, model: nn.Module, ctx: EvalContext) -> None:
        # the branch trains under this policy whichever methods ride on it (SWAG does too): the
        # run begins it and tells it the epoch ends; SWA evaluates its average
        self.policy = ctx.swa

    def predict(self, model: nn.Module, ctx: EvalContext) -> Tensor | None:
        return averaged_probs(self.policy, ctx)


class EMAMethod(Method):
    """EMA of the SGD run's weights after every step (:class:`weightavg.EMA`, warmed-up decay)."""

    key = "ema"
    label = "EMA"
    trajectory: Trajectory = "sgd"
    power = 0.75
    max_decay = 0.999

    description = (f"EMA of the SGD run updated every step (weightavg.EMA), decay 1-(1+step)^-{power} "
                   f"capped at {max_decay} (warmup), BatchNorm statistics recomputed")

    def __init__(self, cfg: Any = None) -> None:
        super().__init__(cfg)
        self.policy: EMA | None = None

    def start(self, model: nn.Module, ctx: EvalContext) -> None:
        # decay min(smoothing, 1 - (1 + step)^-warmup_power): weightavg.ema_warmup(power=0.75,
        # max_decay=0.999). Begun without the optimizer and told each step by hand (on_step), so
        # that its cost is timed apart from the SGD run it rides on (optimizer hooks would run
        # inside the SGD run's opt.step()).
        self.policy = EMA(smoothing=self.max_decay, warmup=True, warmup_power=self.power,
                          update_interval=1, recompute_bn=True, bn_batches=None, final="training")
        self.policy.begin(model, None, total_steps=ctx.total_steps or None,
                          steps_per_epoch=ctx.steps_per_epoch, bn_data=ctx.bn_batches)

    def after_step(self, model: nn.Module, step: int) -> None:
        if self.policy is not None:
            self.policy.on_step()

    def after_epoch(self, model: nn.Module, epoch: int) -> None:
        if self.policy is not None:
            self.policy.on_epoch_end()

    def predict(self, model: nn.Module, ctx: EvalContext) -> Tensor | None:
        return averaged_probs(self.policy, ctx)

    def end(self) -> None:
        if self.policy is not None:
            self.policy.end()  # the model keeps its training weights (final="training")


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
