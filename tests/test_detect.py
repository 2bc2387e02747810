import numpy as np
import pytest
import xarray as xr

import eels_ad
from eels_ad import as_datacube
from eels_ad.detect import (
    NotFittedError,
    PCADetector,
    SklearnDetector,
    bimodality,
    choose_threshold,
    deviance_z,
    edge_shift_z,
    false_alarm_threshold,
    gmm_threshold,
    one_minus_correlation,
    otsu_threshold,
    pearson_residual,
    poisson_deviance,
    shift_or_deviance,
)
from eels_ad.evaluate import detection_metrics


@pytest.fixture(scope="module")
def bulk():
    return eels_ad.simulate_fe_l23((32, 32), anomaly_fraction=0.0, seed=11)["counts"]


@pytest.fixture(scope="module")
def shifted():
    return eels_ad.simulate_fe_l23((32, 32), anomaly_fraction=0.03, shift=1.0, seed=12)


def low_rank_cube(rank=3, shape=(20, 30), channels=50, seed=0):
    rng = np.random.default_rng(seed)
    basis = rng.uniform(1, 10, (rank, channels))
    loadings = rng.uniform(0.5, 2, (shape[0] * shape[1], rank))
    return as_datacube((loadings @ basis).reshape(*shape, channels), energy_offset=700, dispersion=0.5)


@pytest.mark.parametrize("poisson_normalize", [True, False])
def test_pca_reconstructs_noise_free_low_rank_cube(poisson_normalize):
    cube = low_rank_cube()
    detector = PCADetector(n_components=3, poisson_normalize=poisson_normalize).fit(cube)
    np.testing.assert_allclose(detector.reconstruct(cube).values, cube.values, rtol=1e-8)
    assert detector.explained_variance_ratio_[:3].sum() == pytest.approx(1.0)
    if poisson_normalize:  # uncentred: rank 3 needs all 3
        assert not np.allclose(PCADetector(n_components=2).fit(cube).reconstruct(cube).values, cube.values)


def test_auto_components_on_poisson_noise(bulk):
    detector = PCADetector().fit(bulk)
    # thickness x (background + edge) and the Fe concentration map: 2 real components
    assert 2 <= detector.n_components_ <= 3
    assert detector.eigenvalues_[detector.n_components_] < detector.noise_edge_
    # only the leading eigenpairs are computed: the same as the whole decomposition's
    assert detector.eigenvalues_.shape == (detector.max_components + 1,)
    spectra = bulk.values.reshape(-1, bulk.sizes["energy"]).astype(float)
    weighted = spectra / np.sqrt(spectra.sum(axis=1, keepdims=True)) / detector.channel_weights_  # Keenan-Kotula
    gram = weighted.T @ weighted / spectra.shape[0]
    values, vectors = np.linalg.eigh(gram)
    np.testing.assert_allclose(detector.eigenvalues_, values[::-1][:detector.max_components + 1], rtol=1e-8)
    np.testing.assert_allclose(detector.explained_variance_ratio_, detector.eigenvalues_ / values.sum(), rtol=1e-8)
    top = vectors[:, ::-1][:, :detector.n_components_].T
    np.testing.assert_allclose(np.abs(np.sum(top * detector.components_, axis=1)), 1.0, atol=1e-8)


@pytest.mark.parametrize("scoring", ["deviance", "residual", "correlation", "shift", "shift+deviance"])
@pytest.mark.parametrize("poisson_normalize", [True, False])
def test_scores_rank_injected_anomalies_above_bulk(bulk, shifted, scoring, poisson_normalize):
    detector = PCADetector(n_components=3, poisson_normalize=poisson_normalize, scoring=scoring).fit(bulk)
    scores = detector.score(shifted["counts"])
    assert scores.dims == ("y", "x")
    metrics = detection_metrics(scores, shifted["anomaly"], threshold=np.inf)
    assert metrics["roc_auc"] > 0.97


def test_scores_do_not_depend_on_cube_size(bulk, shifted):
    # per pixel (the spatial step pools neighbours, so a crop changes its borders)
    detector = PCADetector(n_components=3, spatial=False).fit(bulk)
    whole = detector.score(shifted["counts"])
    part = detector.score(shifted["counts"].isel(y=slice(5, 12), x=slice(3, 20)))
    xr.testing.assert_allclose(whole.isel(y=slice(5, 12), x=slice(3, 20)), part)
    small_chunks = PCADetector(n_components=3, chunk_pixels=50, spatial=False).fit(bulk)
    np.testing.assert_allclose(small_chunks.score(shifted["counts"]).values, whole.values, rtol=1e-9)
    np.testing.assert_allclose(np.abs(small_chunks.components_), np.abs(detector.components_), atol=1e-9)


def test_predict_finds_a_one_ev_shift(bulk, shifted):
    detector = PCADetector().fit(bulk)
    labels = detector.predict(shifted["counts"])
    assert labels.dtype == bool
    metrics = detection_metrics(detector.score(shifted["counts"]), shifted["anomaly"], labels)
    assert metrics["f1"] > 0.9


def test_robust_fit_on_a_contaminated_cube(shifted):
    naive = PCADetector().fit(shifted["counts"])
    robust = PCADetector(robust=True).fit(shifted["counts"])
    naive_auc = detection_metrics(naive.score(shifted["counts"]), shifted["anomaly"], threshold=0)["roc_auc"]
    robust_scores = robust.score(shifted["counts"])
    robust_metrics = detection_metrics(robust_scores, shifted["anomaly"], robust.predict(shifted["counts"]))
    assert robust.n_trimmed_ >= shifted["anomaly"].sum()
    assert robust_metrics["roc_auc"] > 0.99 > naive_auc
    assert robust_metrics["f1"] > 0.9


def test_trimmed_spectra_read_again_when_too_many_to_hold(shifted, monkeypatch):
    held = PCADetector(robust=True, chunk_pixels=64).fit(shifted["counts"])
    monkeypatch.setattr(PCADetector, "TRIMMED_HELD", 0)  # every trimmed spectrum read again from its rows
    read = PCADetector(robust=True, chunk_pixels=64).fit(shifted["counts"])
    assert read.n_trimmed_ == held.n_trimmed_ > 0
    np.testing.assert_allclose(read.components_, held.components_, atol=1e-12)
    # the default score's shift z amplifies the components' round-off
    np.testing.assert_allclose(read.calibration_scores_, held.calibration_scores_, rtol=1e-9)


def test_mask_selects_training_pixels(shifted):
    mask = ~shifted["anomaly"]
    detector = PCADetector(n_components=2).fit(shifted["counts"], mask=mask)
    assert detector.n_training_spectra_ == int(mask.sum())
    assert detector.calibration_scores_.size == int(mask.sum())
    with pytest.raises(ValueError, match="selects no pixel"):
        PCADetector().fit(shifted["counts"], mask=np.zeros((32, 32), bool))


def test_score_before_fit_is_a_clear_error(shifted):
    with pytest.raises(NotFittedError, match="not fitted yet: call fit"):
        PCADetector().score(shifted["counts"])


def test_energy_axis_mismatch_names_both_ranges(bulk):
    detector = PCADetector(n_components=2, energy_range=(690.0, 740.0)).fit(bulk)
    other = bulk.assign_coords(energy=bulk["energy"] - 30.0)
    with pytest.raises(ValueError, match=r"640\.000 - 719\.750 eV.*690\.000 - 740\.000 eV"):
        detector.score(other)
    # a wider cube on the same grid is fine: the fitted channels are picked out
    assert detector.score(bulk).shape == (32, 32)


def test_bad_parameters():
    cube = low_rank_cube()
    with pytest.raises(ValueError, match="scoring must be one of"):
        PCADetector(scoring="mse").fit(cube)
    with pytest.raises(ValueError, match="n_components must be"):
        PCADetector(n_components=0).fit(cube)
    with pytest.raises(ValueError, match="threshold must be"):
        PCADetector(threshold="median").fit(cube)
    with pytest.raises(ValueError, match="energy_range"):
        PCADetector(energy_range=(750, 700)).fit(cube)


def test_save_load_gives_identical_scores(tmp_path, bulk, shifted):
    detector = PCADetector(n_components=3, energy_range=(690.0, 740.0), threshold="fpr").fit(bulk)
    path = detector.save(tmp_path / "pca.nc")
    loaded = PCADetector.load(path)
    xr.testing.assert_identical(loaded.score(shifted["counts"]), detector.score(shifted["counts"]))
    assert loaded.threshold_ == detector.threshold_
    assert loaded.get_params() == detector.get_params()
    with pytest.raises(FileExistsError):
        detector.save(path)


def test_sklearn_adapter_isolation_forest(bulk, shifted):
    from sklearn.ensemble import IsolationForest

    detector = SklearnDetector(IsolationForest(n_estimators=50, random_state=0)).fit(bulk)
    scores = detector.score(shifted["counts"])
    assert detection_metrics(scores, shifted["anomaly"], threshold=np.inf)["roc_auc"] > 0.5
    with pytest.raises(NotImplementedError, match="IsolationForest does not reconstruct"):
        detector.reconstruct(shifted["counts"])


# ---- scores ------------------------------------------------------------------------------------

def test_score_functions_by_hand():
    counts = np.array([[2.0, 0.0, 4.0]])
    model = np.array([[1.0, 1.0, 4.0]])
    expected_deviance = 2 * np.mean([2 * np.log(2) - 1, 0 - (0 - 1), 0])
    assert poisson_deviance(counts, model)[0] == pytest.approx(expected_deviance)
    assert pearson_residual(counts, model)[0] == pytest.approx(np.sqrt(np.mean([1.0, 1.0, 0.0])))
    assert one_minus_correlation(model, 3 * model + 1)[0] == pytest.approx(0.0, abs=1e-12)
    assert one_minus_correlation(model, -model)[0] == pytest.approx(2.0)


def test_edge_shift_z_is_a_calibrated_shift_test():
    # a Gaussian "edge" on a flat background, 0.25 eV channels
    energy = np.arange(200) * 0.25
    model = 20.0 + 200.0 * np.exp(-0.5 * ((energy - 25.0) / 1.5) ** 2)
    slope = np.gradient(model)
    # by hand: |sum((y - mu) mu'/mu)| / sqrt(sum(mu'^2/mu))
    counts = model + slope
    expected = np.abs(np.sum(slope * slope / model)) / np.sqrt(np.sum(slope * slope / model))
    assert edge_shift_z(counts[None], model[None])[0] == pytest.approx(expected)
    rng = np.random.default_rng(0)
    # under the model: |z| is half-normal whatever the dose (mean sqrt(2/pi), 1 % above 2.576)
    bulk = edge_shift_z(rng.poisson(model, (20000, 200)).astype(float), np.broadcast_to(model, (20000, 200)))
    assert np.mean(bulk) == pytest.approx(np.sqrt(2 / np.pi), rel=0.03)
    assert np.mean(bulk > 2.576) == pytest.approx(0.01, abs=0.003)
    # a 0.25 eV (one channel) shift of the edge: far out in the tail of the bulk's |z|
    shifted_model = 20.0 + 200.0 * np.exp(-0.5 * ((energy - 25.25) / 1.5) ** 2)
    moved = edge_shift_z(rng.poisson(shifted_model, (2000, 200)).astype(float), np.broadcast_to(model, (2000, 200)))
    assert np.median(moved) > 2 * np.quantile(bulk, 0.999)
    assert np.mean(moved > np.quantile(bulk, 0.999)) > 0.99
    # the deviance of the same spectra separates them far less well
    deviance_bulk = poisson_deviance(rng.poisson(model, (2000, 200)).astype(float), np.broadcast_to(model, (2000, 200)))
    deviance_moved = poisson_deviance(rng.poisson(shifted_model, (2000, 200)).astype(float),
                                      np.broadcast_to(model, (2000, 200)))
    assert np.mean(deviance_moved > np.quantile(deviance_bulk, 0.999)) < 0.9


# ---- thresholds --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bimodal_sample():
    rng = np.random.default_rng(3)
    return np.concatenate([rng.normal(1.0, 0.1, 950), rng.normal(2.0, 0.1, 50)])


def test_otsu_and_gmm_split_a_bimodal_sample(bimodal_sample):
    for threshold in (otsu_threshold(bimodal_sample), gmm_threshold(bimodal_sample),
                      otsu_threshold(bimodal_sample, log_scale=True)):
        assert 1.25 < threshold < 1.75
        assert np.sum(bimodal_sample > threshold) == pytest.approx(50, abs=2)


def test_false_alarm_threshold(bimodal_sample):
    bulk = np.arange(1, 1001, dtype=float)
    assert false_alarm_threshold(bulk, 0.01) == 991.0
    with pytest.raises(ValueError, match="false-alarm rate"):
        false_alarm_threshold(bulk, 0.0)


def test_auto_threshold_is_the_larger_of_gmm_and_fpr(bimodal_sample):
    rng = np.random.default_rng(4)
    bulk_scores = rng.normal(1.0, 0.1, 5000)
    auto = choose_threshold(bimodal_sample, "auto", bulk_scores=bulk_scores, false_alarm_rate=0.001)
    assert auto == max(gmm_threshold(bimodal_sample), false_alarm_threshold(bulk_scores, 0.001))
    unimodal = rng.normal(1.0, 0.1, 1000)  # no anomalies: GMM splits the bulk, fpr keeps it
    auto = choose_threshold(unimodal, "auto", bulk_scores=bulk_scores, false_alarm_rate=0.001)
    assert np.mean(unimodal > auto) < 0.01
    assert choose_threshold(bimodal_sample, 1.5) == 1.5
    with pytest.raises(ValueError, match="needs the scores of bulk"):
        choose_threshold(bimodal_sample, "fpr")


def test_bimodality_measures(bimodal_sample):
    rng = np.random.default_rng(5)
    two = bimodality(bimodal_sample)
    one = bimodality(rng.normal(0, 1, 1000))
    assert two["ashman_d"] > 5 > one["ashman_d"]
    assert two["coefficient"] > 5 / 9 > one["coefficient"]
    assert two["upper_weight"] == pytest.approx(0.05, abs=0.01)


# ---- metrics -----------------------------------------------------------------------------------

def test_metrics_against_hand_computed_values():
    scores = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6])
    truth = np.array([False, False, True, False, True, True])
    metrics = detection_metrics(scores, truth, threshold=0.35)
    # flagged: 0.4, 0.5, 0.6 -> TP 2, FP 1, FN 1
    assert metrics["precision"] == pytest.approx(2 / 3)
    assert metrics["recall"] == pytest.approx(2 / 3)
    assert metrics["f1"] == pytest.approx(2 / 3)
    # AUC: of 9 (positive, negative) pairs, the positive wins 8 (0.3 loses to 0.4)
    assert metrics["roc_auc"] == pytest.approx(8 / 9)
    # AP: precision at each positive's rank, 1/1, 2/2, 3/4 -> mean
    assert metrics["average_precision"] == pytest.approx((1 + 1 + 0.75) / 3)
    assert metrics["n_flagged"] == 3 and metrics["n_true"] == 3


def test_metrics_errors():
    with pytest.raises(TypeError, match="boolean"):
        detection_metrics([0.1, 0.2], [0, 1], threshold=0.1)
    with pytest.raises(ValueError, match="labels or a threshold"):
        detection_metrics([0.1, 0.2], [False, True])
    single = detection_metrics([0.1, 0.2], [False, False], threshold=0.15)
    assert np.isnan(single["roc_auc"])


def test_edge_shift_recovers_known_shifts_with_honest_errors():
    from eels_ad.detect import edge_shift

    for shift in (0.25, 1.0, 2.0):
        sim = eels_ad.simulate_fe_l23((24, 24), shift=shift, anomaly_fraction=0.1, seed=4)
        spectra = sim["counts"].values.reshape(-1, 320).astype(float)
        moved = sim["anomaly"].values.ravel()
        bulk = spectra[~moved].mean(axis=0)
        model = bulk[None] * spectra[moved].sum(axis=1, keepdims=True) / bulk.sum()
        estimate, error = edge_shift(spectra[moved], model, iterations=6)
        assert np.mean(estimate) * 0.25 == pytest.approx(shift, abs=0.02)
        assert np.std(estimate) == pytest.approx(np.mean(error), rel=0.35)  # the error bars are the spread
    one_step, _ = edge_shift(spectra[moved], model)
    assert np.mean(one_step) * 0.25 < 0.9 * 2.0  # one step underestimates large shifts: iterate


def test_the_evaluation_grid_scores_a_detector_by_its_own_flags():
    from eels_ad.evaluate import detection_metrics, evaluation_grid

    made = []

    def make():
        made.append(PCADetector())
        return made[-1]

    grid = evaluation_grid({"pca": make}, shifts=(2.0,), fractions=(0.02,), layouts=("pixels",), doses=(200.0,),
                           seeds=(0,), shape=(32, 32), progress=False)
    test = eels_ad.simulate_fe_l23((32, 32), shift=2.0, anomaly_fraction=0.02, layout="pixels", dose=200.0, seed=0)
    detector = made[0]
    scores = detector.score(test["counts"])
    flags = detector.flag(scores)  # region-aware FDR flags on the pooled map: not a threshold of it
    row = grid.iloc[0]
    assert row["n_flagged"] == int(flags.sum())
    assert row["f1"] == pytest.approx(detection_metrics(scores, test["anomaly"], flags)["f1"])
    assert row["f1"] > 0.9


@pytest.mark.parametrize("dose", [0.3, 3.0, 200.0])
def test_deviance_z_is_standardised_under_the_model_at_any_dose(dose):
    rng = np.random.default_rng(1)
    model = dose * (1.0 + 0.8 * np.sin(np.linspace(0, 6, 300))) ** 2 + 1e-3
    z = deviance_z(rng.poisson(model, (20000, 300)).astype(float), np.broadcast_to(model, (20000, 300)))
    assert np.mean(z) == pytest.approx(0.0, abs=0.03) and np.std(z) == pytest.approx(1.0, abs=0.03)
    # the large-count limits (mean 1, variance 2 a channel) would be wrong here at low dose
    naive = (poisson_deviance(rng.poisson(model, (2000, 300)).astype(float), np.broadcast_to(model, (2000, 300)))
             * 300 - 300) / np.sqrt(600)
    assert (abs(np.mean(naive)) > 0.5) == (dose < 1)


def test_shift_or_deviance_finds_a_shift_and_a_new_peak():
    energy = np.arange(200) * 0.25
    model = 20.0 + 200.0 * np.exp(-0.5 * ((energy - 25.0) / 1.5) ** 2)
    rng = np.random.default_rng(2)
    draw = lambda mean, n=2000: rng.poisson(mean, (n, 200)).astype(float)  # noqa: E731
    bulk = shift_or_deviance(draw(model, 20000), np.broadcast_to(model, (20000, 200)))
    cut = np.quantile(bulk, 0.999)
    moved = 20.0 + 200.0 * np.exp(-0.5 * ((energy - 25.25) / 1.5) ** 2)  # a one-channel shift
    peak = model + 30.0 * np.exp(-0.5 * ((energy - 10.0) / 1.0) ** 2)    # a new peak where the edge does not move
    for changed in (moved, peak):
        counts = draw(changed)
        both = shift_or_deviance(counts, np.broadcast_to(model, counts.shape))
        np.testing.assert_allclose(both, np.maximum(edge_shift_z(counts, np.broadcast_to(model, counts.shape)),
                                                    deviance_z(counts, np.broadcast_to(model, counts.shape))))
        assert np.mean(both > cut) > 0.9
    # the shift test alone is blind to the peak
    counts = draw(peak)
    assert np.mean(edge_shift_z(counts, np.broadcast_to(model, counts.shape)) > cut) < 0.2


@pytest.mark.parametrize("channels", [1, 2, 50, 300])
def test_the_fused_score_kernel_equals_the_array_scores(channels):
    from eels_ad.detect import _score_kernels, _scores

    assert _score_kernels.available()  # numba is a dependency
    rng = np.random.default_rng(channels)
    # from below the floor (1e-3) to beyond the moments' table (1e4), zeros among the counts
    mu = np.exp(rng.uniform(np.log(1e-4), np.log(3e4), (300, channels)))
    counts = rng.poisson(mu * rng.uniform(0.8, 1.2, (300, 1))).astype(float)
    counts[::7] = 0
    array_combined = _scores._in_pieces(
        lambda c, m: np.maximum(_scores.edge_shift_z(c, m), _scores._deviance_z(c, m)), counts, mu)
    array_deviance = _scores._in_pieces(_scores._deviance_z, counts, mu)
    table = _scores._deviance_table()
    fused = _score_kernels.fused_scores(counts, mu, _scores._FLOOR, table, with_shift=True)
    np.testing.assert_allclose(fused, array_combined, rtol=1e-9, atol=1e-9)
    fused = _score_kernels.fused_scores(counts, mu, _scores._FLOOR, table, with_shift=False)
    np.testing.assert_allclose(fused, array_deviance, rtol=1e-9, atol=1e-9)
    # a (..., energy) block keeps its shape
    blocks = _score_kernels.fused_scores(counts.reshape(10, 30, channels), mu.reshape(10, 30, channels),
                                         _scores._FLOOR, table, with_shift=True)
    assert blocks.shape == (10, 30)
    # the public scores take the kernel for big blocks only (numba's first dispatch costs ~1 s per process)
    assert not _score_kernels.worth_it(counts, mu)
    assert _score_kernels.worth_it(np.zeros((1024, 1024)), np.zeros((1024, 1024)))


def test_the_score_kernel_gives_the_same_scores_in_one_thread_or_several(monkeypatch):
    from eels_ad.detect import _score_kernels
    from eels_ad.detect._scores import _FLOOR, _deviance_table

    if not _score_kernels.available():
        pytest.skip("numba is not installed: the array versions score")
    rng = np.random.default_rng(5)
    model = rng.uniform(0.5, 60.0, (1500, 400))
    counts = rng.poisson(model).astype(float)
    counts[0, :5] = [0.5, 7000.0, 2.5, 0.0, 4095.0]  # not whole, beyond the log table, its last entry
    monkeypatch.setattr(_score_kernels, "_threads", lambda: 3)  # whatever cores this test process may use
    several = _score_kernels.fused_scores(counts, model, _FLOOR, _deviance_table(), True)
    monkeypatch.setattr(_score_kernels, "_threads", lambda: 1)
    one = _score_kernels.fused_scores(counts, model, _FLOOR, _deviance_table(), True)
    np.testing.assert_array_equal(several, one)  # each spectrum alone: the same whatever the split
    from eels_ad.detect._scores import _deviance_z, _in_pieces, edge_shift_z

    arrays = _in_pieces(lambda c, m: np.maximum(edge_shift_z(c, m), _deviance_z(c, m)), counts, model)
    np.testing.assert_allclose(one, arrays, rtol=1e-9, atol=1e-9)


def test_the_approximate_eigenpairs_that_judge_trimming_match_lapack_where_they_stand_out():
    from eels_ad.detect.pca import _leading_eigenpairs

    rng = np.random.default_rng(2)
    noise = rng.standard_normal((400, 4000))
    gram = noise @ noise.T / 4000
    basis = np.linalg.qr(rng.standard_normal((400, 3)))[0]
    gram += basis @ np.diag([500.0, 40.0, 6.0]) @ basis.T  # three components above noise eigenvalues of ~1-3
    exact_values, exact_vectors = _leading_eigenpairs(gram.copy(), 21, exact=True)
    values, vectors = _leading_eigenpairs(gram.copy(), 21, exact=False)
    np.testing.assert_allclose(values[-3:], exact_values[-3:], rtol=1e-10)
    np.testing.assert_allclose(np.abs(np.sum(vectors[:, -3:] * exact_vectors[:, -3:], axis=0)), 1.0, atol=1e-8)
    # those within the noise only roughly: never above the exact ones (Ritz values), within 10 %
    assert np.all(values[:-3] <= exact_values[:-3] + 1e-9) and np.all(values[:-3] > 0.9 * exact_values[:-3])


def test_the_cross_products_split_over_threads_equal_one_product(monkeypatch):
    from eels_ad.detect import pca

    scaled = np.random.default_rng(3).poisson(5.0, (1500, 200)).astype(float)
    monkeypatch.setattr(pca, "work_parts", lambda: 3)
    split = []
    real_pool = pca.pool
    monkeypatch.setattr(pca, "pool", lambda workers, *args: split.append(workers) or real_pool(workers, *args))
    np.testing.assert_allclose(pca._cross_products(scaled), scaled.T @ scaled, rtol=1e-12)
    assert split == [3]  # in three threads
    # fewer than 256 spectra a part: one product, in this thread
    np.testing.assert_allclose(pca._cross_products(scaled[:300]), scaled[:300].T @ scaled[:300], rtol=1e-12)
    assert split == [3]


def test_work_beside_a_chunk_read_leaves_the_reader_a_core():
    from concurrent.futures import Future

    from eels_ad import _threads, datacube

    assert datacube.work_parts() == 1  # outside a fold BLAS has every core
    reading = Future()  # a read in flight
    datacube._READS_IN_FLIGHT.add(reading)
    try:
        assert datacube.compute_cores() == max(1, _threads.cores() - 1)
        with datacube._cores_beside_reader(True):
            assert datacube.work_parts() == 1
    finally:
        datacube._READS_IN_FLIGHT.discard(reading)
    assert datacube.compute_cores() == _threads.cores()
    with datacube._cores_beside_reader(True) as limited:
        # with nothing in flight the reader's core is spare: as many parts as the cores hold BLAS's threads
        assert datacube.work_parts() == max(1, _threads.cores() // limited.threads)
    assert datacube.work_parts() == 1


def test_the_kernels_threads_keep_to_omp_num_threads(monkeypatch):
    from eels_ad import _threads

    _threads.cores.cache_clear()
    try:
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        assert _threads.cores() == 1
        _threads.cores.cache_clear()
        monkeypatch.setenv("OMP_NUM_THREADS", "not a number")
        affinity = _threads.cores()
        assert affinity >= 1
        _threads.cores.cache_clear()
        monkeypatch.setenv("OMP_NUM_THREADS", str(affinity + 5))
        assert _threads.cores() == affinity
    finally:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        _threads.cores.cache_clear()
