import numpy as np
import pytest
import xarray as xr

import eels_ad
from eels_ad.detect import PCADetector
from eels_ad.prepare import estimate_gain, find_spikes, prepare, remove_spikes, vacuum_mask


@pytest.fixture(scope="module")
def shifted():
    return eels_ad.simulate_fe_l23((32, 32), anomaly_fraction=0.03, shift=1.0, dose=2000, seed=5)


def with_spikes(counts: xr.DataArray, seed: int = 0, n: int = 12):
    rng = np.random.default_rng(seed)
    hit = counts.copy()
    positions = [(int(rng.integers(1, 31)), int(rng.integers(1, 31)), int(rng.integers(5, 315))) for _ in range(n)]
    for y, x, e in positions:
        hit[y, x, e] = int(hit[y, x, e]) * 8 + 500
    return hit, positions


@pytest.mark.parametrize("gain", [1.0, 7.0, 60_000.0])
def test_gain_is_recovered_at_any_dose(gain):
    for dose in (2.0, 200.0):
        counts = eels_ad.simulate_fe_l23((32, 32), dose=dose, anomaly_fraction=0.0, seed=3)["counts"]
        assert estimate_gain(counts * gain).gain == pytest.approx(gain, rel=0.06)


def test_spikes_are_found_and_repaired_but_chemistry_is_not(shifted):
    hit, positions = with_spikes(shifted["counts"])
    spikes = find_spikes(hit)
    assert {tuple(p) for p in np.argwhere(spikes.values)} == set(positions)
    repaired = remove_spikes(hit)
    assert repaired.dtype == hit.dtype and repaired.attrs["n_spikes"] == len(positions)
    for y, x, e in positions:
        truth = float(shifted["counts"][y, x, e])
        assert abs(float(repaired[y, x, e]) - truth) < 5 * np.sqrt(truth) + 5
    untouched = ~repaired["spike"].values
    np.testing.assert_array_equal(repaired.values[untouched], hit.values[untouched])
    # the 1 eV shifted pixels, the white lines and low doses give no false spike
    assert not find_spikes(shifted["counts"]).values.any()
    low = eels_ad.simulate_fe_l23((32, 32), anomaly_fraction=0.05, shift=2.0, dose=1.0, seed=6)["counts"]
    assert not find_spikes(low).values.any()


def test_spikes_are_not_flagged_once_prepared():
    bulk = eels_ad.simulate_fe_l23((32, 32), anomaly_fraction=0.0, seed=7)["counts"]
    hit, positions = with_spikes(bulk, seed=1, n=5)
    spiky = {(y, x) for y, x, _ in positions}
    raw_labels = PCADetector(robust=True).fit(hit).predict(hit)
    assert spiky <= {tuple(p) for p in np.argwhere(raw_labels.values)}  # what it was: spikes flagged
    ready = prepare(hit)
    labels = PCADetector(robust=True).fit(ready).predict(ready)
    assert not any(labels.values[y, x] for y, x in spiky)


def test_vacuum_is_marked_never_trained_on_nor_flagged():
    sim = eels_ad.simulate_fe_l23((24, 24), anomaly_fraction=0.02, shift=2.0, seed=8)
    counts = sim["counts"].copy()
    counts[:, :5] = np.random.default_rng(0).poisson(2.0, (24, 5, 320))  # a vacuum strip: a little background
    ready = prepare(counts)
    assert ready["vacuum"].dims == ("y", "x") and int(ready["vacuum"].sum()) == 24 * 5
    assert ready.attrs["n_vacuum_pixels"] == 120
    detector = PCADetector(robust=True).fit(ready)
    assert detector.n_training_spectra_ == 24 * 19
    scores = detector.score(ready)
    assert "vacuum" in scores.coords
    labels = detector.flag(scores)
    assert not labels.values[:, :5].any()
    truth = sim["anomaly"].values & ~ready["vacuum"].values
    assert labels.values[truth].all()
    from eels_ad.stats import compare_regions

    table = compare_regions(ready, ~labels, labels)
    assert table.attrs["n_pixels_a"] + table.attrs["n_pixels_b"] == 24 * 19
    assert table.attrs["n_vacuum_left_out"] == 120


def test_prepare_says_what_it_did_and_round_trips(tmp_path):
    counts = eels_ad.simulate_fe_l23((16, 16), anomaly_fraction=0.0, seed=9)["counts"] * 25
    counts[3, 3, 50] += 200_000
    ready = prepare(counts)
    assert ready.attrs["gain"] == pytest.approx(25, rel=0.06) and ready.attrs["units"] == "electrons"
    assert ready.attrs["n_spikes"] == 1 and "1 spikes repaired" in ready.attrs["prepared"]
    assert float(ready.mean()) == pytest.approx(float(counts.mean()) / ready.attrs["gain"], rel=0.01)
    assert prepare(counts, gain=5.0).attrs["gain"] == 5.0
    assert prepare(counts, spikes=False).attrs["n_spikes"] == 0
    assert "vacuum" not in prepare(counts, vacuum=False).coords
    with pytest.raises(ValueError, match="prepared already"):
        prepare(ready)
    with pytest.raises(ValueError, match="gain must be"):
        prepare(counts, gain=-1)
    path = eels_ad.save(ready, tmp_path / "ready.nc")
    back = eels_ad.open_results(path)
    assert back["spike"].dtype == bool and back["vacuum"].dtype == bool
    assert bool(back["spike"][3, 3, 50])


@pytest.mark.shared
def test_real_fe_oxide_si(real_si_path):
    cube = eels_ad.load(real_si_path)
    ready = prepare(cube)
    # the counts of this SI are not electron counts: about 6 counts per electron
    assert 4 < ready.attrs["gain"] < 9
    spikes = {(int(y), int(x), float(cube["energy"][e])) for y, x, e in np.argwhere(ready["spike"].values)}
    assert (10, 8, 731.0) in spikes and (5, 10, 489.5) in spikes  # the two interior X-ray spikes
    assert len(spikes) < 20
    assert 55 <= int(ready["vacuum"].sum()) <= 70  # the README: 61 of the 323 pixels are vacuum
    mask = vacuum_mask(cube)
    np.testing.assert_array_equal(mask.values, ready["vacuum"].values)
    labels = PCADetector(robust=True).fit(ready).predict(ready)
    assert not (labels.values & ready["vacuum"].values).any()


def test_defaults_say_when_they_give_up():
    from eels_ad.reconstruct import denoise_cube, select_tau

    counts = eels_ad.simulate_fe_l23((16, 16), anomaly_fraction=0.0, seed=1)["counts"]
    with pytest.warns(UserWarning, match="max_components=1 keeps 1"):
        PCADetector(max_components=1).fit(counts * 6)  # counts that are not electron counts
    rng = np.random.default_rng(0)
    flat = rng.poisson(5.0, 400).astype(float)  # a constant truth: the largest weight always wins
    with pytest.warns(UserWarning, match="no interior minimum"):
        choice = select_tau(flat, taus=[0.01, 0.02, 0.04], penalty="tv", max_extensions=2, max_iter=20)
    assert choice.at_edge and choice.taus.size == 5
    with pytest.warns(UserWarning, match="not converged"):
        result = denoise_cube(counts.isel(y=slice(0, 6), x=slice(0, 6)), tau=1.0, max_iter=2, min_iter=1,
                              tol=1e-12)
    assert result.attrs["converged"] == 0


def test_prepare_is_reachable_from_the_package_face():
    assert eels_ad.prepare.prepare is prepare
