"""Per-epoch learning-rate schedules of the demo and of ``weightavg plot-lr``.

The SWA phase uses the policies' closed forms (:func:`weightavg._schedules.swa_anneal_lr` and
``swa_cyclic_lr``), so what is drawn is what ``weightavg.SWA`` does.
"""

from __future__ import annotations

import math

from .._errors import bad_arg
from .._schedules import anneal_factor, swa_anneal_lr, swa_cyclic_lr

__all__ = ["cosine_lr", "swa_schedule", "swalr_lr"]


def cosine_lr(lr: float, epoch: int, epochs: int) -> float:
    """Cosine decay from ``lr`` at epoch 0 towards 0 at epoch ``epochs``.

    .. note::
        ``lr_e = lr · (1 + cos(π e / E)) / 2`` (``CosineAnnealingLR`` with ``T_max=E``, ``eta_min=0``,
        stepped once per epoch).
    """
    return lr * (1.0 + math.cos(math.pi * epoch / epochs)) / 2.0


def swalr_lr(lr0: float, swa_lr: float, i: int, anneal_epochs: int, strategy: str = "cos") -> float:
    """Learning rate ``i`` epochs after the SWA phase starts (``torch.optim.swa_utils.SWALR``).

    .. note::
        ``lr = lr0 + (swa_lr − lr0) · a(t)`` with ``t = min(1, i / max(1, anneal_epochs))`` and
        ``a(t) = (1 − cos πt)/2`` (``"cos"``) or ``t`` (``"linear"``): the first SWA epoch still
        uses ``lr0`` and ``swa_lr`` is reached after ``anneal_epochs`` epochs (as SWALR stepped
        once per epoch; ``anneal_epochs=0`` behaves like 1 there, unlike ``weightavg.SWA``'s jump).
    """
    return swa_anneal_lr(lr0, swa_lr, i, max(1, anneal_epochs), strategy)


def swa_schedule(
    epochs: int,
    *,
    lr: float,
    swa_start: int,
    swa_lr: float,
    anneal_epochs: int,
    strategy: str = "cos",
    before: str = "cosine",
    cycle: int | None = None,
) -> list[float]:
    """Learning rate of each epoch of an SWA run.

    Before ``swa_start`` the run follows ``before`` (``"cosine"`` over the whole run, as the SGD
    baseline of the demo, or ``"constant"`` at ``lr``); from ``swa_start`` on, SWALR anneals from
    the learning rate of epoch ``swa_start`` to ``swa_lr`` (see :func:`swalr_lr`). With ``cycle``
    the SWA phase is cyclic instead (``weightavg.SWA(cycle=...)``): each cycle of ``cycle`` epochs
    goes from the learning rate of epoch ``swa_start`` down to ``swa_lr``, reached at its last
    epoch, where the weights are averaged.

    Args:
        epochs: number of epochs (> 0).
        lr: the base learning rate (> 0).
        swa_start: first epoch of the SWA phase, in [0, epochs].
        swa_lr: the SWA learning rate (> 0).
        anneal_epochs: epochs of the anneal from the current rate to ``swa_lr`` (>= 0).
        strategy: ``"cos"`` or ``"linear"``.
        before: ``"cosine"`` or ``"constant"``.
        cycle: cycle length in epochs for a cyclic SWA phase (None: anneal then constant).

    Returns:
        ``epochs`` learning rates, one per epoch.
    """
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs <= 0:
        raise bad_arg("epochs", epochs, "a positive int")
    if not (isinstance(lr, (int, float)) and lr > 0 and math.isfinite(lr)):
        raise bad_arg("lr", lr, "a positive float")
    if not (isinstance(swa_lr, (int, float)) and swa_lr > 0 and math.isfinite(swa_lr)):
        raise bad_arg("swa_lr", swa_lr, "a positive float")
    if isinstance(swa_start, bool) or not isinstance(swa_start, int) or not 0 <= swa_start <= epochs:
        raise bad_arg("swa_start", swa_start, f"an epoch in [0, {epochs}]")
    if isinstance(anneal_epochs, bool) or not isinstance(anneal_epochs, int) or anneal_epochs < 0:
        raise bad_arg("anneal_epochs", anneal_epochs, "a non-negative int")
    if before not in ("cosine", "constant"):
        raise bad_arg("before", before, "'cosine' or 'constant'")
    anneal_factor(strategy, 0.0)  # validates the strategy
    if cycle is not None and (isinstance(cycle, bool) or not isinstance(cycle, int) or cycle < 1):
        raise bad_arg("cycle", cycle, "a positive number of epochs or None")

    def base(e: int) -> float:
        return cosine_lr(lr, e, epochs) if before == "cosine" else float(lr)

    lr0 = base(swa_start)

    def phase(i: int) -> float:
        if cycle is not None:
            return swa_cyclic_lr(lr0, swa_lr, i, cycle, strategy)
        return swalr_lr(lr0, swa_lr, i, anneal_epochs, strategy)

    return [base(e) if e < swa_start else phase(e - swa_start) for e in range(epochs)]
