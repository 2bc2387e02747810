"""Files per minute of `eels-ad detect` over a folder: 1 against 2 workers, as a local pool and on a Dask cluster.

Jobs of about a second (PCA scoring of a 128 x 128 x 1024 cube, read from a compressed NetCDF and written
back), or a few seconds with ``--size 256``. The local pool starts its worker processes inside the timed
run (spawned, each imports eels-ad once and keeps to its share of the cores); the Dask workers are started
beforehand (`dask scheduler`, `dask worker --nthreads 1 --preload eels_ad.batch`) and warmed by one file,
as they are on a cluster that serves many runs. Two comparisons: workers of the same size (one core each,
as `dask worker --nthreads 1` with single-threaded BLAS: how the cluster scales with workers), and the
whole machine either way (one worker gets every core for BLAS, two get one each: what a second worker
adds on this machine).

Writes benchmarks/results/batch_throughput.json (batch_throughput_SIZE.json for another --size). Usage:
python benchmarks/batch_throughput.py [--files N] [--size PIXELS]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np

import eels_ad
from eels_ad.batch import detect_job, plan, run
from eels_ad.detect import PCADetector

RESULTS = Path(__file__).resolve().parent / "results"
DASK = Path(sys.executable).parent / "dask"


def start_cluster(scratch: Path, workers: int, threads_per_worker_blas: int):
    """A scheduler and ``workers`` worker processes; returns (address, processes)."""
    scheduler_file = scratch / f"scheduler{workers}.json"
    env = {**os.environ, "OMP_NUM_THREADS": str(threads_per_worker_blas),
           "OPENBLAS_NUM_THREADS": str(threads_per_worker_blas), "PYTHONWARNINGS": "ignore"}
    processes = [subprocess.Popen([str(DASK), "scheduler", "--scheduler-file", str(scheduler_file), "--port", "0",
                                   "--no-dashboard", "--host", "127.0.0.1"], env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    while not scheduler_file.exists():
        time.sleep(0.1)
    address = json.loads(scheduler_file.read_text())["address"]
    for index in range(workers):
        processes.append(subprocess.Popen([str(DASK), "worker", address, "--nthreads", "1", "--no-nanny",
                                           "--no-dashboard", "--preload", "eels_ad.batch",
                                           "--local-directory", str(scratch / f"w{workers}-{index}")], env=env,
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    from distributed import Client

    with Client(address, timeout=60) as client:
        client.wait_for_workers(workers, timeout=300)
    return address, processes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--files", type=int, default=8)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--channels", type=int, default=1024)
    args = parser.parse_args()
    energy = 680.0 + 0.25 * np.arange(args.channels)
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        inputs, warm = scratch / "in", scratch / "warm"
        inputs.mkdir()
        warm.mkdir()
        for seed in range(args.files):
            cube = eels_ad.simulate_fe_l23((args.size, args.size), energy=energy, dose=20, seed=seed)
            eels_ad.save(cube["counts"], inputs / f"cube{seed:03d}.nc")
        eels_ad.save(eels_ad.simulate_fe_l23((16, 16), energy=energy, seed=999)["counts"], warm / "small.nc")
        bulk = eels_ad.simulate_fe_l23((64, 64), energy=energy, anomaly_fraction=0.0, dose=20, seed=1000)["counts"]
        model = PCADetector().fit(bulk).save(scratch / "pca.nc")
        job = partial(detect_job, model=str(model))
        rows = []

        def timed(label: str, n_workers: int, **where) -> None:
            out = scratch / f"out-{label}-{n_workers}"
            started = time.perf_counter()
            results = run(job, plan([inputs], out, suffix=".detect.nc"), out, progress=False, **where)
            seconds = time.perf_counter() - started
            assert all(r.status == "done" for r in results), [r.reason for r in results]
            rows.append({"engine": label, "workers": n_workers, "files": args.files, "seconds": seconds,
                         "files_per_minute": 60 * args.files / seconds,
                         "seconds_per_file_in_job": float(np.mean([r.seconds for r in results]))})
            print(rows[-1], flush=True)

        timed("in-process", 1)
        timed("local pool (spawned in the run)", 2, workers=2)
        for workers, blas in ((1, cores), (2, max(1, cores // 2)), (1, 1)):
            label = "dask cluster (warm workers" + (")" if blas * workers == cores else ", 1 core each)")
            address, processes = start_cluster(scratch, workers, blas)
            try:
                run(job, plan([warm], scratch / f"warm{workers}", suffix=".detect.nc"), scratch / f"warm{workers}",
                    scheduler=address, progress=False)
                timed(label, workers, scheduler=address)  # noqa: B023
            finally:  # workers first, then the scheduler (a worker without one keeps trying to reconnect)
                for process in reversed(processes):
                    process.terminate()
                    try:
                        process.wait(timeout=30)
                    except subprocess.TimeoutExpired:
                        process.kill()
    by = {(r["engine"], r["workers"]): r["files_per_minute"] for r in rows}
    summary = {
        "cube": [args.size, args.size, args.channels], "model": "PCADetector (Poisson, auto components)",
        "cores": cores, "runs": rows,
        "speed_up_local_pool_2_vs_in_process_1": by[("local pool (spawned in the run)", 2)] / by[("in-process", 1)],
        "speed_up_dask_2_vs_1": by[("dask cluster (warm workers)", 2)] / by[("dask cluster (warm workers)", 1)],
        "speed_up_dask_2_vs_1_same_workers": (by[("dask cluster (warm workers)", 2)]
                                              / by[("dask cluster (warm workers, 1 core each)", 1)]),
        "goal": "2 workers >= 1.7x the files per minute of 1",
    }
    print(json.dumps({k: v for k, v in summary.items() if k.startswith("speed")}, indent=1))
    RESULTS.mkdir(exist_ok=True)
    name = "batch_throughput.json" if args.size == 128 else f"batch_throughput_{args.size}.json"
    (RESULTS / name).write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
