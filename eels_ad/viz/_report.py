"""The offline report: a static layout of maps and spectra, saved as self-contained HTML or PNG."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import xarray as xr

from ._common import _flagged_points, _holoviews, _image, _vacuum_points
from ._figures import channel_tests_hv


def report_layout(cube: xr.DataArray, maps: dict[str, xr.DataArray], *, labels: xr.DataArray | None = None,
                  pixels: list[tuple[int, int]] | None = None, channel_tests: xr.Dataset | None = None):
    """A static, self-contained layout for an offline HTML report (no live kernel needed).

    Maps pan and zoom together and show their values on hover, with the flagged pixels outlined.
    One plot holds the mean spectra of the flagged and the other pixels and the spectra of up to 8
    chosen pixels (default: the highest-scoring flagged ones); click a legend entry to hide it.

    Parameters
    ----------
    cube
        The spectrum image.
    maps
        Title -> (y, x) map (scores, labels, truth ...); the first one ranks the pixels.
    labels
        Flagged pixels, outlined on every map.
    pixels
        (y index, x index) of pixels whose spectra are drawn.
    channel_tests
        A :func:`~eels_ad.stats.compare_regions` result to add.

    Put the numbers above it with :func:`save_html`'s ``header_html``.
    """
    hv = _holoviews()
    outline = _flagged_points(hv, labels)
    panels = [_image(hv, values, title) * outline * _vacuum_points(hv, values, cube) for title, values in maps.items()]
    flagged = np.zeros(cube.shape[:2], bool) if labels is None else np.asarray(labels.values, bool)
    if pixels is None:
        ranking = np.asarray(next(iter(maps.values())).values, float)
        order = np.argsort(np.where(flagged, ranking, -np.inf).ravel())[::-1][: int(min(8, flagged.sum()))]
        pixels = [tuple(int(i) for i in np.unravel_index(flat, flagged.shape)) for flat in order]
    energy = cube["energy"].values
    curves = {}
    if (~flagged).any():
        curves["mean of the other pixels"] = hv.Curve((energy, cube.eels.mean_spectrum(~flagged).values),
                                                      "energy", "counts")
    if flagged.any():
        curves["mean of the flagged pixels"] = hv.Curve((energy, cube.eels.mean_spectrum(flagged).values),
                                                        "energy", "counts")
    for y, x in pixels:
        curves[f"pixel y={y}, x={x}"] = hv.Curve((energy, cube.values[y, x]), "energy", "counts")
    if curves:
        panels.append(hv.NdOverlay(curves, kdims="spectrum").opts(
            title="spectra (click the legend to hide one)", frame_width=420, legend_position="right",
            legend_opts={"click_policy": "hide"}))
    if channel_tests is not None:
        panels += list(channel_tests_hv(channel_tests))
    return hv.Layout(panels).cols(3)


def save_html(obj, path, *, overwrite: bool = False, title: str = "eels-ad", header_html: str = "") -> Path:
    """Save a HoloViews object as one self-contained HTML file that works offline.

    ``header_html`` (text, tables: the numbers) goes above the figures, as plain HTML: HoloViews'
    ``Div`` would need Panel's JavaScript.

    The object is rendered to a Bokeh model and embedded (``bokeh.embed.components``) in a page that
    inlines BokehJS itself. ``hv.save`` and ``bokeh.embed.file_html`` would also pull in what Panel
    registers (a favicon and a stylesheet from a CDN, a module shim by relative path), which an
    offline microscope workstation cannot load.
    """
    import html

    from bokeh.embed import components
    from bokeh.resources import INLINE

    from ..io import atomic_path

    hv = _holoviews()
    script, div = components(hv.render(obj, backend="bokeh"))
    bokehjs = "\n".join(f"<script>\n{code}\n</script>" for code in INLINE.js_raw)  # inline code only
    page = (
        f"<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        f"<title>{html.escape(title)}</title>\n{bokehjs}\n</head>\n<body>\n{header_html}\n{div}\n{script}\n"
        "</body>\n</html>\n"
    )
    with atomic_path(path, overwrite=overwrite) as temporary:
        temporary.write_text(page, encoding="utf-8")
    return Path(path)


def save_png(obj, path, *, overwrite: bool = False, dpi: int = 110) -> Path:
    """Save a HoloViews object as a static PNG through the matplotlib backend (no browser needed)."""
    import holoviews as hv
    import holoviews.plotting.mpl  # noqa: F401  (registers the backend)
    import matplotlib

    from ..io import atomic_path

    matplotlib.use("Agg")
    with atomic_path(path, overwrite=overwrite) as temporary:
        target = temporary.with_suffix(".png")
        hv.save(obj, target, backend="matplotlib", fmt="png", dpi=dpi)
        target.replace(temporary)
    return Path(path)


def html_summary(title: str, paragraphs: Sequence[str] = (), *, columns: Sequence[str] = (),
                 rows: Sequence[Sequence[object]] = (), number_format: str = "{:.3f}") -> str:
    """The numbers above a report's figures, as escaped HTML (for :func:`save_html`'s ``header_html``).

    Parameters
    ----------
    title
        The heading.
    paragraphs
        Plain-text paragraphs, after the table.
    columns, rows
        A table: column names and one sequence of values per row; floats are written with
        ``number_format``.

    Returns
    -------
    str

    Examples
    --------
    >>> print(html_summary("demo", ["2 < 3 pixels flagged."], columns=["detector", "F1"], rows=[["PCA", 0.5]]))
    <h2>demo</h2>
    <table border="1" cellpadding="4"><tr><th>detector</th><th>F1</th></tr><tr><td>PCA</td><td>0.500</td></tr></table>
    <p>2 &lt; 3 pixels flagged.</p>
    """
    import html

    def cell(value: object) -> str:
        text = number_format.format(value) if isinstance(value, float) else str(value)
        return html.escape(text)

    parts = [f"<h2>{html.escape(title)}</h2>"]
    if columns:
        header = "".join(f"<th>{html.escape(str(c))}</th>" for c in columns)
        body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in row) + "</tr>" for row in rows)
        parts.append(f'<table border="1" cellpadding="4"><tr>{header}</tr>{body}</table>')
    parts += [f"<p>{html.escape(p)}</p>" for p in paragraphs]
    return "\n".join(parts)
