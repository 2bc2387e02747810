"""A fused CPU kernel (numba) of :func:`~eels_ad.detect.shift_or_deviance` and :func:`~eels_ad.detect.deviance_z`.

The array versions make some ten temporaries of the spectra's size per piece and look the deviance's moments up
by a binary search per channel (``np.interp``); PCA's default score spent more time there than in reading the cube.
Here each spectrum is one pass over its channels: the shift test's score and information, the deviance and its
tabulated moments (a uniform grid in log mu: the index by arithmetic), then the larger z. Equal to the array
versions to rounding (tested).
"""

from __future__ import annotations

import functools
import importlib.util

import numpy as np

from .._threads import pool

#: spectra x channels of a call below which the array versions run: numba's import (~0.6 s) and first dispatch
#: (~1.1 s, from its cache) are paid once per process, on the first call at least this big (the work blocks of a
#: cube with ~1,000 channels, and the last, shorter block of PCA's 4,000 calibration spectra), and repaid after
#: a few such blocks (2-2.7x faster)
MIN_ELEMENTS = 1 << 19


@functools.lru_cache(maxsize=1)
def _kernel():
    """The compiled kernel (numba imported on first use)."""
    from ._score_rows import _rows

    return _rows


@functools.lru_cache(maxsize=1)
def available() -> bool:
    """Whether the fused kernel can run (numba importable)."""
    return importlib.util.find_spec("numba") is not None


def worth_it(counts: np.ndarray, model: np.ndarray) -> bool:
    """Whether to score these spectra with the kernel: numba there and the block at least :data:`MIN_ELEMENTS`
    (by size alone, so that a block's scores never depend on what the process did before)."""
    return max(np.size(counts), np.size(model)) >= MIN_ELEMENTS and available()


def fused_scores(counts: np.ndarray, model: np.ndarray, floor: float, table: tuple[np.ndarray, np.ndarray, np.ndarray],
                 with_shift: bool) -> np.ndarray:
    """max(shift z, deviance z) (``with_shift``) or the deviance z of (..., energy) spectra, float64; the spectra
    split over one thread per core of the process (the kernel releases the GIL; each spectrum is scored alone, so
    the split does not change a score)."""
    log_mu, means, variances = table
    counts, model = np.broadcast_arrays(np.asarray(counts, dtype=float), np.asarray(model, dtype=float))
    shape = counts.shape[:-1]
    flat_counts = np.ascontiguousarray(counts.reshape(-1, counts.shape[-1]))
    flat_model = np.ascontiguousarray(model.reshape(-1, model.shape[-1]))
    out = np.empty(flat_counts.shape[0])
    step = float(log_mu[1] - log_mu[0])
    args = (float(floor), float(log_mu[0]), step, np.ascontiguousarray(means), np.ascontiguousarray(variances),
            bool(with_shift), _log_counts())
    kernel, n = _kernel(), flat_counts.shape[0]
    workers = _threads()
    if workers > 1 and n >= 2 * MIN_THREAD_SPECTRA:
        # the kernel releases the GIL: the spectra in as many parts as the process has cores
        bounds = np.linspace(0, n, workers + 1).astype(int)
        parts = [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
        list(pool(workers).map(lambda part: kernel(flat_counts[part], flat_model[part], *args, out[part]), parts))
    else:
        kernel(flat_counts, flat_model, *args, out)
    return out.reshape(shape)


#: spectra per thread at least when the kernel runs in several threads
MIN_THREAD_SPECTRA = 256


def _threads() -> int:
    """The process's cores, one fewer while a chunk of a lazy cube is being read beside the scoring."""
    from ..datacube import compute_cores

    return compute_cores()


#: whole counts whose logs the kernel looks up rather than computes
LOG_TABLE_COUNTS = 4096


@functools.lru_cache(maxsize=1)
def _log_counts() -> np.ndarray:
    """``log(k)`` of the whole counts ``k < LOG_TABLE_COUNTS`` (0 at k = 0, never looked up)."""
    return np.log(np.maximum(np.arange(LOG_TABLE_COUNTS, dtype=np.float64), 1.0))
