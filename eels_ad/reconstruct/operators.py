"""Forward operators for SPIRAL-TAP: a pair ``(A, AT)`` of functions (the model and its adjoint)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

Operator = tuple[Callable[[np.ndarray], np.ndarray], Callable[[np.ndarray], np.ndarray]]


def identity() -> Operator:
    """Denoising: ``A = AT = identity``."""
    return (lambda x: x), (lambda y: y)


def blur(kernel: np.ndarray, *, axes: tuple[int, ...] | None = None, method: str = "auto") -> Operator:
    """Convolution with a point-spread (and/or energy-resolution) kernel, zero boundary, 'same' size.

    Parameters
    ----------
    kernel
        The kernel; for a cube, e.g. shape (ky, kx, 1) for a spatial blur or (1, 1, ke) for the
        energy resolution. It need not be symmetric: the adjoint correlates with it.
    axes
        Not used; the kernel's own shape says which axes it blurs.
    method
        ``"direct"``, ``"fft"`` or ``"auto"`` (scipy.signal.convolve chooses).
    """
    from scipy import signal

    kernel = np.asarray(kernel, dtype=float)
    flipped = kernel[tuple(slice(None, None, -1) for _ in range(kernel.ndim))]

    def forward(x: np.ndarray) -> np.ndarray:
        return signal.convolve(x, kernel, mode="same", method=method)

    def adjoint(y: np.ndarray) -> np.ndarray:
        return signal.convolve(y, flipped, mode="same", method=method)

    return forward, adjoint


def scan_mask(visited: np.ndarray) -> Operator:
    """Sub-sampled scanning: only the ``visited`` pixels (or voxels) are measured.

    ``visited`` is a boolean (y, x) map for a cube; it broadcasts over the energy axis.
    """
    visited = np.asarray(visited, dtype=bool)

    def weights(x: np.ndarray) -> np.ndarray:
        return visited.reshape(visited.shape + (1,) * (x.ndim - visited.ndim))

    return (lambda x: x * weights(x)), (lambda y: y * weights(y))
