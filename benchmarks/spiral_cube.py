"""SPIRAL-TAP on simulated Fe L2,3 spectrum images, side by side with the usual alternatives.

A noise-free simulated cube (64 x 64 x 512 by default, 650-778 eV at 0.25 eV) is scaled to 0.5, 5
and 50 counts per voxel and observed three ways:

- ``denoise``: every pixel, Poisson noise (A = identity);
- ``scan25``: a random 25 % of the pixels (A = scan mask);
- ``blur``: every pixel, blurred by a 1.5 eV FWHM energy resolution before the noise (A = blur).

Methods (relative RMSE ||x - f|| / ||f|| over all voxels against the noise-free cube f, and wall time):

- ``none``: the counts (unvisited pixels: nearest visited pixel);
- ``richardson-lucy``: scikit-image, blur task only (it deconvolves; it does not denoise or fill);
- ``pca-poisson``: low-rank reconstruction by :class:`eels_ad.detect.PCADetector` (Poisson
  normalisation, automatic rank; fitted on the visited pixels);
- ``gaussian-tv``: scikit-image's Chambolle TV denoiser (least squares, 3-D);
- ``spiral-tv``: :func:`eels_ad.reconstruct.denoise_cube` (SPIRAL-TAP, 3-D TV of the intensity relative to
  the mean spectrum, its default settings), torch backend on the CPU.

Every method's parameter is swept and the oracle best reported; SPIRAL-TV also reports its
data-driven choice (``tau="auto"``: Poisson thinning over the same candidates). Then the time to
denoise a 128 x 128 x 1024 cube (goal: under a minute on 2 CPU cores), and numpy against torch on the
same cube (a ratio in one run).

Writes benchmarks/results/spiral_cube.json and .png. Usage: python benchmarks/spiral_cube.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

import eels_ad
from eels_ad.detect import PCADetector
from eels_ad.reconstruct import blur, default_taus, denoise_cube, scan_mask, spiral_tap
from eels_ad.reconstruct.spiral import _interpolate_unvisited  # the scan fill denoise_cube starts from

RESULTS = Path(__file__).resolve().parent / "results"
FACTORS = (0.25, 0.5, 1.0, 2.0, 4.0)  # the sweep around each method's natural scale
SPIRAL_FACTORS = (0.5, 1.0, 2.0)  # SPIRAL-TV runs take longest: a narrower sweep around default_taus' centre


def noise_free_cube(shape: tuple[int, int, int], seed: int) -> tuple[np.ndarray, np.ndarray]:
    energy = 650.0 + 0.25 * np.arange(shape[2])
    sim = eels_ad.simulate_fe_l23(shape[:2], energy=energy, noise=False, include_expected=True, seed=seed)
    expected = sim["expected"].values
    return expected / expected.mean(), energy


def energy_blur_kernel(dispersion: float = 0.25, fwhm: float = 1.5) -> np.ndarray:
    sigma = fwhm / 2.3548 / dispersion
    half = int(np.ceil(3 * sigma))
    offsets = np.arange(-half, half + 1)
    kernel = np.exp(-0.5 * (offsets / sigma) ** 2)
    return (kernel / kernel.sum()).reshape(1, 1, -1)


def relative_error(estimate: np.ndarray, truth: np.ndarray) -> float:
    return float(np.linalg.norm(estimate - truth) / np.linalg.norm(truth))


def timed(function):
    started = time.perf_counter()
    value = function()
    return value, time.perf_counter() - started


def sweep(name: str, truth: np.ndarray, parameters, run) -> dict:
    rows = []
    for parameter in parameters:
        estimate, seconds = timed(lambda value=parameter: run(value))
        rows.append({"parameter": float(parameter), "rmse": relative_error(estimate, truth), "seconds": seconds})
    best = min(rows, key=lambda row: row["rmse"])
    return {"method": name, "oracle_parameter": best["parameter"], "rmse": best["rmse"],
            "seconds": best["seconds"], "sweep": rows}


def run_case(truth: np.ndarray, task: str, dose: float, seed: int, spiral_options: dict) -> list[dict]:
    rng = np.random.default_rng(seed)
    intensity = truth * dose
    kernel = energy_blur_kernel()
    visited = rng.random(truth.shape[:2]) < 0.25 if task == "scan25" else np.ones(truth.shape[:2], bool)
    forward, adjoint = {"denoise": (None, None), "scan25": scan_mask(visited), "blur": blur(kernel)}[task]
    mean_counts = intensity if forward is None else forward(intensity)
    counts = rng.poisson(mean_counts).astype(float)
    start = _interpolate_unvisited(counts, visited) if task == "scan25" else counts
    cube = eels_ad.as_datacube(start, energy=650.0 + 0.25 * np.arange(truth.shape[2]))
    rows = [{"method": "none", "rmse": relative_error(start, intensity), "seconds": 0.0}]

    if task == "blur":
        from skimage.restoration import richardson_lucy

        rows.append(sweep("richardson-lucy", intensity, (5, 10, 20, 40, 80),
                          lambda n: richardson_lucy(counts, kernel, num_iter=int(n), clip=False)))

    def pca(_):
        detector = PCADetector(poisson_normalize=True).fit(cube, mask=visited)
        return detector.reconstruct(cube).values

    rows.append(sweep("pca-poisson", intensity, (0,), pca))
    rows[-1]["oracle_parameter"] = None  # automatic rank, nothing swept

    from skimage.restoration import denoise_tv_chambolle

    scale = np.sqrt(dose)  # the noise level of the counts
    rows.append(sweep("gaussian-tv", intensity, [scale * f for f in FACTORS],
                      lambda weight: denoise_tv_chambolle(start, weight=weight, max_num_iter=50)))

    # SPIRAL-TV as users call it: eels_ad.reconstruct.denoise_cube (intensity relative to the mean spectrum)
    noisy = eels_ad.as_datacube(counts, energy=cube["energy"].values)
    settings = dict(visited=visited if task == "scan25" else None, psf=kernel if task == "blur" else None,
                    **spiral_options)
    centre = float(default_taus(counts[visited], count=1, relative=True)[0])
    taus = [centre * f for f in SPIRAL_FACTORS]
    spiral = sweep("spiral-tv", intensity, taus, lambda tau: denoise_cube(noisy, tau=tau, **settings).values)
    chosen, seconds = timed(lambda: denoise_cube(noisy, tau="auto", taus=taus, **settings))
    spiral["data_driven"] = {"tau": chosen.attrs["tau"], "rmse": relative_error(chosen.values, intensity),
                             "seconds": seconds, "held_out_loss": chosen.attrs["tau_held_out_loss"].tolist()}
    rows.append(spiral)
    for row in rows:
        row.update(task=task, dose=dose)
    return rows


def large_cube_timing(shape: tuple[int, int, int], seed: int) -> list[dict]:
    """denoise_cube on one cube: its defaults with tau given and with tau="auto" (the call a user makes) on both
    backends, the TV subproblems by the array loop (before the fused kernels) and the fast settings, side by side
    in one run."""
    from eels_ad.reconstruct import _tv_kernels

    truth, energy = noise_free_cube(shape, seed)
    dose = 5.0
    counts = np.random.default_rng(seed).poisson(truth * dose).astype(float)
    cube = eels_ad.as_datacube(counts, energy=energy)
    centre = float(default_taus(counts, count=1, relative=True)[0])
    torch_cpu = dict(backend="torch", device="cpu")
    denoise_cube(cube[:4, :4, :64], tau=1.0, **torch_cpu)  # the kernels compiled (or loaded from numba's cache)
    denoise_cube(cube[:4, :4, :64], tau=1.0)
    rows = []
    for label, tau, options, fused in (
            ("defaults (10 outer, 20 inner), tau given, torch CPU float32 (the default backend)", centre, torch_cpu,
             True),
            ("defaults, tau='auto' (chosen on the central 64 x 64), torch CPU float32: denoise_cube(cube)", "auto",
             torch_cpu, True),
            ("defaults, tau given, backend='numpy' (float64)", centre, {}, True),
            ("defaults, tau='auto', backend='numpy' (float64)", "auto", {}, True),
            ("before the fused kernels: tau given, torch CPU, array loop", centre, torch_cpu, False),
            ("fast (10 outer, 10 inner), torch CPU", centre, dict(max_iter=10, n_iter=10, **torch_cpu), True)):
        available = _tv_kernels.available
        if not fused:
            _tv_kernels.available = lambda: False
        try:
            result, seconds = timed(lambda t=tau, opts=options: denoise_cube(cube, tau=t, truth=truth * dose, **opts))
        finally:
            _tv_kernels.available = available
        rows.append({"settings": label, "shape": list(shape), "dose": dose, "tau": float(result.attrs["tau"]),
                     "iterations": int(result.attrs["iterations"]), "seconds": seconds,
                     "rmse": float(result.attrs["relative_error"]), "raw_rmse": relative_error(counts, truth * dose),
                     "fused_kernels": fused, "goal_seconds": 60.0})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def tv_kernel_ratio(shape: tuple[int, int, int], seed: int, n_iter: int = 20) -> dict:
    """tv_prox (one TV subproblem, ``n_iter`` FGP steps) by the fused kernels and by the array loop, side by side."""
    import torch

    from eels_ad.reconstruct import _tv_kernels, tv_prox

    step = np.random.default_rng(seed).random(shape) * 2.0
    options = dict(weights=(1.0, 1.0, 1.0), lower=0.05, n_iter=n_iter, tol=0.0)
    row = {"shape": list(shape), "fgp_steps": n_iter}
    for name, array in (("numpy_float64", step), ("torch_cpu_float32", torch.from_numpy(step.astype(np.float32)))):
        tv_prox(array[:4, :4, :16], 0.3, **options)
        fused, fused_seconds = timed(lambda a=array: np.asarray(tv_prox(a, 0.3, **options)))
        available = _tv_kernels.available
        _tv_kernels.available = lambda: False
        try:
            loop, loop_seconds = timed(lambda a=array: np.asarray(tv_prox(a, 0.3, **options)))
        finally:
            _tv_kernels.available = available
        row[name] = {"fused_s": fused_seconds, "array_loop_s": loop_seconds, "speedup": loop_seconds / fused_seconds,
                     "max_abs_difference": float(np.abs(fused - loop).max())}
    return row


def backend_ratio(shape: tuple[int, int, int], seed: int) -> dict:
    truth, _ = noise_free_cube(shape, seed)
    counts = np.random.default_rng(seed).poisson(truth * 5.0).astype(float)
    options = dict(tau=0.3, penalty="tv", n_iter=20, max_iter=10, min_iter=10, lower=0.25)
    numpy_result, numpy_seconds = timed(lambda: spiral_tap(counts, **options))
    torch_result, torch_seconds = timed(lambda: spiral_tap(counts, backend="torch", device="cpu", **options))
    torch64, torch64_seconds = timed(lambda: spiral_tap(counts, backend="torch", device="cpu", dtype=np.float64,
                                                        **options))
    return {"shape": list(shape), "iterations": 10, "numpy_float64_s": numpy_seconds,
            "torch_cpu_float32_s": torch_seconds, "torch_cpu_float64_s": torch64_seconds,
            "speedup_torch32_vs_numpy": numpy_seconds / torch_seconds,
            "max_relative_difference_float32": float(np.abs(torch_result.x - numpy_result.x).max()
                                                     / numpy_result.x.max()),
            "max_relative_difference_float64": float(np.abs(torch64.x - numpy_result.x).max()
                                                     / numpy_result.x.max())}


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(row["task"] for row in rows))
    methods = list(dict.fromkeys(row["method"] for row in rows))
    figure, axes = plt.subplots(1, len(tasks), figsize=(4.5 * len(tasks), 3.6), sharey=True)
    for axis, task in zip(np.atleast_1d(axes), tasks, strict=True):
        for method in methods:
            points = sorted((row["dose"], row["rmse"]) for row in rows
                            if row["task"] == task and row["method"] == method)
            if points:
                axis.plot(*zip(*points, strict=True), "o-", label=method)
        spiral = sorted((row["dose"], row["data_driven"]["rmse"]) for row in rows
                        if row["task"] == task and row["method"] == "spiral-tv")
        axis.plot(*zip(*spiral, strict=True), "k--", label="spiral-tv (data-driven tau)")
        axis.set(xscale="log", yscale="log", xlabel="counts per voxel", title=task)
    np.atleast_1d(axes)[0].set_ylabel("relative RMSE")
    np.atleast_1d(axes)[-1].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a 32 x 32 x 256 cube, one dose, no large cube")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--large-only", action="store_true",
                        help="only the 128 x 128 x 1024 timings (denoise_cube's defaults on both backends, the "
                             "array loop, fast settings; tv_prox fused against the array loop): "
                             "spiral_large_cube.json")
    args = parser.parse_args()
    if args.large_only:
        kernels = tv_kernel_ratio((128, 128, 1024), args.seed)
        print("tv kernels", json.dumps(kernels), flush=True)
        rows = large_cube_timing((128, 128, 1024), args.seed)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "spiral_large_cube.json").write_text(json.dumps({"rows": rows, "tv_kernels": kernels},
                                                                    indent=2) + "\n")
        print(json.dumps(rows, indent=1))
        return
    shape = (32, 32, 256) if args.quick else (64, 64, 512)
    doses = (5.0,) if args.quick else (0.5, 5.0, 50.0)
    spiral_options = dict(backend="torch", device="cpu")  # otherwise denoise_cube's defaults
    truth, _ = noise_free_cube(shape, args.seed)
    rows = []
    for dose in doses:
        for task in ("denoise", "scan25", "blur"):
            for row in run_case(truth, task, dose, args.seed, spiral_options):
                rows.append(row)
                extra = f" data-driven {row['data_driven']['rmse']:.4f}" if "data_driven" in row else ""
                print(f"{task:8s} dose {dose:5.1f} {row['method']:16s} RMSE {row['rmse']:.4f} "
                      f"({row['seconds']:.1f} s){extra}", flush=True)
    summary = {"shape": list(shape), "doses": list(doses), "spiral_options": spiral_options, "rows": rows}
    if not args.quick:
        summary["large_cube"] = large_cube_timing((128, 128, 1024), args.seed)
        print("large cube", json.dumps(summary["large_cube"]), flush=True)
        summary["backends"] = backend_ratio((64, 64, 512), args.seed)
        print("backends", json.dumps(summary["backends"]), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "spiral_cube_quick" if args.quick else "spiral_cube"
    (args.out / f"{stem}.json").write_text(json.dumps(summary, indent=2) + "\n")
    plot(rows, args.out / f"{stem}.png")


if __name__ == "__main__":
    main()
