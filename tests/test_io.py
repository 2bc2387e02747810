import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

import eels_ad
from eels_ad import DatacubeReadError, as_datacube, find_datacubes, load, save


@pytest.fixture
def cube():
    rng = np.random.default_rng(1)
    return as_datacube(
        rng.poisson(30, (3, 5, 40)).astype(np.float32), energy_offset=690.0, dispersion=0.25,
        attrs={"beam_energy_keV": 200.0, "title": "test cube"},
    )


@pytest.mark.shared
def test_load_real_dm3(real_si_path):
    cube = load(real_si_path)
    assert cube.dims == ("y", "x", "energy")
    assert cube.shape == (17, 19, 2048)
    assert cube["energy"].values[0] == pytest.approx(450.0)
    assert cube["energy"].values[-1] == pytest.approx(961.75)
    assert cube.eels.dispersion == pytest.approx(0.25)
    assert cube.attrs["source_file"].endswith("fe_oxide_si.dm3")
    # dark-reference-corrected data: about 1 % negative voxels, clipped by default and counted
    assert 0.005 < cube.attrs["clipped_negative_voxels"] / cube.size < 0.02
    assert float(cube.min()) == 0.0
    with pytest.raises(DatacubeReadError, match="fe_oxide_si.dm3.*negative counts"):
        load(real_si_path, negative="raise")
    # the Fe L3 maximum near 700.5 eV on the stored (uncalibrated) axis
    mean = cube.eels.crop(690, 710).mean(("y", "x"))
    assert float(mean["energy"][int(np.argmax(mean.values))]) == pytest.approx(700.5, abs=1.0)
    # row 12 is the known acquisition glitch: lower intensity than its neighbours
    rows = cube.sum(("x", "energy")).values
    assert rows[12] < 0.9 * min(rows[11], rows[13])


def test_netcdf_round_trip(tmp_path, cube):
    path = save(cube, tmp_path / "cube.nc")
    back = load(path)
    xr.testing.assert_allclose(back, cube)
    assert back.attrs["beam_energy_keV"] == 200.0
    assert back.attrs["title"] == "test cube"


def test_save_refuses_to_overwrite_and_is_atomic(tmp_path, cube):
    path = tmp_path / "cube.nc"
    save(cube, path)
    before = path.read_bytes()
    with pytest.raises(FileExistsError, match="cube.nc exists"):
        save(cube * 2, path)
    assert path.read_bytes() == before
    save(cube * 2, path, overwrite=True)
    np.testing.assert_allclose(load(path).values, 2 * cube.values)
    assert [p.name for p in tmp_path.iterdir()] == ["cube.nc"]  # no temporary left behind


def test_failed_write_leaves_nothing(tmp_path, cube, monkeypatch):
    with pytest.raises(ValueError, match="use a .nc suffix"):
        save(cube, tmp_path / "cube.txt")

    def crash_mid_write(self, path, **kwargs):
        Path(path).write_bytes(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(xr.Dataset, "to_netcdf", crash_mid_write)
    with pytest.raises(KeyboardInterrupt):
        save(cube, tmp_path / "cube.nc")
    assert list(tmp_path.iterdir()) == []


def test_dataset_round_trip_keeps_bool_masks(tmp_path):
    dataset = eels_ad.simulate_fe_l23((8, 8), anomaly_fraction=0.1, seed=3)
    save(dataset, tmp_path / "sim.nc")
    back = eels_ad.open_results(tmp_path / "sim.nc")
    assert back["anomaly"].dtype == bool
    xr.testing.assert_equal(back["anomaly"], dataset["anomaly"])
    np.testing.assert_array_equal(back["counts"].values, dataset["counts"].values)
    assert load(tmp_path / "sim.nc").shape == (8, 8, 320)


def test_hyperspy_round_trip(cube):
    signal = eels_ad.to_hyperspy(cube)
    assert signal.metadata.Signal.signal_type == "EELS"
    assert signal.axes_manager.navigation_shape == (5, 3)
    assert signal.axes_manager.signal_axes[0].offset == pytest.approx(690.0)
    assert signal.axes_manager.signal_axes[0].scale == pytest.approx(0.25)
    assert signal.metadata.Acquisition_instrument.TEM.beam_energy == 200.0
    back = eels_ad.from_hyperspy(signal)
    np.testing.assert_allclose(back.values, cube.values)
    np.testing.assert_allclose(back["energy"].values, cube["energy"].values)
    assert back.attrs["beam_energy_keV"] == 200.0


@pytest.mark.parametrize("suffix", [".hspy", ".msa", ".emd"])
def test_microscope_formats_written_by_hyperspy(tmp_path, cube, suffix):
    source = cube.isel(y=[0], x=[0]) if suffix == ".msa" else cube  # msa holds one spectrum
    signal = eels_ad.to_hyperspy(source)
    if suffix == ".msa":
        signal = signal.inav[0, 0]
    path = tmp_path / f"cube{suffix}"
    signal.save(path)
    back = load(path)
    assert back.shape == source.shape
    np.testing.assert_allclose(back.values, source.values, rtol=1e-5)
    np.testing.assert_allclose(back["energy"].values, source["energy"].values, rtol=1e-6)


def test_line_scan_from_hyperspy():
    import hyperspy.api as hs

    signal = hs.signals.Signal1D(np.ones((7, 12)))
    signal.axes_manager.signal_axes[0].units = "eV"
    cube = eels_ad.from_hyperspy(signal)
    assert cube.shape == (1, 7, 12)


def test_missing_file_and_unsupported_suffix(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.dm4: no such file"):
        load(tmp_path / "nope.dm4")
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(DatacubeReadError, match=r"notes.txt: unsupported file type \.txt"):
        load(text)


def test_text_file_named_dm4_and_truncated_files(tmp_path, cube, real_si_path):
    fake = tmp_path / "fake.dm4"
    fake.write_text("this is not a Digital Micrograph file")
    with pytest.raises(DatacubeReadError, match="fake.dm4: cannot be read as .dm4"):
        load(fake)
    truncated = tmp_path / "truncated.dm3"
    truncated.write_bytes(real_si_path.read_bytes()[:50_000])
    with pytest.raises(DatacubeReadError, match="truncated.dm3"):
        load(truncated)
    good = save(cube, tmp_path / "good.nc")
    broken_nc = tmp_path / "broken.nc"
    broken_nc.write_bytes(good.read_bytes()[:300])
    with pytest.raises(DatacubeReadError, match="broken.nc: cannot be read as NetCDF"):
        load(broken_nc)
    # nothing else touched
    assert fake.read_text() == "this is not a Digital Micrograph file"


def test_netcdf_with_wrong_dims(tmp_path):
    xr.DataArray(np.ones((3, 4)), dims=("a", "b"), name="counts").to_netcdf(tmp_path / "w.nc", engine="h5netcdf")
    with pytest.raises(DatacubeReadError, match=r"w.nc: variable 'counts' has dims \('a', 'b'\)"):
        load(tmp_path / "w.nc")


def test_find_datacubes(tmp_path, cube):
    save(cube, tmp_path / "b.nc")
    save(cube, tmp_path / "a.nc")
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / ".a.nc.123.tmp").write_text("x")
    (tmp_path / "sub").mkdir()
    save(cube, tmp_path / "sub" / "c.nc")
    assert [p.name for p in find_datacubes(tmp_path)] == ["a.nc", "b.nc"]
    assert [p.name for p in find_datacubes(tmp_path, recursive=True)] == ["a.nc", "b.nc", "c.nc"]
    assert [p.name for p in find_datacubes(tmp_path, "b*")] == ["b.nc"]
    with pytest.raises(NotADirectoryError):
        find_datacubes(tmp_path / "a.nc")


def test_import_is_light():
    code = "import sys, eels_ad; print('torch' in sys.modules, 'holoviews' in sys.modules, 'hyperspy' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(Path(eels_ad.__file__).parent.parent)})
    assert out.stdout.split() == ["False", "False", "False"]
