"""Shared fixtures: the real data in ../shared (skipped with a reason where it is absent)."""

from pathlib import Path

import pytest

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
