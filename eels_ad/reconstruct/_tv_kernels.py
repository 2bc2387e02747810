"""Fused CPU kernels of the 3-D FGP iteration (numba), for :func:`~eels_ad.reconstruct.tv_prox` on cubes.

The array-at-a-time FGP loop streams every buffer through memory a dozen times per iteration; on a
(y, x, energy) cube it is bound by memory bandwidth. These two kernels do the same arithmetic in two
passes (the primal point from the extrapolated duals, then every dual from the primal point), a
block of rows per thread, so that each buffer is read or written about once per pass: 3.3x (numpy float64)
and 3.9x (torch CPU float32) faster than the array loop on 2 CPU cores (``benchmarks/spiral_cube.py
--large-only``).

The duals here are full-size arrays whose last plane along their axis stays zero (the array loop's
are one shorter); the iterates are the same to rounding.
"""

from __future__ import annotations

import numpy as np

from .._threads import cores, pool

try:
    from numba import njit
except ImportError:  # pragma: no cover - numba is a dependency; without it tv_prox runs its array loop
    njit = None

# no 'nnan' / 'ninf': the upper bound is often +inf
_FAST = {"nsz", "arcp", "contract", "afn", "reassoc"}


def available() -> bool:
    """Whether the fused kernels can run (numba imported)."""
    return njit is not None


if njit is not None:

    @njit(nogil=True, cache=True, fastmath=_FAST)
    def _primal_rows(start, stop, first, step, e0, e1, e2, x_old, x_new, lam, lower, upper):  # pragma: no cover
        """``x_new = clip(step - lam D^T e, lower, upper)`` on rows [start, stop) (``first``: the duals are zero and
        not read); returns the sums of x_new^2 and of (x_old - x_new)^2."""
        _, nx, ne = step.shape
        norm = 0.0
        change = 0.0
        for i in range(start, stop):
            for j in range(nx):
                for k in range(ne):
                    if first:
                        v = min(max(step[i, j, k], lower), upper)
                    else:
                        d = -e0[i, j, k] - e1[i, j, k] - e2[i, j, k]
                        if k > 0:
                            d += e2[i, j, k - 1]
                        if i > 0:
                            d += e0[i - 1, j, k]
                        if j > 0:
                            d += e1[i, j - 1, k]
                        v = min(max(step[i, j, k] - lam * d, lower), upper)
                    c = x_old[i, j, k] - v
                    x_new[i, j, k] = v
                    norm += v * v
                    change += c * c
        return norm, change

    @njit(nogil=True, cache=True, fastmath=_FAST)
    def _dual_rows(start, stop, first, x, e0, e1, e2, d0, d1, d2, dual_step, momentum, w0, w1,
                   w2):  # pragma: no cover - jitted
        """The projected dual step and its extrapolation, in place, on rows [start, stop) (``first``: from zero
        duals, which are not read)."""
        ny, nx, ne = x.shape
        for i in range(start, stop):
            for j in range(nx):
                if i < ny - 1:
                    for k in range(ne):
                        base = 0.0 if first else e0[i, j, k]
                        u = min(max(base + dual_step * (x[i + 1, j, k] - x[i, j, k]), -w0), w0)
                        e0[i, j, k] = u if first else u + momentum * (u - d0[i, j, k])
                        d0[i, j, k] = u
                if j < nx - 1:
                    for k in range(ne):
                        base = 0.0 if first else e1[i, j, k]
                        u = min(max(base + dual_step * (x[i, j + 1, k] - x[i, j, k]), -w1), w1)
                        e1[i, j, k] = u if first else u + momentum * (u - d1[i, j, k])
                        d1[i, j, k] = u
                for k in range(ne - 1):
                    base = 0.0 if first else e2[i, j, k]
                    u = min(max(base + dual_step * (x[i, j, k + 1] - x[i, j, k]), -w2), w2)
                    e2[i, j, k] = u if first else u + momentum * (u - d2[i, j, k])
                    d2[i, j, k] = u

    @njit(nogil=True, cache=True, fastmath=_FAST)
    def _tv_rows(start, stop, x, w0, w1, w2):  # pragma: no cover - jitted
        """sum_k w_k |D_k x| over rows [start, stop) (the differences to the next row included)."""
        ny, nx, ne = x.shape
        s0 = 0.0
        s1 = 0.0
        s2 = 0.0
        for i in range(start, stop):
            for j in range(nx):
                if i < ny - 1:
                    for k in range(ne):
                        s0 += abs(x[i + 1, j, k] - x[i, j, k])
                if j < nx - 1:
                    for k in range(ne):
                        s1 += abs(x[i, j + 1, k] - x[i, j, k])
                for k in range(ne - 1):
                    s2 += abs(x[i, j, k + 1] - x[i, j, k])
        return w0 * s0 + w1 * s1 + w2 * s2




def _row_blocks(ny: int, parts: int) -> list[tuple[int, int]]:
    edges = np.linspace(0, ny, min(parts, ny) + 1).astype(int)
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:], strict=True) if b > a]


def _over_rows(kernel, ny: int, *args):
    """Run ``kernel(start, stop, *args)`` on blocks of rows, one per core (the kernels release the GIL)."""
    blocks = _row_blocks(ny, cores())
    if len(blocks) == 1:
        return [kernel(0, ny, *args)]
    futures = [pool(len(blocks)).submit(kernel, a, b, *args) for a, b in blocks]
    return [future.result() for future in futures]


def _buffers(step: np.ndarray, workspace: dict | None) -> list[np.ndarray]:
    """Six arrays of the step's shape (three duals and their extrapolations), kept in ``workspace`` between the
    subproblems of one solve. The last plane of each along its axis stays zero."""
    key = (step.shape, step.dtype.str)
    if workspace is not None and workspace.get("key") == key:
        return workspace["arrays"]
    arrays = [np.empty_like(step) for _ in range(6)]
    for k in range(3):
        for array in (arrays[k], arrays[3 + k]):
            array[(slice(None),) * k + (-1,)] = 0.0
    if workspace is not None:
        workspace.update(key=key, arrays=arrays)
    return arrays


def fgp_cube(step: np.ndarray, lam: float, weights: np.ndarray, lower: float, upper: float, n_iter: int,
             tol: float, n_axes: int, workspace: dict | None = None) -> np.ndarray:
    """Beck and Teboulle's FGP on a C-contiguous float32 or float64 (y, x, energy) array, as ``tv_prox``
    (``n_axes``: how many axes it smooths; an axis of weight 0 keeps zero duals; ``workspace``: a dict that keeps
    the duals' buffers from one call to the next)."""
    dtype = step.dtype.type
    buffers = _buffers(step, workspace)
    e, d = buffers[:3], buffers[3:]
    x = np.clip(step, lower, upper)  # the first step's change is then 0, as the array loop's
    x_new = np.empty_like(step)
    ny = step.shape[0]
    dual_step = dtype(1.0 / (4.0 * n_axes * lam))
    w = [dtype(v) for v in weights]
    t = 1.0
    small_changes = 0
    for iteration in range(n_iter):
        first = iteration == 0
        sums = _over_rows(_primal_rows, ny, first, step, e[0], e[1], e[2], x, x_new, dtype(lam), dtype(lower),
                          dtype(upper))
        norm = float(np.sqrt(sum(s[0] for s in sums)))
        change = float(np.sqrt(sum(s[1] for s in sums)))
        t_next = (1.0 + np.sqrt(1.0 + 4.0 * t * t)) / 2.0
        _over_rows(_dual_rows, ny, first, x_new, e[0], e[1], e[2], d[0], d[1], d[2], dual_step,
                   dtype((t - 1.0) / t_next), w[0], w[1], w[2])
        t = t_next
        x, x_new = x_new, x
        small_changes = small_changes + 1 if norm > 0 and change < tol * norm else 0
        if small_changes >= 5:
            break
    return x


def tv_cube(x: np.ndarray, weights: np.ndarray) -> float:
    """``sum_k w_k ||D_k x||_1`` of a C-contiguous float32 or float64 (y, x, energy) array, in one pass."""
    w = [float(v) if x.shape[k] > 1 else 0.0 for k, v in enumerate(weights)]
    return float(sum(_over_rows(_tv_rows, x.shape[0], x, w[0], w[1], w[2])))
