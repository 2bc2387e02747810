"""Shared fixtures: the real data in ../shared (skipped with a reason where it is absent); under pytest-xdist, each
worker process on its own share of the cores."""

import os
from pathlib import Path

import pytest


def _own_cores_per_worker() -> None:
    """Pin this pytest-xdist worker (and what it starts) to its share of the cores, before torch, BLAS or numba
    size their thread pools: two workers that each use every core spin against each other (a denoising test
    measured 7x slower than alone)."""
    worker, count = os.environ.get("PYTEST_XDIST_WORKER"), int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if not worker or count < 2 or not hasattr(os, "sched_setaffinity"):
        return
    cores = sorted(os.sched_getaffinity(0))
    index = int(worker.removeprefix("gw")) % count
    share = cores[index * len(cores) // count:(index + 1) * len(cores) // count] or [cores[index % len(cores)]]
    os.sched_setaffinity(0, share)


_own_cores_per_worker()

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"
REAL_SI = SHARED / "data" / "real" / "fe_oxide_si.dm3"
REFERENCE_SPECTRA = SHARED / "data" / "real" / "fe_l23_references.csv"


def _require(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"needs {path} (the ../shared data folder beside the checkout; present in CI)")
    return path


@pytest.fixture(scope="session")
def real_si_path() -> Path:
    return _require(REAL_SI)


@pytest.fixture(scope="session")
def reference_spectra_path() -> Path:
    return _require(REFERENCE_SPECTRA)


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    return _require(SHARED)


LSMO_CORE_LOSS = SHARED / "data" / "real" / "lsmo_linescan.hspy"
LSMO_LOW_LOSS = SHARED / "data" / "real" / "lsmo_linescan_low_loss.hspy"


@pytest.fixture(scope="session")
def lsmo_paths() -> tuple[Path, Path]:
    return _require(LSMO_CORE_LOSS), _require(LSMO_LOW_LOSS)
