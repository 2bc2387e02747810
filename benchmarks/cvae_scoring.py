"""The CVAE's two ways to score a pixel, side by side on the same trained models.

- "reconstruction" (the default since session 4): the score of the pixel's spectrum against the mean of the
  expected counts over the patches that cover it, which is exactly what ``reconstruct`` returns;
- "patch mean" (before): the mean over those patches of each patch's own score of the pixel.

Simulated Fe L2,3 cubes (64 x 64 x 320, 1 % anomalies, pixels and clusters), one Poisson CVAE per dose (25 epochs),
ROC AUC of both scores and F1 at the detector's automatic threshold for the default one.
Usage: python benchmarks/cvae_scoring.py [--epochs 25] [--quick]   ->   results/cvae_scoring.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from eels_ad.detect import CVAEDetector
from eels_ad.detect._scores import score_spectra
from eels_ad.evaluate import detection_metrics
from eels_ad.simulate import simulate_fe_l23

RESULTS = Path(__file__).resolve().parent / "results"


def patch_mean_scores(detector: CVAEDetector, cube) -> np.ndarray:
    """The former score: each covering patch scores the pixel, and the scores are averaged."""
    cube = detector._prepared(cube)

    def per_patch():
        for corners, counts, expected, _ in detector._patch_outputs(cube):
            n, e, py, px = counts.shape
            flat_counts = counts.transpose(0, 2, 3, 1).reshape(-1, e)
            flat_expected = expected.transpose(0, 2, 3, 1).reshape(-1, e)
            yield corners, score_spectra(flat_counts, flat_expected, detector.scoring).reshape(n, py, px)

    return detector._accumulate(cube, per_patch())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=25)
    parser.add_argument("--quick", action="store_true", help="32 x 32, 3 epochs, one dose (a smoke run)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    shape, epochs, doses = ((32, 32), 3, (200.0,)) if args.quick else ((64, 64), args.epochs, (200.0, 20.0))
    rows = []
    for dose in doses:
        bulk = simulate_fe_l23(shape, dose=dose, anomaly_fraction=0.0, seed=1)["counts"]
        detector = CVAEDetector(likelihood="poisson", max_epochs=epochs, progress=False, seed=0).fit(bulk)
        for layout in ("pixels", "clusters"):
            for shift in (0.25, 0.5, 1.0, 4.0):
                test = simulate_fe_l23(shape, dose=dose, anomaly_fraction=0.01, layout=layout, shift=shift, seed=2)
                scores = detector.score(test["counts"])
                new = detection_metrics(scores, test["anomaly"], detector.flag(scores))
                old_auc = detection_metrics(patch_mean_scores(detector, test["counts"]), test["anomaly"],
                                            threshold=np.inf)["roc_auc"]
                row = {"dose": dose, "layout": layout, "shift_eV": shift, "auc_reconstruction": new["roc_auc"],
                       "auc_patch_mean": old_auc, "f1_reconstruction_auto": new["f1"],
                       "n_flagged": new["n_flagged"]}
                rows.append(row)
                print({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}, flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    name = "cvae_scoring_quick.json" if args.quick else "cvae_scoring.json"
    (args.out / name).write_text(json.dumps({"shape": list(shape), "epochs": epochs, "rows": rows}, indent=2) + "\n")
    print(f"wrote {args.out / name}")


if __name__ == "__main__":
    main()
