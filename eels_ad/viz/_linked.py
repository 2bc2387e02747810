"""The report's explorer: tap a pixel of the score map, see its spectrum, in a saved page with no kernel.

The spectra travel inside the page (float32, binned when the cube is large) and a few lines of
JavaScript (Bokeh ``CustomJS``) draw the tapped pixel's spectrum beside the bulk's mean.
"""

from __future__ import annotations

import math

import numpy as np
import xarray as xr

#: the most spectrum values a page embeds (float32: about 6 MB before base64); larger cubes are binned
MAX_EMBEDDED_VALUES = 1_500_000
_MIN_CHANNELS = 128  # energy binning stops here: the white lines must stay resolved


def _binning(shape: tuple[int, int, int], max_values: int) -> tuple[int, int]:
    """(pixel, channel) binning factors that bring ny * nx * ne under ``max_values``."""
    ny, nx, ne = shape
    excess = ny * nx * ne / max_values
    if excess <= 1:
        return 1, 1
    channel = int(min(math.ceil(excess), max(ne // _MIN_CHANNELS, 1)))
    pixel = int(math.ceil(math.sqrt(excess / channel)))
    while (ny // pixel) * (nx // pixel) * (ne // channel) > max_values:
        pixel += 1
    return min(pixel, ny, nx), channel


def linked_explorer(cube: xr.DataArray, scores: xr.DataArray, labels: xr.DataArray | None = None, *,
                    quantities: xr.Dataset | None = None, max_values: int = MAX_EMBEDDED_VALUES):
    """A Bokeh row: the score map (flagged pixels outlined) and the spectrum of the pixel tapped on it.

    Parameters
    ----------
    cube
        The spectrum image (y, x, energy).
    scores
        The (y, x) map to tap (higher = more anomalous); the page opens on its highest pixel outside vacuum.
    labels
        Flagged pixels, outlined; said in the spectrum's title.
    quantities
        An :func:`eels_ad.quantify.edge_shift_map` result: the tapped pixel's shift +- error in the title.
    max_values
        At most this many spectrum values are embedded: a larger cube's spectra are averaged over
        blocks of pixels and summed over neighbouring channels first (said in the title).

    Returns
    -------
    bokeh.models.LayoutDOM
        Put it on a page with :func:`eels_ad.viz.html_page` (``extra=``). The tap callback is named
        ``"explorer-tap"`` and the spectrum's data source ``"explorer-spectrum"``.
    """
    from bokeh.layouts import row
    from bokeh.models import ColumnDataSource, CustomJS, HoverTool, LinearColorMapper
    from bokeh.plotting import figure

    cube = cube.transpose("y", "x", "energy")
    ny, nx, ne = (cube.sizes[d] for d in ("y", "x", "energy"))
    pixel_bin, channel_bin = _binning((ny, nx, ne), max_values)
    binned = cube.eels.bin(y=pixel_bin, x=pixel_bin, energy=channel_bin) if max(pixel_bin, channel_bin) > 1 else cube
    spectra = np.asarray(binned.values, dtype=np.float32) / np.float32(pixel_bin * pixel_bin)
    energy = np.asarray(binned["energy"].values, dtype=float)
    if channel_bin > 1:  # coarsen().sum() keeps the first channel's energy: the bin's centre instead
        energy = energy + 0.5 * (channel_bin - 1) * float(cube.eels.dispersion)
    values = np.asarray(scores.values, dtype=float)
    flagged = np.zeros((ny, nx), bool) if labels is None else np.asarray(labels.values, dtype=bool)
    vacuum = np.asarray(cube["vacuum"].values, bool) if "vacuum" in cube.coords else np.zeros((ny, nx), bool)
    bulk = ~flagged & ~vacuum
    bulk_mean = (spectra.reshape(-1, spectra.shape[-1])[_binned_mask(bulk, pixel_bin).ravel()].mean(axis=0)
                 if _binned_mask(bulk, pixel_bin).any() else spectra.reshape(-1, spectra.shape[-1]).mean(axis=0))
    start = np.unravel_index(int(np.nanargmax(np.where(vacuum | ~np.isfinite(values), -np.inf, values))), (ny, nx))

    unit = str(scores.attrs.get("units", "")).strip()
    score_name = "score" + (f" ({unit})" if unit else "")
    maps = figure(title="tap a pixel: its spectrum on the right (red: flagged)", width=420, height=400,
                  match_aspect=True, x_range=(-0.5, nx - 0.5), y_range=(ny - 0.5, -0.5),
                  tools="tap,pan,wheel_zoom,reset", x_axis_label="x (px)", y_axis_label="y (px)")
    finite = values[np.isfinite(values)]
    mapper = LinearColorMapper(palette="Viridis256", low=float(finite.min()) if finite.size else 0.0,
                               high=float(finite.max()) if finite.size else 1.0)
    image = maps.image(image=[values], x=-0.5, y=-0.5, dw=nx, dh=ny, color_mapper=mapper)
    maps.add_tools(HoverTool(renderers=[image], tooltips=[("x, y", "$x{0}, $y{0}"), (score_name, "@image{0.00}")]))
    maps.add_layout(image.construct_color_bar(title=score_name), "right")
    yy, xx = np.nonzero(flagged)
    if yy.size:
        maps.rect(x=xx, y=yy, width=1, height=1, fill_alpha=0, line_color="red", line_width=1.2)
    marker = ColumnDataSource({"x": [int(start[1])], "y": [int(start[0])]}, name="explorer-marker")
    maps.scatter("x", "y", source=marker, marker="circle_cross", size=14, fill_alpha=0, line_color="white",
                 line_width=2)

    binning = "" if max(pixel_bin, channel_bin) == 1 else (
        f" (mean of {pixel_bin}x{pixel_bin} px, {channel_bin} channels summed: the page embeds at most "
        f"{max_values:,} values)")
    units = str(cube.attrs.get("units", "counts"))
    plot = figure(title="", width=560, height=400, tools="pan,wheel_zoom,box_zoom,reset",
                  x_axis_label="energy loss (eV)", y_axis_label=f"{units} per channel{binning and ' bin'}")
    plot.line(energy, bulk_mean, color="grey", line_width=1.5, legend_label="mean of the bulk pixels")
    first_block = (min(start[0] // pixel_bin, spectra.shape[0] - 1), min(start[1] // pixel_bin, spectra.shape[1] - 1))
    spectrum = ColumnDataSource({"energy": energy, "counts": spectra[first_block]}, name="explorer-spectrum")
    plot.line("energy", "counts", source=spectrum, color="#1f77b4", line_width=1.5, legend_label="tapped pixel")
    plot.legend.location = "top_right"
    plot.legend.click_policy = "hide"

    shift = error = np.full((ny, nx), np.nan)
    if quantities is not None and "shift" in quantities:
        shift = np.asarray(quantities["shift"].values, dtype=float)
        error = np.asarray(quantities["shift_error"].values, dtype=float)
    store = ColumnDataSource({"spectra": spectra.ravel()}, name="explorer-spectra")
    pixels = ColumnDataSource({"score": values.ravel(), "flagged": flagged.ravel().astype(np.int8),
                               "shift": shift.ravel(), "error": error.ravel()}, name="explorer-pixels")
    callback = CustomJS(name="explorer-tap", args=dict(
        store=store, pixels=pixels, spectrum=spectrum, marker=marker, title=plot.title, nx=nx, ny=ny,
        bny=spectra.shape[0], bnx=spectra.shape[1], ne=spectra.shape[2], bin=pixel_bin, binning=binning,
        score_name=score_name), code="""
const x = Math.round(cb_obj.x), y = Math.round(cb_obj.y);
if (!(x >= 0 && x < nx && y >= 0 && y < ny)) { return; }
const by = Math.min(Math.floor(y / bin), bny - 1), bx = Math.min(Math.floor(x / bin), bnx - 1);
const start = (by * bnx + bx) * ne;
const all = store.data.spectra;
spectrum.data = {energy: spectrum.data.energy, counts: Array.from(all.slice(start, start + ne))};
marker.data = {x: [x], y: [y]};
const i = y * nx + x, p = pixels.data;
let text = `pixel y=${y}, x=${x}: ${score_name} ${Number(p.score[i]).toFixed(2)}`;
text += p.flagged[i] ? ", flagged" : ", not flagged";
if (Number.isFinite(p.shift[i])) {
  text += `; edge shift ${p.shift[i] >= 0 ? "+" : ""}${p.shift[i].toFixed(3)} +- ${p.error[i].toFixed(3)} eV`;
}
title.text = text + binning;
""")
    maps.js_on_event("tap", callback)
    first = int(start[0]) * nx + int(start[1])
    plot.title.text = (f"pixel y={start[0]}, x={start[1]}: {score_name} {values.ravel()[first]:.2f}, "
                       f"{'flagged' if flagged.ravel()[first] else 'not flagged'}"
                       + (f"; edge shift {shift.ravel()[first]:+.3f} +- {error.ravel()[first]:.3f} eV"
                          if np.isfinite(shift.ravel()[first]) else "") + binning)
    return row(maps, plot)


def _binned_mask(mask: np.ndarray, factor: int) -> np.ndarray:
    """A (y, x) mask on the binned grid: blocks whose pixels all belong (a ragged edge dropped)."""
    if factor == 1:
        return mask
    ny, nx = (mask.shape[0] // factor) * factor, (mask.shape[1] // factor) * factor
    blocks = mask[:ny, :nx].reshape(ny // factor, factor, nx // factor, factor)
    return blocks.all(axis=(1, 3))
