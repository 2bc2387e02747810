"""Folder jobs on a real Dask cluster: a scheduler and two workers started as separate processes."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
from test_lazy import _damage

import eels_ad
from eels_ad import batch
from eels_ad.batch import detect_job, plan, run
from eels_ad.cli import main
from eels_ad.datacube import DatacubeReadError
from eels_ad.detect import PCADetector

DASK = Path(sys.executable).parent / "dask"
# hang guards only (a healthy start takes a few seconds): never a measure of speed
START_GUARD_S = 180
ENERGY_96 = np.linspace(690.0, 737.5, 96)  # a short Fe L2,3 window: small CVAEs


def _environment() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONWARNINGS"] = "ignore"
    return env


@contextmanager
def _cluster(tmp_path: Path):
    """``dask scheduler`` and two ``dask worker --no-nanny`` processes on localhost; yields (address, workers)."""
    if not DASK.exists():
        pytest.skip(f"no `dask` command beside {sys.executable}")
    scheduler_file = tmp_path / "scheduler.json"
    logs = tmp_path / "cluster-logs"
    logs.mkdir()
    processes = []

    def start(name: str, *arguments: str) -> subprocess.Popen:
        log = open(logs / f"{name}.log", "w")  # noqa: SIM115 (closed with the process)
        process = subprocess.Popen([str(DASK), *arguments], stdout=log, stderr=subprocess.STDOUT, env=_environment(),
                                   cwd=tmp_path)
        processes.append((process, log))
        return process

    start("scheduler", "scheduler", "--scheduler-file", str(scheduler_file), "--port", "0", "--no-dashboard",
          "--host", "127.0.0.1")
    deadline = time.monotonic() + START_GUARD_S
    while not scheduler_file.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert scheduler_file.exists(), (logs / "scheduler.log").read_text()
    address = json.loads(scheduler_file.read_text())["address"]
    workers = [start(f"worker{i}", "worker", address, "--nthreads", "1", "--no-nanny", "--no-dashboard",
                     "--name", f"w{i}", "--local-directory", str(tmp_path / f"w{i}"), "--preload", "eels_ad.batch")
               for i in range(2)]
    try:
        yield address, workers
    finally:
        for process, log in reversed(processes):
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    process.kill()
            log.close()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """One cluster for the tests that leave its workers alive (starting one takes seconds)."""
    with _cluster(tmp_path_factory.mktemp("cluster")) as started:
        yield started


@pytest.fixture
def own_cluster(tmp_path):
    """A cluster of the test's own, for a test that kills a worker."""
    with _cluster(tmp_path) as started:
        yield started


@pytest.fixture
def cubes(tmp_path) -> tuple[Path, Path]:
    inputs = tmp_path / "in"
    inputs.mkdir()
    for seed in range(6):
        eels_ad.save(eels_ad.simulate_fe_l23((96, 96), seed=seed, anomaly_fraction=0.02), inputs / f"c{seed}.nc")
    bulk = eels_ad.simulate_fe_l23((32, 32), anomaly_fraction=0.0, seed=99)["counts"]
    return inputs, PCADetector(n_components=3).fit(bulk).save(tmp_path / "pca.nc")


def _scores(out: Path) -> dict[str, np.ndarray]:
    return {p.name: eels_ad.open_results(p)["score"].values for p in sorted(out.glob("*.detect.nc"))}


def test_a_folder_job_survives_a_killed_worker(tmp_path, own_cluster, cubes):
    from distributed import Client

    address, workers = own_cluster
    inputs, model = cubes
    job = partial(detect_job, model=str(model))
    reference = run(job, plan([inputs], tmp_path / "ref", suffix=".detect.nc"), tmp_path / "ref", progress=False)
    assert [r.status for r in reference] == ["done"] * 6

    with Client(address, timeout=60, set_as_default=False) as client:  # run() must not need a default client
        client.wait_for_workers(2, timeout=START_GUARD_S)
        pids = client.run(os.getpid)  # worker address -> process id
        out = tmp_path / "out"
        outcome: dict = {}
        runner = threading.Thread(target=lambda: outcome.setdefault(
            "results", run(job, plan([inputs], out, suffix=".detect.nc"), out, scheduler=address, progress=False)))
        runner.start()
        # kill a worker while it is processing a job (SIGKILL: no clean-up, as a crash or the OOM killer)
        killed = None
        deadline = time.monotonic() + START_GUARD_S
        while killed is None and time.monotonic() < deadline:
            busy = [worker for worker, keys in client.processing().items() if keys]
            if busy:
                killed = busy[0]
                os.kill(pids[killed], signal.SIGKILL)
            time.sleep(0.01)
        runner.join(timeout=START_GUARD_S * 2)
        assert not runner.is_alive()
    assert killed is not None
    results = outcome["results"]
    assert [r.status for r in results] == ["done"] * 6, [r.reason for r in results]
    # every output right (the single-process scores), each input once, nothing half-written left
    theirs, expected = _scores(out), _scores(tmp_path / "ref")
    assert theirs.keys() == expected.keys()
    for name in expected:
        np.testing.assert_array_equal(theirs[name], expected[name])
    assert not list(out.glob(".*.tmp"))
    summary = json.loads((out / "summary.json").read_text())
    assert sorted(Path(f["input"]).name for f in summary["files"]) == [f"c{i}.nc" for i in range(6)]
    retried = [f for f in summary["files"] if f["extra"].get("attempts", 1) > 1]
    assert summary["counts"]["retried"] == len(retried) >= 1  # the job the dead worker held ran again
    for row in retried:  # finished elsewhere; the killed worker, if the job got to start there, listed first
        assert row["extra"]["worker"] != killed
        assert row["extra"]["workers_tried"][-1] == row["extra"]["worker"]
        assert set(row["extra"]["workers_tried"][:-1]) <= {killed}
    assert "died while processing it" in (out / batch.LOG_NAME).read_text()


def test_a_scheduler_that_does_not_answer_is_a_clear_error_in_seconds(tmp_path, monkeypatch, capsys):
    import socket

    with socket.socket() as probe:  # a port with nothing listening
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setattr(batch, "CONNECT_TIMEOUT", 2)
    cube = tmp_path / "a.nc"
    eels_ad.save(eels_ad.simulate_fe_l23((8, 8), seed=0), cube)
    model = PCADetector(n_components=2).fit(eels_ad.load(cube)).save(tmp_path / "pca.nc")
    started = time.monotonic()
    with pytest.raises(ConnectionError, match=f"no Dask scheduler answers at tcp://127.0.0.1:{port}"):
        batch.connect(f"tcp://127.0.0.1:{port}")
    assert time.monotonic() - started < 60  # a hang guard: it gives up after CONNECT_TIMEOUT, not never
    code = main(["detect", str(model), str(cube), "--out", str(tmp_path / "out"), "--quiet",
                 "--scheduler", f"tcp://127.0.0.1:{port}"])
    assert code == 1
    assert f"tcp://127.0.0.1:{port}" in capsys.readouterr().err
    assert not list((tmp_path / "out").glob("*.detect.nc"))


def test_one_large_cube_split_over_the_cluster_by_tiles(tmp_path, cluster):
    """A lazy cube's tiles (denoising) are computed by the cluster's workers, with the local result."""
    from distributed import Client, get_task_stream

    from eels_ad.reconstruct import denoise_cube

    address, _ = cluster
    path = tmp_path / "cube.nc"
    eels_ad.save(eels_ad.simulate_fe_l23((24, 20), seed=2)["counts"], path)
    local = denoise_cube(eels_ad.load(path), tau=2.0, tile=12, overlap=4, max_iter=5, min_iter=5)
    with Client(address, timeout=60) as client:  # the default scheduler while open: dask work goes to the cluster
        client.wait_for_workers(2, timeout=START_GUARD_S)
        lazy = denoise_cube(eels_ad.load(path, chunks={"y": 12}), tau=2.0, tile=12, overlap=4, max_iter=5, min_iter=5)
        with get_task_stream(client) as stream:
            values = lazy.values
        workers_seen = set(client.scheduler_info()["workers"])
    np.testing.assert_allclose(values, local.values, rtol=1e-9)
    # dask fuses each tile's denoising into the task that trims its margins: one such task per tile
    tiles = [task for task in stream.data if str(task["key"]).startswith("('_trim-")]
    assert len(tiles) == 4  # 2 x 2 tiles of 12 pixels
    assert {task["worker"] for task in tiles} <= set(workers_seen)


def test_one_large_cube_fitted_scored_and_compared_over_the_cluster_by_chunks(tmp_path, cluster):
    """A robust PCA fit, PCA scores (both contexts) and compare_regions of a lazy cube: one task per chunk of
    rows on the workers, the chunks' results combined there, the numbers of the local run."""
    from distributed import Client, get_task_stream

    from eels_ad.stats import compare_regions

    address, _ = cluster
    path = tmp_path / "cube.nc"
    simulated = eels_ad.simulate_fe_l23((40, 24), seed=3, anomaly_fraction=0.03)
    eels_ad.save(simulated["counts"], path)
    bulk = eels_ad.simulate_fe_l23((32, 32), anomaly_fraction=0.0, seed=98)["counts"]
    detectors = {context: PCADetector(n_components=3, context=context, chunk_pixels=96).fit(bulk)
                 for context in ("pixel", "neighbours")}
    flagged = simulated["anomaly"].values > 0
    local = {context: d.score(eels_ad.load(path)) for context, d in detectors.items()}
    local_table = compare_regions(eels_ad.load(path), ~flagged, flagged)
    local_fit = PCADetector(robust=True, chunk_pixels=96).fit(eels_ad.load(path))
    with Client(address, timeout=60) as client:
        client.wait_for_workers(2, timeout=START_GUARD_S)
        lazy = eels_ad.load(path, chunks={"y": 8})  # 5 chunks of rows
        with get_task_stream(client) as stream:
            remote = {context: d.score(lazy) for context, d in detectors.items()}
            table = compare_regions(lazy, ~flagged, flagged)
            fitted = PCADetector(robust=True, chunk_pixels=96).fit(lazy)  # moments and sample, then trimming
        workers_seen = set(client.scheduler_info()["workers"])
    for context in detectors:
        np.testing.assert_allclose(remote[context].values, local[context].values, rtol=1e-10)
        np.testing.assert_allclose(remote[context]["pixel_score"].values, local[context]["pixel_score"].values,
                                   rtol=1e-10)
    for column in ("log_fold_change", "pvalue"):
        np.testing.assert_allclose(table[column].values, local_table[column].values, rtol=1e-10)
    assert fitted.n_trimmed_ == local_fit.n_trimmed_ > 0
    np.testing.assert_allclose(np.abs(fitted.components_), np.abs(local_fit.components_), atol=1e-9)
    np.testing.assert_allclose(fitted.calibration_scores_, local_fit.calibration_scores_, rtol=1e-9, atol=1e-9)
    folds = [task for task in stream.data if str(task["key"]).startswith("_fold_chunk")]
    # pixel: 1 pass; neighbours: own coefficients, scores, and (anomalies present) a second step over some
    # chunks; compare: 1 pass; robust fit: 2 passes. Each pass: one task per chunk of rows that holds wanted rows
    assert len(folds) >= 5 * 6, len(folds)
    assert {task["worker"] for task in folds} <= workers_seen and len({task["worker"] for task in folds}) == 2


def test_one_cube_scored_by_the_cvae_over_the_cluster(tmp_path, cluster, monkeypatch):
    """The CVAE's scoring of a lazy cube, both contexts: a task per chunk of rows (pixel context) or band of hidden
    centres (neighbours) on the workers, the model sent once; the scores of the local run."""
    from distributed import Client, get_task_stream

    from eels_ad.detect import CVAEDetector

    monkeypatch.setattr(CVAEDetector, "SCORE_BATCH", 12)  # bands of 2 rows of hidden centres: 5 of them here

    address, _ = cluster
    path = tmp_path / "cube.nc"
    eels_ad.save(eels_ad.simulate_fe_l23((40, 24), seed=5, anomaly_fraction=0.03, energy=ENERGY_96), path)
    bulk = eels_ad.simulate_fe_l23((16, 16), anomaly_fraction=0.0, seed=96, energy=ENERGY_96)["counts"]
    detectors = {context: CVAEDetector(context=context, max_epochs=1, progress=False, seed=0).fit(bulk)
                 for context in ("pixel", "neighbours")}
    local = {context: d.score(eels_ad.load(path, chunks={"y": 8})) for context, d in detectors.items()}
    with Client(address, timeout=60) as client:
        client.wait_for_workers(2, timeout=START_GUARD_S)
        with get_task_stream(client) as stream:
            remote = {context: d.score(eels_ad.load(path, chunks={"y": 8})) for context, d in detectors.items()}
    for context in detectors:
        np.testing.assert_allclose(remote[context]["pixel_score"].values, local[context]["pixel_score"].values,
                                   rtol=1e-6, err_msg=context)
        np.testing.assert_allclose(remote[context].values, local[context].values, rtol=1e-6, atol=1e-9,
                                   err_msg=context)
    for name in ("_score_rows_task", "_first_step_task"):
        tasks = [task for task in stream.data if str(task["key"]).startswith(name)]
        assert len(tasks) >= 4 and len({task["worker"] for task in tasks}) == 2, (name, len(tasks))
    # the second step (centres whose ring held suspects, predicted again with the suspects out of the plane) runs
    # on the workers too, a task per band that holds such a centre
    assert any(str(task["key"]).startswith("_second_step_task") for task in stream.data)
    # a chunk damaged in the middle of the file: the error names the file and the rows, from the cluster too
    _damage(path)
    with Client(address, timeout=60), pytest.raises(DatacubeReadError, match=r"cube\.nc: rows \d+-\d+ \(of 40\) "
                                                                        r"cannot be read on the cluster"):
        detectors["neighbours"].score(eels_ad.load(path, chunks={"y": 8}))


def test_one_cube_quantified_over_the_cluster_by_chunks(tmp_path, cluster, monkeypatch):
    """The quantity maps of a lazy cube, bulk template and per-pixel fits: one task per chunk of rows on the
    workers (the drift map's rows travel with them), nothing read where the job runs, every map as the local
    run's."""
    from distributed import Client, get_task_stream

    from eels_ad.quantify import edge_shift_map, separate_drift, valence_map, white_line_ratio_map
    from eels_ad.simulate import fe_l23_edge, simulate_mixture

    address, _ = cluster
    path, mixture_path = tmp_path / "cube.nc", tmp_path / "mixture.nc"
    eels_ad.save(eels_ad.simulate_fe_l23((32, 20), seed=4, anomaly_fraction=0.05, dose=30), path)
    energy = np.arange(695.0, 735.0, 0.1)
    references = xr.DataArray(np.stack([fe_l23_edge(energy, l3=708.5, continuum=0.3),
                                        fe_l23_edge(energy, l3=710.1, l3_l2_ratio=5.0, continuum=0.3)]),
                              dims=("component", "energy"), coords={"component": ["Fe2+", "Fe3+"], "energy": energy})
    fraction = np.random.default_rng(0).uniform(0, 1, (24, 12))
    eels_ad.save(simulate_mixture(references, fraction, dose=100, seed=1)["counts"], mixture_path)
    drift = np.linspace(-0.3, 0.3, 32)[:, None] * np.ones((1, 20))  # per-pixel data that each chunk needs its rows of

    def maps(cube, mixture):
        separated = separate_drift(edge_shift_map(cube))["drift"]  # the drift separated from local shifts, then
        return {"shift": edge_shift_map(cube, drift=drift), "ratio": white_line_ratio_map(cube, chunk_pixels=80),
                "valence": valence_map(mixture, references, shift=True),
                "separated": edge_shift_map(cube, drift=separated)}  # the template and fit with it

    local = maps(eels_ad.load(path), eels_ad.load(mixture_path))
    assert main(["quantify", str(path), "--out", str(tmp_path / "local"), "--quiet"]) == 0
    with Client(address, timeout=60) as client:
        client.wait_for_workers(2, timeout=START_GUARD_S)
        with get_task_stream(client) as stream, monkeypatch.context() as patched:
            def no_local_read(*args, **kwargs):
                raise AssertionError("the cube was read where the job runs, not on the workers")

            patched.setattr(eels_ad.datacube, "iter_spectra", no_local_read)
            remote = maps(eels_ad.load(path, chunks={"y": 8}), eels_ad.load(mixture_path, chunks={"y": 6}))
        with get_task_stream(client) as cli_stream:  # the command line: each file's passes over the cluster
            assert main(["quantify", str(path), "--out", str(tmp_path / "split"), "--quiet", "--scheduler", address,
                         "--split-cubes", "--chunk-rows", "8"]) == 0
    split, alone = (eels_ad.open_results(tmp_path / where / "cube.quantify.nc") for where in ("split", "local"))
    for variable in alone.data_vars:
        np.testing.assert_allclose(split[variable].values, alone[variable].values, rtol=1e-9, atol=1e-12,
                                   err_msg=variable)
    assert sum(str(task["key"]).startswith("_fold_chunk") for task in cli_stream.data) >= 4
    for name, dataset in local.items():
        for variable in dataset.data_vars:
            np.testing.assert_allclose(remote[name][variable].values, dataset[variable].values, rtol=1e-9,
                                       atol=1e-12, err_msg=f"{name}: {variable}")  # values near 0: sums' order
    assert np.isfinite(local["shift"]["shift"].values).mean() > 0.9
    folds = [task for task in stream.data if str(task["key"]).startswith("_fold_chunk")]
    # each map's template passes (totals, sums, two rounds of shifts and sums, variance) and its fit: a task per
    # chunk of rows each
    assert len(folds) >= 5 * 4 * 5, len(folds)
    assert len({task["worker"] for task in folds}) == 2


def test_detect_split_cubes_runs_each_cube_over_the_cluster_by_chunks(tmp_path, cluster):
    """``eels-ad detect --scheduler ADDRESS --split-cubes``: the outputs of a local run, the chunks of rows
    scored by the cluster's workers; without --scheduler it is a clear error."""
    from distributed import Client, get_task_stream

    address, _ = cluster
    inputs = tmp_path / "in"
    inputs.mkdir()
    for seed in range(2):
        eels_ad.save(eels_ad.simulate_fe_l23((32, 24), seed=seed, anomaly_fraction=0.02), inputs / f"c{seed}.nc")
    bulk = eels_ad.simulate_fe_l23((32, 32), anomaly_fraction=0.0, seed=97)["counts"]
    model = PCADetector(n_components=3, chunk_pixels=96).fit(bulk).save(tmp_path / "pca.nc")
    assert main(["detect", str(model), str(inputs), "--out", str(tmp_path / "local"), "--quiet", "--raw"]) == 0
    assert main(["detect", str(model), str(inputs), "--out", str(tmp_path / "x"), "--quiet", "--split-cubes"]) == 1
    with Client(address, timeout=60) as observer, get_task_stream(observer) as stream:
        observer.wait_for_workers(2, timeout=START_GUARD_S)
        code = main(["detect", str(model), str(inputs), "--out", str(tmp_path / "split"), "--quiet", "--raw",
                     "--scheduler", address, "--split-cubes", "--chunk-rows", "8"])
    assert code == 0
    local, split = _scores(tmp_path / "local"), _scores(tmp_path / "split")
    assert sorted(split) == sorted(local) == ["c0.detect.nc", "c1.detect.nc"]
    for name in local:
        np.testing.assert_allclose(split[name], local[name], rtol=1e-10)
    folds = [task for task in stream.data if str(task["key"]).startswith("_fold_chunk")]
    assert len(folds) == 2 * 4  # 2 cubes of 4 chunks of 8 rows, one scoring pass each
    assert len({task["worker"] for task in folds}) == 2
