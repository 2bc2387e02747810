"""The process's cores and its pools of worker threads (for work that releases the GIL: numba kernels, BLAS)."""

from __future__ import annotations

import functools
import os
from concurrent.futures import ThreadPoolExecutor

_POOLS: dict = {}


@functools.lru_cache(maxsize=1)
def cores() -> int:
    """The cores this process's own kernels may use: its CPU affinity where the system says, at most
    ``OMP_NUM_THREADS`` where that is set (as a Dask worker's nanny sets it to 1, and ``dask worker --nthreads 1``
    users do, so that several workers on one machine do not each take every core)."""
    try:
        found = max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        found = max(1, os.cpu_count() or 1)
    limit = os.environ.get("OMP_NUM_THREADS", "").strip()
    return min(found, int(limit)) if limit.isdigit() and int(limit) > 0 else found


def pool(workers: int, role: str = "work") -> ThreadPoolExecutor:
    """This process's pool of ``workers`` threads for ``role`` (work that splits itself over cores; "read": the
    chunk reader; "side": work beside the main thread's). A forked child makes its own: its parent's threads are
    not in it."""
    key = (os.getpid(), role, workers)
    if key not in _POOLS:
        _POOLS[key] = ThreadPoolExecutor(workers, thread_name_prefix=f"eels-ad-{role}")
    return _POOLS[key]
