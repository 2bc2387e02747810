# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # eels-ad quick start
#
# Load a spectrum image, find the pixels whose spectra do not fit the bulk, and look at them.
# Runs in well under a minute on a laptop CPU.

# %%
from pathlib import Path

import holoviews as hv

import eels_ad
from eels_ad.detect import PCADetector
from eels_ad.evaluate import detection_metrics
from eels_ad.viz import explore

hv.extension("bokeh")

# %% [markdown]
# ## Load a cube
#
# The sample shipped with eels-ad is a simulated Fe L2,3 spectrum image in which 1 % of the pixels have their Fe edge shifted by +1 eV. Your own data loads the same way: `eels_ad.load('my_si.dm4')` reads .dm3/.dm4, .hspy, .msa, .emd and NetCDF into a labelled `xarray.DataArray` with dims `(y, x, energy)`.

# %%
cube = eels_ad.data.sample_cube()
truth = eels_ad.data.sample_dataset()["anomaly"]
my_file = Path("my_si.dm4")  # put the path of one of your spectrum images here
if my_file.exists():
    cube = eels_ad.load(my_file)  # dark-reference negatives are clipped to 0 and counted in cube.attrs
    truth = None
cube

# %%
print(cube.eels.dispersion, "eV per channel")
cube.eels.crop(700, 730).mean(("y", "x")).plot();

# %% [markdown]
# ## Detect
#
# PCA with Poisson noise normalisation, fitted robustly on the image itself (spectra that do not belong to the bulk are trimmed from the fit).

# %%
detector = PCADetector(robust=True).fit(cube)
scores = detector.score(cube)
labels = detector.flag(scores)
print(detector.n_components_, "components;", int(labels.sum()), "pixels flagged")
if truth is not None:
    print(detection_metrics(scores, truth, labels))

# %% [markdown]
# ## Look
#
# Tap a pixel of the score map to see its spectrum, the PCA reconstruction and the residual; box-select an energy range on the spectrum to redraw the middle map in that window.

# %%
explore(cube, scores, detector.reconstruct(cube), labels)

# %% [markdown]
# Save the results (atomically; existing files are never overwritten unless asked).

# %%
import tempfile

folder = Path(tempfile.mkdtemp())
eels_ad.save(scores.to_dataset(name="score").assign(anomalous=labels), folder / "scores.nc")
sorted(p.name for p in folder.iterdir())
