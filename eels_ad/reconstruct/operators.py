"""Forward operators for SPIRAL-TAP: a pair ``(A, AT)`` of functions (the model and its adjoint)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import numpy as np

from .._xp import like, through_numpy

Operator = tuple[Callable[[np.ndarray], np.ndarray], Callable[[np.ndarray], np.ndarray]]


def identity() -> Operator:
    """Denoising: ``A = AT = identity`` (numpy arrays or torch tensors)."""
    return (lambda x: x), (lambda y: y)


def blur(kernel: np.ndarray, *, method: Literal["auto", "direct", "fft"] = "auto") -> Operator:
    """Convolution with a point-spread (and/or energy-resolution) kernel, zero boundary, 'same' size.

    The forward model equals ``scipy.signal.convolve(x, kernel, mode="same")``; the adjoint is its
    exact transpose, for kernels of odd or even size.

    Parameters
    ----------
    kernel
        The kernel; for a cube, e.g. shape (ky, kx, 1) for a spatial blur or (1, 1, ke) for the
        energy resolution. It need not be symmetric.
    method
        ``"direct"`` (:func:`scipy.ndimage.convolve`, fast for small kernels), ``"fft"``
        (:func:`scipy.signal.fftconvolve`) or ``"auto"`` (direct for kernels of at most 125
        elements).

    Examples
    --------
    >>> forward, adjoint = blur(np.ones((3, 3)) / 9)
    >>> float(forward(np.ones((4, 4)))[0, 0])  # a corner sees 4 of the 9 pixels
    0.4444444444444444
    """
    from scipy import ndimage, signal

    kernel = np.asarray(kernel, dtype=float)
    if method not in ("auto", "direct", "fft"):
        raise ValueError(f"method must be 'auto', 'direct' or 'fft', got {method!r}")
    if method == "auto":
        method = "direct" if kernel.size <= 125 else "fft"
    # scipy.ndimage centres an even kernel one sample later than signal.convolve's 'same' crop
    origin = tuple(-(1 - n % 2) for n in kernel.shape)
    flipped = kernel[tuple(slice(None, None, -1) for _ in range(kernel.ndim))]

    def check(x: np.ndarray) -> np.ndarray:
        if x.ndim != kernel.ndim:
            raise ValueError(
                f"the blur kernel has {kernel.ndim} dimensions but the data has {x.ndim} (shape {x.shape})")
        return x if np.issubdtype(x.dtype, np.floating) else x.astype(float)

    if method == "direct":
        def forward(x: np.ndarray) -> np.ndarray:
            x = check(x)
            return ndimage.convolve(x, kernel, mode="constant", origin=origin)

        def adjoint(y: np.ndarray) -> np.ndarray:
            y = check(y)
            return ndimage.correlate(y, kernel, mode="constant", origin=origin)
    else:
        def forward(x: np.ndarray) -> np.ndarray:
            x = check(x)
            return signal.fftconvolve(x, kernel, mode="same")

        def adjoint(y: np.ndarray) -> np.ndarray:
            y = check(y)
            full = signal.fftconvolve(y, flipped, mode="full")
            return full[tuple(slice(n // 2, n // 2 + size) for n, size in zip(kernel.shape, y.shape, strict=True))]

    return through_numpy(forward), through_numpy(adjoint)


def scan_mask(visited: np.ndarray) -> Operator:
    """Sub-sampled scanning: only the ``visited`` pixels (or voxels) are measured.

    ``visited`` is a boolean (y, x) map for a cube; it broadcasts over the energy axis. The
    operators take numpy arrays or torch tensors.
    """
    visited = np.asarray(visited, dtype=bool)
    cache: dict = {}

    def weights(x):
        mask = visited.reshape(visited.shape + (1,) * (x.ndim - visited.ndim))
        if isinstance(x, np.ndarray):
            return mask
        key = (x.dtype, x.device)  # a torch tensor: the mask as a tensor on its device, made once
        if key not in cache:
            cache[key] = like(mask, x)
        return cache[key]

    return (lambda x: x * weights(x)), (lambda y: y * weights(y))
