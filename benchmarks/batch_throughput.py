"""Throughput of `eels-ad detect` over a folder of simulated cubes with 1 and 2 worker processes.

Writes benchmarks/results/batch_throughput.json. Usage: python benchmarks/batch_throughput.py [--files N]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from functools import partial
from pathlib import Path

import eels_ad
from eels_ad.batch import detect_job, plan, run
from eels_ad.detect import PCADetector

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--files", type=int, default=16)
    parser.add_argument("--size", type=int, default=64)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        inputs = scratch / "in"
        inputs.mkdir()
        for seed in range(args.files):
            eels_ad.save(eels_ad.simulate_fe_l23((args.size, args.size), seed=seed), inputs / f"cube{seed:03d}.nc")
        bulk = eels_ad.simulate_fe_l23((args.size, args.size), anomaly_fraction=0.0, seed=1000)["counts"]
        model = PCADetector().fit(bulk).save(scratch / "pca.nc")
        job = partial(detect_job, model=str(model))
        rows = []
        for workers in (1, 2):
            out = scratch / f"out{workers}"
            started = time.perf_counter()
            results = run(job, plan([inputs], out, suffix=".detect.nc"), out, workers=workers, progress=False)
            seconds = time.perf_counter() - started
            assert all(r.status == "done" for r in results)
            spectra = args.files * args.size * args.size
            rows.append({"workers": workers, "files": args.files, "seconds": seconds,
                         "files_per_minute": 60 * args.files / seconds, "spectra_per_second": spectra / seconds})
            print(rows[-1], flush=True)
    summary = {"cube": [args.size, args.size, 320], "model": "PCADetector (Poisson, auto components)",
               "runs": rows, "speed_up_2_vs_1": rows[0]["seconds"] / rows[1]["seconds"]}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "batch_throughput.json").write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
