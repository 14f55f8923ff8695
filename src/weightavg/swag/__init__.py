"""SWAG and friends: Gaussian posteriors over weights built on the averaging engine.

- :class:`SWAG`: SWA mean, diagonal variance and low-rank deviations; sampling, exact density.
- :class:`MultiSWAG` / :class:`MultiSWA`: equal-weight mixtures of independently trained runs.
- :func:`bma_predict`: Bayesian model averaging of probabilities, one draw at a time;
  :func:`select_scale` picks SWAG's variance scale on validation data.
- Subspace inference: :func:`pca_subspace`, :func:`random_subspace`, :func:`elliptical_slice`,
  :class:`SubspaceInference` (ESS or mean-field VI in the subspace).
- :func:`plot_reliability`: reliability diagram (needs matplotlib).
"""

from ._bma import Posterior, bma_predict, predict_probs, select_scale
from ._multi import MultiSWA, MultiSWAG
from ._plot import plot_reliability
from ._subspace import (
    Subspace,
    SubspaceInference,
    elliptical_slice,
    pca_subspace,
    random_subspace,
)
from ._swag import SWAG, last_layer

__all__ = [
    "SWAG",
    "MultiSWA",
    "MultiSWAG",
    "Posterior",
    "Subspace",
    "SubspaceInference",
    "bma_predict",
    "elliptical_slice",
    "last_layer",
    "pca_subspace",
    "plot_reliability",
    "predict_probs",
    "random_subspace",
    "select_scale",
]
