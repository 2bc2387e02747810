"""The process's cores and its pools of worker threads (for work that releases the GIL: numba kernels, BLAS)."""

from __future__ import annotations

import functools
import os
from concurrent.futures import ThreadPoolExecutor

_POOLS: dict = {}


@functools.lru_cache(maxsize=1)
def cores() -> int:
    """The cores this process may run on (its CPU affinity where the system says)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def pool(workers: int) -> ThreadPoolExecutor:
    """This process's pool of ``workers`` threads (a forked child makes its own: its parent's threads are not in
    it)."""
    key = (os.getpid(), workers)
    if key not in _POOLS:
        _POOLS[key] = ThreadPoolExecutor(workers, thread_name_prefix="eels-ad-work")
    return _POOLS[key]
