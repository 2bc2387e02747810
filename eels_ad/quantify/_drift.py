"""Without a low-loss image: a smooth drift surface apart from local (chemical) shifts."""

from __future__ import annotations

import numpy as np
import xarray as xr

_BISQUARE = 4.685


def separate_drift(
    shifts: xr.Dataset,
    *,
    order: int = 2,
    rows: bool = True,
    iterations: int = 10,
) -> xr.Dataset:
    """Split a shift map into a smooth energy drift and local shifts, each with its error.

    An energy drift comes from the instrument and follows the acquisition: it is smooth across the
    scan (slow in time) and may jump from one scan row to the next; a chemical shift is local. The
    drift is fitted as a polynomial surface in (y, x) of total degree ``order`` plus, with ``rows``,
    one offset per scan row, by iteratively reweighted least squares with Tukey's bisquare weights
    on the shifts in units of their errors (so a local shift, however strong, gets weight 0 and
    does not bend the surface). What remains is the local shift.

    Parameters
    ----------
    shifts
        What :func:`edge_shift_map` returns (``shift`` and ``shift_error``, eV); pixels with NaN or
        no convergence are left out of the fit and get NaN local shifts.
    order
        Total degree of the smooth surface (0: a constant).
    rows
        Also fit one offset per row (the rows of a scan start at slightly different energies).
    iterations
        Reweighting passes.

    Returns
    -------
    xarray.Dataset
        Over (y, x): ``drift`` (the surface, plus row offsets), ``local_shift`` (= shift - drift),
        ``local_shift_error`` (the shift's error; the drift's own error, ``drift_error``, is much
        smaller where many pixels inform it), and ``local_z`` (local shift / error).

    Notes
    -----
    To shift the template along with the drift, fit twice: ``first = edge_shift_map(cube)``,
    ``drift = separate_drift(first)["drift"]``, then ``edge_shift_map(cube, drift=drift)`` gives the
    local shifts against a template built from the aligned bulk.

    Examples
    --------
    >>> import eels_ad
    >>> from eels_ad.quantify import edge_shift_map
    >>> sim = eels_ad.simulate_fe_l23((16, 16), drift=1.0, anomaly_fraction=0.0, seed=2)
    >>> parts = separate_drift(edge_shift_map(sim["counts"], max_shift=2.5))
    >>> bool(abs(parts["drift"] - parts["drift"].mean() - (sim["drift"] - sim["drift"].mean())).max() < 0.1)
    True
    """
    if not isinstance(shifts, xr.Dataset) or not {"shift", "shift_error"} <= set(shifts.data_vars):
        raise TypeError("separate_drift takes the Dataset of edge_shift_map (with 'shift' and 'shift_error')")
    if not isinstance(order, (int, np.integer)) or order < 0:
        raise ValueError(f"order must be a whole number >= 0, got {order!r}")
    value = np.asarray(shifts["shift"].values, dtype=float)
    error = np.asarray(shifts["shift_error"].values, dtype=float)
    if "drift" in shifts:  # shifts measured against a drift already applied: split the total
        value = value + np.asarray(shifts["drift"].values, dtype=float)
    ny, nx = value.shape
    usable = np.isfinite(value) & np.isfinite(error) & (error > 0)
    if "converged" in shifts:
        usable &= np.asarray(shifts["converged"].values, dtype=bool)
    if usable.sum() < 3:
        raise ValueError(f"only {int(usable.sum())} pixels have a fitted shift: too few to separate a drift")
    yy, xx = np.meshgrid(np.linspace(-1, 1, ny), np.linspace(-1, 1, nx), indexing="ij")
    terms = [yy ** i * xx ** (d - i) for d in range(order + 1) for i in range(d + 1)]
    if rows and ny > 1:
        terms = terms[1:] + [(np.arange(ny)[:, None] == row) * np.ones((1, nx)) for row in range(ny)]
    design = np.stack([t.ravel() for t in terms], axis=1)[usable.ravel()]
    target, sigma = value[usable], error[usable]
    weight = 1.0 / sigma ** 2
    coefficients = np.zeros(design.shape[1])
    for _ in range(max(int(iterations), 1)):
        root = np.sqrt(weight)
        coefficients, *_ = np.linalg.lstsq(design * root[:, None], target * root, rcond=None)
        residual = (target - design @ coefficients) / sigma
        scale = 1.4826 * np.median(np.abs(residual)) or 1.0
        u = residual / (_BISQUARE * max(scale, 1.0))
        weight = np.where(np.abs(u) < 1, (1 - u ** 2) ** 2, 0.0) / sigma ** 2
    full = np.stack([t.ravel() for t in terms], axis=1)
    drift = (full @ coefficients).reshape(ny, nx)
    normal = (design * weight[:, None]).T @ design
    covariance = np.linalg.pinv(normal)
    drift_error = np.sqrt(np.maximum(np.einsum("pi,ij,pj->p", full, covariance, full), 0.0)).reshape(ny, nx)
    local = np.where(usable, value - drift, np.nan)
    local_error = np.where(usable, error, np.nan)
    coords = {name: coord for name, coord in shifts.coords.items() if set(coord.dims) <= {"y", "x"}}
    data_vars = {
        "drift": (("y", "x"), drift, {"units": "eV", "long_name": "energy drift (smooth surface + rows)"}),
        "drift_error": (("y", "x"), drift_error, {"units": "eV", "long_name": "drift error (1 sigma)"}),
        "local_shift": (("y", "x"), local, {"units": "eV", "long_name": "local edge shift"}),
        "local_shift_error": (("y", "x"), local_error, {"units": "eV", "long_name": "local shift error (1 sigma)"}),
        "local_z": (("y", "x"), local / local_error, {"long_name": "local shift / error"}),
    }
    attrs = {"method": "robust (bisquare) polynomial surface" + (" + row offsets" if rows else ""),
             "order": int(order), "rows": int(bool(rows)), "outlier_pixels": int(np.sum(weight == 0))}
    return xr.Dataset(data_vars, coords=coords, attrs=attrs)
