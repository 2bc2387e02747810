"""Per-spectrum anomaly scores of spectra against their bulk-model reconstructions.

Each function takes ``counts`` and ``model`` of shape (pixels, channels) and returns one score per
pixel, higher = more anomalous. Scores are means over channels, so they do not depend on how many
pixels a cube has, nor (to first order) on the width of the energy window.
"""

from __future__ import annotations

import functools

import numpy as np

from . import _score_kernels

SCORES: tuple[str, ...] = ("deviance", "residual", "correlation", "shift", "shift+deviance")

_FLOOR = 1e-3


def poisson_deviance(counts: np.ndarray, model: np.ndarray) -> np.ndarray:
    """Mean Poisson deviance per channel, ``2 [y log(y / mu) - (y - mu)]``, with ``mu`` floored at 1e-3."""
    mu = np.maximum(model, _FLOOR)
    y = np.maximum(counts, 0.0)
    # in place: three arrays of the spectra's size at most (scores stream over chunks of big cubes)
    term = np.divide(y, mu)
    np.maximum(term, 1e-300, out=term)  # y = 0: log stays finite and the product below is 0
    np.log(term, out=term)
    term *= y  # y log(y / mu), 0 where y = 0
    term -= y
    term += mu
    return 2.0 * np.mean(term, axis=-1)


def pearson_residual(counts: np.ndarray, model: np.ndarray) -> np.ndarray:
    """Root-mean-square Pearson residual ``(y - mu) / sqrt(mu)`` (a Poisson-weighted residual norm)."""
    mu = np.maximum(model, _FLOOR)
    return np.sqrt(np.mean((counts - mu) ** 2 / mu, axis=-1))


def one_minus_correlation(counts: np.ndarray, model: np.ndarray) -> np.ndarray:
    """``1 - r``, r the Pearson correlation of a spectrum with its reconstruction (Sultanov et al.)."""
    y = counts - counts.mean(axis=-1, keepdims=True)
    m = model - model.mean(axis=-1, keepdims=True)
    denominator = np.sqrt(np.sum(y * y, axis=-1) * np.sum(m * m, axis=-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = np.where(denominator > 0, np.sum(y * m, axis=-1) / denominator, 0.0)
    return 1.0 - r


def edge_shift_z(counts: np.ndarray, model: np.ndarray) -> np.ndarray:
    """``|z|`` of the Poisson score test for an energy shift of the model spectrum: a chemical-shift score.

    A spectrum shifted by ``delta`` channels has, to first order, the mean ``mu - delta * mu'`` (``mu'``
    the derivative of the model along the channels). The efficient score for ``delta`` at 0 is
    ``U = -sum((y - mu) mu' / mu)`` with Fisher information ``I = sum(mu'**2 / mu)``; under the model
    ``z = U / sqrt(I)`` is close to standard normal whatever the dose, and ``U / I`` estimates the shift
    in channels. Unlike the deviance, which spreads its attention over every channel, it looks only
    along the one direction a shifted edge moves the counts, so it finds small shifts at low dose
    (measured in ``benchmarks/cvae.py --scoring shift``; figures in ``benchmarks/README.md``). It is a
    local (first-order) test: once the shift is comparable to the white lines' width the edges no
    longer overlap and it can miss large shifts at low dose, and it is blind to changes that do not
    move the edge (an L3/L2 ratio at a fixed position). Use the deviance for those.
    """
    shift, error = edge_shift(counts, model)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(np.isfinite(error), np.abs(shift) / error, 0.0)


def edge_shift(counts: np.ndarray, model: np.ndarray, *, iterations: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Energy shift of each spectrum against its model, in channels, and its standard error.

    One Gauss-Newton step of the Poisson likelihood of ``mu(E - delta)`` from ``delta = 0``:
    ``delta = -sum((y - mu) mu' / mu) / I``, ``I = sum(mu'**2 / mu)``, standard error ``1 / sqrt(I)``;
    positive = the spectrum sits at higher energy than its model. One step is accurate while the
    shift is small next to the width of the features (a fraction of a white line's width) and
    underestimates larger ones; with ``iterations > 1`` the model is moved by the estimate so far
    (linear interpolation between channels; never the counts) and the step repeated.
    :func:`edge_shift_z` is ``|delta| / error`` of one step.

    Returns
    -------
    shift, error : ndarray
        In channels (multiply by the dispersion for eV); ``error`` is inf where the model is flat.
    """
    base = np.maximum(np.asarray(model, dtype=float), _FLOOR)
    counts = np.asarray(counts, dtype=float)
    base, counts = np.broadcast_arrays(base, counts)
    n_channels = base.shape[-1]
    shift = np.zeros(base.shape[:-1])
    for _ in range(max(int(iterations), 1)):
        mu = base if not shift.any() else _moved(base, shift)
        slope = np.gradient(mu, axis=-1) if n_channels > 1 else np.zeros_like(mu)
        information = np.sum(slope * slope / mu, axis=-1)
        score = np.sum((counts - mu) * slope / mu, axis=-1)
        with np.errstate(invalid="ignore", divide="ignore"):
            step = np.where(information > 0, -score / information, 0.0)
        shift = np.clip(shift + step, -(n_channels - 1), n_channels - 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        error = np.where(information > 0, 1.0 / np.sqrt(information), np.inf)
    return shift, error


def _moved(model: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """``model(E - shift)`` channel by channel, by linear interpolation (the edges held)."""
    n_channels = model.shape[-1]
    position = np.clip(np.arange(n_channels) - shift[..., None], 0, n_channels - 1)
    low = np.floor(position).astype(int)
    high = np.minimum(low + 1, n_channels - 1)
    weight = position - low
    return (np.take_along_axis(model, low, axis=-1) * (1 - weight)
            + np.take_along_axis(model, high, axis=-1) * weight)


def deviance_z(counts: np.ndarray, model: np.ndarray) -> np.ndarray:
    """The summed Poisson deviance of each spectrum, standardised by its exact mean and variance under the model.

    ``z = (sum_k d_k - sum_k m(mu_k)) / sqrt(sum_k v(mu_k))``, ``d_k = 2 [y log(y / mu) - (y - mu)]``, with ``m`` and
    ``v`` the mean and variance of one channel's deviance when ``y ~ Poisson(mu)`` (summed over the counts, not the
    large-count limits 1 and 2, which are wrong by tens of per cent below ~5 counts): close to standard normal under
    the model at any dose, whatever the channels' counts. Big blocks: one fused pass per spectrum
    (``_score_kernels``, equal to rounding).
    """
    if _score_kernels.worth_it(counts, model):
        return _score_kernels.fused_scores(counts, model, _FLOOR, _deviance_table(), with_shift=False)
    return _in_pieces(_deviance_z, counts, model)


def shift_or_deviance(counts: np.ndarray, model: np.ndarray) -> np.ndarray:
    """The larger of :func:`edge_shift_z` and :func:`deviance_z`: both on the scale of a standard normal under
    the model, so that a chemical shift is found with the shift test's power and a change that does not move the
    edge (an L3/L2 ratio, a new peak) with the deviance's. The null's tail is calibrated like any score's. One fused
    pass per spectrum for big blocks (``_score_kernels``)."""
    if _score_kernels.worth_it(counts, model):
        return _score_kernels.fused_scores(counts, model, _FLOOR, _deviance_table(), with_shift=True)
    return _in_pieces(lambda c, m: np.maximum(edge_shift_z(c, m), _deviance_z(c, m)), counts, model)


#: spectra per piece in the scores that hold several temporaries of the spectra's size
_PIECE = 64


def _in_pieces(func, counts: np.ndarray, model: np.ndarray) -> np.ndarray:
    """``func`` of (counts, model) a piece of :data:`_PIECE` spectra at a time: its temporaries stay small next to
    the work block being scored."""
    counts, model = np.broadcast_arrays(np.asarray(counts, dtype=float), np.asarray(model, dtype=float))
    flat_counts = counts.reshape(-1, counts.shape[-1])
    flat_model = model.reshape(-1, model.shape[-1])
    out = np.empty(flat_counts.shape[0])
    for start in range(0, out.size, _PIECE):
        piece = slice(start, start + _PIECE)
        out[piece] = func(flat_counts[piece], flat_model[piece])
    return out.reshape(counts.shape[:-1])


def _deviance_z(counts: np.ndarray, model: np.ndarray) -> np.ndarray:
    mu = np.maximum(model, _FLOOR)
    total = poisson_deviance(counts, mu) * mu.shape[-1]
    mean, variance = _deviance_moments(mu)
    return (total - mean.sum(axis=-1)) / np.sqrt(np.maximum(variance.sum(axis=-1), 1e-12))


@functools.lru_cache(maxsize=1)
def _deviance_table() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """log(mu) grid and the mean and variance of one Poisson count's deviance at each mu (1e-3 to 1e4)."""
    from scipy import stats

    log_mu = np.linspace(np.log(_FLOOR), np.log(1e4), 400)
    means, variances = [], []
    for mu in np.exp(log_mu):
        y = np.arange(0, int(mu + 12 * np.sqrt(mu) + 30))
        weight = stats.poisson.pmf(y, mu)
        with np.errstate(divide="ignore", invalid="ignore"):
            d = 2.0 * (np.where(y > 0, y * np.log(y / mu), 0.0) - (y - mu))
        mean = float(weight @ d)
        means.append(mean)
        variances.append(float(weight @ (d - mean) ** 2))
    return log_mu, np.asarray(means), np.asarray(variances)


def _deviance_moments(mu: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and variance of a Poisson count's deviance at each ``mu`` (interpolated in log mu; the large-count
    expansion 1 + 1/(6 mu), 2 + ... beyond the table)."""
    log_mu, means, variances = _deviance_table()
    x = np.log(mu)
    mean = np.interp(x, log_mu, means, right=np.nan)
    variance = np.interp(x, log_mu, variances, right=np.nan)
    beyond = ~np.isfinite(mean)
    if beyond.any():
        mean[beyond] = 1.0 + 1.0 / (6.0 * mu[beyond])
        variance[beyond] = 2.0 + 2.0 / mu[beyond]
    return mean, variance


#: the null family of each score's tail, where theory gives one (:func:`~eels_ad.detect.spatial.pixel_pvalues`):
#: the shift score is ``|z|`` of a normal score test; a mean deviance over channels is a scaled chi-square
SCORE_TAIL_FAMILY: dict[str, str] = {"shift": "half-normal", "deviance": "gamma"}

SCORE_FUNCTIONS = {
    "deviance": poisson_deviance,
    "residual": pearson_residual,
    "correlation": one_minus_correlation,
    "shift": edge_shift_z,
    "shift+deviance": shift_or_deviance,
}


def score_spectra(counts: np.ndarray, model: np.ndarray, score: str) -> np.ndarray:
    """Dispatch to the score named ``score`` (``"deviance"``, ``"residual"``, ``"correlation"``, ``"shift"`` or
    ``"shift+deviance"``)."""
    try:
        function = SCORE_FUNCTIONS[score]
    except KeyError:
        raise ValueError(f"score must be one of {SCORES}, got {score!r}") from None
    return function(np.asarray(counts, dtype=float), np.asarray(model, dtype=float))
