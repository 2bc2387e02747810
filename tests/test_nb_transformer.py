"""nb_fit(method="transformer"): the pre-trained set-transformer estimator, on the counts the MoM/MLE tests use."""

import numpy as np
import pytest

from eels_ad.stats import nb_fit, nb_test
from eels_ad.stats._transformer import (
    MAX_PER_GROUP,
    WEIGHTS,
    estimate,
    load_network,
    simulate_problems,
    train_nb_transformer,
)


def _design(groups):
    return np.c_[np.ones(len(groups)), groups]


@pytest.fixture(scope="module")
def held_out():
    """10 + 10 samples over the training ranges, a stream the training never drew from."""
    return simulate_problems(np.random.default_rng([99, 7]), 3000, 10, 10)


def _rmse(problems, log_a, log_b, alpha):
    lfc = np.sqrt(np.mean((log_b - log_a - problems["log_fold_change"]) ** 2))
    dispersion = np.sqrt(np.mean((np.log(alpha) - np.log(problems["dispersion"])) ** 2))
    return lfc, dispersion


def test_the_weights_ship_with_the_package_and_are_small():
    assert WEIGHTS.is_file() and WEIGHTS.stat().st_size < 3_000_000
    network = load_network()
    assert sum(p.numel() for p in network.parameters()) <= 1_000_000


def test_same_counts_as_mom_and_mle_give_the_same_shapes_and_nan_reasons():
    counts = np.array([
        [0, 0, 0, 0, 0, 0],        # all zero: NaN with a reason, as for MoM and MLE
        [0, 0, 0, 5, 7, 6],        # group A without counts: finite (as MoM: no infinite fold change)
        [3, 4, 5, 6, 7, 8],        # fine
    ], dtype=float)
    groups = np.array([0, 0, 0, 1, 1, 1])
    fit = nb_fit(counts, _design(groups), method="transformer")
    mle = nb_fit(counts, _design(groups), method="mle")
    assert fit.coef.shape == mle.coef.shape == (3, 2) and fit.cov.shape == (3, 2, 2) and fit.mu.shape == (3, 6)
    assert np.isnan(fit.coef[0]).all() and fit.reason[0] == "all counts zero"
    assert np.isfinite(fit.coef[1:]).all() and fit.coef[1, 1] > 1.5  # far more counts in group B
    assert np.all(np.isfinite(fit.coef[np.isfinite(mle.coef[:, 0])]))  # finite wherever MLE is
    table = nb_test(counts, groups, method="transformer")
    assert np.isnan(table.pvalue[0]) and np.isfinite(table.pvalue[2]) and table.reason[2] == ""


def test_group_sizes_beyond_training_are_a_clear_error():
    rng = np.random.default_rng(1)
    groups = np.r_[np.zeros(MAX_PER_GROUP + 1), np.ones(5)]
    counts = rng.poisson(20, size=(4, groups.size))
    with pytest.raises(ValueError, match=r"trained for 2 to 50 samples per group; the first group has 51.*'mom' or"):
        nb_fit(counts, _design(groups), method="transformer")
    with pytest.raises(ValueError, match="two-group design"):
        nb_fit(counts, np.c_[np.ones(groups.size), groups, np.arange(groups.size)], method="transformer")
    with pytest.raises(ValueError, match="method must be one of"):
        nb_fit(counts, _design(groups), method="neural")


def test_accuracy_on_held_out_problems_next_to_mom(held_out):
    log_a, log_b, alpha = estimate(held_out["counts"], held_out["in_b"], held_out["size_factors"])
    lfc_rmse, dispersion_rmse = _rmse(held_out, log_a, log_b, alpha)
    # the method of moments on the same problems (one size-factor vector per problem: fit them one by one)
    mom = [nb_fit(held_out["counts"][i:i + 1], _design(held_out["in_b"]), held_out["size_factors"][i],
                  method="mom", loglik=False) for i in range(500)]
    mom_lfc = np.array([f.coef[0, 1] for f in mom])
    mom_alpha = np.maximum(np.array([f.dispersion[0] for f in mom]), 1e-3)
    first = {k: v[:500] for k, v in held_out.items() if k not in ("in_b",)}
    mom_lfc_rmse = np.sqrt(np.mean((mom_lfc - first["log_fold_change"]) ** 2))
    mom_dispersion_rmse = np.sqrt(np.mean((np.log(mom_alpha) - np.log(first["dispersion"])) ** 2))
    assert lfc_rmse < 1.1 * mom_lfc_rmse, (lfc_rmse, mom_lfc_rmse)
    assert dispersion_rmse < mom_dispersion_rmse, (dispersion_rmse, mom_dispersion_rmse)


def test_wald_tests_on_the_estimator_are_calibrated():
    """5 + 5 samples, the anchor's null simulation (as tests/test_stats.py): FPR at 0.05 near 0.05 (t reference)."""
    from test_stats import anchor_null_problems

    counts, groups = anchor_null_problems()
    pvalues = nb_test(counts, groups, method="transformer").pvalue.to_numpy()
    assert 0.015 < np.nanmean(pvalues < 0.05) < 0.08
    with pytest.raises(ValueError, match="likelihood-ratio test needs method='mle'"):
        nb_test(counts, groups, method="transformer", test="lrt")


@pytest.mark.slow
def test_a_short_retraining_reproduces_the_shipped_accuracy(held_out):
    shipped = _rmse(held_out, *estimate(held_out["counts"], held_out["in_b"], held_out["size_factors"]))
    retrained = train_nb_transformer(None, steps=200, batch=128, seed=0)
    network = load_network(retrained["state"])
    again = _rmse(held_out, *estimate(held_out["counts"], held_out["in_b"], held_out["size_factors"],
                                      network=network))
    assert again[0] < 1.25 * shipped[0] and again[1] < 1.25 * shipped[1], (shipped, again)
