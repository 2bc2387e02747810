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
# # Which energy channels differ? Negative-binomial tests per channel
#
# Once a region is flagged, test every energy channel of its pixels against the bulk with a negative-binomial model (counts are over-dispersed by gain noise and thickness), with Benjamini-Hochberg false-discovery control.

# %%
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

# %%
detector = PCADetector(robust=True).fit(cube)
labels = detector.predict(cube)
print(int(labels.sum()), "pixels flagged,", int(sim["anomaly"].sum()), "injected along a grain boundary")

# %% [markdown]
# Size factors come from the pre-edge background (670-700 eV), which an edge shift leaves alone.

# %%
table = compare_regions(cube, ~labels, labels, method="mom", normalize_range=(670.0, 700.0))
significant = table["energy"].values[table["significant"].values]
print(len(significant), "channels differ at 5 % FDR, from", significant.min(), "to", significant.max(), "eV")
plot_channel_tests(table, title="grain boundary (B) against the bulk (A)");

# %%
channel_tests_hv(table)

# %% [markdown]
# The maximum-likelihood fit gives the same picture, with likelihood-ratio tests:

# %%
table_mle = compare_regions(cube, ~labels, labels, method="mle", test="lrt", normalize_range=(670.0, 700.0))
int(table_mle["significant"].sum()), int(table["significant"].sum())

# %% [markdown]
# `nb_test` works on any count table (features x samples), vectorised over all features at once:

# %%
import numpy as np

rng = np.random.default_rng(0)
counts = rng.negative_binomial(5, 5 / (5 + np.r_[[50.0] * 5, [80.0] * 5]), size=(10_000, 10))
result = nb_test(counts, np.r_[[0] * 5, [1] * 5], method="mom")
result.head()
