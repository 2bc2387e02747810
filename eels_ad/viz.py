"""Figures: static (matplotlib) and interactive (HoloViews/Bokeh).

Imported lazily: ``import eels_ad`` does not load matplotlib or HoloViews.
"""

from __future__ import annotations

import numpy as np
import xarray as xr


def _q_strength(table: xr.Dataset) -> np.ndarray:
    qvalues = np.asarray(table["qvalue"].values, dtype=float)
    return -np.log10(np.clip(qvalues, 1e-300, 1.0))


def plot_channel_tests(table: xr.Dataset, *, title: str | None = None):
    """Mean spectra of the two regions, log fold change and -log10 q against energy (matplotlib).

    Parameters
    ----------
    table
        The result of :func:`eels_ad.stats.compare_regions`.
    title
        Figure title.

    Returns
    -------
    matplotlib.figure.Figure
    """
    import matplotlib.pyplot as plt

    energy = table["energy"].values
    significant = np.asarray(table["significant"].values, dtype=bool)
    fig, axes = plt.subplots(3, 1, figsize=(8, 7.5), sharex=True)
    axes[0].plot(energy, table["mean_a"], label=f"A ({table.attrs.get('n_pixels_a', '?')} px)")
    axes[0].plot(energy, table["mean_b"], label=f"B ({table.attrs.get('n_pixels_b', '?')} px)")
    axes[0].set_ylabel("mean counts\n(size-normalised)")
    axes[0].legend()
    axes[1].axhline(0, color="0.6", lw=0.8)
    axes[1].plot(energy, table["log_fold_change"], color="0.3", lw=1)
    axes[1].scatter(energy[significant], table["log_fold_change"].values[significant], s=8, color="C3",
                    label=f"q < {table.attrs.get('fdr', 0.05)}")
    axes[1].set_ylabel("log fold change\n(B over A)")
    axes[1].legend()
    axes[2].plot(energy, _q_strength(table), color="C2")
    axes[2].axhline(-np.log10(table.attrs.get("fdr", 0.05)), color="C3", ls="--", lw=0.8)
    axes[2].set_ylabel("-log10 q")
    axes[2].set_xlabel("energy loss (eV)")
    fig.suptitle(title or f"NB {table.attrs.get('method', '')} {table.attrs.get('test', '')} per energy channel")
    fig.tight_layout()
    return fig


def _holoviews():
    """HoloViews with the Bokeh backend registered (in a notebook, ``hv.extension("bokeh")`` does it)."""
    import holoviews as hv
    import holoviews.plotting.bokeh  # noqa: F401  (registers the backend outside notebooks)

    if not hv.Store.current_backend:
        hv.Store.set_current_backend("bokeh")
    return hv


def channel_tests_hv(table: xr.Dataset):
    """The same three panels as :func:`plot_channel_tests`, as a linked HoloViews layout (Bokeh)."""
    hv = _holoviews()

    energy = table["energy"].values
    spectra = hv.Overlay([
        hv.Curve((energy, table["mean_a"].values), "energy", "counts", label="A (reference)"),
        hv.Curve((energy, table["mean_b"].values), "energy", "counts", label="B"),
    ]).opts(title="mean spectra (size-normalised)")
    lfc = hv.Curve((energy, table["log_fold_change"].values), "energy", "log fold change")
    significant = np.asarray(table["significant"].values, dtype=bool)
    points = hv.Scatter((energy[significant], table["log_fold_change"].values[significant]), "energy",
                        "log fold change", label="significant")
    strength = hv.Curve((energy, _q_strength(table)), "energy", "-log10 q")
    threshold = hv.HLine(-np.log10(table.attrs.get("fdr", 0.05)))
    return (spectra + (lfc * points).opts(title="log fold change (B over A)")
            + (strength * threshold).opts(title="-log10 q")).cols(1)
