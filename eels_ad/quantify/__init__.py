"""Explain what changed: per-pixel edge shifts, white-line ratios and valence, with error bars."""

from ._drift import separate_drift
from ._shift import edge_shift_map

__all__ = ["edge_shift_map", "separate_drift"]
