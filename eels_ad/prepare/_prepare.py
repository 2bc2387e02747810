"""One call that readies a recorded spectrum image for the Poisson models."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from ..datacube import validate
from ._gain import resolve_gain
from ._spikes import remove_spikes
from ._vacuum import vacuum_mask


def prepare(cube: xr.DataArray, *, gain: float | str = "auto", spikes: bool = True, vacuum: bool = True,
            vacuum_range: tuple[float, float] | None = None, vacuum_fraction: float = 0.25,
            spike_threshold: float = 8.0) -> xr.DataArray:
    """Electron counts, spikes repaired, vacuum marked: what every likelihood in eels-ad assumes.

    Parameters
    ----------
    cube
        A recorded spectrum image (``eels_ad.load``).
    gain
        Counts per electron, or ``"auto"`` (default): estimated by
        :func:`~eels_ad.prepare.estimate_gain`, and taken as 1 when the estimate lies within 0.8-1.25.
        The counts are divided by it.
    spikes
        Find and repair X-ray spikes (:func:`~eels_ad.prepare.remove_spikes`).
    vacuum
        Mark vacuum and very thin pixels (:func:`~eels_ad.prepare.vacuum_mask`).
    vacuum_range, vacuum_fraction
        For :func:`~eels_ad.prepare.vacuum_mask` (``energy_range``, ``fraction``).
    spike_threshold
        For :func:`~eels_ad.prepare.find_spikes`.

    A lazy cube (``eels_ad.load(path, lazy=True)``) stays lazy: see :func:`load_prepared`.

    Returns
    -------
    xarray.DataArray
        The cube in electron counts (float when divided by a gain other than 1), with the coordinates
        ``spike`` (y, x, energy) and ``vacuum`` (y, x) where asked, and ``attrs``: ``gain``,
        ``gain_source``, ``n_spikes``, ``n_vacuum_pixels``, ``prepared`` (what was done).

    Examples
    --------
    >>> import eels_ad
    >>> from eels_ad.prepare import prepare
    >>> cube = eels_ad.simulate_fe_l23((16, 16), anomaly_fraction=0.0, seed=0)["counts"] * 40
    >>> ready = prepare(cube)
    >>> round(ready.attrs["gain"] / 40, 1), int(ready.attrs["n_spikes"]), int(ready["vacuum"].sum())
    (1.0, 0, 0)
    """
    cube = validate(cube, negative="clip")
    if cube.attrs.get("prepared"):
        raise ValueError(f"this cube was prepared already ({cube.attrs['prepared']}); prepare the recorded cube once")
    if float(cube.sum()) <= 0:
        raise ValueError("the cube holds no counts (every voxel is 0): nothing to prepare or score")
    value, source = resolve_gain(cube, gain)
    done = [f"gain {value:.4g}: {source}"]
    if value != 1.0:
        cube = (cube / value).assign_attrs(cube.attrs)
        cube.attrs["units"] = "electrons"
    if spikes:
        cube = remove_spikes(cube, threshold=spike_threshold)
        done.append(f"{cube.attrs['n_spikes']} spikes repaired")
    else:
        cube.attrs["n_spikes"] = 0
    if vacuum:
        mask = vacuum_mask(cube, energy_range=vacuum_range, fraction=vacuum_fraction)
        cube.coords["vacuum"] = (("y", "x"), np.asarray(mask.values), mask.attrs)
        done.append(f"{int(mask.sum())} vacuum pixels marked")
    cube.attrs.update(gain=float(value), gain_source=source,
                      n_vacuum_pixels=int(cube["vacuum"].sum()) if vacuum else 0, prepared="; ".join(done))
    return cube


def load_prepared(source: str | os.PathLike, preparation: dict[str, Any] | None = None,
                  chunks: dict[str, int] | None = None) -> xr.DataArray:
    """:func:`eels_ad.load` a file, then :func:`prepare` it with the options ``preparation``.

    ``preparation=None`` keeps the counts as recorded. A file read with ``chunks`` stays lazy, prepared
    or not: :func:`prepare` of a lazy cube reads it three times (the total; the spikes, counted; the
    vacuum mask) plus a sample of chunks for the gain, and the spike repair then runs chunk by chunk
    (each with one row of its neighbours') whenever a later stage reads the cube. Batch jobs and reports
    reopen their sources this way, with the options stored in their results.
    """
    from ..io import load

    cube = load(Path(source), chunks=chunks)
    return cube if preparation is None else prepare(cube, **preparation)
