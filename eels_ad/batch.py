"""Folder jobs: plan, run (one process, a local pool, or a Dask cluster), resume, summarise.

Every job maps one input file to one output file, written atomically (temporary name, then rename),
so an output that exists is complete: a re-run skips it (resume) unless asked to ``overwrite``. A
file that cannot be processed is reported with its reason in the summary and the log, and the run
goes on. Inputs are only read.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from .io import DatacubeReadError, atomic_path, find_datacubes, open_results, save
from .prepare import load_prepared

LOG_NAME = "eels-ad.log"
SUMMARY_COLUMNS = ("input", "output", "status", "reason", "shape", "n_flagged", "fraction_flagged",
                   "score_min", "score_mean", "score_max", "seconds")


@dataclass
class FileResult:
    """What happened to one input."""

    input: str
    output: str
    status: str  # "done", "skipped" (complete output already there) or "failed"
    reason: str = ""
    shape: str = ""
    n_flagged: int | None = None
    fraction_flagged: float | None = None
    score_min: float | None = None
    score_mean: float | None = None
    score_max: float | None = None
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


def plan(inputs: Sequence[str | os.PathLike], out_dir: str | os.PathLike, *, suffix: str,
         recursive: bool = False, pattern: str = "*") -> list[tuple[Path, Path]]:
    """Pair every input datacube (files, or the datacubes of folders) with its output path.

    Outputs are ``OUT_DIR/<name><suffix>``; for files found inside a folder the sub-folders below it
    are kept, so equal names in different sub-folders do not collide. A named file is taken as it
    is, whatever its suffix, so that a bad file gets reported rather than silently left out. Files
    inside ``out_dir`` found in an input folder are this job's own outputs and are left out.

    Raises
    ------
    ValueError
        No datacube in the inputs, ``out_dir`` is a file, or two inputs would write one output.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--out {out_dir} is a file; give a folder for the outputs")
    resolved_out = out_dir.resolve()

    def stem(path: Path) -> str:  # "a.detect.nc" -> "a": results of one job name those of the next
        name = path.stem
        for known in (".detect", ".denoised", ".channels", ".quantify"):
            name = name.removesuffix(known)
        return name

    pairs: list[tuple[Path, Path]] = []
    for entry in map(Path, inputs):
        if entry.is_dir():
            for path in find_datacubes(entry, pattern, recursive=recursive):
                if path.resolve().is_relative_to(resolved_out):
                    continue  # an output of this job (or of an earlier run of it)
                relative = path.relative_to(entry)
                pairs.append((path, out_dir / relative.parent / f"{stem(relative)}{suffix}"))
        else:
            pairs.append((entry, out_dir / f"{stem(entry)}{suffix}"))
    if not pairs:
        raise ValueError(f"no datacube found in {', '.join(str(i) for i in inputs)} "
                         f"({'recursively' if recursive else 'not searching sub-folders: add --recursive'})")
    outputs = [output for _, output in pairs]
    duplicates = {str(o) for o in outputs if outputs.count(o) > 1}
    if duplicates:
        raise ValueError(f"several inputs would write the same outputs: {sorted(duplicates)}; rename or split them")
    return pairs


def _remove_stale_temporaries(output: Path) -> None:
    """Temporary files of an earlier, killed run (never trusted, never renamed)."""
    if output.parent.is_dir():
        for stale in output.parent.glob(f".{output.name}.*.tmp"):
            stale.unlink(missing_ok=True)


def _describe_scores(result: FileResult, scores: np.ndarray, labels: np.ndarray) -> None:
    finite = scores[np.isfinite(scores)]
    result.n_flagged = int(labels.sum())
    result.fraction_flagged = float(labels.mean())
    if finite.size:
        result.score_min, result.score_mean, result.score_max = (float(finite.min()), float(finite.mean()),
                                                                 float(finite.max()))


# ---- jobs (top-level functions: they travel to worker processes and Dask workers) ----------------

_DETECTORS: dict[str, Any] = {}


def _cached_detector(path: str | os.PathLike):
    """:func:`eels_ad.detect.load`, once per model file and process (workers score many files)."""
    from .detect import load as load_detector

    key = str(Path(path).resolve())
    if key not in _DETECTORS:
        _DETECTORS[key] = load_detector(path)
    return _DETECTORS[key]


def detect_job(source: Path, output: Path, *, model: str, reconstruction: bool = False,
               chunks: dict[str, int] | None = None, preparation: dict[str, Any] | None = None) -> FileResult:
    """Score one cube with a saved detector and write scores, labels (and reconstructions).

    ``preparation``: options of :func:`eels_ad.prepare.prepare` (gain, spikes, vacuum), or None to
    score the counts as recorded.
    """
    import xarray as xr

    result = FileResult(str(source), str(output), "done")
    detector = _cached_detector(model)
    cube = load_prepared(source, preparation, chunks)
    result.shape = "x".join(str(n) for n in cube.shape)
    scores = detector.score(cube)
    labels = detector.flag(scores)
    variables = {"score": scores, "anomalous": labels}
    if reconstruction:
        variables["reconstruction"] = detector.reconstruct(cube)
    if "spike" in cube.coords:
        variables["spikes_per_pixel"] = cube["spike"].sum("energy").astype("int32")
    # resolved paths: a later stage (compare) reopens the source from wherever it runs
    dataset = xr.Dataset(variables, attrs={"source_file": str(Path(source).resolve()),
                                           "model": str(Path(model).resolve()),
                                           "detector": type(detector).__name__,
                                           "threshold": float(labels.attrs["threshold"]),
                                           "prepared": cube.attrs.get("prepared", "no"),
                                           "preparation": json.dumps(preparation)})
    save(dataset, output, overwrite=True)
    _describe_scores(result, scores.values, labels.values)
    return result


def denoise_job(source: Path, output: Path, *, options: dict[str, Any] | None = None,
                preparation: dict[str, Any] | None = None, chunks: dict[str, int] | None = None) -> FileResult:
    """SPIRAL-TAP denoising of one cube (:func:`eels_ad.reconstruct.denoise_cube` with ``options``)."""
    from .reconstruct import denoise_cube

    result = FileResult(str(source), str(output), "done")
    cube = load_prepared(source, preparation, chunks)
    result.shape = "x".join(str(n) for n in cube.shape)
    clean = denoise_cube(cube.drop_vars([c for c in ("spike", "vacuum") if c in cube.coords]), **(options or {}))
    save(clean.to_dataset(name="intensity").assign_attrs(source_file=str(Path(source).resolve()),
                                                           preparation=json.dumps(preparation)), output,
         overwrite=True)
    result.extra = {"iterations": clean.attrs.get("iterations", "per tile"), "tiles": clean.attrs.get("tiles", 1)}
    return result


def compare_job(source: Path, output: Path, *, method: str = "mom", fdr: float = 0.05,
                normalize_range: tuple[float, float] | None = None, chunks: dict[str, int] | None = None
                ) -> FileResult:
    """NB test per energy channel of the flagged pixels of a detection result against the others."""
    from .stats import compare_regions

    result = FileResult(str(source), str(output), "done")
    detection = open_results(source)
    if "anomalous" not in detection or "source_file" not in detection.attrs:
        raise ValueError(f"{source}: not an `eels-ad detect` result (no 'anomalous' map or source_file)")
    # the counts as the detection saw them: prepared the same way
    preparation = json.loads(detection.attrs.get("preparation", "null"))
    cube = load_prepared(detection.attrs["source_file"], preparation, chunks)
    labels = detection["anomalous"].drop_vars("vacuum", errors="ignore")
    result.shape = "x".join(str(n) for n in cube.shape)
    table = compare_regions(cube, ~labels, labels, method=method, fdr=fdr, normalize_range=normalize_range)
    table.attrs["source_file"] = str(detection.attrs["source_file"])
    save(table, output, overwrite=True)
    result.n_flagged = int(labels.sum())
    result.extra = {"significant_channels": int(table["significant"].sum())}
    return result


def low_loss_pairs(pairs: Sequence[tuple[Path, Path]], *, files: Sequence[str | os.PathLike] | None = None,
                   suffix: str | None = None) -> tuple[list[tuple[Path, Path]], dict[str, str]]:
    """The core-loss inputs and, for each, its low-loss file (dual EELS).

    ``files`` pairs low-loss files with the inputs in order (as many as there are inputs);
    ``suffix`` finds ``<name><suffix>.<same extension>`` beside each input (e.g. ``_low_loss``) and
    leaves the low-loss files themselves out of the inputs. Returns the pairs to run and
    ``{input: low-loss file}``.
    """
    if files and suffix:
        raise ValueError("give --low-loss files or --low-loss-suffix, not both")
    if files:
        if len(files) != len(pairs):
            raise ValueError(f"{len(files)} low-loss files for {len(pairs)} core-loss inputs: give one per input, "
                             "in the same order")
        return list(pairs), {str(source): str(Path(low)) for (source, _), low in zip(pairs, files, strict=True)}
    if suffix:
        kept = [(source, output) for source, output in pairs if not source.stem.endswith(suffix)]
        found = {}
        for source, _ in kept:
            candidate = source.with_name(f"{source.stem}{suffix}{source.suffix}")
            if candidate.exists():
                found[str(source)] = str(candidate)
        return kept, found
    return list(pairs), {}


def quantify_job(source: Path, output: Path, *, low_loss: dict[str, str] | None = None,
                 preparation: dict[str, Any] | None = None, energy_range: tuple[float, float] | None = None,
                 background_range: tuple[float, float] | None = None, max_shift: float = 2.0,
                 white_line_ratio: bool = False, references: str | None = None,
                 separate: bool = True, chunks: dict[str, int] | None = None) -> FileResult:
    """Edge-shift map (with drift correction), and optionally L3/L2 and valence maps, of one cube.

    The drift comes from the low-loss file paired with ``source`` in ``low_loss`` (its zero-loss
    peak); without one, and with ``separate``, it is separated from local shifts as a smooth
    function of scan time (:func:`eels_ad.quantify.separate_drift`, fitted twice so that the
    template is built from the aligned bulk).
    """
    import xarray as xr

    from .io import load
    from .prepare import zero_loss_drift
    from .quantify import edge_shift_map, read_references, separate_drift, valence_map, white_line_ratio_map

    result = FileResult(str(source), str(output), "done")
    cube = load_prepared(source, preparation, chunks)
    result.shape = "x".join(str(n) for n in cube.shape)
    options = {"energy_range": energy_range, "background_range": background_range, "max_shift": max_shift}
    parts: list[xr.Dataset] = []
    low_path = (low_loss or {}).get(str(source))
    if low_path is not None:
        low = load(low_path)
        if low.shape[:2] != cube.shape[:2]:
            raise ValueError(f"the low-loss file {low_path} has navigation shape {low.shape[:2]} but the core loss "
                             f"{source} has {cube.shape[:2]}")
        zero_loss = zero_loss_drift(low)
        if not bool(zero_loss["converged"].all()):
            raise ValueError(f"{low_path}: no zero-loss peak could be fitted in "
                             f"{int((~zero_loss['converged']).sum())} pixels")
        shifts = edge_shift_map(cube, drift=zero_loss, **options)
        parts.append(zero_loss.drop_vars(["drift", "converged"]))
        drift_source = f"zero-loss peak of {Path(low_path).resolve()}"
    elif separate:
        first = edge_shift_map(cube, **options)
        drift = separate_drift(first)["drift"]
        shifts = edge_shift_map(cube, drift=drift, **options)
        drift_source = "separated from local shifts (smooth in scan time + row offsets)"
    else:
        shifts = edge_shift_map(cube, **options)
        drift_source = "none"
    parts.insert(0, shifts)
    if white_line_ratio:
        parts.append(white_line_ratio_map(cube, background_range=background_range))
    if references:
        valence = valence_map(cube, read_references(references), drift=shifts.get("drift"))
        parts.append(valence[["fraction", "fraction_error"]])
    dataset = xr.merge(parts, compat="override", combine_attrs="override")
    dataset.attrs.update(source_file=str(Path(source).resolve()), drift_source=drift_source,
                         prepared=cube.attrs.get("prepared", "no"), preparation=json.dumps(preparation))
    save(dataset, output, overwrite=True)
    shift = shifts["shift"].values
    finite = shift[np.isfinite(shift)]
    result.extra = {"converged": int(shifts["converged"].sum()), "drift_source": drift_source.split(" of ")[0]}
    if finite.size:
        result.extra.update(median_shift_eV=float(np.median(finite)),
                            median_shift_error_eV=float(np.nanmedian(shifts["shift_error"].values)))
    return result


def _guarded(job: Callable[..., FileResult], source: Path, output: Path) -> FileResult:
    started = time.perf_counter()
    try:
        result = job(source, output)
    except (OSError, ValueError, TypeError, KeyError, RuntimeError, DatacubeReadError) as error:
        reason = str(error)
        if str(source) not in reason:
            reason = f"{source}: {reason}"
        result = FileResult(str(source), str(output), "failed", reason=reason)
    result.seconds = time.perf_counter() - started
    return result


# ---- the runner ------------------------------------------------------------------------------------

def _logger(out_dir: Path) -> logging.Logger:
    logger = logging.getLogger(f"eels_ad.batch.{out_dir.resolve()}")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    file_handler = logging.FileHandler(out_dir / LOG_NAME)
    file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logger.addHandler(file_handler)
    return logger


def run(
    job: Callable[..., FileResult],
    pairs: Sequence[tuple[Path, Path]],
    out_dir: str | os.PathLike,
    *,
    overwrite: bool = False,
    workers: int = 1,
    scheduler: str | None = None,
    progress: bool = True,
    description: str = "files",
    split_cubes: bool = False,
) -> list[FileResult]:
    """Run ``job(source, output)`` over ``pairs``, skipping complete outputs, and write the summary.

    Parameters
    ----------
    job
        A picklable function ``(source, output) -> FileResult`` (e.g. ``functools.partial(detect_job, ...)``).
    pairs
        From :func:`plan`.
    out_dir
        Where ``summary.csv``, ``summary.json`` and the log go.
    overwrite
        Redo inputs whose output exists.
    workers
        Processes on this machine (1: in this process).
    scheduler
        Address of a Dask distributed scheduler (``tcp://host:8786``) or a ``distributed.Client``;
        the files are then processed by the cluster's workers.
    split_cubes
        With ``scheduler``: the files are processed here one after another, each cube (read lazily by the
        job) split over the cluster's workers by chunks of rows (:func:`eels_ad.datacube.fold_rows`), instead
        of one file per worker: for a few cubes too large for one worker to be quick.
    progress
        Show a progress bar (the log file is written either way).

    Returns
    -------
    list of FileResult
        In the order of ``pairs``.
    """
    from tqdm.auto import tqdm

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    logger = _logger(out_dir)
    logger.info("run of %d inputs (workers=%s, scheduler=%s, overwrite=%s)", len(pairs), workers, scheduler,
                overwrite)
    results: dict[int, FileResult] = {}
    todo: list[int] = []
    for index, (source, output) in enumerate(pairs):
        if output.exists() and not overwrite:
            results[index] = FileResult(str(source), str(output), "skipped", reason="complete output exists")
            logger.info("skip %s: %s exists", source, output)
            continue
        output.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_temporaries(output)
        todo.append(index)
    guarded = partial(_guarded, job)
    bar = tqdm(total=len(todo), desc=description, disable=not progress, unit="file")

    def record(index: int, result: FileResult) -> None:
        results[index] = result
        if result.status == "failed":
            logger.warning("failed %s", result.reason)
        else:
            logger.info("done %s -> %s in %.2f s", result.input, result.output, result.seconds)
        bar.update()

    if scheduler is not None and split_cubes:
        client, owned = connect(scheduler)
        logger.info("Dask cluster %s: %d workers; each cube split over them by chunks of rows",
                    client.scheduler.address, len(client.scheduler_info()["workers"]))
        try:
            with client.as_current():  # the chunk work of the jobs run here goes to the cluster
                for index in todo:
                    record(index, guarded(*pairs[index]))
        finally:
            if owned:
                client.close()
    elif scheduler is not None:
        _run_on_cluster(guarded, pairs, todo, scheduler, record, logger)
    elif workers > 1 and len(todo) > 1:
        import multiprocessing

        # spawn, not fork: forking a process that already runs threads (HDF5, BLAS, torch) can deadlock.
        # Each worker imports eels-ad once and keeps its share of the cores (warm for every file it gets).
        threads = max(1, (os.cpu_count() or 1) // workers)
        with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                                 initializer=_warm_worker, initargs=(threads,)) as pool:
            futures = {pool.submit(guarded, *pairs[i]): i for i in todo}
            for future in as_completed(futures):
                index = futures[future]
                try:
                    result = future.result()
                except BrokenProcessPool as error:  # a worker process died (killed, out of memory)
                    source, output = pairs[index]
                    result = FileResult(str(source), str(output), "failed",
                                        reason=f"{source}: the worker process died while processing it ({error}); "
                                        "run the command again to retry it")
                record(index, result)
    else:
        for index in todo:
            record(index, guarded(*pairs[index]))
    for _, output in pairs:  # temporaries of jobs killed midway (a dead worker) are never outputs
        _remove_stale_temporaries(output)
    bar.close()
    ordered = [results[i] for i in range(len(pairs))]
    write_summary(ordered, out_dir)
    failed = sum(r.status == "failed" for r in ordered)
    logger.info("finished: %d done (%d retried after a worker died), %d skipped, %d failed",
                sum(r.status == "done" for r in ordered), sum(int(r.extra.get("attempts", 1)) > 1 for r in ordered),
                sum(r.status == "skipped" for r in ordered), failed)
    for handler in list(logger.handlers):
        handler.close()
        logger.removeHandler(handler)
    return ordered


def _warm_worker(threads: int) -> None:
    """Start-up of a local worker process: import what the jobs need once, and keep to ``threads`` cores."""
    from threadpoolctl import threadpool_limits

    from . import detect, io, prepare, quantify, stats  # noqa: F401  (imported once per worker, not per file)

    threadpool_limits(threads)

#: seconds to wait for a Dask scheduler to answer, and for it to have a worker
CONNECT_TIMEOUT = 10
WORKER_TIMEOUT = 60
#: the topic of the events each job logs on its Dask worker when it starts (how retries are counted)
EVENT_TOPIC = "eels-ad-job"


def _on_worker(guarded: Callable[[Path, Path], FileResult], source: Path, output: Path, run_id: str) -> FileResult:
    """Run one job on a Dask worker, logging its start there (a job started twice was retried)."""
    from distributed import get_worker

    worker = get_worker()
    worker.log_event(EVENT_TOPIC, {"run": run_id, "input": str(source), "worker": worker.address})
    result = guarded(source, output)
    result.extra = {**result.extra, "worker": worker.address}
    return result


def _worker_deaths(dask_scheduler, keys: list[str]) -> dict[str, int]:
    """(On the scheduler) how many workers died while processing each task: its ``suspicious`` count."""
    return {key: int(dask_scheduler.tasks[key].suspicious) for key in keys if key in dask_scheduler.tasks}


def connect(scheduler: Any):
    """A ``distributed.Client`` for a scheduler address (or the client given), with clear errors in seconds.

    Raises
    ------
    ConnectionError
        Nothing answers at the address within :data:`CONNECT_TIMEOUT` seconds, or the scheduler has no
        worker after :data:`WORKER_TIMEOUT` seconds.
    """
    from distributed import Client

    if isinstance(scheduler, Client):
        return scheduler, False
    address = str(scheduler)
    try:
        client = Client(address, timeout=CONNECT_TIMEOUT, set_as_default=False)
    except (OSError, TimeoutError, ValueError) as error:
        raise ConnectionError(
            f"no Dask scheduler answers at {address} (waited {CONNECT_TIMEOUT} s): start one with "
            f"`dask scheduler` and workers with `dask worker {address}`, or check the address "
            f"({type(error).__name__}: {error})") from error
    try:
        client.wait_for_workers(1, timeout=WORKER_TIMEOUT)
    except (TimeoutError, OSError) as error:
        client.close()
        raise ConnectionError(f"the Dask scheduler at {address} has no worker (waited {WORKER_TIMEOUT} s): start "
                              f"some with `dask worker {address}`") from error
    return client, True


def _run_on_cluster(guarded, pairs, todo, scheduler, record, logger) -> None:
    """Submit every job to a Dask cluster; a job whose worker dies is retried on another (and counted)."""
    import uuid

    from distributed import as_completed as dask_completed

    client, owned = connect(scheduler)
    run_id = uuid.uuid4().hex
    results: dict[int, FileResult] = {}
    try:
        logger.info("Dask cluster %s: %d workers", client.scheduler.address, len(client.scheduler_info()["workers"]))
        futures = {client.submit(_on_worker, guarded, *pairs[i], run_id, key=f"eels-ad-{run_id}-{i}", pure=False): i
                   for i in todo}
        for future in dask_completed(futures, loop=client.loop):
            index = futures[future]
            try:
                result = future.result()
            except Exception as error:  # KilledWorker (the job killed worker after worker), CancelledError
                source, output = pairs[index]
                result = FileResult(str(source), str(output), "failed",
                                    reason=f"{source}: the cluster could not run it ({type(error).__name__}: {error})")
            results[index] = result
            record(index, result)
        # the scheduler counts, per job, the workers that died while it was on them; the jobs' own start
        # events (those that got out before their worker died) say which workers they were
        deaths = client.run_on_scheduler(_worker_deaths, keys=[future.key for future in futures])
        starts: dict[str, list[str]] = {}
        for _, event in client.get_events(EVENT_TOPIC):
            if isinstance(event, dict) and event.get("run") == run_id:
                starts.setdefault(event["input"], []).append(event["worker"])
    finally:
        if owned:
            client.close()
    for future, index in futures.items():  # the summary shows which jobs had to be run again
        result, died = results[index], int(deaths.get(future.key, 0))
        if died:
            result.extra = {**result.extra, "attempts": died + 1, "workers_tried": starts.get(result.input, [])}
            logger.warning("retried %s: %d worker(s) died while processing it; run %d times in all (started on %s)",
                           result.input, died, died + 1, ", ".join(starts.get(result.input, [])) or "?")


def write_summary(results: Iterable[FileResult], out_dir: Path) -> None:
    """``summary.csv`` (one row per input) and ``summary.json``, replaced atomically on every run."""
    rows = [asdict(r) for r in results]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=[*SUMMARY_COLUMNS, "extra"], extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({**row, "extra": json.dumps(row["extra"]) if row["extra"] else ""})
    with atomic_path(out_dir / "summary.csv", overwrite=True) as temporary:
        temporary.write_text(buffer.getvalue())
    counts = {status: sum(r["status"] == status for r in rows) for status in ("done", "skipped", "failed")}
    counts["retried"] = sum(int(r["extra"].get("attempts", 1)) > 1 for r in rows)
    with atomic_path(out_dir / "summary.json", overwrite=True) as temporary:
        temporary.write_text(json.dumps({"counts": counts, "files": rows}, indent=2) + "\n")


def train(bulk: Sequence[str | os.PathLike], model: str, out: str | os.PathLike, *, recursive: bool = False,
          overwrite: bool = False, preparation: dict[str, Any] | None = None, **parameters: Any):
    """Fit a detector on bulk datacubes (files or folders) and save it (NetCDF, ``.nc``).

    ``model`` is a key of :data:`eels_ad.detect.MODELS` (``"pca"``, ``"cvae"``); ``parameters`` go to
    its class. With several inputs, a per-spectrum detector (PCA) pools all their spectra; a CVAE
    needs spatial neighbours, so several CVAE inputs must have the same number of rows and are put
    side by side. ``preparation``: options of :func:`eels_ad.prepare.prepare` for every bulk cube
    (None: the counts as recorded).
    """
    import xarray as xr

    from .detect import MODELS, SpectrumDetector, detector_class

    if model not in MODELS:
        raise ValueError(f"model must be one of {sorted(MODELS)}, got {model!r}")
    if Path(out).suffix != ".nc":
        raise ValueError(f"{out}: a model is saved as NetCDF; name it *.nc")
    if Path(out).exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass overwrite=True (--overwrite) to replace it")
    files: list[Path] = []
    for entry in map(Path, bulk):
        files.extend(find_datacubes(entry, recursive=recursive) if entry.is_dir() else [entry])
    if not files:
        raise ValueError(f"no bulk datacube found in {[str(b) for b in bulk]}")
    cubes = [load_prepared(path, preparation) for path in files]
    energies = [cube["energy"].values for cube in cubes]
    for path, energy in zip(files[1:], energies[1:], strict=True):
        if energy.shape != energies[0].shape or not np.allclose(energy, energies[0]):
            raise ValueError(f"{path}: its energy axis differs from that of {files[0]}; resample first")
    cls = detector_class(MODELS[model])
    if len(cubes) == 1:
        cube = cubes[0]
    elif issubclass(cls, SpectrumDetector):
        keep = [np.ones(c.shape[:2], bool) if "vacuum" not in c.coords else ~c["vacuum"].values for c in cubes]
        spectra = np.concatenate([c.values[k] for c, k in zip(cubes, keep, strict=True)])
        cube = xr.DataArray(spectra[None], dims=("y", "x", "energy"), coords={"energy": cubes[0]["energy"]})
    else:
        rows = {cube.sizes["y"] for cube in cubes}
        if len(rows) > 1:
            raise ValueError(f"{cls.__name__} training cubes must have the same number of rows; got {sorted(rows)}")
        cube = xr.concat([c.drop_vars(["x", "y", "spike"], errors="ignore") for c in cubes], dim="x")
    detector = cls(**parameters).fit(cube)
    detector.save(out, overwrite=overwrite)
    return detector
