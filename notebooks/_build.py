"""Write the notebooks from the cells below (without outputs). Run: python notebooks/_build.py"""

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent


def write(name: str, cells: list) -> None:
    notebook = new_notebook(cells=[
        new_markdown_cell(cell[3:]) if cell.startswith("md:") else new_code_cell(cell.strip()) for cell in cells
    ])
    for number, cell in enumerate(notebook.cells):  # stable ids: a rebuild changes only what changed
        cell.id = f"cell-{number:02d}"
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(notebook, HERE / name)


write("01_quickstart.ipynb", [
    "md:# eels-ad quick start\n\nLoad a spectrum image, find the pixels whose spectra do not fit the bulk, "
    "and look at them.\nRuns in well under a minute on a laptop CPU.",
    """
from pathlib import Path

import holoviews as hv

import eels_ad
from eels_ad.detect import PCADetector
from eels_ad.evaluate import detection_metrics
from eels_ad.viz import explore

hv.extension("bokeh")
""",
    "md:## Load a cube\n\nThe sample shipped with eels-ad is a simulated Fe L2,3 spectrum image in which 1 % of the "
    "pixels have their Fe edge shifted by +1 eV. Your own data loads the same way: `eels_ad.load('my_si.dm4')` "
    "reads .dm3/.dm4, .hspy, .msa, .emd and NetCDF into a labelled `xarray.DataArray` with dims `(y, x, energy)`.",
    """
cube = eels_ad.data.sample_cube()
truth = eels_ad.data.sample_dataset()["anomaly"]
my_file = Path("my_si.dm4")  # put the path of one of your spectrum images here
if my_file.exists():
    cube = eels_ad.load(my_file)  # dark-reference negatives are clipped to 0 and counted in cube.attrs
    truth = None
cube
""",
    """
print(cube.eels.dispersion, "eV per channel")
cube.eels.crop(700, 730).mean(("y", "x")).plot();
""",
    "md:## Detect\n\nPCA with Poisson noise normalisation, fitted robustly on the image itself (spectra that do not "
    "belong to the bulk are trimmed from the fit).",
    """
detector = PCADetector(robust=True).fit(cube)
scores = detector.score(cube)
labels = detector.flag(scores)
print(detector.n_components_, "components;", int(labels.sum()), "pixels flagged")
if truth is not None:
    print(detection_metrics(scores, truth, labels))
""",
    "md:## Look\n\nTap a pixel of the score map to see its spectrum, the PCA reconstruction and the residual; "
    "box-select an energy range on the spectrum to redraw the middle map in that window.",
    "explore(cube, scores, detector.reconstruct(cube), labels)",
    "md:Save the results (atomically; existing files are never overwritten unless asked).",
    """
import tempfile

folder = Path(tempfile.mkdtemp())
eels_ad.save(scores.to_dataset(name="score").assign(anomalous=labels), folder / "scores.nc")
sorted(p.name for p in folder.iterdir())
""",
])

write("02_cvae_vs_pca.ipynb", [
    "md:# 3D-CVAE against PCA on shifted Fe L2,3 edges\n\nA 3D convolutional VAE trained on bulk patches "
    "(Sultanov, Buban & Klie, arXiv:2412.16200) next to the PCA baseline. The defaults are small so that it runs "
    "in a couple of minutes on a laptop CPU; scale `SIZE` and `EPOCHS` up for real comparisons.",
    """
SIZE = 32      # pixels per side of the simulated cubes
EPOCHS = 6     # CVAE training epochs (25 by default in CVAEDetector)
SHIFT = 0.5    # Fe edge shift of the anomalies, eV
DOSE = 20.0    # counts per channel before the edge (20: low dose)
""",
    """
import matplotlib.pyplot as plt
import numpy as np

import eels_ad
from eels_ad.detect import CVAEDetector, PCADetector, bimodality
from eels_ad.evaluate import detection_metrics

bulk = eels_ad.simulate_fe_l23((SIZE, SIZE), dose=DOSE, anomaly_fraction=0.0, seed=1)["counts"]
test = eels_ad.simulate_fe_l23((SIZE, SIZE), dose=DOSE, anomaly_fraction=0.03, shift=SHIFT, layout="clusters",
                               seed=2)
""",
    """
pca = PCADetector().fit(bulk)
cvae = CVAEDetector(max_epochs=EPOCHS, progress=False, seed=0).fit(bulk)
print(f"CVAE: {cvae.n_parameters_} parameters, {cvae.training_seconds_:.0f} s of training")
""",
    """
results = {}
for name, detector in (("PCA", pca), ("3D-CVAE", cvae)):
    scores = detector.score(test["counts"])
    labels = detector.flag(scores)
    results[name] = scores
    metrics = detection_metrics(scores, test["anomaly"], labels)
    print(f"{name:8s} AUC {metrics['roc_auc']:.3f}  F1 {metrics['f1']:.3f}  "
          f"Ashman's D {bimodality(scores)['ashman_d']:.1f}")
""",
    "md:Score histograms: bulk pixels against the injected anomalies (a clean gap is the bimodal separation).",
    """
fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
truth = test["anomaly"].values
for ax, (name, scores) in zip(axes, results.items(), strict=True):
    values = scores.values
    bins = np.linspace(values.min(), values.max(), 60)
    ax.hist(values[~truth], bins, alpha=0.6, label="bulk")
    ax.hist(values[truth], bins, alpha=0.6, label="anomalies")
    ax.set_yscale("log"); ax.set_title(name); ax.set_xlabel("score"); ax.legend()
fig.tight_layout()
""",
    """
fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
test["anomaly"].plot(ax=axes[0], add_colorbar=False); axes[0].set_title("truth")
results["PCA"].plot(ax=axes[1]); axes[1].set_title("PCA score")
results["3D-CVAE"].plot(ax=axes[2]); axes[2].set_title("3D-CVAE score")
for ax in axes:
    ax.invert_yaxis()
fig.tight_layout()
""",
])

write("04_negative_binomial.ipynb", [
    "md:# Which energy channels differ? Negative-binomial tests per channel\n\nOnce a region is flagged, test "
    "every energy channel of its pixels against the bulk with a negative-binomial model (counts are over-dispersed "
    "by gain noise and thickness), with Benjamini-Hochberg false-discovery control.",
    """
SIZE = 48
SHIFT = 1.0

import holoviews as hv

import eels_ad
from eels_ad.detect import PCADetector
from eels_ad.stats import compare_regions, nb_test
from eels_ad.viz import channel_tests_hv, plot_channel_tests

hv.extension("bokeh")
sim = eels_ad.simulate_fe_l23((SIZE, SIZE), anomaly_fraction=0.05, layout="line", shift=SHIFT,
                              overdispersion=0.01, seed=4)
cube = sim["counts"]
""",
    """
detector = PCADetector(robust=True).fit(cube)
labels = detector.predict(cube)
print(int(labels.sum()), "pixels flagged,", int(sim["anomaly"].sum()), "injected along a grain boundary")
""",
    "md:Size factors come from the pre-edge background (670-700 eV), which an edge shift leaves alone.",
    """
table = compare_regions(cube, ~labels, labels, method="mom", normalize_range=(670.0, 700.0))
significant = table["energy"].values[table["significant"].values]
print(len(significant), "channels differ at 5 % FDR, from", significant.min(), "to", significant.max(), "eV")
plot_channel_tests(table, title="grain boundary (B) against the bulk (A)");
""",
    "channel_tests_hv(table)",
    "md:The maximum-likelihood fit gives the same picture, with likelihood-ratio tests:",
    """
table_mle = compare_regions(cube, ~labels, labels, method="mle", test="lrt", normalize_range=(670.0, 700.0))
int(table_mle["significant"].sum()), int(table["significant"].sum())
""",
    "md:`nb_test` works on any count table (features x samples), vectorised over all features at once:",
    """
import numpy as np

rng = np.random.default_rng(0)
counts = rng.negative_binomial(5, 5 / (5 + np.r_[[50.0] * 5, [80.0] * 5]), size=(10_000, 10))
result = nb_test(counts, np.r_[[0] * 5, [1] * 5], method="mom")
result.head()
""",
])

write("03_spiral_tap.ipynb", [
    "md:# SPIRAL-TAP: Poisson reconstruction of low-dose and sub-sampled spectrum images\n\n"
    "Electron counts are Poisson. SPIRAL-TAP (Harmany, Marcia & Willett, IEEE TIP 2012) minimises the Poisson "
    "negative log-likelihood plus a sparsity penalty; here 3-D total variation with a weaker spectral weight.",
    """
SIZE = 24      # pixels per side
DOSE = 2.0     # counts per channel before the edge: very low dose
TAU = 3.0      # regularisation weight; tau="auto" (denoise_cube's default) chooses it from the data by Poisson
               # thinning, at the cost of 7 more reconstructions of half the counts

import holoviews as hv
import numpy as np

import eels_ad
from eels_ad.reconstruct import denoise_cube
from eels_ad.viz import reconstruction_hv

hv.extension("bokeh")
sim = eels_ad.simulate_fe_l23((SIZE, SIZE), dose=DOSE, anomaly_fraction=0.0, include_expected=True, seed=3)
counts, truth = sim["counts"], sim["expected"]


def relative_error(estimate):
    return float(np.linalg.norm(np.asarray(estimate) - truth.values) / np.linalg.norm(truth.values))


print(f"raw counts: relative error {relative_error(counts):.3f}")
""",
    "md:## Denoising (A = identity)",
    """
clean = denoise_cube(counts, penalty="tv", tau=TAU, weights=(1.0, 1.0, 0.5), truth=truth)
print(f"SPIRAL-TV (tau {clean.attrs['tau']:.2f}): relative error {clean.attrs['relative_error']:.3f} "
      f"in {clean.attrs['iterations']} iterations, {clean.attrs['seconds']:.1f} s")
reconstruction_hv(counts, clean, truth=truth, energy_range=(705, 712))
""",
    "md:## A 25 % random scan\n\nOnly a quarter of the pixels were visited; the reconstruction starts from the "
    "nearest visited neighbour and fills the rest.",
    """
visited = np.random.default_rng(0).random((SIZE, SIZE)) < 0.25
scan = sim["counts"].where(visited[..., None], 0)
filled = denoise_cube(scan, penalty="tv", tau=TAU, visited=visited, truth=truth)
print(f"25 % scan (tau {filled.attrs['tau']:.2f}): relative error {filled.attrs['relative_error']:.3f}")
reconstruction_hv(scan, filled, truth=truth, energy_range=(705, 712))
""",
])
