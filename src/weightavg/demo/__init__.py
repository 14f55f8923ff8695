"""``weightavg demo``: SGD vs SWA vs EMA on MNIST-1D, paired by seed, in about two minutes on a CPU.

Needs the ``demo`` extra (``pip install 'weightavg[demo]'``) for the data; matplotlib (in that
extra) draws the plots.
"""

from ._data import DATASETS, DemoData, MissingExtraError, load_data
from ._lr import cosine_lr, swa_schedule, swalr_lr
from ._methods import METHODS, EvalContext, Method, available_methods
from ._models import MODELS, make_model
from ._run import DemoConfig, DemoResult, SeedResult, run_demo

__all__ = [
    "DATASETS",
    "METHODS",
    "MODELS",
    "DemoConfig",
    "DemoData",
    "DemoResult",
    "EvalContext",
    "Method",
    "MissingExtraError",
    "SeedResult",
    "available_methods",
    "cosine_lr",
    "load_data",
    "make_model",
    "run_demo",
    "swa_schedule",
    "swalr_lr",
]
