"""X-ray spikes: single-voxel outliers that no spectrum of the specimen can make, found and repaired in batch."""

from __future__ import annotations

import numpy as np
import xarray as xr
from scipy import ndimage

from ..datacube import is_lazy, validate


def _spatial_estimate(values: np.ndarray, totals: np.ndarray) -> np.ndarray:
    """Each voxel predicted from its 8 spatial neighbours: their median, each scaled to this pixel's total."""
    ny, nx, _ = values.shape
    padded = np.pad(values, ((1, 1), (1, 1), (0, 0)), mode="reflect" if min(ny, nx) > 1 else "edge")
    padded_totals = np.pad(totals, 1, mode="reflect" if min(ny, nx) > 1 else "edge")
    neighbours = []
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            if dy == dx == 0:
                continue
            shifted = padded[1 + dy:1 + dy + ny, 1 + dx:1 + dx + nx]
            scale = totals / np.maximum(padded_totals[1 + dy:1 + dy + ny, 1 + dx:1 + dx + nx], 1e-12)
            neighbours.append(shifted * scale[..., None])
    return np.median(np.stack(neighbours), axis=0)


def find_spikes(cube: xr.DataArray, *, gain: float = 1.0, threshold: float = 8.0, ratio: float = 2.0,
                energy_width: int = 3, chunk_rows: int = 32) -> xr.DataArray:
    """Voxels that are X-ray spikes: far above both their spatial and their spectral neighbours.

    A voxel ``y`` is a spike when, in electrons (counts / ``gain``), it exceeds the median of its 8
    spatial neighbours ``m`` (each scaled to this pixel's total counts) by ``threshold`` Poisson
    standard deviations, ``(y - m) / sqrt(m + 1) > threshold``, *and* exceeds the median of the
    ``2 * energy_width + 1`` channels around it in its own spectrum ``m_E`` by as much and by a factor
    ``ratio``. A chemical change (a shifted edge, a different L3/L2 ratio) passes the first test but
    not the second: it moves a smooth band of channels, which its own spectrum's median follows; a
    spike is a channel or two that no spectrum of the specimen can make.

    Parameters
    ----------
    cube
        The spectrum image (recorded counts).
    gain
        Counts per electron (see :func:`estimate_gain`); the thresholds are in Poisson units of electrons.
    threshold
        Standard deviations above both neighbourhoods (8: a Poisson false alarm has a probability far
        below 1e-12 per voxel at any dose).
    ratio
        Factor above the spectral neighbourhood (white lines rise above their median by ~1.3).
    energy_width
        Half-width, in channels, of the spectral neighbourhood.
    chunk_rows
        Rows processed at a time (memory: about 10 x one chunk). A lazy cube goes by its own chunks.

    Returns
    -------
    xarray.DataArray
        Boolean (y, x, energy), True at the spikes; lazy (computed chunk by chunk when read) for a lazy
        cube.
    """
    cube = validate(cube, negative="allow")
    if not gain > 0:
        raise ValueError(f"gain must be > 0 counts per electron, got {gain}")
    if energy_width < 1:
        raise ValueError(f"energy_width must be >= 1 channel, got {energy_width}")
    attrs = {"long_name": "X-ray spike (repaired)", "threshold": threshold, "gain": gain}

    def spikes_of(block: np.ndarray) -> np.ndarray:
        """The spikes of a block of rows, judged with the rows it holds (context rows included)."""
        electrons = np.maximum(np.asarray(block, dtype=np.float64) / gain, 0.0)
        spatial = _spatial_estimate(electrons, electrons.sum(-1))
        spectral = ndimage.median_filter(electrons, size=(1, 1, 2 * energy_width + 1), mode="nearest")
        z_spatial = (electrons - spatial) / np.sqrt(spatial + 1.0)
        z_spectral = (electrons - spectral) / np.sqrt(spectral + 1.0)
        return (z_spatial > threshold) & (z_spectral > threshold) & (electrons > ratio * np.maximum(spectral, 1.0))

    if is_lazy(cube):  # chunk by chunk, each with one row of its neighbours' on either side
        data = cube.data.rechunk({1: -1, 2: -1})
        mask = data.map_overlap(spikes_of, depth={0: 1, 1: 0, 2: 0}, boundary="none", dtype=bool,
                                meta=np.array((), dtype=bool))
        return xr.DataArray(mask, dims=cube.dims, coords=cube.coords, name="spike", attrs=attrs)
    values = np.asarray(cube.values)
    spikes = np.zeros(values.shape, dtype=bool)
    ny = values.shape[0]
    for start in range(0, ny, chunk_rows):
        # one row of context on each side, so that chunk edges see the same neighbours
        lo, hi = max(start - 1, 0), min(start + chunk_rows + 1, ny)
        found = spikes_of(values[lo:hi])
        spikes[start:min(start + chunk_rows, ny)] = found[start - lo:start - lo + min(chunk_rows, ny - start)]
    return xr.DataArray(spikes, dims=cube.dims, coords=cube.coords, name="spike", attrs=attrs)


def remove_spikes(cube: xr.DataArray, spikes: xr.DataArray | None = None, **options) -> xr.DataArray:
    """The cube with every spike replaced by its spatial neighbours' estimate; the mask kept as coordinate ``spike``.

    Parameters
    ----------
    cube
        The spectrum image.
    spikes
        A mask from :func:`find_spikes` (default: found here, with ``options``).
    **options
        For :func:`find_spikes` (``gain``, ``threshold`` ...).

    Returns
    -------
    xarray.DataArray
        A copy with the spikes repaired (integer counts stay integers), the boolean (y, x, energy)
        coordinate ``spike`` and ``attrs["n_spikes"]``. For a lazy cube both stay lazy: the repair runs
        chunk by chunk whenever a stage reads the cube, and counting the spikes is one pass.

    Examples
    --------
    >>> import eels_ad
    >>> cube = eels_ad.simulate_fe_l23((8, 8), anomaly_fraction=0.0, seed=0)["counts"]
    >>> hit = cube.copy()
    >>> hit[3, 4, 100] += 5000
    >>> repaired = remove_spikes(hit)
    >>> int(repaired.attrs["n_spikes"]), bool(repaired["spike"][3, 4, 100])
    (1, True)
    """
    cube = validate(cube, negative="allow")
    spikes = find_spikes(cube, **options) if spikes is None else spikes
    if spikes.shape != cube.shape:
        raise ValueError(f"the spike mask has shape {spikes.shape} but the cube has {cube.shape}")
    integer = np.issubdtype(cube.dtype, np.integer)

    def repaired_of(values: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """A block of rows with its spikes replaced by the spatial estimate (context rows included)."""
        values = np.array(values, copy=True)
        if mask.any():
            clipped = np.maximum(values.astype(np.float64), 0)
            estimate = _spatial_estimate(clipped, clipped.sum(-1))[mask]
            values[mask] = (np.round(estimate) if integer else estimate).astype(values.dtype)
        return values

    if is_lazy(cube):  # chunk by chunk: read and repaired whenever a stage reads the cube
        import dask.array as da

        data = cube.data.rechunk({1: -1, 2: -1})
        mask = da.asarray(spikes.data if hasattr(spikes.data, "dask") else np.asarray(spikes.values, dtype=bool))
        mask = mask.astype(bool).rechunk(data.chunks)
        values = da.map_overlap(repaired_of, data, mask, depth={0: 1, 1: 0, 2: 0}, boundary="none",
                                dtype=data.dtype, meta=np.array((), dtype=data.dtype))
        repaired = cube.copy(data=values)
        repaired.coords["spike"] = (cube.dims, mask, {"long_name": "X-ray spike (repaired)"})
        repaired.attrs["n_spikes"] = int(mask.sum().compute())  # one pass
        return repaired
    mask = np.asarray(spikes.values, dtype=bool)
    values = np.array(cube.values, copy=True)
    for row in np.unique(np.nonzero(mask)[0]):  # the estimate only where it is needed
        lo, hi = max(row - 1, 0), min(row + 2, values.shape[0])
        values[row] = repaired_of(values[lo:hi], mask[lo:hi])[row - lo]
    repaired = cube.copy(data=values)
    repaired.coords["spike"] = (cube.dims, mask, {"long_name": "X-ray spike (repaired)"})
    repaired.attrs["n_spikes"] = int(mask.sum())
    return repaired
