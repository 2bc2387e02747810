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


def pool(workers: int, role: str = "work") -> ThreadPoolExecutor:
    """This process's pool of ``workers`` threads for ``role`` (work that splits itself over cores; "read": the
    chunk reader; "side": work beside the main thread's). A forked child makes its own: its parent's threads are
    not in it."""
    key = (os.getpid(), role, workers)
    if key not in _POOLS:
        _POOLS[key] = ThreadPoolExecutor(workers, thread_name_prefix=f"eels-ad-{role}")
    return _POOLS[key]
