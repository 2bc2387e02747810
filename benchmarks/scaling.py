"""Time and peak memory of each stage against cube size, next to one plain read of the cube.

Cubes from 64 x 64 x 320 up to 512 x 512 x 2048 (``--largest``) are simulated a band of rows at a time
and written to compressed NetCDF, so that no cube is ever whole in memory. Each stage then runs in a
fresh process on the cube opened lazily (``eels_ad.load(path, chunks={"y": rows})``), and reports its
wall time and peak resident memory (``ru_maxrss``; a process that only imports eels-ad and opens the
cube is the baseline). The stages:

- ``read``: one pass over every chunk (the time to beat);
- ``gram``: the flops of the channels x channels cross-product of all spectra, timed on one chunk and
  scaled to the cube (the arithmetic PCA cannot avoid);
- ``pca``: ``PCADetector(robust=True).fit(cube)`` then ``.score(cube)`` (scikit-learn's and scipy's modules
  imported beforehand: a cost per process, not per cube);
- ``compare``: ``compare_regions`` (method of moments) of a 5 % region against the rest (``eels_ad.stats``
  imported beforehand, ~25 ms once per process);
- ``quantify``: ``edge_shift_map``;
- ``cvae``: a 1-epoch CVAE's scoring (trained on a 32 x 32 corner in a process of its own and loaded from its
  file; the scoring is what scales), to 256 x 256; its memory baseline is the process with the model loaded;
- ``denoise``: ``denoise_cube`` in 64-pixel tiles, fast settings (10 outer, 10 inner iterations), to 256 x 256.

Writes benchmarks/results/scaling.json and scaling.png (log-log). Usage:
python benchmarks/scaling.py [--largest 512x512x2048] [--stages read,pca,...]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
SIZES = [(64, 64, 320), (128, 128, 512), (256, 256, 1024), (512, 512, 1024), (512, 512, 2048)]
STAGES = ("read", "gram", "pca", "compare", "quantify", "cvae", "denoise")
CHUNK_ROWS = {64: 32, 128: 32, 256: 16, 512: 8}


def write_cube(path: Path, shape: tuple[int, int, int], band: int = 32) -> None:
    """A simulated Fe L2,3 cube written band by band (dask), never whole in memory."""
    import dask
    import dask.array as da
    import xarray as xr

    import eels_ad

    ny, nx, ne = shape
    energy = 690.0 + (40.0 / ne) * np.arange(ne) if ne > 400 else 690.0 + 0.125 * np.arange(ne)

    def simulate(seed: int, rows: int) -> np.ndarray:
        return eels_ad.simulate_fe_l23((rows, nx), energy=energy, dose=20, seed=seed,
                                       anomaly_fraction=0.01)["counts"].values.astype(np.int32)

    bands = [da.from_delayed(dask.delayed(simulate)(seed, min(band, ny - start)), (min(band, ny - start), nx, ne),
                             dtype=np.int32) for seed, start in enumerate(range(0, ny, band))]
    data = da.concatenate(bands, axis=0)
    cube = xr.DataArray(data, dims=("y", "x", "energy"), coords={"energy": energy}, name="counts",
                        attrs={"units": "counts"})
    encoding = {"counts": {"zlib": True, "complevel": 1, "chunksizes": (min(band, ny), nx, ne)}}
    with dask.config.set(scheduler="threads", num_workers=2):
        cube.to_dataset().to_netcdf(path, engine="h5netcdf", encoding=encoding)


def run_stage(stage: str, path: str, rows: int) -> dict:
    """One stage in this process; returns its seconds and peak resident memory."""
    import warnings

    warnings.simplefilter("ignore")
    import eels_ad
    from eels_ad.datacube import read_rows, row_blocks

    cube = eels_ad.load(path, chunks={"y": rows})
    ny, nx, ne = cube.shape
    out: dict = {}
    if stage == "pca":  # the modules the robust fit imports on first use: once per process, not per cube
        import scipy.stats  # noqa: F401
        import sklearn.covariance  # noqa: F401

        import eels_ad.quantify  # noqa: F401  (the drift estimate of context="auto")
        from eels_ad.detect import _score_kernels, _scores

        # numba's import and first dispatch of the fused score (~1.7 s once per process; blocks of >= 2^20 values)
        _score_kernels.fused_scores(np.ones((2, 8)), np.ones((2, 8)), _scores._FLOOR, _scores._deviance_table(), True)
    if stage == "compare":  # its module, as the others' (imported with eels_ad), out of the count
        from eels_ad.stats import compare_regions
    started = time.perf_counter()
    if stage == "read":
        for block in row_blocks(cube, rows * nx):
            read_rows(cube, block, np.float64)
    elif stage == "gram":
        block = read_rows(cube, slice(0, rows), np.float64).reshape(-1, ne)
        started = time.perf_counter()
        for _ in range(3):
            block.T @ block
        per_block = (time.perf_counter() - started) / 3
        out["seconds"] = per_block * ny / rows
        out["gflops_per_second"] = 2 * block.shape[0] * ne * ne / per_block / 1e9
    elif stage == "pca":
        from eels_ad.detect import PCADetector

        detector = PCADetector(robust=True).fit(cube)  # work blocks of 1024 spectra; chunks read whole
        out["fit_seconds"] = time.perf_counter() - started
        detector.score(cube)
        out["n_components"], out["n_trimmed"] = int(detector.n_components_), int(detector.n_trimmed_)
    elif stage == "compare":
        flagged = np.zeros((ny, nx), bool)
        flagged[: max(2, ny // 20)] = True
        compare_regions(cube, ~flagged, flagged)
    elif stage == "quantify":
        from eels_ad.quantify import edge_shift_map

        edge_shift_map(cube)
    elif stage == "cvae-model":  # trained in a process of its own: the cvae stage measures the scoring alone
        from eels_ad.detect import CVAEDetector

        corner = cube.isel(y=slice(0, 32), x=slice(0, 32)).load()
        CVAEDetector(max_epochs=1, seed=0, spatial=False, progress=False).fit(corner).save(path + ".cvae.nc")
    elif stage == "cvae":
        from eels_ad.detect import load

        detector = load(path + ".cvae.nc")
        # torch, Lightning and the network loaded: the baseline of the scoring's own memory
        out["baseline_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        started = time.perf_counter()
        detector.score(cube)
    elif stage == "denoise":
        from eels_ad.reconstruct import denoise_cube

        result = denoise_cube(cube, tau=1.0, tile=64, overlap=8, max_iter=10, min_iter=10, n_iter=10,
                              backend="torch")
        for block in row_blocks(result, rows * nx):  # computed tile by tile as it is read
            read_rows(result, block)
    out.setdefault("seconds", time.perf_counter() - started)
    out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def baseline_rss(path: str, rows: int) -> float:
    import eels_ad

    eels_ad.load(path, chunks={"y": rows})
    import eels_ad.detect  # noqa: F401

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def plot(summary: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_time, ax_memory) = plt.subplots(1, 2, figsize=(12, 4.8))
    for stage in STAGES:
        points = [(row["megavoxels"], row["stages"][stage]) for row in summary["sizes"] if stage in row["stages"]]
        if not points:
            continue
        x = [p[0] for p in points]
        color = f"C{STAGES.index(stage)}"  # one colour per stage in both panels
        ax_time.loglog(x, [p[1]["seconds"] for p in points], "o-", label=stage, color=color)
        if stage != "gram":
            ax_memory.loglog(x, [max(p[1]["peak_rss_mib"] - p[1].get("baseline_mib", 0), 1) for p in points], "o-",
                             label=stage, color=color)
    ax_time.set(xlabel="cube size (million voxels)", ylabel="seconds", title="time per stage (2 cores)")
    ax_memory.set(xlabel="cube size (million voxels)", ylabel="peak memory above baseline (MiB)",
                  title="peak resident memory per stage")
    sizes = [row["megavoxels"] for row in summary["sizes"]]
    ax_memory.loglog(sizes, [4 * s for s in sizes], "k--", lw=0.8, label="the cube as int32")
    for ax in (ax_time, ax_memory):
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(RESULTS / "scaling.png", dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--largest", default="512x512x1024", help="the largest cube, e.g. 512x512x2048")
    parser.add_argument("--stages", default=",".join(STAGES))
    parser.add_argument("--stage", help=argparse.SUPPRESS)
    parser.add_argument("--path", help=argparse.SUPPRESS)
    parser.add_argument("--rows", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--rows-shape", help=argparse.SUPPRESS)
    parser.add_argument("--plot-only", action="store_true")
    parser.add_argument("--only", help="rerun these sizes (e.g. 512x512x1024,512x512x2048) and --stages, merged into "
                        "the existing results/scaling.json")
    args = parser.parse_args()
    if args.stage:  # a child process: one stage, its figures on stdout
        if args.stage == "write":
            write_cube(Path(args.path), tuple(int(v) for v in args.rows_shape.split("x")))
            result = {}
        elif args.stage == "baseline":
            result = baseline_rss(args.path, args.rows)
        else:
            result = run_stage(args.stage, args.path, args.rows)
        print(json.dumps(result))
        return
    if args.plot_only:
        plot(json.loads((RESULTS / "scaling.json").read_text()))
        return
    largest = tuple(int(v) for v in args.largest.split("x"))
    sizes = [s for s in SIZES if np.prod(s) <= np.prod(largest)]
    stages = args.stages.split(",")
    summary: dict = {"chunk_rows": CHUNK_ROWS, "sizes": []}
    previous: dict = {}
    if args.only:
        sizes = [tuple(int(v) for v in shape.split("x")) for shape in args.only.split(",")]
        summary = json.loads((RESULTS / "scaling.json").read_text())
        previous = {tuple(row["shape"]): row for row in summary["sizes"]}
    with tempfile.TemporaryDirectory() as scratch:
        for shape in sizes:
            path = Path(scratch) / f"cube_{'x'.join(map(str, shape))}.nc"
            started = time.perf_counter()
            # in a child process too: Linux keeps a process's peak RSS across fork and exec, so the parent
            # stays small for the children's peaks to be their own
            subprocess.run([sys.executable, "-W", "ignore", __file__, "--stage", "write", "--path", str(path),
                            "--rows-shape", "x".join(map(str, shape))], check=True, capture_output=True)
            rows = CHUNK_ROWS[shape[0]]
            row = {"shape": list(shape), "megavoxels": float(np.prod(shape)) / 1e6,
                   "gib_int32": float(np.prod(shape)) * 4 / 2**30, "file_mib": path.stat().st_size / 2**20,
                   "chunk_mib": rows * shape[1] * shape[2] * 4 / 2**20,  # one stored chunk of rows (int32)
                   "write_seconds": time.perf_counter() - started, "stages": {}}
            if shape in previous:  # --only: the other stages' figures kept
                row["stages"] = {k: v for k, v in previous[shape]["stages"].items() if k not in stages}
            baseline = None
            for stage in ["baseline", *stages]:
                if stage in ("cvae", "denoise") and shape[0] * shape[1] > 256 * 256:
                    continue  # minutes per point at 512 x 512: left out (the slope is seen below)
                if stage == "cvae":
                    subprocess.run([sys.executable, "-W", "ignore", __file__, "--stage", "cvae-model", "--path",
                                    str(path), "--rows", str(rows)], check=True, capture_output=True)
                done = subprocess.run([sys.executable, "-W", "ignore", __file__, "--stage", stage, "--path", str(path),
                                       "--rows", str(rows)], capture_output=True, text=True, check=False)
                if done.returncode:
                    row["stages"][stage] = {"error": done.stderr[-2000:]}
                    print(shape, stage, "failed", done.stderr[-500:], flush=True)
                    continue
                result = json.loads(done.stdout.strip().splitlines()[-1])
                if stage == "baseline":
                    baseline = result
                    row["baseline_mib"] = baseline
                    continue
                result.setdefault("baseline_mib", baseline)
                row["stages"][stage] = result
                print(shape, stage, json.dumps(result), flush=True)
            read = row["stages"].get("read", {}).get("seconds")
            gram = row["stages"].get("gram", {}).get("seconds")
            if read and gram and "pca" in row["stages"]:
                row["pca_over_read_plus_gram"] = row["stages"]["pca"]["seconds"] / (read + gram)
            if read and "compare" in row["stages"]:
                row["compare_over_read"] = row["stages"]["compare"]["seconds"] / read
            summary["sizes"] = sorted([r for r in summary["sizes"] if tuple(r["shape"]) != shape] + [row],
                                      key=lambda r: r["megavoxels"])
            RESULTS.mkdir(exist_ok=True)
            (RESULTS / "scaling.json").write_text(json.dumps(summary, indent=2) + "\n")
            path.unlink()
            Path(str(path) + ".cvae.nc").unlink(missing_ok=True)
    # log-log slopes of time against size, per stage
    slopes = {}
    for stage in STAGES:
        points = [(r["megavoxels"], r["stages"][stage]["seconds"]) for r in summary["sizes"]
                  if stage in r["stages"] and "seconds" in r["stages"][stage]]
        if len(points) >= 2:
            x, y = np.log([p[0] for p in points]), np.log([p[1] for p in points])
            slopes[stage] = float(np.polyfit(x, y, 1)[0])
    summary["time_slopes_loglog"] = slopes
    (RESULTS / "scaling.json").write_text(json.dumps(summary, indent=2) + "\n")
    plot(summary)
    print(json.dumps(slopes, indent=1))


if __name__ == "__main__":
    main()
