"""Every bad input gets a one-line `error:` from the CLI (or a clear exception from the API) that names the
file, the option or the value, and nothing is written."""

import numpy as np
import pytest

import eels_ad
from eels_ad.cli import build_parser, main
from eels_ad.detect import PCADetector
from eels_ad.io import DatacubeReadError


def _one_error_line(captured) -> str:
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), captured.err
    return lines[0]


@pytest.fixture
def model(tmp_path):
    bulk = eels_ad.simulate_fe_l23((12, 12), anomaly_fraction=0.0, seed=1)["counts"]
    return PCADetector(n_components=2).fit(bulk).save(tmp_path / "pca.nc")


@pytest.fixture
def cube_file(tmp_path):
    return eels_ad.save(eels_ad.simulate_fe_l23((6, 6), seed=2), tmp_path / "cube.nc")


@pytest.mark.parametrize("arguments, named", [
    (["--anomaly-fraction", "1.5"], "--anomaly-fraction"),
    (["--shift", "nan"], "--shift"),
    (["--shift", "-300"], "--shift"),
    (["--seed", "-1"], "--seed"),
    (["--dose", "-1"], "--dose"),
    (["--dose", "inf"], "--dose"),
])
def test_simulate_bad_values(tmp_path, capsys, arguments, named):
    out = tmp_path / "sim.nc"
    assert main(["simulate", str(out), "--shape", "4", "4", *arguments]) == 1
    line = _one_error_line(capsys.readouterr())
    assert named in line and arguments[1] in line.replace("-300.0", "-300")
    assert not out.exists() and not list(tmp_path.iterdir())


def test_simulate_bad_outputs(tmp_path, capsys):
    assert main(["simulate", str(tmp_path / "sim.txt")]) == 1
    assert "sim.txt" in _one_error_line(capsys.readouterr())
    missing = tmp_path / "no" / "such" / "sim.nc"
    assert main(["simulate", str(missing)]) == 1
    assert "does not exist" in _one_error_line(capsys.readouterr())
    assert not (tmp_path / "no").exists()
    existing = tmp_path / "sim.nc"
    assert main(["simulate", str(existing), "--shape", "2", "2"]) == 0
    capsys.readouterr()
    before = existing.read_bytes()
    assert main(["simulate", str(existing), "--shape", "2", "2", "--seed", "5"]) == 1
    line = _one_error_line(capsys.readouterr())
    assert "--overwrite" in line and "overwrite=True" not in line
    assert existing.read_bytes() == before
    with pytest.raises(SystemExit) as exit_info:  # argparse: a one-line usage error
        main(["simulate", str(tmp_path / "x.nc"), "--shape", "0", "5"])
    assert exit_info.value.code == 2
    assert "--shape" in capsys.readouterr().err


def test_detect_into_a_file_or_from_an_empty_folder(tmp_path, capsys, model, cube_file):
    target = tmp_path / "results.txt"
    target.write_text("keep me")
    assert main(["detect", str(model), str(cube_file), "--out", str(target), "--quiet"]) == 1
    assert "results.txt is a file" in _one_error_line(capsys.readouterr())
    assert target.read_text() == "keep me"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["detect", str(model), str(empty), "--out", str(tmp_path / "out"), "--quiet"]) == 1
    assert "no datacube found in" in _one_error_line(capsys.readouterr())
    assert not (tmp_path / "out").exists()


def test_detect_twice_skips_its_own_outputs(tmp_path, capsys):
    bulk = eels_ad.simulate_fe_l23((12, 12), anomaly_fraction=0.0, seed=1)["counts"]
    model = PCADetector(n_components=2).fit(bulk).save(tmp_path / "pca.nc")
    data = tmp_path / "data"
    data.mkdir()
    eels_ad.save(eels_ad.simulate_fe_l23((6, 6), seed=2), data / "cube.nc")
    for _ in range(2):
        assert main(["detect", str(model), str(data), "--out", str(data / "results"), "--quiet"]) == 0
    assert capsys.readouterr().err == ""
    assert sorted(p.name for p in (data / "results").glob("*.nc")) == ["cube.detect.nc"]


def test_an_all_zero_cube_is_reported_not_scored(tmp_path, capsys, model):
    zeros = eels_ad.as_datacube(np.zeros((4, 4, 320)), energy=eels_ad.simulate.DEFAULT_ENERGY)
    with pytest.raises(ValueError, match="holds no counts"):
        eels_ad.detect.load(model).score(zeros)
    path = eels_ad.save(zeros, tmp_path / "zeros.nc")
    assert main(["detect", str(model), str(path), "--out", str(tmp_path / "out"), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "zeros.nc" in err and "holds no counts" in err
    assert not (tmp_path / "out" / "zeros.detect.nc").exists()


@pytest.mark.parametrize("suffix", [".dm3", ".dm4"])
def test_empty_and_truncated_microscope_files(tmp_path, suffix, real_si_path):
    empty = tmp_path / f"empty{suffix}"
    empty.write_bytes(b"")
    with pytest.raises(DatacubeReadError, match=f"empty{suffix}: is an empty file"):
        eels_ad.load(empty)
    truncated = tmp_path / f"cut{suffix}"
    truncated.write_bytes(real_si_path.read_bytes()[:40])
    with pytest.raises(DatacubeReadError, match=f"cut{suffix}: is truncated"):
        eels_ad.load(truncated)


def test_a_decreasing_energy_axis_says_how_to_fix_it():
    with pytest.raises(ValueError, match=r"runs backwards: use cube.sortby\('energy'\)"):
        eels_ad.as_datacube(np.ones((1, 1, 4)), energy=[4.0, 3.0, 2.0, 1.0])


def test_every_option_of_every_command_says_what_it_does():
    parser = build_parser()
    commands = next(a for a in parser._actions if a.dest == "command")
    for name, sub in commands.choices.items():
        for action in sub._actions:
            if action.dest == "help":
                continue
            assert action.help, f"eels-ad {name} {action.option_strings or action.dest}: no help text"


@pytest.mark.parametrize("arguments, named", [
    (["--fdr", "1.5"], "--fdr"),
    (["--fdr", "0"], "--fdr"),
    (["--model", "cvae", "--max-time", "0"], "--max-time"),
    (["--model", "cvae", "--max-time", "-3"], "--max-time"),
])
def test_train_bad_rates_and_times(tmp_path, capsys, cube_file, arguments, named):
    out = tmp_path / "model.nc"
    assert main(["train", str(cube_file), "--out", str(out), "--quiet", *arguments]) == 1
    line = _one_error_line(capsys.readouterr())
    assert named in line and not out.exists()
