"""Spatial evidence and FDR flags, side by side: PCA and the CVAE, each with and without the spatial step.

Cells (64 x 64 x 320, Fe L2,3, dose 20 counts/channel, 1 % of pixels with a 0.5 eV whole-edge shift):
blobs (radius 2), a line, single pixels; each without drift and under a smooth +-1 eV energy drift that
nobody corrects (the training bulk has a drift of its own). Per detector and cell: ROC AUC of the
per-pixel score and of the pooled map, F1 / precision / recall of the default flags (5 % FDR), and the
realised false-discovery proportion. Over bulk-only test cubes: the fraction of cubes with any flag (under
the complete null every flag is false, so this is the realised FDR) and the mean false flags per cube.
Also the CVAE's training time and scoring speed. Writes ``results/spatial.json`` and ``results/spatial.png``.

    python benchmarks/spatial.py            # about 20 min on 2 cores
    python benchmarks/spatial.py --quick    # a smoke run (smaller, fewer cubes)
    python benchmarks/spatial.py --detectors "CVAE shift, neighbours" --null-cubes-cvae 150   # one row, more cubes
    python benchmarks/spatial.py --detectors "PCA deviance; PCA deviance, neighbours" --stem spatial_pca   # PCA rows
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import numpy as np
from sklearn.metrics import f1_score, precision_score, recall_score, roc_auc_score

import eels_ad
from eels_ad.detect import CVAEDetector, PCADetector

RESULTS = Path(__file__).parent / "results"


def detectors(cvae_time: float) -> dict:
    cvae = dict(max_time=cvae_time, progress=False, seed=0)  # the defaults: 12 epochs of 32 patches
    found = {
        "PCA default": lambda: PCADetector(),  # shift+deviance; the context chosen by the training cube's drift
        "PCA deviance": lambda: PCADetector(scoring="deviance", context="pixel"),
        "PCA shift": lambda: PCADetector(scoring="shift", context="pixel"),
        "PCA shift, neighbours": lambda: PCADetector(scoring="shift", context="neighbours"),
        "PCA deviance, neighbours": lambda: PCADetector(scoring="deviance", context="neighbours"),
        "PCA shift+deviance": lambda: PCADetector(scoring="shift+deviance", context="pixel"),
        "PCA shift+deviance, neighbours": lambda: PCADetector(scoring="shift+deviance", context="neighbours"),
        "CVAE default": lambda: CVAEDetector(**cvae),  # shift+deviance; the context chosen as PCA's
        "CVAE deviance": lambda: CVAEDetector(scoring="deviance", context="pixel", **cvae),
        "CVAE shift": lambda: CVAEDetector(scoring="shift", context="pixel", **cvae),
        "CVAE deviance, neighbours": lambda: CVAEDetector(scoring="deviance", context="neighbours", **cvae),
        "CVAE shift, neighbours": lambda: CVAEDetector(scoring="shift", context="neighbours", **cvae),
        "CVAE shift+deviance": lambda: CVAEDetector(scoring="shift+deviance", context="pixel", **cvae),
        "CVAE shift+deviance, neighbours": lambda: CVAEDetector(scoring="shift+deviance", context="neighbours",
                                                                **cvae),
    }
    return found


def cell(shape, drift, layout, seed, anomalies=True):
    return eels_ad.simulate_fe_l23(shape, dose=20, drift=drift, shift=0.5, layout=layout,
                                   anomaly_fraction=0.01 if anomalies else 0.0, seed=seed)


def per_pixel(scores):
    """The per-pixel map that travels with a pooled one: what the detector gives with ``spatial=False``."""
    return scores["pixel_score"].reset_coords(drop=True).rename("score").assign_attrs(score=scores.attrs["score"])


def flags_metrics(truth, labels) -> dict:
    t, f = np.asarray(truth).ravel(), np.asarray(labels).ravel()
    return {"f1": float(f1_score(t, f, zero_division=0)), "precision": float(precision_score(t, f, zero_division=0)),
            "recall": float(recall_score(t, f, zero_division=0)), "false_discovery_proportion":
            float((f & ~t).sum() / max(f.sum(), 1)), "flagged": int(f.sum())}


def wilson(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The 95 % Wilson interval of a binomial proportion."""
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return float(centre - half), float(centre + half)


def run(quick: bool, null_cubes: int = 200, null_cubes_cvae: int = 30, only: tuple[str, ...] = (),
        test_cubes: int = 1) -> dict:
    shape = (40, 40) if quick else (64, 64)
    n_null = 3 if quick else null_cubes
    n_null_cvae = 2 if quick else null_cubes_cvae
    cvae_time = 15.0 if quick else 120.0
    layouts = ("clusters", "line", "pixels")
    results = {"shape": list(shape), "dose": 20, "shift_eV": 0.5, "anomaly_fraction": 0.01, "cells": [], "null": [],
               "cvae": {}}
    for drift in (0.0, 1.0):
        bulk = cell(shape, drift, "pixels", seed=100, anomalies=False)["counts"]
        for name, make in detectors(cvae_time).items():
            if only and name not in only:
                continue
            tic = time.perf_counter()
            detector = make().fit(bulk)
            fit_seconds = time.perf_counter() - tic
            plain = make()
            plain.spatial = False
            plain.__dict__.update({k: v for k, v in detector.__dict__.items() if k.endswith("_")})
            if name.startswith("CVAE"):
                results["cvae"].setdefault(name, []).append({
                    "drift_eV": drift, "training_seconds": detector.training_seconds_, "epochs": detector.epochs_,
                    "parameters": detector.n_parameters_, "context": detector.context_,
                    "drift_range_eV": detector.drift_range_})
            for layout in layouts:
                truths, pixel_scores, pooled_scores, flags, plain_flags, seconds = [], [], [], [], [], 0.0
                for k in range(test_cubes):  # cube 0 is the table's cube of earlier sessions
                    sim = cell(shape, drift, layout, seed=200 + layouts.index(layout) + 10 * k)
                    tic = time.perf_counter()
                    scores = detector.score(sim["counts"])
                    seconds += time.perf_counter() - tic
                    truths.append(sim["anomaly"].values.ravel())
                    pixel_scores.append(scores["pixel_score"].values.ravel())
                    pooled_scores.append(scores.values.ravel())
                    flags.append(detector.flag(scores).values.ravel())
                    plain_flags.append(plain.flag(per_pixel(scores)).values.ravel())
                truth = np.concatenate(truths)
                # AUC over the cubes' pixels together; F1 of all their flags together (each cube's in per_cube_f1)
                row = {"detector": name, "drift_eV": drift, "layout": layout, "fit_seconds": fit_seconds,
                       "test_cubes": test_cubes, "spectra_per_second": truth.size / seconds,
                       "auc_pixel": float(roc_auc_score(truth, np.concatenate(pixel_scores))),
                       "auc_spatial": float(roc_auc_score(truth, np.concatenate(pooled_scores))),
                       "spatial": flags_metrics(truth, np.concatenate(flags)),
                       "pixel": flags_metrics(truth, np.concatenate(plain_flags)),
                       "per_cube_f1": [float(f1_score(t, f, zero_division=0))
                                       for t, f in zip(truths, flags, strict=True)]}
                results["cells"].append(row)
                print(f"{name:26s} drift {drift:.1f} {layout:8s} AUC pixel {row['auc_pixel']:.3f} spatial "
                      f"{row['auc_spatial']:.3f} | F1 spatial {row['spatial']['f1']:.3f} pixel {row['pixel']['f1']:.3f}"
                      f" | FDP {row['spatial']['false_discovery_proportion']:.3f}"
                      f" | F1 per cube {np.round(row['per_cube_f1'], 3).tolist()}", flush=True)
            count = n_null_cvae if name.startswith("CVAE") else n_null
            any_flag, false_flags, any_pixel, false_pixel = [], [], [], []
            for k in range(count):
                clean = cell(shape, drift, "pixels", seed=1000 + k, anomalies=False)["counts"]
                scores = detector.score(clean)
                flagged = int(detector.flag(scores).sum())
                unpooled = int(plain.flag(per_pixel(scores)).sum())
                any_flag.append(flagged > 0), false_flags.append(flagged)
                any_pixel.append(unpooled > 0), false_pixel.append(unpooled)
            results["null"].append({
                "detector": name, "drift_eV": drift, "cubes": count,
                "fdr_spatial": float(np.mean(any_flag)), "fdr_spatial_95ci": wilson(int(np.sum(any_flag)), count),
                "false_flags_spatial": float(np.mean(false_flags)),
                "fdr_pixel": float(np.mean(any_pixel)), "false_flags_pixel": float(np.mean(false_pixel))})
            print(f"{name:26s} drift {drift:.1f} bulk-only x{count}: realised FDR spatial "
                  f"{np.mean(any_flag):.3f} ({np.mean(false_flags):.2f} false/cube), pixel {np.mean(any_pixel):.3f}",
                  flush=True)
    return results


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(row["detector"] for row in results["cells"]))
    keys = [(d, lay) for d in (0.0, 1.0) for lay in ("clusters", "line", "pixels")]
    fig, axes = plt.subplots(1, 2, figsize=(15, 4.2), layout="constrained")
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        rows = {(r["drift_eV"], r["layout"]): r for r in results["cells"] if r["detector"] == name}
        x = np.arange(len(keys)) + i * width
        axes[0].bar(x, [rows[k]["auc_spatial"] for k in keys], width, label=name)
        axes[0].scatter(x, [rows[k]["auc_pixel"] for k in keys], color="k", marker="_", s=80, zorder=3)
        axes[1].bar(x, [rows[k]["spatial"]["f1"] for k in keys], width, label=name)
        axes[1].scatter(x, [rows[k]["pixel"]["f1"] for k in keys], color="k", marker="_", s=80, zorder=3)
    labels = [f"{lay}\n{'drift 1 eV' if d else 'no drift'}" for d, lay in keys]
    for ax, title in zip(axes, ("ROC AUC (bars: spatial, dashes: per pixel)",
                                "F1 at 5 % FDR (bars: spatial, dashes: per pixel)"), strict=True):
        ax.set_xticks(np.arange(len(keys)) + 0.4 - width / 2, labels)
        ax.set_title(title)
        ax.set_ylim(0, 1.02)
    axes[0].axhline(0.98, color="grey", lw=0.8, ls=":")
    axes[1].axhline(0.95, color="grey", lw=0.8, ls=":")
    fig.legend(*axes[1].get_legend_handles_labels(), loc="outside right center", fontsize=8)
    fig.suptitle(f"0.5 eV shifts, 1 % of pixels, dose 20, {results['shape'][0]}x{results['shape'][1]}x320")
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run")
    parser.add_argument("--plot-only", action="store_true", help="redraw the PNG from the saved JSON")
    parser.add_argument("--null-cubes", type=int, default=200, help="bulk-only cubes per PCA row")
    parser.add_argument("--null-cubes-cvae", type=int, default=30, help="bulk-only cubes per CVAE row")
    parser.add_argument("--detectors", default="", help="only these rows, ';'-separated (e.g. 'CVAE shift, "
                        "neighbours'): written to results/spatial_only.{json,png}, the full table kept")
    parser.add_argument("--test-cubes", type=int, default=1,
                        help="test cubes per cell (F1 of their flags together, AUC of their pixels together)")
    parser.add_argument("--stem", help="the results' file name (default spatial, spatial_only with --detectors, "
                        "spatial_quick with --quick)")
    args = parser.parse_args()
    if args.plot_only:
        plot(json.loads((RESULTS / "spatial.json").read_text()), RESULTS / "spatial.png")
        return
    warnings.simplefilter("ignore")
    tic = time.perf_counter()
    only = tuple(name.strip() for name in args.detectors.split(";") if name.strip())
    unknown = set(only) - set(detectors(0.0))
    if unknown:
        parser.error(f"unknown detectors {sorted(unknown)}; choose from {list(detectors(0.0))}")
    results = run(args.quick, args.null_cubes, args.null_cubes_cvae, only, args.test_cubes)
    results["seconds"] = time.perf_counter() - tic
    RESULTS.mkdir(exist_ok=True)
    stem = args.stem or ("spatial_quick" if args.quick else "spatial_only" if only else "spatial")
    (RESULTS / f"{stem}.json").write_text(json.dumps(results, indent=1))
    plot(results, RESULTS / f"{stem}.png")
    print(f"wrote {RESULTS / stem}.json and .png in {results['seconds']:.0f} s")


if __name__ == "__main__":
    main()
