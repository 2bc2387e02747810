import warnings

import numpy as np
import pytest

import eels_ad
from eels_ad.stats import benjamini_hochberg, compare_regions, nb_fit, nb_loglik, nb_test


def nb_counts(rng, mu, alpha):
    r = 1.0 / alpha
    return rng.poisson(rng.gamma(r, mu / r))


def anchor_null_problems(n_features: int = 4000, seed: int = 3):
    """The NB anchor's null problems: 5 + 5 samples, mean log-uniform in [1, 1000], alpha in [0.01, 1]."""
    rng = np.random.default_rng(seed)
    mean = np.exp(rng.uniform(0, np.log(1000), n_features))
    alpha = np.exp(rng.uniform(np.log(0.01), 0, n_features))
    counts = nb_counts(rng, mean[:, None].repeat(10, 1), alpha[:, None])
    return counts, np.r_[np.zeros(5), np.ones(5)]


@pytest.fixture(scope="module")
def random_problems():
    rng = np.random.default_rng(0)
    n_features, n = 25, 16
    groups = np.r_[np.zeros(n // 2), np.ones(n // 2)]
    mean = rng.uniform(5, 300, n_features)
    alpha = rng.uniform(0.05, 0.6, n_features)
    lfc = rng.normal(0, 0.6, n_features)
    size_factors = rng.uniform(0.7, 1.4, n)
    mu = mean[:, None] * np.exp(lfc[:, None] * groups[None, :]) * size_factors[None, :]
    counts = nb_counts(rng, mu, alpha[:, None])
    return counts, groups, size_factors


def test_mle_matches_statsmodels(random_problems):
    from statsmodels.discrete.discrete_model import NegativeBinomial

    counts, groups, size_factors = random_problems
    design = np.column_stack([np.ones(groups.size), groups])
    fit = nb_fit(counts, design, size_factors, method="mle")
    table = nb_test(counts, groups, size_factors, method="mle", null_distribution="normal")
    assert fit.converged.all()
    compared = 0
    for feature in range(counts.shape[0]):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            reference = NegativeBinomial(counts[feature], design, loglike_method="nb2",
                                         offset=np.log(size_factors)).fit(disp=0, maxiter=300, method="newton")
        if not np.all(np.isfinite(reference.params)):
            continue  # statsmodels' own failures (it returns NaN on some problems)
        compared += 1
        np.testing.assert_allclose(fit.coef[feature], reference.params[:2], rtol=1e-4, atol=1e-8)
        assert fit.dispersion[feature] == pytest.approx(reference.params[2], rel=1e-4)
        assert fit.loglik[feature] == pytest.approx(reference.llf, rel=1e-8)
        assert table.pvalue[feature] == pytest.approx(reference.pvalues[1], abs=1e-3)
        assert table.se[feature] == pytest.approx(reference.bse[1], rel=1e-3)
    assert compared >= 20


def test_loglik_matches_scipy():
    from scipy import stats

    counts = np.array([[0.0, 3.0, 10.0]])
    mu = np.array([[2.0, 4.0, 8.0]])
    alpha = np.array([0.3])
    r = 1 / alpha[0]
    expected = stats.nbinom.logpmf(counts[0], r, r / (r + mu[0])).sum()
    assert nb_loglik(counts, mu, alpha)[0] == pytest.approx(expected)


def test_mom_recovers_mean_and_dispersion():
    rng = np.random.default_rng(1)
    groups = np.r_[np.zeros(200), np.ones(200)]
    mu = np.where(groups == 0, 50.0, 150.0)[None, :].repeat(50, 0)
    counts = nb_counts(rng, mu, 0.2)
    table = nb_test(counts, groups, method="mom")
    assert table.log_fold_change.mean() == pytest.approx(np.log(3), abs=0.02)
    assert table.dispersion.mean() == pytest.approx(0.2, rel=0.1)
    assert (table.qvalue < 0.01).all()


def test_mom_poisson_fallback_clips_dispersion_at_zero():
    rng = np.random.default_rng(2)
    counts = rng.poisson(20.0, (200, 10))
    fit = nb_fit(counts, np.column_stack([np.ones(10), np.r_[np.zeros(5), np.ones(5)]]), method="mom")
    assert (fit.dispersion >= 0).all()
    assert (fit.dispersion == 0).mean() > 0.3  # Poisson data: often no excess variance at all


@pytest.mark.parametrize("method,test", [("mom", "wald"), ("mle", "wald"), ("mle", "lrt")])
def test_false_positive_rate_is_calibrated(method, test):
    """5 + 5 samples, the anchor's simulation: FPR at 0.05 near 0.05 with the default t/F reference."""
    counts, groups = anchor_null_problems()
    pvalues = nb_test(counts, groups, method=method, test=test).pvalue.to_numpy()
    fpr = np.nanmean(pvalues < 0.05)
    assert 0.025 < fpr < 0.07
    assert np.isfinite(pvalues).mean() > 0.99


def test_power_against_shifted_means():
    rng = np.random.default_rng(4)
    groups = np.r_[np.zeros(5), np.ones(5)]
    mu = np.where(groups == 0, 100.0, 250.0)[None, :].repeat(500, 0)
    counts = nb_counts(rng, mu, 0.05)
    for method in ("mom", "mle"):
        assert (nb_test(counts, groups, method=method).pvalue < 0.05).mean() > 0.9


def test_degenerate_features_get_nan_with_a_reason():
    counts = np.array([
        [0, 0, 0, 0, 0, 0],        # all zero
        [0, 0, 0, 5, 7, 6],        # group A empty of counts
        [3, 4, 5, 6, 7, 8],        # fine
    ], dtype=float)
    groups = np.array([0, 0, 0, 1, 1, 1])
    mle = nb_test(counts, groups, method="mle")
    assert np.isnan(mle.pvalue[0]) and mle.reason[0] == "all counts zero"
    assert np.isnan(mle.pvalue[1]) and "infinite" in mle.reason[1]
    assert np.isfinite(mle.pvalue[2]) and mle.reason[2] == ""
    mom = nb_test(counts, groups, method="mom")
    assert np.isnan(mom.pvalue[0])
    assert mom.log_fold_change[1] > 2  # pseudo-count: large and finite
    few = nb_test(counts[:, [0, 3, 4]], np.array([0, 1, 1]), method="mom")
    assert few.pvalue.isna().all() and few.reason[0].startswith("fewer than two samples")


def test_bad_input_is_named():
    groups = np.array([0, 0, 1, 1])
    with pytest.raises(ValueError, match=">= 0"):
        nb_test(-np.ones((2, 4)), groups)
    with pytest.raises(ValueError, match="NaN"):
        nb_test(np.full((2, 4), np.nan), groups)
    with pytest.raises(ValueError, match="groups has 3 labels"):
        nb_test(np.ones((2, 4)), groups[:3])
    with pytest.raises(ValueError, match="exactly two distinct labels"):
        nb_test(np.ones((2, 4)), np.array([0, 1, 2, 2]))
    with pytest.raises(ValueError, match="needs method='mle'"):
        nb_test(np.ones((2, 4)), groups, method="mom", test="lrt")
    with pytest.raises(ValueError, match="size_factors has 3"):
        nb_test(np.ones((2, 4)), groups, size_factors=[1, 1, 1])
    with pytest.raises(ValueError, match="two-group design"):
        nb_fit(np.ones((2, 4)), np.column_stack([np.ones(4), [0, 1, 2, 3]]), method="mom")
    with pytest.raises(ValueError, match="full column rank"):
        nb_fit(np.ones((2, 4)), np.column_stack([np.ones(4), np.ones(4)]))


def test_general_design_mle():
    rng = np.random.default_rng(5)
    n = 60
    dose = rng.uniform(0, 1, n)
    design = np.column_stack([np.ones(n), dose, rng.integers(0, 2, n)])
    beta = np.array([3.0, 1.2, -0.5])
    counts = nb_counts(rng, np.exp(design @ beta)[None, :].repeat(200, 0), 0.1)
    fit = nb_fit(counts, design)
    assert fit.converged.all()
    np.testing.assert_allclose(fit.coef.mean(0), beta, atol=0.05)


def test_benjamini_hochberg_by_hand():
    q = benjamini_hochberg(np.array([0.01, 0.04, np.nan, 0.03, 0.5]))
    # sorted p 0.01, 0.03, 0.04, 0.5 (m = 4): p m / rank = 0.04, 0.06, 0.0533, 0.5; then the running minimum
    np.testing.assert_allclose(q[[0, 1, 3, 4]], [0.04, 0.04 * 4 / 3, 0.04 * 4 / 3, 0.5])
    assert np.isnan(q[2])


def test_compare_regions_finds_the_edge_shift():
    sim = eels_ad.simulate_fe_l23((32, 32), anomaly_fraction=0.08, layout="clusters", shift=1.5, seed=6)
    # size factors from the pre-edge background, which the shift leaves alone
    table = compare_regions(sim["counts"], ~sim["anomaly"], sim["anomaly"], normalize_range=(670.0, 700.0))
    assert dict(table.sizes) == {"energy": 320}
    significant = table["energy"].values[table["significant"].values]
    # the pre-edge background is the same in both regions (true |LFC| < 0.1 %): discoveries there are
    # false, and BH keeps false discoveries below 5 % of all discoveries
    false_discoveries = np.sum(significant < 700.0)
    assert significant.size >= 40
    assert false_discoveries <= 0.05 * significant.size, significant[significant < 700.0]
    # the L3 and L2 white lines (708.5 and 721.4 eV) both show up
    assert np.any(np.abs(significant - 708.5) < 3) and np.any(np.abs(significant - 721.4) < 3)
    # a shift to higher energy: fewer counts just below the L3 maximum, more just above it
    lfc = table["log_fold_change"]
    assert float(lfc.sel(energy=706.5, method="nearest")) < 0 < float(lfc.sel(energy=711.0, method="nearest"))


def test_compare_regions_errors():
    sim = eels_ad.simulate_fe_l23((8, 8), anomaly_fraction=0.05, seed=7)
    with pytest.raises(ValueError, match="overlap"):
        compare_regions(sim["counts"], np.ones((8, 8), bool), sim["anomaly"])
    with pytest.raises(ValueError, match="region B has 0 pixels"):
        compare_regions(sim["counts"], np.ones((8, 8), bool))


def test_channel_test_figures(tmp_path):
    import holoviews as hv
    import matplotlib

    matplotlib.use("Agg")
    from eels_ad import viz

    sim = eels_ad.simulate_fe_l23((16, 16), anomaly_fraction=0.1, layout="clusters", shift=1.5, seed=8)
    table = compare_regions(sim["counts"], ~sim["anomaly"], sim["anomaly"])
    figure = viz.plot_channel_tests(table)
    assert len(figure.axes) == 3
    figure.savefig(tmp_path / "nb.png")
    assert (tmp_path / "nb.png").stat().st_size > 10_000
    layout = viz.channel_tests_hv(table)
    assert isinstance(layout, hv.Layout) and len(layout) == 3


def test_torch_backend_matches_numpy(random_problems):
    counts, groups, size_factors = random_problems
    design = np.column_stack([np.ones(groups.size), groups])
    for factors in (None, size_factors):  # closed-form beta, then IRLS
        reference = nb_fit(counts, design, factors)
        on_torch = nb_fit(counts, design, factors, backend="torch", device="cpu")
        np.testing.assert_allclose(on_torch.coef, reference.coef, rtol=1e-8, atol=1e-10)
        np.testing.assert_allclose(on_torch.dispersion, reference.dispersion, rtol=1e-6)
        np.testing.assert_allclose(on_torch.loglik, reference.loglik, rtol=1e-10)
    with pytest.raises(ValueError, match="backend must be"):
        nb_fit(counts, design, backend="jax")


def test_shrinkage_helps_small_groups():
    rng = np.random.default_rng(9)
    n_features, alpha = 3000, 0.1
    groups = np.r_[np.zeros(3), np.ones(3)]
    mean = np.exp(rng.uniform(np.log(20), np.log(500), n_features))
    counts = nb_counts(rng, mean[:, None].repeat(6, 1), alpha)
    design = np.column_stack([np.ones(6), groups])
    plain = nb_fit(counts, design)
    shrunk = nb_fit(counts, design, shrink=True)
    error = lambda fit: np.sqrt(np.mean((np.log(np.maximum(fit.dispersion, 1e-4)) - np.log(alpha)) ** 2))  # noqa: E731
    assert error(shrunk) < 0.5 * error(plain)
    assert (shrunk.dispersion > 1e-6).all()  # MAP is interior: no Poisson boundary
    table = nb_test(counts, groups, method="mle", shrink=True)
    assert 0.02 < (table.pvalue < 0.05).mean() < 0.07  # all null
    with pytest.raises(ValueError, match="shrinkage needs method='mle'"):
        nb_fit(counts, design, method="mom", shrink=True)
