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
    # dims of the same name share axes and colour ranges across a layout: `group` keeps figures apart
    suffix = f" ({group.strip('_')})" if group else ""
    kdims = [hv.Dimension(f"x{group}", label=f"x{suffix}"), hv.Dimension(f"y{group}", label=f"y{suffix}")]
    vdim = hv.Dimension(f"{label}{group}", label=label)
    return hv.Image(
        (values["x"].values, values["y"].values, np.asarray(values.values, dtype=float)), kdims, vdim,
    ).opts(cmap=cmap, colorbar=True, title=label, tools=["hover", "tap"], invert_yaxis=True, aspect="equal",
           frame_width=260)


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
