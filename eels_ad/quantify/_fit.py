"""The batched Poisson fitting machinery that every quantity map shares.

The model of one spectrum is

    mu(E) = sum_k a_k T_k(E - s) + sum_j b_j B_j(E)

with templates ``T_k`` (edge shapes, moved by one shift ``s`` per pixel, never the counts), fixed
background shapes ``B_j`` and free amplitudes ``a_k``, ``b_j``. The Poisson likelihood is maximised
for every pixel at once by Fisher scoring (Newton's method with the expected information), with a
step-halving line search; the inverse Fisher information at the fit gives the errors, so estimates
and error bars come from the same place.

Templates live on a uniform grid as cubic-spline coefficients. A shift of ``q = s / dispersion``
channels splits into a whole part ``m`` and a fraction ``f``: every channel of a pixel then reads
the same polynomial in ``f`` of the coefficients ``m`` rows away, so the moved template of all
pixels with the same ``m`` is one matrix product.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.interpolate import CubicSpline

_FLOOR = 1e-9


class ShiftedTemplates:
    """Templates on a uniform grid, evaluated at ``E_i - s`` for per-pixel shifts ``s``.

    Parameters
    ----------
    templates
        (K, n) template values on the grid ``grid_start + dispersion * arange(n)``, shared by every
        pixel, or (p, K, n): one set per pixel (e.g. a detector's reconstruction).
    grid_start, dispersion
        The grid, eV.
    energy
        The fit's energies (eV, on the same grid spacing): where the moved templates are read.
    """

    def __init__(self, templates: np.ndarray, grid_start: float, dispersion: float, energy: np.ndarray) -> None:
        templates = np.asarray(templates, dtype=float)
        templates = templates[None] if templates.ndim == 1 else templates
        self.per_pixel = templates.ndim == 3
        n = templates.shape[-1]
        grid = grid_start + dispersion * np.arange(n)
        coefficients = CubicSpline(grid, np.moveaxis(templates, -1, 0), axis=0).c  # (4, n - 1, ...)
        # (4, K, n - 1) or (p, 4, K, n - 1)
        order = (2, 0, 3, 1) if self.per_pixel else (0, 2, 1)
        self.coefficients = np.ascontiguousarray(coefficients.transpose(order))
        self.dispersion = float(dispersion)
        self.n_templates = templates.shape[-2]
        # position of each fit energy on the template grid, in channels (whole numbers)
        self.index = np.rint((np.asarray(energy, dtype=float) - grid_start) / dispersion).astype(int)
        self.n_intervals = n - 1

    def shift_range(self) -> tuple[float, float]:
        """The shifts (eV) for which every fit energy stays on the templates' grid."""
        low = (self.index.max() - self.n_intervals) * self.dispersion
        high = self.index.min() * self.dispersion
        return float(low), float(high)

    def __call__(self, shift: np.ndarray, pixels: np.ndarray | None = None,
                 derivative: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
        """Values (p, K, c) of ``T_k(E_c - s_p)`` and their slopes along E (per eV).

        ``pixels`` picks the rows of per-pixel templates that ``shift`` belongs to (default: all).
        """
        q = np.asarray(shift, dtype=float) / self.dispersion
        whole = np.floor(q)
        local = (1.0 - (q - whole)) * self.dispersion  # position inside the spline interval, eV
        whole = whole.astype(int)
        p, k, c = q.shape[0], self.n_templates, self.index.size
        if pixels is None:
            pixels = np.arange(p)
        values = np.empty((p, k, c))
        slopes = np.empty((p, k, c)) if derivative else None
        for m in np.unique(whole):
            rows = np.flatnonzero(whole == m)
            interval = np.clip(self.index - m - 1, 0, self.n_intervals - 1)
            t = local[rows, None]
            powers = np.concatenate([t ** 3, t ** 2, t, np.ones_like(t)], axis=1)
            slope_powers = np.concatenate([3 * t ** 2, 2 * t, np.ones_like(t), np.zeros_like(t)], axis=1)
            if self.per_pixel:
                block = self.coefficients[pixels[rows]][..., interval]  # (rows, 4, K, c)
                values[rows] = np.einsum("ra,rakc->rkc", powers, block)
                if derivative:
                    slopes[rows] = np.einsum("ra,rakc->rkc", slope_powers, block)
            else:
                block = self.coefficients[:, :, interval].reshape(4, k * c)  # (4, K * c)
                values[rows] = (powers @ block).reshape(rows.size, k, c)
                if derivative:
                    slopes[rows] = (slope_powers @ block).reshape(rows.size, k, c)
        return values, slopes


@dataclass
class PoissonFit:
    """What :func:`poisson_fit` returns for p pixels: parameters, covariance and fit quality."""

    amplitudes: np.ndarray  # (p, K)
    shift: np.ndarray  # (p,) eV (offset included)
    background: np.ndarray  # (p, J)
    covariance: np.ndarray  # (p, n, n) over (a_1..a_K, [s], b_1..b_J); s in eV
    deviance: np.ndarray  # (p,)
    converged: np.ndarray  # (p,) bool
    at_limit: np.ndarray  # (p,) bool: the shift ran to the edge of the allowed range
    iterations: int

    def error(self, index: int) -> np.ndarray:
        """Standard error (1 sigma) of parameter ``index``."""
        with np.errstate(invalid="ignore"):
            return np.sqrt(self.covariance[:, index, index])


def _model(templates: np.ndarray, amplitudes: np.ndarray, background: np.ndarray, basis: np.ndarray) -> np.ndarray:
    mu = background @ basis
    for i in range(templates.shape[1]):
        mu += templates[:, i] * amplitudes[:, i, None]
    return mu


def _log_likelihood(counts: np.ndarray, mu: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        value = np.einsum("pc,pc->p", counts, np.log(np.maximum(mu, _FLOOR))) - mu.sum(axis=-1)
    return np.where(np.all(mu > 0, axis=-1), value, -np.inf)


def _information(values, slopes, amplitudes, basis, basis_products, counts, mu, fit_shift):
    """Fisher information (p, n, n) and score (p, n) of the parameters (a_1..a_K, [s], b_1..b_J)."""
    p, k, _ = values.shape
    j = basis.shape[0]
    columns = values
    if fit_shift:
        moved_slope = -np.einsum("pkc,pk->pc", slopes, amplitudes) if k > 1 else -slopes[:, 0] * amplitudes[:, :1]
        columns = np.concatenate([values, moved_slope[:, None]], axis=1)
    m = columns.shape[1]
    weight = 1.0 / mu
    weighted = columns * weight[:, None, :]
    residual = counts * weight
    residual -= 1.0
    fisher = np.empty((p, m + j, m + j))
    for i in range(m):
        for i2 in range(i, m):
            fisher[:, i, i2] = fisher[:, i2, i] = np.einsum("pc,pc->p", weighted[:, i], columns[:, i2])
    cross = (weighted.reshape(p * m, -1) @ basis.T).reshape(p, m, j)
    fisher[:, :m, m:] = cross
    fisher[:, m:, :m] = cross.transpose(0, 2, 1)
    fisher[:, m:, m:] = (weight @ basis_products).reshape(p, j, j)
    score = np.empty((p, m + j))
    for i in range(m):
        score[:, i] = np.einsum("pc,pc->p", columns[:, i], residual)
    score[:, m:] = residual @ basis.T
    return fisher, score


def poisson_fit(
    counts: np.ndarray,
    templates: ShiftedTemplates,
    basis: np.ndarray,
    *,
    fit_shift: bool = True,
    offset: np.ndarray | None = None,
    max_shift: float = 3.0,
    initial_shift: np.ndarray | None = None,
    nonnegative: bool = False,
    max_iterations: int = 30,
    tolerance: float = 1e-4,
) -> PoissonFit:
    """Maximum-likelihood fit of ``sum_k a_k T_k(E - offset - s) + sum_j b_j B_j(E)`` to every spectrum.

    Parameters
    ----------
    counts
        (p, c) counts (electrons) at the fit energies.
    templates
        The moved templates (:class:`ShiftedTemplates`).
    basis
        (J, c) background shapes at the fit energies.
    fit_shift
        Fit the shift ``s`` (else it stays at ``initial_shift``, default 0).
    offset
        (p,) known per-pixel energy offsets (eV, e.g. a drift from the zero-loss peak) added to ``s``.
    max_shift
        Largest allowed ``|s|`` (eV); a fit that runs there stops and is marked ``at_limit``.
    initial_shift
        (p,) starting shifts (eV).
    nonnegative
        Keep the template amplitudes >= 0 (a projected step).
    max_iterations, tolerance
        Stop when the Newton decrement (twice the log-likelihood gain the step predicts) is below
        ``tolerance``: the parameters are then within about ``sqrt(tolerance)`` standard errors of the maximum.
    """
    counts = np.asarray(counts, dtype=float)
    basis = np.atleast_2d(np.asarray(basis, dtype=float))
    basis_products = (basis[:, None, :] * basis[None, :, :]).reshape(-1, basis.shape[1]).T  # (c, J * J)
    p = counts.shape[0]
    k, j = templates.n_templates, basis.shape[0]
    n = k + j + int(fit_shift)
    offset = np.zeros(p) if offset is None else np.asarray(offset, dtype=float)
    shift = np.zeros(p) if initial_shift is None else np.asarray(initial_shift, dtype=float).copy()
    low, high = templates.shift_range()
    limit_low, limit_high = np.maximum(-max_shift, low - offset), np.minimum(max_shift, high - offset)
    shift = np.clip(shift, limit_low, limit_high)

    # starting amplitudes: weighted linear least squares at the starting shift
    moved, _ = templates(offset + shift, derivative=False)
    total = counts.sum(axis=-1)
    amplitudes, background = _linear_start(moved, basis, counts, basis_products)
    converged = np.zeros(p, dtype=bool)
    at_limit = np.zeros(p, dtype=bool)
    covariance = np.full((p, n, n), np.nan)
    active = np.flatnonzero(total > 0)
    iterations = 0
    while active.size and iterations < max_iterations:
        iterations += 1
        everyone = active.size == p
        y = counts if everyone else counts[active]
        a, b, s = (amplitudes, background, shift) if everyone else (amplitudes[active], background[active],
                                                                   shift[active])
        values, slopes = templates(offset[active] + s, active, derivative=fit_shift)
        mu = _model(values, a, b, basis)
        good = mu.min(axis=-1) > 0
        if not good.all():
            mu = np.maximum(mu, _FLOOR)
        fisher, gradient = _information(values, slopes, a, basis, basis_products, y, mu, fit_shift)
        if nonnegative:  # amplitudes held at 0 whose gradient points below 0 leave the step (an active set)
            step = _solve(*_hold(fisher, gradient, (a <= 0) & (gradient[:, :k] <= 0)))
        else:
            step = _solve(fisher, gradient)
        finite = np.all(np.isfinite(step), axis=-1)
        step = np.where(finite[:, None], step, 0.0)
        decrement = np.einsum("pi,pi->p", step, gradient)
        done = finite & (decrement < tolerance)
        covariance[active] = _inverse(fisher)
        # a line search where the step is large (more than half a channel or half an amplitude):
        # halve it until the likelihood does not fall; small Newton steps are taken as they are
        large = (np.abs(step[:, :k]) > 0.5 * np.abs(a) + 1e-12).any(axis=-1) | ~good
        if fit_shift:
            large |= np.abs(step[:, k]) > 0.5 * templates.dispersion
        trial = _apply(a, s, b, step, k, fit_shift, nonnegative, limit_low[active], limit_high[active])
        accepted = np.ones(active.size, dtype=bool)
        search = np.flatnonzero(large & finite)
        if search.size:
            accepted[search] = _line_search(
                templates, active[search], offset[active[search]], y[search], mu[search], basis,
                (a[search], s[search], b[search]), step[search], trial, search, k, fit_shift, nonnegative,
                limit_low[active[search]], limit_high[active[search]])
        new_a, new_s, new_b = trial
        amplitudes[active] = np.where(accepted[:, None], new_a, a)
        shift[active] = np.where(accepted, new_s, s)
        background[active] = np.where(accepted[:, None], new_b, b)
        if fit_shift:
            pinned = accepted & ((new_s <= limit_low[active] + 1e-9) | (new_s >= limit_high[active] - 1e-9))
            at_limit[active] = pinned
        else:
            pinned = np.zeros(active.size, dtype=bool)
        converged[active] = done
        keep = ~(done | pinned | ~finite | ~accepted)
        active = active[keep]

    values, _ = templates(offset + shift, derivative=False)
    mu = np.maximum(_model(values, amplitudes, background, basis), _FLOOR)
    with np.errstate(divide="ignore", invalid="ignore"):
        log_term = np.where(counts > 0, counts * np.log(counts / mu), 0.0)
    deviance = 2.0 * np.sum(log_term - (counts - mu), axis=-1)
    converged &= ~at_limit & (total > 0)
    return PoissonFit(amplitudes, offset + shift, background, covariance, deviance, converged, at_limit, iterations)


def _hold(fisher: np.ndarray, gradient: np.ndarray, held: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The Newton system with the ``held`` (p, K) amplitudes fixed (their rows and columns cut to identity)."""
    if not held.any():
        return fisher, gradient
    fixed = np.zeros(gradient.shape, dtype=bool)
    fixed[:, : held.shape[1]] = held
    fisher = np.where(fixed[:, :, None] | fixed[:, None, :], 0.0, fisher)
    pixel, index = np.nonzero(fixed)
    fisher[pixel, index, index] = 1.0
    return fisher, np.where(fixed, 0.0, gradient)


def _linear_start(moved: np.ndarray, basis: np.ndarray, counts: np.ndarray,
                  basis_products: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Template and background amplitudes by least squares weighted by ``1 / max(counts, 1)``."""
    p, k, _ = moved.shape
    weight_mu = np.maximum(counts, 1.0)
    amplitudes = np.zeros((p, k))
    normal, score = _information(moved, None, amplitudes, basis, basis_products, counts, weight_mu, False)
    # the normal equations' right side X W y = score + X 1 (the score is X (W y - 1))
    score[:, :k] += moved.sum(axis=-1)
    score[:, k:] += basis.sum(axis=-1)
    start = _solve(normal, score)
    # where that fails, the templates and the background share the total counts
    share = counts.sum(axis=-1) / (moved.sum(axis=(1, 2)) + basis[0].sum() + _FLOOR)
    fallback = np.zeros_like(start)
    fallback[:, :k], fallback[:, k] = share[:, None], share
    bad = ~np.all(np.isfinite(start), axis=-1)
    start[bad] = fallback[bad]
    return start[:, :k].copy(), start[:, k:].copy()


def _line_search(templates, pixels, offset, y, mu, basis, start, step, trial, rows, k, fit_shift, nonnegative,
                 low, high):
    """Halve ``step`` (up to 12 times) until the log-likelihood does not fall; writes into ``trial``."""
    a, s, b = start
    base = _log_likelihood(y, mu)
    scale = np.ones(len(rows))
    accepted = np.zeros(len(rows), dtype=bool)
    for _ in range(12):
        new = _apply(a, s, b, step * scale[:, None], k, fit_shift, nonnegative, low, high)
        values, _ = templates(offset + new[1], pixels, derivative=False)
        value = _log_likelihood(y, _model(values, new[0], new[2], basis))
        better = ~accepted & (value >= base - 1e-12 * np.abs(base))
        for target, source in zip(trial, new, strict=True):
            target[rows[better]] = source[better]
        accepted |= better
        if accepted.all():
            break
        scale = np.where(accepted, scale, scale / 2)
    return accepted


def _solve(matrix: np.ndarray, vector: np.ndarray) -> np.ndarray:
    try:
        return np.linalg.solve(matrix, vector[..., None])[..., 0]
    except np.linalg.LinAlgError:
        out = np.full(vector.shape, np.nan)
        for i, (m, v) in enumerate(zip(matrix, vector, strict=True)):
            try:
                out[i] = np.linalg.solve(m, v)
            except np.linalg.LinAlgError:
                pass
        return out


def _inverse(matrix: np.ndarray) -> np.ndarray:
    try:
        return np.linalg.inv(matrix)
    except np.linalg.LinAlgError:
        with np.errstate(invalid="ignore"):
            return np.linalg.pinv(matrix, hermitian=True)


def _apply(a, s, b, step, k, fit_shift, nonnegative, low, high):
    new_a = a + step[:, :k]
    if nonnegative:
        new_a = np.maximum(new_a, 0.0)
    new_s = np.clip(s + step[:, k], low, high) if fit_shift else s.copy()
    new_b = b + step[:, k + int(fit_shift):]
    return new_a, new_s, new_b
