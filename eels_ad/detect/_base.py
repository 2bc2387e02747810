"""The detector contract every eels-ad detector follows (scikit-learn style).

Parameters live in ``__init__``; ``fit(cube, mask=None)`` learns the bulk and returns ``self``;
fitted state lives in attributes ending in ``_``. ``score`` gives a (y, x) map, higher = more
anomalous; ``reconstruct`` the bulk model of each spectrum; ``predict`` boolean labels with the
chosen threshold. Cubes are processed in chunks of pixels, so memory stays bounded.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from ..datacube import as_mask, validate
from ._scores import SCORES, score_spectra
from .threshold import ThresholdMethod, choose_threshold


class NotFittedError(RuntimeError):
    """A detector was used before ``fit``."""


class BaseDetector:
    """Shared machinery: energy handling, chunked scoring, thresholds, save/load.

    Subclasses implement ``_fit_spectra(chunks, energy, n_train)`` (learn from a callable that
    yields (pixels, channels) arrays of the training spectra; return None, or a boolean mask of the
    training spectra really kept, e.g. after trimming outliers) and ``_reconstruct_spectra(spectra)``;
    optionally ``_state``/``_set_state`` for
    :meth:`save` and :meth:`load`.
    """

    _ENERGY_TOLERANCE = 0.01  # of a channel, when comparing energy axes

    def __init__(
        self,
        *,
        energy_range: tuple[float, float] | None = None,
        scoring: str = "deviance",
        score_range: tuple[float, float] | None = None,
        threshold: ThresholdMethod | float = "auto",
        false_alarm_rate: float = 0.001,
        chunk_pixels: int = 8192,
    ) -> None:
        self.energy_range = energy_range
        self.scoring = scoring
        self.score_range = score_range
        self.threshold = threshold
        self.false_alarm_rate = false_alarm_rate
        self.chunk_pixels = chunk_pixels

    # -- parameters -------------------------------------------------------------------------
    def get_params(self) -> dict[str, Any]:
        """The ``__init__`` parameters and their values."""
        import inspect

        names = [
            p.name for cls in type(self).__mro__ if "__init__" in vars(cls)
            for p in list(inspect.signature(cls.__init__).parameters.values())[1:]
            if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)
        ]
        return {name: getattr(self, name) for name in dict.fromkeys(names)}

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"{type(self).__name__}({params})"

    _SCORINGS: tuple[str, ...] = SCORES

    def _check_params(self) -> None:
        if self.scoring not in self._SCORINGS:
            raise ValueError(f"scoring must be one of {self._SCORINGS}, got {self.scoring!r}")
        if self.chunk_pixels < 1:
            raise ValueError(f"chunk_pixels must be >= 1, got {self.chunk_pixels}")
        for name in ("energy_range", "score_range"):
            window = getattr(self, name)
            if window is not None and (len(window) != 2 or not window[0] < window[1]):
                raise ValueError(f"{name} must be (e_min, e_max) with e_min < e_max in eV, got {window}")
        if not isinstance(self.threshold, (int, float)) and self.threshold not in ("auto", "otsu", "gmm", "fpr"):
            raise ValueError(f"threshold must be 'auto', 'otsu', 'gmm', 'fpr' or a number, got {self.threshold!r}")

    # -- energy axis ------------------------------------------------------------------------
    @property
    def is_fitted(self) -> bool:
        return hasattr(self, "energy_")

    def _check_fitted(self) -> None:
        if not self.is_fitted:
            raise NotFittedError(f"this {type(self).__name__} is not fitted yet: call fit(cube) first")

    def _select_training_energy(self, cube: xr.DataArray) -> xr.DataArray:
        if self.energy_range is not None:
            cube = cube.eels.crop(*self.energy_range)
            if cube.sizes["energy"] < 2:
                raise ValueError(f"energy_range {self.energy_range} eV holds fewer than 2 channels of the cube")
        return cube

    def _select_fitted_energy(self, cube: xr.DataArray) -> xr.DataArray:
        fitted = self.energy_
        step = (fitted[-1] - fitted[0]) / max(fitted.size - 1, 1)
        tolerance = self._ENERGY_TOLERANCE * step
        energy = cube["energy"].values
        inside = (energy >= fitted[0] - tolerance) & (energy <= fitted[-1] + tolerance)
        selected = cube.isel(energy=np.flatnonzero(inside))
        values = selected["energy"].values
        if values.size != fitted.size or np.max(np.abs(values - fitted)) > tolerance:
            cube_step = (energy[-1] - energy[0]) / max(energy.size - 1, 1)
            raise ValueError(
                f"the cube's energy axis ({energy[0]:.3f} - {energy[-1]:.3f} eV, {energy.size} channels of "
                f"{cube_step:.4g} eV) does not cover the fitted one ({fitted[0]:.3f} - {fitted[-1]:.3f} eV, "
                f"{fitted.size} channels of {step:.4g} eV); calibrate or resample the cube to the training axis"
            )
        return selected

    def _score_channels(self, energy: np.ndarray) -> np.ndarray:
        if self.score_range is None:
            return np.ones(energy.size, dtype=bool)
        channels = (energy >= self.score_range[0]) & (energy <= self.score_range[1])
        if channels.sum() < 2:
            raise ValueError(
                f"score_range {self.score_range} eV holds fewer than 2 fitted channels "
                f"({energy[0]:.2f} - {energy[-1]:.2f} eV)"
            )
        return channels

    # -- chunks -----------------------------------------------------------------------------
    def _pixel_chunks(
        self, cube: xr.DataArray, mask: np.ndarray | None = None
    ) -> Iterator[tuple[slice, np.ndarray, np.ndarray]]:
        """Yield (row slice, flat mask of the rows' pixels, spectra) with at most ~chunk_pixels pixels."""
        ny, nx = cube.sizes["y"], cube.sizes["x"]
        rows = max(1, self.chunk_pixels // nx)
        for start in range(0, ny, rows):
            block = slice(start, min(start + rows, ny))
            spectra = np.asarray(cube.isel(y=block).values, dtype=np.float64).reshape(-1, cube.sizes["energy"])
            keep = np.ones(spectra.shape[0], dtype=bool) if mask is None else mask[block].ravel()
            yield block, keep, spectra

    # -- the API ----------------------------------------------------------------------------
    def fit(self, cube: xr.DataArray, mask: xr.DataArray | np.ndarray | None = None) -> BaseDetector:
        """Learn the bulk from the spectra of ``cube`` (all pixels, or where ``mask`` is True).

        Returns
        -------
        self
        """
        self._check_params()
        cube = validate(cube, negative="allow")
        mask_values = None if mask is None else np.asarray(as_mask(mask, cube).values)
        if mask_values is not None and not mask_values.any():
            raise ValueError("the training mask selects no pixel")
        cube = self._select_training_energy(cube)
        energy = np.asarray(cube["energy"].values, dtype=float)
        self._score_channels(energy)
        n_train = int(mask_values.sum()) if mask_values is not None else cube.eels.n_pixels
        kept = self._fit_model(cube, mask_values, energy, n_train)
        self.energy_ = energy
        self.n_training_spectra_ = n_train
        training_scores = self._score_array(cube).ravel()
        if mask_values is not None:
            training_scores = training_scores[mask_values.ravel()]
        self.training_scores_ = training_scores if kept is None else training_scores[kept]
        self.threshold_ = (
            choose_threshold(self.training_scores_, self.threshold, bulk_scores=self.training_scores_,
                             false_alarm_rate=self.false_alarm_rate)
            if self.threshold == "fpr" or isinstance(self.threshold, (int, float)) else None
        )
        return self

    def _fit_model(self, cube: xr.DataArray, mask: np.ndarray | None, energy: np.ndarray, n_train: int):
        """Learn from the training spectra (one chunk of pixels at a time); see ``_fit_spectra``."""
        return self._fit_spectra(
            lambda: ((s[keep]) for _, keep, s in self._pixel_chunks(cube, mask)), energy, n_train
        )

    def _score_array(self, cube: xr.DataArray) -> np.ndarray:
        channels = self._score_channels(cube["energy"].values)
        scores = np.empty((cube.sizes["y"], cube.sizes["x"]))
        for block, _, spectra in self._pixel_chunks(cube):
            model = self._reconstruct_spectra(spectra)
            block_scores = score_spectra(spectra[:, channels], model[:, channels], self.scoring)
            scores[block] = block_scores.reshape(-1, cube.sizes["x"])
        return scores

    def score(self, cube: xr.DataArray) -> xr.DataArray:
        """Anomaly score of every pixel, a DataArray (y, x); higher = more anomalous."""
        self._check_fitted()
        cube = self._select_fitted_energy(validate(cube, negative="allow"))
        scores = xr.DataArray(
            self._score_array(cube), dims=("y", "x"), coords={"y": cube["y"], "x": cube["x"]},
            name="score", attrs={"score": self.scoring, "detector": type(self).__name__},
        )
        return scores

    def reconstruct(self, cube: xr.DataArray) -> xr.DataArray:
        """The bulk model's reconstruction of every spectrum, over the fitted energy channels."""
        self._check_fitted()
        cube = self._select_fitted_energy(validate(cube, negative="allow"))
        model = np.empty(cube.shape)
        for block, _, spectra in self._pixel_chunks(cube):
            model[block] = self._reconstruct_spectra(spectra).reshape(-1, cube.sizes["x"], cube.sizes["energy"])
        return xr.DataArray(model, dims=cube.dims, coords=cube.coords, name="reconstruction",
                            attrs={"units": "counts", "detector": type(self).__name__})

    def threshold_for(self, scores: xr.DataArray | np.ndarray) -> float:
        """The score threshold this detector applies to ``scores`` (see ``threshold``)."""
        self._check_fitted()
        if self.threshold_ is not None:
            return float(self.threshold_)
        return choose_threshold(scores, self.threshold, bulk_scores=self.training_scores_,
                                false_alarm_rate=self.false_alarm_rate)

    def predict(self, cube: xr.DataArray, scores: xr.DataArray | None = None) -> xr.DataArray:
        """Boolean (y, x) map of anomalous pixels: ``score > threshold``.

        ``"otsu"`` and ``"gmm"`` set the threshold from this cube's own scores, ``"fpr"`` from the
        training scores, ``"auto"`` from both, a number is used as it is. Pass ``scores`` to avoid scoring twice.
        """
        scores = self.score(cube) if scores is None else scores
        threshold = self.threshold_for(scores)
        labels = scores > threshold
        labels.name = "anomalous"
        labels.attrs = {"threshold": threshold, "threshold_method": str(self.threshold), "score": self.scoring}
        return labels

    # -- persistence ------------------------------------------------------------------------
    def _state(self) -> dict[str, np.ndarray]:
        raise NotImplementedError(f"{type(self).__name__} cannot be saved")

    def _set_state(self, state: dict[str, np.ndarray]) -> None:
        raise NotImplementedError(f"{type(self).__name__} cannot be loaded")

    def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write the fitted detector to a NetCDF file (atomically; refuses to overwrite unless asked)."""
        from ..io import save

        self._check_fitted()
        state = {"energy_": self.energy_, "training_scores_": self.training_scores_, **self._state()}
        variables = {name: (tuple(f"{name}_{i}" for i in range(np.ndim(v))), np.asarray(v))
                     for name, v in state.items()}
        attrs = {
            "detector": type(self).__name__,
            "params": json.dumps(self.get_params()),
            "threshold_": json.dumps(self.threshold_),
            "n_training_spectra_": int(self.n_training_spectra_),
            "eels_ad_version": _version(),
        }
        return save(xr.Dataset(variables, attrs=attrs), path, overwrite=overwrite, compress=False)

    @classmethod
    def load(cls, path: str | os.PathLike) -> BaseDetector:
        """Read a detector written by :meth:`save`."""
        from ..io import open_results

        dataset = open_results(path)
        name = dataset.attrs.get("detector")
        if name != cls.__name__:
            raise ValueError(f"{path}: holds a {name or 'unknown'} detector, not a {cls.__name__}")
        params = json.loads(dataset.attrs["params"])
        for key in ("energy_range", "score_range"):
            if params.get(key) is not None:
                params[key] = tuple(params[key])
        detector = cls(**params)
        state = {name: dataset[name].values for name in dataset.data_vars}
        detector.energy_ = state.pop("energy_")
        detector.training_scores_ = state.pop("training_scores_")
        detector.threshold_ = json.loads(dataset.attrs["threshold_"])
        detector.n_training_spectra_ = int(dataset.attrs["n_training_spectra_"])
        detector._set_state(state)
        return detector


def _version() -> str:
    from .. import __version__

    return __version__
