"""Anomaly detection: learn the bulk, score every pixel, threshold the score map.

Every detector follows one contract (scikit-learn style, :class:`BaseDetector`): ``fit(cube, mask=None)``
returns the detector, ``score(cube)`` gives a (y, x) DataArray (higher = more anomalous),
``reconstruct(cube)`` the bulk model of each spectrum, ``predict(cube)`` boolean labels and
``flag(scores)`` the labels of a score map already computed (by default pooled over neighbourhoods and
flagged at a 5 % false-discovery rate: :mod:`eels_ad.detect.spatial`); ``save(path)`` writes one NetCDF format
that :func:`load` reads back whatever the class. ``MODELS`` names the detectors ``eels-ad train`` knows.
"""

from typing import Any

from ._base import BaseDetector, NotFittedError, SpectrumDetector, detector_class, load
from ._scores import (
    SCORES,
    deviance_z,
    edge_shift,
    edge_shift_z,
    one_minus_correlation,
    pearson_residual,
    poisson_deviance,
    shift_or_deviance,
)
from .pca import PCADetector
from .sklearn import SklearnDetector
from .spatial import (
    empirical_null,
    fdr_flags,
    pixel_pvalues,
    pool_evidence,
    pooled_null,
    ring_prediction,
    spatial_flags,
)
from .threshold import bimodality, choose_threshold, false_alarm_threshold, gmm_threshold, otsu_threshold

#: the detectors of ``eels-ad train --model``: the model name and its class name
MODELS: dict[str, str] = {"pca": "PCADetector", "cvae": "CVAEDetector"}

__all__ = [
    "MODELS",
    "SCORES",
    "deviance_z",
    "shift_or_deviance",
    "BaseDetector",
    "CVAEDetector",
    "NotFittedError",
    "PCADetector",
    "SklearnDetector",
    "SpectrumDetector",
    "bimodality",
    "choose_threshold",
    "detector_class",
    "edge_shift",
    "edge_shift_z",
    "empirical_null",
    "false_alarm_threshold",
    "fdr_flags",
    "gmm_threshold",
    "load",
    "one_minus_correlation",
    "otsu_threshold",
    "pearson_residual",
    "pixel_pvalues",
    "poisson_deviance",
    "pool_evidence",
    "pooled_null",
    "ring_prediction",
    "spatial_flags",
]


def __getattr__(name: str) -> Any:
    # the CVAE needs torch and Lightning: import them only when it is asked for
    if name == "CVAEDetector":
        from .cvae import CVAEDetector

        return CVAEDetector
    raise AttributeError(f"module 'eels_ad.detect' has no attribute {name!r}")
