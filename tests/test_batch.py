import os
import signal
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

import eels_ad
from eels_ad.batch import detect_job, plan, run
from eels_ad.cli import main
from eels_ad.detect import PCADetector


def write_cube(path: Path, seed: int, shape=(16, 16), **kwargs) -> Path:
    eels_ad.save(eels_ad.simulate_fe_l23(shape, seed=seed, anomaly_fraction=0.05, **kwargs), path)
    return path


@pytest.fixture
def model(tmp_path) -> Path:
    bulk = eels_ad.simulate_fe_l23((24, 24), anomaly_fraction=0.0, seed=100)["counts"]
    return PCADetector(n_components=3).fit(bulk).save(tmp_path / "pca.nc")


@pytest.fixture
def folder(tmp_path) -> Path:
    inputs = tmp_path / "in"
    inputs.mkdir()
    for seed in range(3):
        write_cube(inputs / f"good{seed}.nc", seed)
    return inputs


def read_scores(out: Path) -> dict[str, np.ndarray]:
    return {p.name: eels_ad.open_results(p)["score"].values for p in sorted(out.glob("*.detect.nc"))}


def test_bad_files_are_reported_and_the_run_goes_on(tmp_path, model, folder, capsys):
    good = (folder / "good0.nc").read_bytes()
    (folder / "truncated.nc").write_bytes(good[:500])
    (folder / "notes.dm4").write_text("a text file named .dm4")
    xr.DataArray(np.ones((4, 5)), dims=("a", "b"), name="counts").to_netcdf(folder / "flat.nc", engine="h5netcdf")
    write_cube(folder / "elsewhere.nc", 7, energy=400.0 + 0.25 * np.arange(320))
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    out = tmp_path / "out"
    assert main(["detect", str(model), str(folder), "--out", str(out), "--quiet"]) == 1
    summary = eels_ad.batch.json.loads((out / "summary.json").read_text())
    status = {Path(f["input"]).name: f for f in summary["files"]}
    assert [name for name, f in status.items() if f["status"] == "done"] == ["good0.nc", "good1.nc", "good2.nc"]
    assert "truncated.nc" in status["truncated.nc"]["reason"]
    assert "notes.dm4" in status["notes.dm4"]["reason"]
    assert "dims" in status["flat.nc"]["reason"]
    assert "does not cover the fitted one" in status["elsewhere.nc"]["reason"]
    assert summary["counts"] == {"done": 3, "skipped": 0, "failed": 4, "retried": 0}
    assert sorted(p.name for p in out.glob("*.detect.nc")) == ["good0.detect.nc", "good1.detect.nc", "good2.detect.nc"]
    assert "failed" in (out / "eels-ad.log").read_text()
    assert "notes.dm4" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before  # inputs untouched


def test_detect_equals_the_python_api_and_resumes(tmp_path, model, folder):
    out = tmp_path / "out"
    assert main(["detect", str(model), str(folder), "--out", str(out), "--quiet"]) == 0
    detector = PCADetector.load(model)
    for name, scores in read_scores(out).items():
        cube = eels_ad.load(folder / name.replace(".detect.nc", ".nc"))
        np.testing.assert_array_equal(scores, detector.score(cube).values)
        result = eels_ad.open_results(out / name)
        np.testing.assert_array_equal(result["anomalous"].values, detector.predict(cube).values)
    stamp = (out / "good0.detect.nc").stat().st_mtime_ns
    assert main(["detect", str(model), str(folder), "--out", str(out), "--quiet"]) == 0
    assert (out / "good0.detect.nc").stat().st_mtime_ns == stamp  # skipped: complete
    assert main(["detect", str(model), str(folder), "--out", str(out), "--quiet", "--overwrite"]) == 0
    assert (out / "good0.detect.nc").stat().st_mtime_ns != stamp


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_outputs(tmp_path, model):
    inputs = tmp_path / "in"
    inputs.mkdir()
    for seed in range(8):
        write_cube(inputs / f"cube{seed}.nc", seed, shape=(48, 48))
    reference, interrupted = tmp_path / "reference", tmp_path / "interrupted"
    command = [sys.executable, "-m", "eels_ad.cli", "detect", str(model), str(inputs), "--quiet", "--out"]
    subprocess.run([*command, str(reference)], check=True, timeout=300)  # a hang guard, not a speed test
    process = subprocess.Popen([*command, str(interrupted)], start_new_session=True)
    deadline = time.time() + 120
    while not list(interrupted.glob("*.detect.nc")) and time.time() < deadline:
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    finished = read_scores(interrupted)
    assert 1 <= len(finished) < 8, "the kill should land after the first file and before the last"
    for name, scores in finished.items():  # whatever exists is complete
        np.testing.assert_array_equal(scores, read_scores(reference)[name])
    subprocess.run([*command, str(interrupted)], check=True, timeout=300)  # a hang guard (the run takes ~6 s alone)
    resumed, expected = read_scores(interrupted), read_scores(reference)
    assert resumed.keys() == expected.keys()
    for name in expected:
        np.testing.assert_array_equal(resumed[name], expected[name])
    assert not list(interrupted.glob(".*.tmp"))


@pytest.mark.slow
def test_workers_and_a_dask_cluster_give_the_single_process_results(tmp_path, model, folder, monkeypatch):
    from distributed import Client, LocalCluster

    # distributed's LocalCluster writes OMP/MKL/OPENBLAS_NUM_THREADS=1 into this process's environment (for its
    # workers) and leaves them there: every later subprocess (the demo, the notebooks' kernels) would then run
    # on one thread. Each is set here through monkeypatch (then removed if it was absent), so that its
    # teardown puts the environment back.
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MALLOC_TRIM_THRESHOLD_"):
        present = name in os.environ
        monkeypatch.setenv(name, os.environ.get(name, "unset"))
        if not present:
            monkeypatch.delenv(name)

    pairs = plan([folder], tmp_path / "single", suffix=".detect.nc")
    job = partial(detect_job, model=str(model))
    single = run(job, pairs, tmp_path / "single", progress=False)
    pooled = run(job, plan([folder], tmp_path / "pool", suffix=".detect.nc"), tmp_path / "pool", workers=2,
                 progress=False)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        clustered = run(job, plan([folder], tmp_path / "dask", suffix=".detect.nc"), tmp_path / "dask",
                        scheduler=client, progress=False)
    assert [r.status for r in single] == [r.status for r in pooled] == [r.status for r in clustered] == ["done"] * 3
    for other in ("pool", "dask"):
        theirs = read_scores(tmp_path / other)
        for name, scores in read_scores(tmp_path / "single").items():
            np.testing.assert_array_equal(scores, theirs[name])


def test_train_denoise_compare_commands(tmp_path, folder):
    bulk = write_cube(tmp_path / "bulk.nc", 50, shape=(24, 24))
    model = tmp_path / "model.nc"
    assert main(["train", str(bulk), "--out", str(model), "--quiet", "--robust"]) == 0
    assert main(["train", str(bulk), "--out", str(model), "--quiet"]) == 1  # refuses to overwrite
    assert main(["train", str(bulk), "--out", str(tmp_path / "model.pt"), "--quiet"]) == 1  # not .nc
    detections = tmp_path / "detections"
    assert main(["detect", str(model), str(folder), "--out", str(detections), "--quiet"]) == 0
    channels = tmp_path / "channels"
    assert main(["compare", str(detections), "--out", str(channels), "--quiet",
                 "--normalize-range", "670", "700"]) == 0
    table = eels_ad.open_results(channels / "good0.channels.nc")
    assert table["significant"].dtype == bool and table.sizes["energy"] == 320
    page = tmp_path / "report.html"
    assert main(["report", str(detections / "good0.detect.nc"), "--channels", str(channels / "good0.channels.nc"),
                 "--out", str(page), "--quiet"]) == 0
    text = page.read_text()
    assert "pixels flagged" in text and "good0.nc" in text and "energy channels differ" in text
    assert main(["report", str(detections / "good0.detect.nc"), "--out", str(page), "--quiet"]) == 1  # exists
    denoised = tmp_path / "denoised"
    assert main(["denoise", str(folder / "good0.nc"), "--out", str(denoised), "--tau", "0.2", "--max-iter", "5",
                 "--quiet"]) == 0
    assert eels_ad.open_results(denoised / "good0.denoised.nc")["intensity"].shape == (16, 16, 320)
    # one report of everything: detection, channel table, quantity maps and the denoising
    quantified = tmp_path / "quantified"
    assert main(["quantify", str(folder / "good0.nc"), "--out", str(quantified), "--quiet"]) == 0
    full = tmp_path / "full.html"
    assert main(["report", str(detections / "good0.detect.nc"), "--channels", str(channels / "good0.channels.nc"),
                 "--quantities", str(quantified / "good0.quantify.nc"), "--denoised",
                 str(denoised / "good0.denoised.nc"), "--out", str(full), "--quiet"]) == 0
    text = full.read_text()
    assert "edge shift error (eV)" in text and "per-pixel Poisson fits" in text and "reconstructed, " in text


def test_cvae_train_command(tmp_path):
    bulk = write_cube(tmp_path / "bulk.nc", 51, shape=(12, 12))
    model = tmp_path / "cvae.nc"
    assert main(["train", str(bulk), "--model", "cvae", "--epochs", "1", "--out", str(model), "--quiet"]) == 0
    assert eels_ad.detect.load(model).score(eels_ad.load(bulk)).shape == (12, 12)
    blind = tmp_path / "blind.nc"
    assert main(["train", str(bulk), "--model", "cvae", "--epochs", "1", "--context", "neighbours", "--out",
                 str(blind), "--quiet"]) == 0
    detector = eels_ad.detect.load(blind)
    assert detector.context == "neighbours" and detector.model_.hole is not None


def test_plan_keeps_subfolders_apart(tmp_path):
    for sub in ("a", "b"):
        (tmp_path / "in" / sub).mkdir(parents=True)
        write_cube(tmp_path / "in" / sub / "same.nc", 1, shape=(4, 4))
    pairs = plan([tmp_path / "in"], tmp_path / "out", suffix=".detect.nc", recursive=True)
    assert [o.relative_to(tmp_path / "out").as_posix() for _, o in pairs] == ["a/same.detect.nc", "b/same.detect.nc"]
    with pytest.raises(ValueError, match="same outputs"):
        plan([tmp_path / "in" / "a" / "same.nc", tmp_path / "in" / "b" / "same.nc"], tmp_path / "out", suffix=".x")


def test_relative_paths_survive_a_change_of_folder(tmp_path, model, folder, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["detect", "pca.nc", "in", "--out", "detections", "--quiet"]) == 0
    detection = eels_ad.open_results(tmp_path / "detections" / "good0.detect.nc")
    assert Path(detection.attrs["source_file"]) == (folder / "good0.nc").resolve()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main(["compare", str(tmp_path / "detections"), "--out", "channels", "--quiet"]) == 0
    assert (elsewhere / "channels" / "good0.channels.nc").is_file()


def _dies_on_b(source: Path, output: Path):
    """A job whose worker process dies (as if killed) on the file named b.nc."""
    if source.name == "b.nc":
        os._exit(9)
    output.write_text("done")
    return eels_ad.batch.FileResult(str(source), str(output), "done")


def test_a_dead_pool_worker_is_reported_and_the_run_ends(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("a", "b", "c"):
        (folder / f"{name}.nc").write_text("")
    out = tmp_path / "out"
    results = run(_dies_on_b, plan([folder], out, suffix=".txt"), out, workers=2, progress=False)
    status = {Path(r.input).name: r for r in results}
    assert status["b.nc"].status == "failed"
    assert "worker process died" in status["b.nc"].reason and "b.nc" in status["b.nc"].reason
    # every file has a row; those the pool finished before it broke are done, the others say to run again
    assert sorted(status) == ["a.nc", "b.nc", "c.nc"]
    for name in ("a.nc", "c.nc"):
        assert status[name].status == "done" or "run the command again" in status[name].reason
    summary = eels_ad.batch.json.loads((out / "summary.json").read_text())
    assert summary["counts"]["failed"] >= 1 and len(summary["files"]) == 3
