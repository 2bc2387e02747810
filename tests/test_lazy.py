"""Lazy (dask-backed) cubes: every stage reads them chunk by chunk and gives the in-memory numbers."""

import json
import tracemalloc
import warnings
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

import eels_ad
from eels_ad.cli import main
from eels_ad.datacube import DatacubeReadError, is_lazy, iter_spectra
from eels_ad.detect import CVAEDetector, PCADetector
from eels_ad.quantify import edge_shift_map, white_line_ratio_map
from eels_ad.reconstruct import denoise_cube
from eels_ad.stats import compare_regions

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "real"


@pytest.fixture(scope="module")
def simulated():
    return eels_ad.simulate_fe_l23((30, 22), seed=4, anomaly_fraction=0.05)


@pytest.fixture(scope="module")
def on_disk(simulated, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("lazy") / "cube.nc"
    eels_ad.save(simulated["counts"], path)
    return path


@pytest.fixture
def pair(simulated, on_disk):
    """(in memory, lazy in chunks of 4 rows) of the same cube."""
    return simulated["counts"], eels_ad.load(on_disk, chunks={"y": 4})


class Reads:
    """Counts the dask computations (reads of a lazy cube) inside a ``with`` block."""

    def __enter__(self):
        from dask.callbacks import Callback

        self.count = 0
        outer = self

        class Counter(Callback):
            def _start(self, dsk):
                outer.count += 1

        self._callback = Counter()
        self._callback.__enter__()
        return self

    def __exit__(self, *exc):
        self._callback.__exit__(*exc)


@pytest.mark.parametrize("suffix", [".nc", ".hspy", ".zspy", ".emd"])
def test_every_chunked_format_loads_lazily_with_the_eager_values(simulated, tmp_path, suffix):
    path = tmp_path / f"cube{suffix}"
    if suffix == ".nc":
        eels_ad.save(simulated["counts"], path)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            eels_ad.io.to_hyperspy(simulated["counts"]).save(path)
    lazy, eager = eels_ad.load(path, lazy=True), eels_ad.load(path)
    assert is_lazy(lazy) and not is_lazy(eager)
    assert lazy.dims == eager.dims == ("y", "x", "energy")
    np.testing.assert_array_equal(lazy.values, eager.values)
    np.testing.assert_allclose(lazy["energy"].values, eager["energy"].values)
    assert eels_ad.load(path, chunks={"y": 7}).data.chunks[0][0] == 7


def test_prepare_of_a_lazy_cube_stays_lazy_and_equals_in_memory(tmp_path):
    from eels_ad.prepare import estimate_gain, prepare

    cube = eels_ad.simulate_fe_l23((40, 24), anomaly_fraction=0.0, seed=3)["counts"] * 3  # 3 counts per electron
    eels_ad.save(cube, tmp_path / "clean.nc")
    # the gain from 4 of the 5 chunks of rows: within 3 % of the whole image's, and of the truth
    sampled = estimate_gain(eels_ad.load(tmp_path / "clean.nc", chunks={"y": 8})).gain
    assert sampled == pytest.approx(estimate_gain(cube).gain, rel=0.03) and sampled == pytest.approx(3, rel=0.05)
    cube[:5] = cube[:5] // 40  # vacuum rows
    for y, x, e in ((7, 3, 100), (8, 20, 40), (15, 11, 200), (23, 0, 5), (39, 23, 300)):  # spikes, two at chunk edges
        cube[y, x, e] += 9000
    path = tmp_path / "raw.nc"
    eels_ad.save(cube, path)
    lazy = eels_ad.load(path, chunks={"y": 8})
    with Reads() as reads:
        ready = prepare(lazy, gain=3.0)
    assert is_lazy(ready) and reads.count <= 4  # the total, the spikes counted, the vacuum mask: not the cube
    given = prepare(cube, gain=3.0)
    assert ready.attrs["n_spikes"] == given.attrs["n_spikes"] == 5
    assert ready.attrs["n_vacuum_pixels"] == given.attrs["n_vacuum_pixels"] == 5 * 24
    np.testing.assert_array_equal(ready["vacuum"].values, given["vacuum"].values)
    np.testing.assert_allclose(ready.values, given.values, rtol=1e-12)
    np.testing.assert_array_equal(ready["spike"].values, given["spike"].values)
    # and the pipeline runs on it chunk by chunk: the same scores as in memory
    detector = PCADetector(spatial=False).fit(given)
    np.testing.assert_allclose(detector.score(ready).values, detector.score(given).values, rtol=1e-9)
    # the batch commands read a prepared file lazily with --chunk-rows
    out = tmp_path / "out"
    model = detector.save(tmp_path / "pca.nc")
    assert main(["detect", str(model), str(path), "--chunk-rows", "8", "--gain", "3", "--out", str(out),
                 "--quiet"]) == 0


def test_a_zspy_store_with_a_chunk_missing_is_refused_by_name(simulated, tmp_path):
    path = tmp_path / "cube.zspy"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        signal = eels_ad.io.to_hyperspy(simulated["counts"])
        signal.save(path, chunks=(10, 22, 64))
    np.testing.assert_array_equal(eels_ad.load(path).values, simulated["counts"].values)  # whole: reads
    data = path / "Experiments" / "counts" / "data"  # chunk files 'i/j/k' (nested) or 'i.j.k'
    chunk = data / "1" / "0" / "0" if (data / "1").is_dir() else data / "1.0.0"  # rows 10-19
    chunk.unlink()
    for lazy in (True, False):
        with pytest.raises(DatacubeReadError, match=r"cube.zspy: 1 of \d+ chunks .* missing .* rows 10-19"):
            eels_ad.load(path, lazy=lazy)


@pytest.mark.skipif(not (SHARED / "fe_oxide_si.dm3").exists(), reason="../shared/data/real is not beside the project")
def test_dm_files_are_memory_mapped_with_the_eager_values():
    path = SHARED / "fe_oxide_si.dm3"
    lazy, eager = eels_ad.load(path, lazy=True), eels_ad.load(path)
    assert is_lazy(lazy)
    np.testing.assert_array_equal(lazy.values, eager.values)


def test_a_lazy_cube_is_validated_without_a_pass_and_checked_inside_its_chunks(simulated, tmp_path):
    values = simulated["counts"].values.astype(float)
    values[17, 5, 40] = np.nan
    values[2, 3, 7] = -2.0
    cube = simulated["counts"].copy(data=values)
    path = tmp_path / "bad.nc"
    eels_ad.save(cube, path)
    with Reads() as reads:
        lazy = eels_ad.load(path, chunks={"y": 4})
        again = eels_ad.validate(lazy)
    assert reads.count == 0  # structure checked now, values when the chunks are read
    assert again.data.name == lazy.data.name  # validated once: not wrapped again
    assert float(lazy.isel(y=slice(0, 4)).min()) == 0.0  # the negative count clipped in its chunk
    with pytest.raises(ValueError, match=r"bad\.nc.*y=17, x=5, energy index 40"):
        PCADetector(n_components=2).fit(lazy)


def test_pca_fit_score_and_reconstruct_lazily_equal_in_memory(pair):
    eager, lazy = pair
    for options in ({"n_components": 3}, {"robust": True}, {"context": "neighbours", "n_components": 3}):
        a, b = PCADetector(**options).fit(eager), PCADetector(**options).fit(lazy)
        np.testing.assert_allclose(b.components_, a.components_, rtol=1e-9, atol=1e-12)
        assert a.n_trimmed_ == b.n_trimmed_
        np.testing.assert_allclose(b.score(lazy).values, a.score(eager).values, rtol=1e-9)
    model = b.reconstruct(lazy)
    assert is_lazy(model)  # computed chunk by chunk when read or saved
    np.testing.assert_allclose(model.values, a.reconstruct(eager).values, rtol=1e-9)


def test_pca_on_a_lazy_cube_holds_two_chunks_and_the_model_whatever_the_cube_size(tmp_path, monkeypatch):
    # the spectra trimmed in a round come back with it up to TRIMMED_HELD (then memory grows with the cube up to
    # that cap); here both cubes pass it, so that their trimmed spectra's moments come from a pass over their rows
    monkeypatch.setattr(PCADetector, "TRIMMED_HELD", 64)
    energy = 680 + 0.25 * np.arange(512)
    fits, scores = {}, {}
    for rows in (96, 192):
        path = tmp_path / f"cube{rows}.nc"
        eels_ad.save(eels_ad.simulate_fe_l23((rows, 64), energy=energy, seed=1)["counts"], path)
        lazy = eels_ad.load(path, chunks={"y": 32})
        if rows == 96:  # imports and caches out of the count
            PCADetector(robust=True, chunk_pixels=256).fit(lazy).score(lazy)
        for context in ("pixel", "neighbours"):
            # whether the chunk read ahead is held at the peak depends on the threads' timing (measured on one
            # core: 22.1 or 24.2 MiB for the same fit): the largest of three runs is each figure
            for _ in range(3):
                tracemalloc.start()
                detector = PCADetector(robust=True, chunk_pixels=256, context=context).fit(lazy)
                fits[rows, context] = max(fits.get((rows, context), 0), tracemalloc.get_traced_memory()[1])
                tracemalloc.reset_peak()
                detector.score(lazy)
                scores[rows, context] = max(scores.get((rows, context), 0), tracemalloc.get_traced_memory()[1])
                tracemalloc.stop()
    chunk_bytes = 32 * 64 * 512 * 4  # one stored chunk of rows (int32 counts)
    work_bytes = 4 * 256 * 512 * 8  # a work block of chunk_pixels spectra as float64, and its temporaries
    # the model: the sample of spectra (float32) held for the robust fit and the calibration, and the
    # channels x channels matrices of the fit (cross products, their eigenvectors)
    model_bytes = PCADetector.CALIBRATION_SAMPLE * 512 * 4 + 4 * 512 * 512 * 8
    # measured 22-26 MiB (fit) and 13.4-15.6 MiB (score) of 27.8 and 16.0 (session 9's code: 40-60 MiB): the
    # chunk in work and the next one read ahead, never three (a chunk is converted a work block at a time)
    for key in fits:
        assert fits[key] < 2 * chunk_bytes + work_bytes + model_bytes, (key, fits[key] / 2**20)
        assert scores[key] < 2 * chunk_bytes + work_bytes + 2 * 512 * 512 * 8, (key, scores[key] / 2**20)
    # twice the cube, nearly the same memory: only the maps grow with the pixels (scores, component scores and
    # their FFTs for the rings: ~200 bytes a pixel, against 2 KiB a spectrum); measured +0.0-0.1 MiB (fit),
    # +0.1-0.7 MiB (score)
    for context in ("pixel", "neighbours"):
        pixels = (192 - 96) * 64
        assert fits[192, context] < fits[96, context] + 300 * pixels, (context, fits)
        assert scores[192, context] < scores[96, context] + 300 * pixels, context


def test_a_lazy_cube_is_read_a_chunk_at_a_time_converted_a_work_block_at_a_time(tmp_path):
    cube = eels_ad.simulate_fe_l23((20, 6), energy=680 + 0.25 * np.arange(64), seed=2)["counts"]
    eels_ad.save(cube, tmp_path / "c.nc")
    lazy = eels_ad.load(tmp_path / "c.nc", chunks={"y": 8})
    blocks = list(iter_spectra(lazy, 12))  # 2 rows of 6 pixels per work block; chunks of 8 rows
    assert [(b.start, b.stop) for b, _ in blocks] == [(0, 2), (2, 4), (4, 6), (6, 8), (8, 10), (10, 12),
                                                      (12, 14), (14, 16), (16, 18), (18, 20)]
    for rows, spectra in blocks:
        owner = spectra if spectra.base is None else spectra.base
        assert spectra.dtype == np.float64 and owner.nbytes == spectra.nbytes  # its own copy: keeps no chunk alive
        np.testing.assert_array_equal(spectra, cube.values[rows].reshape(-1, 64))
    wanted = np.zeros(20, dtype=bool)
    wanted[[3, 17]] = True
    assert [(b.start, b.stop) for b, _ in iter_spectra(lazy, 12, rows_wanted=wanted)] == [(2, 4), (16, 18)]


def test_cvae_scores_a_lazy_cube_band_by_band_as_in_memory(pair):
    eager, lazy = pair
    detector = CVAEDetector(max_epochs=1, seed=0, spatial=False, score_stride=2, progress=False).fit(eager)
    for scoring in ("deviance", "nll"):
        detector.scoring = scoring
        np.testing.assert_allclose(detector.score(lazy).values, detector.score(eager).values, rtol=1e-5, atol=1e-6)


def test_cvae_scores_a_lazy_cube_holding_two_patch_rows_whatever_its_height(tmp_path):
    energy = 680 + 0.25 * np.arange(256)
    train = eels_ad.simulate_fe_l23((16, 16), energy=energy, anomaly_fraction=0.0, seed=0)["counts"]
    detector = CVAEDetector(max_epochs=1, seed=0, spatial=False, progress=False).fit(train)
    peaks = {}
    for rows in (48, 144):
        path = tmp_path / f"cube{rows}.nc"
        eels_ad.save(eels_ad.simulate_fe_l23((rows, 64), energy=energy, seed=1)["counts"], path)
        lazy = eels_ad.load(path, chunks={"y": 16})
        detector.score(lazy)  # imports and caches out of the count
        tracemalloc.start()
        detector.score(lazy)
        peaks[rows] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    chunk_bytes = 16 * 64 * 256 * 4  # a stored chunk of rows (int32)
    held_rows = 2 * 8 * (64 + 8) * 256 * (4 + 8)  # two patch heights of the mirrored rows: counts and weighted sums
    patch_row = 3 * (64 + 8) // 8 * 8 * 8 * 256 * 4  # a row of patches as the network takes them, and its outputs
    # measured 5.5 MiB of 7.3 (scored a row of spectra at a time; scoring the finished rows at once: 11.9 MiB)
    assert peaks[48] < 2 * chunk_bytes + held_rows + patch_row, peaks[48] / 2**20
    assert peaks[144] < peaks[48] + 2**19, (peaks[144] - peaks[48]) / 2**20  # three times the rows, the same


def test_cvae_neighbour_context_scores_a_lazy_cube_band_by_band_as_in_memory(pair):
    eager, lazy = pair
    detector = CVAEDetector(context="neighbours", max_epochs=1, seed=0, spatial=False, progress=False).fit(eager)
    detector.SCORE_BATCH = 6  # a band of rows is one row of hidden centres (4 pixel rows): 8 bands
    chosen = []  # the hidden centres that the second step predicts again
    blocks_seeing = detector._blocks_seeing
    detector._blocks_seeing = lambda *args: chosen.append(blocks_seeing(*args)) or chosen[-1]
    for scoring in ("deviance", "nll"):
        detector.scoring = scoring
        chosen.clear()
        with Reads() as reads:
            scores = detector.score(lazy).values
        again = sum(int(blocks.any(axis=1).sum()) for blocks in chosen)
        assert (again > 0) == (scoring == "deviance")  # a 1-epoch model's suspects; the NLL scores in one step
        np.testing.assert_allclose(scores, detector.score(eager).values, rtol=1e-5, atol=1e-6)
        assert reads.count == 8 + again  # one read per band, and one per band that the second step runs


def test_compare_regions_in_one_pass_equals_in_memory(pair, simulated):
    eager, lazy = pair
    flagged = simulated["anomaly"].values
    for options in ({}, {"normalize_range": (690.0, 700.0)}, {"method": "mle"}):
        a = compare_regions(eager, ~flagged, flagged, **options)
        with Reads() as reads:
            b = compare_regions(lazy, ~flagged, flagged, **options)
        for name in ("log_fold_change", "pvalue", "dispersion", "mean_a", "mean_b"):
            np.testing.assert_allclose(b[name].values, a[name].values, rtol=1e-7, equal_nan=True)
        assert reads.count <= lazy.data.numblocks[0]  # each chunk of rows read once


def test_quantify_maps_of_a_lazy_cube_equal_in_memory(pair):
    eager, lazy = pair
    a, b = edge_shift_map(eager), edge_shift_map(lazy)
    for name in ("shift", "shift_error"):
        np.testing.assert_allclose(b[name].values, a[name].values, rtol=1e-9, equal_nan=True)
    a, b = white_line_ratio_map(eager), white_line_ratio_map(lazy)
    np.testing.assert_allclose(b["l3_l2_ratio"].values, a["l3_l2_ratio"].values, rtol=1e-9, equal_nan=True)


def test_denoising_in_tiles_lazily_and_in_memory(simulated, on_disk):
    cube = simulated["counts"]
    whole = denoise_cube(cube, tau=3.0)
    tiled = denoise_cube(cube, tau=3.0, tile=12, overlap=6)
    assert tiled.attrs["tiles"] == 6
    # the tiles see their neighbours through the overlap: the seams change the result little
    assert np.linalg.norm(tiled.values - whole.values) / np.linalg.norm(whole.values) < 0.02
    lazy = denoise_cube(eels_ad.load(on_disk, chunks={"y": 4}), tau=3.0, tile=12, overlap=6)
    assert is_lazy(lazy)
    np.testing.assert_allclose(lazy.values, tiled.values, rtol=1e-9)
    chosen = denoise_cube(cube, tile=12)
    assert chosen.attrs["tau_chosen_on"].startswith("central region") and chosen.attrs["tau"] > 0


def test_tiles_are_solved_one_at_a_time_in_one_thread_on_both_backends(simulated, on_disk, monkeypatch):
    import threading

    import dask

    from eels_ad.reconstruct import spiral

    threads = {"numpy": set(), "torch": set()}
    active, most = [0], [0]
    lock = threading.Lock()
    solver = spiral.spiral_tap

    def recording(*args, **kwargs):
        threads[kwargs.get("backend", "numpy")].add(threading.current_thread().name)
        with lock:
            active[0] += 1
            most[0] = max(most[0], active[0])
        try:
            return solver(*args, **kwargs)
        finally:
            with lock:
                active[0] -= 1

    monkeypatch.setattr(spiral, "spiral_tap", recording)
    results = {}
    with dask.config.set(scheduler="threads", num_workers=2):
        for backend in ("numpy", "torch"):
            lazy = denoise_cube(eels_ad.load(on_disk, chunks={"y": 4}), tau=3.0, tile=12, overlap=6, max_iter=3,
                                min_iter=3, backend=backend)
            results[backend] = lazy.values
    # the TV kernels' and torch's threads share the cores within a tile, one tile after another, always from the
    # same thread (each thread's allocator arena would otherwise keep a tile's working memory), though dask reads
    # tiles in two threads
    for backend, names in threads.items():
        assert [name.startswith("eels-ad-tile") for name in names] == [True], (backend, names)
    assert most[0] == 1
    np.testing.assert_allclose(results["torch"], results["numpy"], rtol=1e-3, atol=1e-3 * results["numpy"].max())


def test_a_lazy_result_is_saved_chunk_by_chunk(pair, tmp_path):
    eager, lazy = pair
    eels_ad.save(lazy, tmp_path / "copy.nc")
    np.testing.assert_array_equal(eels_ad.load(tmp_path / "copy.nc").values, eager.values)


def _damage(path: Path, where: float = 0.6) -> None:
    """Zero a stretch of bytes inside the compressed data: the header reads, a chunk does not."""
    data = bytearray(path.read_bytes())
    start = int(len(data) * where)
    data[start:start + 500] = bytes(500)
    path.write_bytes(bytes(data))


def test_a_damaged_chunk_names_the_file_and_rows_and_a_batch_goes_on(simulated, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("a", "b"):
        eels_ad.save(simulated["counts"], folder / f"{name}.nc")
    _damage(folder / "b.nc")
    lazy = eels_ad.load(folder / "b.nc", chunks={"y": 4})  # opens: the damage is in the data
    with pytest.raises(DatacubeReadError, match=r"b\.nc: rows \d+-\d+ \(of 30\) cannot be read"):
        PCADetector(n_components=2).fit(lazy)
    model = PCADetector(n_components=3).fit(simulated["counts"]).save(tmp_path / "pca.nc")
    out = tmp_path / "out"
    code = main(["detect", str(model), str(folder), "--out", str(out), "--quiet", "--raw", "--chunk-rows", "4",
                 "--reconstruction"])
    assert code == 1
    summary = json.loads((out / "summary.json").read_text())
    status = {Path(row["input"]).name: row for row in summary["files"]}
    assert status["a.nc"]["status"] == "done" and status["b.nc"]["status"] == "failed"
    assert "b.nc: rows" in status["b.nc"]["reason"]
    assert sorted(p.name for p in out.iterdir() if p.suffix == ".nc") == ["a.detect.nc"]  # nothing half-written
    assert not list(out.glob(".*"))


def test_a_chunk_too_big_for_memory_is_made_smaller_and_said(on_disk, monkeypatch):
    monkeypatch.setattr(eels_ad.io, "_available_memory", lambda: 4 * 2**20)  # 4 MiB free
    with pytest.warns(ResourceWarning, match=r"cube\.nc: chunks of 30 rows .* using (\d+) rows per chunk") as caught:
        cube = eels_ad.load(on_disk, chunks={"y": 30})
    rows = cube.data.chunks[0][0]
    assert 1 <= rows < 30 and f"using {rows} rows per chunk" in str(caught[0].message)
    np.testing.assert_array_equal(cube.values, eels_ad.load(on_disk).values)  # smaller chunks, the same cube


def test_lazy_batch_runs_equal_in_memory_runs(simulated, on_disk, tmp_path):
    bulk = eels_ad.simulate_fe_l23((30, 22), seed=9, anomaly_fraction=0.0)["counts"]
    model = PCADetector(n_components=3, scoring="shift").fit(bulk).save(tmp_path / "pca.nc")
    runs = {}
    for label, extra in (("eager", []), ("lazy", ["--chunk-rows", "4"])):
        out = tmp_path / label
        assert main(["detect", str(model), str(on_disk), "--out", str(out), "--quiet", "--raw", *extra]) == 0
        assert main(["compare", str(out), "--out", str(out / "channels"), "--quiet", *extra]) == 0
        runs[label] = (xr.open_dataset(out / "cube.detect.nc", engine="h5netcdf").load(),
                       xr.open_dataset(out / "channels" / "cube.channels.nc", engine="h5netcdf").load())
    np.testing.assert_allclose(runs["lazy"][0]["score"].values, runs["eager"][0]["score"].values, rtol=1e-9)
    assert int(runs["lazy"][0]["anomalous"].sum()) >= 2
    np.testing.assert_allclose(runs["lazy"][1]["pvalue"].values, runs["eager"][1]["pvalue"].values, rtol=1e-7,
                               equal_nan=True)


def test_detect_with_reconstruction_reads_a_lazy_input_twice(simulated, on_disk, tmp_path):
    """Once for the scores, once for the reconstruction written beside them (it read the input ~8 times)."""
    from eels_ad.batch import detect_job

    model = PCADetector(n_components=3).fit(simulated["counts"]).save(tmp_path / "pca.nc")
    with Reads() as reads:
        detect_job(on_disk, tmp_path / "out.nc", model=str(model), reconstruction=True, chunks={"y": 4})
    assert reads.count == 2
    saved = eels_ad.open_results(tmp_path / "out.nc")
    expected = PCADetector.load(model).reconstruct(simulated["counts"]).values
    np.testing.assert_allclose(saved["reconstruction"].values, expected, rtol=1e-9)
