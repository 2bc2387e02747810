"""Thresholds that turn a score map into labels, and how bimodal a score distribution is.

All functions take scores (any shape, NaN ignored) and return plain floats. Scores are
right-skewed (deviances, residual norms); the data-driven methods can work on ``log(score)``
(``log_scale=True``), which on simulated Fe L2,3 cubes did no better than the linear scores.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import xarray as xr

ThresholdMethod = Literal["fdr", "auto", "otsu", "gmm", "fpr"]
#: the rules a detector's ``threshold`` can name; ``"fdr"`` is applied by ``flag`` on p-values, the others here
THRESHOLD_METHODS: tuple[str, ...] = ("fdr", "auto", "otsu", "gmm", "fpr")


def _finite(scores: np.ndarray | xr.DataArray) -> np.ndarray:
    values = np.asarray(scores, dtype=float).ravel()
    values = values[np.isfinite(values)]
    if values.size < 2:
        raise ValueError(f"need at least 2 finite scores to set a threshold, got {values.size}")
    return values


def _to_log(values: np.ndarray, log_scale: bool) -> tuple[np.ndarray, bool]:
    use_log = log_scale and bool(np.all(values > 0))
    return (np.log(values) if use_log else values), use_log


def otsu_threshold(scores: np.ndarray | xr.DataArray, *, log_scale: bool = False, bins: int = 256) -> float:
    """Otsu's threshold of the score histogram (scikit-image), in log space when all scores are > 0.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> scores = np.concatenate([rng.normal(1, 0.1, 900), rng.normal(3, 0.1, 100)])
    >>> 1.3 < otsu_threshold(scores, log_scale=False) < 2.7
    True
    """
    from skimage.filters import threshold_otsu

    values, used_log = _to_log(_finite(scores), log_scale)
    if np.ptp(values) == 0:
        return float(np.exp(values[0]) if used_log else values[0])
    threshold = float(threshold_otsu(values, nbins=bins))
    return float(np.exp(threshold)) if used_log else threshold


def _two_gaussians(values: np.ndarray, seed: int):
    from sklearn.mixture import GaussianMixture

    mixture = GaussianMixture(n_components=2, random_state=seed, n_init=3).fit(values[:, None])
    order = np.argsort(mixture.means_.ravel())
    means = mixture.means_.ravel()[order]
    sds = np.sqrt(mixture.covariances_.ravel()[order])
    weights = mixture.weights_[order]
    return mixture, means, sds, weights


def gmm_threshold(scores: np.ndarray | xr.DataArray, *, log_scale: bool = False, seed: int = 0) -> float:
    """Threshold where a two-component Gaussian mixture gives the upper component probability 1/2.

    This is the "bimodal separation" of the score histogram: bulk scores form the lower mode,
    anomalies the upper one.
    """
    values, used_log = _to_log(_finite(scores), log_scale)
    if np.ptp(values) == 0:
        return float(np.exp(values[0]) if used_log else values[0])
    mixture, means, _, _ = _two_gaussians(values, seed)
    upper = int(np.argmax(mixture.means_.ravel()))
    grid = np.linspace(means[0], means[1], 2001)
    posterior = mixture.predict_proba(grid[:, None])[:, upper]
    crossing = np.flatnonzero(posterior >= 0.5)
    threshold = float(grid[crossing[0]]) if crossing.size else float(means[1])
    return float(np.exp(threshold)) if used_log else threshold


def false_alarm_threshold(bulk_scores: np.ndarray | xr.DataArray, rate: float = 0.001, *,
                          outlier_mads: float | None = 5.0) -> float:
    """The ``1 - rate`` quantile of the scores of known-bulk spectra (a false-alarm rate).

    Parameters
    ----------
    bulk_scores
        Scores of spectra believed to be normal, e.g. the calibration spectra of a detector.
    rate
        Accepted fraction of false alarms among bulk spectra (0.001 = 0.1 %).
    outlier_mads
        Leave out scores more than this many (normal-consistent) median absolute deviations above
        the median first: a detector trained on the image itself keeps a few anomalous pixels among
        its calibration spectra, and with a few hundred of them one such pixel *is* the 0.999
        quantile. On clean bulk scores hardly anything is left out (5 MADs: a Gaussian tail of 3e-7).
        Needs at least 20 scores; with fewer every score is kept.
        None keeps every score.

    Examples
    --------
    >>> scores = np.r_[np.linspace(0.0, 1.0, 199), 50.0]   # one anomalous pixel among the bulk
    >>> false_alarm_threshold(scores), false_alarm_threshold(scores, outlier_mads=None)
    (1.0, 50.0)
    """
    if not 0.0 < rate < 1.0:
        raise ValueError(f"false-alarm rate must be in (0, 1), got {rate}")
    values = trim_high_outliers(_finite(bulk_scores), outlier_mads, min_kept=2)
    return float(np.quantile(values, 1.0 - rate, method="higher"))


def trim_high_outliers(values: np.ndarray, mads: float | None = 5.0, *, min_kept: int = 2) -> np.ndarray:
    """Bulk scores without those more than ``mads`` normal-consistent MADs above their median.

    Needs at least 20 scores (a median and a MAD of fewer say little) and keeps all of them when fewer
    than ``min_kept`` would remain; ``mads=None`` keeps every score.
    """
    if mads is None or values.size < 20:
        return values
    median = float(np.median(values))
    spread = 1.4826 * float(np.median(np.abs(values - median)))
    if spread <= 0:
        return values
    kept = values[values <= median + mads * spread]
    return kept if kept.size >= min_kept else values


def choose_threshold(
    scores: np.ndarray | xr.DataArray,
    method: ThresholdMethod | float = "otsu",
    *,
    bulk_scores: np.ndarray | xr.DataArray | None = None,
    false_alarm_rate: float = 0.001,
    log_scale: bool = False,
    seed: int = 0,
) -> float:
    """One entry to every threshold method.

    ``"auto"`` (the detectors' default) is the larger of the two-Gaussian crossing (``"gmm"``) and the
    false-alarm quantile of the bulk scores (``"fpr"``): a pixel is flagged only when it belongs to
    the upper mode of this image's scores *and* bulk spectra score that high less than
    ``false_alarm_rate`` of the time. GMM alone splits a unimodal (anomaly-free) histogram in two;
    ``fpr`` alone flags about ``false_alarm_rate`` of the bulk even when the modes are clean.

    Parameters
    ----------
    scores
        The scores to be labelled (used by ``"otsu"`` and ``"gmm"``).
    method
        ``"auto"`` (needs ``bulk_scores``), ``"otsu"``, ``"gmm"``, ``"fpr"`` (needs ``bulk_scores``) or a
        number (a fixed threshold).
    bulk_scores
        Scores of known-bulk spectra, for ``"fpr"``.
    false_alarm_rate
        For ``"fpr"``.
    log_scale, seed
        See :func:`otsu_threshold` and :func:`gmm_threshold`.
    """
    if isinstance(method, (int, float, np.number)) and not isinstance(method, bool):
        return float(method)
    if method == "auto":
        if bulk_scores is None:
            raise ValueError("threshold 'auto' needs the scores of bulk spectra (fit the detector first)")
        return max(gmm_threshold(scores, log_scale=log_scale, seed=seed),
                   false_alarm_threshold(bulk_scores, false_alarm_rate))
    if method == "otsu":
        return otsu_threshold(scores, log_scale=log_scale)
    if method == "gmm":
        return gmm_threshold(scores, log_scale=log_scale, seed=seed)
    if method == "fpr":
        if bulk_scores is None:
            raise ValueError("threshold 'fpr' needs the scores of bulk spectra (fit the detector first)")
        return false_alarm_threshold(bulk_scores, false_alarm_rate)
    if method == "fdr":
        raise ValueError("'fdr' flags on calibrated p-values, not at a score threshold: use a detector's flag(scores) "
                         "or eels_ad.detect.spatial.fdr_flags")
    raise ValueError(f"threshold must be 'auto', 'otsu', 'gmm', 'fpr' or a number, got {method!r}")


def bimodality(scores: np.ndarray | xr.DataArray, *, log_scale: bool = False, seed: int = 0) -> dict[str, float]:
    """How well a score distribution separates into two modes.

    Returns
    -------
    dict
        ``coefficient``: Sarle's bimodality coefficient (skew**2 + 1) / (kurtosis + 3(n-1)**2 /
        ((n-2)(n-3))); above 5/9 = 0.555 hints at two modes. ``ashman_d``: Ashman's D of a two-Gaussian
        fit, ``sqrt(2) |mu1 - mu2| / sqrt(s1**2 + s2**2)``; above 2 means cleanly separated modes.
        ``upper_weight``: the weight of the upper mode (about the anomalous fraction when separated).
    """
    from scipy import stats

    values, _ = _to_log(_finite(scores), log_scale)
    n = values.size
    skew = float(stats.skew(values))
    excess_kurtosis = float(stats.kurtosis(values))
    coefficient = float("nan")
    if n > 3:
        coefficient = (skew**2 + 1) / (excess_kurtosis + 3 * (n - 1) ** 2 / ((n - 2) * (n - 3)))
    if np.ptp(values) == 0:
        return {"coefficient": coefficient, "ashman_d": 0.0, "upper_weight": 0.0}
    _, means, sds, weights = _two_gaussians(values, seed)
    ashman_d = float(np.sqrt(2) * abs(means[1] - means[0]) / np.sqrt(sds[0] ** 2 + sds[1] ** 2))
    return {"coefficient": float(coefficient), "ashman_d": ashman_d, "upper_weight": float(weights[1])}
