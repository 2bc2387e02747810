"""The denoising subproblems of SPIRAL-TAP: ``argmin_{x >= lower} 1/2 ||x - s||^2 + lam * pen(x)``.

Each penalty is a pair: ``prox(s, lam, **options) -> x`` and ``value(x) -> pen(x)``; the SPIRAL-TAP
loop never knows which one it runs (:data:`PENALTIES`).

References
----------
.. [1] Z. T. Harmany, R. F. Marcia, R. M. Willett, "This is SPIRAL-TAP: Sparse Poisson Intensity
   Reconstruction ALgorithms - Theory and Practice", IEEE Trans. Image Process. 21(3), 2012.
.. [2] A. Beck, M. Teboulle, "Fast gradient-based algorithms for constrained total variation image
   denoising and deblurring problems", IEEE Trans. Image Process. 18(11), 2009.
.. [3] R. M. Willett, R. D. Nowak, "Multiscale Poisson intensity and density estimation",
   IEEE Trans. Inf. Theory 53(9), 2007.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from .._xp import zeros_like_shape

# ---- l1 in the canonical basis --------------------------------------------------------------------

def l1_prox(step, lam: float, *, lower: float = 0.0):
    """One-sided soft threshold: the l1 subproblem with ``x >= lower`` (numpy array or torch tensor).

    Examples
    --------
    >>> l1_prox(np.array([-1.0, 0.5, 3.0]), 1.0)
    array([0., 0., 2.])
    """
    return (step - lam).clip(lower, None)


def l1_value(x) -> float:
    return float(abs(x).sum())


# ---- l1 of orthonormal wavelet coefficients ------------------------------------------------------

@dataclass(frozen=True)
class WaveletBasis:
    """An orthonormal wavelet basis (PyWavelets, periodized, so the transform is orthonormal).

    Parameters
    ----------
    shape
        Shape of the signal (1-D, 2-D image or 3-D cube: separable over every axis).
    wavelet
        PyWavelets name; ``"haar"`` by default.
    level
        Decomposition depth (default: the full depth the shape allows).
    """

    shape: tuple[int, ...]
    wavelet: str = "haar"
    level: int | None = None

    def _level(self) -> int:
        import pywt

        if self.level is not None:
            return self.level
        return pywt.dwtn_max_level(self.shape, self.wavelet)

    def _fast_haar(self) -> bool:
        level = self._level()
        return self.wavelet == "haar" and all(n % (1 << level) == 0 for n in self.shape)

    def analysis(self, x: np.ndarray) -> tuple[np.ndarray, object]:
        """Coefficients of ``x`` as one array, and the layout to invert it."""
        if self._fast_haar():
            return _haar_pyramid(np.asarray(x, dtype=float), self._level()), None
        import pywt

        coefficients = pywt.wavedecn(x, self.wavelet, mode="periodization", level=self._level())
        array, slices = pywt.coeffs_to_array(coefficients)
        return array, slices

    def synthesis(self, array: np.ndarray, slices) -> np.ndarray:
        if slices is None:
            return _inverse_haar_pyramid(array, self._level())
        import pywt

        coefficients = pywt.array_to_coeffs(array, slices, output_format="wavedecn")
        x = pywt.waverecn(coefficients, self.wavelet, mode="periodization")
        return x[tuple(slice(0, n) for n in self.shape)]


_SQRT_HALF = np.sqrt(0.5)


def _along(axis: int, ndim: int, part: slice) -> tuple[slice, ...]:
    index = [slice(None)] * ndim
    index[axis] = part
    return tuple(index)


def _haar_step_2d(block: np.ndarray) -> None:
    """One level of the 2-D orthonormal Haar transform, in place: the four sub-bands of ``block``."""
    rows, cols = block.shape[0] // 2, block.shape[1] // 2
    quads = block.reshape(rows, 2, cols, 2)
    top_sum, top_diff = quads[:, 0, :, 0] + quads[:, 0, :, 1], quads[:, 0, :, 0] - quads[:, 0, :, 1]
    bottom_sum, bottom_diff = quads[:, 1, :, 0] + quads[:, 1, :, 1], quads[:, 1, :, 0] - quads[:, 1, :, 1]
    block[:rows, :cols] = (top_sum + bottom_sum) * 0.5
    block[:rows, cols:] = (top_diff + bottom_diff) * 0.5
    block[rows:, :cols] = (top_sum - bottom_sum) * 0.5
    block[rows:, cols:] = (top_diff - bottom_diff) * 0.5


def _inverse_haar_step_2d(block: np.ndarray) -> None:
    rows, cols = block.shape[0] // 2, block.shape[1] // 2
    low_low, low_high = block[:rows, :cols], block[:rows, cols:]
    high_low, high_high = block[rows:, :cols], block[rows:, cols:]
    top_sum, bottom_sum = low_low + high_low, low_low - high_low
    top_diff, bottom_diff = low_high + high_high, low_high - high_high
    quads = np.empty((rows, 2, cols, 2))
    quads[:, 0, :, 0], quads[:, 0, :, 1] = (top_sum + top_diff) * 0.5, (top_sum - top_diff) * 0.5
    quads[:, 1, :, 0], quads[:, 1, :, 1] = (bottom_sum + bottom_diff) * 0.5, (bottom_sum - bottom_diff) * 0.5
    block[...] = quads.reshape(block.shape)


def _haar_step(block: np.ndarray) -> None:
    """One level of the orthonormal n-D Haar transform, in place: lows in the first half of every axis."""
    if block.ndim == 2:  # images (the common case): all four sub-bands from one view of 2 x 2 blocks
        _haar_step_2d(block)
        return
    ndim = block.ndim
    transformed = block
    for axis in range(ndim):
        even = transformed[_along(axis, ndim, slice(0, None, 2))]
        odd = transformed[_along(axis, ndim, slice(1, None, 2))]
        transformed = np.concatenate([(even + odd) * _SQRT_HALF, (even - odd) * _SQRT_HALF], axis=axis)
    block[...] = transformed


def _inverse_haar_step(block: np.ndarray) -> None:
    if block.ndim == 2:
        _inverse_haar_step_2d(block)
        return
    ndim = block.ndim
    signal = block.copy()
    for axis in reversed(range(ndim)):
        half = signal.shape[axis] // 2
        low = signal[_along(axis, ndim, slice(0, half))]
        high = signal[_along(axis, ndim, slice(half, None))]
        interleaved = np.empty_like(signal)
        interleaved[_along(axis, ndim, slice(0, None, 2))] = (low + high) * _SQRT_HALF
        interleaved[_along(axis, ndim, slice(1, None, 2))] = (low - high) * _SQRT_HALF
        signal = interleaved
    block[...] = signal


_SMALL_BLOCK = 256  # coarse levels on at most this many samples run as one matrix product


@functools.lru_cache(maxsize=64)
def _coarse_haar_matrix(shape: tuple[int, ...], levels: int) -> np.ndarray:
    """The ``levels``-level Haar pyramid of a small block as an orthogonal matrix (rows: coefficients)."""
    basis = np.eye(int(np.prod(shape))).reshape((-1,) + shape)
    for vector in basis:
        for k in range(levels):
            _haar_step(vector[tuple(slice(0, n >> k) for n in shape)])
    return basis.reshape(len(basis), -1).T.copy()


def _split_levels(shape: tuple[int, ...], level: int) -> int:
    """How many levels run step by step before the rest fits in one small matrix."""
    for k in range(level):
        if np.prod([n >> k for n in shape]) <= _SMALL_BLOCK:
            return k
    return level


def _haar_pyramid(x: np.ndarray, level: int) -> np.ndarray:
    """Orthonormal multi-level Haar transform (the wavedecn pyramid), in place of the corner block.

    Equivalent, up to the order and signs of the coefficients, to
    ``pywt.wavedecn(x, "haar", mode="periodization", level=level)``, and much faster for the
    many small transforms of the ONB subproblem: the fine levels are vectorised steps, the coarse
    ones (a block of at most 256 samples) a single cached matrix product.
    """
    out = np.array(x, dtype=float, copy=True)
    fine = _split_levels(out.shape, level)
    for k in range(fine):
        _haar_step(out[tuple(slice(0, n >> k) for n in out.shape)])
    if fine < level:
        corner = tuple(slice(0, n >> fine) for n in out.shape)
        block = out[corner]
        out[corner] = (_coarse_haar_matrix(block.shape, level - fine) @ block.ravel()).reshape(block.shape)
    return out


def _inverse_haar_pyramid(coefficients: np.ndarray, level: int) -> np.ndarray:
    out = np.array(coefficients, dtype=float, copy=True)
    fine = _split_levels(out.shape, level)
    if fine < level:
        corner = tuple(slice(0, n >> fine) for n in out.shape)
        block = out[corner]
        out[corner] = (_coarse_haar_matrix(block.shape, level - fine).T @ block.ravel()).reshape(block.shape)
    for k in reversed(range(fine)):
        _inverse_haar_step(out[tuple(slice(0, n >> k) for n in out.shape)])
    return out


def onb_prox(step: np.ndarray, lam: float, *, basis: WaveletBasis | None = None, lower: float = 0.0,
             n_iter: int = 50) -> np.ndarray:
    """l1 of orthonormal wavelet coefficients jointly with ``x >= lower``.

    Alternating projections on the dual: in coefficient space the l1 multiplier is clipped to
    ``[-lam, lam]``, in signal space the non-negativity multiplier to ``>= 0``; ``n_iter`` rounds.

    Parameters
    ----------
    step
        The point to denoise.
    lam
        Threshold.
    basis
        The orthonormal basis (default: full-depth periodized Haar of ``step.shape``).
    lower
        Lower bound of the solution.
    n_iter
        Rounds of the inner loop.
    """
    basis = basis or WaveletBasis(step.shape)
    coefficients, layout = basis.analysis(step)
    clipped = np.zeros_like(coefficients)
    bound = np.zeros_like(step)
    analysed_bound = np.zeros_like(coefficients)
    theta = coefficients
    for _ in range(n_iter):
        clipped = np.clip(-coefficients - analysed_bound, -lam, lam)
        bound = np.maximum(-basis.synthesis(coefficients + clipped, layout) + lower, 0.0)
        analysed_bound, _ = basis.analysis(bound)
        theta = coefficients + clipped + analysed_bound
    return np.abs(basis.synthesis(theta, layout))


def onb_value(x: np.ndarray, basis: WaveletBasis | None = None) -> float:
    basis = basis or WaveletBasis(x.shape)
    return float(np.abs(basis.analysis(x)[0]).sum())


# ---- total variation ------------------------------------------------------------------------------

def tv_prox(step, lam: float, *, weights: Sequence[float] | None = None, lower: float = 0.0,
            upper: float = np.inf, n_iter: int = 50, tol: float = 1e-5, workspace: dict | None = None):
    """Anisotropic total variation with bounds, by the fast gradient projection (FGP) on the dual.

    Solves ``argmin_{lower <= x <= upper} 1/2 ||x - step||^2 + lam sum_k w_k ||D_k x||_1`` for arrays of
    any dimension (an image, or a (y, x, energy) cube with different spatial and spectral weights).
    Works in place on numpy arrays and on torch tensors (CPU or GPU) alike.

    Parameters
    ----------
    step
        The point to denoise (numpy array or torch tensor).
    lam
        Regularisation weight.
    weights
        Weight of each axis (default 1 for every axis; 0 switches an axis off).
    lower, upper
        Bounds of the solution.
    n_iter, tol
        At most ``n_iter`` iterations; stop once the relative change of x has stayed below ``tol`` for
        5 iterations in a row (Beck and Teboulle's rule).
    workspace
        A dict in which a CPU cube's solver keeps its buffers from one call to the next (SPIRAL-TAP
        passes one per solve: its subproblems all have the step's shape).

    Returns
    -------
    The denoised array, of the type of ``step``.

    References
    ----------
    .. [1] A. Beck, M. Teboulle, "Fast gradient-based algorithms for constrained total variation
       image denoising and deblurring problems", IEEE Trans. Image Process. 18(11), 2009.

    Examples
    --------
    >>> step = np.array([0.0, 0.1, -0.1, 5.0, 5.2, 4.9])
    >>> np.round(tv_prox(step, 0.5), 2)
    array([0.17, 0.17, 0.17, 4.87, 4.87, 4.87])
    """
    ndim = step.ndim
    weights = np.ones(ndim) if weights is None else np.asarray(weights, dtype=float)
    if weights.shape != (ndim,) or np.any(weights < 0):
        raise ValueError(f"TV weights must be {ndim} non-negative numbers, got {weights}")
    if lam <= 0:
        return step.clip(lower, upper)
    axes = [k for k in range(ndim) if weights[k] > 0 and step.shape[k] > 1]
    if not axes:
        return step.clip(lower, upper)
    fused = _fused_cube(step)
    if fused is not None:  # a CPU cube: the fused kernels (numba), the same iterates, 3-4x faster
        from . import _tv_kernels

        x = _tv_kernels.fgp_cube(fused, float(lam), weights, float(lower), float(upper), int(n_iter), float(tol),
                                 len(axes), workspace)
        return x if isinstance(step, np.ndarray) else _as_tensor_of(x, step)
    head = {k: _along(k, ndim, slice(None, -1)) for k in axes}
    tail = {k: _along(k, ndim, slice(1, None)) for k in axes}
    dual_shapes = {k: tuple(n - 1 if j == k else n for j, n in enumerate(step.shape)) for k in axes}
    # every buffer is allocated once and updated in place: the loop streams memory, it never allocates
    duals = {k: zeros_like_shape(step, dual_shapes[k]) for k in axes}
    extrapolated = {k: zeros_like_shape(step, dual_shapes[k]) for k in axes}
    work = {k: zeros_like_shape(step, dual_shapes[k]) for k in axes}
    t = 1.0
    dual_step = 1.0 / (4.0 * len(axes) * lam)
    x = _clip_(step * 1, lower, upper)
    spare = step * 0
    small_changes = 0
    for _ in range(n_iter):
        # primal point of the extrapolated duals: clip(step - lam D^T r); (D^T r)_i = r_{i-1} - r_i
        divergence = spare
        divergence *= 0
        for k in axes:
            divergence[head[k]] -= extrapolated[k]
            divergence[tail[k]] += extrapolated[k]
        divergence *= -lam
        divergence += step
        new_x = _clip_(divergence, lower, upper)
        t_next = (1.0 + np.sqrt(1.0 + 4.0 * t * t)) / 2.0
        momentum = (t - 1.0) / t_next
        for k in axes:
            updated = _subtract(new_x[tail[k]], new_x[head[k]], work[k])
            updated *= dual_step
            updated += extrapolated[k]
            _clip_(updated, -weights[k], weights[k])
            # extrapolated = updated + momentum (updated - previous duals), in the previous duals' buffer
            previous = duals[k]
            previous -= updated
            previous *= -momentum
            previous += updated
            extrapolated[k], duals[k], work[k] = previous, updated, extrapolated[k]
        t = t_next
        norm = _norm(new_x)
        x -= new_x  # x is now the change; its buffer is the next divergence
        change = _norm(x)
        spare, x = x, new_x
        small_changes = small_changes + 1 if norm > 0 and change < tol * norm else 0
        if small_changes >= 5:
            break
    return x  # the last primal point, from the extrapolated duals (as Beck and Teboulle's FGP returns)


def _fused_cube(step):
    """``step`` as a C-contiguous float32/float64 numpy (y, x, energy) array where the fused FGP kernels apply
    (a numpy array or a CPU torch tensor, numba importable), else None."""
    from . import _tv_kernels

    if step.ndim != 3 or not _tv_kernels.available():
        return None
    if not isinstance(step, np.ndarray):
        if getattr(step, "device", None) is None or step.device.type != "cpu" or step.requires_grad:
            return None
        step = step.numpy()
    if step.dtype not in (np.float32, np.float64):
        return None
    return np.ascontiguousarray(step)


def _as_tensor_of(x: np.ndarray, like):
    import torch

    return torch.from_numpy(x).to(dtype=like.dtype)


def _clip_(array, lower: float, upper: float):
    """Clip in place (numpy array or torch tensor); returns the array."""
    if isinstance(array, np.ndarray):
        return np.clip(array, lower, upper, out=array)
    return array.clamp_(min=None if lower == -np.inf else lower, max=None if upper == np.inf else upper)


def _subtract(a, b, out):
    """``a - b`` into ``out`` (numpy array or torch tensor)."""
    if isinstance(out, np.ndarray):
        return np.subtract(a, b, out=out)
    import torch

    return torch.sub(a, b, out=out)


def _norm(array) -> float:
    """Euclidean norm without a temporary array."""
    if isinstance(array, np.ndarray):
        flat = array.reshape(-1)
        return float(np.sqrt(np.dot(flat, flat)))
    return float(array.norm())


def tv_value(x, weights: Sequence[float] | None = None) -> float:
    weights = np.ones(x.ndim) if weights is None else np.asarray(weights, dtype=float)
    fused = _fused_cube(x)
    if fused is not None and weights.shape == (3,):  # one pass over a CPU cube (numba)
        from . import _tv_kernels

        return _tv_kernels.tv_cube(fused, weights)
    total = 0.0
    for k, weight in enumerate(weights):
        if weight > 0 and x.shape[k] > 1:
            difference = x[_along(k, x.ndim, slice(1, None))] - x[_along(k, x.ndim, slice(None, -1))]
            total += weight * float(abs(difference).sum())
    return total


# ---- recursive dyadic partitions -------------------------------------------------------------------

def _pad_to_power_of_two(x: np.ndarray) -> tuple[np.ndarray, tuple[int, ...]]:
    side = 1 << int(np.ceil(np.log2(max(x.shape))))
    pads = [(0, side - n) for n in x.shape]
    return (np.pad(x, pads, mode="symmetric") if any(p for _, p in pads) else x), x.shape


def _block_sum(x: np.ndarray) -> np.ndarray:
    """Sum of each 2 x 2 block of a 2-D array with even sides."""
    return x[0::2, 0::2] + x[1::2, 0::2] + x[0::2, 1::2] + x[1::2, 1::2]


def rdp_prox(step: np.ndarray, lam: float, *, lower: float = 0.0) -> np.ndarray:
    """Optimal pruning of the recursive dyadic partition: a piecewise-constant (Haar-like) image.

    Minimises ``||x - step||^2 + lam * (number of cells)`` over the quad-tree partitions of the image,
    each cell at the (clipped) mean of its pixels, by the bottom-up dynamic programme of Willett and
    Nowak. This is the convention of the SPIRAL-TAP reference, whose RDP penalty counts cells against
    the squared error without the factor 1/2. A side that is not a power of two is padded by
    mirroring, and the result cropped.

    Parameters
    ----------
    step
        A 2-D image.
    lam
        Cost of one cell.
    lower
        Lower bound of the cell values.
    """
    if step.ndim != 2:
        raise ValueError(f"the RDP penalty works on 2-D images, got shape {step.shape}")
    padded, shape = _pad_to_power_of_two(np.asarray(step, dtype=float))
    side = padded.shape[0]
    levels = int(np.log2(side))
    values = np.maximum(padded, lower)
    # cost of the best sub-partition of every cell, level by level; leaves are single pixels. As in
    # the reference, a merged cell costs sum(max(x, lower)**2) - n v**2 (its squared error when no
    # pixel lies below the bound)
    best = (values - padded) ** 2 + lam
    sums, square_sums = padded, values**2
    decisions, cell_values = [], []
    for level in range(1, levels + 1):
        sums, square_sums = _block_sum(sums), _block_sum(square_sums)
        n = 4**level
        merged_value = np.maximum(sums / n, lower)
        merged_cost = square_sums - n * merged_value**2 + lam
        split_cost = _block_sum(best)
        split = split_cost < merged_cost
        decisions.append(split)
        cell_values.append(merged_value)
        best = np.where(split, split_cost, merged_cost)
    # top-down: a cell that merges fixes the value of all its pixels
    estimate = cell_values[-1] if levels else values
    keep_finer = decisions[-1] if levels else np.ones_like(values, bool)
    for level in range(levels - 1, 0, -1):
        estimate = np.repeat(np.repeat(estimate, 2, 0), 2, 1)
        keep_finer = np.repeat(np.repeat(keep_finer, 2, 0), 2, 1)
        estimate = np.where(keep_finer, cell_values[level - 1], estimate)
        keep_finer = keep_finer & decisions[level - 1]
    if levels:
        estimate = np.repeat(np.repeat(estimate, 2, 0), 2, 1)
        keep_finer = np.repeat(np.repeat(keep_finer, 2, 0), 2, 1)
        estimate = np.where(keep_finer, values, estimate)
    return estimate[: shape[0], : shape[1]]


def _cell_corners(a: np.ndarray, half: int) -> np.ndarray:
    """Sum over the four sub-cells of side ``half`` of the cell anchored at every pixel (circular)."""
    return a + np.roll(a, -half, 1) + np.roll(a, -half, 0) + np.roll(a, (-half, -half), (0, 1))


def _cell_parents(a: np.ndarray, half: int) -> np.ndarray:
    """Sum over the four cells of side ``2 half`` that hold the sub-cell anchored at every pixel."""
    return a + np.roll(a, half, 1) + np.roll(a, half, 0) + np.roll(a, (half, half), (0, 1))


def rdp_ti_prox(step: np.ndarray, lam: float, *, lower: float = 0.0) -> np.ndarray:
    """Translation-invariant RDP: the average of :func:`rdp_prox` over every circular shift.

    Computed in one pass, without shifting the image, by the undecimated Haar recursion of the
    SPIRAL-TAP reference: bottom-up, the cell of every side ``2**level`` anchored at every pixel
    decides between merging and splitting into its four sub-cells; top-down, each sub-cell's value is
    the average over its four possible parent cells of the parent's value plus, where the parent (and
    all its ancestors) split, the sub-cell's own detail. This equals exact cycle spinning over all
    ``n x n`` shifts (tested) at the cost of ``log2 n`` passes. As in the reference, a single pixel
    costs ``lam`` whatever its value (the bound enters the merged cells' costs and the final clip).

    Parameters
    ----------
    step
        A 2-D image (a side that is not a power of two is padded by mirroring, and the result cropped).
    lam
        Cost of one cell.
    lower
        Lower bound of the solution.

    References
    ----------
    .. [1] R. R. Coifman, D. L. Donoho, "Translation-invariant de-noising", in Wavelets and
       Statistics, Springer, 1995.
    """
    if step.ndim != 2:
        raise ValueError(f"the RDP-TI penalty works on 2-D images, got shape {step.shape}")
    padded, shape = _pad_to_power_of_two(np.asarray(step, dtype=float))
    levels = int(np.log2(padded.shape[0]))
    scaling = [padded]  # the mean of the cell of each level anchored at each pixel
    square_sums = np.maximum(padded, lower) ** 2
    best = np.full_like(padded, lam)
    splits = []
    for level in range(1, levels + 1):
        half = 1 << (level - 1)
        cell_mean = _cell_corners(scaling[-1], half) / 4.0
        square_sums = _cell_corners(square_sums, half)
        merged_cost = square_sums - 4**level * np.maximum(cell_mean, lower) ** 2 + lam
        split_cost = _cell_corners(best, half)
        split = split_cost < merged_cost
        splits.append(split)
        scaling.append(cell_mean)
        best = np.where(split, split_cost, merged_cost)
    estimate = scaling[-1]
    alive = np.ones_like(padded)  # the share of shifts in which a cell's ancestors all split
    for level in range(levels, 0, -1):
        half = 1 << (level - 1)
        kept = alive * splits[level - 1]
        estimate = _cell_parents(estimate - kept * scaling[level], half) / 4.0
        alive = _cell_parents(kept, half) / 4.0
        estimate = estimate + alive * scaling[level - 1]
    return np.maximum(estimate, lower)[: shape[0], : shape[1]]


@dataclass(frozen=True)
class Penalty:
    """A penalty as SPIRAL-TAP uses it: the subproblem solver and the penalty value."""

    name: str
    prox: Callable[..., np.ndarray]
    value: Callable[[np.ndarray], float]
    accept_test: bool = True
    any_array: bool = False  # the prox works on torch tensors too (else numpy only)


PENALTIES: dict[str, Penalty] = {
    "canonical": Penalty("canonical", l1_prox, l1_value, any_array=True),
    "onb": Penalty("onb", onb_prox, onb_value),
    "tv": Penalty("tv", tv_prox, tv_value, any_array=True),
    "rdp": Penalty("rdp", rdp_prox, lambda x: 0.0, accept_test=False),
    "rdp-ti": Penalty("rdp-ti", rdp_ti_prox, lambda x: 0.0, accept_test=False),
}
