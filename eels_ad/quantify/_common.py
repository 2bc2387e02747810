"""What the quantity maps share: checking the cube and the ranges, templates, backgrounds, chunks."""

from __future__ import annotations

import functools
import math
import operator
from collections.abc import Iterator

import numpy as np
import xarray as xr
from scipy.interpolate import CubicSpline

from ..datacube import fold_rows, map_rows, row_blocks, validate

#: pixels fitted at once (bounds the memory of one batch: pixels x parameters x channels; 1,024 against 4,096:
#: a 256 x 256 x 1024 shift map in 24.7 s against 26.7 s, peak 214 MiB against 458 MiB)
CHUNK_PIXELS = 1024


def check_cube(cube: xr.DataArray) -> xr.DataArray:
    """The datacube checks (dims, uniform energy axis, finite, negatives clipped) and at least 4 channels."""
    cube = validate(cube)
    if cube.sizes["energy"] < 4:
        raise ValueError(f"a quantity map needs at least 4 energy channels, the cube has {cube.sizes['energy']}")
    return cube


def check_range(energy_range: tuple[float, float], energy: np.ndarray, what: str) -> tuple[float, float]:
    """``energy_range`` as two floats inside ``energy``, or a clear error naming both."""
    try:
        low, high = (float(v) for v in energy_range)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be two energies (eV), got {energy_range!r}") from None
    if not (np.isfinite(low) and np.isfinite(high) and low < high):
        raise ValueError(f"{what} must be (low, high) with low < high, got ({low:g}, {high:g}) eV")
    d = float(energy[1] - energy[0])
    if low < energy[0] - d / 2 or high > energy[-1] + d / 2:
        raise ValueError(f"{what} ({low:g}, {high:g}) eV lies outside the cube's energy axis "
                         f"({energy[0]:g} - {energy[-1]:g} eV)")
    if np.count_nonzero((energy >= low) & (energy <= high)) < 4:
        raise ValueError(f"{what} ({low:g}, {high:g}) eV holds fewer than 4 channels")
    return low, high


def pixel_mask(cube: xr.DataArray) -> np.ndarray:
    """(y, x) True where a pixel may shape a template: not vacuum (coordinate ``vacuum``), with counts."""
    mask = np.ones((cube.sizes["y"], cube.sizes["x"]), dtype=bool)
    if "vacuum" in cube.coords:
        mask &= ~np.asarray(cube["vacuum"].values, dtype=bool)
    return mask


def robust_mean_spectrum(cube: xr.DataArray, *, mask: np.ndarray | None = None,
                         drift: np.ndarray | None = None, smooth: bool = True) -> np.ndarray:
    """The bulk spectrum: the mean over pixels of the spectra scaled to a common total, moved ones left out.

    Spectra are scaled to the mean total (thickness does not weigh), averaged, and every pixel whose
    edge sits more than 4 standard errors away from that mean (one Gauss-Newton step, as in
    :func:`eels_ad.detect.edge_shift`) is left out of a second average, so that a minority of
    shifted pixels does not pull the template (judged first against the median shift, then
    against the new mean). A plain mean, not a median or trimmed mean: those are biased for skewed
    (Poisson) counts, by an amount that changes along the edge. With ``drift`` (y, x, eV) each
    spectrum is first moved back by its drift (linear interpolation; the average of many spectra,
    so the interpolation noise averages out).

    With ``smooth`` the mean is then a cubic smoothing spline weighted by the mean's Poisson
    variance, as smooth as the noise allows (:class:`scipy.interpolate.UnivariateSpline` with a
    weighted residual equal to the number of channels): a shift is read from the template's slope,
    and the slope of a noisy mean is noisier still (it would make the Fisher information, and so the
    confidence in every shift, too high).
    """
    from scipy.interpolate import UnivariateSpline

    mask = pixel_mask(cube) if mask is None else mask
    energy = np.asarray(cube["energy"].values, dtype=float)
    cube = cube.transpose("y", "x", "energy")
    moves = np.zeros(mask.shape) if drift is None else np.asarray(drift, dtype=float) / (energy[1] - energy[0])
    wanted = mask.any(axis=1)
    # each pass is a fold over the cube's rows (split over the cluster where a client is current): what a block
    # needs of its pixels travels with it as row data: (chosen, move back, scale, selected)
    row_data = np.stack([mask.astype(float), moves, np.zeros(mask.shape), np.zeros(mask.shape)], axis=-1)

    def per_chosen(func) -> np.ndarray:
        """``func`` of each block's chosen spectra (drift moved back), concatenated in pixel order."""
        parts = map_rows(cube, functools.partial(_of_chosen, func), work_pixels=CHUNK_PIXELS, rows_wanted=wanted,
                         row_data=row_data)
        return np.concatenate([part for _, part in parts])

    totals = per_chosen(_totals)
    usable = totals > 0
    if not usable.any():
        raise ValueError("no pixel of the cube has counts: there is no bulk spectrum to use as a template")
    scale = np.where(usable, totals[usable].mean() / np.where(usable, totals, 1.0), 0.0)
    row_data[..., 2][mask] = scale

    def weighted_sums(selected: np.ndarray, power: int = 1) -> np.ndarray:
        """sum over the selected spectra of spectrum * scale**power (one pass)."""
        row_data[..., 3] = 0.0
        row_data[..., 3][mask] = selected
        return fold_rows(cube, functools.partial(_of_chosen, functools.partial(_weighted_sum, power=power)),
                         operator.add, work_pixels=CHUNK_PIXELS, rows_wanted=wanted, row_data=row_data)

    bulk = usable.copy()
    mean = weighted_sums(bulk) / bulk.sum()
    for centre in ("median", "zero") if usable.sum() >= 10 else ():
        # one Gauss-Newton step of each pixel's shift against the mean (detect.edge_shift, for a shared
        # shape): with mu = mean / scale, I = scale sum(m'^2 / m) and U = scale sum(y m' / m) - sum(m')
        slope = np.gradient(mean)
        with np.errstate(invalid="ignore", divide="ignore"):
            ratio = np.where(mean > 0, slope / mean, 0.0)
            projection = per_chosen(functools.partial(_projected, ratio=ratio))
            information = scale * np.sum(slope * ratio)
            shift = -(scale * projection - slope.sum()) / information
            z = np.where(usable, shift * np.sqrt(information), np.nan)
        # the first mean is pulled by the moved pixels: judge them against the median shift first
        offset = np.nanmedian(z) if centre == "median" else 0.0
        kept = usable & ~(np.abs(z - offset) > 4.0)
        if kept.sum() >= usable.sum() // 2:
            bulk = kept
            mean = weighted_sums(bulk) / bulk.sum()
    if smooth and energy.size >= 5:
        variance = weighted_sums(bulk, power=2) / bulk.sum() ** 2
        floor = 1e-12 * max(float(np.max(np.abs(mean))), 1e-300)
        # a smoothing spline whose weighted residual matches the noise (s = n, Reinsch's criterion)
        mean = UnivariateSpline(energy, mean, w=1.0 / np.sqrt(np.maximum(variance, floor)), s=energy.size)(energy)
    return mean


def _of_chosen(func, rows: slice, spectra: np.ndarray, data: np.ndarray):
    """``func(spectra, data)`` of a block's chosen pixels (row data: chosen, move back, scale, selected), their
    spectra moved back by their drift."""
    from ..detect._scores import _moved

    data = data.reshape(-1, data.shape[-1])
    chosen = data[:, 0] > 0
    spectra, data = spectra[chosen], data[chosen]
    if np.any(data[:, 1]):
        spectra = _moved(spectra, -data[:, 1])
    return func(spectra, data)


def _totals(spectra: np.ndarray, data: np.ndarray) -> np.ndarray:
    return spectra.sum(axis=-1)


def _projected(spectra: np.ndarray, data: np.ndarray, *, ratio: np.ndarray) -> np.ndarray:
    return spectra @ ratio


def _weighted_sum(spectra: np.ndarray, data: np.ndarray, *, power: int) -> np.ndarray:
    selected = data[:, 3] > 0
    return spectra[selected].T @ data[selected, 2] ** power


def power_law(spectrum: np.ndarray, energy: np.ndarray, background_range: tuple[float, float]) -> tuple[float, float]:
    """``(amplitude, exponent)`` of ``A (E / E0)**-r`` fitted to ``spectrum`` over ``background_range``.

    A straight line in log-log (what HyperSpy's power-law estimate does), on the positive channels;
    ``E0`` is the range's lower end.
    """
    low, high = background_range
    inside = (energy >= low) & (energy <= high) & (spectrum > 0)
    if inside.sum() < 2:
        raise ValueError(f"the background range ({low:g}, {high:g}) eV holds fewer than 2 channels with counts")
    slope, intercept = np.polyfit(np.log(energy[inside] / low), np.log(spectrum[inside]), 1)
    return float(np.exp(intercept)), float(-slope)


def background_basis(energy: np.ndarray, exponent: float, reference: float, terms: int = 2) -> np.ndarray:
    """(terms, c): ``P = (E / E0)**-r``, ``-P log(E / E0)``, ``P log(E / E0)**2 / 2`` ...: a power law whose
    amplitude and exponent are free per pixel (to order ``terms - 1`` in the exponent's change)."""
    ratio = np.asarray(energy, dtype=float) / reference
    law = ratio ** -exponent
    log = -np.log(ratio)
    return np.stack([law * log ** i / math.factorial(i) for i in range(terms)])


def template_on_grid(template: xr.DataArray, dispersion: float, anchor: float) -> tuple[float, np.ndarray]:
    """A 1-D template (coordinate ``energy``, eV) resampled by a cubic spline onto a grid of the cube's
    dispersion through the cube's channel ``anchor``; returns ``(grid_start, values)``."""
    if not isinstance(template, xr.DataArray) or template.ndim != 1 or "energy" not in template.coords:
        raise TypeError("a template must be a 1-D xarray.DataArray with an 'energy' coordinate (eV), a cube of "
                        "the same shape as the data, or None")
    energy = np.asarray(template["energy"].values, dtype=float)
    values = np.asarray(template.values, dtype=float)
    if energy.size < 4 or np.any(np.diff(energy) <= 0) or not np.all(np.isfinite(values)):
        raise ValueError("a template needs at least 4 finite values on a strictly increasing energy axis")
    first = anchor + dispersion * np.ceil((energy[0] - anchor) / dispersion - 1e-9)
    grid = np.arange(first, energy[-1] + 1e-9 * dispersion, dispersion)
    return float(grid[0]), CubicSpline(energy, values)(grid)


def spans(grid_start: float, n: int, dispersion: float) -> tuple[float, float]:
    return grid_start, grid_start + dispersion * (n - 1)


def check_coverage(grid: tuple[float, float], needed: tuple[float, float], what: str) -> None:
    if needed[0] < grid[0] - 1e-9 or needed[1] > grid[1] + 1e-9:
        raise ValueError(f"the {what} covers {grid[0]:g} - {grid[1]:g} eV but the fit needs {needed[0]:g} - "
                         f"{needed[1]:g} eV (the energy range widened by the largest shift and drift): "
                         "narrow energy_range, lower max_shift or give a template that covers it")


def row_chunks(cube: xr.DataArray, chunk_pixels: int = CHUNK_PIXELS) -> Iterator[slice]:
    """Row slices of about ``chunk_pixels`` pixels, whole chunks of a lazy cube (see ``datacube.row_blocks``)."""
    return row_blocks(cube, int(chunk_pixels))


def spatial_like(cube: xr.DataArray, values: np.ndarray, **attrs) -> tuple[tuple[str, str], np.ndarray, dict]:
    return (("y", "x"), np.asarray(values).reshape(cube.sizes["y"], cube.sizes["x"]), attrs)


def map_coords(cube: xr.DataArray) -> dict:
    """The cube's spatial coordinates (and masks such as ``vacuum``) for a (y, x) result."""
    return {name: coord for name, coord in cube.coords.items() if set(coord.dims) <= {"y", "x"}}
