"""The quantity maps: edge shifts, drift, white-line ratios and valence, with their error bars."""

import json

import numpy as np
import pytest
import xarray as xr

import eels_ad
from eels_ad.prepare import align_energy, prepare, zero_loss_drift
from eels_ad.quantify import edge_shift_map, read_references, separate_drift, valence_map, white_line_ratio_map
from eels_ad.simulate import FE_L3_ONSET, fe_l23_edge, simulate_mixture


def _counts(array: xr.DataArray) -> xr.DataArray:
    return array.assign_attrs(units="counts")


@pytest.fixture(scope="module")
def bulk_template() -> xr.DataArray:
    """The noise-free bulk spectrum (background included), as a user's reference."""
    clean = eels_ad.simulate_fe_l23((8, 8), anomaly_fraction=0.0, noise=False, seed=11)
    return clean["counts"].mean(("y", "x"))


def test_known_shift_map_recovered_noise_free(bulk_template):
    sim = eels_ad.simulate_fe_l23((12, 12), anomaly_fraction=0.0, drift=1.2, row_jitter=0.05, noise=False, seed=3)
    shifts = edge_shift_map(_counts(sim["counts"]), bulk_template, max_shift=2.0)
    assert bool(shifts["converged"].all())
    assert float(abs(shifts["shift"] - sim["drift"]).max()) < 1e-3


def test_error_bars_cover_the_truth():
    sim = eels_ad.simulate_fe_l23((40, 40), shift=0.5, anomaly_fraction=0.1, dose=200, seed=4)
    shifts = edge_shift_map(sim["counts"])
    inside = np.abs(shifts["shift"] - sim["shift"]) < shifts["shift_error"]
    assert 0.62 < float(inside.mean()) < 0.74
    anomalous = shifts["shift"].where(sim["anomaly"]).mean()
    assert abs(float(anomalous) - 0.5) < 0.02
    assert abs(float(shifts["shift"].where(~sim["anomaly"]).mean())) < 0.005
    assert shifts["shift"].attrs["units"] == "eV"


def test_shift_map_lazy_equals_eager():
    sim = eels_ad.simulate_fe_l23((12, 10), shift=0.5, anomaly_fraction=0.1, seed=5)
    eager = edge_shift_map(sim["counts"], chunk_pixels=30)
    lazy = edge_shift_map(sim["counts"].chunk({"y": 4}), chunk_pixels=30)
    xr.testing.assert_allclose(eager["shift"], lazy["shift"])


def test_per_pixel_template_from_a_detector():
    from eels_ad.detect import PCADetector

    bulk = eels_ad.simulate_fe_l23((24, 24), anomaly_fraction=0.0, seed=6)["counts"]
    sim = eels_ad.simulate_fe_l23((24, 24), shift=0.5, anomaly_fraction=0.05, seed=7)
    model = PCADetector(poisson_normalize=True).fit(bulk).reconstruct(sim["counts"])
    shifts = edge_shift_map(sim["counts"], model)
    assert float(shifts["shift"].where(sim["anomaly"]).mean()) > 0.35
    assert abs(float(shifts["shift"].where(~sim["anomaly"]).median())) < 0.02
    assert "per-pixel" in shifts.attrs["template"]


def test_drift_from_the_low_loss():
    sim = eels_ad.simulate_fe_l23((24, 24), drift=1.5, row_jitter=0.05, low_loss=True, shift=0.5,
                                  anomaly_fraction=0.05, seed=8)
    drift = zero_loss_drift(sim["low_loss"])
    error = drift["drift"] - sim["drift"]
    assert float(np.sqrt((error ** 2).mean())) < 0.02
    assert bool(drift["converged"].all())
    shifts = edge_shift_map(sim["counts"], drift=drift, max_shift=1.0)
    local = shifts["shift"]
    assert abs(float(local.where(sim["anomaly"]).mean()) - 0.5) < 0.03
    assert abs(float(local.where(~sim["anomaly"]).mean())) < 0.01
    assert float(local.where(~sim["anomaly"]).std()) < 1.2 * float(shifts["shift_error"].mean())


def test_zero_loss_centre_agrees_with_exspy():
    hs = pytest.importorskip("hyperspy.api")
    pytest.importorskip("exspy")
    sim = eels_ad.simulate_fe_l23((4, 5), drift=1.0, low_loss=True, seed=9)
    ours = zero_loss_drift(sim["low_loss"])["zero_loss_centre"].values
    signal = hs.signals.Signal1D(sim["low_loss"].values.astype(float))
    signal.set_signal_type("EELS")
    axis = signal.axes_manager.signal_axes[0]
    energy = sim["low_loss_energy"].values
    axis.offset, axis.scale = float(energy[0]), float(energy[1] - energy[0])
    theirs = signal.estimate_zero_loss_peak_centre().data
    # eXSpy takes the largest channel: within one channel of our sub-channel fit
    assert np.abs(theirs - ours).max() <= axis.scale


def test_align_energy_moves_spectra_back():
    sim = eels_ad.simulate_fe_l23((6, 6), drift=1.0, anomaly_fraction=0.0, noise=False, seed=10)
    aligned = align_energy(_counts(sim["counts"]), sim["drift"])
    spread = aligned.values[:, :, 20:-20].std(axis=(0, 1)) / aligned.values[:, :, 20:-20].mean(axis=(0, 1))
    before = sim["counts"].values[:, :, 20:-20]
    assert spread.max() < 0.5 * (before.std(axis=(0, 1)) / before.mean(axis=(0, 1))).max()
    assert "not Poisson" in aligned.attrs["aligned"]


def test_separate_drift_finds_local_shifts():
    from sklearn.metrics import roc_auc_score

    sim = eels_ad.simulate_fe_l23((40, 40), drift=1.0, row_jitter=0.05, shift=0.3, layout="clusters",
                                  anomaly_fraction=0.05, seed=12)
    first = edge_shift_map(sim["counts"], max_shift=2.5)
    parts = separate_drift(edge_shift_map(sim["counts"], drift=separate_drift(first)["drift"], max_shift=1.0))
    offset = (parts["drift"] - sim["drift"]).values
    assert float(np.sqrt(np.mean((offset - offset.mean()) ** 2))) < 0.05
    auc = roc_auc_score(sim["anomaly"].values.ravel(), np.abs(parts["local_z"].fillna(0).values.ravel()))
    assert auc >= 0.99


def test_white_line_ratio_and_its_errors():
    sim = eels_ad.simulate_fe_l23((32, 32), anomaly_l3_l2_ratio=5.0, anomaly_fraction=0.2, shift=0.0, dose=200,
                                  include_expected=True, seed=13)
    ratio = white_line_ratio_map(sim["counts"])
    windows = {key[:-3]: tuple(ratio.attrs[key]) for key in
               ("l3_range_eV", "l2_range_eV", "background_range_eV", "continuum_range_eV")}
    clean = white_line_ratio_map(_counts(sim["expected"]), **windows)
    assert float(clean["l3_l2_ratio"].where(sim["anomaly"]).mean()) > float(clean["l3_l2_ratio"].where(
        ~sim["anomaly"]).mean()) + 0.5
    z = (ratio["l3_l2_ratio"] - clean["l3_l2_ratio"]) / ratio["l3_l2_ratio_error"]
    assert 0.62 < float((np.abs(z) < 1).mean()) < 0.75
    assert abs(ratio.attrs["l3_eV"] - FE_L3_ONSET) < 0.5


def _synthetic_references() -> xr.DataArray:
    energy = np.arange(695.0, 735.0, 0.1)
    ferrous = fe_l23_edge(energy, l3=708.5, continuum=0.3)
    ferric = fe_l23_edge(energy, l3=710.1, l3_l2_ratio=5.0, continuum=0.3)
    return xr.DataArray(np.stack([ferrous, ferric]), dims=("component", "energy"),
                        coords={"component": ["Fe2+", "Fe3+"], "energy": energy})


def test_valence_fractions_recovered():
    references = _synthetic_references()
    fraction = np.random.default_rng(0).uniform(0, 1, (24, 24))
    sim = simulate_mixture(references, fraction, dose=200, seed=1)
    valence = valence_map(sim["counts"], references)
    estimate = valence["fraction"].sel(component="Fe2+").values
    assert float(np.sqrt(np.mean((estimate - fraction) ** 2))) < 0.03
    assert np.allclose(valence["fraction"].sum("component"), 1.0)
    assert bool((valence["fraction"] >= 0).all())
    error = valence["fraction_error"].sel(component="Fe2+").values
    assert 0.6 < float(np.mean(np.abs(estimate - fraction) < error)) < 0.78


@pytest.mark.shared
def test_valence_with_the_shared_references(reference_spectra_path):
    references = read_references(reference_spectra_path)
    assert list(references["component"].values) == ["wustite", "magnetite"]
    fraction = np.random.default_rng(1).uniform(0, 1, (20, 20))
    sim = simulate_mixture(references, fraction, dose=200, seed=2)
    estimate = valence_map(sim["counts"], references)["fraction"].sel(component="wustite").values
    assert float(np.sqrt(np.mean((estimate - fraction) ** 2))) < 0.025


# ---- bad input --------------------------------------------------------------------------------------


def test_low_loss_of_another_shape_is_refused():
    sim = eels_ad.simulate_fe_l23((6, 6), seed=0)
    other = eels_ad.simulate_fe_l23((5, 6), low_loss=True, drift=0.5, seed=0)
    with pytest.raises(ValueError, match=r"\(5, 6\).*\(6, 6\)"):
        edge_shift_map(sim["counts"], drift=zero_loss_drift(other["low_loss"]))


def test_energy_range_outside_the_cube():
    sim = eels_ad.simulate_fe_l23((4, 4), seed=0)
    with pytest.raises(ValueError, match="outside the cube's energy axis"):
        edge_shift_map(sim["counts"], energy_range=(600, 720))


def test_template_that_does_not_cover_the_window():
    sim = eels_ad.simulate_fe_l23((4, 4), seed=0)
    short = sim["counts"].mean(("y", "x")).sel(energy=slice(700, 720))
    with pytest.raises(ValueError, match="template covers"):
        edge_shift_map(sim["counts"], short, energy_range=(690, 730))


def test_empty_pixels_are_nan_not_a_crash():
    sim = eels_ad.simulate_fe_l23((6, 6), seed=0)
    counts = sim["counts"].copy()
    counts[0, 0] = 0
    counts[0, 1] = 0
    counts[0, 1, 100] = 3  # too few counts
    shifts = edge_shift_map(counts)
    assert np.isnan(shifts["shift"][0, 0]) and np.isnan(shifts["shift"][0, 1])
    assert not bool(shifts["converged"][0, 0]) and not bool(shifts["converged"][0, 1])
    assert bool(shifts["converged"][1:].all())


def test_shift_beyond_the_allowed_range_is_flagged():
    sim = eels_ad.simulate_fe_l23((10, 10), shift=1.5, anomaly_fraction=0.1, seed=1)
    shifts = edge_shift_map(sim["counts"], max_shift=0.5)
    assert bool(shifts["at_limit"].where(sim["anomaly"], True).all())
    assert not bool(shifts["converged"].where(sim["anomaly"], False).any())
    assert float(abs(shifts["shift"]).max()) <= 0.5 + 1e-9


def test_nan_counts_are_refused():
    sim = eels_ad.simulate_fe_l23((4, 4), seed=0)
    counts = sim["counts"].astype(float)
    counts[1, 2, 5] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        edge_shift_map(counts)
    with pytest.raises(ValueError, match="non-finite"):
        white_line_ratio_map(counts)


def test_negative_counts_are_clipped_as_everywhere():
    sim = eels_ad.simulate_fe_l23((6, 6), seed=0)
    counts = sim["counts"].astype(float)
    counts[1, 2, 5] = -4
    shifts = edge_shift_map(counts)
    assert bool(shifts["converged"].all())


def test_prepared_real_like_cube_with_spikes():
    sim = eels_ad.simulate_fe_l23((16, 16), shift=0.5, anomaly_fraction=0.05, spikes=2e-4, seed=14)
    assert int(sim["spike"].sum()) > 0
    ready = prepare(sim["counts"], gain=1.0)
    shifts = edge_shift_map(ready)
    assert float(np.sqrt(((shifts["shift"] - sim["shift"]) ** 2).mean())) < 0.05


# ---- the command line -------------------------------------------------------------------------------


def test_cli_quantify_with_low_loss_and_without(tmp_path, capsys):
    from eels_ad.cli import main

    sim_path = tmp_path / "sim.nc"
    assert main(["simulate", str(sim_path), "--shape", "16", "16", "--drift", "1", "--row-jitter", "0.05",
                 "--low-loss", "--shift", "0.5", "--anomaly-fraction", "0.05", "--seed", "3"]) == 0
    assert (tmp_path / "sim_low_loss.nc").exists()
    truth = eels_ad.open_results(sim_path)
    out = tmp_path / "with"
    assert main(["quantify", str(tmp_path), "--low-loss-suffix", "_low_loss", "--white-line-ratio",
                 "--out", str(out), "--quiet"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    # the low-loss file is not an input
    assert summary["counts"] == {"done": 1, "skipped": 0, "failed": 0, "retried": 0}
    result = eels_ad.open_results(out / "sim.quantify.nc")
    assert "zero-loss" in result.attrs["drift_source"]
    assert float(np.sqrt(((result["drift"] - truth["drift"]) ** 2).mean())) < 0.02
    assert float(np.sqrt(((result["shift"] - truth["shift"]) ** 2).mean())) < 0.05
    assert "l3_l2_ratio" in result
    # again: the complete output is skipped, not overwritten
    assert main(["quantify", str(sim_path), "--low-loss-suffix", "_low_loss", "--out", str(out), "--quiet"]) == 0
    assert json.loads((out / "summary.json").read_text())["counts"]["skipped"] == 1

    plain = tmp_path / "without"
    assert main(["quantify", str(sim_path), "--out", str(plain), "--quiet"]) == 0
    separated = eels_ad.open_results(plain / "sim.quantify.nc")
    assert "separated" in separated.attrs["drift_source"]
    offset = (separated["drift"] - truth["drift"]).values
    assert float(np.sqrt(np.mean((offset - offset.mean()) ** 2))) < 0.05


def test_cli_quantify_bad_low_loss(tmp_path, capsys):
    from eels_ad.cli import main

    good = tmp_path / "a.nc"
    other = tmp_path / "b.nc"
    assert main(["simulate", str(good), "--shape", "8", "8", "--seed", "1"]) == 0
    assert main(["simulate", str(other), "--shape", "6", "8", "--low-loss", "--seed", "2"]) == 0
    capsys.readouterr()
    # as many low-loss files as inputs
    assert main(["quantify", str(good), str(other), "--low-loss", str(tmp_path / "b_low_loss.nc"),
                 "--out", str(tmp_path / "o1"), "--quiet"]) == 1
    assert "1 low-loss files for 2 core-loss inputs" in capsys.readouterr().err
    # a low loss of another shape: that file fails with both shapes named, the others go on
    assert main(["quantify", str(good), str(other), "--low-loss", str(tmp_path / "b_low_loss.nc"),
                 str(tmp_path / "b_low_loss.nc"), "--out", str(tmp_path / "o2"), "--quiet"]) == 1
    error = capsys.readouterr().err
    assert "(6, 8)" in error and "(8, 8)" in error and "a.nc" in error
    assert (tmp_path / "o2" / "b.quantify.nc").exists()
