"""The offline report: a static layout of maps and spectra, saved as self-contained HTML or PNG."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import xarray as xr

from ._common import _counts_dim, _energy_dim, _flagged_points, _holoviews, _image, _vacuum_points
from ._figures import channel_tests_hv
from ._linked import linked_explorer


def report_layout(cube: xr.DataArray, maps: dict[str, xr.DataArray], *, labels: xr.DataArray | None = None,
                  pixels: list[tuple[int, int]] | None = None, channel_tests: xr.Dataset | None = None):
    """A static, self-contained layout for an offline HTML report (no live kernel needed).

    Maps pan and zoom together and show their values on hover, with the flagged pixels outlined.
    One plot holds the mean spectra of the flagged and the bulk pixels (vacuum left out), the energy
    channels that differ (with ``channel_tests``) and the spectra of up to 6 chosen pixels (default:
    the highest-scoring flagged ones); click a legend entry to hide it. Two columns: the page fits
    1400 px.

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
    vacuum = np.asarray(cube["vacuum"].values, bool) if "vacuum" in cube.coords else np.zeros_like(flagged)
    if pixels is None:
        ranking = np.asarray(next(iter(maps.values())).values, float)
        order = np.argsort(np.where(flagged, ranking, -np.inf).ravel())[::-1][: int(min(6, flagged.sum()))]
        pixels = [tuple(int(i) for i in np.unravel_index(flat, flagged.shape)) for flat in order]
    energy = cube["energy"].values
    energy_dim, counts_dim = _energy_dim(hv), _counts_dim(hv, unit=str(cube.attrs.get("units", "counts")))
    curves = {}
    bulk = ~flagged & ~vacuum
    if bulk.any():
        curves["mean of the bulk pixels"] = hv.Curve((energy, cube.eels.mean_spectrum(bulk).values),
                                                     energy_dim, counts_dim)
    if flagged.any():
        curves["mean of the flagged pixels"] = hv.Curve((energy, cube.eels.mean_spectrum(flagged).values),
                                                        energy_dim, counts_dim)
    for y, x in pixels:
        curves[f"pixel y={y}, x={x}"] = hv.Curve((energy, cube.values[y, x]), energy_dim, counts_dim)
    if curves:
        spectra = hv.NdOverlay(curves, kdims="spectrum").opts(
            title="spectra (click the legend to hide one)", frame_width=420, legend_position="right",
            legend_opts={"click_policy": "hide"})
        if channel_tests is not None and flagged.any():
            significant = np.asarray(channel_tests["significant"].values, dtype=bool)
            mean_flagged = cube.eels.mean_spectrum(flagged).sel(energy=channel_tests["energy"]).values
            marks = hv.Scatter((channel_tests["energy"].values[significant], mean_flagged[significant]),
                               energy_dim, counts_dim, label="channels that differ").opts(
                color="red", size=4, marker="triangle")
            spectra = spectra * marks
        panels.append(spectra)
    if channel_tests is not None:
        panels += list(channel_tests_hv(channel_tests))
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
    return write_html(html_page(obj, title=title, header_html=header_html), path, overwrite=overwrite)


_STYLE = """<style>
body { font-family: system-ui, -apple-system, 'Segoe UI', sans-serif; max-width: 1360px; margin: 0 auto;
       padding: 0 16px; color: #222; overflow-wrap: anywhere; }
table { border-collapse: collapse; margin: 8px 0; } td, th { padding: 3px 8px; border: 1px solid #bbb; }
h2 { margin-top: 18px; } p.answer { font-size: 1.15em; font-weight: 600; }
</style>"""


def html_page(obj, *, title: str = "eels-ad", header_html: str = "", extra=None) -> str:
    """The self-contained page of :func:`save_html`, as a string (BokehJS inlined, no CDN).

    ``extra``: a Bokeh model (e.g. :func:`linked_explorer`) placed above the HoloViews figures.
    """
    import html

    from bokeh.embed import components
    from bokeh.layouts import column
    from bokeh.resources import INLINE

    hv = _holoviews()
    model = hv.render(obj, backend="bokeh")
    script, div = components(model if extra is None else column(extra, model))
    bokehjs = "\n".join(f"<script>\n{code}\n</script>" for code in INLINE.js_raw)  # inline code only
    return (
        f"<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
        f"<title>{html.escape(title)}</title>\n{_STYLE}\n{bokehjs}\n</head>\n<body>\n{header_html}\n{div}\n{script}\n"
        "</body>\n</html>\n"
    )


def write_html(page: str, path, *, overwrite: bool = False) -> Path:
    """Write a page atomically (refuses to overwrite unless asked)."""
    from ..io import atomic_path

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


def report(detection: xr.Dataset, cube: xr.DataArray | None = None, *, channels: xr.Dataset | None = None,
           maps: dict[str, xr.DataArray] | None = None, denoising: xr.Dataset | None = None,
           quantities: xr.Dataset | None = None, title: str = "eels-ad report", notes: Sequence[str] = ()) -> str:
    """A report of a detection a microscopist can send to a colleague: one offline HTML page, as a string.

    Top to bottom: what was analysed (file, shape, energy axis, counts, preparation, acquisition
    metadata), how (detector, score, threshold rule and level, eels-ad version), the answer in one
    sentence (pixels flagged; the mean edge shift of the flagged pixels against the bulk, in eV with
    its standard error, from :func:`eels_ad.detect.edge_shift`; the energy channels that differ), then
    the explorer (tap a pixel of the score map: its spectrum beside the bulk's mean, its score, flag and
    shift; the spectra are embedded, so it works in the saved page without a kernel), the maps (score
    with the flagged pixels outlined and vacuum crossed out, any further maps), the spectra (mean of
    the flagged and of the bulk pixels, the significant channels marked, the most anomalous pixels)
    and the channel tests and a denoising, when given.

    Parameters
    ----------
    detection
        ``score`` and ``anomalous`` (y, x), as written by ``eels-ad detect`` or built from
        ``detector.score`` / ``detector.flag``; its ``attrs`` (``source_file``, ``detector``, ``model``,
        ``threshold``, ``preparation``) say where it came from.
    cube
        The spectrum image the detection scored (default: reopened from ``attrs["source_file"]`` and
        prepared as the detection was).
    channels
        A :func:`eels_ad.stats.compare_regions` table of the flagged pixels against the bulk.
    maps
        Further (y, x) maps to show beside the score (title -> map).
    denoising
        ``low_dose`` and ``denoised`` cubes (and optionally ``reference``) for SPIRAL-TAP panels.
    quantities
        A shift map of :func:`eels_ad.quantify.edge_shift_map` (or of ``eels-ad quantify``): its
        shift and error maps (and drift, L3/L2 when there) join the maps, and the answer quotes the
        flagged pixels' shifts from it (per-pixel fits, with their errors) instead of one fit of
        their sum.
    title
        The page title.
    notes
        Further paragraphs for the header.

    Returns
    -------
    str
        The page; write it with :func:`write_html`.
    """
    import html

    from .. import __version__
    from ..detect import edge_shift
    from ._figures import reconstruction_hv

    for name in ("score", "anomalous"):
        if name not in detection:
            raise ValueError(f"the detection has no {name!r} map (variables: {sorted(detection.data_vars)})")
    if cube is None:
        source = detection.attrs.get("source_file")
        if not source:
            raise ValueError("give the cube: the detection does not say which file it scored (attrs['source_file'])")
        import json

        from ..prepare import load_prepared

        cube = load_prepared(source, json.loads(detection.attrs.get("preparation", "null")))
    scores = detection["score"]
    labels = detection["anomalous"].astype(bool)
    flagged = np.asarray(labels.values, dtype=bool)
    vacuum = (np.asarray(cube["vacuum"].values, dtype=bool) if "vacuum" in cube.coords
              else np.zeros(flagged.shape, dtype=bool))
    bulk = ~flagged & ~vacuum
    energy = cube["energy"].values
    dispersion = float(cube.eels.dispersion) if energy.size > 1 else float("nan")
    units = str(cube.attrs.get("units", "counts"))

    # the answer
    n_flagged, n_pixels = int(flagged.sum()), int(flagged.size)
    threshold = detection.attrs.get("threshold", labels.attrs.get("threshold"))
    rule = labels.attrs.get("threshold_method", detection.attrs.get("threshold_method", "auto"))
    answer = f"{n_flagged} of {n_pixels} pixels flagged"
    level = labels.attrs.get("level", detection.attrs.get("level"))
    if rule == "fdr" and level is not None:
        answer += f" at {100 * float(level):g} % false-discovery rate"
        rule_text = f"{100 * float(level):g} % false-discovery rate (Benjamini-Hochberg on calibrated p-values"
        rule_text += (", pooled over neighbourhoods; regions by their peaks)" if scores.attrs.get("spatial") == "pooled"
                      else ")")
    else:
        answer += f" (threshold rule {rule!r}, level {float(threshold):.4g})" if threshold is not None else ""
        rule_text = f"{rule}, {float(threshold):.4g}" if threshold is not None else str(rule)
    shift_text = ""
    if quantities is not None and n_flagged:
        fitted = np.asarray(quantities["shift"].values, dtype=float)[flagged]
        errors = np.asarray(quantities["shift_error"].values, dtype=float)[flagged]
        ok = np.isfinite(fitted) & np.isfinite(errors)
        if ok.any():
            weights = 1.0 / errors[ok] ** 2
            mean = float(np.sum(weights * fitted[ok]) / weights.sum())
            error_of_mean = float(1 / np.sqrt(weights.sum()))
            shift_text = (f"; edge shift of the flagged pixels {mean:+.3g} +- {error_of_mean:.2g} eV (weighted mean; "
                          f"per-pixel Poisson fits, median error {float(np.median(errors[ok])):.2g} eV per pixel"
                          f"{'; drift corrected' if 'drift' in quantities else ''})")
    elif n_flagged and bulk.any():
        spectra = np.asarray(cube.values, dtype=float)
        mean_bulk = spectra[bulk].mean(axis=0)
        chosen = spectra[flagged]
        model = mean_bulk[None, :] * chosen.sum(axis=1, keepdims=True) / max(mean_bulk.sum(), 1e-12)
        shift, _ = edge_shift(chosen, model, iterations=6)
        shift_ev = shift * dispersion
        spread = float(shift_ev.std(ddof=1) / np.sqrt(shift_ev.size)) if shift_ev.size > 1 else float("nan")
        shift_text = (f"; mean edge shift of the flagged pixels against the bulk {float(shift_ev.mean()):+.3g} "
                      f"+- {spread:.2g} eV (standard error over {shift_ev.size} pixels)")
    channel_text = ""
    if channels is not None:
        significant = np.asarray(channels["significant"].values, dtype=bool)
        fdr = channels.attrs.get("fdr", 0.05)
        channel_text = f"; {int(significant.sum())} of {significant.size} energy channels differ at {100 * fdr:g} % FDR"
        if significant.any():
            where = channels["energy"].values[significant]
            channel_text += f" ({where.min():.2f} - {where.max():.2f} eV)"
    sentence = answer + shift_text + channel_text + "."

    analysed = [
        ["file", str(detection.attrs.get("source_file", cube.attrs.get("source_file", "(in memory)")))],
        ["shape", f"{cube.sizes['y']} x {cube.sizes['x']} pixels x {cube.sizes['energy']} channels"],
        ["energy axis", f"{energy[0]:.2f} - {energy[-1]:.2f} eV, {dispersion:.4g} eV per channel"],
        ["counts", f"{float(cube.mean()):.4g} {units} per voxel on average"],
        ["preparation", str(cube.attrs.get("prepared", detection.attrs.get("prepared", "none")))],
    ]
    for key in ("title", "beam_energy_keV", "dwell_time_s", "collection_angle_mrad", "convergence_angle_mrad"):
        if key in cube.attrs:
            analysed.append([key.replace("_", " "), str(cube.attrs[key])])
    how = [
        ["detector", str(detection.attrs.get("detector", scores.attrs.get("detector", "?")))],
        ["score", str(scores.attrs.get("score", "?"))],
        ["threshold", rule_text],
        ["model file", str(detection.attrs.get("model", "(in memory)"))],
        ["eels-ad", __version__],
    ]
    table_html = "".join(
        f"<h3>{html.escape(heading)}</h3><table>" + "".join(
            f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in rows) + "</table>"
        for heading, rows in (("What was analysed", analysed), ("How", how)))
    header = (f"<h1>{html.escape(title)}</h1>\n<p class=\"answer\">{html.escape(sentence)}</p>\n"
              + table_html + "".join(f"<p>{html.escape(p)}</p>" for p in notes))

    # the figures
    all_maps = {"anomaly score": scores, "flagged pixels": labels.astype(float)}
    if quantities is not None:
        all_maps["edge shift (eV)"] = quantities["shift"]
        all_maps["edge shift error (eV)"] = quantities["shift_error"]
        for name, label in (("drift", "energy drift (eV)"), ("l3_l2_ratio", "L3/L2 ratio")):
            if name in quantities:
                all_maps[label] = quantities[name]
    all_maps.update(maps or {})
    layout = report_layout(cube, all_maps, labels=labels, channel_tests=channels)
    if denoising is not None:
        layout = layout + reconstruction_hv(denoising["low_dose"], denoising["denoised"],
                                            truth=denoising.get("reference"))
    explorer = linked_explorer(cube, scores, labels, quantities=quantities)
    return html_page(layout.cols(2), title=title, header_html=header, extra=explorer)
