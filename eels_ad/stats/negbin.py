"""Negative-binomial (NB2) regression, vectorised over features.

For feature g (an energy channel, or any count variable) and sample i (a pixel):
``y_gi ~ NB(mu_gi, alpha_g)`` with variance ``mu + alpha mu**2`` and ``log mu_gi = log s_i + x_i . beta_g``.

Two estimators, both batched over all features at once:

- ``"mom"`` (two groups): group means of size-factor-normalised counts and a pooled method-of-moments
  dispersion, clipped at 0 (Poisson fall-back); closed form, millions of features per second. As
  Svensson (arXiv:2508.04111) found, about as accurate as maximum likelihood for two-group problems.
- ``"mle"`` (any design): joint maximum likelihood of ``beta`` and ``alpha``: IRLS steps for ``beta``
  alternating with Newton steps on ``log alpha``, each feature with its own convergence flag.
- ``"transformer"`` (two groups of 2 to 50 samples): a small set transformer pre-trained on simulated
  NB problems returns the group means and the dispersion (Svensson, arXiv:2508.04111); the covariance is
  the inverse Fisher information of the means at its dispersion. See ``eels_ad.stats._transformer``.

Tests: Wald (``se`` from the observed information of the joint fit for MLE, the delta method for
MoM) and likelihood ratio (MLE of the full and the reduced model). With few samples the dispersion
is uncertain and normal reference distributions are anti-conservative; by default p-values use a
t (Wald) or F (LRT) distribution on ``n - p`` residual degrees of freedom (``null_distribution="t"``);
``null_distribution="normal"`` gives the textbook (and statsmodels') asymptotic p-values.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import pandas as pd
from scipy import special

from .._xp import Arrays, Backend, arrays, to_numpy, trigamma

Method = Literal["mom", "mle", "transformer"]
METHODS: tuple[str, ...] = ("mom", "mle", "transformer")
Test = Literal["wald", "lrt"]

ALPHA_MIN = 1e-8
ALPHA_MAX = 1e4
PSEUDO_COUNT = 0.5


@dataclass
class NBFit:
    """The result of :func:`nb_fit` (arrays over features).

    Attributes
    ----------
    coef : ndarray (features, p)
        ``beta``: natural-log coefficients of the design columns.
    dispersion : ndarray (features,)
        ``alpha`` (variance ``mu + alpha mu**2``).
    mu : ndarray (features, samples)
        Fitted means.
    loglik : ndarray (features,)
        NB log-likelihood at the fit.
    cov : ndarray (features, p, p)
        Covariance of ``coef`` (inverse observed information; MoM: delta method).
    converged : ndarray of bool (features,)
    n_iter : int
        Iterations used (MLE).
    reason : ndarray of str (features,)
        Why a feature has NaN results ("" when it has none).
    method : str
    """

    coef: np.ndarray
    dispersion: np.ndarray
    mu: np.ndarray
    loglik: np.ndarray
    cov: np.ndarray
    converged: np.ndarray
    n_iter: int
    reason: np.ndarray
    method: str
    df_residual: int = field(default=0)


def _as_counts(counts) -> np.ndarray:
    array = np.asarray(counts)
    integer = array.dtype.kind in "iub"
    if array.ndim == 1:
        array = array[None, :]
    if array.ndim != 2:
        raise ValueError(f"counts must be (features, samples), got shape {array.shape}")
    if not integer and not np.all(np.isfinite(array)):
        raise ValueError("counts hold NaN or inf")
    if array.size and (array.min() < 0 if integer else np.any(array < 0)):
        raise ValueError(f"counts must be >= 0 (minimum {array.min():g}); clip dark-reference negatives first")
    return np.asarray(array, dtype=np.float64)


def _as_size_factors(size_factors, n_samples: int) -> np.ndarray:
    if size_factors is None:
        return np.ones(n_samples)
    factors = np.asarray(size_factors, dtype=np.float64).ravel()
    if factors.shape != (n_samples,):
        raise ValueError(f"size_factors has {factors.size} values but counts has {n_samples} samples")
    if not np.all(np.isfinite(factors) & (factors > 0)):
        raise ValueError("size_factors must be finite and > 0")
    return factors


_NUMPY = arrays("numpy")


def nb_loglik(counts, mu, alpha, *, on: Arrays = _NUMPY):
    """NB2 log-likelihood summed over samples (last axis); ``alpha`` per feature.

    ``on`` is the array library of the inputs (:func:`eels_ad._xp.arrays`; numpy by default).
    """
    xp = on.xp
    if on.backend == "numpy":
        counts, mu, alpha = (np.asarray(a, dtype=float) for a in (counts, mu, alpha))
    r = 1.0 / xp.clip(alpha, ALPHA_MIN, None)[..., None]
    mu = xp.clip(mu, 1e-300, None)
    terms = (on.gammaln(counts + r) - on.gammaln(r) - on.gammaln(counts + 1)
             + r * xp.log(r / (r + mu)) + counts * xp.log(mu / (r + mu)))
    return terms.sum(-1)


def _dispersion_newton(counts, mu, log_alpha, on: Arrays = _NUMPY, prior_mean=None, prior_var=None):
    """One Newton step on log(alpha) of the NB2 likelihood with mu fixed (batched, step-limited).

    Where the counts are not over-dispersed about mu, sum((y - mu)**2 - y) <= 0, the likelihood rises
    all the way to alpha = 0 (Levin & Reeds 1977): jump to the Poisson boundary instead of crawling.
    With a normal prior on log(alpha) (``prior_mean``, ``prior_var``) the step is towards the maximum
    a posteriori instead, which is always interior.
    """
    xp = on.xp
    floor = float(np.log(ALPHA_MIN))
    poisson = ((counts - mu) ** 2 - counts).sum(1) <= 0
    r = xp.exp(-log_alpha)[:, None]
    rm = r + mu
    gradient_r = (on.digamma(counts + r) - on.digamma(r) + xp.log(r / rm) + (mu - counts) / rm).sum(1)
    hessian_r = (on.trigamma(counts + r) - on.trigamma(r) + 1.0 / r - 1.0 / rm - (mu - counts) / rm**2).sum(1)
    r1 = r[:, 0]
    gradient = -r1 * gradient_r  # d loglik / d log alpha
    hessian = r1**2 * hessian_r + r1 * gradient_r
    if prior_mean is not None:
        gradient = gradient - (log_alpha - prior_mean) / prior_var
        hessian = hessian - 1.0 / prior_var
        poisson = xp.zeros_like(poisson)  # the prior keeps the maximum interior
    concave = hessian < 0
    step = xp.where(concave, -gradient / xp.where(concave, hessian, -1.0), xp.sign(gradient))
    log_alpha = xp.clip(log_alpha + xp.clip(step, -2.0, 2.0), floor, float(np.log(ALPHA_MAX)))
    log_alpha = xp.where(poisson, floor, log_alpha)
    gradient = xp.where(poisson, -1.0, gradient)
    return log_alpha, gradient


def _information(design, weights):
    """X^T diag(w_g) X for every feature g at once, as one matrix product: (features, p, p)."""
    p = design.shape[1]
    outer = (design[:, :, None] * design[:, None, :]).reshape(design.shape[0], p * p)
    return (weights @ outer).reshape(-1, p, p)


def _irls_step(counts, design, offset, beta, alpha, on: Arrays = _NUMPY):
    """One IRLS (Fisher scoring) step for beta with alpha fixed, batched over features."""
    xp = on.xp
    eta = offset[None, :] + beta @ design.T
    mu = xp.exp(xp.clip(eta, -700.0, 700.0))
    weights = mu / (1.0 + alpha[:, None] * mu)
    working = (eta - offset[None, :]) + (counts - mu) / xp.clip(mu, 1e-300, None)
    information = _information(design, weights) + 1e-10 * on.eye(design.shape[1])
    rhs = (weights * working) @ design
    return xp.linalg.solve(information, rhs[..., None])[..., 0]


def _closed_form_beta(counts, design, factors) -> np.ndarray | None:
    """The exact MLE of beta when it does not depend on alpha, else None.

    With equal size factors and a design whose rows fall into groups each with its own mean
    (intercept only, or intercept + one 0/1 column), the NB2 score equations
    sum_i (y_i - mu) / (1 + alpha mu) = 0 give mu = the group mean, whatever alpha is.
    """
    if not np.allclose(factors, factors[0]):
        return None
    scale = np.log(factors[0])
    if design.shape[1] == 1 and np.allclose(design[:, 0], 1.0):
        mean = np.maximum(counts.mean(1), 1e-300)
        return (np.log(mean) - scale)[:, None]
    if design.shape[1] == 2 and np.allclose(design[:, 0], 1.0) and np.isin(design[:, 1], (0.0, 1.0)).all():
        in_b = design[:, 1] == 1.0
        if in_b.all() or not in_b.any():
            return None
        mean_a = np.maximum(counts[:, ~in_b].mean(1), 1e-300)
        mean_b = np.maximum(counts[:, in_b].mean(1), 1e-300)
        return np.column_stack([np.log(mean_a) - scale, np.log(mean_b) - np.log(mean_a)])
    return None


def _observed_information(counts, design, mu, alpha):
    """Observed information of (beta, alpha) for NB2 with log link (batched, numpy)."""
    r = 1.0 / alpha[:, None]
    rm = r + mu
    h_eta = r * mu * (r + counts) / rm**2  # -d2l/deta2
    h_eta_alpha = (counts - mu) * mu / (1.0 + alpha[:, None] * mu) ** 2  # -d2l/deta dalpha
    gradient_r = special.digamma(counts + r) - special.digamma(r) + np.log(r / rm) + (mu - counts) / rm
    hessian_r = trigamma(counts + r) - trigamma(r) + 1.0 / r - 1.0 / rm - (mu - counts) / rm**2
    r1 = r[:, 0]
    h_alpha = -(2 * r1**3 * gradient_r.sum(1) + r1**4 * hessian_r.sum(1))  # -d2l/dalpha2
    p = design.shape[1]
    information = np.empty((counts.shape[0], p + 1, p + 1))
    information[:, :p, :p] = _information(design, h_eta)
    information[:, :p, p] = information[:, p, :p] = h_eta_alpha @ design
    information[:, p, p] = h_alpha
    return information


def _fit_mle(counts_np, design_np, offset_np, max_iter: int, tol: float, on: Arrays = _NUMPY,
             prior_mean_np=None, prior_var: float | None = None):
    """Joint MLE (or MAP of alpha with a normal prior on log alpha) of beta and alpha for every feature.

    Arrays go in and come out as numpy.
    """
    n_features = counts_np.shape[0]
    fixed = _closed_form_beta(counts_np, design_np, np.exp(offset_np))
    if fixed is None:  # start: log-linear least squares on pseudo-counted, size-normalised counts
        normalised = (counts_np + PSEUDO_COUNT) / np.exp(offset_np)[None, :]
        start = np.linalg.lstsq(design_np, np.log(normalised).T, rcond=None)[0].T
    else:
        start = fixed
    xp = on.xp
    counts, design, offset, beta = (on.asarray(a) for a in (counts_np, design_np, offset_np, start))
    prior_mean = None if prior_mean_np is None else on.asarray(prior_mean_np)
    mu = xp.exp(xp.clip(offset[None, :] + beta @ design.T, -700.0, 700.0))
    moment = ((counts - mu) ** 2 - mu).sum(1) / xp.clip((mu**2).sum(1), 1e-300, None)
    log_alpha = xp.log(xp.clip(moment, 1e-3, ALPHA_MAX))
    converged = on.zeros(n_features, dtype=xp.bool)
    active = on.arange(n_features)
    log_alpha_floor = float(np.log(ALPHA_MIN))
    iterations = 0
    while iterations < max_iter and len(active):
        iterations += 1
        c, b, la = counts[active], beta[active], log_alpha[active]
        if fixed is None:
            b_new = _irls_step(c, design, offset, b, xp.exp(la), on)
            m = xp.exp(xp.clip(offset[None, :] + b_new @ design.T, -700.0, 700.0))
        else:
            b_new, m = b, mu[active]
        la_new, gradient = _dispersion_newton(
            c, m, la, on, None if prior_mean is None else prior_mean[active], prior_var)
        beta_change = xp.max(xp.abs(b_new - b), axis=1)
        # at the Poisson boundary (alpha -> 0) the likelihood keeps rising towards alpha = 0
        boundary = (la_new <= log_alpha_floor + 1e-9) & (gradient <= 0)
        # a flat likelihood in log alpha (tiny alpha: practically Poisson) is converged too
        flat = xp.abs(gradient) <= 1e-6
        done = (beta_change <= tol) & ((xp.abs(la_new - la) <= tol) | boundary | flat)
        beta[active], log_alpha[active] = b_new, la_new
        converged[active[done]] = True
        active = active[~done]
    alpha = xp.exp(log_alpha)
    mu = xp.exp(xp.clip(offset[None, :] + beta @ design.T, -700.0, 700.0))
    loglik = nb_loglik(counts, mu, alpha, on=on)
    return (to_numpy(beta), to_numpy(alpha), to_numpy(mu), to_numpy(loglik), to_numpy(converged).astype(bool),
            iterations)


def _validate_design(design, n_samples: int) -> np.ndarray:
    design = np.asarray(design, dtype=np.float64)
    if design.ndim == 1:
        design = design[:, None]
    if design.shape[0] != n_samples:
        raise ValueError(f"design has {design.shape[0]} rows but counts has {n_samples} samples")
    if np.linalg.matrix_rank(design) < design.shape[1]:
        raise ValueError(f"design of shape {design.shape} is not of full column rank")
    return design


def nb_fit(
    counts,
    design,
    size_factors=None,
    *,
    method: Method = "mle",
    max_iter: int = 100,
    tol: float = 1e-8,
    loglik: bool = True,
    backend: Backend = "numpy",
    device: str | None = None,
    shrink: bool = False,
) -> NBFit:
    """Fit NB2 regressions to every feature at once.

    Parameters
    ----------
    counts
        Counts, shape (features, samples).
    design
        Design matrix (samples, p), e.g. ``[[1, 0], [1, 0], [1, 1], ...]`` (intercept + group).
    size_factors
        Exposure of each sample (samples,): offsets ``log s_i``. Default: all 1.
    method
        ``"mle"`` (any design), ``"mom"`` (two-group designs: intercept + one 0/1 column) or
        ``"transformer"`` (two-group designs with 2 to 50 samples per group: the pre-trained estimator
        that ships with the package; a ValueError outside that range).
    max_iter, tol
        MLE iterations, and the tolerance on the change of ``beta`` and ``log alpha`` per iteration.
    loglik
        Compute the log-likelihood of a MoM fit (MLE fits always have it).
    backend, device
        Array library of the MLE iterations: ``"numpy"`` (default) or ``"torch"`` (float64, on
        ``device``, by default CUDA when available, else the CPU). Results agree to round-off.
    shrink
        (MLE) Empirical-Bayes shrinkage of the dispersions towards a trend of log dispersion against
        log mean, for small groups: a normal prior on log alpha centred on the trend, with the
        spread of the first-pass estimates less their sampling variance ``trigamma((n - p) / 2)``
        (at least 0.25); the dispersion is then its maximum a posteriori and ``cov`` the inverse
        Fisher information of ``beta`` at that dispersion.

    Returns
    -------
    NBFit

    References
    ----------
    .. [1] V. Svensson, "Negative binomial regression and inference using a pre-trained transformer",
       arXiv:2508.04111.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> y = rng.negative_binomial(5, 5 / (5 + np.r_[[10.0] * 50, [30.0] * 50]), size=(3, 100))
    >>> fit = nb_fit(y, np.c_[np.ones(100), np.r_[np.zeros(50), np.ones(50)]])
    >>> bool(np.allclose(fit.coef[:, 1], np.log(3), atol=0.3))
    True
    """
    return _nb_fit(_as_counts(counts), design, size_factors, method=method, max_iter=max_iter, tol=tol,
                   loglik=loglik, backend=backend, device=device, shrink=shrink)


def _nb_fit(counts: np.ndarray, design, size_factors, *, method: Method, max_iter: int, tol: float, loglik: bool,
            backend: Backend, device: str | None, shrink: bool, need_mu: bool = True) -> NBFit:
    """:func:`nb_fit` of counts already checked by ``_as_counts`` (``need_mu=False``: a MoM fit skips ``mu``)."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if shrink and method != "mle":
        raise ValueError("dispersion shrinkage needs method='mle'")
    n_features, n_samples = counts.shape
    design = _validate_design(design, n_samples)
    factors = _as_size_factors(size_factors, n_samples)
    p = design.shape[1]
    if method == "transformer":
        from ._transformer import check_group_sizes

        check_group_sizes(_two_group_columns(design, method))
    reason = _reasons_for_nan(counts, design, method)
    ok = reason == ""
    empty = np.empty(0) if ok.all() else None  # every feature fitted: the arrays come whole from the fitter

    def nans(*shape: int) -> np.ndarray:
        return empty if empty is not None else np.full(shape, np.nan)

    fit = NBFit(coef=nans(n_features, p), dispersion=nans(n_features), mu=nans(n_features, n_samples),
                loglik=nans(n_features), cov=nans(n_features, p, p), converged=np.zeros(n_features, dtype=bool),
                n_iter=0, reason=reason, method=method, df_residual=n_samples - p)
    if not ok.any():
        return fit
    if method == "mle":
        coef, alpha, mu, ll, cov, converged, fit.n_iter = _nb_fit_mle(
            counts[ok], design, factors, max_iter=max_iter, tol=tol, on=arrays(backend, device, np.float64),
            shrink=shrink)
        failed = ok.copy()
        failed[ok] = ~converged
        reason[failed] = f"not converged in {max_iter} iterations"
    else:
        in_b = _two_group_columns(design, method)
        if method == "mom":
            coef, alpha, mu, cov = _fit_mom(counts if ok.all() else counts[ok], in_b, factors,
                                            with_mu=need_mu or loglik)
        else:
            coef, alpha, mu, cov = _fit_transformer(counts[ok], in_b, factors)
        ll = nb_loglik(counts[ok], mu, alpha) if loglik else np.nan
        converged = True
    if ok.all():  # no masked copies of the (features, ...) arrays
        fit.coef, fit.dispersion, fit.cov = coef, alpha, cov
        fit.mu = mu if mu is not None else np.empty((0, n_samples))
        fit.loglik = np.broadcast_to(np.asarray(ll, dtype=float), (n_features,)).copy()
    else:
        fit.coef[ok], fit.dispersion[ok], fit.loglik[ok], fit.cov[ok] = coef, alpha, ll, cov
        if mu is not None:
            fit.mu[ok] = mu
    fit.converged[ok] = converged
    return fit


def _reasons_for_nan(counts: np.ndarray, design: np.ndarray, method: str) -> np.ndarray:
    """Why each feature cannot be fitted ("" where it can): too few samples, no counts, an empty group (MLE)."""
    n_features, n_samples = counts.shape
    p = design.shape[1]
    reason = np.full(n_features, "", dtype=object)
    if n_samples <= p:
        reason[:] = f"{n_samples} samples for {p} coefficients"
    reason[(counts.sum(1) == 0) & (reason == "")] = "all counts zero"
    if method == "mle":
        # a group (of a 0/1 design column) with no counts puts the MLE of its coefficient at -infinity
        for column in range(p):
            values = design[:, column]
            if np.isin(values, (0.0, 1.0)).all() and 0 < values.sum() < n_samples:
                empty = (counts[:, values == 1.0].sum(1) == 0) | (counts[:, values == 0.0].sum(1) == 0)
                reason[empty & (reason == "")] = "a group has no counts: the MLE of its log fold change is infinite"
    return reason


def _nb_fit_mle(counts, design, factors, *, max_iter: int, tol: float, on: Arrays, shrink: bool):
    """Joint MLE (or, with ``shrink``, the MAP dispersion) with the covariance of beta, for fittable features."""
    p = design.shape[1]
    offset = np.log(factors)
    b, a, m, ll, conv, n_iter = _fit_mle(counts, design, offset, max_iter, tol, on)
    if shrink:
        prior_mean, prior_var = _dispersion_prior(a, m, conv, counts.shape[1] - p)
        b, a, m, ll, conv, n_iter = _fit_mle(counts, design, offset, max_iter, tol, on, prior_mean, prior_var)
    information = _observed_information(counts, design, m, a)
    # at the Poisson boundary alpha is not estimable, and a shrunken alpha is no MLE: use the beta block alone there
    boundary = np.full(a.shape, True) if shrink else a <= 1.01 * ALPHA_MIN
    covariance = np.empty((counts.shape[0], p, p))
    interior = ~boundary
    if interior.any():
        covariance[interior] = _safe_inverse(information[interior])[:, :p, :p]
    if boundary.any():
        covariance[boundary] = _safe_inverse(information[boundary][:, :p, :p])
    return b, a, m, ll, covariance, conv, n_iter


def _dispersion_prior(alpha, mu, converged, df: int) -> tuple[np.ndarray, float]:
    """Trend of log alpha against log mean (a straight line) and the prior variance around it."""
    mean = mu.mean(1)
    usable = converged & (alpha > 1e-6) & (mean > 0)
    log_mean = np.log(np.maximum(mean, 1e-300))
    if usable.sum() < 3:
        return np.full(alpha.shape, np.log(0.1)), 1.0
    slope, intercept = np.polyfit(log_mean[usable], np.log(alpha[usable]), 1)
    trend = intercept + slope * log_mean
    spread = float(np.var(np.log(alpha[usable]) - trend[usable]))
    sampling = float(special.polygamma(1, max(df, 1) / 2.0))
    return trend, max(spread - sampling, 0.25)


def _safe_inverse(matrices: np.ndarray) -> np.ndarray:
    try:
        return np.linalg.inv(matrices)
    except np.linalg.LinAlgError:
        return np.linalg.pinv(matrices)


def _two_group_columns(design: np.ndarray, method: str = "mom") -> np.ndarray:
    """The 0/1 group column of an intercept + indicator design, else a clear error."""
    if design.shape[1] != 2 or not np.allclose(design[:, 0], 1.0) or not np.isin(design[:, 1], (0.0, 1.0)).all():
        raise ValueError(f"method={method!r} needs a two-group design: a column of ones and one 0/1 group column")
    return design[:, 1].astype(bool)


def _two_group_covariance(var_a: np.ndarray, var_b: np.ndarray) -> np.ndarray:
    """Covariance of (log mean a, log fold change) from the variances of the two log group means."""
    cov = np.empty((var_a.size, 2, 2))
    cov[:, 0, 0] = var_a
    cov[:, 0, 1] = cov[:, 1, 0] = -var_a
    cov[:, 1, 1] = var_a + var_b
    return cov


def _fit_transformer(counts: np.ndarray, in_b: np.ndarray, factors: np.ndarray):
    """The pre-trained estimator's means and dispersion; covariance from the Fisher information of the means."""
    from ._transformer import estimate

    log_a, log_b, alpha = estimate(counts, in_b, factors)
    alpha = np.clip(alpha, ALPHA_MIN, ALPHA_MAX)
    mu = np.exp(np.where(in_b[None, :], log_b[:, None], log_a[:, None])) * factors[None, :]
    weights = mu / (1.0 + alpha[:, None] * mu)  # Fisher information of log mu per sample, alpha held
    var_a = 1.0 / np.maximum(weights[:, ~in_b].sum(1), 1e-300)
    var_b = 1.0 / np.maximum(weights[:, in_b].sum(1), 1e-300)
    coef = np.stack([log_a, log_b - log_a], axis=1)
    return coef, alpha, mu, _two_group_covariance(var_a, var_b)


def group_moments(counts: np.ndarray, in_b: np.ndarray, factors: np.ndarray) -> dict[str, np.ndarray]:
    """Per-feature sufficient statistics of the two-group method of moments, as matrix products.

    ``sum``, ``sum_sq`` and ``sum_factor`` (sums of y, y**2 and y * s over each group's samples) have
    shape (features, 2), column 0 group A; ``n``, ``factor_sum`` and ``factor_sq`` have shape (2,).
    Moments of disjoint sets of samples add, so a cube read in chunks is summarised chunk by chunk.
    """
    membership = np.column_stack([~in_b, in_b]).astype(counts.dtype if counts.dtype.kind == "f" else float)
    return {
        "sum": counts @ membership,
        "sum_sq": (counts * counts) @ membership,
        "sum_factor": counts @ (membership * factors[:, None]),
        "n": membership.sum(axis=0),
        "factor_sum": factors @ membership,
        "factor_sq": (factors * factors) @ membership,
    }


def mom_from_moments(moments: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Method-of-moments fit from :func:`group_moments`: (coef, dispersion, covariance, group means)."""
    sums, total_s, sq_s = moments["sum"], moments["factor_sum"], moments["factor_sq"]
    means = np.where(sums == 0, PSEUDO_COUNT, sums) / total_s  # pseudo-count keeps log finite for zero groups
    n = moments["n"]
    correction = np.where(n > 1, n / np.maximum(n - 1, 1), np.nan)
    # sum over samples of (y - m s)^2 * n / (n - 1) - m s, and of (m s)^2, per group
    squares = moments["sum_sq"] - 2 * means * moments["sum_factor"] + means**2 * sq_s
    numerator = (squares * correction - means * total_s).sum(axis=1)
    denominator = (means**2 * sq_s).sum(axis=1)
    alpha = np.clip(numerator / np.maximum(denominator, 1e-300), 0.0, ALPHA_MAX)
    variances_of_log = 1.0 / (means * total_s) + alpha[:, None] * sq_s / total_s**2
    log_means = np.log(means)
    coef = np.stack([log_means[:, 0], log_means[:, 1] - log_means[:, 0]], axis=1)
    return coef, alpha, _two_group_covariance(variances_of_log[:, 0], variances_of_log[:, 1]), means


def _fit_mom(counts: np.ndarray, in_b: np.ndarray, factors: np.ndarray, with_mu: bool = True):
    """Method-of-moments two-group fit: ratio means, pooled moment dispersion, delta-method covariance."""
    coef, alpha, cov, means = mom_from_moments(group_moments(counts, in_b, factors))
    mu = means[:, in_b.astype(np.intp)] * factors[None, :] if with_mu else None
    return coef, alpha, mu, cov


#: arrays at least this long have their special functions evaluated on several threads
THREADED_SIZE = 200_000


def _threaded(function, scalar: float, values: np.ndarray) -> np.ndarray:
    """``function(scalar, values)`` split over the CPU's cores (scipy's ufuncs release the GIL)."""
    import os

    workers = min(os.cpu_count() or 1, 8)
    if values.size < THREADED_SIZE or workers == 1:
        return function(scalar, values)
    from concurrent.futures import ThreadPoolExecutor

    out = np.empty_like(values, dtype=float)
    bounds = np.linspace(0, values.size, workers + 1).astype(int)
    parts = [slice(lo, hi) for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)]
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(lambda part: function(scalar, values[part], out=out[part]), parts))
    return out


def benjamini_hochberg(pvalues: np.ndarray) -> np.ndarray:
    """Benjamini-Hochberg q-values; NaN p-values stay NaN and do not count as tests.

    The step-up rule as :func:`scipy.stats.false_discovery_control` computes it (tested equal), in
    one sort: ``q_(i) = min_{j >= i} p_(j) m / j``, capped at 1.
    """
    pvalues = np.asarray(pvalues, dtype=float)
    qvalues = np.full_like(pvalues, np.nan)
    finite = np.flatnonzero(np.isfinite(pvalues))
    if finite.size:
        order = np.argsort(pvalues[finite], kind="stable")
        ranked = pvalues[finite][order] * (finite.size / np.arange(1, finite.size + 1))
        qvalues[finite[order]] = np.minimum(np.minimum.accumulate(ranked[::-1])[::-1], 1.0)
    return qvalues


def nb_test(
    counts,
    groups,
    size_factors=None,
    *,
    method: Method = "mom",
    test: Test = "wald",
    null_distribution: Literal["t", "normal"] = "t",
    max_iter: int = 100,
    shrink: bool = False,
    backend: Backend = "numpy",
    device: str | None = None,
) -> pd.DataFrame:
    """Two-group NB test for every feature: does group B differ from group A?

    Parameters
    ----------
    counts
        Counts, shape (features, samples).
    groups
        One label per sample, two distinct values; the first in sorted order is A (the baseline).
    size_factors
        Exposure per sample (default all 1).
    method
        ``"mom"`` (method of moments, fast), ``"mle"`` (maximum likelihood) or ``"transformer"`` (the
        pre-trained estimator, 2 to 50 samples per group).
    test
        ``"wald"`` or ``"lrt"`` (likelihood ratio; needs ``method="mle"``).
    null_distribution
        ``"t"``: Wald p-values from t, LRT from F, on ``n - 2`` degrees of freedom (better calibrated
        for small groups); ``"normal"``: asymptotic normal / chi-squared.
    max_iter
        MLE iterations.
    shrink
        Empirical-Bayes dispersion shrinkage (``method="mle"``; see :func:`nb_fit`).
    backend, device
        Array library and device of the MLE iterations (see :func:`nb_fit`).

    Returns
    -------
    pandas.DataFrame
        One row per feature: ``mean_a``, ``mean_b`` (size-factor-normalised), ``log_fold_change``
        (natural log, B over A), ``se``, ``statistic``, ``pvalue``, ``qvalue`` (Benjamini-Hochberg),
        ``dispersion``, ``converged`` and ``reason`` (why a row is NaN).
    """
    counts = _as_counts(counts)
    labels = np.asarray(groups)
    if labels.shape != (counts.shape[1],):
        raise ValueError(f"groups has {labels.size} labels but counts has {counts.shape[1]} samples")
    levels = np.unique(labels)
    if levels.size != 2:
        raise ValueError(f"groups must hold exactly two distinct labels, got {levels.size}: {levels[:5]}")
    in_b = labels == levels[1]
    n_a, n_b = int((~in_b).sum()), int(in_b.sum())
    design = np.column_stack([np.ones(counts.shape[1]), in_b.astype(float)])
    factors = _as_size_factors(size_factors, counts.shape[1])
    if test not in ("wald", "lrt"):
        raise ValueError(f"test must be 'wald' or 'lrt', got {test!r}")
    if test == "lrt" and method != "mle":
        raise ValueError("the likelihood-ratio test needs method='mle'")
    if null_distribution not in ("t", "normal"):
        raise ValueError(f"null_distribution must be 't' or 'normal', got {null_distribution!r}")
    if shrink and test == "lrt":
        raise ValueError("the likelihood-ratio test compares maximum likelihoods: use shrink with test='wald'")
    fit = _nb_fit(counts, design, factors, method=method, max_iter=max_iter, tol=1e-8, loglik=test == "lrt",
                  shrink=shrink, backend=backend, device=device, need_mu=False)
    if test == "lrt":
        null = nb_fit(counts, design[:, :1], factors, method="mle", max_iter=max_iter)
        statistic = np.maximum(2 * (fit.loglik - null.loglik), 0.0)
        fit.converged &= null.converged
    else:
        statistic = None
    group_sums = counts @ np.column_stack([~in_b, in_b]).astype(float)  # a product, not masked copies
    return _test_table(fit.coef, fit.cov, fit.dispersion, fit.reason, fit.converged, fit.df_residual,
                       group_sums / np.array([factors[~in_b].sum(), factors[in_b].sum()]), (n_a, n_b),
                       null_distribution=null_distribution, lrt_statistic=statistic)


def _test_table(coef: np.ndarray, cov: np.ndarray, dispersion: np.ndarray, reason: np.ndarray,
                converged: np.ndarray | bool, df: int, means: np.ndarray, sizes: tuple[int, int], *,
                null_distribution: str = "t", lrt_statistic: np.ndarray | None = None) -> pd.DataFrame:
    """The per-feature table of a two-group fit: Wald (or, given its statistic, LRT) p-values and q-values."""
    n_a, n_b = sizes
    lfc = coef[:, 1].copy()
    se = np.sqrt(cov[:, 1, 1])
    if lrt_statistic is None:
        statistic = lfc / se
        pvalue = 2 * (_threaded(special.stdtr, df, -np.abs(statistic)) if null_distribution == "t" and df > 0
                      else special.ndtr(-np.abs(statistic)))
    else:
        statistic = lrt_statistic
        pvalue = (special.fdtrc(1, df, statistic) if null_distribution == "t" and df > 0
                  else special.chdtrc(1, statistic))
    reason = reason.copy()
    if n_a < 2 or n_b < 2:
        reason[:] = f"fewer than two samples in a group (A: {n_a}, B: {n_b})"
    bad = reason != ""
    if bad.any():
        for array in (lfc, se, statistic, pvalue):
            array[bad] = np.nan
    mean_a = means[:, 0] if n_a else np.full(coef.shape[0], np.nan)
    mean_b = means[:, 1] if n_b else np.full(coef.shape[0], np.nan)
    return pd.DataFrame({
        "mean_a": mean_a, "mean_b": mean_b, "log_fold_change": lfc, "se": se, "statistic": statistic,
        "pvalue": pvalue, "qvalue": benjamini_hochberg(pvalue), "dispersion": np.where(bad, np.nan, dispersion),
        "converged": converged & ~bad, "reason": reason,
    })


def nb_test_from_moments(moments: dict[str, np.ndarray], *, null_distribution: Literal["t", "normal"] = "t"
                         ) -> pd.DataFrame:
    """:func:`nb_test` with ``method="mom"`` from :func:`group_moments` (summed over chunks of samples).

    The same table as ``nb_test(counts, groups, size_factors, method="mom")`` without ever holding
    the (features, samples) counts: what :func:`eels_ad.stats.compare_regions` uses on lazy cubes.
    """
    n_a, n_b = (int(v) for v in moments["n"])
    n_features = moments["sum"].shape[0]
    reason = np.full(n_features, "", dtype=object)
    if n_a + n_b <= 2:
        reason[:] = f"{n_a + n_b} samples for 2 coefficients"
    reason[(moments["sum"].sum(axis=1) == 0) & (reason == "")] = "all counts zero"
    coef, alpha, cov, _ = mom_from_moments(moments)
    means = moments["sum"] / moments["factor_sum"]
    return _test_table(coef, cov, alpha, reason, np.ones(n_features, dtype=bool), n_a + n_b - 2, means,
                       (n_a, n_b), null_distribution=null_distribution)
