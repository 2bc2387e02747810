"""Sample data shipped with eels-ad.

``sample_cube()`` is a small simulated Fe L2,3 spectrum image (64 x 64 pixels x 320 channels,
670 - 750 eV, about 200 counts per channel before the edge) with 1 % of pixels whose Fe edge is
shifted by +1 eV, made by :func:`make_sample` (the recipe; ``python data/make_sample_cube.py``
at the top of the repository rewrites the file).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import xarray as xr

from ..simulate import FeL23Recipe

SAMPLE_FILE = "fe_l23_sample.nc"

SAMPLE_RECIPE = FeL23Recipe(shape=(64, 64), dose=200.0, anomaly_fraction=0.01, layout="pixels", shift=1.0,
                            seed=20241216)
"""The recipe (:class:`eels_ad.simulate.FeL23Recipe`) that made the sample cube."""


def sample_path() -> Path:
    """Path of the sample NetCDF file inside the installed package."""
    return Path(str(resources.files(__name__).joinpath(SAMPLE_FILE)))


def make_sample() -> xr.Dataset:
    """Re-create the sample data set (counts and ground truth) from :data:`SAMPLE_RECIPE`."""
    dataset = SAMPLE_RECIPE.simulate()
    dataset.attrs["title"] = "eels-ad sample: simulated Fe L2,3 SI, 1 % pixels shifted by +1 eV"
    return dataset


def sample_dataset() -> xr.Dataset:
    """The sample with its ground truth: ``counts``, ``anomaly``, ``shift``, ``l3_l2_ratio``."""
    from ..io import open_results

    return open_results(sample_path())


def sample_cube() -> xr.DataArray:
    """The sample spectrum image as a validated datacube (y, x, energy)."""
    from ..io import load

    return load(sample_path())
