"""SPIRAL-TAP: sparse Poisson intensity reconstruction (Harmany, Marcia & Willett, IEEE TIP 2012).

Recovers a nonnegative intensity ``f`` from counts ``y ~ Poisson(A f + b)`` by minimising

    Phi(f) = sum(A f + b) - sum(y log(A f + b + eps)) + tau * pen(f),   f >= 0,

with a sequence of separable quadratic approximations: each outer step solves the denoising
subproblem ``argmin_{f >= 0} 1/2 ||f - s||^2 + (tau / alpha) pen(f)`` at ``s = f - grad / alpha``, with
``alpha`` from a curvature-weighted Barzilai-Borwein rule and a non-monotone (GLL) acceptance test.
"""

from __future__ import annotations

import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import xarray as xr

from .._xp import Backend, arrays, like, to_numpy
from .operators import blur, identity, scan_mask
from .penalties import PENALTIES, WaveletBasis


@dataclass
class SpiralResult:
    """The reconstruction and its history (index 0 is the initialisation).

    Attributes
    ----------
    x : ndarray
        The reconstruction.
    iterations : int
        Outer iterations done.
    objective : ndarray
        Phi after each iteration.
    recon_error : ndarray or None
        ``||x - truth|| / ||truth||`` after each iteration, when ``truth`` was given.
    times : ndarray
        Seconds since the start, after each iteration.
    converged : bool
        Whether the stopping rule (rather than ``max_iter`` or ``max_time``) ended the run.
    duality_gap : ndarray or None
        With ``stop="gap"`` (l1 penalty): Phi minus a dual bound after each iteration, so
        ``Phi(x) - min Phi <= duality_gap[-1]``.
    """

    x: np.ndarray
    iterations: int
    objective: np.ndarray
    recon_error: np.ndarray | None
    times: np.ndarray
    converged: bool
    duality_gap: np.ndarray | None = None


def _check_counts(y: np.ndarray) -> np.ndarray:
    y = np.asarray(y, dtype=float)
    if not np.all(np.isfinite(y)):
        raise ValueError(f"the counts hold {int(np.sum(~np.isfinite(y)))} NaN or infinite values")
    if np.any(y < 0):
        raise ValueError(
            f"the counts hold {int(np.sum(y < 0))} negative values (minimum {y.min():g}); Poisson counts are >= 0: "
            "clip dark-reference negatives first"
        )
    return y


def spiral_tap(
    y: np.ndarray,
    A: Callable[[np.ndarray], np.ndarray] | None = None,
    AT: Callable[[np.ndarray], np.ndarray] | None = None,
    *,
    tau: float,
    penalty: Literal["canonical", "onb", "tv", "rdp", "rdp-ti"] = "canonical",
    background: float | np.ndarray = 0.0,
    truth: np.ndarray | None = None,
    initialization: np.ndarray | None = None,
    max_iter: int = 100,
    min_iter: int = 5,
    tol: float = 1e-6,
    stop: Literal["step", "objective", "gap", "iterations"] = "step",
    max_time: float | None = None,
    alpha_init: float = 1.0,
    alpha_min: float = 1e-30,
    alpha_max: float = 1e30,
    eta: float = 2.0,
    sigma: float = 0.1,
    memory: int = 10,
    monotone: bool | None = None,
    log_epsilon: float = 1e-10,
    backend: Backend = "numpy",
    device: str | None = None,
    dtype: Any = None,
    **penalty_options: Any,
) -> SpiralResult:
    """Sparse Poisson intensity reconstruction (SPIRAL-TAP).

    Parameters
    ----------
    y
        Observed counts (any shape the operator produces).
    A, AT
        Forward operator and its adjoint (functions); both None: identity (denoising).
    tau
        Regularisation weight, >= 0.
    penalty
        ``"canonical"`` (l1), ``"onb"`` (l1 of orthonormal wavelet coefficients), ``"tv"`` (total
        variation, any dimension), ``"rdp"`` (recursive dyadic partition, 2-D) or ``"rdp-ti"``
        (its translation-invariant average).
    background
        Known background ``b`` added to ``A f`` (scalar or an array like ``y``).
    truth
        The true intensity, to record ``recon_error``.
    initialization
        Starting point (default: ``AT(y)`` scaled so that its forward projection has the counts' total).
    max_iter, min_iter, tol, stop, max_time
        Stopping: after ``min_iter`` iterations, ``"step"`` stops when ``||dx|| / ||x|| <= tol``,
        ``"objective"`` when the relative change of Phi is <= ``tol``, ``"gap"`` (canonical l1 only)
        when the duality gap is <= ``tol * |Phi|`` (a certificate: Phi is then within that of its
        minimum), ``"iterations"`` never early; always at ``max_iter`` or after ``max_time`` seconds.
    alpha_init, alpha_min, alpha_max
        Barzilai-Borwein step parameters.
    eta, sigma, memory
        Acceptance: ``Phi(x+) <= max(last memory + 1 objectives) - sigma / 2 alpha ||dx||^2``, else
        ``alpha *= eta``.
    monotone
        Apply the acceptance test (default: yes, except for the RDP penalties, whose objective is
        not tracked, as in the reference).
    log_epsilon
        Added inside the logarithm.
    backend, device, dtype
        ``"numpy"`` (default, float64) or ``"torch"`` (float32 by default; ``device`` "cuda" when a
        GPU is there, else "cpu", where torch's threads already beat numpy several times on large
        cubes). ``A`` and ``AT`` then receive tensors: :func:`identity` and :func:`scan_mask` work
        on them directly, :func:`blur` through the CPU. The "canonical" and "tv" penalties run on
        the device; the others go through numpy. ``result.x`` is a numpy array either way.
    **penalty_options
        Passed to the subproblem solver: ``weights``, ``n_iter``, ``tol`` for TV; ``basis``,
        ``n_iter`` for ONB (a :class:`~eels_ad.reconstruct.penalties.WaveletBasis`).

    Returns
    -------
    SpiralResult

    References
    ----------
    .. [1] Z. T. Harmany, R. F. Marcia, R. M. Willett, "This is SPIRAL-TAP: Sparse Poisson Intensity
       Reconstruction ALgorithms - Theory and Practice", IEEE Trans. Image Process. 21(3), 2012.

    Examples
    --------
    Denoise a piecewise-constant 1-D profile of counts with total variation:

    >>> rng = np.random.default_rng(0)
    >>> truth = np.repeat([2.0, 10.0, 4.0], 100)
    >>> result = spiral_tap(rng.poisson(truth), tau=1.0, penalty="tv", truth=truth)
    >>> print(f"{result.recon_error[0]:.2f} -> {result.recon_error[-1]:.2f}")
    0.36 -> 0.08
    >>> np.round(result.x[[50, 150, 250]], 1)
    array([2.2, 9.9, 3.9])
    """
    started = time.perf_counter()
    on = arrays(backend, device, dtype)
    y = _check_counts(to_numpy(y) if not isinstance(y, np.ndarray) else y)
    if not np.isfinite(tau) or tau < 0:
        raise ValueError(f"tau must be a finite number >= 0, got {tau}")
    if penalty not in PENALTIES:
        raise ValueError(f"penalty must be one of {sorted(PENALTIES)}, got {penalty!r}")
    if (A is None) != (AT is None):
        raise ValueError("give both A and AT (the forward operator and its adjoint), or neither")
    if stop not in ("step", "objective", "gap", "iterations"):
        raise ValueError(f"stop must be 'step', 'objective', 'gap' or 'iterations', got {stop!r}")
    if stop == "gap" and penalty != "canonical":
        raise ValueError(f"the duality-gap stop is for the 'canonical' (l1) penalty, not {penalty!r}")
    if A is None:
        A, AT = identity()
    background = np.asarray(background, dtype=float)
    if np.any(background < 0):
        raise ValueError("the background must be >= 0")
    rule = PENALTIES[penalty]
    prox, penalty_value = _penalty_on(rule, on)
    y = on.asarray(y)
    background = on.asarray(background) if background.ndim else float(background)
    back_projection = _check_operators(A, AT, y, truth)
    if penalty == "onb" and "basis" not in penalty_options:
        penalty_options["basis"] = WaveletBasis(np.shape(back_projection))
    if penalty == "tv":
        penalty_options.setdefault("workspace", {})  # the TV solver's buffers, kept over this solve's subproblems
    value_options = {k: v for k, v in penalty_options.items() if k in ("weights", "basis")}
    problem = _Problem(on, y, A, AT, background, tau, lambda x: penalty_value(x, **value_options), log_epsilon,
                       None if truth is None else on.asarray(truth), gap=stop == "gap")
    if on.total(y) == 0:
        x = back_projection * 0.0
        empty = np.array([0.0])
        return SpiralResult(to_numpy(x).astype(float), 0, empty,
                            None if truth is None else np.array([problem.error(x)]), empty, True)
    x = _initial_point(on, y, AT, back_projection, initialization)
    monotone = rule.accept_test if monotone is None else monotone
    history = _History(problem, x, A(x), started)
    alpha = alpha_init
    converged = False
    iteration = 0
    while iteration < max_iter:
        iteration += 1
        x, ax, alpha, norm_dx, value = _spiral_step(problem, prox, penalty_options, history.x, history.ax, alpha,
                                                    reference=max(history.objectives[-(memory + 1):]),
                                                    monotone=monotone, eta=eta, sigma=sigma, alpha_min=alpha_min,
                                                    alpha_max=alpha_max)
        history.record(x, ax, value)
        if iteration >= min_iter:
            converged = history.converged(stop, norm_dx, tol)
            if converged:
                break
        if max_time is not None and history.times[-1] > max_time:
            break
    return history.result(iteration, converged)


def _penalty_on(rule, on):
    """The penalty's prox and value on the array library ``on`` (numpy-only ones through the CPU)."""
    if on.backend == "numpy" or rule.any_array:
        return rule.prox, rule.value

    def prox(step, lam, **options):
        return on.asarray(rule.prox(to_numpy(step).astype(float), lam, **options))

    def value(x, **options):
        return rule.value(to_numpy(x).astype(float), **options)

    return prox, value


def _check_operators(A, AT, y, truth):
    """``AT(y)``, after checking that A and AT fit y (and truth the unknown): clear errors otherwise."""
    try:
        back_projection = AT(y)
    except ValueError as error:
        raise ValueError(f"AT cannot be applied to y of shape {y.shape}: {error}") from error
    try:
        forward_shape = np.shape(A(back_projection))
    except ValueError as error:
        raise ValueError(f"A cannot be applied to AT(y) of shape {np.shape(back_projection)}: {error}") from error
    if forward_shape != y.shape:
        raise ValueError(f"A maps the unknown to shape {forward_shape} but y has shape {y.shape}")
    if truth is not None and np.shape(truth) != np.shape(back_projection):
        raise ValueError(f"truth has shape {np.shape(truth)} but the unknown has {np.shape(back_projection)}")
    return back_projection


def _initial_point(on, y, AT, back_projection, initialization):
    """``AT(y)`` scaled so that its forward projection has the counts' total, or the user's start."""
    if initialization is None:
        ones_projection = AT(y * 0.0 + 1.0)
        scale = on.total(y) * np.prod(y.shape) / (on.total(back_projection) * on.total(ones_projection))
        x = scale * back_projection
    else:
        if tuple(np.shape(initialization)) != tuple(np.shape(back_projection)):
            raise ValueError(f"initialization has shape {np.shape(initialization)} but the unknown has "
                             f"{tuple(np.shape(back_projection))}")
        x = on.asarray(initialization) * 1.0
    return x.clip(0.0, None)


@dataclass
class _Problem:
    """The objective Phi, its gradient, the l1 duality gap and the error against the truth."""

    on: Any
    y: Any
    A: Callable
    AT: Callable
    background: Any
    tau: float
    penalty_value: Callable
    log_epsilon: float
    truth: Any = None
    gap: bool = False

    def __post_init__(self) -> None:
        self.truth_norm = self.on.total(self.truth * self.truth) ** 0.5 if self.truth is not None else None
        self.sqrt_y = self.on.xp.sqrt(self.y)
        self.ones_back_projection = self.AT(self.y * 0.0 + 1.0) if self.gap else None

    def objective(self, x, ax) -> float:
        on = self.on
        mean = ax + self.background
        value = on.total(mean) - on.total(self.y * on.xp.log(mean + self.log_epsilon))
        return value + self.tau * self.penalty_value(x) if self.tau else value

    def gradient(self, ax):
        return self.AT(1.0 - self.y / (ax + self.background + self.log_epsilon))

    def curvature(self, a_dx, ax) -> float:
        """``||sqrt(y) A dx / (A x + b)||^2``: the curvature-weighted Barzilai-Borwein numerator."""
        return self.on.total((a_dx * self.sqrt_y / (ax + self.background + self.log_epsilon)) ** 2)

    def duality_gap(self, objective: float, ax) -> float:
        """Phi minus the dual value at the scaled dual point lambda = 1 - theta y / (A x + b)."""
        on, y, background = self.on, self.y, self.background
        mean = ax + background + self.log_epsilon
        ratio = y / mean
        back = self.AT(ratio)
        # the largest theta <= 1 that keeps the dual feasible: theta AT(y / mean) <= AT(1) + tau
        theta = min(1.0, float(((self.ones_back_projection + self.tau) / back.clip(1e-300, None)).min()))
        dual = on.total(y) + on.total(y * on.xp.log(theta / mean))
        if np.any(np.asarray(to_numpy(background) if not isinstance(background, float) else background)):
            dual += on.total((1.0 - theta * ratio) * background)
        return objective - dual

    def error(self, x) -> float:
        if not self.truth_norm:
            return float("nan")
        return self.on.total((x - self.truth) ** 2) ** 0.5 / self.truth_norm


class _History:
    """The current point and what each iteration recorded."""

    def __init__(self, problem: _Problem, x, ax, started: float) -> None:
        self.problem, self.x, self.ax, self.started = problem, x, ax, started
        self.objectives = [problem.objective(x, ax)]
        self.gaps = [problem.duality_gap(self.objectives[0], ax)] if problem.gap else None
        self.errors = [problem.error(x)] if problem.truth is not None else None
        self.times = [time.perf_counter() - started]

    def record(self, x, ax, value: float) -> None:
        problem = self.problem
        self.x, self.ax = x, ax
        self.objectives.append(value if np.isfinite(value) else problem.objective(x, ax))
        if self.gaps is not None:
            self.gaps.append(problem.duality_gap(self.objectives[-1], ax))
        if self.errors is not None:
            self.errors.append(problem.error(x))
        self.times.append(time.perf_counter() - self.started)

    def converged(self, stop: str, norm_dx: float, tol: float) -> bool:
        if stop == "step":
            norm_x = self.problem.on.total(self.x * self.x)
            return norm_x == 0 or norm_dx / norm_x <= tol**2
        if stop == "objective":
            previous = self.objectives[-2]
            return abs(self.objectives[-1] - previous) <= tol * abs(previous)
        if stop == "gap":
            return self.gaps[-1] <= tol * abs(self.objectives[-1])
        return False

    def result(self, iterations: int, converged: bool) -> SpiralResult:
        return SpiralResult(to_numpy(self.x).astype(float), iterations, np.asarray(self.objectives),
                            None if self.errors is None else np.asarray(self.errors), np.asarray(self.times),
                            converged, None if self.gaps is None else np.asarray(self.gaps))


def _spiral_step(problem: _Problem, prox, penalty_options, x, ax, alpha: float, *, reference: float, monotone: bool,
                 eta: float, sigma: float, alpha_min: float, alpha_max: float):
    """One outer iteration: the prox step with the (non-monotone) acceptance test, then the next BB step.

    Returns the new point, its forward projection, the next alpha, ``||dx||^2`` and Phi at the new
    point (NaN when the acceptance test is off, so that it is computed once, by the history).
    """
    gradient = problem.gradient(ax)
    while True:
        candidate = prox(x - gradient / alpha, problem.tau / alpha, **penalty_options)
        dx = candidate - x
        a_candidate = problem.A(candidate)
        norm_dx = problem.on.total(dx * dx)
        value = problem.objective(candidate, a_candidate) if monotone else float("nan")
        if not monotone or value <= reference - sigma / 2 * alpha * norm_dx or alpha >= alpha_max:
            break
        alpha *= eta
    # curvature-weighted Barzilai-Borwein step for the next iteration
    gamma = problem.curvature(a_candidate - ax, a_candidate)
    alpha = alpha_min if gamma == 0 or norm_dx == 0 else float(np.clip(gamma / norm_dx, alpha_min, alpha_max))
    return candidate, a_candidate, alpha, norm_dx, value


@dataclass
class TauSelection:
    """The outcome of :func:`select_tau`.

    Attributes
    ----------
    tau : float
        The chosen weight for the full data (the held-out best, scaled by ``sqrt(fraction)``).
    taus : ndarray
        The candidates, as tried on the thinned data.
    held_out_loss : ndarray
        Poisson negative log-likelihood of the held-out counts under each candidate's reconstruction.
    at_edge : bool
        The best candidate is still the smallest or the largest after extending the search: the
        minimum of the held-out loss was not found inside the range (a warning said so).
    """

    tau: float
    taus: np.ndarray
    held_out_loss: np.ndarray
    at_edge: bool = False


def default_taus(y: np.ndarray, count: int = 7, *, relative: bool = False) -> np.ndarray:
    """A grid of ``count`` TV weights a factor 2 apart, centred where SPIRAL-TV works best.

    The best weight follows the noise level: for the intensity itself (``relative=False``) it
    scales as ``1 / sqrt(mean count)`` (the penalty acts on counts, the noise is relative), for the
    intensity relative to a reference spectrum (``relative=True``, :func:`denoise_cube`'s default)
    as ``sqrt(mean count)``. The constants, 0.7 and 3, were the best on simulated Fe L2,3 cubes from
    0.5 to 50 counts per voxel (benchmarks/spiral_cube.py).
    """
    mean = float(np.mean(y))
    if mean <= 0:
        raise ValueError("the counts are all zero: there is no weight to choose")
    centre = 3.0 * np.sqrt(mean) if relative else 0.7 / np.sqrt(mean)
    return centre * 2.0 ** (np.arange(count) - count // 2)


def select_tau(
    y: np.ndarray,
    taus: np.ndarray | None = None,
    A: Callable | None = None,
    AT: Callable | None = None,
    *,
    penalty: str = "tv",
    fraction: float = 0.5,
    seed: int = 0,
    initialize: Callable[[np.ndarray], np.ndarray] | None = None,
    max_extensions: int = 3,
    **options: Any,
) -> TauSelection:
    """Choose the regularisation weight from the data alone, by Poisson thinning.

    Each count is split at random into a training part ``Binomial(y, fraction)`` and the held-out
    rest: two independent Poisson images of the same scene at ``fraction`` and ``1 - fraction`` of
    the dose. Every candidate reconstructs the training part; the one whose reconstruction, rescaled
    to the held-out dose, predicts the held-out counts best (Poisson likelihood) wins. Its weight is
    then scaled by ``sqrt(fraction)`` for the full data, as the best weight follows the relative
    noise level.

    Parameters
    ----------
    y
        Counts.
    taus
        Candidates (default :func:`default_taus`).
    A, AT
        Forward operator and adjoint, as for :func:`spiral_tap`.
    penalty
        As for :func:`spiral_tap`.
    fraction
        Share of the counts used for training, in (0, 1).
    seed
        Seed of the split.
    initialize
        A function of the counts that gives the starting point (e.g. the interpolation of a
        sub-sampled scan), applied to the training part so that the held-out counts stay unseen.
    max_extensions
        When the best candidate is the smallest or the largest, the grid is extended beyond it (by its
        own ratio) up to this many times, to find an interior minimum; if there is still none a
        :class:`UserWarning` says so and ``at_edge`` is set.
    **options
        Passed to :func:`spiral_tap`.

    Returns
    -------
    TauSelection

    References
    ----------
    .. [1] A. Leiner, J. Duan, D. Witten, A. Ramdas, "Data thinning for convolution-closed
       distributions", J. Mach. Learn. Res. 26, 2025.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> truth = np.repeat([2.0, 10.0, 4.0], 100)
    >>> choice = select_tau(rng.poisson(truth), taus=[0.1, 1.0, 10.0, 100.0], penalty="tv", lower=0.05)
    >>> float(choice.taus[np.argmin(choice.held_out_loss)]), round(choice.tau, 2)
    (10.0, 7.07)
    """
    y = _check_counts(y)
    if "initialization" in options:
        raise ValueError("select_tau takes initialize= (a function of the counts), not a fixed initialization: "
                         "a start made from all the counts would let the held-out counts leak into the fit")
    if not 0 < fraction < 1:
        raise ValueError(f"fraction must lie in (0, 1), got {fraction}")
    taus = default_taus(y) if taus is None else np.asarray(taus, dtype=float)
    if taus.ndim != 1 or taus.size == 0 or np.any(taus < 0):
        raise ValueError(f"taus must be a non-empty list of weights >= 0, got {taus}")
    rng = np.random.default_rng(seed)
    # electron counts divided by a gain are not whole: thin their nearest whole numbers
    training = rng.binomial(np.rint(y).astype(np.int64), fraction).astype(float)
    held_out = np.maximum(y - training, 0.0)
    forward = A if A is not None else (lambda x: x)
    scale = (1.0 - fraction) / fraction

    def held_out_loss(tau: float) -> float:
        start = None if initialize is None else initialize(training)
        result = spiral_tap(training, A, AT, tau=float(tau), penalty=penalty, initialization=start, **options)
        mean = scale * np.asarray(forward(result.x), dtype=float) + 1e-10
        return float(np.sum(mean - held_out * np.log(mean)))

    taus = list(np.sort(taus))
    losses = [held_out_loss(tau) for tau in taus]
    ratio = taus[-1] / taus[-2] if len(taus) > 1 and taus[-2] > 0 else 2.0
    for _ in range(max_extensions):
        best = int(np.argmin(losses))
        if 0 < best < len(taus) - 1 or len(taus) < 2:
            break
        if best == 0 and taus[0] > 0:
            taus.insert(0, taus[0] / ratio)
            losses.insert(0, held_out_loss(taus[0]))
        elif best == len(taus) - 1:
            taus.append(taus[-1] * ratio)
            losses.append(held_out_loss(taus[-1]))
        else:
            break
    best = int(np.argmin(losses))
    at_edge = len(taus) > 1 and best in (0, len(taus) - 1)
    if at_edge:
        import warnings

        side = "smallest" if best == 0 else "largest"
        warnings.warn(f"select_tau: the held-out loss is lowest at the {side} weight tried ({taus[best]:.4g} of "
                      f"{taus[0]:.4g}-{taus[-1]:.4g}), after {max_extensions} extensions of the grid: no interior "
                      "minimum; pass taus= or a fixed tau", UserWarning, stacklevel=2)
    return TauSelection(float(taus[best] * np.sqrt(fraction)), np.asarray(taus), np.asarray(losses), at_edge)


def _interpolate_unvisited(counts: np.ndarray, visited: np.ndarray) -> np.ndarray:
    """Fill unvisited pixels of every energy channel by nearest visited neighbour (the scan's start)."""
    from scipy import ndimage

    _, nearest = ndimage.distance_transform_edt(~visited, return_indices=True)
    return counts[nearest[0], nearest[1]]


def denoise_cube(
    cube: xr.DataArray,
    *,
    penalty: Literal["canonical", "onb", "tv"] = "tv",
    tau: float | Literal["auto"] = "auto",
    taus: np.ndarray | None = None,
    weights: tuple[float, float, float] = (1.0, 1.0, 1.0),
    reference: Literal["mean"] | np.ndarray | None = "mean",
    floor: float = 0.05,
    visited: np.ndarray | xr.DataArray | None = None,
    psf: np.ndarray | None = None,
    background: float = 0.0,
    truth: xr.DataArray | np.ndarray | None = None,
    tile: int | None = None,
    overlap: int = 8,
    **options: Any,
) -> xr.DataArray:
    """SPIRAL-TAP on a spectrum image: denoising, deblurring or filling a sub-sampled scan.

    The unknown is the intensity relative to a reference spectrum (by default the mean spectrum):
    ``x = reference * u``, counts ``~ Poisson(A x + background)``, and the penalty acts on ``u``. The
    white lines and the edge are in the reference, so the spectral total variation of ``u`` only
    penalises what differs from the average material (against penalising the counts themselves:
    ``benchmarks/spiral_cube.py``, figures in ``benchmarks/README.md``).

    Parameters
    ----------
    cube
        Counts (y, x, energy).
    penalty
        ``"tv"`` (3-D total variation, default), ``"onb"`` (separable 3-D Haar wavelets) or
        ``"canonical"``.
    tau
        Regularisation weight, or ``"auto"`` (default): chosen from the data by Poisson thinning
        (:func:`select_tau` over :data:`TAU_CANDIDATES` of :func:`default_taus`, more where the best
        is at either end; the candidates and their held-out losses are recorded in ``attrs``), on the
        central :data:`TAU_REGION` x :data:`TAU_REGION` pixels of a
        larger cube (or tile), with the whole cube's reference spectrum (``attrs["tau_chosen_on"]``):
        the best weight follows the dose and the material, and each candidate costs a solve. For a
        sub-sampled scan the region doubles until it holds :data:`TAU_MIN_VISITED` scanned pixels (or
        all of them; a lazy cube's at most 256 x 256 pixels).
    taus
        The candidates for ``tau="auto"``, as weights for the full data (default
        :data:`TAU_CANDIDATES` of :func:`default_taus` of the counts).
    weights
        TV weight of the (y, x, energy) axes: spatial against spectral smoothing.
    reference
        ``"mean"``: the mean spectrum of the (visited) pixels; an array broadcasting to the cube
        (e.g. a spectrum of shape (energy,)), > 0; or None: penalise the intensity itself.
    floor
        Lower bound of the solution, as a fraction of the reference (or, without a reference, of
        the mean count). The Poisson curvature y / x**2 is unbounded at x = 0: with a floor of 0 the
        scalar step of SPIRAL-TAP stalls for tens of iterations on cubes with many zero counts.
    visited
        (y, x) boolean map of the scanned pixels, for a sub-sampled scan; the reconstruction starts
        from the nearest-neighbour interpolation of the visited pixels.
    psf
        A blur kernel (3-D, e.g. shape (ky, kx, 1) spatial or (1, 1, ke) energy resolution).
    background
        Known background counts.
    truth
        Noise-free cube, to record the relative error ``||x - truth|| / ||truth||`` in ``attrs``.
    tile, overlap
        Reconstruct in spatial tiles of ``tile`` x ``tile`` pixels (all channels), each padded by
        ``overlap`` pixels of its neighbours that are then cut away, so that a cube larger than memory
        is processed a tile at a time (dask reads and writes them around the solves): one tile at a time,
        in one thread, the TV kernels' and torch's threads sharing the cores within it (measured on 2
        cores, a lazy 256 x 256 x 1024 cube in 64-pixel tiles, 10 iterations, before the TV kernels: 120.7 s
        against 112.3 s two tiles at a time, at a peak of 1.6 against 2.5-2.6 GiB above the baseline of
        ``scaling.py``). A
        lazy cube is always tiled (default tile 64), and the result is then lazy too: it is computed when read or saved.
        ``tau="auto"`` is chosen once, on the central tile; the reference spectrum is the whole cube's.
    **options
        Passed to :func:`spiral_tap` (``max_iter``, ``tol``, ``n_iter``, ``stop``, ``backend``, ``device``
        ...). ``backend="torch"`` by default here (float32; the GPU when torch sees one, else the CPU's
        threads, in half the memory; a 128 x 128 x 1024 cube on 2 cores 19.2 s against 21.0 s with
        ``backend="numpy"``, float64, and ``tau="auto"`` 38.7 s against 42.0 s, the same error to 1e-8;
        benchmarks/README.md). Defaults for TV
        (:data:`TV_ITERATIONS`): ``max_iter=10`` outer iterations of ``n_iter=20``
        inner (FGP) steps each, ``stop="iterations"``; with ``tol`` or ``min_iter`` given, the step rule
        (``stop="step"``, ``tol=1e-4``, ``min_iter=10``, or ``max_iter`` for a sub-sampled scan, whose
        gaps fill with small steps that the step rule would take for convergence) and a warning when
        ``max_iter`` ends the run first.

        The inner steps start from zero at every outer iteration, so each TV subproblem is solved
        only in part: at the default weights they act as a fixed amount of smoothing, and above
        about 0.3 x :func:`default_taus`' centre the result hardly depends on ``tau`` (measured on
        a simulated 64 x 64 x 1024 Fe L2,3 cube at 5 counts per voxel: relative error 0.0199 for
        0.5, 1 and 2 x the centre; 0.128 at 0.1 x). Those numbers of steps are then the smoothing:
        30 outer iterations gave 0.0199 as 10 do, at 3x the time; 10 inner steps 0.024, 5 steps
        0.05-0.10; the subproblems solved to convergence (each started from the last one's duals)
        0.076 on a 48 x 48 x 512 cube where these defaults give 0.026 (benchmarks/README.md).

    Returns
    -------
    xarray.DataArray
        The reconstruction with the cube's coords; ``attrs`` record the method, tau, iterations,
        seconds and (with ``truth``) the relative error.

    Examples
    --------
    >>> import eels_ad
    >>> sim = eels_ad.simulate_fe_l23((16, 16), dose=2.0, include_expected=True, seed=0)
    >>> clean = denoise_cube(sim["counts"], tau=3.0, truth=sim["expected"])
    >>> noisy = float(np.linalg.norm(sim["counts"] - sim["expected"]) / np.linalg.norm(sim["expected"]))
    >>> bool(clean.attrs["relative_error"] < noisy / 3)
    True
    """
    from ..datacube import is_lazy, validate

    cube = validate(cube)
    options.setdefault("backend", "torch")
    if isinstance(tau, str) and tau != "auto":
        raise ValueError(f"tau must be a number >= 0 or 'auto', got {tau!r}")
    if tile is not None or is_lazy(cube):
        return _denoise_tiled(cube, tile=tile or 64, overlap=overlap, penalty=penalty, tau=tau, taus=taus,
                              weights=weights, reference=reference, floor=floor, visited=visited, psf=psf,
                              background=background, truth=truth, **options)
    problem = _cube_problem(cube, penalty=penalty, weights=weights, reference=reference, floor=floor, visited=visited,
                            psf=psf, background=background, options=options)
    attrs = dict(cube.attrs)
    if isinstance(tau, str):
        region = _tau_region(problem.counts.shape[:2], TAU_REGION, problem.visited)
        if region < max(problem.counts.shape[:2]):
            # the weight follows the dose and the material, not the field of view: chosen on a central region
            # (a candidate costs a solve of what it is tried on; 5 or more of them on the whole cube cost minutes)
            tau, chosen = _central_tau(cube, region, taus, None if reference is None else problem.scale,
                                       problem.visited, dict(penalty=penalty, weights=weights, floor=floor, psf=psf,
                                                             background=background, options=options))
        else:
            tau, chosen = _select_on(problem, taus, relative=reference is not None)
        attrs.update(chosen)
    options = problem.options
    result = spiral_tap(problem.counts, problem.forward, problem.adjoint, tau=tau, penalty=penalty,
                        background=background, initialization=problem.initialize(problem.counts), **options)
    intensity = result.x * problem.scale
    if not result.converged and options.get("stop", "step") != "iterations":
        import warnings

        warnings.warn(f"denoise_cube: SPIRAL-TAP stopped at max_iter={result.iterations} before its stopping rule "
                      f"was met (stop={options.get('stop', 'step')!r}, tol={options.get('tol', 1e-6):g}); the result "
                      "is usable but not converged: raise max_iter (attrs['converged'] = 0)", UserWarning,
                      stacklevel=2)
    reference_name = "none" if reference is None else ("mean spectrum" if isinstance(reference, str) else "given")
    attrs.update(reconstruction=f"SPIRAL-TAP {penalty}", tau=float(tau), iterations=result.iterations,
                 seconds=float(result.times[-1]), converged=int(result.converged), reference=reference_name)
    if truth is not None:
        attrs["relative_error"] = _relative_error(intensity, truth)
    return xr.DataArray(intensity, dims=cube.dims, coords=cube.coords, name="intensity", attrs=attrs)


@dataclass
class _CubeProblem:
    """An in-memory cube as SPIRAL-TAP sees it: counts, operators on the relative intensity, the solver's options."""

    counts: np.ndarray
    visited: np.ndarray | None
    visited_counts: np.ndarray
    scale: np.ndarray
    forward: Callable
    adjoint: Callable
    initialize: Callable[[np.ndarray], np.ndarray]
    penalty: str
    background: float
    options: dict[str, Any]


def _cube_problem(cube: xr.DataArray, *, penalty: str, weights, reference, floor: float, visited, psf,
                  background: float, options: dict[str, Any]) -> _CubeProblem:
    """denoise_cube's checks and set-up: the scan mask, the blur, the reference spectrum, the TV defaults."""
    from ..datacube import as_mask

    counts = np.asarray(cube.values, dtype=float)
    options = dict(options)
    operators = []
    visited_values = None
    if visited is not None:
        visited_values = np.asarray(as_mask(visited, cube).values)
        if not visited_values.any():
            raise ValueError("the scan visited no pixel")
        operators.append(scan_mask(visited_values))
    if psf is not None:
        psf = np.asarray(psf, dtype=float)
        if psf.ndim != 3:
            raise ValueError(f"psf must be a 3-D kernel (ky, kx, ke), got shape {psf.shape}")
        operators.insert(0, blur(psf))
    visited_counts = counts if visited_values is None else counts[visited_values]
    if reference is None:
        scale = np.ones(1)
    elif isinstance(reference, str):
        if reference != "mean":
            raise ValueError(f"reference must be 'mean', an array or None, got {reference!r}")
        scale = _reference_of(visited_counts.reshape(-1, counts.shape[-1]).mean(axis=0))
    else:
        scale = np.asarray(reference, dtype=float)
        try:
            np.broadcast_to(scale, counts.shape)
        except ValueError as error:
            raise ValueError(
                f"reference of shape {scale.shape} does not broadcast to the cube {counts.shape}") from error
        if not np.all(np.isfinite(scale)) or np.any(scale <= 0):
            raise ValueError("the reference must be finite and > 0 everywhere")

    def forward(u):
        x = u * like(scale, u)
        for apply, _ in operators:
            x = apply(x)
        return x

    def adjoint(v):
        for _, apply_adjoint in reversed(operators):
            v = apply_adjoint(v)
        return v * like(scale, v)

    def initialize(observed: np.ndarray) -> np.ndarray:
        start = observed if visited_values is None else _interpolate_unvisited(observed, visited_values)
        return start / scale

    if not np.isfinite(floor) or floor < 0:
        raise ValueError(f"floor must be a number >= 0, got {floor}")
    options.setdefault("lower", floor if reference is not None else floor * float(np.mean(visited_counts)))
    if penalty == "tv":
        options.setdefault("weights", weights)
        # a fixed number of steps unless a stopping rule is asked for (see the docstring: the steps smooth)
        options.setdefault("stop", "step" if {"tol", "min_iter"} & set(options) else "iterations")
        options.setdefault("max_iter", TV_ITERATIONS[0])
        for name, value in dict(n_iter=TV_ITERATIONS[1], tol=1e-4,
                                min_iter=10 if visited is None else options["max_iter"]).items():
            options.setdefault(name, value)
    elif penalty not in ("onb", "canonical"):
        raise ValueError(f"denoise_cube supports 'tv', 'onb' and 'canonical' penalties, got {penalty!r}")
    return _CubeProblem(counts, visited_values, visited_counts, scale, forward, adjoint, initialize, penalty,
                        background, options)


def _select_on(problem: _CubeProblem, taus, *, relative: bool) -> tuple[float, dict[str, Any]]:
    """``tau="auto"`` on the whole problem: the weight and the attrs that record the candidates."""
    candidates = (default_taus(problem.visited_counts, count=TAU_CANDIDATES, relative=relative) if taus is None
                  else np.asarray(taus, dtype=float) / np.sqrt(0.5))
    selection = select_tau(problem.counts, candidates, problem.forward, problem.adjoint, penalty=problem.penalty,
                           background=problem.background, initialize=problem.initialize, **problem.options)
    return selection.tau, dict(tau_candidates=selection.taus * np.sqrt(0.5), tau_held_out_loss=selection.held_out_loss,
                               tau_at_edge=int(selection.at_edge))


#: denoise_cube's TV defaults: (outer iterations, inner FGP steps per subproblem)
TV_ITERATIONS: tuple[int, int] = (10, 20)

#: ``tau="auto"`` tries this many weights a factor 2 apart around :func:`default_taus`' centre (more where the best
#: is at either end of them: :func:`select_tau`'s extensions)
TAU_CANDIDATES = 5

#: ``tau="auto"`` is chosen on the central ``TAU_REGION`` x ``TAU_REGION`` pixels of a larger cube (or tile)
TAU_REGION = 64


#: a sub-sampled scan's region for ``tau="auto"`` grows (x2) until it holds this many scanned pixels (or all of them)
TAU_MIN_VISITED = 256


def _central_window(shape: tuple[int, int], size: int) -> tuple[slice, slice]:
    """The central ``size`` x ``size`` pixels (fewer where the image is smaller)."""
    (ny, nx) = shape
    y0, x0 = max(0, ny // 2 - size // 2), max(0, nx // 2 - size // 2)
    return slice(y0, min(ny, y0 + size)), slice(x0, min(nx, x0 + size))


def _tau_region(shape: tuple[int, int], size: int, visited: np.ndarray | None, largest: int | None = None) -> int:
    """The side of the central region ``tau="auto"`` is chosen on: ``size``, larger for a sparse scan (at most
    ``largest``, or the whole image); a clear error when it holds no scanned pixel."""
    if visited is not None:
        wanted = min(TAU_MIN_VISITED, int(visited.sum()))
        limit = max(shape) if largest is None else largest
        while size < limit and visited[_central_window(shape, size)].sum() < wanted:
            size *= 2
        size = min(size, limit)
        if not visited[_central_window(shape, size)].any():
            raise ValueError(f"tau='auto' is chosen on the central {size} x {size} pixels, where the scan visited no "
                             "pixel: pass a number as tau")
    return size


def _central_tau(cube: xr.DataArray, size: int, taus, reference, visited: np.ndarray | None,
                 settings: dict[str, Any]) -> tuple[float, dict[str, Any]]:
    """``tau="auto"`` chosen on the central ``size`` x ``size`` pixels: the weight and the attrs that record it."""
    ys, xs = _central_window((cube.sizes["y"], cube.sizes["x"]), size)
    central = cube.isel(y=ys, x=xs).load()
    problem = _cube_problem(central, reference=reference, visited=None if visited is None else visited[ys, xs],
                            **settings)
    tau, attrs = _select_on(problem, taus, relative=reference is not None)
    attrs["tau_chosen_on"] = f"central region y={ys.start}:{ys.stop}, x={xs.start}:{xs.stop}"
    return tau, attrs


def _reference_of(mean_spectrum: np.ndarray) -> np.ndarray:
    """The reference spectrum of ``reference="mean"``: the mean, floored at 1e-3 of its own mean."""
    return np.maximum(mean_spectrum, 1e-3 * max(float(mean_spectrum.mean()), 1e-12))


def _relative_error(intensity: np.ndarray, truth) -> float:
    """``||x - truth|| / ||truth||``, with a clear error when the shapes differ."""
    truth_values = np.asarray(truth, dtype=float)
    if truth_values.shape != intensity.shape:
        raise ValueError(f"truth has shape {truth_values.shape} but the cube has {intensity.shape}")
    return float(np.linalg.norm(intensity - truth_values) / np.linalg.norm(truth_values))


_TILE_THREAD: list = []  # the one thread that solves the torch backend's tiles (made on first use)
_TILE_THREAD_MADE = threading.Lock()


def _in_tile_thread(func: Callable, *args: Any) -> Any:
    """``func(*args)`` in the process's one tile thread, waiting for it (a module function: a tile's task
    pickles it by reference). One thread, not one per dask thread: each thread's allocator keeps its own
    arena, so tiles solved in turn by two threads held two tiles' working memory (a peak of 2.5 GiB above
    the baseline at 256 x 256 x 1024, against 1.6 GiB in one thread)."""
    from concurrent.futures import ThreadPoolExecutor

    with _TILE_THREAD_MADE:
        if not _TILE_THREAD:
            _TILE_THREAD.append(ThreadPoolExecutor(max_workers=1, thread_name_prefix="eels-ad-tile"))
    return _TILE_THREAD[0].submit(func, *args).result()


def _denoise_tiled(cube: xr.DataArray, *, tile: int, overlap: int, tau, taus, reference, visited, truth,
                   **settings: Any) -> xr.DataArray:
    """:func:`denoise_cube` tile by tile with overlapping margins (dask ``map_overlap``)."""
    import dask.array as da

    from ..datacube import as_mask, is_lazy

    if int(tile) != tile or tile < 2:
        raise ValueError(f"tile must be an integer >= 2 pixels, got {tile!r}")
    if int(overlap) != overlap or overlap < 0 or overlap > tile:
        raise ValueError(f"overlap must be an integer between 0 and tile={tile} pixels, got {overlap!r}")
    tile, overlap = int(tile), int(overlap)
    visited_values = None if visited is None else np.asarray(as_mask(visited, cube).values)
    data = cube.transpose("y", "x", "energy").data
    if not is_lazy(cube):
        data = da.from_array(np.asarray(data), chunks=(tile, tile, -1))
    data = data.rechunk({0: min(tile, cube.sizes["y"]), 1: min(tile, cube.sizes["x"]), 2: -1})
    if isinstance(reference, str):
        if reference != "mean":
            raise ValueError(f"reference must be 'mean', an array or None, got {reference!r}")
        if visited_values is None:
            mean_spectrum = np.asarray(data.mean(axis=(0, 1)).compute(), dtype=float)
        else:
            mask = da.from_array(visited_values[..., None], chunks=data.chunks[:2] + ((1,),))
            mean_spectrum = np.asarray((data * mask).sum(axis=(0, 1)).compute(), dtype=float) / visited_values.sum()
        reference = _reference_of(mean_spectrum)
    attrs = dict(cube.attrs)
    if isinstance(tau, str):  # "auto" (denoise_cube checked it), chosen once, on the central tile
        shape = (cube.sizes["y"], cube.sizes["x"])  # a lazy cube's region is read whole: 4 x TAU_REGION at most
        size = _tau_region(shape, min(tile, TAU_REGION), visited_values, largest=4 * TAU_REGION)
        named = ("penalty", "weights", "floor", "psf", "background")
        tau, chosen = _central_tau(cube, size, taus, reference, visited_values,
                                   {**{k: settings[k] for k in named},
                                    "options": {k: v for k, v in settings.items() if k not in named}})
        attrs.update(chosen)

    # the TV kernels and torch use every core within a tile: tiles are solved one at a time, in one thread

    def solve(block: np.ndarray, scanned: np.ndarray | None = None) -> np.ndarray:
        part = xr.DataArray(np.asarray(block, dtype=float), dims=("y", "x", "energy"),
                            coords={"energy": cube["energy"].values})
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # convergence is reported for the whole cube below
            result = denoise_cube(part, tau=tau, reference=reference,
                                  visited=None if scanned is None else np.asarray(scanned[..., 0], dtype=bool),
                                  **settings)
        return result.values

    def one_tile(block: np.ndarray, scanned: np.ndarray | None = None) -> np.ndarray:
        return _in_tile_thread(solve, block, scanned)

    depth = {0: min(overlap, cube.sizes["y"] - 1), 1: min(overlap, cube.sizes["x"] - 1), 2: 0}
    if any(min(c) < d for c, d in zip(data.chunks[:2], (depth[0], depth[1]), strict=True)):
        data = data.rechunk({0: max(tile, depth[0] + 1), 1: max(tile, depth[1] + 1), 2: -1})
    padded = da.overlap.overlap(data, depth=depth, boundary="none")
    if visited_values is None:
        tiles = padded.map_blocks(one_tile, dtype=np.float64)
    else:  # the scan mask, tiled and padded the same way, travels with each tile
        scanned = da.from_array(visited_values[..., None], chunks=data.chunks[:2] + ((1,),))
        scanned = da.overlap.overlap(scanned, depth=depth, boundary="none")
        tiles = da.map_blocks(one_tile, padded, scanned, dtype=np.float64, chunks=padded.chunks)
    intensity = da.overlap.trim_internal(tiles, depth, boundary="none")
    n_tiles = int(np.prod([len(c) for c in data.chunks[:2]]))
    attrs.update(reconstruction=f"SPIRAL-TAP {settings.get('penalty', 'tv')} in tiles", tau=float(tau),
                 tile=tile, overlap=overlap, tiles=n_tiles,
                 reference="none" if reference is None else "mean spectrum" if isinstance(reference, np.ndarray)
                 and visited is None else "given")
    out = xr.DataArray(intensity, dims=("y", "x", "energy"), coords=cube.transpose("y", "x", "energy").coords,
                       name="intensity", attrs=attrs)
    if is_lazy(cube):
        return out
    out = out.compute()
    if truth is not None:
        out.attrs["relative_error"] = _relative_error(out.values, truth)
    return out
