"""Lightning, quietly: its informational messages and the libraries' warnings only when progress is asked for."""

from __future__ import annotations

import contextlib
import logging
import warnings


@contextlib.contextmanager
def quiet_lightning(quiet: bool):
    """Silence Lightning's informational messages (GPU available ..., tips) when asked for no progress."""
    logger = logging.getLogger("lightning.pytorch")
    level = logger.level
    if quiet:
        logger.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            if quiet:
                noise = ".*(treespec|LeafSpec|num_workers|does not have many workers).*"
                warnings.filterwarnings("ignore", message=noise)
            yield
    finally:
        logger.setLevel(level)
