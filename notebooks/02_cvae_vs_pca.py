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
# # 3D-CVAE against PCA on shifted Fe L2,3 edges
#
# A 3D convolutional VAE trained on bulk patches (Sultanov, Buban & Klie, arXiv:2412.16200) next to the PCA baseline. The defaults are small so that it runs in a couple of minutes on a laptop CPU; scale `SIZE` and `EPOCHS` up for real comparisons.

# %%
SIZE = 32      # pixels per side of the simulated cubes
EPOCHS = 6     # CVAE training epochs (12 by default in CVAEDetector)
SHIFT = 0.5    # Fe edge shift of the anomalies, eV
DOSE = 20.0    # counts per channel before the edge (20: low dose)

# %%
import matplotlib.pyplot as plt
import numpy as np

import eels_ad
from eels_ad.detect import CVAEDetector, PCADetector, bimodality
from eels_ad.evaluate import detection_metrics

bulk = eels_ad.simulate_fe_l23((SIZE, SIZE), dose=DOSE, anomaly_fraction=0.0, seed=1)["counts"]
test = eels_ad.simulate_fe_l23((SIZE, SIZE), dose=DOSE, anomaly_fraction=0.03, shift=SHIFT, layout="clusters",
                               seed=2)

# %%
pca = PCADetector().fit(bulk)
cvae = CVAEDetector(max_epochs=EPOCHS, progress=False, seed=0).fit(bulk)
print(f"CVAE: {cvae.n_parameters_} parameters, {cvae.training_seconds_:.0f} s of training")

# %%
results = {}
for name, detector in (("PCA", pca), ("3D-CVAE", cvae)):
    scores = detector.score(test["counts"])
    labels = detector.flag(scores)
    results[name] = scores
    metrics = detection_metrics(scores, test["anomaly"], labels)
    print(f"{name:8s} AUC {metrics['roc_auc']:.3f}  F1 {metrics['f1']:.3f}  "
          f"Ashman's D {bimodality(scores)['ashman_d']:.1f}")

# %% [markdown]
# Score histograms: bulk pixels against the injected anomalies (a clean gap is the bimodal separation).

# %%
fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
truth = test["anomaly"].values
for ax, (name, scores) in zip(axes, results.items(), strict=True):
    values = scores.values
    bins = np.linspace(values.min(), values.max(), 60)
    ax.hist(values[~truth], bins, alpha=0.6, label="bulk")
    ax.hist(values[truth], bins, alpha=0.6, label="anomalies")
    ax.set_yscale("log"); ax.set_title(name); ax.set_xlabel("score"); ax.legend()
fig.tight_layout()

# %%
fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
test["anomaly"].plot(ax=axes[0], add_colorbar=False); axes[0].set_title("truth")
results["PCA"].plot(ax=axes[1]); axes[1].set_title("PCA score")
results["3D-CVAE"].plot(ax=axes[2]); axes[2].set_title("3D-CVAE score")
for ax in axes:
    ax.invert_yaxis()
fig.tight_layout()
