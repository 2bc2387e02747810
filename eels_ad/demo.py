"""``eels-ad demo``: the whole pipeline on the embedded sample cube.

Load the sample, detect anomalies with PCA trained robustly on the image itself and with a 3D-CVAE
trained on the pixels PCA left as bulk, compare with the sample's ground truth, test every energy
channel of the flagged pixels against the bulk with a negative-binomial model, map the Fe edge shift
of every pixel with its error bar, denoise a low-dose copy of a region with SPIRAL-TAP, and write the
results (NetCDF), the metrics (JSON), a figure (PNG) and an offline HTML report to a folder.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from pathlib import Path
from typing import Any

import xarray as xr


def _write_json(payload: dict[str, Any], path: Path, overwrite: bool) -> None:
    from .io import atomic_path

    with atomic_path(path, overwrite=overwrite) as temporary:
        temporary.write_text(json.dumps(payload, indent=2) + "\n")


def run_demo(out: str | os.PathLike = "eels-ad-demo", *, overwrite: bool = False, progress: bool = True,
             verbose: bool = False, seed: int = 0, cvae_epochs: int = 8) -> dict[str, Any]:
    """Run the demo pipeline and write its outputs to ``out``.

    Parameters
    ----------
    out
        Output folder; it must not hold an earlier demo unless ``overwrite``.
    overwrite
        Replace the outputs of an earlier run.
    progress
        Print one line per step.
    verbose
        Also show Lightning's progress bars and the libraries' warnings (otherwise the warnings are
        kept in ``metrics.json`` under ``"warnings"``, not printed).
    seed
        Seed of every random step.
    cvae_epochs
        Training epochs of the 3D-CVAE (about 8 s each on 2 CPU cores).

    Returns
    -------
    dict
        The metrics and the paths written; ``"text"`` is a short summary for people.
    """
    out = Path(out)
    paths = {name: out / file for name, file in _OUTPUTS.items()}
    if not overwrite:
        for path in paths.values():
            if path.exists():
                raise FileExistsError(f"{path} exists from an earlier demo; pass --overwrite to replace it")

    def say(message: str) -> None:
        if progress:
            print(message, flush=True)

    with warnings.catch_warnings(record=not verbose) as caught:
        if not verbose:
            warnings.simplefilter("always")
        summary = _run(out, paths, overwrite, say, verbose, seed, cvae_epochs)
    summary["warnings"] = [f"{w.category.__name__}: {w.message}" for w in caught or []]
    _write_json({k: v for k, v in summary.items() if k != "text"}, paths["metrics"], overwrite)
    return summary


def _run(out: Path, paths: dict[str, Path], overwrite: bool, say, verbose: bool, seed: int,
         cvae_epochs: int) -> dict[str, Any]:
    from . import data
    from .io import save
    from .prepare import prepare

    started = time.perf_counter()
    truth = data.sample_dataset()
    cube = prepare(data.sample_cube())
    say(f"[1/7] loaded the sample cube {dict(cube.sizes)} from {data.sample_path()}; {cube.attrs['prepared']}")
    say("[2/7] PCA (Poisson-normalised, robust fit on the image itself) ...")
    pca = _detect_pca(cube, truth, seed)
    say(f"[3/7] 3D-CVAE: a short CPU training ({cvae_epochs} epochs) on the pixels PCA left as bulk ...")
    cvae = _detect_cvae(cube, truth, pca["labels"], seed, cvae_epochs, verbose)
    say("[4/7] negative-binomial test of every energy channel: flagged pixels against the bulk ...")
    channels, nb_metrics = _channel_tests(cube, pca["labels"])
    say("[5/7] edge-shift map: a Poisson fit of the bulk Fe L2,3 template to every pixel (eV +- Cramer-Rao) ...")
    shifts, shift_metrics = _shift_map(cube, truth)
    say("[6/7] SPIRAL-TAP: 3-D TV denoising of a low-dose copy (2 % of the counts) of a 32 x 32 region ...")
    spiral = _denoise_low_dose(cube, seed)

    say("[7/7] writing results ...")
    results = xr.Dataset(
        {**_score_variables("pca", pca), **_score_variables("cvae", cvae), "true_anomaly": truth["anomaly"],
         "total_counts": cube.eels.total_counts()},
        attrs={"source": str(data.sample_path()), "pipeline": "eels-ad demo"},
    )
    out.mkdir(parents=True, exist_ok=True)
    save(results, paths["results"], overwrite=overwrite)
    save(shifts, paths["shifts"], overwrite=overwrite)
    save(xr.Dataset({"low_dose": spiral["low_dose"], "denoised": spiral["denoised"]}), paths["denoised"],
         overwrite=overwrite)
    if channels is not None:
        save(channels, paths["channels"], overwrite=overwrite)
        _save_channel_figure(channels, paths["figure"], overwrite)
    _write_report(cube, truth, pca, cvae, channels, nb_metrics, spiral, shifts, paths["report"], overwrite)
    summary: dict[str, Any] = {
        "sample": {"shape": dict(cube.sizes), "n_true_anomalies": int(truth["anomaly"].sum()),
                   "shift_eV": float(truth.attrs["shift_eV"]), "dose": float(truth.attrs["dose"]),
                   "prepared": cube.attrs["prepared"]},
        "pca": pca["metrics"],
        "cvae": cvae["metrics"],
        "negative_binomial": nb_metrics,
        "edge_shift": shift_metrics,
        "spiral_tap": spiral["metrics"],
        "seconds": round(time.perf_counter() - started, 2),
        "outputs": {name: str(path) for name, path in paths.items()},
    }
    summary["text"] = _summary_text(summary, paths)
    return summary


_OUTPUTS = {"results": "results.nc", "metrics": "metrics.json", "channels": "nb_channels.nc",
            "figure": "nb_channels.png", "report": "report.html", "denoised": "denoised.nc", "shifts": "shifts.nc"}


def _shift_map(cube: xr.DataArray, truth: xr.Dataset) -> tuple[xr.Dataset, dict[str, Any]]:
    import numpy as np

    from .quantify import edge_shift_map

    tic = time.perf_counter()
    shifts = edge_shift_map(cube)
    anomalous = truth["anomaly"].values
    fitted, error = shifts["shift"].values, shifts["shift_error"].values
    truth_shift = truth["shift"].values
    metrics = {
        "mean_shift_of_true_anomalies_eV": float(np.nanmean(fitted[anomalous])) if anomalous.any() else None,
        "mean_shift_of_bulk_eV": float(np.nanmean(fitted[~anomalous])),
        "median_error_eV": float(np.nanmedian(error)),
        "coverage_of_1_sigma": float(np.nanmean(np.abs(fitted - truth_shift) < error)),
        "converged": int(shifts["converged"].sum()),
        "seconds": round(time.perf_counter() - tic, 2),
    }
    return shifts, metrics


def _score_variables(name: str, detection: dict[str, Any]) -> dict[str, xr.DataArray]:
    """A detector's maps as variables of their own (two detectors' per-pixel coordinates would clash)."""
    from .detect._base import SPATIAL_COORDS

    scores = detection["scores"]
    variables = {f"{name}_score": scores.drop_vars([c for c in SPATIAL_COORDS if c in scores.coords]),
                 f"{name}_anomalous": detection["labels"]}
    variables.update({f"{name}_{c}": scores[c].reset_coords(drop=True) for c in SPATIAL_COORDS if c in scores.coords})
    return variables


def _detect_pca(cube: xr.DataArray, truth: xr.Dataset, seed: int) -> dict[str, Any]:
    from .detect import PCADetector, bimodality
    from .evaluate import detection_metrics

    tic = time.perf_counter()
    detector = PCADetector(robust=True).fit(cube)
    scores = detector.score(cube)
    labels = detector.flag(scores)
    metrics = detection_metrics(scores, truth["anomaly"], labels)
    metrics.update(n_components=detector.n_components_, n_trimmed=detector.n_trimmed_,
                   seconds=round(time.perf_counter() - tic, 3), bimodality=bimodality(scores, seed=seed))
    return {"detector": detector, "scores": scores, "labels": labels, "metrics": metrics}


def _detect_cvae(cube: xr.DataArray, truth: xr.Dataset, bulk_guess: xr.DataArray, seed: int, epochs: int,
                 progress: bool) -> dict[str, Any]:
    from .detect import CVAEDetector, bimodality
    from .evaluate import detection_metrics

    detector = CVAEDetector(max_epochs=epochs, seed=seed, progress=progress).fit(cube, mask=~bulk_guess)
    scores = detector.score(cube)
    labels = detector.flag(scores)
    metrics = detection_metrics(scores, truth["anomaly"], labels)
    metrics.update(parameters=detector.n_parameters_, epochs=detector.epochs_,
                   training_seconds=round(detector.training_seconds_, 1), bimodality=bimodality(scores, seed=seed))
    return {"detector": detector, "scores": scores, "labels": labels, "metrics": metrics}


def _channel_tests(cube: xr.DataArray, labels: xr.DataArray) -> tuple[xr.Dataset | None, dict[str, Any]]:
    from .stats import compare_regions

    if int(labels.sum()) < 2:
        return None, {"skipped": "fewer than 2 flagged pixels"}
    pre_edge = (float(cube["energy"][0]), float(cube["energy"][0]) + 30.0)
    channels = compare_regions(cube, ~labels, labels, method="mom", normalize_range=pre_edge)
    significant = channels["energy"].values[channels["significant"].values]
    return channels, {"n_significant_channels": int(significant.size),
                      "significant_range_eV": [float(significant.min()), float(significant.max())]
                      if significant.size else None,
                      "normalize_range_eV": list(pre_edge)}


def _denoise_low_dose(cube: xr.DataArray, seed: int) -> dict[str, Any]:
    import numpy as np

    from .reconstruct import denoise_cube

    region = cube.isel(y=slice(0, 32), x=slice(0, 32)).eels.crop(690.0, 740.0)
    thinned = np.random.default_rng(seed).binomial(region.values.astype(np.int64), 0.02)
    low_dose = region.copy(data=thinned)
    reference = region * 0.02  # the full-dose counts, scaled: the best available stand-in for the truth
    denoised = denoise_cube(low_dose, penalty="tv", weights=(1.0, 1.0, 0.5), truth=reference)
    raw_error = float(np.linalg.norm(low_dose.values - reference.values) / np.linalg.norm(reference.values))
    metrics = {"region": [32, 32, int(region.sizes["energy"])], "dose_fraction": 0.02,
               "mean_counts_per_voxel": float(low_dose.mean()), "error_vs_scaled_full_dose_raw": raw_error,
               "error_vs_scaled_full_dose_denoised": float(denoised.attrs["relative_error"]),
               "tau": float(denoised.attrs["tau"]), "iterations": int(denoised.attrs["iterations"]),
               "seconds": round(denoised.attrs["seconds"], 1)}
    return {"low_dose": low_dose, "denoised": denoised, "reference": reference, "metrics": metrics}


def _save_channel_figure(channels: xr.Dataset, path: Path, overwrite: bool) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from .io import atomic_path
    from .viz import plot_channel_tests

    figure = plot_channel_tests(channels, title="flagged pixels (B) against the bulk (A)")
    with atomic_path(path, overwrite=overwrite) as temporary:
        figure.savefig(temporary, format="png", dpi=100)


def _write_report(cube, truth, pca, cvae, channels, nb_metrics, spiral, shifts, path: Path,
                  overwrite: bool) -> None:
    from .viz import report, write_html

    detection = xr.Dataset({"score": pca["scores"], "anomalous": pca["labels"]},
                           attrs={"detector": "PCADetector (Poisson-normalised, robust fit on the image itself)",
                                  "threshold": float(pca["labels"].attrs["threshold"]),
                                  "source_file": str(cube.attrs.get("source_file", "the eels-ad sample"))})
    spiral_metrics = spiral["metrics"]
    rows = "; ".join(
        f"{name}: {m['n_flagged']} flagged, ROC AUC {m['roc_auc']:.3f}, F1 {m['f1']:.3f}"
        for name, m in (("PCA", pca["metrics"]), ("3D-CVAE", cvae["metrics"])))
    notes = [
        f"Sample: simulated Fe L2,3 spectrum image with {int(truth['anomaly'].sum())} pixels whose Fe edge is shifted "
        f"by {float(truth.attrs['shift_eV']):+g} eV (ground truth known). Against the truth: {rows}.",
        f"The maps are outlined where PCA flagged a pixel; the 3D-CVAE's score and the truth are beside them. "
        f"Negative-binomial test of the PCA-flagged pixels against the others: "
        f"{nb_metrics.get('n_significant_channels', 0)} energy channels differ at 5 % FDR.",
        f"Bottom panels: SPIRAL-TAP (3-D TV) on a copy of a 32 x 32 region with 2 % of the counts "
        f"({spiral_metrics['mean_counts_per_voxel']:.1f} counts per voxel): relative error against the scaled "
        f"full-dose counts {spiral_metrics['error_vs_scaled_full_dose_raw']:.3f} before, "
        f"{spiral_metrics['error_vs_scaled_full_dose_denoised']:.3f} after.",
    ]
    denoising = xr.Dataset({"low_dose": spiral["low_dose"], "denoised": spiral["denoised"],
                            "reference": spiral["reference"]})
    page = report(detection, cube, channels=channels, title="eels-ad demo report", notes=notes,
                  maps={"3D-CVAE score": cvae["scores"], "truth": truth["anomaly"].astype(float)},
                  denoising=denoising, quantities=shifts)
    write_html(page, path, overwrite=overwrite)


def _summary_text(summary: dict[str, Any], paths: dict[str, Path]) -> str:
    pca, cvae, nb, spiral = summary["pca"], summary["cvae"], summary["negative_binomial"], summary["spiral_tap"]
    shift = summary["edge_shift"]
    return (
        f"PCA: {pca['n_flagged']} pixels flagged, {pca['n_true']} true anomalies; "
        f"ROC AUC {pca['roc_auc']:.3f}, F1 {pca['f1']:.3f} "
        f"({pca['n_components']} components, {pca['n_trimmed']} training spectra trimmed)\n"
        f"3D-CVAE: {cvae['n_flagged']} pixels flagged; ROC AUC {cvae['roc_auc']:.3f}, "
        f"F1 {cvae['f1']:.3f} ({cvae['parameters']} parameters, {cvae['training_seconds']:.0f} s training)\n"
        f"NB test: {nb.get('n_significant_channels', 0)} energy channels differ at 5 % FDR, "
        f"{nb.get('significant_range_eV')} eV\n"
        f"edge-shift map: true anomalies {shift['mean_shift_of_true_anomalies_eV']:+.3f} eV, bulk "
        f"{shift['mean_shift_of_bulk_eV']:+.4f} eV, error {shift['median_error_eV']:.3f} eV per pixel "
        f"(1-sigma coverage {100 * shift['coverage_of_1_sigma']:.0f} %)\n"
        f"SPIRAL-TAP on a 2 % dose copy: relative error {spiral['error_vs_scaled_full_dose_raw']:.3f} -> "
        f"{spiral['error_vs_scaled_full_dose_denoised']:.3f} ({spiral['seconds']} s)\n"
        f"results: {paths['results']}\nmetrics: {paths['metrics']}\nfigure: {paths['figure']}\n"
        f"report (open in a browser, works offline): {paths['report']}\n"
        f"done in {summary['seconds']:.1f} s"
    )
