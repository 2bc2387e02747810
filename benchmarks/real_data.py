"""The pipeline on real spectrum images: what is flagged once gain, spikes and vacuum are handled.

For each real SI in ../shared/data/real/ (the Fe-oxide SI, the LSMO line scan, the 2 x 2 .dm4 SI): the gain
estimate, the spikes repaired, the vacuum pixels, and the pixels a robust PCA fitted on the image itself flags,
as maps (PNG). Then a planted test on the Fe-oxide SI: in 10 % of the particle pixels the counts of the Fe L2,3
window are moved up in energy by whole channels (real counts kept: counts[E] <- counts[E - k] inside the
window), and the ROC AUC and F1 of what is flagged are measured against the planted pixels with no
preparation, with the gain and vacuum but no spike repair, and with everything (the default).

Usage: python benchmarks/real_data.py [--shared ../shared]   ->   results/real_data.json, results/real_data.png
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import numpy as np

import eels_ad
from eels_ad.detect import PCADetector
from eels_ad.evaluate import detection_metrics
from eels_ad.prepare import prepare

RESULTS = Path(__file__).resolve().parent / "results"
FILES = ("fe_oxide_si.dm3", "lsmo_linescan.hspy", "eels_si_2x2.dm4")
FE_WINDOW = (690.0, 745.0)  # the stored axis: the Fe L3 maximum sits near 700.5 eV


def plant_shift(cube, candidates: np.ndarray, channels: int, share: float, seed: int):
    """Move the Fe L2,3 window of ``share`` of the ``candidates`` pixels up by ``channels`` channels."""
    rng = np.random.default_rng(seed)
    pixels = np.flatnonzero(candidates.ravel())
    chosen = rng.choice(pixels, size=max(1, int(round(share * pixels.size))), replace=False)
    truth = np.zeros(candidates.size, dtype=bool)
    truth[chosen] = True
    truth = truth.reshape(candidates.shape)
    energy = cube["energy"].values
    lo, hi = np.searchsorted(energy, FE_WINDOW)
    values = cube.values.copy()
    moved = values[truth, lo:hi - channels].copy()
    values[truth, lo + channels:hi] = moved
    return cube.copy(data=values), truth


def flag(cube, **pca):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        detector = PCADetector(robust=True, **pca).fit(cube)
        scores = detector.score(cube)
        labels = detector.flag(scores)
    return detector, scores, labels, [str(w.message)[:160] for w in caught]


def describe(path: Path) -> tuple[dict, dict]:
    raw = eels_ad.load(path)
    started = time.perf_counter()
    ready = prepare(raw)
    prepare_seconds = time.perf_counter() - started
    detector, scores, labels, caught = flag(ready)
    vacuum = np.asarray(ready["vacuum"].values)
    _, _, raw_labels, raw_warnings = flag(raw)
    row = {
        "file": path.name, "shape": list(raw.shape), "mean_counts_per_voxel": float(raw.mean()),
        "gain": ready.attrs["gain"], "gain_source": ready.attrs["gain_source"], "n_spikes": ready.attrs["n_spikes"],
        "spikes": [[int(i), int(j), float(ready["energy"][k])] for i, j, k in np.argwhere(ready["spike"].values)][:20],
        "n_vacuum_pixels": int(vacuum.sum()), "n_components": detector.n_components_,
        "n_trimmed": detector.n_trimmed_, "n_flagged": int(labels.sum()),
        "flagged_pixels": np.argwhere(labels.values).tolist(),
        "raw_pipeline": {"n_flagged": int(raw_labels.sum()),
                         "n_flagged_in_vacuum": int((raw_labels.values & vacuum).sum()), "warnings": raw_warnings},
        "warnings": caught, "prepare_seconds": round(prepare_seconds, 2),
    }
    maps = {"total counts": raw.sum("energy").values, "vacuum": vacuum.astype(float),
            "spikes per pixel": ready["spike"].sum("energy").values.astype(float), "PCA score": scores.values,
            "flagged": labels.values.astype(float), "flagged without prepare": raw_labels.values.astype(float)}
    return row, maps


def planted(path: Path, seed: int) -> list[dict]:
    raw = eels_ad.load(path)
    particle = ~np.asarray(prepare(raw, spikes=False)["vacuum"].values)
    rows = []
    for channels in (2, 4):
        cube, truth = plant_shift(raw, particle, channels, 0.10, seed)
        dispersion = float(cube.eels.dispersion)
        variants = {
            "no preparation": cube,
            "gain + vacuum, no spike repair": prepare(cube, spikes=False),
            "gain + vacuum + spike repair (default)": prepare(cube),
        }
        for name, ready in variants.items():
            for scoring in ("deviance", "shift", "shift+deviance"):
                _, scores, labels, caught = flag(ready, scoring=scoring)
                ranked = scores.values.copy()
                if "vacuum" in ready.coords:  # marked vacuum is never flagged: rank it last
                    ranked[ready["vacuum"].values] = np.nanmin(ranked) - 1.0
                metrics = detection_metrics(ranked, truth, labels.values)  # every pixel, vacuum included
                particle_auc = detection_metrics(scores.values[particle], truth[particle], threshold=np.inf)["roc_auc"]
                rows.append({"shift_channels": channels, "shift_eV": channels * dispersion, "variant": name,
                             "scoring": scoring, "roc_auc": metrics["roc_auc"], "roc_auc_particle": particle_auc,
                             "f1": metrics["f1"],
                             "precision": metrics["precision"], "recall": metrics["recall"],
                             "n_flagged": int(labels.sum()),
                             "n_flagged_in_vacuum": int((labels.values & ~particle).sum()),
                             "n_planted": int(truth.sum()), "warnings": len(caught)})
                print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in rows[-1].items()}, flush=True)
    return rows


def plot(all_maps: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(next(iter(all_maps.values())))
    fig, axes = plt.subplots(len(all_maps), len(names), figsize=(2.6 * len(names), 2.6 * len(all_maps)),
                             squeeze=False)
    for row, (file, maps) in enumerate(all_maps.items()):
        for column, name in enumerate(names):
            ax = axes[row, column]
            image = ax.imshow(maps[name], cmap="magma" if name in ("total counts", "PCA score") else "viridis",
                              aspect="auto", interpolation="nearest")
            fig.colorbar(image, ax=ax, fraction=0.046)
            ax.set_title(f"{name}" if row else f"{name}", fontsize=9)
            ax.set_xlabel("x (px)", fontsize=8)
            if column == 0:
                ax.set_ylabel(f"{file}\ny (px)", fontsize=8)
    fig.suptitle("real spectrum images: eels_ad.prepare + robust PCA on the image itself", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shared", type=Path, default=Path(__file__).resolve().parent.parent.parent / "shared")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    real = args.shared / "data" / "real"
    rows, all_maps = [], {}
    for name in FILES:
        row, maps = describe(real / name)
        rows.append(row)
        all_maps[name] = maps
        print({k: v for k, v in row.items() if k not in ("flagged_pixels", "spikes")}, flush=True)
    planted_rows = planted(real / "fe_oxide_si.dm3", args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    plot(all_maps, args.out / "real_data.png")
    (args.out / "real_data.json").write_text(json.dumps({"files": rows, "planted_fe_shift": planted_rows,
                                                         "seed": args.seed}, indent=2) + "\n")
    print(f"wrote {args.out / 'real_data.json'} and real_data.png")


if __name__ == "__main__":
    main()
