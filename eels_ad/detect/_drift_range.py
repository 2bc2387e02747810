"""``context="auto"``: the smooth energy drift of a training cube, from a sample of its spectra."""

from __future__ import annotations

import numpy as np

from ..datacube import channel_index


def training_drift_range(sample: np.ndarray, sample_pixels: np.ndarray, energy: np.ndarray,
                          shape: tuple[int, int], channels: np.ndarray | None = None) -> float:
    """Span (eV, 2nd to 98th percentile) of the smooth energy drift of a cube, from a sample of its spectra.

    Each sampled spectrum's edge shift against the sample's mean spectrum scaled to its counts
    (:func:`~eels_ad.detect.edge_shift`, one Gauss-Newton step: enough to tell 0.25 eV) is placed at its
    pixel, and the smooth drift is separated from local shifts as :func:`~eels_ad.quantify.separate_drift` does
    (a robust fit: local chemical shifts get weight 0). Fewer than 50 spectra, or a flat mean spectrum: 0.

    Parameters
    ----------
    sample
        (n, energy) counts of the sampled spectra.
    sample_pixels
        Their flat pixel indices in the (y, x) image of ``shape``.
    energy
        The energy axis (eV) of the spectra's channels.
    channels
        Bool mask of the channels to compare (default all).
    """
    from ..quantify._drift import smooth_drift

    pixels = np.asarray(sample_pixels)
    if channels is not None:
        sample, energy = sample[:, channel_index(channels)], np.asarray(energy)[channels]
    spectra = np.asarray(sample)  # as held (PCA holds float32): products in its type, no float64 copy
    if not np.issubdtype(spectra.dtype, np.floating):
        spectra = spectra.astype(np.float64)
    if spectra.shape[0] < 50 or spectra.shape[1] < 3:
        return 0.0
    totals = spectra.sum(axis=1, dtype=np.float64)
    usable = totals > 0
    if not usable.all():
        spectra, pixels, totals = spectra[usable], pixels[usable], totals[usable]
    # the mean of the spectra / their totals, without a copy
    shape_mean = ((1.0 / totals).astype(spectra.dtype) @ spectra).astype(np.float64) / totals.size
    if not np.ptp(shape_mean) > 0:
        return 0.0
    # edge_shift's one Gauss-Newton step against the model totals x shape_mean, in closed form for that
    # rank-one model (one product with the spectra instead of a model and its gradient per spectrum)
    floor = np.maximum(shape_mean, 1e-12)
    slope = np.gradient(floor)
    information = totals * float(np.sum(slope * slope / floor))
    score = (spectra @ (slope / floor).astype(spectra.dtype)).astype(np.float64) - totals * float(np.sum(slope))
    shift, error = -score / information, 1.0 / np.sqrt(information)
    dispersion = float(np.abs(np.mean(np.diff(energy))))
    shift_map = np.full(shape[0] * shape[1], np.nan)
    error_map = np.full(shape[0] * shape[1], np.nan)
    shift_map[pixels], error_map[pixels] = shift * dispersion, error * dispersion
    try:
        drift = smooth_drift(shift_map.reshape(shape), error_map.reshape(shape)).ravel()[pixels]  # where sampled
    except (ValueError, np.linalg.LinAlgError):
        return 0.0
    low, high = np.nanpercentile(drift, [2, 98])
    return float(high - low)
