import json
import subprocess
import sys

import numpy as np
import pytest

import eels_ad
from eels_ad.cli import main


def test_every_command_has_help(capsys):
    for command in ([], ["info"], ["simulate"], ["demo"], ["train"], ["detect"], ["denoise"], ["compare"], ["quantify"],
                    ["report"]):
        with pytest.raises(SystemExit) as exit_info:
            main([*command, "--help"])
        assert exit_info.value.code == 0
        assert "usage: eels-ad" in capsys.readouterr().out


def test_simulate_then_info(tmp_path, capsys):
    out = tmp_path / "sim.nc"
    assert main(["simulate", str(out), "--shape", "10", "12", "--shift", "0.5", "--anomaly-fraction", "0.05",
                 "--layout", "clusters", "--dose", "50", "--seed", "3"]) == 0
    assert "6 anomalous pixels shifted by +0.5 eV" in capsys.readouterr().out
    dataset = eels_ad.open_results(out)
    assert dataset["counts"].shape == (10, 12, 320)
    assert int(dataset["anomaly"].sum()) == 6
    assert main(["simulate", str(out)]) == 1  # refuses to overwrite
    assert "exists" in capsys.readouterr().err
    assert main(["info", str(out), "--json"]) == 0
    description = json.loads(capsys.readouterr().out)
    assert description["dims"] == {"y": 10, "x": 12, "energy": 320}
    assert description["energy_eV"]["dispersion"] == pytest.approx(0.25)
    assert description["counts"]["total"] == pytest.approx(float(dataset["counts"].sum()))


def test_info_on_real_dm3(real_si_path, capsys):
    assert main(["info", str(real_si_path)]) == 0
    out = capsys.readouterr().out
    assert "y=17 x=19 energy=2048" in out
    assert "450.00 - 961.75 eV, 0.25 eV/channel" in out
    assert "negative voxels" in out


def test_info_reports_bad_file_and_goes_on(tmp_path, capsys):
    bad = tmp_path / "bad.dm4"
    bad.write_text("not a dm4")
    good = tmp_path / "good.nc"
    eels_ad.save(eels_ad.as_datacube(np.ones((2, 2, 4)), energy_offset=0, dispersion=1), good)
    assert main(["info", str(bad), str(good)]) == 1
    captured = capsys.readouterr()
    assert "bad.dm4" in captured.err and "good.nc" in captured.out


def test_demo_runs_and_refuses_to_overwrite(tmp_path):
    out = tmp_path / "demo"
    # 4 CVAE epochs (the default is 8) keep the suite inside its time budget; the rest is the demo as shipped
    run = subprocess.run([sys.executable, "-m", "eels_ad.cli", "demo", "--out", str(out), "--cvae-epochs", "4"],
                         capture_output=True, text=True, timeout=3600)  # a hang guard, not a speed test
    assert run.returncode == 0, run.stderr
    assert "ROC AUC" in run.stdout
    # one line per step and the summary: no progress bars, tips or warnings unless --verbose
    assert run.stderr == "" and len(run.stdout.splitlines()) < 20 and len(run.stdout) < 3000, run.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["pca"]["roc_auc"] > 0.99
    results = eels_ad.open_results(out / "results.nc")
    assert results["pca_anomalous"].dtype == bool
    # the NB step finds the Fe L3 / L2 channels of the +1 eV shift
    channels = eels_ad.open_results(out / "nb_channels.nc")
    significant = channels["energy"].values[channels["significant"].values]
    near_edges = (significant > 700) & (significant < 730)
    assert near_edges.mean() >= 0.95  # a 5 % FDR allows a stray discovery elsewhere
    lfc = channels["log_fold_change"]
    assert float(lfc.sel(energy=707.5)) < 0 < float(lfc.sel(energy=710.0))
    assert (out / "nb_channels.png").stat().st_size > 10_000
    report = (out / "report.html").read_text()
    assert "eels-ad demo" in report and "<script src=" not in report
    assert metrics["cvae"]["roc_auc"] > 0.95
    spiral = metrics["spiral_tap"]
    assert spiral["error_vs_scaled_full_dose_denoised"] < 0.5 * spiral["error_vs_scaled_full_dose_raw"]
    again = subprocess.run([sys.executable, "-m", "eels_ad.cli", "demo", "--out", str(out)],
                           capture_output=True, text=True, timeout=3600)
    assert again.returncode == 1 and "--overwrite" in again.stderr
