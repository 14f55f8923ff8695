"""weightavg: correct, fast weight averaging for PyTorch (SWA, EMA, SWAG and friends).

The public API is what this module lists in ``__all__``; everything else is private.
"""

from . import _boot  # noqa: F401  # first: the command's Ctrl-C/SIGTERM handling while torch imports
from ._bn import has_running_stats, recompute_bn
from ._duration import Duration
from ._engine import Averager, canonical_name, make_contiguous, named_tensors, unwrap_model
from ._errors import ConfigError, MismatchError, NonFiniteError, StateError, WeightAvgError
from ._policy import EMA, SWA, AveragingPolicy
from ._rules import (
    Rule,
    UpdateInfo,
    custom,
    ema,
    ema_warmup,
    inplace,
    karras_ema,
    mean,
    sigma_rel_to_gamma,
)
from ._schedules import FastSWALR, SWAAnnealLR, SWACyclicLR
from ._window import WindowAverage
from .posthoc import PostHocEMA
from .soup import greedy_soup
from .swag import SWAG, MultiSWA, MultiSWAG, SubspaceInference, bma_predict

__version__ = "0.1.0"

__all__ = [
    "EMA",
    "SWA",
    "SWAG",
    "Averager",
    "AveragingPolicy",
    "ConfigError",
    "Duration",
    "FastSWALR",
    "MismatchError",
    "MultiSWA",
    "MultiSWAG",
    "NonFiniteError",
    "PostHocEMA",
    "Rule",
    "SWAAnnealLR",
    "SWACyclicLR",
    "StateError",
    "SubspaceInference",
    "UpdateInfo",
    "WeightAvgError",
    "WindowAverage",
    "__version__",
    "bma_predict",
    "canonical_name",
    "custom",
    "ema",
    "ema_warmup",
    "greedy_soup",
    "has_running_stats",
    "inplace",
    "karras_ema",
    "make_contiguous",
    "mean",
    "named_tensors",
    "recompute_bn",
    "sigma_rel_to_gamma",
    "unwrap_model",
]
