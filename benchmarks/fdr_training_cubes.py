"""The realised false-discovery rate of the default detectors over several training cubes, not one.

``spatial.py`` trains each detector on one bulk cube (seed 100) and counts the bulk-only test cubes it flags
anything in (the realised FDR at the nominal 5 %). A detector's p-values are calibrated on its own training cube's
spectra, so that figure is one draw: here each detector is trained on several bulk cubes (the same simulator and
cell: 64 x 64 x 320, dose 20, without and under a +-1 eV drift) and each trained detector scores the same
bulk-only cubes (seeds 1000 on, or from --null-seed). The mean over training cubes is what a user can expect; the
spread, what one trained detector may give.

Usage: python benchmarks/fdr_training_cubes.py [--detectors "PCA default; CVAE default"] [--train-seeds 100,101,102]
       [--null-cubes 300] [--null-seed 1000] [--drifts 0,1] [--stem fdr_training_cubes]   ->   results/<stem>.json
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import numpy as np
from spatial import cell, detectors, wilson

RESULTS = Path(__file__).resolve().parent / "results"


def run(names: list[str], seeds: list[int], null_cubes: int, drifts: list[float], null_seed: int = 1000) -> dict:
    makers = detectors(120.0)
    rows = []
    for name in names:
        for drift in drifts:
            for seed in seeds:
                tic = time.perf_counter()
                detector = makers[name]().fit(cell((64, 64), drift, "pixels", seed=seed, anomalies=False)["counts"])
                flagged = [bool(detector.flag(detector.score(
                    cell((64, 64), drift, "pixels", seed=null_seed + k, anomalies=False)["counts"])).values.any())
                    for k in range(null_cubes)]
                row = {"detector": name, "drift_eV": drift, "train_seed": seed, "context": detector.context_,
                       "cubes": null_cubes, "fdr": float(np.mean(flagged)),
                       "fdr_95ci": wilson(int(np.sum(flagged)), null_cubes),
                       "seconds": time.perf_counter() - tic}
                rows.append(row)
                print(json.dumps(row), flush=True)
    summary = []
    for name in names:
        for drift in drifts:
            values = [r["fdr"] for r in rows if r["detector"] == name and r["drift_eV"] == drift]
            summary.append({"detector": name, "drift_eV": drift, "training_cubes": len(values),
                            "mean_fdr": float(np.mean(values)), "min_fdr": float(np.min(values)),
                            "max_fdr": float(np.max(values))})
            print(json.dumps(summary[-1]), flush=True)
    return {"shape": [64, 64, 320], "dose": 20, "nominal_fdr": 0.05,
            "null_seeds": [null_seed, null_seed + null_cubes - 1], "rows": rows, "summary": summary}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--detectors", default="PCA default; CVAE default", help="';'-separated rows of spatial.py")
    parser.add_argument("--train-seeds", default="100,101,102", help="seeds of the training cubes")
    parser.add_argument("--null-cubes", type=int, default=300, help="bulk-only test cubes per trained detector")
    parser.add_argument("--null-seed", type=int, default=1000, help="seed of the first bulk-only cube")
    parser.add_argument("--drifts", default="0,1", help="drifts in eV, ','-separated")
    parser.add_argument("--stem", default="fdr_training_cubes")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    tic = time.perf_counter()
    results = run([name.strip() for name in args.detectors.split(";") if name.strip()],
                  [int(seed) for seed in args.train_seeds.split(",")], args.null_cubes,
                  [float(drift) for drift in args.drifts.split(",")], args.null_seed)
    results["seconds"] = time.perf_counter() - tic
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{args.stem}.json"
    temporary = path.with_suffix(".json.tmp")
    temporary.write_text(json.dumps(results, indent=2) + "\n")
    temporary.replace(path)
    print(f"wrote {path} in {results['seconds']:.0f} s")


if __name__ == "__main__":
    main()
