"""Any scikit-learn (or PyOD) outlier detector as an eels-ad detector."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import xarray as xr

from ._base import SpectrumDetector
from .threshold import ThresholdMethod


class SklearnDetector(SpectrumDetector):
    """Wrap an estimator with ``fit(X)`` and ``score_samples(X)`` (higher = more normal).

    Spectra are divided by their total counts (so thickness does not count as an anomaly) and
    square-rooted (Anscombe-like variance stabilisation) before they reach the estimator.
    ``reconstruct`` is not available: such models do not reconstruct spectra. Nor is ``save``: an
    arbitrary estimator can only be stored by pickling it, which eels-ad never reads back.

    Parameters
    ----------
    estimator
        E.g. ``sklearn.ensemble.IsolationForest(random_state=0)``; it is fitted in place.
    energy_range, threshold, fdr, false_alarm_rate, spatial, empirical_null, chunk_pixels
        As for :class:`~eels_ad.detect.PCADetector`.

    Examples
    --------
    >>> from sklearn.ensemble import IsolationForest
    >>> det = SklearnDetector(IsolationForest(random_state=0))
    """

    def __init__(
        self,
        estimator,
        *,
        energy_range: tuple[float, float] | None = None,
        threshold: ThresholdMethod | float = "fdr",
        fdr: float = 0.05,
        false_alarm_rate: float = 0.001,
        spatial: bool = True,
        empirical_null: bool = True,
        chunk_pixels: int = 1024,
    ) -> None:
        self.estimator = estimator
        self.energy_range = energy_range
        self.threshold = threshold
        self.fdr = fdr
        self.false_alarm_rate = false_alarm_rate
        self.spatial = spatial
        self.empirical_null = empirical_null
        self.chunk_pixels = chunk_pixels

    @staticmethod
    def _features(spectra: np.ndarray) -> np.ndarray:
        totals = np.maximum(spectra.sum(axis=1, keepdims=True), 1e-12)
        return np.sqrt(np.maximum(spectra, 0.0) / totals)

    def _fit_spectra(self, chunks: Callable[[], Iterator[np.ndarray]], energy: np.ndarray, n_train: int) -> None:
        self.estimator.fit(np.concatenate([self._features(s) for s in chunks()]))
        return None

    def _score_array(self, cube: xr.DataArray) -> np.ndarray:
        scores = np.empty((cube.sizes["y"], cube.sizes["x"]))
        for block, _, spectra in self._pixel_chunks(cube):
            scores[block] = -self.estimator.score_samples(self._features(spectra)).reshape(-1, cube.sizes["x"])
        return scores

    def _reconstruct_spectra(self, spectra: np.ndarray) -> np.ndarray:
        raise NotImplementedError(f"{type(self.estimator).__name__} does not reconstruct spectra")

    def _state(self) -> dict[str, Any]:
        raise NotImplementedError(
            f"a SklearnDetector ({type(self.estimator).__name__}) cannot be saved: eels-ad stores no pickles; "
            "refit it, or save the estimator yourself (e.g. with skops)"
        )

    def _set_state(self, state: dict[str, Any]) -> None:
        raise NotImplementedError("a SklearnDetector cannot be loaded")
