"""The detector contract every eels-ad detector follows (scikit-learn style), and its file format.

Parameters live in ``__init__`` (each class declares all of its own: :meth:`BaseDetector.get_params`
reads ``type(self).__init__`` only); ``fit(cube, mask=None)`` learns the bulk and returns ``self``;
fitted state lives in attributes ending in ``_``. ``score`` gives a (y, x) map, higher = more
anomalous; ``reconstruct`` the bulk model of each spectrum; ``predict`` boolean labels of a cube and
``flag`` those of a score map already computed. Every detector is saved to one NetCDF format and read
back by :func:`load`, whatever its class.

A new detector implements the abstract hooks: ``_fit``, ``_score_array``, ``_reconstruct_array``,
``_state`` and ``_set_state``; a per-spectrum detector can subclass :class:`SpectrumDetector` instead
and implement ``_fit_spectra`` and ``_reconstruct_spectra``, which are then fed chunks of pixels.
"""

from __future__ import annotations

import abc
import importlib
import inspect
import json
import operator
import os
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import xarray as xr

from ..datacube import as_mask, channel_index, fold_rows, is_lazy, iter_spectra, validate
from ._scores import SCORE_TAIL_FAMILY, SCORES, score_spectra
from .spatial import UpperTail, check_level, empirical_null, fdr_flags, normal_scores, pool_evidence, spatial_flags
from .threshold import THRESHOLD_METHODS, choose_threshold

FORMAT_VERSION = 2
#: how a spectrum's bulk model is found: from the pixel itself, or predicted from its neighbours, the pixel
#: hidden (``context`` of the PCA and CVAE detectors)
CONTEXTS: tuple[str, ...] = ("pixel", "neighbours")
#: what ``context`` accepts: ``"auto"`` chooses between :data:`CONTEXTS` when fitting
FIT_CONTEXTS: tuple[str, ...] = ("auto", *CONTEXTS)
#: with ``context="neighbours"``, pixels whose first-pass p-value falls below this are left out of the
#: neighbourhoods that predict the others, and the pixels whose neighbourhoods held them are scored again
RING_EXCLUSION_PVALUE: float = 1e-3
#: what a pooled score map carries beside the map: the per-pixel scores and their calibrated p-values
SPATIAL_COORDS: tuple[str, ...] = ("pixel_score", "pvalue")
# where the classes that are not imported with eels_ad.detect live (torch and Lightning load on demand)
_LAZY_CLASSES = {"CVAEDetector": "eels_ad.detect.cvae"}
_REGISTRY: dict[str, type[BaseDetector]] = {}


class NotFittedError(RuntimeError):
    """A detector was used before ``fit``."""


class BaseDetector(abc.ABC):
    """The contract: energy handling, fit/score/reconstruct/predict/flag, thresholds, save/load.

    Subclasses implement:

    ``_fit(cube, mask, energy) -> ndarray of bool or None``
        Learn from the training cube (already cut to the fitted channels; ``mask`` the (y, x)
        training pixels or None for all). Return which of the training pixels (flattened, in order)
        calibrate the threshold, or None for all of them.
    ``_score_array(cube) -> ndarray (y, x)``
        Scores of a cube already cut to the fitted channels.
    ``_reconstruct_array(cube) -> ndarray (y, x, energy)``
        The bulk model of every spectrum (raise :class:`NotImplementedError` if the model has none).
    ``_state() -> dict`` and ``_set_state(state)``
        The fitted state beyond the shared part: numpy arrays become NetCDF variables, everything
        else is stored as JSON.
    """

    _ENERGY_TOLERANCE: ClassVar[float] = 0.01  # of a channel, when comparing energy axes
    _SCORINGS: ClassVar[tuple[str, ...]] = SCORES

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _REGISTRY[cls.__name__] = cls

    # -- parameters -------------------------------------------------------------------------
    @classmethod
    def _param_names(cls) -> list[str]:
        parameters = list(inspect.signature(cls.__init__).parameters.values())[1:]
        return [p.name for p in parameters if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]

    def get_params(self) -> dict[str, Any]:
        """The ``__init__`` parameters of this class and their values."""
        return {name: getattr(self, name) for name in self._param_names()}

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"{type(self).__name__}({params})"

    def _context(self) -> str:
        """The context in use: the fitted one (``context_``), else the parameter."""
        return getattr(self, "context_", None) or self.context

    def _context_reach(self) -> int:
        """Pixels from a pixel to the far side of its neighbourhood (detectors with a ``context`` say)."""
        raise NotImplementedError

    def _resolved_context(self, sample: np.ndarray, sample_pixels: np.ndarray, energy: np.ndarray,
                          shape: tuple[int, int]) -> tuple[str, float | None]:
        """(context, drift span or None): with ``context="auto"`` the training cube's smooth energy drift, from a
        sample of its spectra (``sample_pixels``: their flat indices in ``shape``), and the context it calls
        for; else the context asked for."""
        from ._drift_range import training_drift_range

        if self.context != "auto":
            return self.context, None
        reach = self._context_reach()
        whole_rings = max(shape[0] - 2 * reach, 0) * max(shape[1] - 2 * reach, 0)
        if whole_rings < self.AUTO_MIN_WHOLE_RINGS * shape[0] * shape[1]:  # too small for neighbourhoods
            return "pixel", None
        # every sampled spectrum (PCA: trimmed or not, as trimming drops the far ends of a large drift); the drift
        # fit is robust to local changes of its own
        drift_range = training_drift_range(sample, sample_pixels, energy, shape, self._score_channels(energy))
        return ("neighbours" if drift_range > self.AUTO_DRIFT_EV else "pixel"), drift_range

    #: ``context="auto"`` predicts each pixel from its neighbours when the training cube's smooth energy drift
    #: spans more than this (eV, 2nd to 98th percentile of the drift map): a drift comparable to the chemical
    #: shifts sought is otherwise learned by the model, which then explains a local shift away
    AUTO_DRIFT_EV = 0.25
    #: ... and when at least this share of its pixels has its whole neighbourhood inside the image (PCA: at least
    #: ~33 x 33 pixels; the 17 x 19 Fe-oxide SI of ``benchmarks/real_data.py``, 20 %, keeps the pixel context)
    AUTO_MIN_WHOLE_RINGS = 0.45

    def _check_params(self) -> None:
        """Check the parameters every detector may have (subclasses extend it for their own)."""
        params = self.get_params()
        if "scoring" in params and self.scoring not in self._SCORINGS:
            raise ValueError(f"scoring must be one of {self._SCORINGS}, got {self.scoring!r}")
        if "chunk_pixels" in params and not (isinstance(self.chunk_pixels, (int, np.integer))
                                             and self.chunk_pixels >= 1):
            raise ValueError(f"chunk_pixels must be an integer >= 1, got {self.chunk_pixels!r}")
        for name in ("energy_range", "score_range"):
            window = params.get(name)
            if window is not None and (len(window) != 2 or not window[0] < window[1]):
                raise ValueError(f"{name} must be (e_min, e_max) with e_min < e_max in eV, got {window}")
        threshold = params.get("threshold", "auto")
        if not isinstance(threshold, (int, float)) and threshold not in THRESHOLD_METHODS:
            raise ValueError(f"threshold must be one of {THRESHOLD_METHODS} or a number, got {threshold!r}")
        check_level(params.get("false_alarm_rate", 0.001), "false_alarm_rate")
        check_level(params.get("fdr", 0.05), "fdr")
        for name in ("spatial", "empirical_null"):
            if not isinstance(params.get(name, False), (bool, np.bool_)):
                raise ValueError(f"{name} must be True or False, got {params[name]!r}")

    # -- the hooks ----------------------------------------------------------------------------
    @abc.abstractmethod
    def _fit(self, cube: xr.DataArray, mask: np.ndarray | None, energy: np.ndarray) -> np.ndarray | None:
        """Learn the bulk; return the calibration pixels among the training ones (or None: all)."""

    @abc.abstractmethod
    def _score_array(self, cube: xr.DataArray) -> np.ndarray:
        """(y, x) scores of a cube on the fitted energy axis."""

    @abc.abstractmethod
    def _reconstruct_array(self, cube: xr.DataArray) -> np.ndarray:
        """(y, x, energy) bulk model of a cube on the fitted energy axis."""

    @abc.abstractmethod
    def _state(self) -> dict[str, Any]:
        """Fitted state to save, beyond the energy axis, calibration scores and threshold."""

    @abc.abstractmethod
    def _set_state(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`_state` returned."""

    # -- energy axis ------------------------------------------------------------------------
    @property
    def is_fitted(self) -> bool:
        return hasattr(self, "energy_")

    def _check_fitted(self) -> None:
        if not self.is_fitted:
            raise NotFittedError(f"this {type(self).__name__} is not fitted yet: call fit(cube) first")

    def _select_training_energy(self, cube: xr.DataArray) -> xr.DataArray:
        energy_range = self.get_params().get("energy_range")
        if energy_range is not None:
            cube = cube.eels.crop(*energy_range)
            if cube.sizes["energy"] < 2:
                raise ValueError(f"energy_range {energy_range} eV holds fewer than 2 channels of the cube")
        return cube

    def _select_fitted_energy(self, cube: xr.DataArray) -> xr.DataArray:
        fitted = self.energy_
        step = (fitted[-1] - fitted[0]) / max(fitted.size - 1, 1)
        tolerance = self._ENERGY_TOLERANCE * step
        energy = cube["energy"].values
        inside = (energy >= fitted[0] - tolerance) & (energy <= fitted[-1] + tolerance)
        chosen = channel_index(inside)  # one run of channels: a view of the cube, not a copy
        selected = cube.isel(energy=chosen if isinstance(chosen, slice) else np.flatnonzero(inside))
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
        score_range = self.get_params().get("score_range")
        if score_range is None:
            return np.ones(energy.size, dtype=bool)
        channels = (energy >= score_range[0]) & (energy <= score_range[1])
        if channels.sum() < 2:
            raise ValueError(
                f"score_range {score_range} eV holds fewer than 2 fitted channels "
                f"({energy[0]:.2f} - {energy[-1]:.2f} eV)"
            )
        return channels

    def _prepared(self, cube: xr.DataArray) -> xr.DataArray:
        self._check_fitted()
        cube = self._select_fitted_energy(validate(cube))
        _check_has_counts(cube)
        return cube

    # -- the API ----------------------------------------------------------------------------
    def fit(self, cube: xr.DataArray, mask: xr.DataArray | np.ndarray | None = None) -> BaseDetector:
        """Learn the bulk from the spectra of ``cube`` (all pixels, or where ``mask`` is True).

        Returns
        -------
        self
        """
        self._check_params()
        cube = validate(cube)
        for stale in ("calibration_scores_", "calibration_strata_", "training_scores_", "training_strata_",
                      "model_null_scores_"):
            # a new fit is calibrated afresh
            self.__dict__.pop(stale, None)
        mask_values = None if mask is None else np.asarray(as_mask(mask, cube).values)
        if mask_values is not None and not mask_values.any():
            raise ValueError("the training mask selects no pixel")
        if "vacuum" in cube.coords:  # marked by eels_ad.prepare: never part of the bulk
            vacuum = np.asarray(cube["vacuum"].values, dtype=bool)
            if vacuum.all() or (mask_values is not None and not (mask_values & ~vacuum).any()):
                raise ValueError("every training pixel is marked vacuum (coordinate 'vacuum'): nothing to learn from")
            if vacuum.any():
                mask_values = ~vacuum if mask_values is None else mask_values & ~vacuum
        cube = self._select_training_energy(cube)
        _check_has_counts(cube)
        energy = np.asarray(cube["energy"].values, dtype=float)
        self._score_channels(energy)
        self.n_training_spectra_ = int(mask_values.sum()) if mask_values is not None else cube.eels.n_pixels
        calibration = self._fit(cube, mask_values, energy)
        self.energy_ = energy
        # a detector may have scored a sample of its kept training spectra during the fit (no pass of its own then)
        sampled = getattr(self, "_sample_scores", None)
        self._sample_scores = None
        if sampled is not None:
            self.calibration_scores_ = np.asarray(sampled, dtype=float)
        else:
            scores = self._score_array(cube).ravel()
            strata = self._strata((cube.sizes["y"], cube.sizes["x"]))
            strata = None if strata is None else strata.ravel()
            if mask_values is not None:
                scores = scores[mask_values.ravel()]
                strata = None if strata is None else strata[mask_values.ravel()]
            self.calibration_scores_ = scores if calibration is None else scores[calibration]
            if strata is not None:
                self.calibration_strata_ = strata if calibration is None else strata[calibration]
            if self.TAIL_FROM_TRAINING and calibration is not None:  # held out: the other pixels trained the model
                self.training_scores_ = scores[~calibration]
                if strata is not None:
                    self.training_strata_ = strata[~calibration]
        threshold = self.get_params().get("threshold", "auto")
        self.threshold_ = float(threshold) if isinstance(threshold, (int, float)) else None
        return self

    def score(self, cube: xr.DataArray) -> xr.DataArray:
        """Anomaly score of every pixel, a DataArray (y, x); higher = more anomalous.

        With ``spatial=True`` (the default where a detector has the parameter) the map is the
        spatially pooled evidence (:mod:`eels_ad.detect.spatial`): each pixel's score is turned into a
        p-value against the held-out bulk scores (``calibration_scores_``), pooled over discs around it
        relative to its neighbourhood, and given as the normal score (sigma) of the pooled p-value. The
        per-pixel scores and p-values travel with it as the coordinates ``pixel_score`` and ``pvalue``.
        """
        cube = self._prepared(cube)
        spatial = bool(self.get_params().get("spatial", False))
        raw = self._score_array(cube)
        coords = {"y": cube["y"], "x": cube["x"]}
        vacuum = np.asarray(cube["vacuum"].values, dtype=bool) if "vacuum" in cube.coords else None
        if vacuum is not None:  # the scores keep the mask, so that flag() leaves vacuum alone
            coords["vacuum"] = (("y", "x"), vacuum)
        attrs = {"score": str(self.get_params().get("scoring", "model")), "detector": type(self).__name__}
        if not spatial:
            return xr.DataArray(raw, dims=("y", "x"), coords=coords, name="score", attrs=attrs)
        pvalues, centre, spread = self._pixel_pvalues(raw, vacuum)
        if self.get_params().get("empirical_null", False):
            attrs.update(null_centre=centre, null_spread=spread)
        pooled = pool_evidence(pvalues, mask=None if vacuum is None else ~vacuum)
        if self.get_params().get("empirical_null", False):  # the pooled map's own null too (spatial structure)
            pooled, centre, spread = empirical_null(pooled)
            attrs.update(pooled_null_centre=centre, pooled_null_spread=spread)
        evidence = normal_scores(pooled)
        coords["pixel_score"] = (("y", "x"), raw)
        coords["pvalue"] = (("y", "x"), pvalues)
        attrs.update(spatial="pooled", units="sigma",
                     long_name=f"pooled evidence ({attrs['score']} score, neighbourhood discs)")
        return xr.DataArray(evidence, dims=("y", "x"), coords=coords, name="score", attrs=attrs)

    def reconstruct(self, cube: xr.DataArray) -> xr.DataArray:
        """The bulk model's reconstruction of every spectrum, over the fitted energy channels."""
        cube = self._prepared(cube)
        model = self._reconstruct_array(cube)
        return xr.DataArray(model, dims=("y", "x", "energy"), coords=cube.transpose("y", "x", "energy").coords,
                            name="reconstruction", attrs={"units": "counts", "detector": type(self).__name__})

    #: calibration scores a stratum needs for a scale of its own (fewer: the stratum shares the pooled tail)
    MIN_STRATUM_SCORES = 200
    #: the tail of every stratum is fitted to all calibration scores, each moved to the reference stratum's
    #: location and scale first (True), rather than to the reference stratum's scores alone (False): for a
    #: calibration set too small to split (the CVAE's held-out strip)
    STRATA_SHARE_TAIL = False
    #: with a held-out calibration set: the tail's shape also from the scores of the training pixels, each stratum's
    #: moved onto its held-out scores' location and scale first (:meth:`_training_tail_scores`)
    TAIL_FROM_TRAINING = False
    #: with training scores (:attr:`TAIL_FROM_TRAINING`): each stratum's location and scale relative to the reference
    #: stratum's from the training and held-out scores together (the reference's own from the held-out ones), not
    #: from the held-out scores alone: for a held-out strip that holds few pixels of some stratum
    STRATA_FROM_TRAINING = False
    #: with ``empirical_null=True`` and strata: each stratum of a scored map re-standardised to its own null (True)
    #: rather than the map to one (:func:`~eels_ad.detect.spatial.empirical_null`). Measured under a +-1 eV drift
    #: over training cubes (benchmarks/README.md, session 20): the CVAE's blind spot 0.070 (0.040-0.127) -> 0.057
    #: (0.033-0.080) realised FDR at 5 %; PCA's neighbour context 0.039 (0.010-0.057) -> 0.046 (0.010-0.110), so
    #: PCA keeps one null
    NULL_PER_STRATUM = False

    def _strata(self, shape: tuple[int, int]) -> np.ndarray | None:
        """(y, x) int map of the calibration strata of a map of ``shape``: pixels whose scores have nulls of
        their own (e.g. the image's edge band, where a ring of neighbours is cut), or None (one stratum)."""
        return None

    def _tails(self) -> dict[int, Callable[[np.ndarray], np.ndarray]]:
        """Survival functions of the calibration per stratum (-1: all scores), fitted once per calibration.

        The largest stratum's tail is fitted as the pooled one (:class:`~.spatial.UpperTail`); a smaller
        stratum borrows its shape and brings its own location and scale (its median and 95th percentile
        matched to the reference's): a stratum of a thousand edge pixels estimates those well, but not a
        tail out to 1e-5 of its own (measured: its own tail cost blobs near the edge their flags, F1 1.000 ->
        0.877 without drift, for the same realised FDR under drift).
        """
        family = SCORE_TAIL_FAMILY.get(str(self.get_params().get("scoring", "")))
        key = (self.calibration_scores_, getattr(self, "calibration_strata_", None),
               getattr(self, "training_scores_", None), getattr(self, "model_null_scores_", None))
        cached = getattr(self, "_tail_cache", None)
        if cached is None or any(a is not b for a, b in zip(cached[0], key, strict=True)) or cached[1] != family:
            scores, strata = self.calibration_scores_, getattr(self, "calibration_strata_", None)
            extra, extra_strata = self._training_tail_scores()
            # the model null's tail (the one tail sample without strata): a normal one at the lightest
            # (spatial.squared_excess)
            squared = extra is not None and extra_strata is None
            tails = {-1: UpperTail(scores, family=family, tail_sample=extra, squared=squared).sf}
            if strata is not None:
                values, counts = np.unique(strata, return_counts=True)
                reference = int(values[np.argmax(counts)])
                inside = scores[strata == reference]
                inside_extra = None if extra is None else extra[extra_strata == reference]
                moves = {}
                training, training_strata = getattr(self, "training_scores_", None), \
                    getattr(self, "training_strata_", None)
                if self.STRATA_FROM_TRAINING and training is not None and training_strata is not None:
                    every = np.concatenate([scores, training])
                    every_strata = np.concatenate([strata, training_strata])
                    onto_held = _scale_match(every[every_strata == reference], inside)
                    values, counts = np.unique(every_strata, return_counts=True)
                else:
                    every, every_strata, onto_held = scores, strata, None
                for stratum, count in zip(values, counts, strict=True):
                    if int(stratum) != reference and count >= self.MIN_STRATUM_SCORES:
                        if onto_held is None:
                            move = _scale_match(every[every_strata == stratum], inside)
                        else:  # onto the reference's scale among all scores, then that onto the held-out one's
                            move = _scale_match(every[every_strata == stratum], every[every_strata == reference])
                            move = None if move is None else _composed(move, onto_held)
                        if move is not None:
                            moves[int(stratum)] = move
                if self.STRATA_SHARE_TAIL:  # every score on the reference's scale, one tail fitted to them all
                    inside = np.array(scores, dtype=float)
                    inside_extra = None if extra is None else np.array(extra, dtype=float)
                    for stratum, move in moves.items():
                        chosen = strata == stratum
                        inside[chosen] = _moved(inside[chosen], *move)
                        if extra is not None:
                            chosen = extra_strata == stratum
                            inside_extra[chosen] = _moved(inside_extra[chosen], *move)
                tails[reference] = UpperTail(inside, family=family, tail_sample=inside_extra, squared=squared).sf
                for stratum, move in moves.items():
                    tails[stratum] = partial(_mapped_sf, tails[reference], move)
            cached = (key, family, tails)
            self._tail_cache = cached
        return cached[2]

    #: the plotting positions of the held-out scores through which the model null's Q-Q line is fitted
    #: (:meth:`_training_tail_scores`): the body and the start of the tail, not the few largest
    MODEL_NULL_FIT_RANGE = (0.1, 0.99)

    #: the model null is refused where the training pixels' scores exceed its quantiles at
    #: :attr:`MODEL_NULL_CHECK_LEVELS` more often than Poisson chance allows at this p-value (any level)
    MODEL_NULL_CHECK_P = 1e-4
    #: ... or less often than it allows at this one (a network that reproduces its training pixels' noise)
    MODEL_NULL_OVERFIT_P = 1e-6
    MODEL_NULL_CHECK_LEVELS = (1e-2, 3e-3, 1e-3)

    def _model_null(self) -> np.ndarray | None:
        """The model null's scores (``model_null_scores_``) moved onto the held-out scores by their Q-Q line, where
        the detector has them with one stratum and they explain its training pixels' tail; else None.

        The replicates hold the counts' noise about the model, not the model's misfit to the bulk. Where the misfit
        matters the training pixels' scores (fitted more closely than new pixels', so if anything lighter) run
        beyond the model null's quantiles: then their tail is used, as without a model null. Measured: the
        simulator's default high dose (262 counts per channel, the paper protocol's training cube) 93 / 41 / 19 of
        3,584 training scores beyond the model null's 1e-2 / 3e-3 / 1e-3 quantiles against 36 / 11 / 4 expected
        (p 1e-15; with the model null kept, the paper protocol's F1 fell 0.942 -> 0.870), at dose 20 the smallest p
        of 6 trained detectors 0.004 (benchmarks/README.md, session 20).

        Where the training scores fall short of the model null's quantiles by far, the network reproduces its
        training pixels' own noise (it fits them more closely than counts allow): their scores say nothing of new
        pixels' misfit, and the model null is refused too. Measured: a detector trained at dose 200 had 7 / 0 / 0
        beyond the 1e-2 / 3e-3 / 1e-3 quantiles against 36 / 11 / 4 expected (lower p 5e-9) and flagged 0.18 of
        150 bulk-only cubes with the model null, 0.067 without; at dose 20 the smallest lower p of 7 detectors was
        2e-4.
        """
        sample = getattr(self, "model_null_scores_", None)
        if sample is None or np.size(sample) == 0 or getattr(self, "calibration_strata_", None) is not None:
            return None
        sample = np.asarray(sample, dtype=float)
        move = _quantile_line(sample, self.calibration_scores_, self.MODEL_NULL_FIT_RANGE)
        moved = sample if move is None else _moved(sample, *move)
        training = getattr(self, "training_scores_", None)
        if training is not None and np.size(training):
            from scipy import stats

            training = np.asarray(training, dtype=float)
            for level in self.MODEL_NULL_CHECK_LEVELS:
                beyond, expected = int(np.sum(training > np.quantile(moved, 1.0 - level))), level * training.size
                if stats.poisson.sf(beyond - 1, expected) < self.MODEL_NULL_CHECK_P or \
                        stats.poisson.cdf(beyond, expected) < self.MODEL_NULL_OVERFIT_P:
                    return None
        return moved

    def _training_tail_scores(self) -> tuple[np.ndarray | None, np.ndarray | None]:
        """The scores that shape the calibration's tail beyond the held-out scores' reach, and their strata.

        A detector with a model null (``model_null_scores_``: Poisson replicates of its own expected counts of
        the held-out pixels, scored against them; the CVAE's pixel context) gives those, moved onto the held-out
        scores by a straight line through their Q-Q plot (plotting positions :attr:`MODEL_NULL_FIT_RANGE`;
        one stratum; refused where it does not explain the training pixels' tail, :meth:`_model_null`).
        Measured (benchmarks/README.md, session 20; CVAE, 64 x 64 x 320, 6 training cubes, 150 bulk-only cubes
        each): the model null's quantiles matched the 614,000 bulk scores of new cubes to 0.03 out to 1e-5; the
        share of p-values below 1e-4 / 1e-5 over the level was 0.72-1.22 / 0.49-2.60 with it and 0.02-1.19 /
        0.00-0.81 with the training pixels' scores (realised FDR at 5 %: mean 0.050, was 0.022). A line through
        the Q-Q plot rather than the median and 95th percentile (whose 512-score estimates vary by ~0.09)
        narrowed the spread over training cubes.

        Else, with :attr:`TAIL_FROM_TRAINING`: the training pixels' scores, each stratum's moved onto the location
        and scale (median, 95th percentile) of its held-out scores, and their strata (an array always: strata of
        None mark the model null); else (None, None).

        They shape the calibration's tail beyond its threshold (:class:`~.spatial.UpperTail`'s ``tail_sample``)
        while the held-out scores alone set the p-values below it and the tail's mass: the network fits its
        training pixels more closely than new ones, so their scores would make p-values too small, but they
        are many, and it is their number that a tail out to 1e-5 needs (the CVAE's held-out strip has 512
        scores at 64 x 64; the training pixels 3,584). A stratum with fewer than :attr:`MIN_STRATUM_SCORES`
        held-out scores brings none.
        """
        model_null = self._model_null()
        if model_null is not None:
            return model_null, None
        training = getattr(self, "training_scores_", None)
        if training is None or training.size == 0:
            return None, None
        scores, strata = self.calibration_scores_, getattr(self, "calibration_strata_", None)
        training_strata = getattr(self, "training_strata_", None)
        if strata is None or training_strata is None:
            strata, training_strata = np.zeros(scores.shape, np.int8), np.zeros(training.shape, np.int8)
        parts, part_strata = [], []
        for stratum in np.unique(strata):
            held, own = scores[strata == stratum], training[training_strata == stratum]
            move = _scale_match(own, held) if held.size >= self.MIN_STRATUM_SCORES and own.size else None
            if move is not None:
                parts.append(_moved(own, *move))
                part_strata.append(np.full(own.size, stratum, dtype=np.int8))
        if not parts:
            return None, None
        return np.concatenate(parts), np.concatenate(part_strata)

    def _pixel_pvalues(self, raw: np.ndarray, vacuum: np.ndarray | None,
                       null_per_stratum: bool = True) -> tuple[np.ndarray, float, float]:
        """Per-pixel p-values of raw scores against the calibration scores (vacuum NaN), each pixel against
        its stratum's where the detector has strata (Mondrian calibration), re-standardised to the map's own
        null with ``empirical_null=True`` (each stratum to its own with :attr:`NULL_PER_STRATUM`, unless
        ``null_per_stratum`` is False); with that null's centre and spread (sigma; the largest stratum's)."""
        tails = self._tails()
        strata = self._strata(raw.shape) if len(tails) > 1 and np.ndim(raw) == 2 else None
        if strata is None:
            pvalues = tails[-1](raw)
        else:  # each stratum against its own tail, or the pooled one where it has none
            pvalues = np.empty(np.shape(raw))
            for stratum in np.unique(strata):
                inside = strata == stratum
                pvalues[inside] = tails.get(int(stratum), tails[-1])(raw[inside])
        if vacuum is not None:
            pvalues = np.where(vacuum, np.nan, pvalues)
        if self.get_params().get("empirical_null", False):
            return empirical_null(pvalues, strata if null_per_stratum and self.NULL_PER_STRATUM else None)
        return pvalues, 0.0, 1.0

    def _spatial_scores(self, scores: xr.DataArray) -> bool:
        return scores.attrs.get("spatial") == "pooled" and "pvalue" in scores.coords

    def threshold_for(self, scores: xr.DataArray | np.ndarray) -> float:
        """The score threshold of the rules that set one (``"auto"``, ``"otsu"``, ``"gmm"``, ``"fpr"``, a number).

        On pooled evidence (sigma) the false-alarm part is the normal score of ``false_alarm_rate``.
        """
        self._check_fitted()
        if self.threshold_ is not None:
            return float(self.threshold_)
        params = self.get_params()
        rule = params.get("threshold", "auto")
        rate = params.get("false_alarm_rate", 0.001)
        if rule == "fdr":
            if not isinstance(scores, xr.DataArray):
                scores = xr.DataArray(np.asarray(scores, dtype=float), dims=("y", "x")[-np.ndim(scores):])
            flags, _ = self._fdr_flags(scores)
            return float(scores.values[flags].min()) if flags.any() else float("inf")
        if isinstance(scores, xr.DataArray) and self._spatial_scores(scores):
            from scipy import stats

            if rule == "fpr":
                return float(stats.norm.isf(rate))
            values = scores.values[~np.asarray(scores["vacuum"].values, dtype=bool)] if "vacuum" in scores.coords \
                else scores.values
            if rule == "auto":
                return max(choose_threshold(values, "gmm"), float(stats.norm.isf(rate)))
            return choose_threshold(values, rule)
        return choose_threshold(scores, rule, bulk_scores=self.calibration_scores_, false_alarm_rate=rate)

    def pvalues(self, scores: xr.DataArray) -> xr.DataArray:
        """Calibrated p-values of a score map from :meth:`score`: pooled ones when the map is pooled.

        Per pixel they come from the held-out bulk scores (:func:`~eels_ad.detect.spatial.pixel_pvalues`),
        uniform under the null when the bulk of the scored cube is like the training bulk; with
        ``empirical_null=True`` (the default where a detector has it) they are then re-standardised to the
        map's own null (:func:`~eels_ad.detect.spatial.empirical_null`). Vacuum is NaN.
        """
        self._check_fitted()
        if self._spatial_scores(scores):
            from scipy import special

            values = special.ndtr(-scores.values)
        else:
            vacuum = np.asarray(scores["vacuum"].values, dtype=bool) if "vacuum" in scores.coords else None
            values = self._pixel_pvalues(scores.values, vacuum)[0]
        return xr.DataArray(values, dims=("y", "x"), coords=scores.coords, name="pvalue")

    def _fdr_flags(self, scores: xr.DataArray) -> tuple[np.ndarray, float]:
        """The flags of ``threshold="fdr"`` and the p-value cut (vacuum never flagged)."""
        level = self.get_params().get("fdr", 0.05)
        if self._spatial_scores(scores):
            flags, cut = spatial_flags(scores["pvalue"].values, self.pvalues(scores).values, level)
        else:
            flags, cut = fdr_flags(self.pvalues(scores).values, level)
        if "vacuum" in scores.coords:
            flags &= ~np.asarray(scores["vacuum"].values, dtype=bool)
        return flags, cut

    def flag(self, scores: xr.DataArray) -> xr.DataArray:
        """Boolean (y, x) map of the anomalous pixels of ``scores`` (from :meth:`score`).

        ``threshold="fdr"`` (the default where a detector has it) flags at the false-discovery rate
        ``fdr``: the Benjamini-Hochberg rule on calibrated p-values, region-aware on pooled evidence
        (:func:`~eels_ad.detect.spatial.spatial_flags`). ``"otsu"`` and ``"gmm"`` set the threshold from
        these scores, ``"fpr"`` from the calibration scores, ``"auto"`` from both, a number is used as it
        is. Pixels marked vacuum (the coordinate ``vacuum`` that :func:`eels_ad.prepare.prepare` adds)
        neither set the threshold nor are flagged. The labels' attrs say which rule flagged, at what
        level (``threshold_method``, ``level``) and the lowest score flagged (``threshold``).
        """
        if not isinstance(scores, xr.DataArray) or scores.dims != ("y", "x"):
            raise TypeError("flag takes the (y, x) score map from score(cube); to label a cube use predict(cube)")
        self._check_fitted()
        params = self.get_params()
        rule = params.get("threshold", "auto")
        vacuum = (np.asarray(scores["vacuum"].values, dtype=bool) if "vacuum" in scores.coords
                  else np.zeros(scores.shape, dtype=bool))
        attrs: dict[str, Any] = {"threshold_method": str(rule), "score": str(scores.attrs.get("score", ""))}
        if rule == "fdr":
            flags, cut = self._fdr_flags(scores)
            threshold = float(scores.values[flags].min()) if flags.any() else float("inf")
            attrs.update(level=float(params.get("fdr", 0.05)), pvalue_cut=float(cut))
            labels = xr.DataArray(flags, dims=("y", "x"), coords=scores.coords)
        else:
            threshold = (float("inf") if vacuum.all()
                         else self.threshold_for(scores.values[~vacuum] if vacuum.any() and not
                                                 self._spatial_scores(scores) else scores))
            labels = (scores > threshold) & ~vacuum
            if rule == "fpr" or rule == "auto":
                attrs["level"] = float(params.get("false_alarm_rate", 0.001))
        labels = labels.drop_vars([name for name in SPATIAL_COORDS if name in labels.coords])
        labels.name = "anomalous"
        labels.attrs = {"threshold": threshold, **attrs}
        return labels

    def predict(self, cube: xr.DataArray) -> xr.DataArray:
        """Boolean (y, x) map of anomalous pixels: ``flag(score(cube))``."""
        return self.flag(self.score(cube))

    # -- persistence ------------------------------------------------------------------------
    def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write the fitted detector to a NetCDF file (atomically; refuses to overwrite unless asked).

        Read it back with :func:`eels_ad.detect.load` (or this class's :meth:`load`).
        """
        from ..io import save

        self._check_fitted()
        state = {"energy_": self.energy_, "calibration_scores_": self.calibration_scores_, **self._state()}
        for name in ("calibration_strata_", "training_strata_"):
            if getattr(self, name, None) is not None:
                state[name] = np.asarray(getattr(self, name), dtype=np.int8)
        for name in ("training_scores_", "model_null_scores_"):
            if getattr(self, name, None) is not None:
                state[name] = np.asarray(getattr(self, name), dtype=float)
        arrays = {name: np.asarray(value) for name, value in state.items() if isinstance(value, np.ndarray)}
        others = {name: value for name, value in state.items() if name not in arrays}
        variables = {name: (tuple(f"{name}_{i}" for i in range(value.ndim)), value) for name, value in arrays.items()}
        attrs = {
            "detector": type(self).__name__,
            "format_version": FORMAT_VERSION,
            "params": json.dumps(_jsonable(self.get_params())),
            "state": json.dumps(_jsonable(others)),
            "threshold_": json.dumps(self.threshold_),
            "n_training_spectra_": int(self.n_training_spectra_),
            "eels_ad_version": _version(),
        }
        return save(xr.Dataset(variables, attrs=attrs), path, overwrite=overwrite, compress=False)

    @classmethod
    def load(cls, path: str | os.PathLike) -> BaseDetector:
        """Read a detector written by :meth:`save`; it must be of this class (see :func:`load`)."""
        detector = load(path)
        if not isinstance(detector, cls):
            raise ValueError(f"{path}: holds a {type(detector).__name__}, not a {cls.__name__}")
        return detector

    @classmethod
    def _from_dataset(cls, dataset: xr.Dataset) -> BaseDetector:
        params = json.loads(dataset.attrs["params"])
        signature = inspect.signature(cls.__init__).parameters
        for key, value in params.items():  # JSON has no tuples: restore them where the default is one
            if isinstance(value, list) and isinstance(signature[key].default, tuple | type(None)):
                params[key] = tuple(value)
        detector = cls(**params)
        state = {name: dataset[name].values for name in dataset.data_vars}
        state.update(json.loads(dataset.attrs.get("state", "{}")))
        detector.energy_ = state.pop("energy_")
        detector.calibration_scores_ = state.pop("calibration_scores_")
        for name in ("calibration_strata_", "training_strata_"):  # files written before strata have none
            if name in state:
                setattr(detector, name, np.asarray(state.pop(name), dtype=np.int8))
        if "training_scores_" in state:  # files written before session 16: the held-out scores alone
            detector.training_scores_ = np.asarray(state.pop("training_scores_"), dtype=float)
        if "model_null_scores_" in state:  # files written before session 20 have none
            detector.model_null_scores_ = np.asarray(state.pop("model_null_scores_"), dtype=float)
        detector.threshold_ = json.loads(dataset.attrs["threshold_"])
        detector.n_training_spectra_ = int(dataset.attrs["n_training_spectra_"])
        detector._set_state(state)
        return detector


class SpectrumDetector(BaseDetector):
    """A detector that judges every spectrum on its own, in chunks of ``chunk_pixels`` pixels.

    Subclasses implement ``_fit_spectra(chunks, energy, n_train)`` (learn from a callable that yields
    (pixels, channels) arrays of the training spectra; return None, or a boolean mask of the training
    spectra really kept, e.g. after trimming outliers, which then calibrate the threshold), or ``_fit``
    itself with :func:`~eels_ad.datacube.fold_rows` passes (as PCA does), and
    ``_reconstruct_spectra(spectra)``, plus ``_state``/``_set_state``. Scores are
    :func:`~eels_ad.detect.poisson_deviance` (or the ``scoring`` chosen) of each spectrum against its
    reconstruction, so memory stays bounded by one chunk whatever the cube's size.
    """

    def _fit_spectra(self, chunks: Callable[[], Iterator[np.ndarray]], energy: np.ndarray,
                     n_train: int) -> np.ndarray | None:
        """Learn from the training spectra; see the class docstring (or override ``_fit`` instead)."""
        raise NotImplementedError(f"{type(self).__name__} implements neither _fit_spectra nor _fit")

    @abc.abstractmethod
    def _reconstruct_spectra(self, spectra: np.ndarray) -> np.ndarray:
        """(pixels, channels) bulk model of (pixels, channels) spectra."""

    def _pixel_chunks(
        self, cube: xr.DataArray, mask: np.ndarray | None = None, rows_wanted: np.ndarray | None = None
    ) -> Iterator[tuple[slice, np.ndarray, np.ndarray]]:
        """Yield (row slice, flat mask of the rows' pixels, spectra) of ~chunk_pixels pixels (whole rows), a lazy
        cube read a chunk at a time (:func:`~eels_ad.datacube.iter_spectra`); with ``rows_wanted`` (bool per
        row) only the blocks that hold a wanted row."""
        for block, spectra in iter_spectra(cube, self.chunk_pixels, rows_wanted=rows_wanted):
            keep = np.ones(spectra.shape[0], dtype=bool) if mask is None else mask[block].ravel()
            yield block, keep, spectra

    def _fit(self, cube: xr.DataArray, mask: np.ndarray | None, energy: np.ndarray) -> np.ndarray | None:
        def chunks() -> Iterator[np.ndarray]:
            return (s if mask is None else s[keep] for _, keep, s in self._pixel_chunks(cube, mask))

        return self._fit_spectra(chunks, energy, self.n_training_spectra_)

    def _model_context(self, cube: xr.DataArray) -> Any:
        """What the bulk model of a block of rows needs beyond its own spectra (None: nothing)."""
        return None

    def _rows_model(self, spectra: np.ndarray, rows: slice, context: Any) -> np.ndarray:
        """(pixels, channels) bulk model of the spectra of rows ``rows``."""
        return self._reconstruct_spectra(spectra)

    def _model_blocks(self, cube: xr.DataArray) -> Iterator[tuple[slice, np.ndarray, np.ndarray]]:
        """Yield (row slice, spectra, bulk model) chunk by chunk: what scores and reconstructions read."""
        context = self._model_context(cube)
        for block, _, spectra in self._pixel_chunks(cube):
            yield block, spectra, self._rows_model(spectra, block, context)

    def _score_array(self, cube: xr.DataArray) -> np.ndarray:
        return self._rows_scores(cube, self._model_context(cube))

    def _rows_scores(self, cube: xr.DataArray, context: np.ndarray | None = None,
                     rows_wanted: np.ndarray | None = None, scores: np.ndarray | None = None) -> np.ndarray:
        """Scores of every pixel, work block by work block (over the cluster where one is current:
        :func:`~eels_ad.datacube.fold_rows`), each spectrum against :meth:`_rows_model` given ``context``
        (rows first, e.g. (y, x, components)). With ``rows_wanted`` only those rows' pixels whose context
        is finite are scored again, into ``scores``."""
        channels = channel_index(self._score_channels(cube["energy"].values))  # a view, not a copy, per block
        nx = cube.sizes["x"]

        def block_scores(rows: slice, spectra: np.ndarray, row_context: np.ndarray | None) -> list:
            chosen = slice(None)
            if rows_wanted is not None:  # a second step: the pixels with a (finite) new context only
                chosen = np.isfinite(row_context[..., 0]).ravel()
                spectra = spectra[chosen]
                row_context = row_context.reshape(-1, row_context.shape[-1])[chosen]
            own_rows = slice(0, rows.stop - rows.start if row_context is None else len(row_context))
            model = self._rows_model(spectra, own_rows, row_context)
            return [(rows, chosen, score_spectra(spectra[:, channels], model[:, channels], self.scoring))]

        if scores is None:
            scores = np.empty((cube.sizes["y"], nx))
        parts = fold_rows(cube, block_scores, operator.add, work_pixels=self.chunk_pixels,
                          rows_wanted=rows_wanted, row_data=context)
        for rows, chosen, block_scores_ in parts or []:
            flat = scores[rows].ravel()
            flat[chosen] = block_scores_
            scores[rows] = flat.reshape(-1, nx)
        return scores

    def _reconstruct_array(self, cube: xr.DataArray) -> Any:
        cube = cube.transpose("y", "x", "energy")
        context = self._model_context(cube)
        if is_lazy(cube):  # a dask array: the reconstruction is computed chunk by chunk when read or saved
            def model_of(block: np.ndarray, block_info=None) -> np.ndarray:
                (start, stop), _, _ = block_info[0]["array-location"]
                spectra = np.asarray(block, dtype=np.float64).reshape(-1, block.shape[-1])
                return self._rows_model(spectra, slice(start, stop), context).reshape(block.shape)

            return cube.data.map_blocks(model_of, dtype=np.float64)
        model = np.empty((cube.sizes["y"], cube.sizes["x"], cube.sizes["energy"]))
        for block, _, block_model in self._model_blocks(cube):
            model[block] = block_model.reshape(-1, cube.sizes["x"], cube.sizes["energy"])
        return model


def detector_class(name: str) -> type[BaseDetector]:
    """The detector class called ``name`` (e.g. ``"PCADetector"``), importing it if it loads lazily."""
    if name not in _REGISTRY and name in _LAZY_CLASSES:
        importlib.import_module(_LAZY_CLASSES[name])
    try:
        return _REGISTRY[name]
    except KeyError:
        known = sorted({*_REGISTRY, *_LAZY_CLASSES} - {"SpectrumDetector"})
        raise ValueError(f"no detector class {name!r}; known: {known}") from None


def load(path: str | os.PathLike) -> BaseDetector:
    """Read any detector written by ``save`` (PCA, CVAE, ...): the file says which class it holds.

    Parameters
    ----------
    path
        A NetCDF file written by :meth:`BaseDetector.save` (``eels-ad train``).

    Returns
    -------
    BaseDetector
        The fitted detector, ready to ``score``.
    """
    from ..io import open_results

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such model file")
    try:
        dataset = open_results(path)
    except (OSError, ValueError) as error:
        raise ValueError(f"{path}: not a saved eels-ad detector ({error})") from error
    name = dataset.attrs.get("detector")
    if name is None:
        raise ValueError(f"{path}: not a saved eels-ad detector (no 'detector' attribute)")
    version = int(dataset.attrs.get("format_version", 1))
    if version != FORMAT_VERSION:
        raise ValueError(f"{path}: detector file format {version}, this eels-ad reads {FORMAT_VERSION}: retrain it")
    try:
        return detector_class(str(name))._from_dataset(dataset)
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from error


def _scale_match(values: np.ndarray, reference: np.ndarray) -> tuple[float, float, float] | None:
    """(low, reference low, ratio) that move ``values`` onto ``reference``'s location and scale by their medians
    and 95th percentiles (:func:`_moved`), or None where either has no spread there."""
    low, high = np.quantile(values, [0.5, 0.95])
    ref_low, ref_high = np.quantile(reference, [0.5, 0.95])
    if not (high > low and ref_high > ref_low):
        return None
    return float(low), float(ref_low), float((ref_high - ref_low) / (high - low))


def _quantile_line(values: np.ndarray, reference: np.ndarray,
                   positions: tuple[float, float]) -> tuple[float, float, float] | None:
    """The move (:func:`_moved`) of ``values`` onto ``reference`` by the least-squares line through their Q-Q plot:
    ``reference``'s sorted scores against ``values``' quantiles at the same plotting positions ``(i + 1/2) / n``
    within ``positions``; None where fewer than 10 positions fall there or the line does not rise."""
    held = np.sort(np.asarray(reference, dtype=float))
    at = (np.arange(held.size) + 0.5) / held.size
    kept = (at >= positions[0]) & (at <= positions[1])
    if kept.sum() < 10:
        return None
    quantiles = np.quantile(values, at[kept])
    if not np.ptp(quantiles) > 0:
        return None
    slope, intercept = np.polyfit(quantiles, held[kept], 1)
    if not slope > 0:
        return None
    return 0.0, float(intercept), float(slope)


def _composed(first: tuple[float, float, float], second: tuple[float, float, float]) -> tuple[float, float, float]:
    """The move (:func:`_scale_match`) that makes ``first`` and then ``second``."""
    low, ref_low, ratio = first
    low_2, ref_low_2, ratio_2 = second
    return low, ref_low_2 + (ref_low - low_2) * ratio_2, ratio * ratio_2


def _moved(values: np.ndarray, low: float, ref_low: float, ratio: float) -> np.ndarray:
    return ref_low + (np.asarray(values, dtype=float) - low) * ratio


def _mapped_sf(sf: Callable[[np.ndarray], np.ndarray], move: tuple[float, float, float],
               scores: np.ndarray) -> np.ndarray:
    """``sf`` of scores moved to the reference stratum's location and scale (quantile matching)."""
    return sf(_moved(scores, *move))


def _check_has_counts(cube: xr.DataArray) -> None:
    if is_lazy(cube):  # no extra pass over a lazy cube: the fit's own pass finds a cube without counts
        return
    if float(cube.sum()) <= 0:
        source = cube.attrs.get("source_file")
        where = f"{source}: " if source else ""
        raise ValueError(f"{where}the cube holds no counts (every voxel is 0 in the fitted energy range): "
                         "nothing to score")


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def _version() -> str:
    from .. import __version__

    return __version__
