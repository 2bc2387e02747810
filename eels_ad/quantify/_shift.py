"""Per-pixel chemical-shift maps by Poisson maximum likelihood, with Fisher error bars."""

from __future__ import annotations

import numpy as np
import xarray as xr

from ..datacube import map_rows
from ..prepare._drift import drift_map as _drift_map
from . import _common as common
from ._fit import PoissonFit, ShiftedTemplates, poisson_fit


def edge_shift_map(
    cube: xr.DataArray,
    template: xr.DataArray | None = None,
    *,
    energy_range: tuple[float, float] | None = None,
    background_range: tuple[float, float] | None = None,
    drift: xr.DataArray | xr.Dataset | np.ndarray | float | None = None,
    max_shift: float = 2.0,
    min_counts: float = 20.0,
    chunk_pixels: int = common.CHUNK_PIXELS,
) -> xr.Dataset:
    """Map the energy shift of an edge in every pixel, with its 1-sigma error (the Cramer-Rao bound).

    Each spectrum is fitted by Poisson maximum likelihood with

        counts ~ Poisson(a T(E - drift - shift) + b1 P(E) + b2 P(E) log(E / E0))

    ``T`` the bulk template, ``P(E) = (E / E0)**-r`` a power-law background whose amplitude and (to
    first order) exponent are free in every pixel, since the pre-edge slope varies with thickness. The
    model is moved, never the counts: no spectrum is resampled. All pixels are fitted at once by
    Fisher scoring (a few batched Newton steps), in chunks of ``chunk_pixels`` (a lazy cube is read
    one chunk at a time). ``shift_error`` is the square root of the inverse Fisher information at the
    fit: the Cramer-Rao bound of the shift with the edge and background amplitudes free.

    Parameters
    ----------
    cube
        The spectrum image (y, x, energy), counts in electrons (see :func:`eels_ad.prepare.prepare`).
    template
        The edge shape: ``None`` (default) the cube's bulk spectrum (a trimmed mean over non-vacuum
        pixels, aligned by ``drift`` when given) with a power law fitted over ``background_range``
        taken off; a 1-D DataArray over ``energy`` (a reference spectrum, resampled onto the cube's
        grid by a cubic spline; it may include its background); or a cube of the data's shape (a
        detector's reconstruction: one template per pixel).
    energy_range
        The fitted window (eV). Default: the template's span less ``max_shift`` and the largest
        drift at each end (the template must cover the window moved by any allowed shift).
    background_range
        Where the background's exponent is measured on the bulk spectrum (eV). Default: the first
        fifth of ``energy_range`` (the pre-edge, when the window starts before the edge).
    drift
        Known energy offset of every pixel (eV; a (y, x) map, a number, or the Dataset of
        :func:`eels_ad.prepare.zero_loss_drift`): the model is moved by it, and ``shift`` is what
        remains (the chemical shift).
    max_shift
        Largest ``|shift|`` (eV) allowed; a fit that runs there is marked ``at_limit`` (and not
        ``converged``), never clipped silently.
    min_counts
        Pixels with fewer counts in the window get NaN and ``converged=False``.
    chunk_pixels
        Pixels per batch.

    Returns
    -------
    xarray.Dataset
        Over (y, x): ``shift`` and ``shift_error`` (eV; positive = to higher energy loss),
        ``edge_amplitude`` and its error (the template's scale), ``background_amplitude``,
        ``deviance`` (Poisson, on ``attrs["degrees_of_freedom"]``), ``converged``, ``at_limit`` and
        ``drift`` (eV) when given. ``attrs`` record the window, the template and the background.

    References
    ----------
    Rao, C. R. (1945); Cramer, H. (1946): the variance bound the Fisher information sets.
    Egerton, R. F. (2011), *Electron Energy-Loss Spectroscopy in the Electron Microscope*, 3rd ed., Springer:
    power-law backgrounds and chemical shifts of core-loss edges.

    Examples
    --------
    >>> import eels_ad
    >>> sim = eels_ad.simulate_fe_l23((8, 8), shift=0.5, anomaly_fraction=0.25, seed=1)
    >>> shifts = edge_shift_map(sim["counts"])
    >>> bool(abs(float(shifts["shift"].where(sim.anomaly).mean()) - 0.5) < 0.1)
    True
    """
    cube = common.check_cube(cube)
    energy = np.asarray(cube["energy"].values, dtype=float)
    dispersion = float(energy[1] - energy[0])
    drift_map = _drift_map(drift, cube)
    if not (np.isfinite(max_shift) and max_shift > 0):
        raise ValueError(f"max_shift must be a positive number of eV, got {max_shift!r}")
    reach = float(max_shift) + (float(np.max(np.abs(drift_map))) if drift_map is not None else 0.0)

    prepared = _template(cube, template, energy, dispersion, drift_map, energy_range, background_range, reach)
    grid_start, values, low, high, exponent, source = prepared
    inside = (energy >= low - 1e-9) & (energy <= high + 1e-9)
    fit_energy = energy[inside]
    basis = common.background_basis(fit_energy, exponent, low)

    n_pixels = cube.sizes["y"] * cube.sizes["x"]
    out = {name: np.full(n_pixels, np.nan) for name in
           ("shift", "shift_error", "edge_amplitude", "edge_amplitude_error", "background_amplitude",
            "background_slope", "deviance")}
    converged = np.zeros(n_pixels, dtype=bool)
    at_limit = np.zeros(n_pixels, dtype=bool)
    ny, nx = cube.sizes["y"], cube.sizes["x"]
    offsets = drift_map if drift_map is not None else np.zeros((ny, nx))
    shared = None if values.ndim == 3 else ShiftedTemplates(values, grid_start, dispersion, fit_energy)
    # what each block needs of its own pixels: the drift, and per-pixel templates where given
    row_data = offsets[..., None] if shared is not None else np.concatenate([offsets[..., None], values], axis=-1)

    def fit_block(rows: slice, counts: np.ndarray, data: np.ndarray) -> tuple[dict, np.ndarray, np.ndarray]:
        offset = data[..., 0].ravel()
        counts = counts[:, inside]
        templates = shared if shared is not None else ShiftedTemplates(
            data[..., 1:].reshape(-1, 1, data.shape[-1] - 1), grid_start, dispersion, fit_energy)
        fit = poisson_fit(counts, templates, basis, offset=offset, max_shift=max_shift)
        block = {name: np.empty(counts.shape[0]) for name in out}
        _store(block, fit, offset, slice(None))
        enough = counts.sum(axis=-1) >= min_counts
        good = enough & np.isfinite(fit.shift)
        return ({name: np.where(good, value, np.nan) for name, value in block.items()}, fit.converged & good,
                fit.at_limit & enough)

    # a lazy cube: a chunk of rows at a time, two held; over the cluster where a client is current
    for rows, (block, block_converged, block_at_limit) in map_rows(cube, fit_block, work_pixels=chunk_pixels,
                                                                   row_data=row_data):
        flat = slice(rows.start * nx, rows.stop * nx)
        for name in out:
            out[name][flat] = block[name]
        converged[flat] = block_converged
        at_limit[flat] = block_at_limit

    data_vars = {
        "shift": common.spatial_like(cube, out["shift"], units="eV", long_name="edge shift"),
        "shift_error": common.spatial_like(cube, out["shift_error"], units="eV",
                                           long_name="edge shift error (1 sigma, Cramer-Rao)"),
        "edge_amplitude": common.spatial_like(cube, out["edge_amplitude"], long_name="edge amplitude",
                                              units="template scale"),
        "edge_amplitude_error": common.spatial_like(cube, out["edge_amplitude_error"],
                                                    long_name="edge amplitude error (1 sigma)"),
        "background_amplitude": common.spatial_like(cube, out["background_amplitude"],
                                                    long_name="background at the window's start", units="counts"),
        "background_slope": common.spatial_like(cube, out["background_slope"],
                                                long_name="background exponent change x amplitude"),
        "deviance": common.spatial_like(cube, out["deviance"], long_name="Poisson deviance of the fit"),
        "converged": common.spatial_like(cube, converged, long_name="fit converged"),
        "at_limit": common.spatial_like(cube, at_limit, long_name="shift ran to +-max_shift"),
    }
    if drift_map is not None:
        data_vars["drift"] = (("y", "x"), drift_map, {"units": "eV", "long_name": "energy drift (applied)"})
    coords = common.map_coords(cube)
    if values.ndim == 2:  # a shared template: kept, so that the fitted model of any pixel can be rebuilt
        coords["template_energy"] = ("template_energy", grid_start + dispersion * np.arange(values.shape[-1]),
                                     {"units": "eV"})
        data_vars["template"] = (("template_energy",), values[0], {"long_name": "edge template"})
    attrs = {
        "method": "Poisson maximum likelihood (Fisher scoring), model moved, counts untouched",
        "energy_range_eV": [float(low), float(high)],
        "template": source,
        "background": "power law with free amplitude and exponent (linearised)",
        "background_exponent": float(exponent),
        "max_shift_eV": float(max_shift),
        "min_counts": float(min_counts),
        "degrees_of_freedom": int(inside.sum() - 4),
        "dispersion_eV": dispersion,
    }
    return xr.Dataset(data_vars, coords=coords, attrs=attrs)


def shift_model(shifts: xr.Dataset, y: float | None = None, x: float | None = None) -> xr.DataArray:
    """The fitted model of :func:`edge_shift_map` over its window: of one pixel (``y``, ``x`` coordinates) or all.

    ``a T(E - drift - shift) + b1 P(E) + b2 P(E) log(E / E0)`` with the fitted parameters; for a
    shared template only (a per-pixel template is not kept in the result).

    Returns
    -------
    xarray.DataArray
        Expected counts over ``energy`` (the fit window), for the pixel or (y, x, energy).
    """
    if "template" not in shifts:
        raise ValueError("this shift map was fitted with per-pixel templates, which it does not keep: "
                         "the model cannot be rebuilt from it")
    chosen = shifts if y is None else shifts.sel(y=y, x=x, method="nearest").expand_dims(("y", "x"))
    low, high = shifts.attrs["energy_range_eV"]
    dispersion = float(shifts.attrs["dispersion_eV"])
    grid = np.asarray(shifts["template_energy"].values, dtype=float)
    energy = grid[(grid >= low - 1e-9) & (grid <= high + 1e-9)]
    templates = ShiftedTemplates(np.asarray(shifts["template"].values)[None], float(grid[0]), dispersion, energy)
    total = chosen["shift"] + (chosen["drift"] if "drift" in chosen else 0.0)
    flat = np.nan_to_num(np.asarray(total.values, dtype=float).ravel())
    moved, _ = templates(flat, derivative=False)
    basis = common.background_basis(energy, float(shifts.attrs["background_exponent"]), low)
    amplitude = np.asarray(chosen["edge_amplitude"].values, dtype=float).ravel()
    background = np.stack([np.asarray(chosen[name].values, dtype=float).ravel()
                           for name in ("background_amplitude", "background_slope")], axis=1)
    model = moved[:, 0] * amplitude[:, None] + background @ basis
    model = model.reshape(chosen.sizes["y"], chosen.sizes["x"], energy.size)
    result = xr.DataArray(model, dims=("y", "x", "energy"),
                          coords={"y": chosen["y"].values, "x": chosen["x"].values,
                                  "energy": ("energy", energy, {"units": "eV"})},
                          name="model", attrs={"units": "counts", "long_name": "fitted model"})
    return result.isel(y=0, x=0) if y is not None else result


def _store(out: dict, fit: PoissonFit, offsets: np.ndarray, flat: slice) -> None:
    out["shift"][flat] = fit.shift - offsets
    out["shift_error"][flat] = fit.error(1)
    out["edge_amplitude"][flat] = fit.amplitudes[:, 0]
    out["edge_amplitude_error"][flat] = fit.error(0)
    out["background_amplitude"][flat] = fit.background[:, 0]
    out["background_slope"][flat] = fit.background[:, 1]
    out["deviance"][flat] = fit.deviance


def _template(cube, template, energy, dispersion, drift_map, energy_range, background_range, reach):
    """The template on the cube's grid, the fit window and the background exponent."""
    axis = (float(energy[0]), float(energy[-1]))
    if template is None or (isinstance(template, xr.DataArray) and template.ndim == 3):
        grid = axis
        if energy_range is None:
            energy_range = (grid[0] + reach, grid[1] - reach)
            if energy_range[1] - energy_range[0] < 4 * dispersion:
                raise ValueError(f"the cube's axis ({axis[0]:g} - {axis[1]:g} eV) is too short for max_shift and "
                                 f"drift of {reach:g} eV at each end")
        low, high = common.check_range(energy_range, energy, "energy_range")
        background_range = _background_range(background_range, low, high, energy)
        common.check_coverage(grid, (low - reach, high + reach), "cube's energy axis (the template's)")
        if template is None:
            bulk = common.robust_mean_spectrum(cube, drift=drift_map)
            amplitude, exponent = common.power_law(bulk, energy, background_range)
            edge = bulk - amplitude * (energy / background_range[0]) ** -exponent
            return axis[0], edge[None], low, high, exponent, "bulk spectrum of the cube (trimmed mean), power law off"
        if template.shape != cube.shape:
            raise ValueError(f"a per-pixel template must have the cube's shape {cube.shape}, got {template.shape}")
        if not np.array_equal(np.asarray(template["energy"].values), energy):
            raise ValueError("a per-pixel template must share the cube's energy axis")
        values = np.asarray(template.transpose("y", "x", "energy").values, dtype=float)
        bulk = common.robust_mean_spectrum(cube)
        _, exponent = common.power_law(bulk, energy, background_range)
        return axis[0], values, low, high, exponent, "per-pixel template (e.g. a detector's reconstruction)"
    grid_start, values = template_values = common.template_on_grid(template, dispersion, float(energy[0]))
    del template_values
    grid = common.spans(grid_start, values.size, dispersion)
    if energy_range is None:
        energy_range = (max(grid[0] + reach, axis[0]), min(grid[1] - reach, axis[1]))
        if energy_range[1] - energy_range[0] < 4 * dispersion:
            raise ValueError(f"the template ({grid[0]:g} - {grid[1]:g} eV) and the cube ({axis[0]:g} - {axis[1]:g} "
                             f"eV) do not overlap by more than the allowed shift and drift ({reach:g} eV each side)")
    low, high = common.check_range(energy_range, energy, "energy_range")
    common.check_coverage(grid, (low - reach, high + reach), "template")
    background_range = _background_range(background_range, low, high, energy)
    bulk = common.robust_mean_spectrum(cube, drift=drift_map)
    _, exponent = common.power_law(bulk, energy, background_range)
    return grid_start, values[None], low, high, exponent, "reference spectrum (user's template)"


def _background_range(background_range, low, high, energy):
    if background_range is None:
        return (low, low + (high - low) / 5)
    return common.check_range(background_range, energy, "background_range")
