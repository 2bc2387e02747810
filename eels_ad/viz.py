"""Figures: static (matplotlib) and interactive (HoloViews/Bokeh).

Imported lazily: ``import eels_ad`` does not load matplotlib or HoloViews.
"""

from __future__ import annotations

from pathlib import Path

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
    """HoloViews with the Bokeh backend loaded (a notebook's own ``hv.extension`` choice is kept)."""
    import holoviews as hv

    if "bokeh" not in hv.Store.renderers or hv.Store.current_backend not in hv.Store.renderers:
        hv.extension("bokeh", logo=False)
    return hv


def channel_tests_hv(table: xr.Dataset):
    """The same three panels as :func:`plot_channel_tests`, as a linked HoloViews layout (Bokeh)."""
    hv = _holoviews()

    energy = table["energy"].values
    spectra = hv.Overlay([
        hv.Curve((energy, table["mean_a"].values), "energy", "counts", label="A (reference)"),
        hv.Curve((energy, table["mean_b"].values), "energy", "counts", label="B"),
    ]).opts(title="mean spectra (size-normalised)", frame_width=320)
    lfc = hv.Curve((energy, table["log_fold_change"].values), "energy", "log fold change")
    significant = np.asarray(table["significant"].values, dtype=bool)
    points = hv.Scatter((energy[significant], table["log_fold_change"].values[significant]), "energy",
                        "log fold change", label="significant")
    strength = hv.Curve((energy, _q_strength(table)), "energy", "-log10 q")
    threshold = hv.HLine(-np.log10(table.attrs.get("fdr", 0.05)))
    return (spectra + (lfc * points).opts(title="log fold change (B over A)", frame_width=320)
            + (strength * threshold).opts(title="-log10 q (dashed: the FDR)", frame_width=320)).cols(1)


# ---- maps and spectra ---------------------------------------------------------------------------

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


def _spectrum_overlay(hv, cube: xr.DataArray, recon: xr.DataArray | None, y, x):
    spectrum = cube.sel(y=y, x=x, method="nearest")
    curves = [hv.Curve((cube["energy"].values, spectrum.values), "energy", "counts", label="spectrum")]
    if recon is not None:
        model = recon.sel(y=y, x=x, method="nearest")
        curves.append(hv.Curve((recon["energy"].values, model.values), "energy", "counts", label="reconstruction"))
        residual = spectrum.sel(energy=recon["energy"]).values - model.values
        curves.append(hv.Curve((recon["energy"].values, residual), "energy", "counts", label="residual"))
    title = f"y={float(spectrum['y']):g}, x={float(spectrum['x']):g}"
    return hv.Overlay(curves).opts(title=title, frame_width=420, legend_position="top_left")


def explore(cube: xr.DataArray, scores: xr.DataArray | None = None, recon: xr.DataArray | None = None,
            labels: xr.DataArray | None = None, *, energy_window: tuple[float, float] | None = None):
    """Linked maps and spectra for a notebook (HoloViews, Bokeh backend; needs a live kernel).

    The left map shows the anomaly scores (or total counts when there are none) with the flagged
    pixels outlined; tap a pixel to plot its spectrum with the reconstruction and the residual.
    Drag a range on the spectrum (box-select) to redraw the middle map as counts in that energy
    window.

    Parameters
    ----------
    cube
        The spectrum image.
    scores, recon, labels
        A detector's ``score``, ``reconstruct`` and ``predict`` results (each optional).
    energy_window
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
    score_map = _image(hv, base, label) * _flagged_points(hv, labels)
    tap = hv.streams.Tap(source=score_map, x=float(cube["x"][0]), y=float(cube["y"][0]))
    spectrum = hv.DynamicMap(lambda x, y: _spectrum_overlay(hv, cube, recon, y, x), streams=[tap]).opts(
        hv.opts.Curve(tools=["xbox_select", "hover"]))
    first, last = energy_window or (float(cube["energy"][0]), float(cube["energy"][-1]))
    window = hv.streams.BoundsX(source=spectrum, boundsx=(first, last))

    def window_map(boundsx):
        low, high = sorted(boundsx) if boundsx else (first, last)
        if high - low < cube.eels.dispersion:
            low, high = first, last
        return _image(hv, cube.eels.total_counts((low, high)), f"counts {low:.1f}-{high:.1f} eV", cmap="magma")

    energy_map = hv.DynamicMap(window_map, streams=[window])
    return (score_map + energy_map + spectrum).cols(3)


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
    panels = [_image(hv, values, title) * outline for title, values in maps.items()]
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


# ---- other results ------------------------------------------------------------------------------

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

    from .io import atomic_path

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

    from .io import atomic_path

    matplotlib.use("Agg")
    with atomic_path(path, overwrite=overwrite) as temporary:
        target = temporary.with_suffix(".png")
        hv.save(obj, target, backend="matplotlib", fmt="png", dpi=dpi)
        target.replace(temporary)
    return Path(path)


def reconstruction_hv(before: xr.DataArray, after: xr.DataArray, *, truth: xr.DataArray | None = None,
                      energy_window: tuple[float, float] | None = None, pixel: tuple[int, int] | None = None):
    """SPIRAL-TAP before/after: energy-window maps side by side and one pixel's spectra (HoloViews).

    Parameters
    ----------
    before, after
        The measured cube and its reconstruction.
    truth
        The noise-free cube, when known (simulations), or another reference; labelled "reference".
    energy_window
        ``(e_min, e_max)`` eV of the maps (default: the whole axis).
    pixel
        (y index, x index) of the spectra (default: the centre).
    """
    hv = _holoviews()
    window = energy_window or (float(before["energy"][0]), float(before["energy"][-1]))
    group = "_reconstruction"
    panels = [_image(hv, before.eels.total_counts(window), "measured", group=group),
              _image(hv, after.eels.total_counts(window), "reconstructed", group=group)]
    if truth is not None:
        panels.append(_image(hv, truth.eels.total_counts(window), "reference", group=group))
    y, x = pixel or (before.sizes["y"] // 2, before.sizes["x"] // 2)
    energy = before["energy"].values
    energy_dim = hv.Dimension("energy" + group, label="energy (reconstruction)")
    counts_dim = hv.Dimension("counts" + group, label="counts (reconstruction)")
    curves = {"measured": hv.Curve((energy, before.values[y, x]), energy_dim, counts_dim),
              "reconstructed": hv.Curve((energy, after.values[y, x]), energy_dim, counts_dim)}
    if truth is not None:
        curves["reference"] = hv.Curve((energy, truth.values[y, x]), energy_dim, counts_dim)
    panels.append(hv.NdOverlay(curves, kdims="spectrum").opts(title=f"pixel y={y}, x={x}", frame_width=420))
    return hv.Layout(panels).cols(2)


_COUNT_CANVASES = """
function count(root) {
  let n = root.querySelectorAll('canvas').length;
  for (const element of root.querySelectorAll('*')) { if (element.shadowRoot) n += count(element.shadowRoot); }
  return n;
}
return count(document);
"""


def check_in_browser(path, screenshot=None, *, min_canvases: int = 1, width: int = 1400, height: int = 1800,
                     timeout: float = 60.0, chromium: str = "/usr/bin/chromium",
                     chromedriver: str = "/usr/bin/chromedriver") -> list[str]:
    """Open a saved HTML file in headless Chromium, wait until Bokeh has drawn, return the console errors.

    Needs selenium and Debian's ``chromium`` and ``chromium-driver``. Bokeh draws into canvases inside
    shadow roots; the page counts as rendered when at least ``min_canvases`` exist.

    Parameters
    ----------
    path
        The HTML file.
    screenshot
        Where to save a PNG screenshot (optional).

    Returns
    -------
    list of str
        The SEVERE messages of the browser console (empty when the page is clean).
    """
    import time as _time

    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    for argument in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                     f"--window-size={width},{height}", "--hide-scrollbars"):
        options.add_argument(argument)
    options.binary_location = chromium
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    browser = webdriver.Chrome(service=Service(chromedriver), options=options)
    try:
        browser.get(Path(path).resolve().as_uri())
        WebDriverWait(browser, timeout).until(lambda b: b.execute_script(_COUNT_CANVASES) >= min_canvases)
        _time.sleep(0.5)
        if screenshot is not None:
            browser.save_screenshot(str(screenshot))
        return [entry["message"] for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
    finally:
        browser.quit()
