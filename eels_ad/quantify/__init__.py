"""Explain what changed: per-pixel edge shifts, white-line ratios and valence, with error bars."""

from ._drift import separate_drift
from ._ratio import white_line_ratio_map
from ._shift import edge_shift_map
from ._valence import read_references, valence_map

__all__ = ["edge_shift_map", "read_references", "separate_drift", "valence_map", "white_line_ratio_map"]
