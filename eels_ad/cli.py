"""The ``eels-ad`` command line: parse arguments, call the public API, print."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path


def _describe(path: Path) -> dict:
    from .io import load

    cube = load(path, negative="allow")
    values = cube.values
    energy = cube["energy"].values
    totals = values.reshape(-1, values.shape[-1]).sum(axis=1)
    description = {
        "file": str(path),
        "dims": {dim: int(size) for dim, size in cube.sizes.items()},
        "energy_eV": {
            "first": float(energy[0]),
            "last": float(energy[-1]),
            "dispersion": float(cube.eels.dispersion) if energy.size > 1 else None,
        },
        "spatial_units": cube["x"].attrs.get("units", "px"),
        "dtype": str(cube.dtype),
        "counts": {
            "total": float(values.sum()),
            "mean_per_voxel": float(values.mean()),
            "min": float(values.min()),
            "max": float(values.max()),
            "negative_voxels": int((values < 0).sum()),
            "median_per_spectrum": float(sorted(totals)[len(totals) // 2]),
        },
        "attrs": {k: (v if isinstance(v, (str, int, float)) else str(v)) for k, v in cube.attrs.items()},
    }
    return description


def _cmd_info(args: argparse.Namespace) -> int:
    failures = 0
    for path in args.files:
        try:
            description = _describe(Path(path))
        except (OSError, ValueError) as error:
            print(f"error: {error}", file=sys.stderr)
            failures += 1
            continue
        if args.json:
            print(json.dumps(description, indent=2))
            continue
        dims, energy, counts = description["dims"], description["energy_eV"], description["counts"]
        print(f"{description['file']}")
        print(f"  dims         y={dims['y']} x={dims['x']} energy={dims['energy']} ({description['dtype']})")
        dispersion = f"{energy['dispersion']:.4g} eV/channel" if energy["dispersion"] else "single channel"
        print(f"  energy       {energy['first']:.2f} - {energy['last']:.2f} eV, {dispersion}")
        print(f"  spatial      {description['spatial_units']}")
        print(
            f"  counts       total {counts['total']:.4g}, mean {counts['mean_per_voxel']:.4g}/voxel, "
            f"min {counts['min']:.4g}, max {counts['max']:.4g}, negative voxels {counts['negative_voxels']}"
        )
        for key in ("title", "beam_energy_keV", "dwell_time_s", "collection_angle_mrad"):
            if key in description["attrs"]:
                print(f"  {key:<12} {description['attrs'][key]}")
    return 1 if failures else 0


def _api_default(function, name: str):
    """The default of ``name`` in ``function``'s signature: the CLI and the API share one set of defaults."""
    import inspect

    return inspect.signature(function).parameters[name].default


def _simulate_defaults():
    from .simulate import FeL23Recipe

    return FeL23Recipe()


def _cmd_simulate(args: argparse.Namespace) -> int:
    from .io import save
    from .simulate import simulate_fe_l23

    out = Path(args.out)
    if out.suffix.lower() not in (".nc", ".nc4", ".netcdf"):
        return _error(f"{out}: simulate writes NetCDF; name the output *.nc")
    if not out.parent.is_dir():
        return _error(f"{out}: the folder {out.parent} does not exist; create it first")
    if out.exists() and not args.overwrite:
        return _error(f"{out} exists; pass --overwrite to replace it")
    low_out = out.with_name(f"{out.stem}_low_loss{out.suffix}")
    if args.low_loss and low_out.exists() and not args.overwrite:
        return _error(f"{low_out} exists; pass --overwrite to replace it")
    try:
        dataset = simulate_fe_l23(
            tuple(args.shape), dose=args.dose, shift=args.shift, anomaly_fraction=args.anomaly_fraction,
            layout=args.layout, overdispersion=args.overdispersion, drift=args.drift, row_jitter=args.row_jitter,
            low_loss=args.low_loss, spikes=args.spikes, seed=args.seed,
        )
        if args.low_loss:
            low = dataset["low_loss"].rename(low_loss_energy="energy").to_dataset(name="counts")
            low["drift"] = dataset["drift"] if "drift" in dataset else low["counts"].isel(energy=0) * 0.0
            save(low.assign_attrs(dataset.attrs), low_out, overwrite=args.overwrite)
            dataset = dataset.drop_vars(["low_loss", "low_loss_energy"])
        save(dataset, out, overwrite=args.overwrite)
    except (OSError, ValueError) as error:
        return _error(_with_option_names(str(error)))
    n_anomalous = int(dataset["anomaly"].sum())
    print(
        f"wrote {out}: {args.shape[0]} x {args.shape[1]} px x {dataset.sizes['energy']} channels, "
        f"{n_anomalous} anomalous pixels shifted by {args.shift:+g} eV ({args.layout}), seed {args.seed}"
        + (f"; its low-loss image in {low_out}" if args.low_loss else "")
    )
    return 0


def _with_option_names(message: str) -> str:
    """The API's parameter names, as the command line spells them."""
    for name in ("anomaly_fraction", "overdispersion", "shift", "dose", "seed", "shape", "layout", "fdr", "max_time",
                 "context", "scoring"):
        message = message.replace(f"{name} must", f"--{name.replace('_', '-')} must", 1)
    return message.replace("overwrite=True (--overwrite on the command line)", "--overwrite")


def _error(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 1


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    try:
        summary = run_demo(args.out, overwrite=args.overwrite, progress=not args.quiet, verbose=args.verbose,
                           seed=args.seed, cvae_epochs=args.cvae_epochs)
    except (OSError, ValueError) as error:
        return _error(_with_option_names(str(error)))
    if not args.quiet:
        print(summary["text"])
    return 0


def _report(results, out_dir: str, quiet: bool) -> int:
    done = sum(r.status == "done" for r in results)
    skipped = sum(r.status == "skipped" for r in results)
    failed = [r for r in results if r.status == "failed"]
    if not quiet:
        print(f"{done} done, {skipped} skipped (complete), {len(failed)} failed; summary in {out_dir}/summary.csv")
    for result in failed:
        print(f"failed: {result.reason}", file=sys.stderr)
    return 1 if failed else 0


def _preparation(args: argparse.Namespace) -> dict | None:
    """The options of eels_ad.prepare.prepare from --gain, --no-spike-repair, --no-vacuum-mask, --raw."""
    if args.raw:
        return None
    return {"gain": args.gain, "spikes": not args.no_spike_repair, "vacuum": not args.no_vacuum_mask}


def _cmd_train(args: argparse.Namespace) -> int:
    from .batch import train

    parameters: dict = {}
    if args.model == "pca":
        parameters.update(n_components=args.components if args.components else "auto", robust=args.robust,
                          poisson_normalize=not args.plain)
    else:
        parameters.update(likelihood=args.likelihood, accelerator=args.accelerator, devices=args.devices,
                          strategy=args.strategy, progress=args.verbose, seed=args.seed)
        if args.epochs is not None:
            parameters["max_epochs"] = args.epochs
        if args.max_time is not None:
            parameters["max_time"] = args.max_time
    if args.context is not None:
        parameters["context"] = args.context
    parameters.update(scoring=args.scoring, fdr=args.fdr, spatial=not args.no_spatial,
                      empirical_null=not args.no_empirical_null)
    if args.energy_range:
        parameters["energy_range"] = tuple(args.energy_range)
    try:
        detector = train(args.bulk, args.model, args.out, recursive=args.recursive, overwrite=args.overwrite,
                         preparation=_preparation(args), **parameters)
    except (OSError, ValueError) as error:
        return _error(_with_option_names(str(error)))
    if not args.quiet:
        print(f"trained {type(detector).__name__} on {detector.n_training_spectra_} spectra; saved {args.out}")
    return 0


def _run_batch(args: argparse.Namespace, job, suffix: str, description: str) -> int:
    from .batch import plan, run

    if args.split_cubes and not args.scheduler:
        return _error("--split-cubes splits cubes over a Dask cluster: give its address with --scheduler")
    try:
        pairs = plan(args.inputs, args.out, suffix=suffix, recursive=args.recursive)
    except (OSError, ValueError) as error:
        return _error(str(error))
    try:
        results = run(job, pairs, args.out, overwrite=args.overwrite, workers=args.workers,
                      scheduler=args.scheduler, progress=not args.quiet, description=description,
                      split_cubes=args.split_cubes)
    except ConnectionError as error:  # no scheduler at --scheduler, or one without workers
        return _error(str(error))
    return _report(results, args.out, args.quiet)


def _cmd_detect(args: argparse.Namespace) -> int:
    from functools import partial

    from .batch import detect_job
    from .detect import load as load_detector

    try:
        load_detector(args.model)
    except (OSError, ValueError) as error:
        return _error(str(error))
    job = partial(detect_job, model=str(Path(args.model).resolve()), reconstruction=args.reconstruction,
                  chunks=_chunks(args), preparation=_preparation(args))
    return _run_batch(args, job, ".detect.nc", "detect")


def _chunks(args: argparse.Namespace) -> dict[str, int] | None:
    """Lazy reading of the inputs, ``--chunk-rows`` rows at a time (None: read into memory; {}: lazily in
    chunks of the default size, as ``--split-cubes`` needs)."""
    if args.chunk_rows:
        return {"y": args.chunk_rows}
    return {} if args.split_cubes else None


def _number_or_auto(name: str, *, zero_allowed: bool):
    """An argparse type: ``"auto"`` or a finite number > 0 (>= 0 with ``zero_allowed``)."""
    bound = ">= 0" if zero_allowed else "> 0"

    def parse(text: str) -> float | str:
        if text == "auto":
            return text
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a number {bound} or 'auto', got {text!r}") from None
        if not (value < float("inf") and (value >= 0 if zero_allowed else value > 0)):
            raise argparse.ArgumentTypeError(f"{name} must be a finite number {bound}, got {text}")
        return value

    return parse


def _cmd_denoise(args: argparse.Namespace) -> int:
    from functools import partial

    from .batch import denoise_job

    options = {"penalty": args.penalty, "tau": args.tau, "backend": args.backend}
    if args.weights is not None:
        options["weights"] = tuple(args.weights)
    if args.max_iter is not None:
        options["max_iter"] = args.max_iter
    job = partial(denoise_job, options=options, preparation=_preparation(args), chunks=_chunks(args))
    return _run_batch(args, job, ".denoised.nc", "denoise")


def _cmd_compare(args: argparse.Namespace) -> int:
    from functools import partial

    from .batch import compare_job

    if not 0 < args.fdr < 1:
        return _error(f"--fdr must lie in (0, 1), got {args.fdr}")
    job = partial(compare_job, method=args.method, fdr=args.fdr, chunks=_chunks(args),
                  normalize_range=tuple(args.normalize_range) if args.normalize_range else None)
    return _run_batch(args, job, ".channels.nc", "compare")


def _cmd_quantify(args: argparse.Namespace) -> int:
    from functools import partial

    from .batch import low_loss_pairs, plan, quantify_job, run

    if args.split_cubes and not args.scheduler:
        return _error("--split-cubes splits cubes over a Dask cluster: give its address with --scheduler")
    if not args.max_shift > 0:
        return _error(f"--max-shift must be a positive number of eV, got {args.max_shift}")
    if args.references and not Path(args.references).is_file():
        return _error(f"--references {args.references}: no such file")
    try:
        pairs = plan(args.inputs, args.out, suffix=".quantify.nc", recursive=args.recursive)
        pairs, low_loss = low_loss_pairs(pairs, files=args.low_loss, suffix=args.low_loss_suffix)
    except (OSError, ValueError) as error:
        return _error(str(error))
    job = partial(quantify_job, low_loss=low_loss, preparation=_preparation(args),
                  energy_range=tuple(args.energy_range) if args.energy_range else None,
                  background_range=tuple(args.background_range) if args.background_range else None,
                  max_shift=args.max_shift, white_line_ratio=args.white_line_ratio,
                  references=str(Path(args.references).resolve()) if args.references else None,
                  separate=not args.no_drift_separation, chunks=_chunks(args))
    try:
        results = run(job, pairs, args.out, overwrite=args.overwrite, workers=args.workers,
                      scheduler=args.scheduler, progress=not args.quiet, description="quantify",
                      split_cubes=args.split_cubes)
    except ConnectionError as error:
        return _error(str(error))
    return _report(results, args.out, args.quiet)


def _denoising(path: str):
    """An `eels-ad denoise` result and the counts it denoised (reopened as the job prepared them)."""
    import json

    import xarray as xr

    from .io import open_results
    from .prepare import load_prepared

    result = open_results(path)
    if "intensity" not in result or "source_file" not in result.attrs:
        raise ValueError(f"{path}: not an `eels-ad denoise` result (no 'intensity' or source_file)")
    denoised = result["intensity"]
    counts = load_prepared(result.attrs["source_file"], json.loads(result.attrs.get("preparation", "null")))
    counts = counts.drop_vars([c for c in ("spike", "vacuum") if c in counts.coords])
    low_dose = counts.sel(y=denoised["y"], x=denoised["x"], energy=denoised["energy"])
    return xr.Dataset({"low_dose": low_dose, "denoised": denoised})


def _cmd_report(args: argparse.Namespace) -> int:
    from .io import open_results
    from .viz import report, write_html

    out = Path(args.out)
    if out.exists() and not args.overwrite:
        return _error(f"{out} exists; pass --overwrite to replace it")
    try:
        detection = open_results(args.detection)
        channels = open_results(args.channels) if args.channels else None
        quantities = open_results(args.quantities) if args.quantities else None
        if quantities is not None and quantities["shift"].shape != detection["score"].shape:
            raise ValueError(f"{args.quantities} maps {quantities['shift'].shape} pixels but {args.detection} "
                             f"{detection['score'].shape}: not the same spectrum image")
        denoising = _denoising(args.denoised) if args.denoised else None
        page = report(detection, channels=channels, quantities=quantities, denoising=denoising,
                      title=args.title or f"eels-ad report: {Path(args.detection).name}")
        write_html(page, out, overwrite=args.overwrite)
    except (OSError, ValueError) as error:
        return _error(f"{args.detection}: {error}" if str(args.detection) not in str(error) else str(error))
    if not args.quiet:
        print(f"wrote {out} (open it in a browser; it works offline)")
    return 0


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {value}")
    return value


def _preparation_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("preparation (eels_ad.prepare: before any Poisson model)")
    group.add_argument("--gain", type=_number_or_auto("gain", zero_allowed=False), default="auto",
                       help="detector counts per electron, or 'auto' (default): estimated from the data")
    group.add_argument("--no-spike-repair", action="store_true", help="keep X-ray spikes as recorded")
    group.add_argument("--no-vacuum-mask", action="store_true", help="treat vacuum pixels like the others")
    group.add_argument("--raw", action="store_true", help="no preparation at all: the counts as recorded")


def _batch_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="datacube files and/or folders")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder (created if missing)")
    parser.add_argument("--recursive", action="store_true", help="also search sub-folders of INPUT folders")
    parser.add_argument("--overwrite", action="store_true", help="redo inputs whose output exists")
    parser.add_argument("--workers", type=_positive_int, default=1, help="processes on this machine (default 1)")
    parser.add_argument("--scheduler", metavar="ADDRESS", help="run on a Dask distributed cluster (tcp://...)")
    parser.add_argument("--split-cubes", action="store_true",
                        help="with --scheduler: split each cube over the cluster's workers by chunks of rows (read "
                        "lazily; files one after another) instead of one file per worker")
    parser.add_argument("--quiet", action="store_true", help="no progress bar (the log file is still written)")
    parser.add_argument("--chunk-rows", type=_positive_int, metavar="ROWS",
                        help="read inputs lazily (.nc/.hspy/.zspy/.emd/.dm3/.dm4), ROWS rows at a time, so that cubes "
                        "larger than memory are processed chunk by chunk (the preparation too: spikes are "
                        "repaired chunk by chunk)")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``eels-ad`` (one sub-command per job)."""
    from . import __version__
    from .demo import run_demo
    from .quantify import edge_shift_map
    from .reconstruct import denoise_cube
    from .stats import compare_regions

    parser = argparse.ArgumentParser(
        prog="eels-ad",
        description="Find and explain anomalies in EELS spectrum images.",
    )
    parser.add_argument("--version", action="version", version=f"eels-ad {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    info = commands.add_parser("info", help="dims, energy axis and count statistics of datacube files",
                               description="Print dims, energy axis and count statistics of datacube files.")
    info.add_argument("files", nargs="+", metavar="FILE", help=".dm3, .dm4, .hspy, .msa, .emd or .nc file")
    info.add_argument("--json", action="store_true", help="print JSON instead of text")
    info.set_defaults(run=_cmd_info)

    recipe = _simulate_defaults()
    simulate = commands.add_parser(
        "simulate", help="write a simulated Fe L2,3 spectrum image with anomalies",
        description="Write a simulated Fe L2,3 spectrum image (counts + ground truth) to NetCDF.",
    )
    simulate.add_argument("out", metavar="OUT.nc", help="output NetCDF file (its folder must exist)")
    simulate.add_argument("--shape", nargs=2, type=_positive_int, default=recipe.shape, metavar=("NY", "NX"),
                          help=f"pixels along y and x (default {recipe.shape[0]} {recipe.shape[1]})")
    simulate.add_argument("--shift", type=float, default=recipe.shift,
                          help=f"Fe edge shift of the anomalous pixels in eV (default {recipe.shift:g})")
    simulate.add_argument("--anomaly-fraction", type=float, default=recipe.anomaly_fraction,
                          help=f"fraction of anomalous pixels, 0-1 (default {recipe.anomaly_fraction:g})")
    simulate.add_argument("--layout", choices=("pixels", "clusters", "line"), default=recipe.layout,
                          help=f"how the anomalous pixels lie (default {recipe.layout})")
    simulate.add_argument("--dose", type=float, default=recipe.dose,
                          help=f"mean pre-edge counts per channel (default {recipe.dose:g})")
    simulate.add_argument("--overdispersion", type=float, default=recipe.overdispersion,
                          help="gamma-Poisson over-dispersion alpha (variance mu + alpha mu^2; default 0)")
    simulate.add_argument("--drift", type=float, default=recipe.drift,
                          help="largest energy drift along the scan, eV (default 0: none)")
    simulate.add_argument("--row-jitter", type=float, default=recipe.row_jitter,
                          help="standard deviation of a per-row drift offset, eV (default 0)")
    simulate.add_argument("--low-loss", action="store_true",
                          help="also write the matching low-loss image to OUT_low_loss.nc (dual EELS)")
    simulate.add_argument("--spikes", type=float, default=recipe.spikes,
                          help="fraction of voxels hit by X-ray spikes (default 0)")
    simulate.add_argument("--seed", type=int, default=recipe.seed,
                          help=f"seed of every random step, >= 0 (default {recipe.seed})")
    simulate.add_argument("--overwrite", action="store_true", help="replace OUT.nc if it exists")
    simulate.set_defaults(run=_cmd_simulate)

    demo = commands.add_parser(
        "demo", help="run the whole pipeline on the embedded sample data",
        description="Run the pipeline on the embedded sample cube and write results and a report.",
    )
    demo.add_argument("--out", default="eels-ad-demo", help="output folder (default eels-ad-demo)")
    demo.add_argument("--overwrite", action="store_true", help="replace the results of an earlier demo")
    demo.add_argument("--seed", type=int, default=0, help="seed of every random step (default 0)")
    demo.add_argument("--quiet", action="store_true", help="print nothing but errors")
    cvae_epochs = _api_default(run_demo, "cvae_epochs")
    demo.add_argument("--cvae-epochs", type=_positive_int, default=cvae_epochs,
                      help=f"training epochs of the demo's 3D-CVAE (default {cvae_epochs}; about 5 s each on 2 cores)")
    demo.add_argument("--verbose", action="store_true",
                      help="also show Lightning's training progress and every library warning")
    demo.set_defaults(run=_cmd_demo)

    train = commands.add_parser("train", help="fit a detector on bulk datacubes and save it",
                                description="Fit a PCA or 3D-CVAE detector on bulk data (files or folders).")
    train.add_argument("bulk", nargs="+", metavar="BULK", help="bulk datacube files and/or folders")
    train.add_argument("--model", choices=("pca", "cvae"), default="pca", help="the detector (default pca)")
    train.add_argument("--out", required=True, metavar="MODEL.nc", help="model file (NetCDF, .nc)")
    train.add_argument("--energy-range", nargs=2, type=float, metavar=("E_MIN", "E_MAX"),
                       help="fit these energies only (eV; default: the whole axis)")
    train.add_argument("--components", type=_positive_int, help="PCA components (default: automatic)")
    train.add_argument("--plain", action="store_true", help="PCA without Poisson normalisation")
    train.add_argument("--robust", action="store_true", help="PCA: trim spectra that do not belong to the bulk")
    from .detect import SCORES, PCADetector
    from .detect._base import FIT_CONTEXTS

    train.add_argument("--scoring", choices=SCORES, default=_api_default(PCADetector, "scoring"),
                       help="per-pixel score (default %(default)s: the stronger of an edge shift's z and the deviance "
                       "left once the shift is explained; shift: the edge shift alone; deviance: any change)")
    train.add_argument("--context", choices=FIT_CONTEXTS, default=None,
                       help="model each spectrum from itself (pixel) or predict it from its neighbours, the pixel "
                       "hidden (follows an uncorrected energy drift); auto (the default): neighbours when the "
                       "training cube drifts, else pixel")
    fdr_default = _api_default(PCADetector, "fdr")
    train.add_argument("--fdr", type=float, default=fdr_default,
                       help=f"flag at this false-discovery rate, 0-1 (default {fdr_default:g})")
    train.add_argument("--no-empirical-null", action="store_true",
                       help="take the p-values as the training bulk calibrates them (default: re-standardise each "
                       "map's p-values to its own null, fitted below its discoveries)")
    train.add_argument("--no-spatial", action="store_true",
                       help="judge every pixel alone (default: pool each pixel's evidence with its neighbourhood's)")
    train.add_argument("--max-time", type=float, metavar="SECONDS",
                       help="CVAE: stop training after this many seconds (default: no limit)")
    train.add_argument("--epochs", type=_positive_int,
                       help="CVAE training epochs (default: CVAEDetector's max_epochs, 12; the CLI does not load torch "
                       "to read it)")
    train.add_argument("--likelihood", choices=("poisson", "gaussian"), default="poisson",
                       help="CVAE likelihood (default poisson)")
    train.add_argument("--accelerator", default="auto", help="Lightning accelerator (auto, cpu, gpu)")
    train.add_argument("--devices", default="auto", help="Lightning devices (e.g. 4 GPUs)")
    train.add_argument("--strategy", default="auto", help="Lightning strategy (e.g. ddp)")
    train.add_argument("--seed", type=int, default=0, help="seed of the CVAE's training (default 0)")
    train.add_argument("--recursive", action="store_true", help="also search sub-folders of BULK folders")
    train.add_argument("--overwrite", action="store_true", help="replace MODEL.nc if it exists")
    train.add_argument("--quiet", action="store_true", help="print nothing but errors")
    train.add_argument("--verbose", action="store_true", help="show Lightning's training progress")
    _preparation_options(train)
    train.set_defaults(run=_cmd_train)

    detect = commands.add_parser("detect", help="score every datacube of files/folders with a saved model",
                                 description="Score datacubes with a saved detector; one NetCDF per input "
                                 "(scores, labels), summary.csv/json and a log in --out.")
    detect.add_argument("model", metavar="MODEL", help="a model written by `eels-ad train`")
    _batch_options(detect)
    detect.add_argument("--reconstruction", action="store_true", help="also write the reconstructions")
    _preparation_options(detect)
    detect.set_defaults(run=_cmd_detect)

    denoise = commands.add_parser("denoise", help="SPIRAL-TAP denoising of every datacube of files/folders",
                                  description="Denoise datacubes with SPIRAL-TAP (eels_ad.reconstruct.denoise_cube); "
                                  "one NetCDF per input.")
    _batch_options(denoise)
    denoise.add_argument("--penalty", choices=("tv", "onb", "canonical"), default=_api_default(denoise_cube, "penalty"),
                         help="the penalty (default tv)")
    denoise.add_argument("--tau", type=_number_or_auto("tau", zero_allowed=True),
                         default=_api_default(denoise_cube, "tau"),
                         help="regularisation weight, or 'auto' (default): chosen per cube by Poisson thinning")
    weights = _api_default(denoise_cube, "weights")
    denoise.add_argument("--weights", nargs=3, type=float, metavar=("WY", "WX", "WE"),
                         help="TV weights of y, x and energy (default: denoise_cube's, "
                         f"{' '.join(f'{w:g}' for w in weights)})")
    denoise.add_argument("--max-iter", type=_positive_int, help="SPIRAL-TAP iterations (default: denoise_cube's)")
    denoise.add_argument("--backend", choices=("numpy", "torch"), default="torch",
                         help="torch (default): float32 on the GPU when there is one, else on the CPU's threads; "
                         "numpy: float64 (slower)")
    _preparation_options(denoise)
    denoise.set_defaults(run=_cmd_denoise)

    compare = commands.add_parser("compare", help="NB test per energy channel: flagged pixels against the bulk",
                                  description="For each `eels-ad detect` result, test every energy channel of "
                                  "the flagged pixels against the others (negative binomial), prepared as the "
                                  "detection was.")
    _batch_options(compare)
    compare.add_argument("--method", choices=("mom", "mle", "transformer"),
                         default=_api_default(compare_regions, "method"),
                         help="method of moments (default, fast), maximum likelihood, or the pre-trained transformer "
                         "(regions of 2-50 pixels)")
    fdr = _api_default(compare_regions, "fdr")
    compare.add_argument("--fdr", type=float, default=fdr, help=f"false-discovery rate, 0-1 (default {fdr:g})")
    compare.add_argument("--normalize-range", nargs=2, type=float, metavar=("E_MIN", "E_MAX"),
                         help="energy window whose counts give the size factors (e.g. the pre-edge)")
    compare.set_defaults(run=_cmd_compare)

    quantify = commands.add_parser(
        "quantify", help="edge-shift maps (drift-corrected), L3/L2 and valence maps of files/folders",
        description="Per-pixel edge shift with its Cramer-Rao error (Poisson fit of the bulk template), "
        "corrected for energy drift from each input's low-loss image or, without one, separated from local "
        "shifts; optionally L3/L2 ratio and valence maps. One NetCDF per input.")
    _batch_options(quantify)
    quantify.add_argument("--low-loss", nargs="+", metavar="LOW_LOSS",
                          help="low-loss files recorded with the inputs (dual EELS), one per INPUT, in order")
    quantify.add_argument("--low-loss-suffix", metavar="SUFFIX",
                          help="find each input's low-loss file beside it as NAME+SUFFIX (e.g. _low_loss)")
    quantify.add_argument("--energy-range", nargs=2, type=float, metavar=("E_MIN", "E_MAX"),
                          help="the fitted window around the edge (eV; default: the whole axis less --max-shift)")
    quantify.add_argument("--background-range", nargs=2, type=float, metavar=("E_MIN", "E_MAX"),
                          help="pre-edge window for the background's exponent (eV; default: the window's first fifth)")
    max_shift = _api_default(edge_shift_map, "max_shift")
    quantify.add_argument("--max-shift", type=float, default=max_shift,
                          help=f"largest size of a shift allowed, eV (default {max_shift:g}); fits there are flagged")
    quantify.add_argument("--white-line-ratio", action="store_true",
                          help="also map the L3/L2 ratio (Pearson two-step continuum)")
    quantify.add_argument("--references", metavar="CSV",
                          help="reference spectra (energy column + one per spectrum): also map their fractions")
    quantify.add_argument("--no-drift-separation", action="store_true",
                          help="without a low-loss file, report shifts as measured (drift included)")
    _preparation_options(quantify)
    quantify.set_defaults(run=_cmd_quantify)

    report = commands.add_parser("report", help="an offline HTML report of one detection result",
                                 description="Write the report of an `eels-ad detect` result (and its `eels-ad "
                                 "compare` table): what was analysed, how, the answer, maps and spectra.")
    report.add_argument("detection", metavar="DETECTION.nc", help="a result of `eels-ad detect`")
    report.add_argument("--channels", metavar="CHANNELS.nc", help="its result of `eels-ad compare` (optional)")
    report.add_argument("--quantities", metavar="QUANTIFY.nc",
                        help="its result of `eels-ad quantify` (optional): shift and error maps, the shift in eV")
    report.add_argument("--denoised", metavar="DENOISED.nc",
                        help="its result of `eels-ad denoise` (optional): the counts and the SPIRAL-TAP intensity")
    report.add_argument("--out", required=True, metavar="REPORT.html", help="the page to write")
    report.add_argument("--title", help="the page's title (default: from the file name)")
    report.add_argument("--overwrite", action="store_true", help="replace REPORT.html if it exists")
    report.add_argument("--quiet", action="store_true", help="print nothing but errors")
    report.set_defaults(run=_cmd_report)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``eels-ad`` console script."""
    args = build_parser().parse_args(argv)
    return int(args.run(args))


if __name__ == "__main__":
    sys.exit(main())
