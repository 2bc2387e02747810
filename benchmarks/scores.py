"""PCA's per-pixel scores side by side on changes that move the edge and changes that do not.

One Poisson PCA detector per score (``deviance``, ``shift``, ``shift+deviance``), fitted on one bulk-only 64 x 64 x
320 Fe L2,3 cube at dose 20, scores test cubes (3 per case, 1 % anomalous pixels) with its defaults otherwise (the
spatial step, 5 % FDR flags):

- a 0.5 eV shift of the whole edge, in blobs and in single pixels;
- a pre-edge peak (Gaussian, 0.8 eV wide at 704 eV, 0.3 and 0.6 x the spectrum's mean count) where the edge does
  not move, in blobs: what the shift test cannot see;
- a change of the L3/L2 ratio (4 -> 2.5) and a 1.3x intensity, in blobs: changes the bulk's components explain.

ROC AUC of the pooled map over the test cubes' pixels together, F1 of their flags together, and the share of
bulk-only cubes with any flag (the realised FDR). Writes ``results/scores.json``.

    python benchmarks/scores.py     # about 3 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import numpy as np
from sklearn.metrics import f1_score, roc_auc_score

import eels_ad
from eels_ad.detect import PCADetector

RESULTS = Path(__file__).parent / "results"
SHAPE = (64, 64)
DOSE = 20.0


def shifted(seed: int, layout: str):
    sim = eels_ad.simulate_fe_l23(SHAPE, dose=DOSE, anomaly_fraction=0.01, shift=0.5, layout=layout, seed=seed)
    return sim["counts"], sim["anomaly"].values


def unshifted(seed: int, **changes):
    sim = eels_ad.simulate_fe_l23(SHAPE, dose=DOSE, anomaly_fraction=0.01, shift=0.0, layout="clusters", seed=seed,
                                  **changes)
    return sim["counts"], sim["anomaly"].values


def pre_edge_peak(seed: int, height: float):
    """A Gaussian peak added to the anomalous pixels' expected counts before the Poisson draw."""
    sim = eels_ad.simulate_fe_l23(SHAPE, dose=DOSE, anomaly_fraction=0.01, shift=0.0, layout="clusters",
                                  include_expected=True, seed=seed)
    energy = sim["energy"].values
    expected = sim["expected"].transpose("y", "x", "energy").values.copy()
    anomalous = sim["anomaly"].values
    peak = np.exp(-0.5 * ((energy - 704.0) / 0.8) ** 2)
    expected[anomalous] += height * expected[anomalous].mean(axis=-1, keepdims=True) * peak
    counts = np.random.default_rng(seed).poisson(expected).astype(float)
    return eels_ad.as_datacube(counts, energy=energy), anomalous


CASES = {
    "shift 0.5 eV, blobs": lambda seed: shifted(seed, "clusters"),
    "shift 0.5 eV, pixels": lambda seed: shifted(seed, "pixels"),
    "pre-edge peak 0.3, blobs": lambda seed: pre_edge_peak(seed, 0.3),
    "pre-edge peak 0.6, blobs": lambda seed: pre_edge_peak(seed, 0.6),
    "L3/L2 4 -> 2.5, blobs": lambda seed: unshifted(seed, anomaly_l3_l2_ratio=2.5),
    "intensity x 1.3, blobs": lambda seed: unshifted(seed, anomaly_intensity=1.3),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--test-cubes", type=int, default=3)
    parser.add_argument("--null-cubes", type=int, default=60)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    started = time.perf_counter()
    bulk = eels_ad.simulate_fe_l23(SHAPE, dose=DOSE, anomaly_fraction=0.0, seed=100)["counts"]
    rows = []
    for scoring in ("deviance", "shift", "shift+deviance"):
        detector = PCADetector(scoring=scoring).fit(bulk)
        for case, make in CASES.items():
            truth, scores, flags = [], [], []
            for k in range(args.test_cubes):
                cube, anomalous = make(200 + 10 * k)
                score = detector.score(cube)
                truth.append(anomalous.ravel())
                scores.append(score.values.ravel())
                flags.append(detector.flag(score).values.ravel())
            t = np.concatenate(truth)
            rows.append({"scoring": scoring, "case": case, "test_cubes": args.test_cubes,
                         "roc_auc": float(roc_auc_score(t, np.concatenate(scores))),
                         "f1": float(f1_score(t, np.concatenate(flags), zero_division=0))})
            print(f"{scoring:15s} {case:26s} AUC {rows[-1]['roc_auc']:.3f} F1 {rows[-1]['f1']:.3f}", flush=True)
        flagged = 0
        for k in range(args.null_cubes):
            clean = eels_ad.simulate_fe_l23(SHAPE, dose=DOSE, anomaly_fraction=0.0, seed=1000 + k)["counts"]
            flagged += int(detector.flag(detector.score(clean)).sum() > 0)
        rows.append({"scoring": scoring, "case": "bulk-only cubes flagged", "cubes": args.null_cubes,
                     "share": flagged / args.null_cubes})
        print(f"{scoring:15s} bulk-only cubes flagged {flagged}/{args.null_cubes}", flush=True)
    RESULTS.mkdir(exist_ok=True)
    out = {"shape": [*SHAPE, 320], "dose": DOSE, "rows": rows, "seconds": time.perf_counter() - started}
    (RESULTS / "scores.json").write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {RESULTS / 'scores.json'} in {out['seconds']:.0f} s")


if __name__ == "__main__":
    main()
