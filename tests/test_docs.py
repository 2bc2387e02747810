"""The documentation site builds offline with warnings as errors (the notebooks not executed here: the
notebook tests run them; ``python -m sphinx -W -b html docs docs/_build/html`` executes them too)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    pytest.importorskip("sphinx")
    pytest.importorskip("myst_nb")
    out = tmp_path_factory.mktemp("docs") / "html"
    doctrees = out.parent / "doctrees"
    run = subprocess.run([sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html", "-d",
                          str(doctrees), str(REPO / "docs"), str(out)], capture_output=True, text=True,
                         env={**os.environ, "EELS_AD_DOCS_EXECUTE": "off"}, cwd=REPO)
    assert run.returncode == 0, run.stderr[-4000:]
    return out


def test_docs_build_with_every_page(built):
    for page in ("index.html", "install.html", "cli.html", "benchmarks.html", "user_guide/quantify.html",
                 "notebooks/05_chemical_shift.html", "api/eels_ad.quantify.html",
                 "api/generated/eels_ad.quantify.edge_shift_map.html", "api/generated/eels_ad.detect.PCADetector.html"):
        assert (built / page).is_file(), page
    api = (built / "api" / "generated" / "eels_ad.quantify.edge_shift_map.html").read_text()
    assert "Cramer-Rao" in api and "Parameters" in api
    cli = (built / "cli.html").read_text()
    assert "--low-loss-suffix" in cli and "quantify" in cli
    assert (built / "_images").is_dir() and any((built / "_images").glob("quantify*.png"))


def test_docs_load_nothing_from_the_network(built):
    for page in built.rglob("*.html"):
        text = page.read_text()
        remote = re.findall(r'<(?:script|link|img)[^>]+(?:src|href)="(https?://[^"]+)"', text)
        assert remote == [], f"{page.relative_to(built)} loads {remote[:3]}"
        assert "cdn." not in text.lower(), f"{page.relative_to(built)} names a CDN (a script that loads one?)"


def test_every_public_face_has_an_api_page(built):
    import eels_ad.quantify

    for name in eels_ad.quantify.__all__:
        assert (built / "api" / "generated" / f"eels_ad.quantify.{name}.html").is_file(), name


def test_docs_pages_open_in_a_browser_without_errors(built):
    from browser import check_in_browser

    if not (Path("/usr/bin/chromium").exists() and Path("/usr/bin/chromedriver").exists()):
        pytest.skip("needs Debian's chromium and chromium-driver (installed by .ci/run as root)")
    pytest.importorskip("selenium")
    for page in ("index.html", "user_guide/quantify.html", "api/generated/eels_ad.quantify.edge_shift_map.html"):
        widths: dict = {}
        errors = check_in_browser(built / page, min_canvases=0, width=1400, height=1000, widths=widths)
        assert errors == [], (page, errors)
        assert widths["scroll"] <= widths["window"], (page, widths)
