import shutil

import numpy as np
import pytest
from browser import check_in_browser

import eels_ad
from eels_ad import viz
from eels_ad.detect import PCADetector
from eels_ad.stats import compare_regions


@pytest.fixture(scope="module")
def results():
    sim = eels_ad.simulate_fe_l23((24, 24), anomaly_fraction=0.05, shift=1.0, seed=3)
    cube = sim["counts"]
    detector = PCADetector(robust=True).fit(cube)
    scores = detector.score(cube)
    labels = detector.flag(scores)
    return sim, cube, scores, labels, detector.reconstruct(cube)


def score_map_dims(overlay):
    return [d.name for d in list(overlay)[0].kdims]


def test_explore_links_map_and_spectrum(results):
    import holoviews as hv

    sim, cube, scores, labels, recon = results
    layout = viz.explore(cube, scores, recon, labels)
    assert isinstance(layout, hv.Layout) and len(layout) == 3
    spectrum = layout[2]
    spectrum.streams[0].event(x=3.0, y=5.0)  # a tap on pixel (y=5, x=3)
    curves = list(spectrum[()])
    np.testing.assert_allclose(curves[0].dimension_values(1), cube.values[5, 3])
    assert score_map_dims(layout[0]) == ["x", "y"]
    np.testing.assert_allclose(curves[2].dimension_values(1), cube.values[5, 3] - recon.values[5, 3])
    energy_map = layout[1]
    energy_map.streams[0].event(boundsx=(705.0, 712.0))  # a range dragged on the spectrum
    window = energy_map[()]
    np.testing.assert_allclose(window.dimension_values(2, flat=False).sum(),
                               float(cube.eels.total_counts((705.0, 712.0)).sum()))
    assert isinstance(viz.explore(cube), hv.Layout)  # no scores: the total-counts map


def test_explore_shows_the_fitted_shift(results):
    from eels_ad.quantify import edge_shift_map

    sim, cube, scores, labels, recon = results
    shifts = edge_shift_map(cube)
    layout = viz.explore(cube, scores, recon, labels, quantities=shifts)
    assert len(layout) == 4
    spectrum = layout[3]
    iy, ix = np.argwhere(sim["anomaly"].values)[0]
    spectrum.streams[0].event(x=float(cube["x"][ix]), y=float(cube["y"][iy]))
    overlay = spectrum[()]
    expected = float(shifts["shift"][iy, ix])
    assert f"shift {expected:+.3f}" in overlay.opts.get().kwargs["title"]
    model = [c for c in overlay if c.label == "fitted shift model"][0]
    data = cube.values[iy, ix][np.isin(cube["energy"].values, model.dimension_values(0))]
    assert np.corrcoef(model.dimension_values(1), data)[0, 1] > 0.95
    # a tap on the shift map moves the spectrum too
    import holoviews as hv

    shift_tap = [s for s in hv.streams.Stream.registry.get(layout[1], []) if isinstance(s, hv.streams.Tap)][0]
    shift_tap.event(x=float(cube["x"][2]), y=float(cube["y"][4]))
    assert spectrum.streams[0].x == float(cube["x"][2]) and spectrum.streams[0].y == float(cube["y"][4])


def test_report_with_a_shift_map(results):
    import xarray as xr

    from eels_ad.quantify import edge_shift_map

    sim, cube, scores, labels, _ = results
    shifts = edge_shift_map(cube)
    page = viz.report(xr.Dataset({"score": scores, "anomalous": labels}), cube, quantities=shifts)
    assert "edge shift of the flagged pixels +" in page and "per-pixel Poisson fits" in page
    assert "edge shift error (eV)" in page


def test_explore_opens_on_the_most_anomalous_pixel_outside_vacuum(results):
    from eels_ad.prepare import prepare

    _, cube, scores, labels, _ = results
    iy, ix = np.unravel_index(int(np.argmax(scores.values)), scores.shape)
    layout = viz.explore(cube, scores, labels=labels)
    tap = layout[2].streams[0]
    assert (tap.y, tap.x) == (float(cube["y"][iy]), float(cube["x"][ix]))
    dim = cube.copy()
    dim[:, :4] = dim[:, :4] // 50  # vacuum where the scores would be highest
    ready = prepare(dim)
    fake = scores.copy()
    fake[:, :4] = 1e9
    fake.coords["vacuum"] = ready["vacuum"]
    y0, x0 = viz._explore.start_pixel(ready, fake)
    assert x0 >= 4 and not bool(ready["vacuum"].sel(y=y0, x=x0))


def test_report_html_is_offline_and_png_is_written(tmp_path, results):
    sim, cube, scores, labels, _ = results
    table = compare_regions(cube, ~labels, labels)
    layout = viz.report_layout(cube, {"score": scores, "truth": sim["anomaly"].astype(float)}, labels=labels,
                               channel_tests=table)
    html = viz.save_html(layout, tmp_path / "report.html", header_html="<h2>numbers</h2>")
    text = html.read_text()
    import re

    # BokehJS is inlined: no script or stylesheet is fetched from anywhere
    assert re.findall(r"<script[^>]*\bsrc=", text) == []
    assert re.findall(r"<link[^>]*\bhref=[\"']https?:", text) == []
    assert "Bokeh" in text and "numbers" in text
    with pytest.raises(FileExistsError):
        viz.save_html(layout, html)
    png = viz.save_png(viz.report_layout(cube, {"score": scores}, labels=labels), tmp_path / "maps.png")
    assert png.read_bytes()[:4] == b"\x89PNG"


def _require_browser():
    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        pytest.skip("no headless Chromium here (Debian packages chromium and chromium-driver; .ci/run installs them)")
    pytest.importorskip("selenium", reason="selenium is not installed (pip install -e '.[dev]')")


@pytest.mark.slow
def test_report_renders_in_a_real_browser(tmp_path, results):
    sim, cube, scores, labels, _ = results
    layout = viz.report_layout(cube, {"score": scores, "truth": sim["anomaly"].astype(float)}, labels=labels,
                               channel_tests=compare_regions(cube, ~labels, labels))
    header = "<h2>numbers</h2><table><tr><td>1</td></tr></table>"
    html = viz.save_html(layout, tmp_path / "report.html", header_html=header)
    _require_browser()
    screenshot = tmp_path / "report.png"
    errors = check_in_browser(html, screenshot, min_canvases=4)
    assert errors == [], errors
    from PIL import Image

    pixels = np.asarray(Image.open(screenshot).convert("L"), dtype=float)
    assert pixels.std() > 10  # something was drawn, not a blank page


def test_reconstruction_and_grid_figures():
    import holoviews as hv
    import pandas as pd

    sim = eels_ad.simulate_fe_l23((8, 8), anomaly_fraction=0.0, include_expected=True, seed=1)
    layout = viz.reconstruction_hv(sim["counts"], sim["expected"], truth=sim["expected"], pixel=(2, 3))
    assert isinstance(layout, hv.Layout) and len(layout) == 4
    spectra = layout[3]
    np.testing.assert_allclose(spectra["measured"].dimension_values(1), sim["counts"].values[2, 3])
    grid = pd.DataFrame({"detector": ["a", "a", "b", "b"], "dose": [20.0] * 4, "fraction": [0.01] * 4,
                         "shift_eV": [0.5, 1.0, 0.5, 1.0], "f1": [0.1, 0.9, 0.2, 1.0]})
    figure = viz.plot_detection_grid(grid)
    assert isinstance(figure, hv.Layout) and len(figure) == 1


def _a_detection(results):
    import xarray as xr

    sim, cube, scores, labels, _ = results
    return xr.Dataset({"score": scores, "anomalous": labels},
                      attrs={"detector": "PCADetector", "threshold": float(labels.attrs["threshold"])})


def test_report_says_what_how_and_the_answer(tmp_path, results):
    sim, cube, scores, labels, _ = results
    channels = compare_regions(cube, ~labels, labels)
    page = viz.report(_a_detection(results), cube, channels=channels, title="a test report")
    assert "<script src=" not in page and "<link " not in page  # nothing to fetch: BokehJS is inline
    n_flagged = int(labels.sum())
    assert f"{n_flagged} of {cube.sizes['y'] * cube.sizes['x']} pixels flagged" in page
    # the simulated shift is +1 eV: the report's mean edge shift says so
    import re

    shift = float(re.search(r"mean edge shift of the flagged pixels against the bulk ([+-][0-9.]+)", page).group(1))
    assert shift == pytest.approx(float(sim.attrs["shift_eV"]), abs=0.1)
    for words in ("What was analysed", "How", "energy channels differ", "eV per channel", "PCADetector"):
        assert words in page, words
    with pytest.raises(ValueError, match="give the cube"):
        viz.report(_a_detection(results))


@pytest.mark.slow
def test_report_fits_1400_px_in_a_real_browser(tmp_path, results):
    sim, cube, scores, labels, _ = results
    page = viz.report(_a_detection(results), cube, channels=compare_regions(cube, ~labels, labels),
                      maps={"truth": sim["anomaly"].astype(float)})
    path = viz.write_html(page, tmp_path / "report.html")
    _require_browser()
    widths: dict = {}
    errors = check_in_browser(path, tmp_path / "report.png", min_canvases=4, width=1400, widths=widths)
    assert errors == [], errors
    assert widths["scroll"] <= widths["window"], widths  # no horizontal scroll bar at 1400 px


_TAP = """
return (async () => {
  const doc = Bokeh.documents[0];
  await doc.get_model_by_name('explorer-tap').execute({x: 3, y: 5});   // a tap on pixel (y=5, x=3)
  const title = doc.all_models ? [...doc.all_models].find(m => m.text && m.text.startsWith('pixel y=5')) : null;
  return {counts: Array.from(doc.get_model_by_name('explorer-spectrum').data.counts),
          title: title ? title.text : null};
})();
"""


def test_the_report_explorer_shows_the_tapped_pixel_without_a_kernel(tmp_path, results):
    sim, cube, scores, labels, _ = results
    from eels_ad.quantify import edge_shift_map

    shifts = edge_shift_map(cube)
    page = viz.report(_a_detection(results), cube, quantities=shifts)
    assert "explorer-tap" in page and "tap a pixel" in page
    path = viz.write_html(page, tmp_path / "report.html")
    _require_browser()
    answers: dict = {}
    errors = check_in_browser(path, None, min_canvases=4, script=_TAP, answers=answers)
    assert errors == [], errors
    np.testing.assert_allclose(answers["script"]["counts"], cube.values[5, 3], rtol=1e-6)
    title = answers["script"]["title"]
    assert title.startswith("pixel y=5, x=3") and "edge shift" in title and " eV" in title, title
    assert ("not flagged" in title) != bool(labels.values[5, 3])


def test_the_explorer_bins_a_large_cube_to_stay_small():
    from bokeh.embed import components

    cube = eels_ad.simulate_fe_l23((40, 40), anomaly_fraction=0.0, seed=4)["counts"]  # 512,000 values
    scores = cube.sum("energy")
    layout = viz.linked_explorer(cube, scores, max_values=60_000)
    store = next(m for m in layout.references() if getattr(m, "name", None) == "explorer-spectra")
    assert 0 < len(store.data["spectra"]) <= 60_000
    title = next(m for m in layout.references() if type(m).__name__ == "Title" and m.text.startswith("pixel"))
    assert "px" in title.text and "channels summed" in title.text
    components(layout)  # serialises
