"""Vacuum and thin regions: pixels with too little specimen signal to judge."""

from __future__ import annotations

import numpy as np
import xarray as xr

from ..datacube import validate


def vacuum_mask(cube: xr.DataArray, *, energy_range: tuple[float, float] | None = None,
                fraction: float = 0.25) -> xr.DataArray:
    """Pixels whose counts are below ``fraction`` of the specimen's typical counts: vacuum or very thin.

    For a core-loss image the counts of an edge window (``energy_range``, e.g. the Fe L2,3 edge) say
    where the element is; by default the whole axis. The typical counts are the 90th percentile of
    the pixels' counts, so a scan that is mostly vacuum still finds its specimen. (For a low-loss
    image, eXSpy's ``vacuum_mask`` looks at the zero-loss peak instead.)

    Parameters
    ----------
    cube
        The spectrum image.
    energy_range
        ``(e_min, e_max)`` eV whose counts decide (default: all channels).
    fraction
        Pixels below this fraction of the typical counts are vacuum (in a real Fe-oxide SI, vacuum
        has about 1/13 of the particles' counts).

    Returns
    -------
    xarray.DataArray
        Boolean (y, x), True in vacuum.

    Examples
    --------
    >>> import eels_ad
    >>> cube = eels_ad.simulate_fe_l23((8, 8), anomaly_fraction=0.0, seed=0)["counts"]
    >>> cube[:2] = cube[:2] // 20                   # two rows of vacuum
    >>> int(vacuum_mask(cube).sum())
    16
    """
    cube = validate(cube, negative="allow")
    if not 0 < fraction < 1:
        raise ValueError(f"fraction must lie in (0, 1), got {fraction}")
    window = cube if energy_range is None else cube.eels.crop(*energy_range)
    totals = np.asarray(window.sum("energy").values, dtype=float)
    typical = float(np.percentile(totals, 90))
    mask = totals < fraction * typical if typical > 0 else np.ones(totals.shape, dtype=bool)
    return xr.DataArray(mask, dims=("y", "x"), coords={"y": cube["y"], "x": cube["x"]}, name="vacuum",
                        attrs={"long_name": "vacuum or too thin", "fraction": fraction,
                               "energy_range": "all" if energy_range is None else list(energy_range)})
