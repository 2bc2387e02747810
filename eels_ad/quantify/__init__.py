"""Explain what changed: per-pixel edge shifts, white-line ratios and valence, with error bars.

Every map is a Poisson fit of a model to each spectrum (all pixels at once, chunk by chunk; a lazy
cube's chunks of rows over a Dask cluster when a ``distributed.Client`` is current) and
returns a labelled Dataset over (y, x) whose errors come from the same fit (Fisher information):

- :func:`edge_shift_map`: the shift (eV) of an edge against the bulk template, at the Cramer-Rao
  bound, with a drift (from :func:`eels_ad.prepare.zero_loss_drift`) applied to the model;
  :func:`shift_model` rebuilds the fitted model of a pixel.
- :func:`separate_drift`: without a low-loss image, a smooth drift (in scan time, per row, across
  the field) apart from local shifts.
- :func:`white_line_ratio_map`: L3/L2 with the Pearson two-step continuum and exact Poisson errors.
- :func:`valence_map`: non-negative fractions of reference spectra (:func:`read_references`).
"""

from ._drift import separate_drift
from ._ratio import white_line_ratio_map
from ._shift import edge_shift_map, shift_model
from ._valence import read_references, valence_map

__all__ = ["edge_shift_map", "read_references", "separate_drift", "shift_model", "valence_map", "white_line_ratio_map"]
