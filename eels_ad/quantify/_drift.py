"""Without a low-loss image: a smooth drift surface apart from local (chemical) shifts."""

from __future__ import annotations

import numpy as np
import xarray as xr
from scipy import linalg, sparse
from scipy.interpolate import BSpline

_BISQUARE = 4.685


def separate_drift(
    shifts: xr.Dataset,
    *,
    order: int = 1,
    knots_per_row: float = 2.0,
    rows: bool = True,
    iterations: int = 10,
) -> xr.Dataset:
    """Split a shift map into a smooth energy drift and local shifts, each with its error.

    An energy drift comes from the instrument. It follows the acquisition: smooth in scan time
    (a cubic spline of the time at which each pixel was recorded, row after row, ``knots_per_row``
    knots per row, so it can follow a drift within a row), it may jump between scan rows (``rows``:
    one offset per row) and it may depend smoothly on the beam position (descan: a polynomial
    surface in (y, x) of total degree ``order``). A chemical shift is local. The drift model is
    fitted by iteratively reweighted least squares with Tukey's bisquare weights on the shifts in
    units of their errors, so that a local shift, however strong, gets weight 0 and does not bend
    it. What remains is the local shift.

    Parameters
    ----------
    shifts
        What :func:`edge_shift_map` returns (``shift`` and ``shift_error``, eV; a ``drift`` it
        applied is added back first); pixels with NaN or no convergence are left out of the fit
        and get NaN local shifts.
    order
        Total degree of the position-dependent surface (0: none beyond a constant).
    knots_per_row
        Knots of the time spline per scan row (0: no time spline).
    rows
        Also fit one offset per row.
    iterations
        Reweighting passes.

    Returns
    -------
    xarray.Dataset
        Over (y, x): ``drift`` and ``drift_error`` (eV), ``local_shift`` (= shift - drift),
        ``local_shift_error`` (the shift's error) and ``local_z`` (local shift / error).

    Notes
    -----
    Local features larger than a row's share of the spline (a blob wider than about
    ``1 / knots_per_row`` of a row) start to look like drift: lower ``knots_per_row`` for big ones.
    To build the template from the aligned bulk, fit twice: ``first = edge_shift_map(cube)``,
    ``drift = separate_drift(first)["drift"]``, then ``separate_drift(edge_shift_map(cube, drift=drift))``.

    Examples
    --------
    >>> import eels_ad
    >>> from eels_ad.quantify import edge_shift_map
    >>> sim = eels_ad.simulate_fe_l23((16, 16), drift=1.0, anomaly_fraction=0.0, seed=2)
    >>> parts = separate_drift(edge_shift_map(sim["counts"], max_shift=2.5))
    >>> error = parts["drift"] - sim["drift"]
    >>> bool(abs(error - error.mean()).max() < 0.1)
    True
    """
    if not isinstance(shifts, xr.Dataset) or not {"shift", "shift_error"} <= set(shifts.data_vars):
        raise TypeError("separate_drift takes the Dataset of edge_shift_map (with 'shift' and 'shift_error')")
    if not isinstance(order, (int, np.integer)) or order < 0:
        raise ValueError(f"order must be a whole number >= 0, got {order!r}")
    if not (np.isfinite(knots_per_row) and knots_per_row >= 0):
        raise ValueError(f"knots_per_row must be a number >= 0, got {knots_per_row!r}")
    value = np.asarray(shifts["shift"].values, dtype=float)
    error = np.asarray(shifts["shift_error"].values, dtype=float)
    if "drift" in shifts:  # shifts measured against a drift already applied: split the total
        value = value + np.asarray(shifts["drift"].values, dtype=float)
    ny, nx = value.shape
    usable = np.isfinite(value) & np.isfinite(error) & (error > 0)
    if "converged" in shifts:
        usable &= np.asarray(shifts["converged"].values, dtype=bool)
    full, coefficients, normal, weight = _robust_drift(value, error, usable, order, knots_per_row, rows, iterations)
    drift = (full @ coefficients).reshape(ny, nx)
    covariance = np.linalg.pinv(normal)
    drift_error = np.sqrt(np.maximum(_quadratic(full, covariance), 0.0)).reshape(ny, nx)
    local = np.where(usable, value - drift, np.nan)
    local_error = np.where(usable, error, np.nan)
    coords = {name: coord for name, coord in shifts.coords.items() if set(coord.dims) <= {"y", "x"}}
    data_vars = {
        "drift": (("y", "x"), drift, {"units": "eV", "long_name": "energy drift"}),
        "drift_error": (("y", "x"), drift_error, {"units": "eV", "long_name": "drift error (1 sigma)"}),
        "local_shift": (("y", "x"), local, {"units": "eV", "long_name": "local edge shift"}),
        "local_shift_error": (("y", "x"), local_error, {"units": "eV", "long_name": "local shift error (1 sigma)"}),
        "local_z": (("y", "x"), local / local_error, {"long_name": "local shift / error"}),
    }
    attrs = {"method": "robust (bisquare) fit: spline in scan time + row offsets + position surface",
             "order": int(order), "knots_per_row": float(knots_per_row), "rows": int(bool(rows)),
             "outlier_pixels": int(np.sum(weight == 0))}
    return xr.Dataset(data_vars, coords=coords, attrs=attrs)


def _robust_drift(value: np.ndarray, error: np.ndarray, usable: np.ndarray, order: int, knots_per_row: float,
                  rows: bool, iterations: int) -> tuple[sparse.csr_matrix, np.ndarray, np.ndarray, np.ndarray]:
    """The drift model's design over every pixel, its coefficients fitted by IRLS (bisquare) to the usable
    pixels, the last normal matrix and the last weights."""
    if usable.sum() < 3:
        raise ValueError(f"only {int(usable.sum())} pixels have a fitted shift: too few to separate a drift")
    ny, nx = value.shape
    full = _design(ny, nx, order, knots_per_row, rows)
    design = full[usable.ravel()]
    target, sigma = value[usable], error[usable]
    weight = 1.0 / sigma ** 2
    coefficients = np.zeros(design.shape[1])
    normal = np.zeros((design.shape[1], design.shape[1]))
    for _ in range(max(int(iterations), 1)):
        weighted = design.multiply(weight[:, None]).tocsr()
        normal = (design.T @ weighted).toarray()
        # the normal matrix is singular (row offsets and the spline share a constant): a ridge far below its scale
        # picks one least-squares solution (the drift, design @ coefficients, is the same for any of them)
        ridge = 1e-10 * max(float(np.trace(normal)) / normal.shape[0], 1e-300)
        # Cholesky: ~3-15x faster than scipy's general solve (which also estimates the condition number)
        # at these sizes (200-1500 columns), ten times per fit
        factor = linalg.cho_factor(normal + ridge * np.eye(normal.shape[0]), check_finite=False)
        coefficients = linalg.cho_solve(factor, weighted.T @ target, check_finite=False)
        residual = (target - design @ coefficients) / sigma
        scale = max(1.4826 * float(np.median(np.abs(residual))), 1.0)
        u = residual / (_BISQUARE * scale)
        weight = np.where(np.abs(u) < 1, (1 - u ** 2) ** 2, 0.0) / sigma ** 2
    return full, coefficients, normal, weight


def smooth_drift(value: np.ndarray, error: np.ndarray, *, order: int = 1, knots_per_row: float = 2.0,
                 rows: bool = True, iterations: int = 10) -> np.ndarray:
    """The drift map alone of :func:`separate_drift` from (y, x) arrays of shifts and errors (NaN: left out),
    without its errors (no covariance): for a quick look, e.g. PCADetector's ``context="auto"``."""
    usable = np.isfinite(value) & np.isfinite(error) & (error > 0)
    full, coefficients, _, _ = _robust_drift(value, error, usable, order, knots_per_row, rows, iterations)
    return (full @ coefficients).reshape(value.shape)


def _quadratic(design: sparse.csr_matrix, covariance: np.ndarray) -> np.ndarray:
    """diag(A C A^T) for a sparse A."""
    return np.asarray(design.multiply(design @ covariance).sum(axis=1)).ravel()


def _design(ny: int, nx: int, order: int, knots_per_row: float, rows: bool) -> sparse.csr_matrix:
    """The drift model's columns at every pixel: position surface, time spline, row offsets."""
    yy, xx = np.meshgrid(np.linspace(-1, 1, ny), np.linspace(-1, 1, nx), indexing="ij")
    columns = [sparse.csr_matrix(np.stack([yy.ravel() ** i * xx.ravel() ** (d - i)
                                           for d in range(order + 1) for i in range(d + 1)], axis=1))]
    n_knots = int(round(knots_per_row * ny))
    if n_knots >= 1 and ny * nx >= 8:
        time = np.arange(ny * nx) / (ny * nx - 1)
        degree = 3
        inner = np.linspace(0, 1, n_knots + 1)
        knots = np.concatenate([np.zeros(degree), inner, np.ones(degree)])
        columns.append(BSpline.design_matrix(time, knots, degree).tocsr())
    if rows and ny > 1:
        columns.append(sparse.csr_matrix((np.ones(ny * nx), (np.arange(ny * nx), np.repeat(np.arange(ny), nx))),
                                         shape=(ny * nx, ny)))
    return sparse.hstack(columns).tocsr()
