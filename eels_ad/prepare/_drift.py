"""Energy drift from the zero-loss peak of a low-loss spectrum image (dual EELS), and aligning a cube by it."""

from __future__ import annotations

import numpy as np
import xarray as xr

from ..datacube import DIMS, validate

_FWHM_PER_SIGMA = 2.0 * np.sqrt(2.0 * np.log(2.0))


def _as_low_loss(low_loss: xr.DataArray) -> xr.DataArray:
    if isinstance(low_loss, xr.DataArray) and "low_loss_energy" in low_loss.dims:
        low_loss = low_loss.rename(low_loss_energy="energy")  # as simulate_fe_l23 returns it
    return validate(low_loss)


def zero_loss_drift(
    low_loss: xr.DataArray,
    *,
    reference: float = 0.0,
    energy_range: tuple[float, float] | None = None,
    level: float = 0.5,
) -> xr.Dataset:
    """The zero-loss peak's centre in every pixel, to a fraction of a channel, and the drift it shows.

    The peak is found at the largest channel (within ``energy_range``), then a Gaussian is fitted to
    the channels above ``level`` times that maximum: a parabola in the logarithm of the counts,
    weighted by the counts (their Poisson weight in the logarithm), for all pixels at once. The
    centre's error is the fit's, propagated to ``-b / 2c``. Only the peak's top is used, so an
    asymmetric tail barely moves it.

    Parameters
    ----------
    low_loss
        The low-loss spectrum image (y, x, energy), recorded with the core loss (dual EELS); a
        DataArray with the dim ``low_loss_energy`` (as :func:`eels_ad.simulate_fe_l23` returns it)
        is read as such.
    reference
        Where the peak belongs (eV): ``drift = centre - reference``. 0 calibrates the axis absolutely.
    energy_range
        Where to look for the peak (eV); default: the whole axis (the zero-loss peak is the
        strongest feature of a low-loss spectrum).
    level
        The fraction of the maximum down to which channels enter the fit; the top channel and its
        two neighbours always do (for a peak only a channel or two wide, that is the classic
        three-point Gaussian interpolation).

    Returns
    -------
    xarray.Dataset
        Over (y, x): ``zero_loss_centre``, ``zero_loss_centre_error`` (1 sigma), ``zero_loss_fwhm``
        and ``drift`` (eV), ``converged`` (False where the peak could not be fitted: NaN there).
        Pass it (or its ``drift``) to :func:`eels_ad.quantify.edge_shift_map` as ``drift=``, or to
        :func:`align_energy` for an aligned cube.

    Examples
    --------
    >>> import eels_ad
    >>> sim = eels_ad.simulate_fe_l23((4, 4), drift=0.5, low_loss=True, seed=0)
    >>> drift = zero_loss_drift(sim["low_loss"])
    >>> bool(abs(drift["drift"] - sim["drift"]).max() < 0.02)
    True
    """
    cube = _as_low_loss(low_loss)
    energy = np.asarray(cube["energy"].values, dtype=float)
    if energy.size < 3:
        raise ValueError(f"the low-loss cube has {energy.size} channels; the zero-loss fit needs at least 3")
    if not 0 < level < 1:
        raise ValueError(f"level must lie between 0 and 1, got {level}")
    dispersion = float(energy[1] - energy[0])
    search = np.ones(energy.size, dtype=bool)
    if energy_range is not None:
        low, high = (float(v) for v in energy_range)
        search = (energy >= low) & (energy <= high)
        if search.sum() < 3:
            raise ValueError(f"energy_range ({low:g}, {high:g}) eV holds fewer than 3 channels of the low-loss "
                             f"axis ({energy[0]:g} - {energy[-1]:g} eV)")
    counts = np.asarray(cube.values, dtype=float).reshape(-1, energy.size)
    masked = np.where(search, counts, -np.inf)
    peak = np.argmax(masked, axis=-1)
    top = counts[np.arange(counts.shape[0]), peak]
    # the fit's half-width in channels: from the mean spectrum's peak (same for every pixel)
    mean = np.where(search, counts.mean(axis=0), -np.inf)
    mean_peak = int(np.argmax(mean))
    above = mean >= level * mean[mean_peak]
    left = mean_peak - np.argmin(above[mean_peak::-1]) if not above[: mean_peak + 1].all() else 0
    right = mean_peak + np.argmin(above[mean_peak:]) if not above[mean_peak:].all() else energy.size
    half = max(1, int(np.ceil((right - left) / 2)))
    offsets = np.arange(-half, half + 1)
    index = np.clip(peak[:, None] + offsets[None, :], 0, energy.size - 1)
    values = np.take_along_axis(counts, index, axis=-1)
    # the top and its two neighbours always (a peak narrower than 3 channels: Gaussian interpolation)
    chosen = (values >= level * top[:, None]) | (np.abs(offsets) <= 1)[None, :]
    weight = np.where(chosen & (values > 0) & search[index], values, 0.0)
    u = offsets.astype(float)
    design = np.stack([np.ones_like(u), u, u * u])  # (3, n)
    normal = np.einsum("in,pn,jn->pij", design, weight, design)
    with np.errstate(divide="ignore", invalid="ignore"):
        logs = np.where(weight > 0, np.log(np.maximum(values, 1e-300)), 0.0)
    rhs = np.einsum("in,pn->pi", design, weight * logs)
    enough = (weight > 0).sum(axis=-1) >= 3
    normal[~enough] = np.eye(3)
    coefficients = np.linalg.solve(normal, rhs[..., None])[..., 0]
    covariance = np.linalg.inv(normal)
    b, c = coefficients[:, 1], coefficients[:, 2]
    good = enough & (c < 0) & (top > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        vertex = -b / (2 * c)
        # d(vertex) = -(1 / 2c) db + (b / 2c^2) dc
        gradient = np.stack([-1 / (2 * c), b / (2 * c * c)], axis=-1)
        variance = np.einsum("pi,pij,pj->p", gradient, covariance[:, 1:, 1:], gradient)
        sigma = np.sqrt(-1 / (2 * c))
    good &= np.abs(vertex) <= half
    centre = np.where(good, energy[peak] + vertex * dispersion, np.nan)
    error = np.where(good, np.sqrt(variance) * dispersion, np.nan)
    fwhm = np.where(good, _FWHM_PER_SIGMA * sigma * dispersion, np.nan)
    shape = (cube.sizes["y"], cube.sizes["x"])
    coords = {name: coord for name, coord in cube.coords.items() if set(coord.dims) <= {"y", "x"}}
    data_vars = {
        "zero_loss_centre": (("y", "x"), centre.reshape(shape), {"units": "eV", "long_name": "zero-loss peak centre"}),
        "zero_loss_centre_error": (("y", "x"), error.reshape(shape),
                                   {"units": "eV", "long_name": "zero-loss centre error (1 sigma)"}),
        "zero_loss_fwhm": (("y", "x"), fwhm.reshape(shape), {"units": "eV", "long_name": "zero-loss peak FWHM"}),
        "drift": (("y", "x"), (centre - reference).reshape(shape), {"units": "eV", "long_name": "energy drift"}),
        "converged": (("y", "x"), good.reshape(shape), {"long_name": "zero-loss peak fitted"}),
    }
    attrs = {"method": "Gaussian fit (log-parabola) to the zero-loss peak's top", "reference_eV": float(reference),
             "level": float(level), "fit_channels": int(offsets.size)}
    return xr.Dataset(data_vars, coords=coords, attrs=attrs)


def drift_map(drift: xr.DataArray | xr.Dataset | np.ndarray | float | None, cube: xr.DataArray) -> np.ndarray | None:
    """A drift (eV: a (y, x) map, a number, or the Dataset of :func:`zero_loss_drift`) as a (y, x) array
    matching ``cube``'s navigation shape, or a clear error naming both shapes."""
    if drift is None:
        return None
    if isinstance(drift, xr.Dataset):
        if "drift" not in drift:
            raise ValueError("a drift Dataset must hold a 'drift' variable (eV), e.g. from zero_loss_drift")
        drift = drift["drift"]
    values = np.asarray(drift.values if isinstance(drift, xr.DataArray) else drift, dtype=float)
    shape = (cube.sizes["y"], cube.sizes["x"])
    if values.ndim == 0:
        values = np.full(shape, float(values))
    if values.shape != shape:
        raise ValueError(f"the drift map has navigation shape {values.shape} but the core-loss cube has {shape}")
    if not np.all(np.isfinite(values)):
        raise ValueError(f"the drift map has {int(np.sum(~np.isfinite(values)))} non-finite values; "
                         "fill or mask those pixels first")
    return values


def align_energy(cube: xr.DataArray, drift: xr.DataArray | xr.Dataset | np.ndarray) -> xr.DataArray:
    """The cube with every spectrum moved back by its drift: an aligned cube, resampled.

    Each spectrum is read at ``E + drift`` by linear interpolation between channels (the ends are
    held). Resampling changes the noise: a channel that takes a fraction ``f`` from one neighbour and
    ``1 - f`` from the other has the variance ``f**2 + (1 - f)**2`` (down to a half) of a Poisson
    count of its mean, neighbouring channels become correlated, and the values are no longer whole
    counts. Poisson likelihoods that follow (the detectors, :func:`eels_ad.quantify.edge_shift_map`)
    then misjudge the noise; for the quantity maps, pass the drift as ``drift=`` instead: the model
    is moved and the counts are left alone. Use an aligned cube for looking and for averaging.

    Parameters
    ----------
    cube
        The core-loss cube (y, x, energy).
    drift
        (y, x) drift in eV (or the Dataset of :func:`zero_loss_drift`).

    Returns
    -------
    xarray.DataArray
        The aligned cube (float), ``attrs["aligned"]`` saying by what.
    """
    from ..detect._scores import _moved

    cube = validate(cube)
    values = drift_map(drift, cube)
    energy = np.asarray(cube["energy"].values, dtype=float)
    moved = _moved(np.asarray(cube.transpose(*DIMS).values, dtype=float), -values / (energy[1] - energy[0]))
    aligned = cube.copy(data=moved)
    aligned.attrs["aligned"] = "spectra moved back by their drift (linear interpolation): not Poisson counts"
    return aligned
