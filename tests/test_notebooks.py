"""The notebooks: jupytext percent scripts (``notebooks/NN_name.py``) are the source; the paired .ipynb
(committed without outputs, for download) must say the same, and both run top to bottom in a fresh kernel.

After editing a script: ``jupytext --sync notebooks/NN_name.py`` rewrites its notebook.
"""

import os
from pathlib import Path

import jupytext
import nbformat
import pytest
from nbclient import NotebookClient

FOLDER = Path(__file__).resolve().parent.parent / "notebooks"
SCRIPTS = sorted(FOLDER.glob("[0-9][0-9]_*.py"))
NOTEBOOKS = sorted(FOLDER.glob("*.ipynb"))


def _cells(notebook) -> list[tuple[str, str]]:
    return [(cell.cell_type, cell.source.strip()) for cell in notebook.cells]


def test_every_script_has_its_notebook_and_they_agree():
    assert SCRIPTS and [p.stem for p in SCRIPTS] == [p.stem for p in NOTEBOOKS]
    for script in SCRIPTS:
        source = jupytext.read(script)
        paired = nbformat.read(script.with_suffix(".ipynb"), as_version=4)
        assert _cells(source) == _cells(paired), f"{script.name} and its .ipynb differ: jupytext --sync {script}"
        assert paired.metadata.get("jupytext", {}).get("formats") == "ipynb,py:percent", script.name


def test_notebooks_are_committed_without_outputs():
    for path in NOTEBOOKS:
        notebook = nbformat.read(path, as_version=4)
        for cell in notebook.cells:
            if cell.cell_type == "code":
                assert cell.outputs == [] and cell.execution_count is None, path.name


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path, tmp_path, monkeypatch):
    monkeypatch.setenv("MPLBACKEND", "Agg")
    notebook = nbformat.read(path, as_version=4)
    client = NotebookClient(notebook, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}})
    client.execute(env=dict(os.environ))
