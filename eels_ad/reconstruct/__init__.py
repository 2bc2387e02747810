"""Poisson reconstruction of low-dose and sub-sampled spectrum images (SPIRAL-TAP)."""

from .operators import blur, identity, scan_mask
from .penalties import PENALTIES, WaveletBasis, l1_prox, onb_prox, rdp_prox, rdp_ti_prox, tv_prox
from .spiral import SpiralResult, denoise_cube, spiral_tap

__all__ = [
    "PENALTIES",
    "SpiralResult",
    "WaveletBasis",
    "blur",
    "denoise_cube",
    "identity",
    "l1_prox",
    "onb_prox",
    "rdp_prox",
    "rdp_ti_prox",
    "scan_mask",
    "spiral_tap",
    "tv_prox",
]
