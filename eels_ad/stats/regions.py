"""Which energy channels differ between two regions of a spectrum image."""

from __future__ import annotations

from typing import Literal

import numpy as np
import xarray as xr

from .._xp import Backend
from ..datacube import as_mask, channel_index, fold_rows, read_rows, row_blocks, validate
from .negbin import Method, Test, group_moments, nb_test, nb_test_from_moments

#: pixels per work block (a lazy cube is read a chunk at a time, converted a work block at a time)
CHUNK_PIXELS = 2048


def _add_moments(a: tuple[dict | None, float], b: tuple[dict | None, float]) -> tuple[dict | None, float]:
    """The sum of two blocks' (group moments, sum of log totals)."""
    if a[0] is None or b[0] is None:
        return (a[0] if b[0] is None else b[0]), a[1] + b[1]
    return {k: a[0][k] + b[0][k] for k in a[0]}, a[1] + b[1]


def _check_totals(totals: np.ndarray) -> None:
    if np.any(totals <= 0):
        raise ValueError(f"{int(np.sum(totals <= 0))} spectra have no counts: they cannot get a size factor")


def size_factors_from_totals(spectra: np.ndarray) -> np.ndarray:
    """Size factors proportional to each spectrum's total counts, with geometric mean 1."""
    totals = spectra.sum(axis=1).astype(float)
    _check_totals(totals)
    log_totals = np.log(totals)
    return np.exp(log_totals - log_totals.mean())


def compare_regions(
    cube: xr.DataArray,
    mask_a: xr.DataArray | np.ndarray,
    mask_b: xr.DataArray | np.ndarray | None = None,
    *,
    method: Method = "mom",
    test: Test = "wald",
    energy_range: tuple[float, float] | None = None,
    normalize: Literal["total"] | None = "total",
    normalize_range: tuple[float, float] | None = None,
    fdr: float = 0.05,
    null_distribution: Literal["t", "normal"] = "t",
    backend: Backend = "numpy",
    device: str | None = None,
) -> xr.Dataset:
    """Negative-binomial test of every energy channel: region B (e.g. flagged pixels) against A (bulk).

    Each pixel of a region is one sample; pixels marked vacuum (the coordinate ``vacuum`` that
    :func:`eels_ad.prepare.prepare` adds) are in neither region. With ``normalize="total"`` each
    pixel's counts are scaled by a size factor from its total counts in ``energy_range``, so that
    thickness differences are not reported as composition; what remains are changes of spectral
    shape, e.g. an edge shift shows as paired negative / positive log fold changes below and above
    the edge.

    Parameters
    ----------
    cube
        The spectrum image.
    mask_a
        (y, x) pixels of region A, the baseline (e.g. bulk).
    mask_b
        (y, x) pixels of region B; default: every pixel not in A.
    method, test, null_distribution, backend, device
        See :func:`~eels_ad.stats.nb_test`.
    energy_range
        ``(e_min, e_max)`` eV of the channels to test (default: all).
    normalize
        ``"total"`` (size factors from total counts) or None (raw counts).
    normalize_range
        ``(e_min, e_max)`` eV whose counts give the size factors (default: the tested channels). A
        window the anomaly leaves alone, e.g. the pre-edge background, keeps an edge shift from
        leaking into every channel through the normalisation.
    fdr
        False-discovery rate for the ``significant`` flag.

    Returns
    -------
    xarray.Dataset
        Indexed by ``energy``: ``mean_a``, ``mean_b`` (mean normalised spectra), ``log_fold_change``,
        ``se``, ``statistic``, ``pvalue``, ``qvalue``, ``dispersion``, ``significant`` and ``reason``.
    """
    cube = source = validate(cube).transpose("y", "x", "energy")
    normalising_cube = cube.eels.crop(*normalize_range) if normalize_range is not None else None
    if energy_range is not None:
        cube = cube.eels.crop(*energy_range)
    normalising_cube = cube if normalising_cube is None else normalising_cube
    in_a = np.asarray(as_mask(mask_a, cube).values)
    in_b = ~in_a if mask_b is None else np.asarray(as_mask(mask_b, cube).values)
    if np.any(in_a & in_b):
        raise ValueError(f"regions A and B overlap in {int(np.sum(in_a & in_b))} pixels")
    vacuum = np.asarray(cube["vacuum"].values, dtype=bool) if "vacuum" in cube.coords else np.zeros_like(in_a)
    in_a, in_b = in_a & ~vacuum, in_b & ~vacuum  # vacuum (eels_ad.prepare) belongs to neither region
    for name, region in (("A", in_a), ("B", in_b)):
        if region.sum() < 2:
            raise ValueError(f"region {name} has {int(region.sum())} pixels; a test needs at least 2")
    if not 0 < fdr < 1:
        raise ValueError(f"fdr must be in (0, 1), got {fdr}")
    if normalize not in ("total", None):
        raise ValueError(f"normalize must be 'total' or None, got {normalize!r}")
    tested = np.isin(source["energy"].values, cube["energy"].values)
    normalising = np.isin(source["energy"].values, normalising_cube["energy"].values)
    if method == "mom" and test == "wald":
        # runs of channels as slices: views, not copies, of each block
        tested_channels, normalising_channels = channel_index(tested), channel_index(normalising)

        # one pass over the rows, summing each region's moments: the cube is never held whole
        def block_moments(rows: slice, spectra: np.ndarray, regions: np.ndarray) -> tuple[dict | None, float]:
            region_b = regions[..., 1].ravel()
            chosen = regions[..., 0].ravel() | region_b
            if not chosen.any():
                return None, 0.0
            if not chosen.all():
                spectra, region_b = spectra[chosen], region_b[chosen]
            counts = spectra[:, tested_channels]
            log_totals = 0.0
            if normalize == "total":
                totals = spectra[:, normalising_channels].sum(axis=1)
                _check_totals(totals)
                log_totals = float(np.log(totals).sum())
            else:
                totals = np.ones(counts.shape[0])
            return group_moments(counts.T, region_b, totals), log_totals

        # rows that hold neither region are not read; over the cluster where one is current
        moments, log_totals = fold_rows(source, block_moments, _add_moments, work_pixels=CHUNK_PIXELS,
                                        rows_wanted=(in_a | in_b).any(axis=1), row_data=np.stack([in_a, in_b], -1))
        if normalize == "total":  # size factors are the totals over their geometric mean
            scale = np.exp(log_totals / moments["n"].sum())
            moments["sum_factor"] /= scale
            moments["factor_sum"] /= scale
            moments["factor_sq"] /= scale**2
        table = nb_test_from_moments(moments, null_distribution=null_distribution)
    else:  # the other fits need every sample: read the rows that hold the two regions' pixels
        parts, labels = [], []
        for rows in row_blocks(source, CHUNK_PIXELS):
            chosen = in_a[rows].ravel() | in_b[rows].ravel()
            if chosen.any():
                parts.append(read_rows(source, rows, np.float64).reshape(-1, tested.size)[chosen])
                labels.append(in_b[rows].ravel()[chosen])
        spectra, groups = np.concatenate(parts), np.concatenate(labels)
        factors = size_factors_from_totals(spectra[:, normalising]) if normalize == "total" else None
        table = nb_test(spectra[:, tested].T, groups, factors, method=method, test=test,
                        null_distribution=null_distribution, backend=backend, device=device)
    energy = cube["energy"]
    data_vars = {column: ("energy", table[column].to_numpy()) for column in table.columns if column != "converged"}
    dataset = xr.Dataset(data_vars, coords={"energy": energy})
    dataset["converged"] = ("energy", table["converged"].to_numpy())
    dataset["significant"] = dataset["qvalue"] < fdr
    dataset["log_fold_change"].attrs = {"long_name": "log fold change (B over A)", "units": "natural log"}
    dataset.attrs = {"method": method, "test": test, "fdr": fdr, "n_pixels_a": int(in_a.sum()),
                     "n_pixels_b": int(in_b.sum()), "n_vacuum_left_out": int(vacuum.sum()), "normalize": str(normalize),
                     "null_distribution": null_distribution,
                     "normalize_range": list(normalize_range) if normalize_range else "tested channels"}
    return dataset
