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
# # By how many eV did the edge move? Chemical-shift maps with error bars, and energy drift
#
# Detection says *where*; this notebook answers *how much*. `eels_ad.quantify.edge_shift_map` fits the bulk
# spectrum, moved in energy, to every pixel by Poisson maximum likelihood and reports the shift with its
# Cramer-Rao error bar. Real spectrum images drift in energy during the scan by as much as the chemical shifts
# we look for, so the drift has to come out first: from the zero-loss peak of a low-loss image recorded with
# the core loss (dual EELS), or, without one, by separating a drift that is smooth in scan time from local
# shifts.

# %%
SIZE = 48

import os
from pathlib import Path

import holoviews as hv
import matplotlib.pyplot as plt
import numpy as np

import eels_ad
from eels_ad.prepare import prepare, zero_loss_drift
from eels_ad.quantify import edge_shift_map, separate_drift, white_line_ratio_map

hv.extension("bokeh")
sim = eels_ad.simulate_fe_l23((SIZE, SIZE), shift=0.3, layout="clusters", anomaly_fraction=0.05, drift=1.5,
                              row_jitter=0.05, low_loss=True, spikes=1e-4, seed=5)
print(f"drift {float(sim['drift'].min()):+.2f} to {float(sim['drift'].max()):+.2f} eV; local shifts +0.3 eV in "
      f"{int(sim['anomaly'].sum())} pixels; {int(sim['spike'].sum())} X-ray spikes")

# %% [markdown]
# Without a correction, the shift map shows the drift: the local +0.3 eV blobs drown in it.

# %%
cube = prepare(sim["counts"])  # gain, X-ray spikes repaired, vacuum marked
raw_shifts = edge_shift_map(cube, max_shift=2.5)
fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
for ax, (title, image) in zip(axes, [("true drift (eV)", sim["drift"]), ("measured shift, uncorrected (eV)",
                                     raw_shifts["shift"]), ("true local shift (eV)", sim["shift"])], strict=True):
    image.plot(ax=ax, cmap="RdBu_r", center=0)
    ax.set_title(title)
    ax.set_aspect("equal")
fig.tight_layout()

# %% [markdown]
# ## With a low-loss image: the drift from the zero-loss peak
#
# `zero_loss_drift` fits the top of the zero-loss peak in every pixel (sub-channel). Passing it as `drift=`
# moves the *model* of each pixel by its drift; the counts are never resampled.

# %%
drift = zero_loss_drift(sim["low_loss"])
error = drift["drift"] - sim["drift"]
print(f"zero-loss drift: RMS error {float(np.sqrt((error ** 2).mean())):.4f} eV")
shifts = edge_shift_map(cube, drift=drift, max_shift=1.0)
blobs = sim["anomaly"]
print(f"local shift of the blobs {float(shifts['shift'].where(blobs).mean()):+.3f} eV, of the bulk "
      f"{float(shifts['shift'].where(~blobs).mean()):+.4f} +- {float(shifts['shift_error'].mean()):.3f} eV per pixel")
coverage = float((abs(shifts["shift"] - sim["shift"]) < shifts["shift_error"]).mean())
print(f"the 1-sigma error bars cover the truth in {100 * coverage:.0f} % of the pixels")

# %% [markdown]
# ## Without a low-loss image: drift and local shifts apart
#
# An instrument drift follows the acquisition (smooth in time, perhaps a jump per row); a chemical shift is
# local. `separate_drift` fits the first robustly and leaves the second. Fitting twice builds the template from
# the aligned bulk.

# %%
first = edge_shift_map(cube, max_shift=2.5)
parts = separate_drift(edge_shift_map(cube, drift=separate_drift(first)["drift"], max_shift=1.0))
offset = (parts["drift"] - sim["drift"]).values
print(f"separated drift: RMS error {np.sqrt(np.mean((offset - offset.mean()) ** 2)):.4f} eV "
      f"(plus a constant {offset.mean():+.3f} eV: without a zero-loss peak there is no absolute energy)")
fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
for ax, (title, image, cmap) in zip(axes, [("separated drift (eV)", parts["drift"], "RdBu_r"),
                                           ("local shift (eV)", parts["local_shift"], "RdBu_r"),
                                           ("local shift / error", parts["local_z"], "RdBu_r")], strict=True):
    image.plot(ax=ax, cmap=cmap, center=0)
    ax.set_title(title)
    ax.set_aspect("equal")
fig.tight_layout()

# %% [markdown]
# In a live notebook, `explore` links the shift map to the spectra: tap a pixel to see its counts, the fitted
# model and its shift with the error bar in the title.

# %%
from eels_ad.viz import explore

explore(cube, quantities=shifts)

# %% [markdown]
# ## A real dual-EELS line scan: La-Sr-Mn-O
#
# The line scan in `../shared/data/real/` (beside the checkout; see its README) has a zero-loss peak at
# +3.1 to +3.4 eV: the energy axis is offset and drifts along the line. We correct it and map the Mn L3 shift
# and the L3/L2 white-line ratio along the line, with error bars.

# %%
shared = Path(os.environ.get("EELS_AD_SHARED", Path(eels_ad.__file__).resolve().parents[2] / "shared"))
core_path = shared / "data" / "real" / "lsmo_linescan.hspy"
if core_path.exists():
    core = prepare(eels_ad.load(core_path).sel(energy=slice(590, 700)))
    low = zero_loss_drift(eels_ad.load(core_path.with_name("lsmo_linescan_low_loss.hspy")))
    mn = edge_shift_map(core, drift=low, energy_range=(612, 670), background_range=(612, 628))
    mn_raw = edge_shift_map(core, energy_range=(612, 670), background_range=(612, 628))
    ratio = white_line_ratio_map(core, background_range=(600, 628))
    position = np.arange(core.sizes["x"]) * 3.2  # nm
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    axes[0].plot(position, low["zero_loss_centre"].values[0], "k.-")
    axes[0].set(xlabel="position (nm)", ylabel="zero-loss centre (eV)", title="drift from the zero-loss peak")
    axes[1].errorbar(position, mn["shift"].values[0], mn["shift_error"].values[0], fmt="o-", ms=3,
                     label="drift corrected")
    axes[1].plot(position, mn_raw["shift"].values[0], ":", color="0.5", label="uncorrected")
    axes[1].set(xlabel="position (nm)", ylabel="Mn L2,3 shift (eV)", title="Mn edge shift along the line")
    axes[1].legend()
    axes[2].errorbar(position, ratio["l3_l2_ratio"].values[0], ratio["l3_l2_ratio_error"].values[0], fmt="o-", ms=3)
    axes[2].set(xlabel="position (nm)", ylabel="L3/L2", title="Mn white-line ratio")
    fig.tight_layout()
else:
    print(f"{core_path} is not here: the real-data part needs the ../shared folder beside the checkout")

# %% [markdown]
# Where the Mn edge moves to lower energy (about -0.5 eV, 50-70 nm along the line) its L3/L2 ratio rises:
# both point to a lower Mn valence there. The zero-loss peak drifts by about 0.25 eV along the line, as much as
# half that shift: without the correction the profile would tilt.
