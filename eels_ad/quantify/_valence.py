"""Valence maps: non-negative fractions of reference spectra by Poisson maximum likelihood."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

import numpy as np
import xarray as xr

from ..datacube import map_rows
from ..prepare._drift import drift_map as _drift_map
from . import _common as common
from ._fit import ShiftedTemplates, poisson_fit


def read_references(path: str | os.PathLike, *, average: bool = True) -> xr.DataArray:
    """Reference spectra from a CSV file: an energy column (eV) and one column per spectrum.

    Parameters
    ----------
    path
        The CSV file: a header row, the first column the energy (eV), the others spectra.
    average
        Average the columns that differ only by a trailing ``_N`` (``wustite_0 ... wustite_7`` become
        ``wustite``): several digitised spectra of one compound make one reference.

    Returns
    -------
    xarray.DataArray
        (component, energy): one row per reference, named by the coordinate ``component``.
    """
    import pandas as pd

    path = os.fspath(path)
    try:
        table = pd.read_csv(path)
    except (OSError, ValueError) as error:
        raise ValueError(f"{path}: cannot read the references as CSV ({error})") from None
    if table.shape[1] < 2:
        raise ValueError(f"{path}: a references file needs an energy column and at least one spectrum column")
    energy = table.iloc[:, 0].to_numpy(dtype=float)
    columns = list(table.columns[1:])
    if average:
        groups: dict[str, list[str]] = {}
        for column in columns:
            groups.setdefault(re.sub(r"_\d+$", "", str(column)), []).append(column)
    else:
        groups = {str(column): [column] for column in columns}
    values = np.stack([table[group].to_numpy(dtype=float).mean(axis=1) for group in groups.values()])
    if not np.all(np.isfinite(values)) or not np.all(np.isfinite(energy)):
        raise ValueError(f"{path}: the references hold non-finite values")
    if np.any(np.diff(energy) <= 0):
        raise ValueError(f"{path}: the energy column must increase strictly")
    return xr.DataArray(values, dims=("component", "energy"),
                        coords={"component": list(groups), "energy": ("energy", energy, {"units": "eV"})},
                        name="reference", attrs={"source": os.path.basename(path)})


def _as_references(references: xr.DataArray | Mapping[str, xr.DataArray]) -> xr.DataArray:
    if isinstance(references, Mapping):
        names = list(references)
        first = references[names[0]]
        aligned = [references[name].interp(energy=first["energy"]) for name in names]
        references = xr.concat(aligned, dim="component").assign_coords(component=names)
    if not isinstance(references, xr.DataArray) or set(references.dims) != {"component", "energy"}:
        raise TypeError("references must be a DataArray (component, energy) such as read_references returns, "
                        "or a mapping of names to 1-D spectra over energy")
    if references.sizes["component"] < 1:
        raise ValueError("references hold no spectrum")
    return references.transpose("component", "energy")


def valence_map(
    cube: xr.DataArray,
    references: xr.DataArray | Mapping[str, xr.DataArray],
    *,
    energy_range: tuple[float, float] | None = None,
    background_range: tuple[float, float] | None = None,
    shift: bool = False,
    max_shift: float = 2.0,
    drift: xr.DataArray | xr.Dataset | np.ndarray | float | None = None,
    chunk_pixels: int = common.CHUNK_PIXELS,
) -> xr.Dataset:
    """Map the fractions of reference spectra (e.g. Fe2+ and Fe3+) in every pixel, with error bars.

    Each spectrum is fitted by Poisson maximum likelihood (the multiple linear least squares of
    EELS, done with the right likelihood) as

        counts ~ Poisson(sum_k a_k R_k(E - drift - s) + b1 P(E) + b2 P(E) log(E / E0))

    with amplitudes ``a_k >= 0`` (an active-set Newton step keeps them there), a free power-law
    background, and optionally one free shift ``s`` common to all references (a calibration offset,
    or a drift). Fractions are ``a_k / sum(a)``; their errors come from the inverse Fisher
    information by the delta method.

    Parameters
    ----------
    cube
        The spectrum image (y, x, energy) in electrons.
    references
        (component, energy) spectra, e.g. :func:`read_references` of ``fe_l23_references.csv``, or
        a mapping ``{name: 1-D DataArray over energy}``; resampled onto the cube's grid (cubic spline).
    energy_range
        The fitted window (eV). Default: where the references and the cube overlap, less
        ``max_shift`` at each end when ``shift`` is fitted (and the largest drift).
    background_range
        Where the background's exponent is measured on the bulk spectrum (default: the first fifth
        of the window).
    shift
        Fit one common shift per pixel (eV, returned as ``shift`` with ``shift_error``).
    max_shift
        Largest allowed ``|shift|`` (eV) when ``shift`` is fitted.
    drift
        Known energy offset per pixel (eV), as in :func:`edge_shift_map`.
    chunk_pixels
        Pixels per batch.

    Returns
    -------
    xarray.Dataset
        ``fraction`` and ``fraction_error`` (component, y, x), ``amplitude`` (component, y, x),
        ``deviance``, ``converged`` and, with ``shift``, ``shift``, ``shift_error`` and ``at_limit``.
    """
    cube = common.check_cube(cube)
    references = _as_references(references)
    energy = np.asarray(cube["energy"].values, dtype=float)
    dispersion = float(energy[1] - energy[0])
    drift_map = _drift_map(drift, cube)
    reach = (float(max_shift) if shift else 0.0) + (float(np.max(np.abs(drift_map))) if drift_map is not None
                                                     else 0.0)
    grids = [common.template_on_grid(references.isel(component=i), dispersion, float(energy[0]))
             for i in range(references.sizes["component"])]
    grid_start = max(g[0] for g in grids)
    n = min(int(round((g[0] + dispersion * (g[1].size - 1) - grid_start) / dispersion)) + 1 for g in grids)
    values = np.stack([g[1][int(round((grid_start - g[0]) / dispersion)):][:n] for g in grids])
    grid = common.spans(grid_start, n, dispersion)
    if energy_range is None:
        energy_range = (max(grid[0] + reach, float(energy[0])), min(grid[1] - reach, float(energy[-1])))
        if energy_range[1] - energy_range[0] < 4 * dispersion:
            raise ValueError(f"the references ({grid[0]:g} - {grid[1]:g} eV) and the cube ({energy[0]:g} - "
                             f"{energy[-1]:g} eV) do not overlap enough")
    low, high = common.check_range(energy_range, energy, "energy_range")
    common.check_coverage(grid, (low - reach, high + reach), "references")
    inside = (energy >= low - 1e-9) & (energy <= high + 1e-9)
    fit_energy = energy[inside]
    background_range = ((low, low + (high - low) / 5) if background_range is None
                        else common.check_range(background_range, energy, "background_range"))
    bulk = common.robust_mean_spectrum(cube, drift=drift_map)
    _, exponent = common.power_law(bulk, energy, background_range)
    basis = common.background_basis(fit_energy, exponent, low, terms=3)
    templates = ShiftedTemplates(values, grid_start, dispersion, fit_energy)

    k = values.shape[0]
    n_pixels = cube.sizes["y"] * cube.sizes["x"]
    amplitude = np.full((n_pixels, k), np.nan)
    fraction = np.full((n_pixels, k), np.nan)
    fraction_error = np.full((n_pixels, k), np.nan)
    fitted_shift = np.full(n_pixels, np.nan)
    shift_error = np.full(n_pixels, np.nan)
    deviance = np.full(n_pixels, np.nan)
    converged = np.zeros(n_pixels, dtype=bool)
    at_limit = np.zeros(n_pixels, dtype=bool)
    ny, nx = cube.sizes["y"], cube.sizes["x"]
    offsets = drift_map if drift_map is not None else np.zeros((ny, nx))

    def fit_block(rows: slice, counts: np.ndarray, offset: np.ndarray) -> dict[str, np.ndarray]:
        offset = offset.ravel()
        fit = poisson_fit(counts[:, inside], templates, basis, fit_shift=shift, offset=offset, max_shift=max_shift,
                          nonnegative=True)
        a = fit.amplitudes
        total = a.sum(axis=-1, keepdims=True)
        with np.errstate(divide="ignore", invalid="ignore"):
            f = a / total
            # d f_i / d a_j = (delta_ij - f_i) / total
            jacobian = (np.eye(k)[None] - f[:, :, None]) / total[:, :, None]
            cov = fit.covariance[:, :k, :k]
            var = np.einsum("pij,pjl,pil->pi", jacobian, cov, jacobian)
        good = np.isfinite(f).all(axis=-1) & (total[:, 0] > 0)
        block = {"amplitude": np.where(good[:, None], a, np.nan), "fraction": np.where(good[:, None], f, np.nan),
                 "fraction_error": np.where(good[:, None], np.sqrt(np.maximum(var, 0.0)), np.nan),
                 "deviance": np.where(good, fit.deviance, np.nan), "converged": fit.converged & good}
        if shift:
            block.update(shift=np.where(good, fit.shift - offset, np.nan),
                         shift_error=np.where(good, fit.error(k), np.nan), at_limit=fit.at_limit)
        return block

    outputs = {"amplitude": amplitude, "fraction": fraction, "fraction_error": fraction_error, "deviance": deviance,
               "converged": converged, "shift": fitted_shift, "shift_error": shift_error, "at_limit": at_limit}
    # a lazy cube: a chunk of rows at a time, two held; over the cluster where a client is current
    for rows, block in map_rows(cube, fit_block, work_pixels=chunk_pixels, row_data=offsets):
        flat = slice(rows.start * nx, rows.stop * nx)
        for name, value in block.items():
            outputs[name][flat] = value

    ny = cube.sizes["y"]
    names = [str(c) for c in references["component"].values]

    def per_component(array, **attrs):
        return (("component", "y", "x"), np.moveaxis(array.reshape(ny, nx, k), -1, 0), attrs)

    data_vars = {
        "fraction": per_component(fraction, long_name="fraction of the reference"),
        "fraction_error": per_component(fraction_error, long_name="fraction error (1 sigma)"),
        "amplitude": per_component(amplitude, long_name="reference amplitude"),
        "deviance": common.spatial_like(cube, deviance, long_name="Poisson deviance of the fit"),
        "converged": common.spatial_like(cube, converged, long_name="fit converged"),
    }
    if shift:
        data_vars["shift"] = common.spatial_like(cube, fitted_shift, units="eV", long_name="common shift")
        data_vars["shift_error"] = common.spatial_like(cube, shift_error, units="eV",
                                                       long_name="common shift error (1 sigma)")
        data_vars["at_limit"] = common.spatial_like(cube, at_limit, long_name="shift ran to +-max_shift")
    coords = {**common.map_coords(cube), "component": names}
    attrs = {"method": "Poisson maximum likelihood, non-negative amplitudes (active-set Fisher scoring)",
             "energy_range_eV": [float(low), float(high)], "background_exponent": float(exponent),
             "references": references.attrs.get("source", "given"), "shift_fitted": int(bool(shift))}
    return xr.Dataset(data_vars, coords=coords, attrs=attrs)
