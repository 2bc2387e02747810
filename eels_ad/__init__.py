"""eels-ad: find and explain anomalies in electron energy-loss spectrum images.

The face of the package: datacube conventions and IO here, the rest in subpackages
(``eels_ad.prepare``, ``eels_ad.detect``, ``eels_ad.reconstruct``, ``eels_ad.stats``, ``eels_ad.viz``,
``eels_ad.batch``) that import their heavy dependencies (torch, HoloViews) only when used.
"""

from __future__ import annotations

import importlib
from typing import Any

from . import data, simulate
from .datacube import DIMS, as_datacube, validate
from .io import (
    DatacubeReadError,
    find_datacubes,
    from_hyperspy,
    load,
    open_results,
    save,
    to_hyperspy,
)
from .simulate import simulate_fe_l23

__version__ = "0.1.0"

__all__ = [
    "DIMS",
    "DatacubeReadError",
    "as_datacube",
    "data",
    "find_datacubes",
    "from_hyperspy",
    "load",
    "open_results",
    "save",
    "simulate",
    "simulate_fe_l23",
    "to_hyperspy",
    "validate",
]

_LAZY_SUBPACKAGES = {"detect", "evaluate", "prepare", "reconstruct", "stats", "viz", "batch"}


def __getattr__(name: str) -> Any:
    if name in _LAZY_SUBPACKAGES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'eels_ad' has no attribute {name!r}")
