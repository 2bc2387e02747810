"""L3/L2 white-line ratio maps with Poisson error bars (the two-step continuum of Pearson et al.)."""

from __future__ import annotations

import numpy as np
import xarray as xr

from ..datacube import map_rows
from . import _common as common


def white_line_ratio_map(
    cube: xr.DataArray,
    *,
    l3_range: tuple[float, float] | None = None,
    l2_range: tuple[float, float] | None = None,
    background_range: tuple[float, float] | None = None,
    continuum_range: tuple[float, float] | None = None,
    half_width: float = 4.0,
    chunk_pixels: int = 65536,
) -> xr.Dataset:
    """Map the L3/L2 white-line intensity ratio, with its 1-sigma error from Poisson statistics.

    In every pixel: a power-law background (amplitude and exponent free, fitted linearly over
    ``background_range``) is taken off; the continuum under the white lines is the two-step model
    of Pearson et al. (1993): steps at the L3 and L2 maxima of the bulk spectrum, of heights 2/3 and
    1/3 of the continuum level measured over ``continuum_range`` (the statistical 2:1 weights of the
    2p3/2 and 2p1/2 levels); the white-line intensities are what is left in the L3 and L2 windows.
    Each intensity is then a fixed linear combination of the counts, so its variance is exact under
    Poisson noise (the sum of the squared weights times the counts), and the ratio's error follows
    by the delta method with the covariance of the two. (A linearised power law, rather than
    HyperSpy's iterative fit, is what makes the propagation exact.)

    Parameters
    ----------
    cube
        The spectrum image (y, x, energy) in electrons (see :func:`eels_ad.prepare.prepare`).
    l3_range, l2_range
        The white-line windows (eV). Default: ``half_width`` either side of the L3 and L2 maxima of
        the bulk spectrum (the L2 maximum: the highest beyond L3 + 5 eV).
    background_range
        The pre-edge window for the power law (eV). Default: from the axis start to 5 eV before L3.
    continuum_range
        The window beyond L2 that sets the continuum level (eV). Default: L2 + 6 to L2 + 16 eV, cut
        at the axis end (at least 2 eV are needed).
    half_width
        Half-width of the default windows (eV).
    chunk_pixels
        Pixels per batch (a lazy cube is read one batch at a time).

    Returns
    -------
    xarray.Dataset
        Over (y, x): ``l3_l2_ratio`` and ``l3_l2_ratio_error``, ``l3_intensity``, ``l2_intensity``
        and their errors (electrons), ``continuum`` (the level behind the steps, per channel).
        ``attrs`` record every window and the L3 / L2 energies used.

    References
    ----------
    Pearson, D. H., Ahn, C. C., Fultz, B. (1993). White lines and d-electron occupancies for the 3d
    and 4d transition metals. *Phys. Rev. B* 47, 8471.

    Examples
    --------
    >>> import eels_ad
    >>> sim = eels_ad.simulate_fe_l23((8, 8), anomaly_l3_l2_ratio=6.0, anomaly_fraction=0.25, seed=0)
    >>> ratio = white_line_ratio_map(sim["counts"])
    >>> bool(ratio.l3_l2_ratio.where(sim.anomaly).mean() > ratio.l3_l2_ratio.where(~sim.anomaly).mean())
    True
    """
    cube = common.check_cube(cube)
    energy = np.asarray(cube["energy"].values, dtype=float)
    bulk = common.robust_mean_spectrum(cube)
    windows = _windows(bulk, energy, l3_range, l2_range, background_range, continuum_range, half_width)
    l3_window, l2_window, background_window, continuum_window, l3_peak, l2_peak = windows
    weights = _intensity_weights(energy, bulk, windows)  # (2, c): L3 and L2 intensity per count

    n_pixels = cube.sizes["y"] * cube.sizes["x"]
    intensity = np.empty((n_pixels, 2))
    variance = np.empty((n_pixels, 3))  # var L3, var L2, cov
    continuum = np.empty(n_pixels)
    level_weights = _continuum_weights(energy, bulk, windows)
    nx = cube.sizes["x"]
    # every output is a fixed linear map of the counts: one matrix product per block
    linear = np.concatenate([weights, np.stack([weights[0] ** 2, weights[1] ** 2, weights[0] * weights[1]]),
                             level_weights[None]]).T
    # a lazy cube: a chunk of rows at a time, two held; over the cluster where a client is current
    for rows, sums in map_rows(cube, lambda rows, counts, _: counts @ linear, work_pixels=chunk_pixels):
        flat = slice(rows.start * nx, rows.stop * nx)
        intensity[flat], variance[flat], continuum[flat] = sums[:, :2], sums[:, 2:5], sums[:, 5]
    i3, i2 = intensity.T
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(i2 > 0, i3 / i2, np.nan)
        relative = variance[:, 0] / i3 ** 2 + variance[:, 1] / i2 ** 2 - 2 * variance[:, 2] / (i3 * i2)
        ratio_error = np.abs(ratio) * np.sqrt(np.maximum(relative, 0.0))
    ratio_error = np.where(np.isfinite(ratio), ratio_error, np.nan)
    data_vars = {
        "l3_l2_ratio": common.spatial_like(cube, ratio, long_name="L3/L2 white-line ratio"),
        "l3_l2_ratio_error": common.spatial_like(cube, ratio_error, long_name="L3/L2 ratio error (1 sigma)"),
        "l3_intensity": common.spatial_like(cube, i3, units="electrons", long_name="L3 white-line intensity"),
        "l3_intensity_error": common.spatial_like(cube, np.sqrt(np.maximum(variance[:, 0], 0)), units="electrons",
                                                  long_name="L3 intensity error (1 sigma)"),
        "l2_intensity": common.spatial_like(cube, i2, units="electrons", long_name="L2 white-line intensity"),
        "l2_intensity_error": common.spatial_like(cube, np.sqrt(np.maximum(variance[:, 1], 0)), units="electrons",
                                                  long_name="L2 intensity error (1 sigma)"),
        "continuum": common.spatial_like(cube, continuum, units="electrons per channel",
                                         long_name="continuum level behind the steps"),
    }
    attrs = {
        "method": "power-law background (linearised, free amplitude and exponent), two-step continuum "
                  "(Pearson et al. 1993: 2/3 at L3, 1/3 at L2), Poisson error propagation",
        "l3_range_eV": list(l3_window), "l2_range_eV": list(l2_window),
        "background_range_eV": list(background_window), "continuum_range_eV": list(continuum_window),
        "l3_eV": float(l3_peak), "l2_eV": float(l2_peak),
    }
    return xr.Dataset(data_vars, coords=common.map_coords(cube), attrs=attrs)


def _windows(bulk, energy, l3_range, l2_range, background_range, continuum_range, half_width):
    if background_range is None:
        # a first look for L3: the largest excess over a power law through the axis' first fifth
        first = (float(energy[0]), float(energy[0] + (energy[-1] - energy[0]) / 5))
        amplitude, exponent = common.power_law(bulk, energy, first)
        excess = bulk - amplitude * (energy / first[0]) ** -exponent
        rough = float(energy[np.argmax(excess)]) if l3_range is None else float(l3_range[0])
        background_range = (float(energy[0]), rough - 5.0)
    background_range = common.check_range(background_range, energy, "background_range")
    amplitude, exponent = common.power_law(bulk, energy, background_range)
    edge = bulk - amplitude * (energy / background_range[0]) ** -exponent
    if l3_range is None:
        beyond = energy > background_range[1]
        l3_peak = float(energy[beyond][np.argmax(edge[beyond])])
        l3_range = (l3_peak - half_width, l3_peak + half_width)
    l3_range = common.check_range(l3_range, energy, "l3_range")
    l3_peak = _peak(edge, energy, l3_range)
    if l2_range is None:
        beyond = energy > l3_peak + 5.0
        if beyond.sum() < 3:
            raise ValueError(f"no L2 line beyond L3 ({l3_peak:g} eV) + 5 eV on this axis: give l2_range")
        l2_peak = float(energy[beyond][np.argmax(edge[beyond])])
        if l2_peak >= energy[-1] - half_width:
            raise ValueError(f"the highest point beyond L3 + 5 eV sits at the axis end ({l2_peak:g} eV), not an L2 "
                             "line: give l2_range")
        l2_range = (l2_peak - half_width, l2_peak + half_width)
    l2_range = common.check_range(l2_range, energy, "l2_range")
    l2_peak = _peak(edge, energy, l2_range)
    if continuum_range is None:
        continuum_range = (l2_peak + 6.0, min(l2_peak + 16.0, float(energy[-1])))
        if continuum_range[1] - continuum_range[0] < 2.0:
            raise ValueError(f"the axis ends at {energy[-1]:g} eV, too close behind L2 ({l2_peak:g} eV) for the "
                             "continuum level: give continuum_range")
    continuum_range = common.check_range(continuum_range, energy, "continuum_range")
    if not background_range[1] <= l3_range[0] < l3_range[1] <= l2_range[0] < l2_range[1]:
        raise ValueError(f"the windows must follow in order background {background_range}, L3 {l3_range}, "
                         f"L2 {l2_range} eV, without overlapping")
    return l3_range, l2_range, background_range, continuum_range, l3_peak, l2_peak


def _peak(edge, energy, window):
    inside = (energy >= window[0]) & (energy <= window[1])
    return float(energy[inside][np.argmax(edge[inside])])


def _background_operator(energy, bulk, background_window):
    """(c, c) linear map from counts to the fitted background at every channel."""
    inside = (energy >= background_window[0]) & (energy <= background_window[1])
    basis = common.background_basis(energy, common.power_law(bulk, energy, background_window)[1],
                                    background_window[0])  # (2, c)
    weight = 1.0 / np.maximum(bulk[inside], 1e-9)
    normal = (basis[:, inside] * weight) @ basis[:, inside].T
    fit = np.linalg.solve(normal, basis[:, inside] * weight)  # (2, n_inside): coefficients per count
    operator = np.zeros((energy.size, energy.size))
    operator[:, inside] = basis.T @ fit
    return operator


def _continuum_weights(energy, bulk, windows):
    """(c,) the continuum level (mean of counts - background over the continuum window) per count."""
    _, _, background_window, continuum_window, _, _ = windows
    operator = _background_operator(energy, bulk, background_window)
    inside = (energy >= continuum_window[0]) & (energy <= continuum_window[1])
    residual = np.eye(energy.size) - operator  # counts - background, per count
    return residual[inside].mean(axis=0)


def _intensity_weights(energy, bulk, windows):
    """(2, c): the L3 and L2 intensities as linear combinations of the counts."""
    l3_window, l2_window, background_window, _, l3_peak, l2_peak = windows
    operator = _background_operator(energy, bulk, background_window)
    residual = np.eye(energy.size) - operator
    level = _continuum_weights(energy, bulk, windows)
    step = np.where(energy >= l2_peak, 1.0, np.where(energy >= l3_peak, 2.0 / 3.0, 0.0))
    out = []
    for window in (l3_window, l2_window):
        inside = (energy >= window[0]) & (energy <= window[1])
        out.append(residual[inside].sum(axis=0) - step[inside].sum() * level)
    return np.stack(out)
