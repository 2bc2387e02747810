"""Figures of results: channel tests (matplotlib and HoloViews), SPIRAL-TAP before/after, detection grids."""

from __future__ import annotations

import numpy as np
import xarray as xr

from ._common import _counts_dim, _energy_dim, _holoviews, _image


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


def channel_tests_hv(table: xr.Dataset):
    """The same three panels as :func:`plot_channel_tests`, as a linked HoloViews layout (Bokeh)."""
    hv = _holoviews()

    energy = table["energy"].values
    spectra = hv.Overlay([
        hv.Curve((energy, table["mean_a"].values), _energy_dim(hv), _counts_dim(hv), label="A (baseline)"),
        hv.Curve((energy, table["mean_b"].values), _energy_dim(hv), _counts_dim(hv), label="B"),
    ]).opts(title="mean spectra (size-normalised)", frame_width=320)
    lfc = hv.Curve((energy, table["log_fold_change"].values), _energy_dim(hv), "log fold change")
    significant = np.asarray(table["significant"].values, dtype=bool)
    points = hv.Scatter((energy[significant], table["log_fold_change"].values[significant]), _energy_dim(hv),
                        "log fold change", label="significant")
    strength = hv.Curve((energy, _q_strength(table)), _energy_dim(hv), "-log10 q")
    threshold = hv.HLine(-np.log10(table.attrs.get("fdr", 0.05)))
    return (spectra + (lfc * points).opts(title="log fold change (B over A)", frame_width=320)
            + (strength * threshold).opts(title="-log10 q (dashed: the FDR)", frame_width=320)).cols(1)


def reconstruction_hv(before: xr.DataArray, after: xr.DataArray, *, truth: xr.DataArray | None = None,
                      energy_range: tuple[float, float] | None = None, pixel: tuple[int, int] | None = None):
    """SPIRAL-TAP before/after: energy-window maps side by side and one pixel's spectra (HoloViews).

    Parameters
    ----------
    before, after
        The measured cube and its reconstruction.
    truth
        The noise-free cube, when known (simulations), or another reference; labelled "reference".
    energy_range
        ``(e_min, e_max)`` eV of the maps (default: the whole axis).
    pixel
        (y index, x index) of the spectra (default: the centre).
    """
    hv = _holoviews()
    window = energy_range or (float(before["energy"][0]), float(before["energy"][-1]))
    group = "_denoised region"
    band = f"{window[0]:g}-{window[1]:g} eV"
    panels = [_image(hv, before.eels.total_counts(window), f"measured counts, {band}", group=group),
              _image(hv, after.eels.total_counts(window), f"reconstructed, {band}", group=group)]
    if truth is not None:
        panels.append(_image(hv, truth.eels.total_counts(window), f"reference, {band}", group=group))
    y, x = pixel or (before.sizes["y"] // 2, before.sizes["x"] // 2)
    energy = before["energy"].values
    energy_dim, counts_dim = _energy_dim(hv, group), _counts_dim(hv, group)
    curves = {"measured": hv.Curve((energy, before.values[y, x]), energy_dim, counts_dim),
              "reconstructed": hv.Curve((energy, after.values[y, x]), energy_dim, counts_dim)}
    if truth is not None:
        curves["reference"] = hv.Curve((energy, truth.values[y, x]), energy_dim, counts_dim)
    panels.append(hv.NdOverlay(curves, kdims="spectrum").opts(title=f"pixel y={y}, x={x}", frame_width=420))
    return hv.Layout(panels).cols(2)


def plot_detection_grid(grid, metric: str = "f1"):
    """``metric`` against edge shift from :func:`eels_ad.evaluate.evaluation_grid`, one line per
    detector and anomaly fraction, one panel per dose (HoloViews)."""
    hv = _holoviews()
    mean = grid.groupby(["detector", "dose", "fraction", "shift_eV"])[metric].mean().reset_index()
    panels = []
    for dose, part in mean.groupby("dose"):
        curves = {
            (detector, fraction): hv.Curve(rows, "shift_eV", metric).opts(logx=True)
            for (detector, fraction), rows in part.groupby(["detector", "fraction"])
        }
        panels.append(hv.NdOverlay(curves, kdims=["detector", "fraction"]).opts(
            title=f"dose {dose:g} counts/channel", legend_position="right", frame_width=320, ylim=(0, 1.02)))
    return hv.Layout(panels).cols(2)
