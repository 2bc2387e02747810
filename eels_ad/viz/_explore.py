"""The linked explorer for a live notebook: tap a pixel, drag an energy range."""

from __future__ import annotations

import numpy as np
import xarray as xr

from ._common import _counts_dim, _energy_dim, _flagged_points, _holoviews, _image, _vacuum_points


def _spectrum_overlay(hv, cube: xr.DataArray, recon: xr.DataArray | None, y, x,
                      quantities: xr.Dataset | None = None):
    spectrum = cube.sel(y=y, x=x, method="nearest")
    energy, counts = _energy_dim(hv), _counts_dim(hv, unit=str(cube.attrs.get("units", "counts")))
    curves = [hv.Curve((cube["energy"].values, spectrum.values), energy, counts, label="spectrum")]
    if recon is not None:
        model = recon.sel(y=y, x=x, method="nearest")
        curves.append(hv.Curve((recon["energy"].values, model.values), energy, counts, label="reconstruction"))
        residual = spectrum.sel(energy=recon["energy"]).values - model.values
        curves.append(hv.Curve((recon["energy"].values, residual), energy, counts, label="residual"))
    title = f"y={float(spectrum['y']):g}, x={float(spectrum['x']):g}"
    if quantities is not None:
        pixel = quantities.sel(y=float(spectrum["y"]), x=float(spectrum["x"]), method="nearest")
        title += f": shift {float(pixel['shift']):+.3f} +- {float(pixel['shift_error']):.3f} eV"
        if "template" in quantities and bool(np.isfinite(pixel["shift"])):
            from ..quantify import shift_model

            model = shift_model(quantities, float(spectrum["y"]), float(spectrum["x"]))
            curves.append(hv.Curve((model["energy"].values, model.values), energy, counts, label="fitted shift model"))
    # framewise: each tapped pixel gets the axis range of its own spectrum (white lines never cut off);
    # the legend sits beside the frame, not on the spectrum
    return hv.Overlay(curves).opts(hv.opts.Curve(framewise=True), hv.opts.Overlay(
        title=title, frame_width=420, legend_position="right", framewise=True))


def start_pixel(cube: xr.DataArray, scores: xr.DataArray | None = None) -> tuple[float, float]:
    """(y, x) coordinates the explorer opens on: the highest score outside vacuum, else the most counts."""
    values = np.asarray((scores if scores is not None else cube.eels.total_counts()).values, dtype=float).copy()
    vacuum = scores.coords.get("vacuum") if scores is not None else cube.coords.get("vacuum")
    if vacuum is not None and not np.all(vacuum.values):
        values[np.asarray(vacuum.values, dtype=bool)] = -np.inf
    values[~np.isfinite(values)] = -np.inf
    iy, ix = np.unravel_index(int(np.argmax(values)), values.shape)
    return float(cube["y"][iy]), float(cube["x"][ix])


def explore(cube: xr.DataArray, scores: xr.DataArray | None = None, recon: xr.DataArray | None = None,
            labels: xr.DataArray | None = None, *, energy_range: tuple[float, float] | None = None,
            quantities: xr.Dataset | None = None):
    """Linked maps and spectra for a notebook (HoloViews, Bokeh backend; needs a live kernel).

    The left map shows the anomaly scores (or total counts when there are none) with the flagged
    pixels outlined and vacuum crossed out (the ``vacuum`` mask of :func:`eels_ad.prepare.prepare`);
    it opens on the most anomalous pixel outside vacuum. Tap a pixel to plot its spectrum with the
    reconstruction and the residual and, with ``quantities``, the fitted edge-shift model and the
    pixel's shift with its error in the title (a shift map joins the maps).
    Drag a range on the spectrum (box-select) to redraw the middle map as counts in that energy
    window.

    Parameters
    ----------
    cube
        The spectrum image.
    scores, recon, labels
        A detector's ``score``, ``reconstruct`` and ``predict`` results (each optional).
    quantities
        A shift map of :func:`eels_ad.quantify.edge_shift_map` (optional).
    energy_range
        Initial ``(e_min, e_max)`` eV of the energy-filtered map (default: the whole axis).

    Returns
    -------
    holoviews.Layout
        Display it in JupyterLab (``hv.extension("bokeh")`` first) or serve it with Panel.

    Examples
    --------
    >>> import eels_ad
    >>> from eels_ad.viz import explore
    >>> layout = explore(eels_ad.data.sample_cube())
    """
    hv = _holoviews()
    base = scores if scores is not None else cube.eels.total_counts()
    label = "anomaly score" if scores is not None else "total counts"
    score_map = _image(hv, base, label) * _flagged_points(hv, labels) * _vacuum_points(hv, base, cube)
    y0, x0 = start_pixel(cube, scores)
    tap = hv.streams.Tap(source=score_map, x=x0, y=y0)
    spectrum = hv.DynamicMap(lambda x, y: _spectrum_overlay(hv, cube, recon, y, x, quantities), streams=[tap]).opts(
        hv.opts.Curve(tools=["xbox_select", "hover"]))
    first, last = energy_range or (float(cube["energy"][0]), float(cube["energy"][-1]))
    window = hv.streams.BoundsX(source=spectrum, boundsx=(first, last))

    def window_map(boundsx):
        low, high = sorted(boundsx) if boundsx else (first, last)
        if high - low < cube.eels.dispersion:
            low, high = first, last
        return _image(hv, cube.eels.total_counts((low, high)), f"counts {low:.1f}-{high:.1f} eV", cmap="magma")

    energy_map = hv.DynamicMap(window_map, streams=[window])
    panels = [score_map, energy_map, spectrum]
    if quantities is not None:
        shift_map = _image(hv, quantities["shift"], "edge shift (eV)") * _flagged_points(hv, labels)
        hv.streams.Tap(source=shift_map).add_subscriber(lambda x, y: tap.event(x=x, y=y) if x is not None else None)
        panels.insert(1, shift_map)
    return hv.Layout(panels).cols(3)
