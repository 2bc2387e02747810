"""HoloViews helpers shared by the figures, the explorer and the report."""

from __future__ import annotations

import numpy as np
import xarray as xr


def _holoviews():
    """HoloViews with the Bokeh backend loaded (a notebook's own ``hv.extension`` choice is kept)."""
    import holoviews as hv

    if "bokeh" not in hv.Store.renderers or hv.Store.current_backend not in hv.Store.renderers:
        hv.extension("bokeh", logo=False)
    return hv


def _image(hv, values: xr.DataArray, label: str, cmap: str = "viridis", group: str = ""):
    # dims of the same label share axes and colour ranges across a layout: `group` keeps figures apart
    kdims = [hv.Dimension(f"{dim}{group}", label=_grouped(dim, group), unit=str(values[dim].attrs.get("units", "px")))
             for dim in ("x", "y")]
    vdim = hv.Dimension(f"{label}{group}", label=label)
    data = np.asarray(values.values, dtype=float)
    options = {}
    finite = data[np.isfinite(data)]
    if values.attrs.get("units") == "eV" and finite.size and finite.min() < 0 < finite.max():
        # a signed energy (shift, drift): a diverging map centred on 0
        reach = float(np.max(np.abs(np.percentile(finite, [1, 99])))) or float(np.max(np.abs(finite)))
        cmap, options = "RdBu_r", {"clim": (-reach, reach)}
    return hv.Image((values["x"].values, values["y"].values, data), kdims, vdim).opts(
        cmap=cmap, colorbar=True, colorbar_opts={"title": label}, title=label, tools=["hover", "tap"],
        invert_yaxis=True, aspect="equal", frame_width=240, **options)


def _grouped(label: str, group: str) -> str:
    """A label of a figure set apart (e.g. ``group="_denoised region"``): 'x, denoised region'."""
    return f"{label}, {group.strip('_')}" if group else label


def _energy_dim(hv, group: str = ""):
    """The energy axis of every spectrum plot: 'energy loss (eV)'."""
    return hv.Dimension(f"energy{group}", label=_grouped("energy loss", group), unit="eV")


def _counts_dim(hv, group: str = "", unit: str = "counts"):
    """The counts axis of every spectrum plot."""
    return hv.Dimension(f"counts{group}", label=_grouped(unit, group))


def _flagged_points(hv, labels: xr.DataArray | None):
    if labels is None:
        return hv.Points([], ["x", "y"])
    yy, xx = np.nonzero(np.asarray(labels.values, dtype=bool))
    return hv.Points((labels["x"].values[xx], labels["y"].values[yy]), ["x", "y"], label="flagged").opts(
        marker="square", size=6, fill_alpha=0, line_color="red", line_width=1.5, show_legend=False)


def _vacuum_points(hv, values: xr.DataArray, cube: xr.DataArray | None = None):
    """Grey crosses on the pixels marked vacuum (the coordinate ``vacuum`` of the map or the cube)."""
    vacuum = values.coords.get("vacuum")
    if vacuum is None and cube is not None:
        vacuum = cube.coords.get("vacuum")
    if vacuum is None or not np.any(vacuum.values):
        return hv.Points([], ["x", "y"])
    yy, xx = np.nonzero(np.asarray(vacuum.values, dtype=bool))
    return hv.Points((values["x"].values[xx], values["y"].values[yy]), ["x", "y"], label="vacuum").opts(
        marker="x", size=5, color="0.6", show_legend=False)
