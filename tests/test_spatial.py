"""The spatial step: calibrated p-values, pooling over neighbourhoods, FDR flags, and the detectors' defaults."""

import numpy as np
import pytest
from scipy import stats

import eels_ad
from eels_ad.detect import PCADetector
from eels_ad.detect.spatial import (
    UpperTail,
    empirical_null,
    fdr_flags,
    pixel_pvalues,
    pool_evidence,
    ring,
    ring_prediction,
    spatial_flags,
    squared_excess,
)
from eels_ad.evaluate import detection_metrics


def _auc(scores, truth) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(np.asarray(truth).ravel(), np.asarray(scores).ravel()))


def _disc_map(shape=(48, 48), centre=(20, 30), radius=2.0):
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    return (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= radius**2


def test_pixel_pvalues_are_uniform_under_the_null_and_fall_past_the_bulk():
    rng = np.random.default_rng(0)
    bulk = rng.gamma(40, 0.025, 5000)  # a right-skewed score, as a mean deviance is
    p = pixel_pvalues(rng.gamma(40, 0.025, 200_000), bulk)
    for level in (0.5, 0.1, 0.01):
        assert abs(np.mean(p <= level) - level) < 0.15 * level + 0.002, level
    # past the bulk the Pareto tail (exponential at the lightest) is valid and, for this light tail, conservative
    assert 0.2e-3 < np.mean(p <= 1e-3) <= 1.2e-3
    assert np.mean(p <= 1e-4) <= 1.2e-4
    # a heavy but genuine tail is not trimmed away: near nominal at 1e-2 and 1e-3 (it was 4x at 1e-3 when trimmed)
    heavy = np.abs(rng.standard_t(5, 4000))
    p_heavy = pixel_pvalues(np.abs(rng.standard_t(5, 400_000)), heavy)
    assert np.mean(p_heavy <= 1e-2) < 1.3e-2 and np.mean(p_heavy <= 1e-3) < 2e-3
    far = pixel_pvalues(np.array([bulk.max() * 1.5, bulk.max() * 3]), bulk)
    assert far[0] < 1.0 / bulk.size and far[1] < far[0]
    # NaN stays NaN; a handful of bulk scores still gives valid (coarse) p-values
    assert np.isnan(pixel_pvalues(np.array([np.nan]), bulk)[0])
    assert pixel_pvalues(np.array([10.0]), np.arange(5.0))[0] == pytest.approx(1 / 6)


def test_a_known_null_family_makes_light_tails_near_nominal_and_is_refused_where_it_does_not_fit():
    rng = np.random.default_rng(8)
    shares = {None: [], "half-normal": []}
    for _ in range(8):  # |z| of a normal score test: the exponential tail alone is conservative far out
        bulk, test = np.abs(rng.standard_normal(4000)), np.abs(rng.standard_normal(1_000_000))
        for family in shares:
            shares[family].append(np.mean(pixel_pvalues(test, bulk, family=family) < 1e-4) / 1e-4)
    # measured: 0.33 without the family, 0.88 with it (means of 8 draws; the family is refused in some draws)
    mean = {family: np.mean(values) for family, values in shares.items()}
    assert mean[None] < 0.6 and 0.6 < mean["half-normal"] < 1.4 and mean["half-normal"] > 1.5 * mean[None], shares
    # a heavy tail keeps the Pareto fit whatever family is named
    heavy = np.abs(rng.standard_t(3, 4000))
    scores = np.abs(rng.standard_t(3, 100_000))
    np.testing.assert_array_equal(pixel_pvalues(scores, heavy, family="half-normal"), pixel_pvalues(scores, heavy))
    with pytest.raises(ValueError, match="family"):
        pixel_pvalues(scores, heavy, family="poisson")
    # the tail is fitted to at least TAIL_EXCEEDANCES of the largest scores: 30 of the CVAE's 512 held-out scores
    # (2.5 % would be 12), 2.5 % of 4,000
    from eels_ad.detect.spatial import TAIL_EXCEEDANCES, UpperTail

    assert UpperTail(np.abs(rng.standard_normal(512))).tail[0] * 513 == pytest.approx(TAIL_EXCEEDANCES)
    assert UpperTail(np.abs(rng.standard_normal(4000))).tail[0] * 4001 == pytest.approx(100)
    assert UpperTail(np.abs(rng.standard_normal(100))).tail is None  # under 4 x 30 scores: 2.5 %, too few to fit


def test_a_larger_sample_shapes_the_tail_beyond_a_small_ones_reach():
    """P(X > x) = P(X > t) P(X > x | X > t): the first factor from 512 scores, the second from 4,096."""
    from eels_ad.detect.spatial import UpperTail

    rng = np.random.default_rng(11)
    draw = lambda size: np.maximum(np.abs(rng.normal(0, 1, size)), rng.gamma(100, 0.1, size) - 10)  # noqa: E731
    errors = {"small": [], "with more": []}
    for _ in range(6):
        small, more, test = draw(512), draw(3584), draw(400_000)
        for name, tail in (("small", UpperTail(small)), ("with more", UpperTail(small, tail_sample=more))):
            p = tail.sf(test)
            errors[name].append([np.log(max(np.mean(p < level), 0.1 / test.size) / level) for level in (1e-3, 1e-4)])
        below = test[test < np.sort(small)[-30]]
        np.testing.assert_array_equal(UpperTail(small, tail_sample=more).sf(below), UpperTail(small).sf(below))
    # the share of p below 1e-3 and 1e-4 within a factor of ~2 of the level, over six draws; the small sample's
    # exponential tail alone is conservative there (measured: mean |log share/level| 1.3 -> 0.4)
    mean_error = {name: np.mean(np.abs(values)) for name, values in errors.items()}
    assert mean_error["with more"] < 0.75 and mean_error["with more"] < 0.6 * mean_error["small"], errors


def test_pooling_finds_a_disc_no_pixel_shows_alone_and_keeps_a_lone_strong_pixel():
    rng = np.random.default_rng(1)
    p = rng.uniform(size=(48, 48))
    disc = _disc_map()
    p[disc] = rng.uniform(0.001, 0.02, disc.sum())  # weak evidence: no pixel passes BH at 5 % alone
    p[5, 5] = 1e-9  # one lone, strong pixel
    alone, _ = fdr_flags(p, 0.05)
    assert not (alone & disc).any() and alone[5, 5]
    pooled = pool_evidence(p)
    flags, cut = spatial_flags(p, pooled, 0.05)
    assert cut > 0
    assert (flags & disc).sum() >= disc.sum() - 3  # the disc, nearly whole
    assert flags[5, 5]  # the lone pixel too
    assert (flags & ~disc).sum() <= 3  # and hardly any bulk pixel beside them


def test_a_region_with_a_few_strong_pixels_keeps_its_weaker_ones_and_a_lone_one_stays_alone():
    rng = np.random.default_rng(3)
    p = rng.uniform(size=(48, 48))
    disc = _disc_map(radius=2.5)
    p[disc] = rng.uniform(0.001, 0.02, disc.sum())  # weak evidence, each pixel alone
    inside = np.argwhere(disc)
    for y, x in inside[:2]:
        p[y, x] = 1e-9  # two strong pixels in it
    p[5, 5] = 1e-9  # and a lone strong pixel in the bulk
    flags, _ = spatial_flags(p, pool_evidence(p), 0.05)
    assert (flags & disc).sum() >= disc.sum() - 3  # the weak pixels too, not only the two strong ones
    assert flags[5, 5] and not flags[3:8, 3:8].sum() - 1  # the lone pixel without a halo
    assert (flags & ~disc).sum() <= 3


def test_pooled_pvalues_and_fdr_are_calibrated_under_the_null():
    rng = np.random.default_rng(2)
    maps = rng.uniform(size=(300, 32, 32))
    pooled = np.stack([pool_evidence(m) for m in maps])
    for level in (0.05, 0.01):  # valid: never far above the nominal rate
        assert np.mean(pooled <= level) <= 1.2 * level
    assert np.mean(pooled <= 0.05) > 0.02  # and not uselessly conservative
    # under the complete null every flag is false: BH flags anything in about 5 % of the maps
    any_flag = [fdr_flags(m, 0.05)[0].any() for m in rng.uniform(size=(1500, 16, 16))]
    assert 0.03 <= np.mean(any_flag) <= 0.07
    # the region-aware rule too: its peaks are tested, not its pixels (measured 0.035 on 600 maps; the pixel-wise
    # rule on the pooled map it replaced flagged 0.00-0.01 of bulk-only cubes)
    null_maps = rng.uniform(size=(600, 32, 32))
    rate = np.mean([spatial_flags(m, pool_evidence(m), 0.05)[0].any() for m in null_maps])
    assert 0.02 <= rate <= 0.07, rate


def test_the_simulated_null_calibrates_the_pooled_map_and_its_peaks():
    from eels_ad.detect.spatial import PooledNull, local_maxima, normal_scores, pooled_null

    null = pooled_null()
    assert null is pooled_null()  # once per process
    # the table shipped for the default windows is this simulation, saved (else: spatial.write_null_table())
    fresh = PooledNull.simulate((0.0, 1.0, 2.0), 5, 8)
    for table in ("marginal_table", "peak_table"):
        np.testing.assert_allclose(getattr(null, table), getattr(fresh, table), rtol=1e-9, err_msg=table)
    assert null.peaks_per_pixel == pytest.approx(fresh.peaks_per_pixel)
    rng = np.random.default_rng(11)
    pooled = np.stack([pool_evidence(m, correlated=False) for m in rng.uniform(size=(60, 64, 64))])
    z = normal_scores(pooled)
    # marginally uniform: normal scores with median 0 and spread 1 (Sidak's had -0.5 and 1.33)
    assert abs(np.median(z)) < 0.05 and abs(stats.median_abs_deviation(z.ravel(), scale="normal") - 1) < 0.05
    for level in (1e-2, 1e-3):
        assert 0.7 * level < np.mean(pooled < level) < 1.2 * level
    peaks = np.concatenate([null.peak_pvalues(m[local_maxima(m)]) for m in z])
    for level in (1e-2, 1e-3):  # the peaks' p-values: valid, near nominal
        assert 0.6 * level < np.mean(peaks < level) < 1.2 * level
    assert 0.05 < null.peaks_per_pixel < 0.12


def test_line_windows_find_a_faint_boundary():
    rng = np.random.default_rng(4)
    p = rng.uniform(size=(48, 48))
    line = np.zeros((48, 48), dtype=bool)
    line[np.arange(8, 40), np.arange(8, 40)] = True  # a diagonal boundary, one pixel wide
    p[line] = rng.uniform(0.001, 0.02, line.sum())
    from sklearn.metrics import roc_auc_score

    with_lines = roc_auc_score(line.ravel(), -pool_evidence(p).ravel())
    discs_only = roc_auc_score(line.ravel(), -pool_evidence(p, line_length=0).ravel())
    assert with_lines > 0.99 and with_lines > discs_only
    flags, _ = spatial_flags(p, pool_evidence(p), 0.05)
    assert (flags & line).sum() >= 0.8 * line.sum() and (flags & ~line).sum() <= 0.2 * flags.sum()


def test_local_median_removes_a_smooth_rise_of_the_evidence():
    rng = np.random.default_rng(3)
    yy, _ = np.mgrid[:48, :48]
    from scipy import stats

    z = rng.standard_normal((48, 48)) + 1.5 * (yy > 24)  # half the image raised alike (a nuisance)
    p = stats.norm.sf(z)
    relative = pool_evidence(p, correlated=False)  # background_radius=8: relative to the neighbourhood
    absolute = pool_evidence(p, background_radius=None, correlated=False)
    inside = (yy > 30)
    assert np.mean(absolute[inside] < 1e-3) > 0.3
    assert np.mean(relative[inside] < 1e-3) < 0.01


def test_correlated_null_evidence_pools_no_more_often_than_independent():
    from scipy import ndimage, stats

    rng = np.random.default_rng(5)
    fractions = {True: [], False: []}
    for _ in range(20):  # null maps whose neighbouring pixels share evidence (a drift residual, cross-talk)
        z = ndimage.gaussian_filter(rng.standard_normal((64, 64)), 1.0)
        p = stats.norm.sf(z / z.std())
        for correlated in fractions:
            fractions[correlated].append(np.mean(pool_evidence(p, correlated=correlated) < 1e-3))
    assert np.mean(fractions[False]) > 5e-3  # assuming independence: many times the nominal 1e-3
    assert np.mean(fractions[True]) < 2.5e-3
    # independent maps: the correction finds nothing to correct
    p = rng.uniform(size=(64, 64))
    np.testing.assert_allclose(pool_evidence(p), pool_evidence(p, correlated=False), rtol=0.02)


def test_bad_inputs_name_the_value():
    p = np.full((8, 8), 0.5)
    with pytest.raises(ValueError, match="fdr must lie in"):
        fdr_flags(p, 1.5)
    with pytest.raises(ValueError, match="radii"):
        pool_evidence(p, radii=(-1,))
    with pytest.raises(ValueError, match="background_radius must exceed"):
        pool_evidence(p, radii=(0, 3), background_radius=4)
    with pytest.raises(ValueError, match="line_length must be"):
        pool_evidence(p, line_length=-2)
    with pytest.raises(ValueError, match=r"p-values must lie in \(0, 1\]"):
        pool_evidence(np.zeros((8, 8)))
    with pytest.raises(ValueError, match=r"\(y, x\) map"):
        pool_evidence(np.full(8, 0.5))
    bulk = eels_ad.simulate_fe_l23((8, 8), anomaly_fraction=0.0, seed=1)["counts"]
    for bad in (0.0, 1.0, -0.1, "five"):
        with pytest.raises(ValueError, match="fdr must"):
            PCADetector(fdr=bad).fit(bulk)
    with pytest.raises(ValueError, match="spatial must be True or False"):
        PCADetector(spatial="yes").fit(bulk)
    with pytest.raises(ValueError, match="context must be one of"):
        PCADetector(context="ring").fit(bulk)


@pytest.fixture(scope="module")
def low_dose_blobs():
    kw = dict(dose=20, shift=0.5, layout="clusters", anomaly_fraction=0.02)
    bulk = eels_ad.simulate_fe_l23((40, 40), anomaly_fraction=0.0, dose=20, seed=11)["counts"]
    test = eels_ad.simulate_fe_l23((40, 40), seed=12, **kw)
    return bulk, test


def test_the_default_detector_pools_and_flags_at_five_percent_fdr(low_dose_blobs):
    bulk, test = low_dose_blobs
    # pooling pays where a pixel's own evidence is weak: 0.5 eV blobs at dose 20 seen by the deviance
    weak = PCADetector(scoring="deviance").fit(bulk).score(test["counts"])
    pixel, pooled = _auc(weak["pixel_score"], test["anomaly"]), _auc(weak, test["anomaly"])
    assert pooled > pixel + 0.02, (pixel, pooled)
    detector = PCADetector().fit(bulk)  # the default score (shift+deviance) sees them pixel by pixel
    scores = detector.score(test["counts"])
    assert scores.attrs["spatial"] == "pooled" and scores.attrs["units"] == "sigma"
    assert _auc(scores, test["anomaly"]) > 0.99
    labels = detector.flag(scores)
    assert labels.attrs["threshold_method"] == "fdr" and labels.attrs["level"] == 0.05
    assert labels.attrs["pvalue_cut"] > 0
    metrics = detection_metrics(scores, test["anomaly"], labels)
    assert metrics["precision"] >= 0.8 and metrics["recall"] >= 0.9  # 0.89 and 1.00
    # switched off: the per-pixel map, as before
    plain = PCADetector(spatial=False).fit(bulk).score(test["counts"])
    np.testing.assert_allclose(plain.values, scores["pixel_score"].values)
    assert "spatial" not in plain.attrs
    # a bulk-only cube: hardly a flag
    clean = eels_ad.simulate_fe_l23((40, 40), anomaly_fraction=0.0, dose=20, seed=13)["counts"]
    assert int(detector.predict(clean).sum()) <= 2
    # the p-values behind the flags are available, NaN nowhere outside vacuum
    assert np.all(np.isfinite(detector.pvalues(scores).values))


def test_neighbour_context_sees_a_local_shift_through_an_energy_drift():
    kw = dict(dose=50, drift=1.0)
    bulk = eels_ad.simulate_fe_l23((40, 40), anomaly_fraction=0.0, seed=21, **kw)["counts"]
    test = eels_ad.simulate_fe_l23((40, 40), anomaly_fraction=0.02, shift=0.5, layout="clusters", seed=22, **kw)
    auc = {}
    for context in ("pixel", "neighbours"):
        detector = PCADetector(scoring="shift", context=context, spatial=False).fit(bulk)
        auc[context] = _auc(detector.score(test["counts"]), test["anomaly"])
    assert auc["neighbours"] > 0.97 and auc["neighbours"] > auc["pixel"] + 0.1, auc
    model = PCADetector(context="neighbours").fit(bulk)
    assert model.reconstruct(test["counts"]).shape == test["counts"].shape


def test_ring_prediction_is_the_ring_mean_inside_and_a_plane_at_the_edges():
    from scipy import ndimage

    yy, xx = np.mgrid[:24, :30].astype(float)
    plane = np.stack([2.0 + 0.3 * yy - 0.1 * xx, -yy], axis=-1)
    predicted = ring_prediction(plane, 2.5, 5.0)
    np.testing.assert_allclose(predicted, plane, atol=1e-9)  # corners too: the plane extrapolates
    np.testing.assert_allclose(ring_prediction(plane, 2.5, 5.0, slope_outer=9.0), plane, atol=1e-9)
    with pytest.raises(ValueError, match="slope_outer"):
        ring_prediction(plane, 2.5, 5.0, slope_outer=3.0)
    weights = ring(2.5, 5.0).astype(float)
    mirrored = ndimage.correlate(plane[..., 0], weights / weights.sum(), mode="mirror")
    assert abs(mirrored[0, 15] - plane[0, 15, 0]) > 0.5  # a mirrored ring's mean sits inside the image
    noise = np.random.default_rng(0).normal(size=(24, 30))
    inner = ndimage.correlate(noise, weights / weights.sum())[5:-5, 5:-5]
    np.testing.assert_allclose(ring_prediction(noise, 2.5, 5.0)[5:-5, 5:-5], inner, atol=1e-12)
    # pixels that are not valid take no part; a pixel with no valid ring pixel gets NaN
    valid = np.ones((24, 30), dtype=bool)
    valid[:, 20:] = False
    masked = ring_prediction(np.where(valid, plane[..., 0], 1e6), 2.5, 5.0, valid=valid)
    np.testing.assert_allclose(masked[:, :24], plane[:, :24, 0], atol=1e-9)
    assert np.isnan(masked[:, 26:]).all()
    # a ring on one line (a single row) cannot fix a plane: its mean
    row = np.arange(12.0)[None, :]
    assert np.isfinite(ring_prediction(row, 2.5, 5.0)).all()
    with pytest.raises(ValueError, match="shape"):
        ring_prediction(np.zeros(5), 2.5, 5.0)


def test_the_neighbour_context_does_not_flag_an_edge_where_the_drift_is_steep():
    def cube(seed):
        return eels_ad.simulate_fe_l23((64, 64), dose=20, drift=1.0, anomaly_fraction=0.0, seed=seed)

    detector = PCADetector(scoring="shift", context="neighbours").fit(cube(100)["counts"])
    sim = cube(1004)  # its drift is steepest at the top rows
    drift = sim["drift"].values
    assert abs(drift[:3].mean() - drift[5:8].mean()) > 0.1  # eV: a gradient at the edge
    scores = detector.score(sim["counts"])
    z = stats.norm.isf(scores["pvalue"].values)
    # measured with the ring mirrored at the edge: the top rows 74 flags, their mean z 2.6
    assert abs(z[:2].mean() - z[8:-8].mean()) < 0.5, (z[:2].mean(), z[8:-8].mean())
    assert not detector.flag(scores).values[:2].any()


def test_the_neighbour_context_calibrates_the_edge_band_by_its_own_training_pixels(tmp_path):
    bulk = eels_ad.simulate_fe_l23((48, 48), dose=20, drift=1.0, anomaly_fraction=0.0, seed=101)["counts"]
    detector = PCADetector(scoring="shift", context="neighbours").fit(bulk)
    strata = detector.calibration_strata_
    assert strata.shape == detector.calibration_scores_.shape and strata.sum() == 48**2 - 38**2  # rings cut by the edge
    pixel = PCADetector(scoring="shift", context="pixel").fit(bulk)
    assert pixel.__dict__.get("calibration_strata_") is None  # pixel context: one
    # the same raw score is less surprising in the band when the band's calibration scores run higher
    detector.calibration_scores_ = np.where(strata == 1, 2.0, 1.0) * np.abs(np.random.default_rng(0).normal(
        size=strata.size))
    raw = np.full((48, 48), 3.0)
    pvalues = detector._pixel_pvalues(raw, None)[0]
    assert pvalues[0, 20] > 5 * pvalues[24, 24]
    assert pvalues[24, 24] == pytest.approx(2 * stats.norm.sf(3.0), rel=0.5)
    assert pvalues[0, 20] == pytest.approx(2 * stats.norm.sf(1.5), rel=0.5)
    loaded = PCADetector.load(detector.save(tmp_path / "m.nc"))  # the strata travel with the model
    np.testing.assert_array_equal(loaded.calibration_strata_, strata)
    np.testing.assert_allclose(loaded._pixel_pvalues(raw, None)[0], pvalues)


def test_the_cvae_edge_band_is_scaled_by_its_part_of_the_strip_and_shares_the_strip_tail():
    from eels_ad.detect import CVAEDetector

    detector = CVAEDetector(scoring="shift", context="neighbours", empirical_null=False)  # patches 8, holes 4
    band = detector._strata((64, 64))
    assert (band > 0).sum() == 64**2 - 56**2 and not band[4:60, 4:60].any()  # a 4-pixel frame
    assert (band[:4, 4:60] == 1).all() and (band[60:, 4:60] == 1).all()  # cut at the top or bottom only
    assert (band[:, :4] == 2).all() and (band[:, 60:] == 2).all()  # cut at the left or right (corners too)
    assert CVAEDetector(scoring="shift")._strata((64, 64)) is None  # the pixel context: one stratum
    # a detector calibrated with one edge stratum (saved before session 18) keeps it: a strip of 250 inside and
    # 400 band pixels (each >= MIN_STRATUM_SCORES), the band's scores twice as large
    rng = np.random.default_rng(3)
    strata = np.r_[np.zeros(250, np.int8), np.ones(400, np.int8)]
    detector.calibration_strata_ = strata
    detector.calibration_scores_ = np.where(strata == 1, 2.0, 1.0) * np.abs(rng.normal(size=strata.size))
    assert (detector._strata((64, 64)) == (band > 0)).all()
    raw = np.zeros((64, 64))
    raw[30, 30], raw[0, 30], raw[30, 31], raw[1, 30], raw[30, 32] = 1.0, 2.0, 2.0, 4.0, 6.0
    pvalues = detector._pixel_pvalues(raw, None)[0]
    assert pvalues[0, 30] == pytest.approx(pvalues[30, 30], rel=0.2)  # the band's 2 is the inside's 1
    assert 0.5 < pvalues[1, 30] / pvalues[30, 31] < 2  # and its 4 the inside's 2 (quantiles of a few hundred)
    # one tail fitted to all 650 scores on one scale: far beyond either part's largest score the p-values keep
    # falling (the inside alone, 250 scores, has too few for a tail: 1/251 would be its floor)
    assert pvalues[30, 32] < 0.1 / 251


def test_the_cvae_edge_strata_take_their_scale_from_the_training_pixels_too():
    """The held-out strip (the image's last rows) holds few pixels of the left and right edges: their stratum's
    location and scale relative to the inside's come from the training and held-out pixels together."""
    from eels_ad.detect import CVAEDetector

    rng = np.random.default_rng(4)
    detector = CVAEDetector(scoring="shift", context="neighbours", empirical_null=False)

    def part(sizes):
        strata = np.concatenate([np.full(n, k, np.int8) for k, n in enumerate(sizes)])
        return np.array([1.0, 2.0, 3.0])[strata] * np.abs(rng.normal(size=strata.size)), strata

    detector.calibration_scores_, detector.calibration_strata_ = part((250, 220, 20))  # left and right: 20
    detector.training_scores_, detector.training_strata_ = part((2000, 300, 400))
    raw = np.zeros((64, 64))
    raw[30, 30], raw[0, 30], raw[30, 0], raw[30, 31], raw[30, 63] = 1.0, 2.0, 3.0, 2.0, 6.0
    pvalues = detector._pixel_pvalues(raw, None)[0]
    assert pvalues[0, 30] == pytest.approx(pvalues[30, 30], rel=0.2)  # the top edge's 2 is the inside's 1
    assert pvalues[30, 0] == pytest.approx(pvalues[30, 30], rel=0.2)  # the left edge's 3 too, from 420 scores
    assert 0.5 < pvalues[30, 63] / pvalues[30, 31] < 2  # the right edge's 6 the inside's 2 (a few hundred scores)
    # from the strip alone the left and right edges (20 scores, < MIN_STRATUM_SCORES) would have no scale of their
    # own: they would be read on the pooled tail, their 3 far less likely than the inside's 1
    detector.STRATA_FROM_TRAINING = False
    detector.__dict__.pop("_tail_cache", None)
    alone = detector._pixel_pvalues(raw, None)[0]
    assert alone[30, 0] < 0.5 * pvalues[30, 0]


@pytest.fixture(scope="module")
def drift_blobs():
    kw = dict(dose=20, drift=1.0, shift=0.5)
    bulk = eels_ad.simulate_fe_l23((64, 64), anomaly_fraction=0.0, seed=100, **kw)["counts"]
    test = eels_ad.simulate_fe_l23((64, 64), anomaly_fraction=0.01, layout="clusters", seed=200, **kw)
    return bulk, test


def test_the_second_step_leaves_shifted_blobs_out_of_their_neighbours_rings(drift_blobs, monkeypatch):
    from scipy import ndimage

    import eels_ad.detect.pca as pca_module

    bulk, test = drift_blobs
    truth = test["anomaly"].values
    halo = ndimage.binary_dilation(truth, iterations=4) & ~truth
    detector = PCADetector(scoring="shift", context="neighbours", spatial=False).fit(bulk)
    two_steps = detector.score(test["counts"]).values
    monkeypatch.setattr(pca_module, "RING_EXCLUSION_PVALUE", 0.0)  # no pixel is suspect: the first step alone
    one_step = detector.score(test["counts"]).values
    # measured: the bulk beside the blobs 1.19 -> 0.84 (bulk |z| ~ 0.8), the blobs 7.11 -> 7.33
    assert two_steps[halo].mean() < one_step[halo].mean() - 0.2, (two_steps[halo].mean(), one_step[halo].mean())
    assert two_steps[truth].mean() > one_step[truth].mean()


def test_the_empirical_null_takes_out_a_nuisance_the_calibration_did_not_see():
    rng = np.random.default_rng(5)
    # a nuisance narrows and shifts every bulk pixel's normal score; 2 % of pixels are far out
    z = rng.normal(-0.2, 0.85, 20_000)
    z[:400] += 6.0
    adjusted, centre, spread = empirical_null(stats.norm.sf(z))
    assert abs(centre - (-0.2)) < 0.03 and abs(spread - 0.85) < 0.03
    bulk = adjusted[400:]
    assert 0.042 < np.mean(bulk < 0.05) <= 0.058 and 0.0004 < np.mean(bulk < 0.001) < 0.0016  # uniform again
    assert np.mean(adjusted[:400] < 1e-4) > 0.9  # the far-out pixels stay far out
    # p-values already uniform are left nearly as they are
    p = rng.uniform(size=20_000)
    same, centre, spread = empirical_null(p)
    assert abs(centre) < 0.03 and abs(spread - 1) < 0.03
    np.testing.assert_allclose(stats.norm.isf(same), stats.norm.isf(p), atol=0.1)
    # NaN (vacuum) stays NaN and is left out; too few pixels: unchanged
    with_nan = np.where(np.arange(p.size) % 10 == 0, np.nan, p)
    assert np.isnan(empirical_null(with_nan)[0][::10]).all()
    few = p[:50]
    np.testing.assert_array_equal(empirical_null(few)[0], few)


def test_the_empirical_null_is_not_moved_by_a_tenth_of_anomalies_on_a_small_map():
    # the real-data case (benchmarks/real_data.py): 258 pixels, 26 of them anomalous at ~3.5 sigma; the median and
    # MAD gave centre 0.13 and spread 1.12 and so no flag; the fit below the discoveries is not moved by them
    found = {"empirical": [], "theoretical": []}
    centres, spreads = [], []
    for seed in range(40):
        rng = np.random.default_rng(seed)
        z = np.r_[rng.normal(3.5, 1.0, 26), rng.normal(0.0, 1.0, 232)]
        adjusted, centre, spread = empirical_null(stats.norm.sf(z))
        centres.append(centre)
        spreads.append(spread)
        found["empirical"].append(fdr_flags(adjusted, 0.05)[0][:26].sum())
        found["theoretical"].append(fdr_flags(stats.norm.sf(z), 0.05)[0][:26].sum())
    assert abs(np.mean(centres)) < 0.05 and abs(np.mean(spreads) - 1) < 0.04, (np.mean(centres), np.mean(spreads))
    # many maps keep the theoretical null whole (the fit's difference from it is within its own noise)
    assert np.mean(np.abs(np.array(spreads) - 1) < 1e-9) > 0.3 and np.median(np.abs(np.array(spreads) - 1)) < 0.02
    assert np.mean(found["empirical"]) > 0.85 * np.mean(found["theoretical"]) > 10, found
    # and under the null alone, a map this small flags about as often as the nominal level says
    any_flag = []
    for seed in range(200):
        p = np.random.default_rng(1000 + seed).uniform(size=258)
        any_flag.append(fdr_flags(empirical_null(p)[0], 0.05)[0].any())
    assert 0.02 < np.mean(any_flag) < 0.10, np.mean(any_flag)


def test_the_empirical_null_calibrates_bulk_cubes_under_another_drift():
    def cube(seed):
        return eels_ad.simulate_fe_l23((48, 48), dose=20, drift=1.0, anomaly_fraction=0.0, seed=seed)["counts"]

    detector = PCADetector(scoring="shift", context="neighbours", spatial=False).fit(cube(100))
    errors = {False: [], True: []}  # |log(share of p < 0.05 / 0.05)| of bulk-only cubes, each its own drift
    for seed in range(7, 15):
        scores = detector.score(cube(seed))
        for empirical in (False, True):
            detector.empirical_null = empirical
            share = np.mean(detector.pvalues(scores).values < 0.05)
            errors[empirical].append(abs(np.log(max(share, 1e-3) / 0.05)))
    # measured: 0.98 as calibrated on the training cube (shares 0.007-0.092), 0.25 on each map's own null
    # (0.048-0.090: a centre and a spread, not the tail's shape)
    assert np.mean(errors[True]) < 0.45 and np.mean(errors[True]) < 0.5 * np.mean(errors[False]), errors
    with pytest.raises(ValueError, match="empirical_null must be True or False"):
        PCADetector(empirical_null="yes").fit(cube(100))


def test_the_automatic_context_follows_the_training_cubes_drift(tmp_path):
    def cube(drift, seed):
        return eels_ad.simulate_fe_l23((48, 48), dose=20, drift=drift, anomaly_fraction=0.03, layout="clusters",
                                       seed=seed)

    still = PCADetector().fit(cube(0.0, 3)["counts"])
    assert still.context == "auto" and still.context_ == "pixel" and still.drift_range_ < 0.15
    drifting = PCADetector(robust=True).fit(cube(1.0, 3)["counts"])
    # the simulated drift spans ~2 eV (+-1 eV); the estimate is of its smooth part over the sampled pixels
    assert drifting.context_ == "neighbours" and 1.5 < drifting.drift_range_ < 2.5, drifting.drift_range_
    assert drifting.calibration_strata_ is not None  # calibrated as the neighbour context is
    # the choice travels with the saved detector, and scores as the context it chose
    again = PCADetector.load(drifting.save(tmp_path / "pca.nc"))
    assert again.context_ == "neighbours" and again.drift_range_ == pytest.approx(drifting.drift_range_)
    test = cube(1.0, 4)
    np.testing.assert_allclose(again.score(test["counts"]).values, drifting.score(test["counts"]).values)
    explicit = PCADetector(robust=True, context="neighbours").fit(cube(1.0, 3)["counts"])
    np.testing.assert_allclose(explicit.score(test["counts"]).values, drifting.score(test["counts"]).values)
    # and under that drift it finds the local shifts the pixel context explains away
    truth = test["anomaly"].values
    pixel = PCADetector(robust=True, context="pixel").fit(cube(1.0, 3)["counts"])
    auc = {name: detection_metrics(d.score(test["counts"]).values, truth, threshold=np.inf)["roc_auc"]
           for name, d in (("auto", drifting), ("pixel", pixel))}
    assert auc["auto"] > 0.97 and auc["auto"] > auc["pixel"] + 0.1, auc
    with pytest.raises(ValueError, match="context must be one of"):
        PCADetector(context="nearby").fit(cube(0.0, 3)["counts"])


def test_a_pareto_tail_on_the_squared_scale_follows_a_normal_scores_tail_where_the_plain_one_is_too_heavy():
    # the CVAE's score is the larger of two normal scores (shift z, deviance z): P(X > x) = 1 - Phi(x)^2
    from scipy import special

    at = special.ndtri(np.sqrt(1 - np.array([1e-4, 1e-5])))  # its true 1e-4 and 1e-5 quantiles
    plain, squared = [], []
    for seed in range(8):
        rng = np.random.default_rng(seed)
        held, model_null = rng.normal(size=(4000, 2)).max(axis=1), rng.normal(size=(32768, 2)).max(axis=1)
        plain.append(UpperTail(held, tail_sample=model_null).sf(at) / [1e-4, 1e-5])
        squared.append(UpperTail(held, tail_sample=model_null, squared=True).sf(at) / [1e-4, 1e-5])
    plain, squared = np.array(plain), np.array(squared)
    # measured: the plain scale's exponential floor 3.6-5.8x the level at 1e-5; the squared one 0.5-4.0x, median 0.9
    assert (plain[:, 1] > 3).all()
    assert 0.5 < np.median(squared[:, 1]) < 2 and 0.5 < np.median(squared[:, 0]) < 2
    # below the threshold nothing changes: the conformal p-values of the held-out sample
    rng = np.random.default_rng(0)
    held = rng.normal(size=(4000, 2)).max(axis=1)
    body = np.quantile(held, [0.2, 0.5, 0.9])
    np.testing.assert_array_equal(UpperTail(held, squared=True).sf(body), UpperTail(held).sf(body))
    assert squared_excess(np.array([2.0, 3.0]), 2.0).tolist() == [0.0, 2.5]
    # a threshold at or below 0 has no squared scale: the plain one is kept
    assert not UpperTail(-np.abs(rng.normal(size=500)), squared=True).squared


def test_the_empirical_null_per_stratum_takes_each_strata_own_centre_and_spread():
    rng = np.random.default_rng(0)
    strata = np.zeros((64, 64), np.int8)
    strata[:4], strata[-4:] = 1, 1  # a band of 512 pixels whose null runs wider and higher (a cut ring's)
    z = np.where(strata == 1, rng.normal(0.6, 1.3, strata.shape), rng.normal(0.0, 1.0, strata.shape))
    pvalues = stats.norm.sf(z)
    whole, _, _ = empirical_null(pvalues)
    own, centre, spread = empirical_null(pvalues, strata)
    band = strata == 1
    assert np.mean(whole[band] < 0.01) > 0.04  # one null for the map: the band's tail ~7x the level (0.074)
    assert np.mean(own[band] < 0.01) == pytest.approx(0.01, abs=0.008)
    assert np.mean(own[~band] < 0.01) == pytest.approx(0.01, abs=0.005)
    assert centre == pytest.approx(0.0, abs=0.1) and spread == pytest.approx(1.0, abs=0.1)  # the largest's
    # a stratum too small for a null of its own keeps the whole map's
    tiny = np.zeros_like(strata)
    tiny[0, :10] = 1
    np.testing.assert_array_equal(empirical_null(pvalues, tiny)[0][0, :10], whole[0, :10])
    with pytest.raises(ValueError, match=r"strata must have the p-values' shape \(64, 64\), got \(64,\)"):
        empirical_null(pvalues, strata[0])


def test_the_empirical_null_per_stratum_fits_the_whole_map_only_for_strata_too_small(monkeypatch):
    import eels_ad.detect.spatial as spatial

    fitted = []
    one = spatial._empirical_null
    monkeypatch.setattr(spatial, "_empirical_null", lambda values: fitted.append(values.size) or one(values))
    pvalues = np.random.default_rng(1).uniform(size=(64, 64))
    strata = np.zeros((64, 64), np.int8)
    strata[:4] = 1
    before = pvalues.copy()
    empirical_null(pvalues, strata)  # both strata large enough: one fit each, none of the whole map (scoring path)
    assert sorted(fitted) == [256, 64 * 60]
    fitted.clear()
    strata[0, :10] = 2  # a stratum of 10 pixels: the whole map's null for it
    adjusted = empirical_null(pvalues, strata)[0]
    assert sorted(fitted) == [246, 64 * 60, 64 * 64]
    np.testing.assert_array_equal(pvalues, before)  # the input is left as it was
    assert np.isfinite(adjusted).all()


def test_the_cvae_takes_each_stratums_own_empirical_null_and_pca_one_for_the_map(monkeypatch):
    import eels_ad.detect._base as base
    from eels_ad.detect import CVAEDetector

    seen = []

    def recording(pvalues, strata=None):
        seen.append(strata)
        return empirical_null(pvalues, strata)

    monkeypatch.setattr(base, "empirical_null", recording)
    rng = np.random.default_rng(3)
    cvae = CVAEDetector(scoring="shift", context="neighbours")  # patches 8, holes 4: a 4-pixel frame in 2 strata
    strata = np.r_[np.zeros(300, np.int8), np.ones(250, np.int8), np.full(250, 2, np.int8)]
    cvae.calibration_strata_, cvae.calibration_scores_ = strata, np.abs(rng.normal(size=strata.size))
    raw = np.abs(rng.normal(size=(64, 64)))
    cvae._pixel_pvalues(raw, None)
    np.testing.assert_array_equal(seen[-1], cvae._strata((64, 64)))
    cvae._pixel_pvalues(raw, None, null_per_stratum=False)  # the second step's suspects: one null
    assert seen[-1] is None
    bulk = eels_ad.simulate_fe_l23((48, 48), dose=20, drift=1.0, anomaly_fraction=0.0, seed=101)["counts"]
    pca = PCADetector(scoring="shift", context="neighbours").fit(bulk)
    assert pca.calibration_strata_ is not None and not pca.NULL_PER_STRATUM
    pca._pixel_pvalues(raw[:48, :48], None)
    assert seen[-1] is None
