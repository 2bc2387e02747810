"""One contract, checked on every detector (as scikit-learn's ``parametrize_with_checks`` does)."""

import inspect

import numpy as np
import pytest
import xarray as xr

import eels_ad
from eels_ad.detect import MODELS, BaseDetector, NotFittedError, PCADetector, SklearnDetector, detector_class
from eels_ad.detect._scores import score_spectra

ENERGY = 690.0 + 0.5 * np.arange(64)


def _isolation_forest():
    from sklearn.ensemble import IsolationForest

    return SklearnDetector(IsolationForest(n_estimators=20, random_state=0))


def _cvae():
    from eels_ad.detect import CVAEDetector

    return CVAEDetector(patch_size=4, stride=4, widths=(4, 8, 8), latent_dim=4, max_epochs=1, batch_size=8,
                        progress=False)


DETECTORS = {
    "pca": lambda: PCADetector(n_components=2),
    "pca-robust-shift": lambda: PCADetector(robust=True, scoring="shift"),
    "isolation-forest": _isolation_forest,
    "cvae": _cvae,
}


@pytest.fixture(scope="module")
def cubes():
    bulk = eels_ad.simulate_fe_l23((12, 12), energy=ENERGY, anomaly_fraction=0.0, seed=1)["counts"]
    test = eels_ad.simulate_fe_l23((10, 11), energy=ENERGY, anomaly_fraction=0.05, shift=2.0, seed=2)["counts"]
    return bulk, test


@pytest.fixture(scope="module", params=sorted(DETECTORS))
def fitted(request, cubes):
    detector = DETECTORS[request.param]()
    assert detector.fit(cubes[0]) is detector
    return detector


@pytest.mark.parametrize("name", sorted(DETECTORS))
def test_parameters_are_the_init_arguments(name):
    detector = DETECTORS[name]()
    names = [p for p in inspect.signature(type(detector).__init__).parameters if p != "self"]
    assert list(detector.get_params()) == names
    assert repr(detector).startswith(type(detector).__name__ + "(")
    with pytest.raises(NotFittedError, match="call fit"):
        detector.score(eels_ad.simulate_fe_l23((4, 4), energy=ENERGY, seed=0)["counts"])
    assert not detector.is_fitted


def test_fitted_state_and_scores(fitted, cubes):
    _, test = cubes
    for name in ("energy_", "calibration_scores_", "threshold_", "n_training_spectra_"):
        assert hasattr(fitted, name), name
    assert fitted.n_training_spectra_ == 144
    assert 0 < fitted.calibration_scores_.size <= 144
    scores = fitted.score(test)
    assert scores.dims == ("y", "x") and scores.shape == (10, 11)
    assert np.all(np.isfinite(scores.values))
    labels = fitted.predict(test)
    assert labels.dtype == bool
    xr.testing.assert_identical(labels, fitted.flag(scores))
    assert labels.attrs["threshold"] == fitted.threshold_for(scores)
    with pytest.raises(TypeError, match="predict"):
        fitted.flag(test)


def test_what_is_scored_is_what_reconstruct_shows(fitted, cubes):
    _, test = cubes
    try:
        model = fitted.reconstruct(test)
    except NotImplementedError as error:
        assert "does not reconstruct" in str(error)
        return
    assert model.dims == ("y", "x", "energy") and model.shape == (10, 11, 64)
    expected = score_spectra(test.values.reshape(-1, 64), model.values.reshape(-1, 64), fitted.scoring)
    scores = fitted.score(test)  # spatial by default: the per-pixel scores travel as a coordinate
    np.testing.assert_allclose(scores["pixel_score"].values.ravel(), expected, rtol=1e-6, atol=1e-9)


def test_save_and_load_through_one_function(fitted, cubes, tmp_path):
    _, test = cubes
    path = tmp_path / "model.nc"
    try:
        fitted.save(path)
    except NotImplementedError as error:
        assert "cannot be saved" in str(error) and not path.exists()
        return
    loaded = eels_ad.detect.load(path)
    assert type(loaded) is type(fitted)
    assert loaded.get_params() == fitted.get_params()
    xr.testing.assert_identical(loaded.score(test), fitted.score(test))
    np.testing.assert_array_equal(loaded.calibration_scores_, fitted.calibration_scores_)
    with pytest.raises(FileExistsError):
        fitted.save(path)
    other = PCADetector if type(fitted) is not PCADetector else SklearnDetector
    with pytest.raises(ValueError, match=f"not a {other.__name__}"):
        other.load(path)


def test_another_energy_axis_is_a_clear_error(fitted, cubes):
    _, test = cubes
    with pytest.raises(ValueError, match=r"does not cover the fitted one"):
        fitted.score(test.assign_coords(energy=test["energy"] + 5.0))


@pytest.mark.parametrize("name", sorted(DETECTORS))
def test_bad_parameters_fail_before_fitting(name, cubes):
    detector = DETECTORS[name]()
    detector.threshold = "median"
    with pytest.raises(ValueError, match="threshold must be one of"):
        detector.fit(cubes[0])
    assert not detector.is_fitted


def test_registry_knows_every_model_and_class():
    for name in MODELS.values():
        assert issubclass(detector_class(name), BaseDetector)
    with pytest.raises(ValueError, match="no detector class 'Nope'"):
        detector_class("Nope")


def test_an_incomplete_detector_cannot_be_made():
    class Half(BaseDetector):
        def _fit(self, cube, mask, energy):
            return None

    with pytest.raises(TypeError, match="abstract"):
        Half()
