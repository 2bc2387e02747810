"""Detector gain: how many recorded counts one electron makes, from the variance-to-mean relation of the data."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import xarray as xr

from ..datacube import is_lazy, read_rows, row_blocks, validate

# the median of a chi-squared variable with one degree of freedom
_CHI2_1_MEDIAN = 0.454936423119572
# an estimated gain this close to 1 is taken as 1: the counts are electron counts already
_UNIT_GAIN_RANGE = (0.8, 1.25)
#: chunks of rows, spread over the image, that estimate the gain of a lazy cube
GAIN_SAMPLE_CHUNKS = 4


@dataclass(frozen=True)
class GainEstimate:
    """The outcome of :func:`estimate_gain`.

    Attributes
    ----------
    gain : float
        Recorded counts per electron (the variance-to-mean ratio of the counts).
    n_samples : int
        Voxel pairs that entered the estimate.
    channels_per_bin : int
        Channels summed before pairing (summing Poisson counts keeps the gain, and lifts low doses).
    """

    gain: float
    n_samples: int
    channels_per_bin: int


def estimate_gain(cube: xr.DataArray, *, min_counts: float = 20.0) -> GainEstimate:
    """Counts per electron, from the spread of the differences between neighbouring pixels.

    For two neighbouring pixels ``a`` and ``b`` (right and lower neighbours), ``b`` is scaled by the
    ratio ``s`` of their total counts (thickness), and ``(a - s b)**2 / (a + s**2 b)`` is, channel by
    channel, ``gain`` times a chi-squared variable with one degree of freedom when both record
    ``gain`` times Poisson counts of the same spectral shape. The median of these ratios over all
    pairs and channels, divided by the median of chi-squared(1), estimates the gain; the median keeps
    edges of particles, vacuum borders and spikes from pulling it up. Channels are summed in bins
    until the typical bin holds ``min_counts`` (a sum of Poisson counts is Poisson: the gain stays).

    Pixels of different spectra (a chemical change between neighbours) and read-out noise make the
    estimate a little too high; spectra correlated across pixels (none in a scanned SI) would make it
    too low.

    A lazy cube is sampled: :data:`GAIN_SAMPLE_CHUNKS` chunks of rows spread evenly over the image,
    each read once, their pairs pooled (pairs across the gaps between chunks are not formed).

    Parameters
    ----------
    cube
        The spectrum image (at least 2 pixels).
    min_counts
        Typical counts per (binned) voxel to aim for.

    Returns
    -------
    GainEstimate

    Examples
    --------
    >>> import eels_ad
    >>> counts = eels_ad.simulate_fe_l23((16, 16), anomaly_fraction=0.0, seed=0)["counts"]
    >>> round(estimate_gain(counts * 30).gain / 30, 1)
    1.0
    """
    cube = validate(cube, negative="clip")
    ny, nx, n_channels = cube.shape
    if ny * nx < 2:
        raise ValueError(f"estimating the gain needs at least 2 pixels, the cube has {ny} x {nx}")
    if is_lazy(cube):
        blocks = list(row_blocks(cube, 1))  # the cube's own chunks of rows
        chosen = np.unique(np.linspace(0, len(blocks) - 1, min(GAIN_SAMPLE_CHUNKS, len(blocks))).round().astype(int))
        parts = [read_rows(cube, blocks[i], np.float64) for i in chosen]
    else:
        parts = [np.asarray(cube.values, dtype=np.float64)]
    first = _pair_estimate(parts, 1)
    # how many channels to sum so that a bin holds ~min_counts electrons (a first estimate says how many that is)
    electrons = float(np.median(np.concatenate([part.ravel() for part in parts]))) / max(first.gain, 1e-12)
    channels_per_bin = int(np.clip(np.ceil(min_counts / max(electrons, 1e-9)), 1, max(n_channels // 4, 1)))
    return first if channels_per_bin == 1 else _pair_estimate(parts, channels_per_bin)


def _pair_ratios(values: np.ndarray, channels_per_bin: int) -> list[np.ndarray]:
    """The ratios of every pair of neighbouring pixels (right and lower) of one block of rows."""
    ny, nx, n_channels = values.shape
    usable = n_channels // channels_per_bin * channels_per_bin
    binned = values[..., :usable].reshape(ny, nx, -1, channels_per_bin).sum(-1)
    totals = binned.sum(-1)
    ratios = []
    for a, b, ta, tb in ((binned[:, :-1], binned[:, 1:], totals[:, :-1], totals[:, 1:]),
                         (binned[:-1], binned[1:], totals[:-1], totals[1:])):
        good = (ta > 0) & (tb > 0)
        if not good.any():
            continue
        a, b = a[good], b[good]
        s = (ta[good] / tb[good])[:, None]
        denominator = a + s * s * b
        keep = denominator > 0
        ratios.append(((a - s * b) ** 2)[keep] / denominator[keep])
    return ratios


def _pair_estimate(parts: list[np.ndarray], channels_per_bin: int) -> GainEstimate:
    ratios = [ratio for part in parts for ratio in _pair_ratios(part, channels_per_bin)]
    samples = np.concatenate(ratios) if ratios else np.zeros(0)
    if samples.size < 10:
        raise ValueError(f"too few counts to estimate the gain ({samples.size} usable voxel pairs); "
                         "pass gain= (--gain on the command line)")
    return GainEstimate(float(np.median(samples) / _CHI2_1_MEDIAN), int(samples.size), channels_per_bin)


def resolve_gain(cube: xr.DataArray, gain: float | str) -> tuple[float, str]:
    """The gain to use and where it came from: a number given, or ``"auto"`` (estimated; 1 when close to 1)."""
    if isinstance(gain, str):
        if gain != "auto":
            raise ValueError(f"gain must be a number > 0 or 'auto', got {gain!r}")
        estimate = estimate_gain(cube).gain
        low, high = _UNIT_GAIN_RANGE
        if low <= estimate <= high:
            return 1.0, f"estimated {estimate:.3g} (taken as 1: electron counts)"
        return estimate, f"estimated {estimate:.4g} from neighbouring-pixel differences"
    gain = float(gain)
    if not (np.isfinite(gain) and gain > 0):
        raise ValueError(f"gain must be a number > 0 (counts per electron) or 'auto', got {gain}")
    return gain, "given"
