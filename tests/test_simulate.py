import numpy as np
import pytest
import xarray as xr

from eels_ad.simulate import (
    anomaly_mask,
    fe_l23_edge,
    peak_energy,
    roll_l3_window,
    shift_spectrum,
    simulate_fe_l23,
)


def test_same_seed_same_cube_other_seed_other_cube():
    a = simulate_fe_l23((12, 10), seed=5, anomaly_fraction=0.05)
    b = simulate_fe_l23((12, 10), seed=5, anomaly_fraction=0.05)
    c = simulate_fe_l23((12, 10), seed=6, anomaly_fraction=0.05)
    xr.testing.assert_identical(a, b)
    assert not np.array_equal(a["counts"].values, c["counts"].values)


@pytest.mark.parametrize("dose", [20.0, 200.0])
def test_mean_pre_edge_counts_match_dose(dose):
    sim = simulate_fe_l23((48, 48), dose=dose, seed=1)
    lo, hi = sim.attrs["dose_window_eV"]
    measured = float(sim["counts"].sel(energy=slice(lo, hi)).mean())
    assert measured == pytest.approx(dose, rel=0.02)


@pytest.mark.parametrize("shift", [0.1, 0.5, 1.0, -0.7, 2.0])
def test_shift_moves_l3_maximum_noise_free(shift):
    sim = simulate_fe_l23((4, 4), shift=shift, anomaly_fraction=0.25, noise=False, concentration_variation=0,
                          thickness_variation=0, seed=2)
    energy = sim["energy"].values
    bulk = sim["counts"].values[~sim["anomaly"].values][0]
    shifted = sim["counts"].values[sim["anomaly"].values][0]
    moved = peak_energy(shifted, energy) - peak_energy(bulk, energy)
    assert moved == pytest.approx(shift, abs=0.05)
    # the whole edge moves: L2 too
    window = (715.0, 730.0)
    moved_l2 = peak_energy(shifted, energy, window) - peak_energy(bulk, energy, window)
    assert moved_l2 == pytest.approx(shift, abs=0.05)


def test_shift_is_not_a_circular_roll():
    energy = np.linspace(700, 720, 81)
    spectrum = np.exp(-0.5 * ((energy - 718.0) / 0.5) ** 2)
    shifted = shift_spectrum(spectrum, energy, 5.0)
    # what leaves the top end does not come back at the bottom
    assert shifted[:20].max() < 1e-6
    assert peak_energy(shift_spectrum(spectrum, energy, -3.0), energy) == pytest.approx(715.0, abs=0.02)


@pytest.mark.parametrize("layout", ["pixels", "clusters", "line"])
@pytest.mark.parametrize("fraction", [0.0, 0.005, 0.05, 0.2])
def test_anomaly_fraction_matches_request(layout, fraction):
    sim = simulate_fe_l23((40, 50), anomaly_fraction=fraction, layout=layout, seed=3)
    assert int(sim["anomaly"].sum()) == round(fraction * 2000)
    np.testing.assert_array_equal(sim["shift"].values != 0, sim["anomaly"].values)


def test_clusters_are_compact_and_lines_are_straight():
    from scipy import ndimage

    blobs = anomaly_mask((64, 64), 0.05, "clusters", cluster_radius=2.5, seed=4)
    _, n_blobs = ndimage.label(blobs)
    assert n_blobs <= 205 / 10  # blobs of ~20 px, not scattered pixels
    line = anomaly_mask((64, 64), 0.03, "line", seed=4)
    yy, xx = np.nonzero(line)
    coefficients = np.polyfit(xx, yy, 1) if np.ptp(xx) >= np.ptp(yy) else np.polyfit(yy, xx, 1)
    residual = (yy - np.polyval(coefficients, xx)) if np.ptp(xx) >= np.ptp(yy) else (xx - np.polyval(coefficients, yy))
    assert np.abs(residual).max() < 3


def test_overdispersion_inflates_variance():
    flat = dict(thickness_variation=0.0, concentration_variation=0.0, anomaly_fraction=0.0, seed=7)
    poisson = simulate_fe_l23((40, 40), **flat)["counts"].values[..., :40]
    gamma_poisson = simulate_fe_l23((40, 40), overdispersion=0.05, **flat)["counts"].values[..., :40]
    mean = poisson.mean()
    assert poisson.var(axis=(0, 1)).mean() / mean == pytest.approx(1.0, abs=0.1)
    expected = 1 + 0.05 * gamma_poisson.mean()
    assert gamma_poisson.var(axis=(0, 1)).mean() / gamma_poisson.mean() == pytest.approx(expected, rel=0.15)


def test_ratio_and_intensity_anomalies():
    base = dict(noise=False, thickness_variation=0, concentration_variation=0, anomaly_fraction=0.25, seed=1)
    ratio = simulate_fe_l23((4, 4), shift=0.0, anomaly_l3_l2_ratio=6.0, **base)
    bulk = ratio["counts"].values[~ratio["anomaly"].values][0]
    changed = ratio["counts"].values[ratio["anomaly"].values][0]
    assert changed.max() > bulk.max()  # more L3 weight
    np.testing.assert_array_equal(np.unique(ratio["l3_l2_ratio"]), [4.0, 6.0])
    weaker = simulate_fe_l23((4, 4), shift=0.0, anomaly_intensity=0.5, **base)
    bulk = weaker["counts"].values[~weaker["anomaly"].values][0]
    changed = weaker["counts"].values[weaker["anomaly"].values][0]
    assert changed.max() < bulk.max()
    np.testing.assert_allclose(changed[:10], bulk[:10], rtol=0.005)  # background (but the edge tails) untouched
    assert changed.max() < 0.8 * bulk.max()


def test_defaults_look_like_the_real_fe_oxide(real_si_path):
    """Peak-to-background shape of the default edge next to the real SI (material pixels)."""
    import eels_ad

    real = eels_ad.load(real_si_path)
    totals = real.sum("energy").values
    material = real.values[totals > np.percentile(totals, 25)].mean(0)
    energy = real["energy"].values + 8.0  # the stored axis is about 8 eV low
    sim = simulate_fe_l23((16, 16), noise=False, anomaly_fraction=0.0, seed=0)
    simulated = sim["counts"].mean(("y", "x")).values
    sim_energy = sim["energy"].values

    def shape_ratios(spectrum, axis):
        pre = spectrum[(axis >= 694) & (axis <= 704)].mean()
        l3 = spectrum[(axis > 704) & (axis < 714)].max()
        l2 = spectrum[(axis > 716) & (axis < 726)].max()
        return l3 / pre, l2 / l3

    real_l3, real_l2 = shape_ratios(material, energy)
    sim_l3, sim_l2 = shape_ratios(simulated, sim_energy)
    assert sim_l3 == pytest.approx(real_l3, rel=0.2)
    assert sim_l2 == pytest.approx(real_l2, rel=0.2)


def test_reference_spectra_chemical_shift_matches_default_scale(reference_spectra_path):
    import pandas as pd

    table = pd.read_csv(reference_spectra_path)
    energy = table["energy_eV"].to_numpy()
    wustite = table.filter(like="wustite").mean(axis=1).to_numpy()
    magnetite = table.filter(like="magnetite").mean(axis=1).to_numpy()
    chemical_shift = peak_energy(magnetite, energy) - peak_energy(wustite, energy)
    assert 1.0 < chemical_shift < 3.0  # the simulator's default 1 eV anomaly is a realistic size
    # and the spin-orbit splitting of the model is that of the references
    l2_minus_l3 = peak_energy(wustite, energy, (715, 730)) - peak_energy(wustite, energy)
    model = fe_l23_edge(energy)
    model_split = peak_energy(model, energy, (715, 730)) - peak_energy(model, energy)
    assert model_split == pytest.approx(l2_minus_l3, abs=0.5)


def test_paper_protocol_rolls_the_l3_window():
    sim = simulate_fe_l23((20, 20), anomaly_fraction=0.0, seed=8)
    cube = sim["counts"]
    rolled = roll_l3_window(cube, 8, anomaly_fraction=0.014, seed=1)
    mask = rolled["anomaly"].values
    assert mask.sum() == round(0.014 * 400)
    np.testing.assert_array_equal(rolled["counts"].values[~mask], cube.values[~mask])
    changed = rolled["counts"].values[mask][0]
    original = cube.values[mask][0]
    lo, hi = rolled.attrs["window_eV"]
    inside = (cube["energy"].values >= lo) & (cube["energy"].values <= hi)
    np.testing.assert_array_equal(changed[inside], np.roll(original[inside], 8))
    np.testing.assert_array_equal(changed[~inside], original[~inside])
    assert float(rolled["shift"].max()) == pytest.approx(8 * 0.25)


def test_bad_parameters_are_named():
    with pytest.raises(ValueError, match="fraction must be in"):
        simulate_fe_l23((4, 4), anomaly_fraction=1.5)
    with pytest.raises(ValueError, match="dose must be a finite number > 0"):
        simulate_fe_l23((4, 4), dose=0)
    with pytest.raises(ValueError, match="layout must be"):
        simulate_fe_l23((4, 4), layout="stripes")
    with pytest.raises(ValueError, match="overdispersion"):
        simulate_fe_l23((4, 4), overdispersion=-1)


def test_the_function_and_its_recipe_take_the_same_parameters():
    import dataclasses
    import inspect

    from eels_ad.simulate import FeL23Recipe, simulate_fe_l23

    signature = inspect.signature(simulate_fe_l23).parameters
    fields = {f.name: f.default for f in dataclasses.fields(FeL23Recipe)}
    assert list(signature) == list(fields)
    assert {name: p.default for name, p in signature.items()} == fields
    recipe = FeL23Recipe(shape=(6, 5), shift=0.5, seed=3)
    xr.testing.assert_identical(recipe.simulate(), simulate_fe_l23((6, 5), shift=0.5, seed=3))
