import numpy as np
import xarray as xr

import eels_ad


def test_sample_cube_is_valid_and_small():
    cube = eels_ad.data.sample_cube()
    assert cube.shape == (64, 64, 320)
    assert eels_ad.data.sample_path().stat().st_size < 5e6


def test_shipped_sample_matches_its_recipe():
    shipped = eels_ad.data.sample_dataset()
    remade = eels_ad.data.make_sample()
    np.testing.assert_array_equal(shipped["counts"].values, remade["counts"].values)
    xr.testing.assert_equal(shipped["anomaly"], remade["anomaly"])
