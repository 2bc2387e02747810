"""Poisson reconstruction of low-dose and sub-sampled spectrum images (SPIRAL-TAP)."""

from .operators import blur, identity, scan_mask
from .penalties import PENALTIES, WaveletBasis, l1_prox, onb_prox, rdp_prox, rdp_ti_prox, tv_prox
from .spiral import SpiralResult, TauSelection, default_taus, denoise_cube, select_tau, spiral_tap

__all__ = [
    "PENALTIES",
    "SpiralResult",
    "TauSelection",
    "WaveletBasis",
    "blur",
    "default_taus",
    "denoise_cube",
    "identity",
    "l1_prox",
    "onb_prox",
    "rdp_prox",
    "rdp_ti_prox",
    "scan_mask",
    "select_tau",
    "spiral_tap",
    "tv_prox",
]
