"""The demo's experiment: SGD vs SWA vs EMA over several seeds, paired by seed."""

from __future__ import annotations

import contextlib
import copy
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from .. import metrics
from .._errors import bad_arg
from .._policy import SWA
from .._schedules import group_lr
from ._data import DemoData, load_data
from ._lr import cosine_lr, swa_schedule
from ._methods import EvalContext, Method, available_methods, default_methods, swa_policy
from ._models import MODELS, make_model
from ._stats import Paired, mean_std, paired_test

__all__ = ["DemoConfig", "DemoResult", "Progress", "SeedResult", "run_demo"]


@dataclass(frozen=True)
class DemoConfig:
    """Settings of a demo run (defaults: the measured MNIST-1D setup).

    Attributes:
        dataset: ``"mnist1d"`` or ``"digits"``.
        model: ``"mlp"`` (40-256-256-10 with BatchNorm) or ``"cnn"`` (1D CNN with BatchNorm).
        seeds: number of seeds (0, 1, ...); each gives one paired comparison. 8 by default: SWA's
            gain then holds in every seed with paired p far below 0.01 (measured: the gain's spread
            over seeds is well under its mean), in about two minutes on 2 CPU cores.
        epochs: epochs of the SGD run.
        methods: compared methods besides the SGD baseline, which always runs (default: SWA, EMA,
            and SWAG when :mod:`weightavg.swag` is available).
        batch_size: minibatch size.
        lr: peak learning rate (cosine-decayed to 0 over the run for SGD).
        momentum: Nesterov momentum.
        weight_decay: L2 weight decay.
        swa_start: fraction of the epochs after which SWA branches off the SGD run (0.5: an
            averaging phase of half the run gave a larger and steadier gain than 0.75).
        swa_lr: SWA learning rate reached by the anneal.
        anneal_epochs: epochs of the anneal to ``swa_lr`` (0 behaves as 1, as in SWALR).
        anneal_strategy: ``"cos"`` or ``"linear"``.
        threads: torch intra-op threads during the run (restored afterwards).
        eval_every: evaluate the curves every this many epochs (the last epoch always).
        swag_samples: posterior draws averaged by SWAG's prediction.
    """

    dataset: str = "mnist1d"
    model: str = "mlp"
    seeds: int = 8
    epochs: int = 60
    methods: tuple[str, ...] = field(default_factory=lambda: default_methods())
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-3
    swa_start: float = 0.5
    swa_lr: float = 0.03
    anneal_epochs: int = 3
    anneal_strategy: str = "cos"
    threads: int = 1
    eval_every: int = 1
    swag_samples: int = 30

    @property
    def swa_start_epoch(self) -> int:
        return round(self.swa_start * self.epochs)

    def validate(self) -> None:
        """Raise :class:`weightavg.ConfigError` naming the first bad setting."""
        if self.model not in MODELS:
            raise bad_arg("model", self.model, f"one of {', '.join(MODELS)}")
        for name in ("seeds", "epochs", "batch_size", "threads", "eval_every", "swag_samples"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise bad_arg(name, v, "a positive int")
        if self.epochs < 2:
            raise bad_arg("epochs", self.epochs, "at least 2 (SWA needs epochs after its start)")
        if not 0.0 < self.swa_start < 1.0:
            raise bad_arg("swa_start", self.swa_start, "a fraction of the epochs in (0, 1)")
        if not 1 <= self.swa_start_epoch < self.epochs:
            raise bad_arg("swa_start", self.swa_start,
                          f"a fraction that leaves SWA epochs in a {self.epochs}-epoch run")
        known = available_methods()
        for m in self.methods:
            if m not in known:
                hint = " (SWAG needs weightavg.swag, not available here)" if m == "swag" else ""
                raise bad_arg("methods", m, f"a subset of {', '.join(known)}{hint}")
        if len(set(self.methods)) != len(self.methods):
            raise bad_arg("methods", ",".join(self.methods), "method names without repeats")
        for name in ("lr", "swa_lr"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and v > 0 and math.isfinite(v)):
                raise bad_arg(name, v, "a positive float")
        if not 0.0 <= self.momentum < 1.0:
            raise bad_arg("momentum", self.momentum, "a number in [0, 1)")
        if self.weight_decay < 0:
            raise bad_arg("weight_decay", self.weight_decay, "a non-negative float")
        if isinstance(self.anneal_epochs, bool) or not isinstance(self.anneal_epochs, int) \
                or self.anneal_epochs < 0:
            raise bad_arg("anneal_epochs", self.anneal_epochs, "a non-negative int")
        if self.anneal_strategy not in ("cos", "linear"):
            raise bad_arg("anneal_strategy", self.anneal_strategy, "'cos' or 'linear'")

    def method_keys(self) -> list[str]:
        """The methods to run, SGD (the baseline) first."""
        return ["sgd", *[m for m in self.methods if m != "sgd"]]

    def lr_schedules(self) -> dict[str, list[float]]:
        """Per-epoch learning rate of each trajectory: ``{"sgd": [...], "swa": [...]}``."""
        sgd = [cosine_lr(self.lr, e, self.epochs) for e in range(self.epochs)]
        swa = swa_schedule(self.epochs, lr=self.lr, swa_start=self.swa_start_epoch,
                           swa_lr=self.swa_lr, anneal_epochs=self.anneal_epochs,
                           strategy=self.anneal_strategy, before="cosine")
        return {"sgd": sgd, "swa": swa}


class Progress(Protocol):
    """What the experiment reports while it runs (see :mod:`weightavg.demo._progress`)."""

    def start(self, total: int) -> None: ...

    def advance(self, description: str) -> None: ...

    def log(self, text: str) -> None: ...

    def close(self) -> None: ...


@dataclass
class SeedResult:
    """One seed: final metrics, cost, test-error curves and final probabilities per method.

    ``step_lrs[trajectory][epoch]`` holds the learning rate every optimizer step of that epoch
    used, read from the optimizer right before the step (after the policy set it); the SWA
    branch's epochs before the SWA start are the SGD run's.
    """

    seed: int
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)  # method -> metric -> value
    train_time_s: dict[str, float] = field(default_factory=dict)  # method -> seconds
    curves: dict[str, list[float]] = field(default_factory=dict)  # method -> test error per epoch
    probs: dict[str, Tensor] = field(default_factory=dict)  # method -> (M, C) final probabilities
    step_lrs: dict[str, list[list[float]]] = field(default_factory=dict)  # trajectory -> epoch -> lrs


@dataclass
class DemoResult:
    """Everything the report needs."""

    config: DemoConfig
    data_description: str
    labels: dict[str, str]  # method key -> table label
    descriptions: dict[str, str]  # method key -> one line
    trajectories: dict[str, str]  # method key -> "sgd" | "swa"
    seeds: list[SeedResult]
    y_test: Tensor
    wall_time_s: float
    threads: int
    torch_version: str = torch.__version__

    def values(self, method: str, metric: str) -> list[float]:
        """Per-seed values of ``metric`` (``accuracy``, ``nll``, ``ece``, ``train_time_s``)."""
        if metric == "train_time_s":
            return [s.train_time_s[method] for s in self.seeds]
        return [s.metrics[method][metric] for s in self.seeds]

    def summary(self, method: str, metric: str) -> tuple[float, float]:
        """Mean and standard deviation over seeds."""
        return mean_std(self.values(method, metric))

    def versus_sgd(self, method: str, metric: str) -> Paired:
        """Paired comparison of ``method − SGD`` over seeds."""
        return paired_test(self.values(method, metric), self.values("sgd", metric))

    def differences(self, method: str, metric: str) -> list[float]:
        """Per-seed ``method − SGD`` of ``metric``."""
        return [a - b for a, b in zip(self.values(method, metric), self.values("sgd", metric), strict=True)]

    def config_dict(self) -> dict[str, Any]:
        d = asdict(self.config)
        d["methods"] = list(self.config.method_keys())
        d["swa_start_epoch"] = self.config.swa_start_epoch
        return d


def _score(probs: Tensor, labels: Tensor) -> dict[str, float]:
    return {
        "accuracy": metrics.accuracy(probs, labels),
        "nll": metrics.nll(probs, labels),
        "ece": metrics.ece(probs, labels, num_bins=15),
    }


class _Timer:
    """Seconds spent inside method hooks, per method."""

    def __init__(self, keys: Sequence[str]) -> None:
        self.spent = dict.fromkeys(keys, 0.0)

    @contextlib.contextmanager
    def __call__(self, key: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.spent[key] += time.perf_counter() - t0


def _run_seed(
    seed: int,
    cfg: DemoConfig,
    data: DemoData,
    ctx: EvalContext,
    progress: Progress | None,
    label: str,
) -> tuple[SeedResult, dict[str, Method]]:
    keys = cfg.method_keys()
    factories = available_methods()
    methods = {k: factories[k](cfg) for k in keys}
    on = {t: [k for k in keys if methods[k].trajectory == t] for t in ("sgd", "swa")}
    E, S = cfg.epochs, cfg.swa_start_epoch
    sgd_lrs = [cosine_lr(cfg.lr, e, E) for e in range(E)]
    n = data.x_train.shape[0]
    spe = math.ceil(n / cfg.batch_size)
    timer = _Timer(keys)
    res = SeedResult(seed, curves={k: [math.nan] * E for k in keys})
    traj_time = {"sgd": 0.0, "swa": 0.0}
    prefix_time = 0.0

    torch.manual_seed(seed)
    model = make_model(cfg.model, data.num_features, data.num_classes)

    def make_opt(m: nn.Module) -> torch.optim.Optimizer:
        return torch.optim.SGD(m.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                               nesterov=cfg.momentum > 0, weight_decay=cfg.weight_decay)

    def record_lrs(o: torch.optim.Optimizer, traj: str) -> None:
        # registered after the policy's hooks: sees the rate the step really uses
        def hook(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            res.step_lrs[traj][-1].extend(group_lr(g) for g in opt.param_groups)
        o.register_step_pre_hook(hook)

    opt = make_opt(model)
    res.step_lrs["sgd"] = []
    record_lrs(opt, "sgd")

    def run(traj: str, first: int, step: int, tctx: EvalContext, policy: SWA | None) -> int:
        nonlocal prefix_time
        hooks = on[traj]
        for epoch in range(first, E):
            if traj == "sgd" and epoch == S and on["swa"]:
                snapshot.append((copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict()),
                                 step))
                prefix_time = traj_time["sgd"]
            t0 = time.perf_counter()
            hook_t0 = sum(timer.spent.values())
            if policy is None:  # the SGD run's own schedule; on the branch the policy sets the rate
                for g in opt.param_groups:
                    g["lr"] = sgd_lrs[epoch]
            res.step_lrs[traj].append([])
            model.train()
            gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
            perm = torch.randperm(n, generator=gen)
            for i in range(0, n, cfg.batch_size):
                idx = perm[i : i + cfg.batch_size]
                loss = nn.functional.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step += 1
                for k in hooks:
                    with timer(k):
                        methods[k].after_step(model, step)
            if policy is not None:
                policy.on_epoch_end()  # snapshot into the SWA average; next epoch's rate
            for k in hooks:
                with timer(k):
                    methods[k].after_epoch(model, epoch)
            traj_time[traj] += time.perf_counter() - t0 - (sum(timer.spent.values()) - hook_t0)
            last = epoch == E - 1
            if last or (epoch + 1) % cfg.eval_every == 0:
                for k in hooks:
                    if last:
                        with timer(k):
                            probs = methods[k].predict(model, tctx)
                        if probs is not None:
                            res.probs[k] = probs
                    elif methods[k].curve:
                        probs = methods[k].predict(model, tctx)
                    else:
                        probs = None
                    if probs is not None:
                        res.curves[k][epoch] = 1.0 - metrics.accuracy(probs, data.y_test)
            if progress is not None:
                progress.advance(f"{label} · {traj.upper()} run · epoch {epoch + 1}/{E}")
        for k in hooks:
            methods[k].end()
        return step

    snapshot: list[tuple[dict[str, Any], dict[str, Any], int]] = []
    for k in on["sgd"]:
        with timer(k):
            methods[k].start(model, ctx)
    run("sgd", 0, 0, ctx, None)
    if on["swa"]:
        state, opt_state, step = snapshot[0]
        t0 = time.perf_counter()
        model.load_state_dict(state)
        opt = make_opt(model)
        opt.load_state_dict(opt_state)  # momentum buffers of the SGD run
        for g in opt.param_groups:
            g["lr"] = sgd_lrs[S]  # the SGD run's rate at the branch point: the anneal starts there
        policy = swa_policy(cfg)
        policy.begin(model, opt, total_steps=(E - S) * spe, steps_per_epoch=spe, bn_data=ctx.bn_batches)
        res.step_lrs["swa"] = [list(x) for x in res.step_lrs["sgd"][:S]]
        record_lrs(opt, "swa")
        traj_time["swa"] += time.perf_counter() - t0
        bctx = replace(ctx, swa=policy)
        for k in on["swa"]:
            with timer(k):
                methods[k].start(model, bctx)
        run("swa", S, step, bctx, policy)
        policy.end()  # final="training": the model keeps the branch's weights
    for k in keys:
        probs = res.probs.get(k)
        if probs is None:
            raise RuntimeError(f"method {k!r} produced no prediction at the end of the run")
        res.metrics[k] = _score(probs, data.y_test)
        traj = methods[k].trajectory
        base = traj_time["sgd"] if traj == "sgd" else prefix_time + traj_time["swa"]
        res.train_time_s[k] = base + timer.spent[k]
    return res, methods


def run_demo(cfg: DemoConfig, progress: Progress | None = None) -> DemoResult:
    """Run the comparison over ``cfg.seeds`` seeds.

    Each seed trains one SGD run and, when SWA (or another ``"swa"``-trajectory method) is
    compared, one branch from the SGD run at the SWA start, trained under a :class:`weightavg.SWA`
    policy (:func:`weightavg.demo._methods.swa_policy`): both share the seed's initial weights and
    the batch order of every epoch. EMA (a :class:`weightavg.EMA` policy) rides on the SGD run (it
    does not change training).

    Returns:
        A :class:`DemoResult`; :mod:`weightavg.demo._report` turns it into tables and plots.
    """
    cfg.validate()
    t_start = time.perf_counter()
    old_threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        data = load_data(cfg.dataset)
        bs = cfg.batch_size
        n = data.x_train.shape[0]
        # BN statistics of the averages are pooled over these chunks (exact whole-set statistics
        # for the first BatchNorm layer; later layers see inputs normalised per chunk)
        chunk = 1024
        ctx = EvalContext(
            bn_batches=[data.x_train[i : i + chunk] for i in range(0, n, chunk)],
            x_test=data.x_test,
            swa_start=cfg.swa_start_epoch,
            total_steps=cfg.epochs * math.ceil(n / bs),
            steps_per_epoch=math.ceil(n / bs),
        )
        keys = cfg.method_keys()
        factories = available_methods()
        probes = {k: factories[k](cfg) for k in keys}
        per_seed = cfg.epochs + (cfg.epochs - cfg.swa_start_epoch
                                 if any(p.trajectory == "swa" for p in probes.values()) else 0)
        if progress is not None:
            progress.start(cfg.seeds * per_seed)
        seeds: list[SeedResult] = []
        try:
            for seed in range(cfg.seeds):
                # seeds are named by their value (torch.manual_seed(seed)) everywhere: 0, 1, ...
                r, _ = _run_seed(seed, cfg, data, ctx, progress, f"seed {seed} (seeds 0–{cfg.seeds - 1})")
                seeds.append(r)
                if progress is not None:
                    accs = "  ".join(f"{probes[k].label} {100 * r.metrics[k]['accuracy']:.1f}%"
                                     for k in keys)
                    progress.log(f"seed {seed}: test accuracy  {accs}")
        finally:
            if progress is not None:
                progress.close()
    finally:
        torch.set_num_threads(old_threads)
    return DemoResult(
        config=cfg,
        data_description=data.description,
        labels={k: probes[k].label for k in keys},
        descriptions={k: probes[k].description for k in keys},
        trajectories={k: probes[k].trajectory for k in keys},
        seeds=seeds,
        y_test=data.y_test,
        wall_time_s=time.perf_counter() - t_start,
        threads=cfg.threads,
    )
