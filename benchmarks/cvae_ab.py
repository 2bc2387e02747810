"""CVAE settings side by side: training time, scoring speed per scoring stride, ROC AUC (per pixel).

Run two of these at once, each on one torch thread, so that both see the same load, e.g. the code before a
change (a git worktree on ``PYTHONPATH``) against the code after it::

    PYTHONPATH=/tmp/old python benchmarks/cvae_ab.py old '{}' 1 > old.json &
    python benchmarks/cvae_ab.py new '{}' 1 > new.json
    python benchmarks/cvae_ab.py short '{"max_epochs": 12, "batch_size": 32}' 1

64 x 64 x 320 simulated Fe L2,3, bulk seed 5, test seed 6, 1 % anomalies shifted by 0.25 and 0.5 eV, pixels and
blobs, dose 200 and 20. Prints one JSON line; the session-6 record is ``results/cvae_ab.json``.
"""

from __future__ import annotations

import json
import sys
import time
import warnings

import torch
from sklearn.metrics import roc_auc_score

import eels_ad
from eels_ad.detect import CVAEDetector


def main(tag: str, extra: dict, threads: int) -> dict:
    warnings.simplefilter("ignore")
    torch.set_num_threads(threads)
    out: dict = {"tag": tag, "settings": extra}
    for dose in (200, 20):
        bulk = eels_ad.simulate_fe_l23((64, 64), anomaly_fraction=0.0, dose=dose, seed=5)["counts"]
        detector = CVAEDetector(progress=False, spatial=False, seed=0, **extra).fit(bulk)
        out[f"train_s_{dose}"] = round(detector.training_seconds_, 1)
        out[f"epochs_{dose}"] = detector.epochs_
        out["parameters"] = detector.n_parameters_
        for layout in ("pixels", "clusters"):
            for shift in (0.25, 0.5):
                sim = eels_ad.simulate_fe_l23((64, 64), anomaly_fraction=0.01, shift=shift, layout=layout, dose=dose,
                                              seed=6)
                for stride in (2, 4, 8):
                    detector.score_stride = stride
                    tic = time.perf_counter()
                    scores = detector.score(sim["counts"]).values
                    seconds = time.perf_counter() - tic
                    out[f"auc_{dose}_{layout}_{shift}_stride{stride}"] = round(
                        roc_auc_score(sim["anomaly"].values.ravel(), scores.ravel()), 4)
                    out[f"spectra_per_s_stride{stride}"] = round(4096 / seconds)
    return out


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], json.loads(sys.argv[2]) if len(sys.argv) > 2 else {},
                          int(sys.argv[3]) if len(sys.argv) > 3 else 2)))
