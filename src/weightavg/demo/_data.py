"""The demo's data: MNIST-1D (generated locally by ``mnist1d``) or scikit-learn's digits.

Both are real, published datasets; nothing is downloaded.
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass

import torch
from torch import Tensor

from .._errors import WeightAvgError, bad_arg

__all__ = ["DATASETS", "DemoData", "MissingExtraError", "load_data"]

DATASETS = ("mnist1d", "digits")


class MissingExtraError(WeightAvgError, ImportError):
    """An optional dependency is not installed."""


def require(module: str, extra: str = "demo") -> None:
    """Raise :class:`MissingExtraError` with the install command if ``module`` is missing."""
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise MissingExtraError(
            f"this needs the optional package '{module}': pip install 'weightavg[{extra}]'"
        )


@dataclass(frozen=True)
class DemoData:
    """A classification dataset as float32 inputs and int64 labels (on the CPU)."""

    name: str
    description: str
    x_train: Tensor  # (N, D) float32
    y_train: Tensor  # (N,) int64
    x_test: Tensor  # (M, D) float32
    y_test: Tensor  # (M,) int64
    num_classes: int

    @property
    def num_features(self) -> int:
        return int(self.x_train.shape[1])


def _mnist1d() -> DemoData:
    require("mnist1d")
    import random

    import mnist1d.data
    import numpy as np

    # the generator seeds numpy's and Python's global RNGs: give the caller's states back
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # the generator may print progress
            args = mnist1d.data.get_dataset_args()
            ds = mnist1d.data.make_dataset(args)
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    return DemoData(
        name="mnist1d",
        description=(f"MNIST-1D (Greydanus 2020), generated locally with seed {args.seed}: "
                     f"{len(ds['y'])} train / {len(ds['y_test'])} test, 40 features, 10 classes"),
        x_train=torch.as_tensor(ds["x"], dtype=torch.float32),
        y_train=torch.as_tensor(ds["y"], dtype=torch.int64),
        x_test=torch.as_tensor(ds["x_test"], dtype=torch.float32),
        y_test=torch.as_tensor(ds["y_test"], dtype=torch.int64),
        num_classes=10,
    )


def _digits() -> DemoData:
    require("sklearn")
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.25, stratify=y, random_state=0)
    scale = 16.0  # pixel intensities are 0..16
    return DemoData(
        name="digits",
        description=(f"scikit-learn digits (UCI optical digits 8x8), fixed stratified split: "
                     f"{len(y_tr)} train / {len(y_te)} test, 64 features, 10 classes"),
        x_train=torch.as_tensor(x_tr / scale, dtype=torch.float32),
        y_train=torch.as_tensor(y_tr, dtype=torch.int64),
        x_test=torch.as_tensor(x_te / scale, dtype=torch.float32),
        y_test=torch.as_tensor(y_te, dtype=torch.int64),
        num_classes=10,
    )


def load_data(name: str) -> DemoData:
    """Load the dataset ``name`` (``"mnist1d"`` or ``"digits"``)."""
    if name == "mnist1d":
        return _mnist1d()
    if name == "digits":
        return _digits()
    raise bad_arg("dataset", name, f"one of {', '.join(DATASETS)}")
