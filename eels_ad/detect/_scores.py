"""Per-spectrum anomaly scores of spectra against their bulk-model reconstructions.

Each function takes ``counts`` and ``model`` of shape (pixels, channels) and returns one score per
pixel, higher = more anomalous. Scores are means over channels, so they do not depend on how many
pixels a cube has, nor (to first order) on the width of the energy window.
"""

from __future__ import annotations

import numpy as np

SCORES: tuple[str, ...] = ("deviance", "residual", "correlation", "shift")

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


#: the null family of each score's tail, where theory gives one (:func:`~eels_ad.detect.spatial.pixel_pvalues`):
#: the shift score is ``|z|`` of a normal score test; a mean deviance over channels is a scaled chi-square
SCORE_TAIL_FAMILY: dict[str, str] = {"shift": "half-normal", "deviance": "gamma"}

SCORE_FUNCTIONS = {
    "deviance": poisson_deviance,
    "residual": pearson_residual,
    "correlation": one_minus_correlation,
    "shift": edge_shift_z,
}


def score_spectra(counts: np.ndarray, model: np.ndarray, score: str) -> np.ndarray:
    """Dispatch to the score named ``score`` (``"deviance"``, ``"residual"``, ``"correlation"`` or ``"shift"``)."""
    try:
        function = SCORE_FUNCTIONS[score]
    except KeyError:
        raise ValueError(f"score must be one of {SCORES}, got {score!r}") from None
    return function(np.asarray(counts, dtype=float), np.asarray(model, dtype=float))
