"""The 3D-CVAE next to PCA: the evaluation grid, the paper's protocol, speed, size and memory.

Writes benchmarks/results/cvae.json and cvae_grid.csv (with --scoring S: cvae_S.json, cvae_grid_S.csv;
with --speed-only: cvae_speed.json).
Usage: python benchmarks/cvae.py [--quick] [--epochs N] [--speed-only]  (epochs: the detector's default)
(--speed-only: the timing alone, on the CPU and on a CUDA GPU when there is one -> cvae_speed.json)

Paper (Sultanov, Buban & Klie, arXiv:2412.16200): F1 0.86-0.98 for the 3D-CVAE, 0.05-0.92 for PCA
with 3-5 components, on the circular-roll protocol; their model has about 777 million parameters.
"""

from __future__ import annotations

import argparse
import inspect
import json
import resource
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from eels_ad.detect import CVAEDetector, PCADetector
from eels_ad.evaluate import default_flag_metrics, evaluation_grid
from eels_ad.simulate import roll_l3_window, simulate_fe_l23

RESULTS = Path(__file__).resolve().parent / "results"
PAPER = {"parameters": 777_000_000, "f1_cvae": [0.86, 0.98], "f1_pca": [0.05, 0.92]}


def detectors(epochs: int, scoring: str | None = None) -> dict:
    if scoring:  # one score for the Poisson CVAE and PCA alike
        return {
            f"cvae_poisson_{scoring}": lambda: CVAEDetector(likelihood="poisson", scoring=scoring, max_epochs=epochs,
                                                            progress=False),
            f"pca_poisson_{scoring}": lambda: PCADetector(scoring=scoring),
        }
    return {
        "cvae_poisson": lambda: CVAEDetector(likelihood="poisson", max_epochs=epochs, progress=False),
        "cvae_gaussian": lambda: CVAEDetector(likelihood="gaussian", scoring="nll", max_epochs=epochs,
                                              progress=False),
        "pca_poisson": lambda: PCADetector(),
    }


#: the drifted cell of ``spatial.py`` (dose 20, +-1 eV drift, 0.5 eV shifts in blobs): where the blind spot is the
#: default (``context="auto"``) and its second step predicts the most centres again
DRIFTED = dict(dose=20.0, drift=1.0, shift=0.5)


def _speed_on(accelerator: str, epochs: int, shape, context: str, queue, drifted: bool = False) -> None:
    """Train and score one CVAE on ``accelerator`` in this (fresh) process; report time and peak memory.

    Scoring is timed in both memory layouts of the network, side by side (contiguous, the default, and
    channels-last), and at score stride 8 for the pixel context. ``drifted``: trained and scored on cubes of
    :data:`DRIFTED` (blobs), the others on the simulator's defaults.
    """
    cell = DRIFTED if drifted else {}
    train = simulate_fe_l23(shape, anomaly_fraction=0.0, seed=1, **cell)["counts"]
    test = simulate_fe_l23(shape, anomaly_fraction=0.01, seed=2, **({**cell, "layout": "clusters"} if drifted
                                                                     else {}))["counts"]
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    detector = CVAEDetector(max_epochs=epochs, patience=epochs, accelerator=accelerator, context=context,
                            progress=False).fit(train)
    training = time.perf_counter() - started

    def spectra_per_second(**settings) -> float:
        for name, value in settings.items():
            setattr(detector, name, value)
        detector.score(test)  # warm-up (kernels, allocator)
        best = np.inf
        for _ in range(3):
            started = time.perf_counter()
            detector.score(test)
            best = min(best, time.perf_counter() - started)
        return shape[0] * shape[1] / best

    layouts = {"channels_last": spectra_per_second(MEMORY_FORMAT=torch.channels_last_3d),
               "contiguous": spectra_per_second(MEMORY_FORMAT=torch.contiguous_format)}
    detector.MEMORY_FORMAT = type(detector).MEMORY_FORMAT
    row = {
        "device": torch.cuda.get_device_name(0) if accelerator == "gpu" else "cpu", "context": context,
        "cubes": {**DRIFTED, "layout": "clusters"} if drifted else "the simulator's defaults",
        "torch_threads": torch.get_num_threads(), "epochs": detector.epochs_,
        "training_seconds": training, "seconds_per_epoch": training / detector.epochs_,
        "spectra_per_second": layouts["contiguous"],
        "spectra_per_second_by_layout": layouts,
        "channels_last_speedup": layouts["channels_last"] / layouts["contiguous"],
        "score_batch": detector.SCORE_BATCH,
        "parameters": detector.n_parameters_, "training_patches": detector.n_training_patches_,
        "peak_rss_MiB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_rss_growth_MiB": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - baseline) / 1024,
    }
    if context == "pixel":
        row["spectra_per_second_score_stride_8"] = spectra_per_second(score_stride=8)
    if accelerator == "gpu":
        row["peak_gpu_MiB"] = torch.cuda.max_memory_allocated() / 2**20
    queue.put(row)


def speed(epochs: int, shape=(64, 64)) -> dict:
    """CPU (and CUDA, when there is one) training and inference, each in a fresh process, for both contexts."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    rows = {}
    for accelerator in ["cpu"] + (["gpu"] if torch.cuda.is_available() else []):
        for where, drifted in (("pixel", False), ("neighbours", False), ("neighbours", True)):
            queue = context.Queue()
            process = context.Process(target=_speed_on, args=(accelerator, epochs, shape, where, queue, drifted))
            process.start()
            rows[f"{accelerator}_{where}" + ("_drifted" if drifted else "")] = queue.get()
            process.join()
    train = simulate_fe_l23(shape, anomaly_fraction=0.0, seed=1)["counts"]
    test = simulate_fe_l23(shape, anomaly_fraction=0.01, seed=2)["counts"]
    started = time.perf_counter()
    PCADetector().fit(train).score(test)
    parameters = rows["cpu_pixel"]["parameters"]
    return {
        "cube": [*shape, int(train.sizes["energy"])], **rows,
        "pca_fit_and_score_seconds": time.perf_counter() - started,
        "parameters_vs_paper": parameters / PAPER["parameters"],
        # the paper's model in float32: weights, and weights + gradients + Adam's two moments
        "paper_weights_GiB": PAPER["parameters"] * 4 / 2**30,
        "paper_training_state_GiB": PAPER["parameters"] * 16 / 2**30,
    }


def paper_protocol(makers: dict, shape, seed: int) -> list[dict]:
    rows = []
    train = simulate_fe_l23(shape, anomaly_fraction=0.0, seed=20_000 + seed)["counts"]
    clean = simulate_fe_l23(shape, anomaly_fraction=0.0, seed=seed)["counts"]
    for name, make in makers.items():
        detector = make().fit(train)
        for shift_ev in (0.9, 2.0, 4.0, 6.0, 8.0, 11.4):
            channels = int(round(shift_ev / float(clean.eels.dispersion)))
            test = roll_l3_window(clean, channels, anomaly_fraction=0.014, seed=seed)
            scores = detector.score(test["counts"])
            metrics = default_flag_metrics(detector, scores, test["anomaly"])
            rows.append({"detector": name, "shift_eV": shift_ev, "roc_auc": metrics["roc_auc"], "f1": metrics["f1"]})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    default_epochs = inspect.signature(CVAEDetector.__init__).parameters["max_epochs"].default
    parser.add_argument("--epochs", type=int, default=default_epochs,
                        help=f"training epochs (default: CVAEDetector's, {default_epochs})")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--scoring", default=None,
                        help="only the grid, with this score for the Poisson CVAE and PCA (e.g. shift): "
                             "cvae_<scoring>.json, cvae_grid_<scoring>.csv")
    parser.add_argument("--paper-only", action="store_true",
                        help="only the paper's circular-roll protocol, with the CVAE's earlier default (deviance, "
                             "pixel context) beside its default: cvae_paper.json")
    parser.add_argument("--speed-only", action="store_true",
                        help="only the training/inference timing (CPU, and CUDA when present): cvae_speed.json")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    epochs = 2 if args.quick else args.epochs
    shape = (24, 24) if args.quick else (64, 64)
    if args.speed_only:
        timing = speed(epochs, (64, 64))
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "cvae_speed.json").write_text(json.dumps(timing, indent=2, default=float) + "\n")
        print(json.dumps(timing, indent=1, default=float))
        return
    if args.paper_only:
        makers = {**detectors(epochs), "cvae_poisson_deviance_pixel": lambda: CVAEDetector(
            likelihood="poisson", scoring="deviance", context="pixel", max_epochs=epochs, progress=False)}
        started = time.perf_counter()
        paper = paper_protocol(makers, shape, seed=0)
        summary = {"seconds": round(time.perf_counter() - started, 1), "epochs": epochs, "paper_protocol": paper,
                   "paper": PAPER}
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"cvae_paper{'_quick' if args.quick else ''}.json").write_text(
            json.dumps(summary, indent=2, default=float) + "\n")
        for name in makers:
            print(f"{name:28s} F1", np.round([r["f1"] for r in paper if r["detector"] == name], 3),
                  "AUC", np.round([r["roc_auc"] for r in paper if r["detector"] == name], 3))
        return
    grid_kwargs = dict(shifts=(0.5, 2.0), fractions=(0.05,), layouts=("pixels",), doses=(200.0,), seeds=(0,),
                       shape=shape) if args.quick else dict(
        shifts=(0.1, 0.25, 0.5, 1.0, 2.0, 4.0), fractions=(0.01,), layouts=("pixels", "clusters"),
        doses=(200.0, 20.0), seeds=(0,), shape=shape)
    started = time.perf_counter()
    makers = detectors(epochs, args.scoring)
    grid = evaluation_grid(makers, progress=True, **grid_kwargs)
    paper = paper_protocol(makers, shape, seed=0)
    timing = None if args.scoring else speed(epochs, shape)
    suffix = ("_" + args.scoring if args.scoring else "") + ("_quick" if args.quick else "")
    args.out.mkdir(parents=True, exist_ok=True)
    grid.to_csv(args.out / f"cvae_grid{suffix}.csv", index=False)
    table = grid.groupby(["detector", "dose", "shift_eV"])[["roc_auc", "f1"]].mean().round(3).reset_index()
    summary = {
        "seconds": round(time.perf_counter() - started, 1), "epochs": epochs, "grid": {
            k: list(v) if isinstance(v, tuple) else v for k, v in grid_kwargs.items()},
        "at_1_percent": table.to_dict(orient="records"),
        "paper_protocol": paper, "paper": PAPER, "speed": timing,
    }
    (args.out / f"cvae{suffix}.json").write_text(json.dumps(summary, indent=2, default=float) + "\n")
    print(table.pivot_table(index=["detector", "dose"], columns="shift_eV", values=["roc_auc", "f1"]).to_string())
    if timing:
        print(json.dumps(timing, indent=1, default=float))
    print(np.round(np.array([[r["f1"] for r in paper if r["detector"] == d] for d in makers]), 3))


if __name__ == "__main__":
    main()
