"""SPIRAL-TAP: sparse Poisson intensity reconstruction (Harmany, Marcia & Willett, IEEE TIP 2012).

Recovers a nonnegative intensity ``f`` from counts ``y ~ Poisson(A f + b)`` by minimising

    Phi(f) = sum(A f + b) - sum(y log(A f + b + eps)) + tau * pen(f),   f >= 0,

with a sequence of separable quadratic approximations: each outer step solves the denoising
subproblem ``argmin_{f >= 0} 1/2 ||f - s||^2 + (tau / alpha) pen(f)`` at ``s = f - grad / alpha``, with
``alpha`` from a curvature-weighted Barzilai-Borwein rule and a non-monotone (GLL) acceptance test.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import xarray as xr

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
    """

    x: np.ndarray
    iterations: int
    objective: np.ndarray
    recon_error: np.ndarray | None
    times: np.ndarray
    converged: bool


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
    stop: Literal["step", "objective", "iterations"] = "step",
    max_time: float | None = None,
    alpha_init: float = 1.0,
    alpha_min: float = 1e-30,
    alpha_max: float = 1e30,
    eta: float = 2.0,
    sigma: float = 0.1,
    memory: int = 10,
    monotone: bool | None = None,
    log_epsilon: float = 1e-10,
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
        ``"objective"`` when the relative change of Phi is <= ``tol``, ``"iterations"`` never early;
        always at ``max_iter`` or after ``max_time`` seconds.
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
    >>> rng = np.random.default_rng(0)
    >>> truth = np.zeros(200); truth[[20, 90, 150]] = 50.0
    >>> result = spiral_tap(rng.poisson(truth + 0.1), tau=0.5, truth=truth)
    >>> bool(result.recon_error[-1] < result.recon_error[0])
    True
    """
    started = time.perf_counter()
    y = _check_counts(y)
    if not np.isfinite(tau) or tau < 0:
        raise ValueError(f"tau must be a finite number >= 0, got {tau}")
    if penalty not in PENALTIES:
        raise ValueError(f"penalty must be one of {sorted(PENALTIES)}, got {penalty!r}")
    if (A is None) != (AT is None):
        raise ValueError("give both A and AT (the forward operator and its adjoint), or neither")
    if A is None:
        A, AT = identity()
    rule = PENALTIES[penalty]
    monotone = rule.accept_test if monotone is None else monotone
    background = np.asarray(background, dtype=float)
    if np.any(background < 0):
        raise ValueError("the background must be >= 0")

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
    if penalty == "onb" and "basis" not in penalty_options:
        penalty_options["basis"] = WaveletBasis(np.shape(back_projection))
    value_options = {k: v for k, v in penalty_options.items() if k in ("weights", "basis")}

    truth_norm = float(np.linalg.norm(truth)) if truth is not None else None

    def error_of(x: np.ndarray) -> float:
        return float(np.linalg.norm(x - truth) / truth_norm) if truth_norm else float("nan")

    if not np.any(y):
        x = np.zeros_like(back_projection, dtype=float)
        empty = np.array([0.0])
        return SpiralResult(x, 0, empty, None if truth is None else np.array([error_of(x)]), empty, True)

    if initialization is None:
        ones_projection = AT(np.ones_like(y))
        scale = y.sum() * y.size / (back_projection.sum() * ones_projection.sum())
        x = scale * back_projection
    else:
        x = np.asarray(initialization, dtype=float).copy()
        if x.shape != np.shape(back_projection):
            raise ValueError(f"initialization has shape {x.shape} but the unknown has {np.shape(back_projection)}")
    x = np.maximum(x, 0.0)

    def objective_of(x: np.ndarray, ax: np.ndarray) -> float:
        mean = ax + background
        value = float(mean.sum() - np.sum(y * np.log(mean + log_epsilon)))
        return value + tau * rule.value(x, **value_options) if tau else value

    ax = A(x)
    objectives = [objective_of(x, ax)]
    errors = [error_of(x)] if truth is not None else None
    times = [time.perf_counter() - started]
    alpha = alpha_init
    sqrt_y = np.sqrt(y)
    converged = False
    iteration = 0
    while iteration < max_iter:
        iteration += 1
        gradient = AT(1.0 - y / (ax + background + log_epsilon))
        reference = max(objectives[-(memory + 1):])
        while True:
            step = x - gradient / alpha
            candidate = rule.prox(step, tau / alpha, **penalty_options)
            dx = candidate - x
            a_candidate = A(candidate)
            norm_dx = float(np.sum(dx * dx))
            value = objective_of(candidate, a_candidate) if monotone else float("nan")
            if not monotone or value <= reference - sigma / 2 * alpha * norm_dx or alpha >= alpha_max:
                break
            alpha *= eta
        a_dx = a_candidate - ax
        x, ax = candidate, a_candidate
        objectives.append(value if monotone else objective_of(x, ax))
        if errors is not None:
            errors.append(error_of(x))
        times.append(time.perf_counter() - started)
        # curvature-weighted Barzilai-Borwein step for the next iteration
        gamma = float(np.sum((a_dx * sqrt_y / (ax + background + log_epsilon)) ** 2))
        alpha = alpha_min if gamma == 0 or norm_dx == 0 else float(np.clip(gamma / norm_dx, alpha_min, alpha_max))
        if iteration >= min_iter:
            if stop == "step":
                norm_x = float(np.sum(x * x))
                converged = norm_x == 0 or norm_dx / norm_x <= tol**2
            elif stop == "objective":
                previous = objectives[-2]
                converged = abs(objectives[-1] - previous) <= tol * abs(previous)
            elif stop != "iterations":
                raise ValueError(f"stop must be 'step', 'objective' or 'iterations', got {stop!r}")
            if converged:
                break
        if max_time is not None and times[-1] > max_time:
            break
    return SpiralResult(x, iteration, np.asarray(objectives), None if errors is None else np.asarray(errors),
                        np.asarray(times), converged)


def _interpolate_unvisited(counts: np.ndarray, visited: np.ndarray) -> np.ndarray:
    """Fill unvisited pixels of every energy channel by nearest visited neighbour (the scan's start)."""
    from scipy import ndimage

    _, nearest = ndimage.distance_transform_edt(~visited, return_indices=True)
    return counts[nearest[0], nearest[1]]


def denoise_cube(
    cube: xr.DataArray,
    *,
    penalty: Literal["canonical", "onb", "tv"] = "tv",
    tau: float,
    weights: tuple[float, float, float] = (1.0, 1.0, 1.0),
    visited: np.ndarray | xr.DataArray | None = None,
    psf: np.ndarray | None = None,
    background: float = 0.0,
    truth: xr.DataArray | np.ndarray | None = None,
    **options: Any,
) -> xr.DataArray:
    """SPIRAL-TAP on a spectrum image: denoising, deblurring or filling a sub-sampled scan.

    Parameters
    ----------
    cube
        Counts (y, x, energy).
    penalty
        ``"tv"`` (3-D total variation, default), ``"onb"`` (separable 3-D Haar wavelets) or
        ``"canonical"``.
    tau
        Regularisation weight.
    weights
        TV weight of the (y, x, energy) axes: spatial against spectral smoothing.
    visited
        (y, x) boolean map of the scanned pixels, for a sub-sampled scan; the reconstruction starts
        from the nearest-neighbour interpolation of the visited pixels.
    psf
        A blur kernel (3-D, e.g. shape (ky, kx, 1) spatial or (1, 1, ke) energy resolution).
    background
        Known background counts.
    truth
        Noise-free cube, to record ``recon_error`` in ``attrs``.
    **options
        Passed to :func:`spiral_tap` (``max_iter``, ``tol``, ``n_iter`` ...).

    Returns
    -------
    xarray.DataArray
        The reconstruction with the cube's coords; ``attrs`` record the method, iterations, seconds
        and (with ``truth``) the relative error.
    """
    from ..datacube import as_mask, validate

    cube = validate(cube, negative="raise")
    counts = np.asarray(cube.values, dtype=float)
    operators = []
    initialization = None
    if visited is not None:
        visited_values = np.asarray(as_mask(visited, cube).values)
        if not visited_values.any():
            raise ValueError("the scan visited no pixel")
        operators.append(scan_mask(visited_values))
        initialization = _interpolate_unvisited(counts, visited_values)
    if psf is not None:
        psf = np.asarray(psf, dtype=float)
        if psf.ndim != 3:
            raise ValueError(f"psf must be a 3-D kernel (ky, kx, ke), got shape {psf.shape}")
        operators.insert(0, blur(psf))
    if operators:
        def forward(x):
            for apply, _ in operators:
                x = apply(x)
            return x

        def adjoint(v):
            for _, apply_adjoint in reversed(operators):
                v = apply_adjoint(v)
            return v
    else:
        forward = adjoint = None
    if penalty == "tv":
        options.setdefault("weights", weights)
    elif penalty not in ("onb", "canonical"):
        raise ValueError(f"denoise_cube supports 'tv', 'onb' and 'canonical' penalties, got {penalty!r}")
    truth_values = None if truth is None else np.asarray(truth, dtype=float)
    result = spiral_tap(counts, forward, adjoint, tau=tau, penalty=penalty, background=background,
                        truth=truth_values, initialization=initialization, **options)
    attrs = dict(cube.attrs)
    attrs.update(reconstruction=f"SPIRAL-TAP {penalty}", tau=float(tau), iterations=result.iterations,
                 seconds=float(result.times[-1]), converged=int(result.converged))
    if result.recon_error is not None:
        attrs["relative_error"] = float(result.recon_error[-1])
    return xr.DataArray(result.x, dims=cube.dims, coords=cube.coords, name="intensity", attrs=attrs)
