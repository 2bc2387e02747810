"""Quantity maps against the physical limit, and against the methods a user has today.

Writes ``benchmarks/results/quantify.json`` and ``quantify.png``. Run: ``python benchmarks/quantify.py``
(about 5 minutes on 2 CPU cores; ``--quick`` for a smaller run).

1. Shift precision. Simulated Fe L2,3 cubes at 0.1 eV per channel (685 - 735 eV), pre-edge doses 20 and
   200 counts per channel; a quarter of the pixels shifted by each of -1 ... +1 eV, the rest bulk.
   Ours: :func:`eels_ad.quantify.edge_shift_map` with its default template (the cube's own bulk) and
   with the true bulk spectrum as a reference. The Cramer-Rao bound of every pixel is the error of
   the same model fitted to the noise-free cube with the true template (inverse Fisher information at
   the truth, amplitude and background free). Alternatives on the same cubes: the L3 maximum
   (argmax), the L3 centroid, HyperSpy's cross-correlation ``estimate_shift1D`` and, on 2 x 2 pixels
   per shift, eXSpy's ``EELSModel`` (power law + hydrogenic Fe L3 edge with a free onset).
2. Speed: spectra per second of the shift map at 320 channels, side by side with a plain numpy pass
   over the same cube (the ratio is what to compare across machines).
3. Drift: with a low-loss image (zero-loss drift, local shifts after correction against the bound)
   and without (separated drift surface, local 0.3 eV blobs: ROC AUC).
4. Valence: fractions of simulated mixtures of the two shared references.
5. Real data: the LSMO dual-EELS line scan in ../shared: the drift from its zero-loss peak, the Mn L3
   shift and the L3/L2 ratio along the line after correction, with error bars.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
import warnings
from pathlib import Path

import numpy as np
import xarray as xr

import eels_ad
from eels_ad.prepare import prepare, zero_loss_drift
from eels_ad.quantify import edge_shift_map, read_references, separate_drift, valence_map, white_line_ratio_map
from eels_ad.simulate import simulate_mixture

RESULTS = Path(__file__).resolve().parent / "results"
SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "real"
ENERGY = 685.0 + 0.1 * np.arange(500)
FIT_RANGE = (690.0, 730.0)
OURS = "ours (cube's own bulk template)"


def _cube(shift: float, dose: float, seed: int, shape, noise: bool = True) -> xr.Dataset:
    return eels_ad.simulate_fe_l23(shape, energy=ENERGY, shift=shift, anomaly_fraction=0.25, dose=dose,
                                   seed=seed, noise=noise)


def _as_counts(array: xr.DataArray) -> xr.DataArray:
    return array.assign_attrs(units="counts")


def _stats(estimate: np.ndarray, truth: float, bound: np.ndarray, error: np.ndarray | None = None) -> dict:
    ok = np.isfinite(estimate)
    out = {"bias_eV": float(np.mean(estimate[ok]) - truth), "spread_eV": float(np.std(estimate[ok], ddof=1)),
           "n": int(ok.sum())}
    out["bias_standard_error_eV"] = out["spread_eV"] / np.sqrt(out["n"])
    out["spread_over_bound"] = out["spread_eV"] / float(np.sqrt(np.mean(bound[ok] ** 2)))
    if error is not None:
        out["coverage_1sigma"] = float(np.mean(np.abs(estimate[ok] - truth) < error[ok]))
    return out


def _argmax(counts: np.ndarray, energy: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    inside = (energy >= window[0]) & (energy <= window[1])
    return energy[inside][np.argmax(counts[:, inside], axis=-1)]


def _centroid(counts: np.ndarray, energy: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    inside = (energy >= window[0]) & (energy <= window[1])
    values = counts[:, inside] - counts[:, inside].min(axis=-1, keepdims=True)
    return values @ energy[inside] / values.sum(axis=-1)


def _hyperspy_shifts(counts: np.ndarray, template: np.ndarray, energy: np.ndarray) -> np.ndarray:
    import hyperspy.api as hs

    stack = np.concatenate([template[None] * counts.sum() / counts.shape[0] / template.sum(), counts])
    signal = hs.signals.Signal1D(stack)
    axis = signal.axes_manager.signal_axes[0]
    axis.offset, axis.scale, axis.units = float(energy[0]), float(energy[1] - energy[0]), "eV"
    shifts = signal.estimate_shift1D(start=FIT_RANGE[0], end=FIT_RANGE[1], reference_indices=(0,),
                                     interpolate=True, number_of_interpolation_points=5, show_progressbar=False)
    return -(np.asarray(shifts) - shifts[0])[1:]  # estimate_shift1D returns the shift that aligns: its negative


def _exspy_onsets(counts: np.ndarray, energy: np.ndarray) -> tuple[np.ndarray, float]:
    import hyperspy.api as hs

    signal = hs.signals.Signal1D(counts.astype(float))
    signal.set_signal_type("EELS")
    axis = signal.axes_manager.signal_axes[0]
    axis.offset, axis.scale, axis.units = float(energy[0]), float(energy[1] - energy[0]), "eV"
    signal.set_microscope_parameters(beam_energy=200, convergence_angle=10, collection_angle=20)
    signal.add_elements(("Fe",))
    model = signal.create_model(GOS="hydrogenic", auto_background=True, auto_add_edges=True)
    edge = model.components.Fe_L3
    edge.onset_energy.free = True
    tic = time.perf_counter()
    model.multifit(show_progressbar=False)
    seconds = time.perf_counter() - tic
    return np.asarray(edge.onset_energy.map["values"], dtype=float).ravel(), counts.shape[0] / seconds


def shift_precision(doses, shifts, shape, exspy_pixels: int) -> dict:
    table: dict = {}
    for dose in doses:
        rows = {}
        template_cube = eels_ad.simulate_fe_l23((8, 8), energy=ENERGY, anomaly_fraction=0.0, dose=dose, seed=99,
                                                noise=False)["counts"]
        true_template = template_cube.mean(("y", "x"))
        reference_l3 = float(ENERGY[np.argmax(true_template.values)])
        l3_window = (reference_l3 - 3.0, reference_l3 + 3.0)
        centroid_window = (reference_l3 - 1.5, reference_l3 + 1.5)
        template_centroid = _centroid(true_template.values[None], ENERGY, centroid_window)[0]
        for k, shift in enumerate(shifts):
            seed = 1000 * int(dose) + k
            sim = _cube(shift, dose, seed, shape)
            clean = _cube(shift, dose, seed, shape, noise=False)
            moved = sim["anomaly"].values
            bound = edge_shift_map(_as_counts(clean["counts"]), true_template, energy_range=FIT_RANGE)
            ours = edge_shift_map(sim["counts"], energy_range=FIT_RANGE)
            ours_reference = edge_shift_map(sim["counts"], true_template, energy_range=FIT_RANGE)
            crb = bound["shift_error"].values[moved]
            counts = sim["counts"].values[moved].astype(float)
            row = {
                OURS: _stats(ours["shift"].values[moved], shift, crb,
                                                          ours["shift_error"].values[moved]),
                "ours (true bulk as reference)": _stats(ours_reference["shift"].values[moved], shift, crb,
                                                        ours_reference["shift_error"].values[moved]),
                "L3 maximum (argmax)": _stats(_argmax(counts, ENERGY, l3_window) - reference_l3, shift, crb),
                "L3 centroid": _stats(_centroid(counts, ENERGY, centroid_window) - template_centroid, shift, crb),
                "HyperSpy estimate_shift1D": _stats(_hyperspy_shifts(counts, true_template.values, ENERGY), shift,
                                                    crb),
                "cramer_rao_bound_eV": float(np.sqrt(np.mean(crb ** 2))),
            }
            if exspy_pixels and dose == max(doses):
                onsets, rate = _exspy_onsets(counts[:exspy_pixels], ENERGY)
                row["eXSpy EELSModel (free onset)"] = {"onsets_eV": onsets.tolist(), "spectra_per_second": rate}
            rows[f"{shift:+g} eV"] = row
            mine = row[OURS]
            print(f"dose {dose:g}, shift {shift:+g} eV: ours bias {mine['bias_eV']:+.4f} eV, "
                  f"spread / bound {mine['spread_over_bound']:.3f}, coverage {mine['coverage_1sigma']:.3f}", flush=True)
        if exspy_pixels and dose == max(doses):
            _exspy_against_truth(rows, shifts, dose, shape, exspy_pixels)
        cells = [rows[key][OURS] for key in rows]
        n = sum(cell["n"] for cell in cells)
        ratios = [cell["spread_over_bound"] for cell in cells]
        rows["pooled over the shifts"] = {OURS: {
            "coverage_1sigma": sum(cell["coverage_1sigma"] * cell["n"] for cell in cells) / n,
            "coverage_standard_error": float(np.sqrt(0.68 * 0.32 / n)), "n": n,
            "largest_abs_bias_eV": max(abs(cell["bias_eV"]) for cell in cells),
            "spread_over_bound_range": [min(ratios), max(ratios)]}}
        table[f"dose {dose:g}"] = rows
    return table


def _exspy_against_truth(rows: dict, shifts, dose: float, shape, n: int) -> None:
    """eXSpy's onsets are absolute: their shift is the onset minus the bulk's onset (fitted the same way)."""
    bulk = _cube(0.0, dose, 7, shape)
    counts = bulk["counts"].values[~bulk["anomaly"].values][:n].astype(float)
    onsets, _ = _exspy_onsets(counts, ENERGY)
    reference = float(np.mean(onsets))
    for shift in shifts:
        entry = rows[f"{shift:+g} eV"]["eXSpy EELSModel (free onset)"]
        estimate = np.asarray(entry.pop("onsets_eV")) - reference
        entry.update(bias_eV=float(estimate.mean() - shift),
                     spread_eV=float(estimate.std(ddof=1)) if estimate.size > 1 else float("nan"), n=int(estimate.size))


def speed(shape) -> dict:
    sim = eels_ad.simulate_fe_l23(shape, shift=0.5, anomaly_fraction=0.05, seed=3)
    cube = sim["counts"]
    values = np.asarray(cube.values, dtype=float)
    tic = time.perf_counter()
    for _ in range(3):
        np.log1p(values).sum()
    numpy_pass = (time.perf_counter() - tic) / 3
    tic = time.perf_counter()
    shifts = edge_shift_map(cube)
    seconds = time.perf_counter() - tic
    n = cube.sizes["y"] * cube.sizes["x"]
    return {"shape": list(cube.shape), "seconds": seconds, "spectra_per_second": n / seconds,
            "target_spectra_per_second": 1e5, "numpy_log_pass_seconds": numpy_pass,
            "seconds_over_numpy_passes": seconds / numpy_pass, "converged": int(shifts["converged"].sum())}


def drift(shape) -> dict:
    out: dict = {}
    sim = eels_ad.simulate_fe_l23(shape, drift=1.5, row_jitter=0.05, low_loss=True, shift=0.3, layout="clusters",
                                  anomaly_fraction=0.05, dose=200, seed=21)
    clean = eels_ad.simulate_fe_l23(shape, drift=1.5, row_jitter=0.05, shift=0.3, layout="clusters",
                                    anomaly_fraction=0.05, dose=200, seed=21, noise=False)
    zero_loss = zero_loss_drift(sim["low_loss"])
    error = zero_loss["drift"] - sim["drift"]
    local = edge_shift_map(sim["counts"], drift=zero_loss, max_shift=1.0)
    template = eels_ad.simulate_fe_l23((8, 8), anomaly_fraction=0.0, seed=99, noise=False)["counts"].mean(("y", "x"))
    bound = edge_shift_map(_as_counts(clean["counts"]), template, drift=sim["drift"], max_shift=1.0)
    bulk = ~sim["anomaly"].values
    out["with low loss"] = {
        "drift_rms_error_eV": float(np.sqrt((error ** 2).mean())),
        "drift_range_eV": [float(sim["drift"].min()), float(sim["drift"].max())],
        "local_shift_bulk_bias_eV": float(np.nanmean(local["shift"].values[bulk])),
        "local_shift_spread_over_bound": float(np.nanstd(local["shift"].values[bulk], ddof=1)
                                               / np.sqrt(np.mean(bound["shift_error"].values[bulk] ** 2))),
        "local_shift_of_blobs_eV": float(np.nanmean(local["shift"].values[~bulk])),
    }
    from sklearn.metrics import roc_auc_score

    for dose in (200, 20):
        sim = eels_ad.simulate_fe_l23(shape, drift=1.0, row_jitter=0.05, shift=0.3, layout="clusters",
                                      anomaly_fraction=0.05, dose=dose, seed=22)
        first = edge_shift_map(sim["counts"], max_shift=2.5)
        parts = separate_drift(edge_shift_map(sim["counts"], drift=separate_drift(first)["drift"], max_shift=1.0))
        offset = (parts["drift"] - sim["drift"]).values
        out[f"without low loss, dose {dose}"] = {
            "drift_rms_error_eV": float(np.sqrt(np.mean((offset - offset.mean()) ** 2))),
            "drift_constant_offset_eV": float(offset.mean()),
            "local_roc_auc": float(roc_auc_score(sim["anomaly"].values.ravel(),
                                                 np.abs(parts["local_z"].fillna(0).values.ravel()))),
        }
    return out


def valence(shape) -> dict:
    path = SHARED / "fe_l23_references.csv"
    if not path.exists():
        return {"skipped": f"{path} is absent"}
    references = read_references(path)
    fraction = np.random.default_rng(5).uniform(0, 1, shape)
    out = {}
    for dose in (200, 20):
        sim = simulate_mixture(references, fraction, dose=dose, seed=6)
        result = valence_map(sim["counts"], references)
        estimate = result["fraction"].sel(component="wustite").values
        error = result["fraction_error"].sel(component="wustite").values
        out[f"dose {dose}"] = {"rms_error": float(np.sqrt(np.mean((estimate - fraction) ** 2))),
                               "mean_reported_error": float(np.mean(error)),
                               "coverage_1sigma": float(np.mean(np.abs(estimate - fraction) < error))}
    return out


def white_line_ratio(shape) -> dict:
    out = {}
    for dose in (200, 20):
        sim = eels_ad.simulate_fe_l23(shape, anomaly_l3_l2_ratio=5.0, anomaly_fraction=0.2, shift=0.0, dose=dose,
                                      include_expected=True, seed=23)
        ratio = white_line_ratio_map(sim["counts"])
        windows = {key[:-3]: tuple(ratio.attrs[key]) for key in
                   ("l3_range_eV", "l2_range_eV", "background_range_eV", "continuum_range_eV")}
        clean = white_line_ratio_map(_as_counts(sim["expected"]), **windows)
        z = ((ratio["l3_l2_ratio"] - clean["l3_l2_ratio"]) / ratio["l3_l2_ratio_error"]).values
        anomalous = sim["anomaly"].values
        out[f"dose {dose}"] = {
            "bulk_ratio_noise_free": float(np.nanmean(clean["l3_l2_ratio"].values[~anomalous])),
            "anomaly_ratio_noise_free": float(np.nanmean(clean["l3_l2_ratio"].values[anomalous])),
            "simulated_area_ratios": [4.0, 5.0],
            "bias_against_noise_free": float(np.nanmean(ratio["l3_l2_ratio"].values - clean["l3_l2_ratio"].values)),
            "coverage_1sigma": float(np.nanmean(np.abs(z) < 1)),
            "nan_pixels": int(np.isnan(ratio["l3_l2_ratio"].values).sum()),
        }
    return out


def lsmo() -> dict:
    core_path, low_path = SHARED / "lsmo_linescan.hspy", SHARED / "lsmo_linescan_low_loss.hspy"
    if not core_path.exists():
        return {"skipped": f"{core_path} is absent"}
    core = prepare(eels_ad.load(core_path).sel(energy=slice(590, 700)))
    zero_loss = zero_loss_drift(eels_ad.load(low_path))
    shifts = edge_shift_map(core, drift=zero_loss, energy_range=(612, 670), background_range=(612, 628))
    uncorrected = edge_shift_map(core, energy_range=(612, 670), background_range=(612, 628))
    ratio = white_line_ratio_map(core, background_range=(600, 628))
    return {
        "gain": core.attrs["gain"],
        "zero_loss_centre_eV": zero_loss["zero_loss_centre"].values.ravel().tolist(),
        "zero_loss_centre_error_eV": zero_loss["zero_loss_centre_error"].values.ravel().tolist(),
        "mn_l3_shift_eV": shifts["shift"].values.ravel().tolist(),
        "mn_l3_shift_error_eV": shifts["shift_error"].values.ravel().tolist(),
        "mn_l3_shift_uncorrected_eV": uncorrected["shift"].values.ravel().tolist(),
        "reduced_deviance": (shifts["deviance"].values.ravel() / shifts.attrs["degrees_of_freedom"]).tolist(),
        "l3_l2_ratio": ratio["l3_l2_ratio"].values.ravel().tolist(),
        "l3_l2_ratio_error": ratio["l3_l2_ratio_error"].values.ravel().tolist(),
        "ratio_windows_eV": {k: v for k, v in ratio.attrs.items() if k.endswith("_eV")},
    }


def _figure(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(2, 2, figsize=(12, 8))
    for dose_key, rows in results["shift_precision"].items():
        keys = [k for k in rows if k.endswith("eV")]
        shifts = [float(k.split()[0]) for k in keys]
        for method in (OURS, "L3 maximum (argmax)", "L3 centroid",
                       "HyperSpy estimate_shift1D"):
            axes[0, 0].plot(shifts, [rows[k][method]["spread_over_bound"] for k in keys], "o-",
                            label=f"{method}, {dose_key}")
    axes[0, 0].axhline(1.15, color="k", ls="--", lw=0.8)
    axes[0, 0].set(yscale="log", xlabel="true shift (eV)", ylabel="spread / Cramer-Rao bound",
                   title="shift precision (dashed: 1.15)")
    axes[0, 0].legend(fontsize=6)
    lsmo_results = results["lsmo"]
    if "skipped" not in lsmo_results:
        x = np.arange(len(lsmo_results["mn_l3_shift_eV"])) * 3.2
        axes[0, 1].plot(x, lsmo_results["zero_loss_centre_eV"], "k.-")
        axes[0, 1].set(xlabel="position along the line (nm)", ylabel="zero-loss centre (eV)",
                       title="LSMO: drift from the zero-loss peak")
        axes[1, 0].errorbar(x, lsmo_results["mn_l3_shift_eV"], lsmo_results["mn_l3_shift_error_eV"], fmt="o-",
                            ms=3, label="drift corrected")
        axes[1, 0].plot(x, lsmo_results["mn_l3_shift_uncorrected_eV"], ".:", color="0.5", label="uncorrected")
        axes[1, 0].set(xlabel="position along the line (nm)", ylabel="Mn L2,3 shift (eV)",
                       title="LSMO: Mn edge shift (vs the line's bulk)")
        axes[1, 0].legend()
        axes[1, 1].errorbar(x, lsmo_results["l3_l2_ratio"], lsmo_results["l3_l2_ratio_error"], fmt="o-", ms=3)
        axes[1, 1].set(xlabel="position along the line (nm)", ylabel="Mn L3/L2", title="LSMO: white-line ratio")
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller cubes and fewer shifts")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    shape = (16, 16) if args.quick else (32, 32)
    shifts = (-1.0, 0.25, 1.0) if args.quick else (-1.0, -0.5, -0.25, 0.25, 0.5, 1.0)
    tic = time.perf_counter()
    results = {
        "shift_precision": shift_precision((20.0, 200.0), shifts, shape, exspy_pixels=2 if args.quick else 4),
        "speed": speed((64, 64) if args.quick else (256, 256)),
        "drift": drift((32, 32) if args.quick else (64, 64)),
        "valence": valence(shape),
        "white_line_ratio": white_line_ratio(shape),
        "lsmo": lsmo(),
    }
    results["seconds"] = time.perf_counter() - tic
    RESULTS.mkdir(exist_ok=True)
    name = "quantify_quick" if args.quick else "quantify"
    (RESULTS / f"{name}.json").write_text(json.dumps(results, indent=2) + "\n")
    _figure(results, RESULTS / f"{name}.png")
    print(json.dumps({k: v for k, v in results.items() if k not in ("shift_precision", "lsmo")}, indent=1))
    print(f"wrote {RESULTS / name}.json and .png in {results['seconds']:.0f} s")


if __name__ == "__main__":
    main()
