"""Spatial evidence: calibrated per-pixel p-values, pooled over neighbourhoods, flagged at a false-discovery rate.

Anomalies in real materials are rarely lone pixels (precipitates, grain boundaries, interfaces), while
every per-pixel detector judges each spectrum alone. This module works on any detector's score map:

1. :func:`pixel_pvalues` turns scores into p-values against held-out bulk scores (the detector's
   ``calibration_scores_``): the empirical tail, extended beyond the largest bulk score by a
   generalised Pareto fit of its upper tail, so that p-values keep falling where no bulk score reached.
2. :func:`pool_evidence` turns p-values into normal scores ``z = Phi^-1(1 - p)``, optionally subtracts
   the local median of z (evidence relative to the neighbourhood, not the image: a smooth nuisance such
   as an uncorrected energy drift raises every score of a region alike), and combines the z of the
   pixels in discs of several radii centred on each pixel (Stouffer's sum ``sum z / sqrt(n)``), keeping
   the largest. Radius 0 is the pixel alone, so a lone strong pixel stays detectable. The largest of
   several nested windows is not standard normal: its p-value comes from simulated null maps pooled the
   same way (:func:`pooled_null`, seeded, once per process).
3. :func:`fdr_flags` flags by the Benjamini-Hochberg rule at a false-discovery rate; on pooled maps
   :func:`spatial_flags` tests the map's peaks (topological FDR), since neighbouring pooled p-values
   share their pixels.

References
----------
Chumbley, J., Worsley, K., Flandin, G. & Friston, K. (2010). Topological FDR for neuroimaging.
NeuroImage 49, 3057-3064.

Benjamini, Y. & Hochberg, Y. (1995). Controlling the false discovery rate: a practical and powerful
approach to multiple testing. J. R. Stat. Soc. B 57, 289-300.

Kulldorff, M. (1997). A spatial scan statistic. Commun. Stat. Theory Methods 26, 1481-1496.

Pickands, J. (1975). Statistical inference using extreme order statistics. Ann. Stat. 3, 119-131.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import xarray as xr

from .threshold import trim_high_outliers

#: radii (pixels) of the discs pooled by default: the pixel alone, its 4 neighbours, a disc of 13
DEFAULT_RADII: tuple[int, ...] = (0, 1, 2)
#: length (pixels) of the line segments pooled by default, in 4 directions: thin features (boundaries)
DEFAULT_LINE_LENGTH: int = 5
#: outer radius (pixels) of the local median subtracted by default: larger than any blob to be found
DEFAULT_BACKGROUND_RADIUS: int = 8
#: the lightest generalised Pareto tail allowed: the exponential. A bounded tail (shape < 0) gives p = 0 past its
#: end, which measured 14x too many p < 1e-5 on normal scores; the exponential overstates a normal tail (valid,
#: conservative: a mean deviance over hundreds of channels is nearly normal)
SHAPE_FLOOR: float = 0.0
_Z_CAP = 37.5  # the normal score of the smallest positive double: beyond it z carries no information


def normal_scores(pvalues: np.ndarray) -> np.ndarray:
    """``Phi^-1(1 - p)``, the normal score (sigma) of p-values, kept within +-37.5 (NaN stays NaN)."""
    from scipy import special

    return np.clip(-special.ndtri(np.asarray(pvalues, dtype=float)), -_Z_CAP, _Z_CAP)


def _bulk_tail(calibration: np.ndarray, outlier_mads: float | None) -> np.ndarray:
    values = np.asarray(calibration, dtype=float).ravel()
    values = np.sort(values[np.isfinite(values)])
    if values.size == 0:
        raise ValueError("calibrated p-values need bulk scores (calibration_scores_), got none that are finite")
    return trim_high_outliers(values, outlier_mads, min_kept=20)


def pixel_pvalues(
    scores: np.ndarray | xr.DataArray,
    calibration_scores: np.ndarray,
    *,
    tail_fraction: float = 0.025,
    outlier_mads: float | None = None,
    family: str | None = None,
) -> np.ndarray:
    """Upper-tail p-values of scores against the scores of held-out bulk spectra.

    Parameters
    ----------
    scores
        Scores (any shape; higher = more anomalous). NaN gives NaN.
    calibration_scores
        Scores of bulk spectra the model did not learn from (a detector's ``calibration_scores_``).
        With ``n`` of them no p-value falls below ``1 / (n + 1)`` unless at least 120 allow the tail
        fit (:data:`TAIL_EXCEEDANCES` exceedances).
    tail_fraction
        Above the ``1 - tail_fraction`` quantile of the bulk scores (default the top 2.5 %: where the
        data end, so that the tail's slope there is extrapolated; at least :data:`TAIL_EXCEEDANCES`
        scores from 120 bulk scores on) the p-value comes from a generalised
        Pareto distribution fitted (maximum likelihood) to the exceedances, its shape held at >=
        :data:`SHAPE_FLOOR` (an exponential tail at the lightest: never a bounded support that would make
        p-values exactly 0). Measured on 4,000 bulk scores (share of p below a level / the level, at
        1e-2 / 1e-3 / 1e-4 / 1e-5): gamma-like 1.1 / 1.0 / 0.7 / 0.4; half-normal 1.05 / 0.85 / 0.37 /
        0.08 (conservative past the bulk); heavy Student-t(5) 0.9 / 1.2 / 2.0 / 4.0 (anti-conservative
        far out: no tail model can know what 4,000 scores do not show). Below
        it, the conformal p-value ``(1 + #{bulk >= s}) / (n + 1)``, at most ``(n + 1/2) / (n + 1)`` (a
        score below every bulk score gets half a rank, not p = 1).
    outlier_mads
        Leave out bulk scores more than this many normal-consistent MADs above their median first.
        None (default) keeps all: a few anomalies among the bulk scores only make the p-values
        conservative, while trimming a heavy but genuine tail made them 4-47x anti-conservative.
    family
        The scores' theoretical null family, one of :data:`TAIL_FAMILIES` (``"half-normal"``: ``|z|`` of
        a normal score, scaled by the bulk's median; ``"gamma"``: a scaled chi-square such as a mean
        deviance, by the bulk's moments), or None. Where the Pareto fit finds the tail lighter than the
        exponential and the family explains the exceedances at least as well as the exponential
        (likelihood), the tail decays as the family's from the threshold on; else as above. Measured on
        4,000 bulk scores (as above, 8 draws): half-normal 1.03 / 0.99 / 0.88 / 0.81 (0.05 at 1e-5
        without); scaled chi-square(320) 0.98 / 0.90 / 0.78 / 0.66 (0.28); a wrong family that the
        likelihood check lets through: Student-t(20) as half-normal 1.07 / 0.93 / 0.80 / 0.96 (up to 3.7
        in one draw of 8), lognormal as gamma 1.03 / 1.06 / 0.91 / 0.82 (up to 2.1).

    Returns
    -------
    ndarray
        p-values in (0, 1], the shape of ``scores``: uniform under the null when the bulk scores come
        from the same distribution as the bulk pixels scored.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> bulk = rng.gamma(50, 0.02, 4000)
    >>> p = pixel_pvalues(rng.gamma(50, 0.02, 20000), bulk)
    >>> bool(abs(np.mean(p < 0.05) - 0.05) < 0.01), bool(pixel_pvalues(np.array([5.0]), bulk)[0] < 1e-6)
    (True, True)
    """
    return UpperTail(calibration_scores, tail_fraction=tail_fraction, outlier_mads=outlier_mads,
                      family=family).sf(scores)


class UpperTail:
    """The upper-tail p-value of scores against a sample of null scores (see :func:`pixel_pvalues`):
    conformal below the ``1 - tail_fraction`` quantile, a generalised Pareto tail above it, fitted once.

    ``tail_sample``: more null scores on the sample's scale that shape the tail beyond the threshold ``t`` but
    not its mass there or the p-values below it, which stay the sample's: ``P(X > x) = P(X > t) P(X > x | X >
    t)``, the first factor from the sample alone, the second from an upper tail of both samples together.

    ``squared``: the Pareto tail is fitted to the exceedances of ``x^2 / 2`` rather than of ``x`` (where the
    threshold is positive), for scores on the scale of a normal score, whose tail is exponential in ``x^2 / 2``:
    the shape's floor (:data:`SHAPE_FLOOR`) then stands for a normal tail at the lightest, not an exponential one,
    which for such scores is several times too heavy at 1e-5 (:func:`squared_excess`).
    """

    def __init__(self, sample: np.ndarray, *, tail_fraction: float = 0.025, outlier_mads: float | None = None,
                 family: str | None = None, tail_sample: np.ndarray | None = None, squared: bool = False):
        from scipy import stats

        if family is not None and family not in TAIL_FAMILIES:
            raise ValueError(f"family must be one of {TAIL_FAMILIES} or None, got {family!r}")
        if not 0 < tail_fraction < 1:
            raise ValueError(f"tail_fraction must lie in (0, 1), got {tail_fraction}")
        self.bulk = _bulk_tail(sample, outlier_mads)
        n = self.bulk.size
        # at least TAIL_EXCEEDANCES exceedances where the sample has 4x as many (a shape from a dozen is noise)
        start = min(int(np.floor(n * (1 - tail_fraction))), n - TAIL_EXCEEDANCES) if n >= 4 * TAIL_EXCEEDANCES \
            else int(np.floor(n * (1 - tail_fraction)))
        self.threshold = self.bulk[start]
        self.squared = bool(squared and self.threshold > 0)
        excess = self.bulk[start:] - self.threshold
        self.tail = self.light = self.outer = None
        if tail_sample is not None and excess.size > 0:  # the tail's shape from the larger sample, its mass from ours
            self.outer = UpperTail(np.concatenate([self.bulk, np.asarray(tail_sample, dtype=float).ravel()]),
                                   tail_fraction=tail_fraction, family=family, squared=squared)
            self.outer_at_threshold = float(self.outer.sf(np.array([self.threshold]))[0])
            self.tail = ((n - start) / (n + 1.0), 0.0, 0.0)  # the anchor; the shape is the outer tail's
        elif excess.size >= 10 and np.ptp(excess) > 0:
            pareto_excess = squared_excess(self.bulk[start:], self.threshold) if self.squared else excess
            shape, _, scale = stats.genpareto.fit(pareto_excess, floc=0)
            if family is not None and not self.squared and shape < FAMILY_SHAPE:  # not clearly heavier than the
                # exponential (on the squared scale the floor is a normal tail already)
                log_sf = self._family_tail(family)
                at_threshold = float(log_sf(np.array([self.threshold]))[0])
                self.light = lambda x: log_sf(x) - at_threshold  # the family's log decay from the threshold
                if not self._family_fits(excess, float(np.mean(excess))):
                    self.light = None
            if shape < SHAPE_FLOOR:  # lighter than the floor allows: the floor's tail, with the same mean excess
                shape, scale = SHAPE_FLOOR, float(np.mean(pareto_excess)) * (1 - SHAPE_FLOOR)
            # the conformal p-value at the tail's start, less its own +1
            self.tail = ((n - start) / (n + 1.0), shape, scale)

    def _family_tail(self, family: str) -> Callable[[np.ndarray], np.ndarray]:
        """The log survival function of the family fitted to the whole null sample (scale, or moments)."""
        from scipy import special, stats

        if family == "half-normal":  # |z| of a normal score: its scale from the median (0.674 sigma)
            spread = max(float(np.median(np.abs(self.bulk))) / stats.halfnorm.ppf(0.5), 1e-12)
            return lambda x: special.log_ndtr(-np.asarray(x) / spread) + np.log(2.0)
        mean, variance = float(np.mean(self.bulk)), float(np.var(self.bulk))
        if not (mean > 0 and variance > 0):
            return lambda x: -(np.asarray(x) - self.threshold) / max(float(np.std(self.bulk)), 1e-12)
        shape, scale = mean * mean / variance, variance / mean  # a scaled chi-square: the moments' gamma
        return lambda x: stats.gamma.logsf(np.asarray(x), shape, scale=scale)

    def _family_fits(self, excess: np.ndarray, mean_excess: float) -> bool:
        """Whether the family's tail explains the exceedances about as well as the exponential fitted to them:
        a log-likelihood no more than :data:`FAMILY_MARGIN` below (the exponential's rate is fitted to the
        exceedances themselves, the family's scale to the whole sample)."""
        step = 1e-4 * max(float(np.ptp(self.bulk)), 1e-12)  # the density by a small difference of log sf
        x = self.threshold + excess
        log_density = np.log(np.maximum(-np.expm1(self.light(x + step) - self.light(x)), 1e-300) / step) \
            + self.light(x)
        exponential = -np.log(mean_excess) - excess / mean_excess
        return bool(np.sum(log_density) >= np.sum(exponential) - FAMILY_MARGIN)

    def sf(self, scores: np.ndarray | xr.DataArray) -> np.ndarray:
        from scipy import stats

        values = np.asarray(scores, dtype=float)
        n = self.bulk.size
        exceed = n - np.searchsorted(self.bulk, values, side="left")  # null scores >= each score
        # a score below every null score would get p = 1 and a normal score of -infinity: the least is half a rank
        pvalues = np.minimum((1.0 + exceed) / (n + 1.0), (n + 0.5) / (n + 1.0))
        in_tail = values > self.threshold
        if self.tail is not None and in_tail.any():
            anchor, shape, scale = self.tail
            if self.outer is not None:  # P(X > x | X > threshold) from the larger sample
                log_tail = np.log(self.outer.sf(values[in_tail]) / self.outer_at_threshold)
            elif self.light is not None:  # the family's decay, from its value at the threshold
                log_tail = self.light(values[in_tail])
            else:
                above = squared_excess(values[in_tail], self.threshold) if self.squared \
                    else values[in_tail] - self.threshold
                log_tail = stats.genpareto.logsf(above, shape, scale=scale)
            # the tail model alone above its threshold (the minimum of two estimates would be anti-conservative)
            pvalues[in_tail] = np.maximum(anchor * np.exp(log_tail), np.finfo(float).tiny)
        return np.where(np.isnan(values), np.nan, pvalues)


def squared_excess(scores: np.ndarray, threshold: float) -> np.ndarray:
    """``(x^2 - t^2) / 2``: the excess of scores ``x`` over a positive threshold ``t`` on the squared scale, where
    a normal score's tail is exponential (``P(Z > x) ~ exp(-x^2 / 2)`` up to a slowly varying factor).

    A Pareto tail fitted on this scale with its shape held at >= 0 is at the lightest a normal tail. On the
    plain scale the same floor is an exponential tail, which from a 2.5 % threshold (``t`` ~ 2) made p-values
    of the larger of two normal scores (the null of the CVAE's ``shift+deviance``) 3.6-5.8x too large at 1e-5, with
    32,768 of them shaping the tail (8 draws; 0.5-4.0x, median 0.9, on the squared scale; tests/test_spatial.py).

    Examples
    --------
    >>> squared_excess(np.array([2.0, 3.0]), 2.0)
    array([0. , 2.5])
    """
    values = np.asarray(scores, dtype=float)
    return 0.5 * (values * values - threshold * threshold)


#: the theoretical null families of scores whose tail is lighter than the exponential (see :func:`pixel_pvalues`)
TAIL_FAMILIES: tuple[str, ...] = ("half-normal", "gamma")
#: a family is tried where the Pareto fit's shape is below this (a tail not clearly heavier than the exponential: the
#: shape of 100 exceedances of a half-normal came out >= 0 in 2 of 4 draws)
FAMILY_SHAPE: float = 0.1
#: the tail is fitted to at least this many of the largest bulk scores (more than ``tail_fraction`` of a sample of
#: fewer than 1,200; a sample under 4x as many keeps ``tail_fraction``): measured on the CVAE's 512 held-out scores,
#: whose 12 exceedances gave a tail ~2.5x too light at 1e-5 (benchmarks/README.md, session 12)
TAIL_EXCEEDANCES: int = 30
#: log-likelihood by which the exponential may beat a family on the exceedances before the family is refused
FAMILY_MARGIN: float = 0.0


#: fewest pixels whose p-values estimate a map's own null (``empirical_null``); below it they are kept as they are
MIN_EMPIRICAL_NULL_PIXELS: int = 100
#: the empirical null's fit leaves out the pixels above the theoretical null's discoveries at this FDR, and at most
#: this share of the map (:func:`empirical_null`)
NULL_FIT_FDR: float = 0.05
NULL_FIT_MAX_LEFT_OUT: float = 0.25


def _censored_normal_fit(z: np.ndarray, cut: float) -> tuple[float, float, np.ndarray]:
    """A normal fitted by maximum likelihood to the scores at or below ``cut``, as a normal truncated there
    (its sufficient statistics only; ``cut`` infinite: the plain normal). Returns the centre, the spread and the
    covariance of (centre, spread) from the observed information."""
    from scipy import optimize, special, stats

    kept = z[z <= cut]
    m, s1, s2 = kept.size, float(kept.sum()), float(np.square(kept).sum())

    def nll(params: np.ndarray) -> float:
        centre, log_spread = params
        spread = np.exp(log_spread)
        value = m * log_spread + (s2 - 2 * centre * s1 + m * centre * centre) / (2 * spread * spread)
        return float(value + m * special.log_ndtr((cut - centre) / spread)) if np.isfinite(cut) else float(value)

    start = [float(np.median(kept)), np.log(max(float(stats.median_abs_deviation(kept, scale="normal")), 1e-6))]
    fitted = optimize.minimize(nll, start, method="Nelder-Mead", options={"xatol": 1e-7, "fatol": 1e-10})
    centre, spread = float(fitted.x[0]), float(np.exp(fitted.x[1]))
    step = 1e-4
    hessian = np.empty((2, 2))  # of the negative log-likelihood in (centre, log spread), by central differences
    for i in range(2):
        for j in range(2):
            di, dj = np.eye(2)[i] * step, np.eye(2)[j] * step
            hessian[i, j] = (nll(fitted.x + di + dj) - nll(fitted.x + di - dj) - nll(fitted.x - di + dj)
                             + nll(fitted.x - di - dj)) / (4 * step * step)
    try:
        covariance = np.linalg.inv(hessian)
    except np.linalg.LinAlgError:
        covariance = np.full((2, 2), np.inf)
    jacobian = np.diag([1.0, spread])  # (centre, log spread) -> (centre, spread)
    return centre, spread, jacobian @ covariance @ jacobian


def empirical_null(pvalues: np.ndarray | xr.DataArray,
                   strata: np.ndarray | None = None) -> tuple[np.ndarray, float, float]:
    """Per-pixel p-values re-standardised to the scored map's own null (Efron's empirical null).

    The p-values from :func:`pixel_pvalues` are uniform when the scored cube's bulk is like the bulk
    that calibrated them. A nuisance of the scored cube that the calibration did not see (another drift
    pattern, another dose, a detector gain) changes the spread of all its bulk scores together. Most
    pixels of a map are bulk, so the body of the normal scores ``z`` of its p-values shows that:

    1. the pixels the theoretical null would flag at :data:`NULL_FIT_FDR` (and so the anomalies that
       stand out) are left out, at most the top :data:`NULL_FIT_MAX_LEFT_OUT` of the map, and a normal
       truncated at the smallest score left out is fitted to the rest by maximum likelihood (Efron's
       truncated fit, one-sided: anomalies have small p-values, so they sit in the upper tail). The
       median and MAD, used before, are moved by ~1.3 ``f`` and 1.4 ``f`` sigma by a share ``f`` of
       anomalies: a 258-pixel map with 10 % of them flagged nothing;
    2. the fitted centre and spread are shrunk towards the theoretical null (0, 1) by
       ``w = max(0, 1 - 2 / D^2)``, ``D^2`` being their squared Mahalanobis distance from (0, 1) under the
       fit's covariance (observed information): on a small map a difference within the fit's noise is not
       taken for a nuisance (positive-part James-Stein), a clear one is taken nearly whole;
    3. the p-values are recomputed from ``(z - c) / s``.

    Anomalies too weak for the theoretical null to flag stay in the fit and widen it a little (a
    conservative error). A skewed null (e.g. an uncorrected drift seen through ``context="neighbours"``)
    is matched in centre and spread, not in shape.

    With ``strata`` each stratum is re-standardised to its own null (where it holds at least
    :data:`MIN_EMPIRICAL_NULL_PIXELS` finite pixels; a smaller one to the whole map's): for a detector whose
    strata have nulls of their own (the CVAE's blind spot at the image's edges, whose cut rings see a drift
    otherwise). Their calibration came from one training cube's edges; the scored map's own edges tell
    how that cube's drift differs from this one's. Measured (benchmarks/README.md, session 20): the CVAE's
    blind spot under a +-1 eV drift, trained on 6 cubes, realised an FDR at 5 % of 0.040-0.127 (mean 0.070)
    with the whole map's null and 0.033-0.080 (mean 0.057) with each stratum's; PCA's neighbour context
    0.010-0.057 (mean 0.039) and 0.010-0.110 (0.046), so it keeps one null
    (``BaseDetector.NULL_PER_STRATUM``).

    Parameters
    ----------
    pvalues
        Per-pixel p-values (any shape; NaN, e.g. vacuum, left out and kept NaN).
    strata
        Integer labels of the pixels' strata, the shape of ``pvalues``, or None (one null).

    Returns
    -------
    pvalues, centre, spread
        The re-standardised p-values and the null's centre and spread in sigma (0 and 1 when fewer than
        :data:`MIN_EMPIRICAL_NULL_PIXELS` pixels are finite, or the fit fails: unchanged); with ``strata``, the
        largest stratum's.

    References
    ----------
    B. Efron, "Large-scale simultaneous hypothesis testing: the choice of a null hypothesis",
    *J. Am. Stat. Assoc.* 99, 96 (2004).

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> from scipy import stats
    >>> p = stats.norm.sf(rng.normal(0.3, 0.8, 5000))    # a null shifted and narrowed by a nuisance
    >>> adjusted, centre, spread = empirical_null(p)
    >>> round(centre, 1), round(spread, 1), bool(abs(np.mean(adjusted < 0.05) - 0.05) < 0.01)
    (0.3, 0.8, True)
    """
    values = np.asarray(pvalues, dtype=float)
    if strata is None:
        return _empirical_null(values)
    strata = np.asarray(strata)
    if strata.shape != values.shape:
        raise ValueError(f"strata must have the p-values' shape {values.shape}, got {strata.shape}")
    labels, counts = np.unique(strata[np.isfinite(values)], return_counts=True)
    own = counts >= MIN_EMPIRICAL_NULL_PIXELS
    if labels.size < 2 or not own.any():
        return _empirical_null(values)
    if own.all():  # every stratum its own null: no fit of the whole map (one per scored map)
        adjusted = np.full(values.shape, np.nan)
    else:  # the whole map's null for the strata too small for their own (a copy: it may be the input itself)
        adjusted = np.array(_empirical_null(values)[0])
    largest = labels[np.argmax(counts)]
    for label in labels[own]:
        inside = strata == label
        adjusted[inside], own_centre, own_spread = _empirical_null(values[inside])
        if label == largest:  # the largest stratum has a null of its own whenever any has
            centre, spread = own_centre, own_spread
    return adjusted, centre, spread


def _empirical_null(values: np.ndarray) -> tuple[np.ndarray, float, float]:
    """:func:`empirical_null` of one null."""
    from scipy import special

    z = normal_scores(values)
    finite = np.isfinite(z)
    n = int(finite.sum())
    if n < MIN_EMPIRICAL_NULL_PIXELS:
        return values, 0.0, 1.0
    scores = z[finite]
    discoveries, _ = fdr_flags(values[finite], NULL_FIT_FDR)
    cut = float(scores[discoveries].min()) if discoveries.any() else np.inf
    cut = max(cut, float(np.quantile(scores, 1.0 - NULL_FIT_MAX_LEFT_OUT)))
    with np.errstate(all="ignore"):  # scores of (nearly) one value: trial spreads near 0 overflow, the fit is refused
        centre, spread, covariance = _censored_normal_fit(scores, cut)
    if not (spread > 0 and np.isfinite(centre) and np.isfinite(spread)):
        return values, 0.0, 1.0
    offset = np.array([centre, spread - 1.0])
    try:
        distance2 = float(offset @ np.linalg.solve(covariance, offset))
    except np.linalg.LinAlgError:
        distance2 = 0.0
    weight = max(0.0, 1.0 - 2.0 / distance2) if distance2 > 0 else 0.0
    centre, spread = weight * centre, 1.0 + weight * (spread - 1.0)
    adjusted = np.clip(special.ndtr(-(z - centre) / spread), np.finfo(float).tiny, 1.0)
    return np.where(finite, adjusted, np.nan), centre, spread


def _disc(radius: float) -> np.ndarray:
    r = int(np.floor(radius))
    y, x = np.mgrid[-r:r + 1, -r:r + 1]
    return (y * y + x * x) <= radius * radius + 1e-9


def _segments(length: int) -> list[np.ndarray]:
    """Footprints of straight segments of ``length`` pixels through the centre: along y, x and both diagonals."""
    half = length // 2
    eye = np.eye(2 * half + 1, dtype=bool)
    row = np.zeros_like(eye)
    row[half] = True
    return [row, row.T, eye, eye[::-1]]


def ring(inner: float, outer: float) -> np.ndarray:
    """Footprint (bool, square) of the pixels between ``inner`` and ``outer`` pixels from the centre."""
    r = int(np.floor(outer))
    y, x = np.mgrid[-r:r + 1, -r:r + 1]
    distance = np.hypot(y, x)
    return (distance >= inner) & (distance <= outer)


def ring_prediction(
    values: np.ndarray, inner: float, outer: float, *, valid: np.ndarray | None = None,
    slope_outer: float | None = None,
) -> np.ndarray:
    """Each pixel's values predicted from its ring of neighbours, the pixel itself hidden.

    Inside the image the prediction is the mean of the pixels between ``inner`` and ``outer`` pixels
    away. At an edge or a corner the ring is cut, and its mean sits inside the image: under a smooth
    gradient (an energy drift, a thickness ramp) that is biased by the gradient times the ring's offset
    (measured: an uncorrected +-1 eV drift made the top rows of a 64 x 64 map a line of false flags,
    mean z 2.6, when the ring was mirrored at the edge). So the ring's mean is moved back to the pixel
    along the local gradient, ``mean - b dy_mean - c dx_mean``, with the gradient ``(b, c)`` of a plane
    fitted (least squares) to the ring out to ``slope_outer``: the plane's value at the pixel. Inside the
    image the offsets are 0 and the gradient plays no part. Measured on 40 bulk-only 64 x 64 cubes (PCA,
    shift score): without drift the pixels within 3 of an edge have the interior's spread (sd 1.000 /
    1.004 in normal scores); under a +-1 eV drift their tail is heavier (P(z > 3) 0.0024 against
    0.0007): the drift's curvature, which no plane follows; a wider ring for the gradient (``slope_outer``
    10) did not help (0.0022).

    Parameters
    ----------
    values
        (y, x) or (y, x, k) values, e.g. a model's component scores per pixel.
    inner, outer
        Radii of the ring, pixels.
    valid
        (y, x) bool, the pixels that may predict others (e.g. not vacuum); default all.
    slope_outer
        Outer radius of the ring whose plane gives the gradient; default ``outer``.

    Returns
    -------
    ndarray
        The prediction, the shape of ``values``. Where the valid pixels of the wider ring do not span a
        plane (fewer than 3, or on one line) the ring's mean; where no ring pixel is valid, NaN.

    Examples
    --------
    >>> yy, xx = np.mgrid[:20, :20].astype(float)
    >>> plane = 3 + 0.5 * yy - 0.2 * xx
    >>> bool(np.allclose(ring_prediction(plane, 2.5, 5.0), plane))     # edges and corners included
    True
    """
    from scipy import signal

    data = np.asarray(values, dtype=float)
    flat = data[..., None] if data.ndim == 2 else data
    if flat.ndim != 3:
        raise ValueError(f"ring_prediction takes (y, x) or (y, x, k) values, got shape {data.shape}")
    slope_outer = float(outer) if slope_outer is None else float(slope_outer)
    if slope_outer < outer:
        raise ValueError(f"slope_outer must be at least outer = {outer}, got {slope_outer}")
    inside = np.ones(flat.shape[:2]) if valid is None else np.asarray(valid, dtype=float)
    masked = np.where(inside[..., None] > 0, flat, 0.0)

    def moments(footprint: np.ndarray) -> tuple[np.ndarray, ...]:
        r = footprint.shape[0] // 2
        dy, dx = np.mgrid[-r:r + 1, -r:r + 1].astype(float)
        return footprint, footprint * dy, footprint * dx, footprint * dy * dy, footprint * dy * dx, \
            footprint * dx * dx

    def window_sum(image: np.ndarray, weights: np.ndarray) -> np.ndarray:
        # a correlation: the kernel flipped for the convolution (FFT: the wide ring has hundreds of taps)
        return signal.fftconvolve(image, weights[::-1, ::-1], mode="same", axes=(0, 1))

    near = moments(ring(inner, outer).astype(float))
    count, offset_y, offset_x = (window_sum(inside, w) for w in near[:3])
    total = window_sum(masked, near[0][..., None])
    wide = moments(ring(inner, slope_outer).astype(float))
    n, sy, sx, syy, sxy, sxx = (window_sum(inside, w) for w in wide)
    zy, zx = (window_sum(masked, w[..., None]) for w in wide[1:3])
    zsum = window_sum(masked, wide[0][..., None])
    with np.errstate(invalid="ignore", divide="ignore"):
        # the plane's gradient from the centred normal equations of the wide ring
        cyy, cxy, cxx = syy - sy * sy / n, sxy - sy * sx / n, sxx - sx * sx / n
        determinant = cyy * cxx - cxy * cxy
        planar = (np.round(n) >= 3) & (determinant > 1e-6 * np.maximum(n, 1.0) ** 2)
        ry = zy - (sy / n)[..., None] * zsum
        rx = zx - (sx / n)[..., None] * zsum
        slope_y = np.where(planar[..., None], (cxx[..., None] * ry - cxy[..., None] * rx) / determinant[..., None], 0)
        slope_x = np.where(planar[..., None], (cyy[..., None] * rx - cxy[..., None] * ry) / determinant[..., None], 0)
        prediction = (total - slope_y * offset_y[..., None] - slope_x * offset_x[..., None]) / count[..., None]
    prediction = np.where((np.round(count) > 0)[..., None], prediction, np.nan)
    return prediction.reshape(data.shape)


def _check_radii(radii: Sequence[float]) -> tuple[float, ...]:
    radii = tuple(float(r) for r in radii)
    if not radii or any(not np.isfinite(r) or r < 0 for r in radii):
        raise ValueError(f"radii must be one or more finite numbers >= 0 (pixels), got {radii}")
    return tuple(sorted(set(radii)))


def pool_evidence(
    pvalues: np.ndarray | xr.DataArray,
    radii: Sequence[float] = DEFAULT_RADII,
    *,
    line_length: int = DEFAULT_LINE_LENGTH,
    background_radius: float | None = DEFAULT_BACKGROUND_RADIUS,
    mask: np.ndarray | None = None,
    correlated: bool = True,
) -> np.ndarray:
    """Pool per-pixel evidence over discs around each pixel: p-values of the strongest disc.

    Parameters
    ----------
    pvalues
        (y, x) per-pixel p-values (e.g. :func:`pixel_pvalues`), independent under the null.
    radii
        Disc radii in pixels (0: the pixel alone). Each pixel gets the largest Stouffer statistic of
        the windows centred on it; pixels outside the image or the ``mask`` do not count.
    line_length
        Also pool along straight segments of this many pixels (odd; along y, x and both diagonals),
        for thin features such as a grain boundary, where a disc mixes in the bulk on either side.
        0 or 1: discs only.
    background_radius
        Subtract from each pixel's z the median z of the annulus between the largest window + 2 and this
        radius first: evidence relative to the neighbourhood (a region whose scores a smooth nuisance
        raised alike is not pooled into a detection). None: relative to the image's bulk only.
    mask
        (y, x) bool, the pixels that take part (e.g. not vacuum); others get p = NaN.
    correlated
        Measure the spatial autocorrelation of the normal scores on the map itself (after the local
        median; clipped at +-3 so that anomalies hardly count; correlations within noise, or negative,
        taken as 0) and divide each window's sum by its standard deviation under that correlation rather
        than under independence. Evidence that is correlated under the null (a drift residual, a scan
        artefact, detector cross-talk) then pools no more often than independent evidence. False: assume
        independent pixels.

    Returns
    -------
    ndarray
        (y, x) p-values of the pooled statistic ``T``, the largest window statistic, under the null of
        independent uniform per-pixel p-values: the share of simulated null maps' ``T`` at least as large
        (:func:`pooled_null`), beyond them a normal tail ``a Phi(-T / s)`` fitted to theirs. (Sidak's
        correction for the ``K`` windows, used before, had a median normal score of -0.5 and a spread of
        1.33 on null maps, and was anti-conservative far out: the local median adds to each window's
        variance.)

    Examples
    --------
    >>> rng = np.random.default_rng(1)
    >>> p = rng.uniform(size=(48, 48))
    >>> yy, xx = np.mgrid[:48, :48]
    >>> disc = (yy - 20) ** 2 + (xx - 30) ** 2 <= 4
    >>> p[disc] = rng.uniform(0, 0.01, disc.sum())       # weak evidence, each pixel alone
    >>> pooled = pool_evidence(p)
    >>> bool(pooled[20, 30] < 1e-8 < p[disc].min())
    True
    """
    radii = _check_radii(radii)
    values = np.asarray(pvalues, dtype=float)
    if values.ndim != 2:
        raise ValueError(f"pool_evidence takes a (y, x) map of p-values, got shape {values.shape}")
    valid = np.isfinite(values) if mask is None else np.isfinite(values) & np.asarray(mask, dtype=bool)
    if not valid.any():
        return np.full(values.shape, np.nan)
    if np.any((values[valid] <= 0) | (values[valid] > 1)):
        raise ValueError("p-values must lie in (0, 1]")
    _check_windows(radii, line_length, background_radius)
    z = np.where(valid, normal_scores(np.where(valid, values, 0.5)), 0.0)
    best = _pool_statistic(z, valid, radii, line_length, background_radius, correlated)
    pooled = pooled_null(radii, line_length, background_radius).marginal_sf(best)
    return np.where(valid, np.clip(pooled, np.finfo(float).tiny, 1.0), np.nan)


def _check_windows(radii: tuple[float, ...], line_length: int, background_radius: float | None) -> None:
    if not (isinstance(line_length, (int, np.integer)) and line_length >= 0):
        raise ValueError(f"line_length must be a whole number of pixels >= 0, got {line_length!r}")
    if background_radius is not None:
        inner = max(max(radii), line_length // 2) + 2
        if background_radius <= inner:
            raise ValueError(f"background_radius must exceed the largest window + 2 = {inner} pixels, "
                             f"got {background_radius}")


def _pool_statistic(z: np.ndarray, valid: np.ndarray, radii: tuple[float, ...], line_length: int,
                    background_radius: float | None, correlated: bool) -> np.ndarray:
    """The largest window statistic at each pixel (-inf where no window holds a valid pixel)."""
    from scipy import ndimage

    if background_radius is not None:
        inner = max(max(radii), line_length // 2) + 2
        z = np.where(valid, z - _local_median(z, valid, inner, background_radius), 0.0)
    windows = [_disc(radius) for radius in radii] + (_segments(int(line_length)) if line_length > 1 else [])
    weight = valid.astype(float)
    correlation = _spatial_correlation(z, valid, max(w.shape[0] for w in windows) - 1) if correlated else None
    best = np.full(z.shape, -np.inf)
    for window in windows:
        footprint = window.astype(float)
        total = ndimage.correlate(z, footprint, mode="constant", cval=0.0)
        count = ndimage.correlate(weight, footprint, mode="constant", cval=0.0)
        # the variance of the window's sum: n under independence, more where neighbouring z are correlated
        inflation = 1.0 if correlation is None else _pair_sum(footprint, correlation) / footprint.sum()
        with np.errstate(invalid="ignore", divide="ignore"):
            statistic = np.where(count > 0, total / np.sqrt(np.maximum(count * inflation, 1e-12)), -np.inf)
        best = np.maximum(best, statistic)
    return best


#: side (pixels) and number of the simulated null maps that calibrate the pooled statistic and its peaks
NULL_MAP_SIZE: int = 128
NULL_MAPS: int = 40


class PooledNull:
    """The null distributions of the pooled statistic: its value at a pixel, and its peaks' heights, as tables.

    Made by :meth:`simulate` (seeded null maps pooled as real maps are) or read from the table shipped
    for the default windows (``eels_ad/data/pooled_null.npz``, the same simulation saved: a fresh
    process need not simulate).

    Attributes
    ----------
    marginal_table
        (2, n): ascending values of the pooled statistic ``T`` and the log of their p-values under the
        null of independent uniform per-pixel p-values; beyond the last, ``marginal_tail``.
    marginal_tail
        ``(log a, s)`` of the normal tail ``a Phi(-T / s)`` beyond the table.
    peak_table
        (2, m): ascending heights of the local maxima (3 x 3) of null maps, in normal scores of the
        pooled p-values, and the log of the share of null peaks at least as high.
    peaks_per_pixel
        Local maxima per pixel of a null map.
    """

    #: fewest null peaks above a height for their share to be its p-value; beyond, the bound of peak_pvalues
    MIN_EXCEEDANCES = 50

    def __init__(self, marginal_table: np.ndarray, marginal_tail: tuple[float, float], peak_table: np.ndarray,
                 peaks_per_pixel: float):
        self.marginal_table = np.asarray(marginal_table, dtype=float)
        self.marginal_tail = (float(marginal_tail[0]), float(marginal_tail[1]))
        self.peak_table = np.asarray(peak_table, dtype=float)
        self.peaks_per_pixel = float(peaks_per_pixel)

    @classmethod
    def simulate(cls, radii: tuple[float, ...], line_length: int, background_radius: float | None) -> PooledNull:
        """:data:`NULL_MAPS` maps of :data:`NULL_MAP_SIZE` pixels square, independent standard normal scores
        (seed 0), pooled with these windows; their statistic's tail and their peaks, tabulated."""
        rng = np.random.default_rng(0)
        valid = np.ones((NULL_MAP_SIZE, NULL_MAP_SIZE), dtype=bool)
        maps = [_pool_statistic(rng.standard_normal(valid.shape), valid, radii, line_length, background_radius,
                                False) for _ in range(NULL_MAPS)]
        marginal = _NormalTail(np.concatenate([m.ravel() for m in maps]), exceedances=cls.MIN_EXCEEDANCES)
        values = _table_points(marginal.bulk, cls.MIN_EXCEEDANCES)
        marginal_table = np.stack([values, np.log(marginal.sf(values))])
        heights = np.sort(np.concatenate([normal_scores(marginal.sf(m[local_maxima(m)])) for m in maps]))
        points = _table_points(heights, cls.MIN_EXCEEDANCES)
        exceed = heights.size - np.searchsorted(heights, points, side="left")
        peak_table = np.stack([points, np.log((1.0 + exceed) / (heights.size + 1.0))])
        return cls(marginal_table, marginal.normal, peak_table, heights.size / (NULL_MAPS * valid.size))

    def marginal_sf(self, statistic: np.ndarray) -> np.ndarray:
        """p-values of pooled statistics ``T`` (NaN stays NaN; ``-inf``, no window, gets 1)."""
        from scipy import special

        values = np.asarray(statistic, dtype=float)
        table, log_p = self.marginal_table
        inside = np.exp(np.interp(values, table, log_p, left=log_p[0]))
        log_scale, spread = self.marginal_tail
        with np.errstate(invalid="ignore"):
            far = np.exp(log_scale + special.log_ndtr(-values / spread))
            pvalues = np.where(values > table[-1], far, inside)
        return np.where(np.isnan(values), np.nan, np.clip(pvalues, np.finfo(float).tiny, 1.0))

    def peak_pvalues(self, heights: np.ndarray) -> np.ndarray:
        """p-values of peaks of a pooled map, given as normal scores ``z`` of their pooled p-values.

        The share of null peaks at least as high while at least :attr:`MIN_EXCEEDANCES` are; higher up,
        ``Phi(-z) / peaks_per_pixel`` (no more peaks than pixels exceed ``z``: an upper bound, measured
        at 1.1-1.2 x the simulated share between 1e-4 and 3e-5), kept no larger than the share where it
        takes over, so that p falls as ``z`` rises.
        """
        from scipy import special

        z = np.asarray(heights, dtype=float)
        table, log_p = self.peak_table
        pvalues = np.exp(np.interp(z, table, log_p, left=log_p[0]))
        far = z > table[-1]
        if far.any():
            bound = special.ndtr(-z[far]) / self.peaks_per_pixel
            pvalues[far] = np.maximum(np.minimum(bound, np.exp(log_p[-1])), np.finfo(float).tiny)
        return np.where(np.isnan(z), np.nan, np.minimum(pvalues, 1.0))

    def save(self, path: str | Path, **settings: object) -> None:
        """Write the tables (and the ``settings`` they were made with) to an ``.npz`` file."""
        np.savez(path, marginal_table=self.marginal_table, marginal_tail=np.array(self.marginal_tail),
                 peak_table=self.peak_table, peaks_per_pixel=self.peaks_per_pixel,
                 **{key: np.asarray(value) for key, value in settings.items()})


def _table_points(ordered: np.ndarray, exceedances: int, points: int = 800) -> np.ndarray:
    """Values of a sorted sample at shares above them from 1 down to ``exceedances`` of the sample, log-spaced."""
    n = ordered.size
    shares = np.logspace(0, np.log10(exceedances / (n + 1.0)), points)
    ranks = np.unique(np.clip(np.round(n - shares * (n + 1.0)).astype(int), 0, n - exceedances))
    return np.unique(ordered[ranks])


#: the table of the default windows' null (PooledNull.simulate saved), so that a fresh process need not simulate
NULL_TABLE = Path(__file__).resolve().parent.parent / "data" / "pooled_null.npz"


class _NormalTail(UpperTail):
    """:class:`UpperTail` whose tail beyond the simulated values is ``a Phi(-t / s)``: the tail of a maximum of
    normal sums (a few windows, each normal with a spread ``s`` a little over 1 after the local median),
    fitted through the ``1 - tail_fraction`` quantile and the 50th-largest value. Conformal below that."""

    def __init__(self, sample: np.ndarray, *, tail_fraction: float = 0.025, exceedances: int = 50):
        from scipy import optimize, special

        super().__init__(sample, tail_fraction=tail_fraction)
        n = self.bulk.size
        t0, t1 = self.bulk[int(np.floor(n * (1 - tail_fraction)))], self.bulk[n - exceedances]
        q0, q1 = tail_fraction, exceedances / (n + 1.0)

        def mismatch(spread: float) -> float:
            return (np.log(q0 / q1) - special.log_ndtr(-t0 / spread) + special.log_ndtr(-t1 / spread))

        spread = optimize.brentq(mismatch, 0.3, 5.0) if mismatch(0.3) * mismatch(5.0) < 0 else 1.0
        self.threshold, self.tail = t1, None
        self.normal = (np.log(q1) - special.log_ndtr(-t1 / spread), spread)

    def sf(self, scores: np.ndarray | xr.DataArray) -> np.ndarray:
        from scipy import special

        values = np.asarray(scores, dtype=float)
        pvalues = super().sf(values)
        in_tail = values > self.threshold
        if in_tail.any():
            log_scale, spread = self.normal
            pvalues[in_tail] = np.maximum(np.exp(log_scale + special.log_ndtr(-values[in_tail] / spread)),
                                          np.finfo(float).tiny)
        return pvalues


def local_maxima(values: np.ndarray) -> np.ndarray:
    """(y, x) bool: finite pixels not below any of their 8 neighbours (NaN and -inf never count)."""
    from scipy import ndimage

    finite = np.isfinite(values)
    filled = np.where(finite, values, -np.inf)
    return finite & (filled >= ndimage.maximum_filter(filled, size=3, mode="constant", cval=-np.inf))


@functools.lru_cache(maxsize=8)
def pooled_null(radii: Sequence[float] = DEFAULT_RADII, line_length: int = DEFAULT_LINE_LENGTH,
                background_radius: float | None = DEFAULT_BACKGROUND_RADIUS) -> PooledNull:
    """The null of :func:`pool_evidence` with these windows, from :data:`NULL_MAPS` seeded simulated maps.

    Each map is :data:`NULL_MAP_SIZE` pixels square of independent standard normal scores (uniform
    p-values), pooled exactly as a real map is (the local median, the windows, the largest statistic).
    The same windows give the same null in every run (seed 0), computed once per process (about two seconds);
    for the default windows it is read from the table shipped with eels-ad (:data:`NULL_TABLE`).
    The maximum over nested windows is far from Sidak's independent case (measured: Sidak's
    p-values had a median normal score of -0.5 and a spread of 1.33 on null maps).
    """
    radii = _check_radii(radii)
    _check_windows(radii, line_length, background_radius)
    settings = _null_settings(radii, line_length, background_radius)
    if NULL_TABLE.exists():
        with np.load(NULL_TABLE) as table:
            if all(key in table.files and np.array_equal(table[key], value) for key, value in settings.items()):
                return PooledNull(table["marginal_table"], tuple(table["marginal_tail"]), table["peak_table"],
                                  float(table["peaks_per_pixel"]))
    return PooledNull.simulate(radii, line_length, background_radius)


def _null_settings(radii: tuple[float, ...], line_length: int, background_radius: float | None) -> dict:
    """What a null table depends on (a table made otherwise is not used)."""
    return {"radii": np.asarray(radii, dtype=float), "line_length": np.asarray(line_length),
            "background_radius": np.asarray(np.nan if background_radius is None else background_radius),
            "null_maps": np.asarray(NULL_MAPS), "null_map_size": np.asarray(NULL_MAP_SIZE),
            "version": np.asarray(NULL_TABLE_VERSION)}


#: raise when the pooling or the simulation changes (with a new table: ``write_null_table()``)
NULL_TABLE_VERSION: int = 1


def write_null_table(path: str | Path = NULL_TABLE) -> Path:
    """Simulate the default windows' null and save it where :func:`pooled_null` reads it (for maintainers)."""
    radii = _check_radii(DEFAULT_RADII)
    null = PooledNull.simulate(radii, DEFAULT_LINE_LENGTH, DEFAULT_BACKGROUND_RADIUS)
    null.save(path, **_null_settings(radii, DEFAULT_LINE_LENGTH, DEFAULT_BACKGROUND_RADIUS))
    return Path(path)


def _spatial_correlation(z: np.ndarray, valid: np.ndarray, reach: int) -> np.ndarray:
    """Autocorrelation of clipped normal scores at offsets up to ``reach`` pixels, (2 reach + 1) square.

    Correlations within 3 standard errors of 0 (``3 / sqrt(pixels)``), and negative ones, become 0, so
    that a map of independent pixels keeps the plain Stouffer statistic.
    """
    clipped = np.where(valid, np.clip(z, -3.0, 3.0), 0.0)
    n = max(int(valid.sum()), 1)
    clipped = np.where(valid, clipped - clipped.sum() / n, 0.0)
    shape = [2 * size for size in z.shape]
    spectrum = np.fft.rfft2(clipped, shape)
    mask_spectrum = np.fft.rfft2(valid.astype(float), shape)
    products = np.fft.irfft2(spectrum * np.conj(spectrum), shape)
    pairs = np.fft.irfft2(mask_spectrum * np.conj(mask_spectrum), shape)
    offsets = np.arange(-reach, reach + 1)
    window = np.ix_(offsets % shape[0], offsets % shape[1])
    with np.errstate(invalid="ignore", divide="ignore"):
        covariance = np.where(pairs[window] > 0.5, products[window] / np.maximum(pairs[window], 1.0), 0.0)
    correlation = covariance / max(covariance[reach, reach], 1e-12)
    correlation[correlation < 3.0 / np.sqrt(n)] = 0.0
    correlation[reach, reach] = 1.0
    return correlation


def _pair_sum(footprint: np.ndarray, correlation: np.ndarray) -> float:
    """Sum of the correlations over all ordered pairs of a window's pixels (the variance of its sum)."""
    weights = np.asarray(footprint, dtype=float)
    ys, xs = np.nonzero(weights)
    value = weights[ys, xs]
    # the full autocorrelation of the window: the product of every pair's weights at the pair's offset (a few
    # hundred pixels at most; scipy.signal's correlate2d cost a quarter-second import on a detector's first score)
    pairs = np.zeros((2 * weights.shape[0] - 1, 2 * weights.shape[1] - 1))
    offsets = (ys[:, None] - ys[None, :] + weights.shape[0] - 1, xs[:, None] - xs[None, :] + weights.shape[1] - 1)
    np.add.at(pairs, offsets, value[:, None] * value[None, :])
    pad = (correlation.shape[0] - pairs.shape[0]) // 2  # the correlation spans the largest window's offsets
    return float(np.sum(np.pad(pairs, pad) * correlation))


def _local_median(z: np.ndarray, valid: np.ndarray, inner: float, outer: float) -> np.ndarray:
    """Median of z over an annulus around each pixel (mirrored at the image's edges).

    Pixels that take no part (vacuum) count as z = 0, the null's median: they pull the correction
    towards none rather than towards a neighbour's evidence.
    """
    from scipy import ndimage

    return ndimage.median_filter(np.where(valid, z, 0.0), footprint=ring(inner, outer), mode="mirror")


def fdr_flags(pvalues: np.ndarray | xr.DataArray, level: float = 0.05) -> tuple[np.ndarray, float]:
    """Benjamini-Hochberg: flag the p-values at or below the largest ``p_(k) <= k level / m``.

    Parameters
    ----------
    pvalues
        p-values of any shape; NaN (e.g. vacuum) takes no part and is never flagged.
    level
        The false-discovery rate, in (0, 1).

    Returns
    -------
    flags : ndarray of bool
        The shape of ``pvalues``.
    cut : float
        The p-value at and below which pixels are flagged (0 when none is).

    Examples
    --------
    >>> flags, cut = fdr_flags(np.array([1e-6, 0.004, 0.03, 0.5, 0.9]), 0.05)
    >>> flags.tolist(), cut                 # the 3rd smallest, 0.03, is <= 3 x 0.05 / 5
    ([True, True, True, False, False], 0.03)
    """
    from scipy import stats

    check_level(level, "fdr")
    values = np.asarray(pvalues, dtype=float)
    finite = np.isfinite(values)
    flags = np.zeros(values.shape, dtype=bool)
    if not finite.any():
        return flags, 0.0
    flags[finite] = stats.false_discovery_control(values[finite], method="bh") <= level
    return flags, float(values[flags].max()) if flags.any() else 0.0


#: pooled p-value that bounds a selected peak's region (the cluster-forming level of topological FDR)
REGION_LEVEL: float = 0.001


def spatial_flags(
    pvalues: np.ndarray | xr.DataArray,
    pooled: np.ndarray | xr.DataArray,
    level: float = 0.05,
    *,
    radius: float = 2.0,
    radii: Sequence[float] = DEFAULT_RADII,
    line_length: int = DEFAULT_LINE_LENGTH,
    background_radius: float | None = DEFAULT_BACKGROUND_RADIUS,
) -> tuple[np.ndarray, float]:
    """Flags at a false-discovery rate from per-pixel and pooled p-values, without bleeding into the bulk.

    Pooled evidence finds regions that no pixel alone would reveal, but neighbouring pooled p-values
    share most of their pixels: a pixel-wise rule on them counts one chance clump many times over and
    its false-discovery rate on a bulk-only map is far below its nominal level (measured 0.00-0.01 of
    bulk-only cubes flagged at 5 %). So regions are found by their *peaks* (topological FDR, Chumbley &
    Friston): the local maxima of the pooled map are tested against the heights of the peaks of
    simulated null maps (:func:`pooled_null`), the Benjamini-Hochberg rule selects peaks, and each
    selected peak's region is the connected pixels around it whose pooled p-value stays at or below
    :data:`REGION_LEVEL` (or the lowest selected peak's, if that is higher). Pixels that pass the rule on
    their own ``pvalues`` are flagged too (strong evidence); each rule runs at ``level / 2``, so that
    their union keeps the false-discovery rate. In a region whose evidence is the halo of such strong
    pixels (pooled again with them counted as bulk, none of its peaks is selected), those are its
    flags; elsewhere a region's pixel is kept when its own normal score ``z`` reaches half the
    mean ``z`` of the region's pixels within ``radius`` (the Bayes cut between "like its region" and
    "like the bulk" at even odds). Measured (``benchmarks/spatial.py``, session 11): a shifted blob at
    the image's edge with a few strong pixels had kept only those (the CVAE's neighbour context,
    recall 0.78-0.90 on blobs).

    Parameters
    ----------
    pvalues, pooled
        (y, x) per-pixel p-values and the pooled ones (:func:`pool_evidence`); NaN takes no part.
    level
        The false-discovery rate, in (0, 1).
    radius
        Pixels around a pixel whose evidence sets its region's mean.
    radii, line_length, background_radius
        The windows ``pooled`` was made with (:func:`pool_evidence`): they set the null of its peaks.

    Returns
    -------
    flags : ndarray of bool
    cut : float
        The pooled p-value at and below which pixels form regions (0 when no peak is selected).

    References
    ----------
    J. Chumbley, K. Worsley, G. Flandin, K. Friston, "Topological FDR for neuroimaging",
    *NeuroImage* 49, 3057 (2010).

    Examples
    --------
    >>> rng = np.random.default_rng(2)
    >>> p = rng.uniform(size=(40, 40))
    >>> yy, xx = np.mgrid[:40, :40]
    >>> blob = (yy - 12) ** 2 + (xx - 12) ** 2 <= 5
    >>> p[blob] = rng.uniform(0, 0.02, blob.sum())
    >>> flags, _ = spatial_flags(p, pool_evidence(p), 0.05)
    >>> bool((flags & blob).sum() >= blob.sum() - 3), bool((flags & ~blob).sum() <= 2)
    (True, True)
    """
    from scipy import ndimage, special

    values = np.asarray(pvalues, dtype=float)
    check_level(level, "fdr")
    # two rules, each at half the level: under the complete null their union flags as often as one rule at `level`
    strong, _ = fdr_flags(values, level / 2)
    evidence = normal_scores(np.asarray(pooled, dtype=float))
    peaks = local_maxima(evidence)
    null = pooled_null(_check_radii(radii), line_length, background_radius)
    selected, _ = fdr_flags(null.peak_pvalues(evidence[peaks]), level / 2)
    if not selected.any():
        return strong, 0.0
    lowest = float(evidence[peaks][selected].min())
    # each selected peak's region: the pixels around it whose pooled evidence stays above REGION_LEVEL
    floor = min(float(special.ndtri(1 - REGION_LEVEL)), lowest)
    above, _ = ndimage.label(np.isfinite(evidence) & (evidence >= floor), structure=np.ones((3, 3)))
    chosen = np.zeros(above.max() + 1, dtype=bool)
    chosen[above[peaks][selected]] = True
    chosen[0] = False
    regions = chosen[above]
    cut = float(special.ndtr(-floor))
    z = normal_scores(np.nan_to_num(values, nan=1.0))
    footprint = _disc(radius).astype(float)
    total = ndimage.correlate(np.where(regions, z, 0.0), footprint, mode="constant", cval=0.0)
    count = ndimage.correlate(regions.astype(float), footprint, mode="constant", cval=0.0)
    mean = np.where(count > 0, total / np.maximum(count, 1.0), np.inf)
    like_region = regions & (z >= mean / 2)
    # a region and the strong pixels within `radius` of it are one group (pooling reaches that far)
    grown = ndimage.binary_dilation(regions | strong, structure=_disc(radius))
    labels, n = ndimage.label(grown, structure=np.ones((3, 3)))
    has_strong = np.zeros(n + 1, dtype=bool)
    has_strong[np.unique(labels[strong])] = True
    has_strong[0] = False
    if (regions & has_strong[labels]).any():
        # a region that still holds a selected peak once its strong pixels count as bulk (p = 0.5) is more
        # than their halo: a blob with a few strong pixels keeps its weaker ones
        neutral = np.where(strong, 0.5, values)
        without = normal_scores(pool_evidence(neutral, radii, line_length=line_length,
                                              background_radius=background_radius))
        peaks_without = local_maxima(without)
        kept = peaks_without.copy()
        kept[peaks_without] = fdr_flags(null.peak_pvalues(without[peaks_without]), level / 2)[0]
        supported = np.zeros(n + 1, dtype=bool)
        supported[np.unique(labels[regions & kept])] = True
        supported[0] = False
        has_strong &= ~supported
    flags = np.where(has_strong[labels], strong, like_region) | strong
    return flags, cut


def check_level(level: float, name: str) -> float:
    """A rate in (0, 1), or a ValueError naming it."""
    try:
        value = float(level)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number in (0, 1), got {level!r}") from None
    if not 0 < value < 1:
        raise ValueError(f"{name} must lie in (0, 1), got {level!r}")
    return value
