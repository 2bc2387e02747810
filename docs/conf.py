"""Sphinx configuration of the eels-ad documentation.

Build (offline, warnings as errors): ``python -m sphinx -W -b html docs docs/_build/html``.
``EELS_AD_DOCS_EXECUTE=off`` skips running the notebooks (the test of the API pages does); the default
``cache`` runs each notebook once and keeps its outputs in ``docs/_build/.jupyter_cache``.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import eels_ad

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

project = "eels-ad"
author = "the eels-ad developers"
release = version = eels_ad.__version__
copyright = "2026, the eels-ad developers"

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.viewcode",
    "numpydoc",
    "myst_nb",
    "sphinxarg.ext",
]

# the notebooks live in ../notebooks (jupytext pairs); a copy of the .ipynb is rendered here
_notebooks = HERE / "notebooks"
_notebooks.mkdir(exist_ok=True)
for _old in _notebooks.glob("*.ipynb"):
    _old.unlink()
for _source in sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb")):
    shutil.copy2(_source, _notebooks / _source.name)

nb_execution_mode = os.environ.get("EELS_AD_DOCS_EXECUTE", "cache")
nb_execution_timeout = 900
nb_execution_raise_on_error = True
nb_execution_cache_path = str(HERE / "_build" / ".jupyter_cache")
nb_merge_streams = True
myst_enable_extensions = ["colon_fence", "dollarmath"]
# HoloViews / Bokeh / Panel outputs load their JavaScript from a CDN: keep the pages offline by rendering
# those cells as text (the interactive explorer needs a live kernel anyway); figures are PNG
nb_mime_priority_overrides = [
    ("html", mime, None) for mime in (
        "application/javascript", "text/html", "application/vnd.holoviews_load.v0+json",
        "application/vnd.holoviews_exec.v0+json", "application/vnd.bokehjs_load.v0+json",
        "application/vnd.bokehjs_exec.v0+json")
]

# the API pages: one per public face, listing its __all__ (so they never drift from the code)
FACES = {
    "eels_ad": "the package face: loading, saving, validating datacubes",
    "eels_ad.simulate": "ground-truth spectrum images",
    "eels_ad.prepare": "gain, spikes, vacuum, zero-loss drift",
    "eels_ad.detect": "detectors, scores, thresholds",
    "eels_ad.quantify": "edge shift, white-line ratio, valence, drift separation",
    "eels_ad.reconstruct": "SPIRAL-TAP",
    "eels_ad.stats": "negative-binomial fits and tests",
    "eels_ad.viz": "explore, report, figures",
    "eels_ad.io": "formats and NetCDF",
    "eels_ad.datacube": "the convention, and reading lazy cubes chunk by chunk",
    "eels_ad.evaluate": "metrics and grids",
    "eels_ad.batch": "folder jobs",
}


def _write_api_pages() -> None:
    import importlib
    import inspect

    api = HERE / "api"
    api.mkdir(exist_ok=True)
    lines = ["API reference", "=============", "", ".. toctree::", "   :maxdepth: 1", ""]
    for name, summary in FACES.items():
        module = importlib.import_module(name)
        members = sorted(getattr(module, "__all__", []) or
                         [m for m in dir(module) if not m.startswith("_") and callable(getattr(module, m))
                          and getattr(getattr(module, m), "__module__", "").startswith(name)])
        members = [m for m in members if m[:1].isalpha() and not m.isupper()
                   and not inspect.ismodule(getattr(module, m))]  # subpackages have pages of their own
        title = f"``{name}``: {summary}"
        page = [title, "=" * len(title), "", f".. automodule:: {name}", "   :no-members:", "",
                f".. currentmodule:: {name}", "", ".. autosummary::", "   :toctree: generated", ""]
        page += [f"   {member}" for member in members]
        (api / f"{name}.rst").write_text("\n".join(page) + "\n")
        lines.append(f"   {name}")
    (api / "index.rst").write_text("\n".join(lines) + "\n")


_write_api_pages()
autosummary_generate = True
autosummary_imported_members = True
autodoc_typehints = "none"  # numpydoc's Parameters sections say the types
numpydoc_show_class_members = False
numpydoc_class_members_toctree = False
numpydoc_attributes_as_param_list = False

source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}
exclude_patterns = ["_build", "**.ipynb_checkpoints", "notebooks/*.py"]
suppress_warnings = ["mystnb.unknown_mime_type", "mystnb.mime_priority"]  # the dropped outputs above

html_theme = "pydata_sphinx_theme"
html_title = "eels-ad"
html_theme_options = {
    "navigation_with_keys": False,
    "show_toc_level": 2,
    "icon_links": [],
}
html_context = {"default_mode": "light"}  # a stated mode (else the theme logs an error on a first visit)
html_static_path: list[str] = []
# nothing from a CDN: MathJax is not used (no math on these pages), every script ships with the build
html_math_renderer = None
