import numpy as np
import pytest
import xarray as xr

import eels_ad
from eels_ad import as_datacube, validate


def small_cube(shape=(3, 4, 10), offset=700.0, dispersion=0.5):
    rng = np.random.default_rng(0)
    return as_datacube(rng.poisson(50, shape).astype(float), energy_offset=offset, dispersion=dispersion)


def test_as_datacube_builds_labelled_cube():
    cube = small_cube()
    assert cube.dims == ("y", "x", "energy")
    assert cube["energy"].attrs["units"] == "eV"
    assert cube.attrs["units"] == "counts"
    np.testing.assert_allclose(cube["energy"].values, 700.0 + 0.5 * np.arange(10))
    assert cube.eels.dispersion == pytest.approx(0.5)


def test_spectrum_and_line_scan_get_size_one_dims():
    spectrum = as_datacube(np.ones(5), energy_offset=0.0, dispersion=1.0)
    line = as_datacube(np.ones((7, 5)), energy_offset=0.0, dispersion=1.0)
    assert spectrum.shape == (1, 1, 5)
    assert line.shape == (1, 7, 5)


def test_energy_length_mismatch_names_sizes():
    with pytest.raises(ValueError, match="energy has 4 values but counts has 10 channels"):
        as_datacube(np.ones((2, 2, 10)), energy=np.arange(4.0))


def test_wrong_dims_are_named():
    cube = small_cube().transpose("energy", "y", "x")
    with pytest.raises(ValueError, match=r"dims \('y', 'x', 'energy'\).*got \('energy', 'y', 'x'\)"):
        validate(cube)
    renamed = small_cube().rename(energy="E")
    with pytest.raises(ValueError, match="'E'"):
        validate(renamed)


def test_not_a_dataarray():
    with pytest.raises(TypeError, match="ndarray"):
        validate(np.ones((2, 2, 2)))


def test_empty_axis_is_named():
    cube = small_cube().isel(x=slice(0, 0))
    with pytest.raises(ValueError, match="'x' axis of the datacube is empty"):
        validate(cube)


def test_non_finite_values_are_located():
    cube = small_cube()
    cube[1, 2, 3] = np.nan
    with pytest.raises(ValueError, match=r"1 non-finite values.*y=1, x=2, energy index 3"):
        validate(cube)


def test_non_increasing_energy_axis():
    energy = 700.0 + 0.5 * np.arange(10)
    energy[5] = energy[4]
    with pytest.raises(ValueError, match="strictly increasing; channel 5"):
        as_datacube(np.ones((2, 2, 10)), energy=energy)


def test_non_uniform_energy_axis():
    energy = np.concatenate([700 + 0.5 * np.arange(5), 703 + 1.0 * np.arange(5)])
    with pytest.raises(ValueError, match="uniform"):
        as_datacube(np.ones((2, 2, 10)), energy=energy)


def test_negative_counts_clip_by_default_everywhere_or_raise():
    values = np.full((2, 2, 4), 10.0)
    values[0, 0, :2] = -3.0
    with pytest.raises(ValueError, match="2 negative counts.*negative='clip'"):
        as_datacube(values, energy_offset=0.0, dispersion=1.0, negative="raise")
    clipped = as_datacube(values, energy_offset=0.0, dispersion=1.0)
    assert float(clipped.min()) == 0.0
    assert clipped.attrs["clipped_negative_voxels"] == 2
    raw = as_datacube(values, energy_offset=0.0, dispersion=1.0, negative="allow")
    assert validate(raw).attrs["clipped_negative_voxels"] == 2  # validate, fit and score: the same default
    from eels_ad.detect import PCADetector

    detector = PCADetector(n_components=1).fit(raw)
    np.testing.assert_allclose(detector.reconstruct(raw).values, detector.reconstruct(clipped).values)
    allowed = as_datacube(values, energy_offset=0.0, dispersion=1.0, negative="allow")
    assert float(allowed.min()) == -3.0


def test_complex_dtype_rejected():
    cube = xr.DataArray(np.ones((1, 1, 3), complex), dims=("y", "x", "energy"), coords={"energy": [1.0, 2, 3]})
    with pytest.raises(TypeError, match="real numbers"):
        validate(cube)


def test_accessor_crop_bin_total_counts():
    cube = small_cube(shape=(4, 6, 10))
    cropped = cube.eels.crop(701.0, 702.0)
    np.testing.assert_allclose(cropped["energy"].values, [701.0, 701.5, 702.0])
    with pytest.raises(ValueError, match="holds no channel"):
        cube.eels.crop(800, 900)
    binned = cube.eels.bin(y=2, x=3, energy=2)
    assert binned.shape == (2, 2, 5)
    assert float(binned.sum()) == pytest.approx(float(cube.sum()))
    assert binned.dims == ("y", "x", "energy")
    with pytest.raises(ValueError, match="positive integer"):
        cube.eels.bin(y=0)
    total = cube.eels.total_counts()
    np.testing.assert_allclose(total.values, cube.values.sum(-1))
    window = cube.eels.total_counts((701.0, 702.0))
    np.testing.assert_allclose(window.values, cube.values[..., 2:5].sum(-1))


def test_accessor_mean_spectrum_and_spectra_with_mask():
    cube = small_cube(shape=(2, 2, 5))
    mask = np.array([[True, False], [False, True]])
    np.testing.assert_allclose(cube.eels.mean_spectrum(mask).values, cube.values[mask].mean(0))
    assert cube.eels.spectra(mask).shape == (2, 5)
    with pytest.raises(ValueError, match=r"mask has shape \(3,\)"):
        cube.eels.spectra(np.ones(3, bool))
    with pytest.raises(ValueError, match="selects no pixel"):
        cube.eels.mean_spectrum(np.zeros((2, 2), bool))


def test_package_face():
    assert callable(eels_ad.load) and callable(eels_ad.save)
    with pytest.raises(AttributeError):
        eels_ad.not_a_thing  # noqa: B018
