"""environment.yml (conda) and pyproject.toml (pip) must name the same packages."""

import re
from pathlib import Path

import tomllib
import yaml

REPO = Path(__file__).resolve().parent.parent
CONDA_TO_PIP = {"pytorch": "torch"}


def _name(requirement: str) -> str:
    name = re.split(r"[<>=!~;\[ ]", requirement.strip(), maxsplit=1)[0]
    return re.sub(r"[-_.]+", "-", name).lower()


def test_environment_yml_matches_pyproject():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    pip_names = {_name(r) for r in project["dependencies"]} | {
        _name(r) for r in project["optional-dependencies"]["dev"]
    }
    environment = yaml.safe_load((REPO / "environment.yml").read_text())
    conda_names = set()
    pip_section = []
    for entry in environment["dependencies"]:
        if isinstance(entry, dict):
            pip_section = entry.get("pip", [])
            continue
        name = _name(entry)
        if name not in ("python", "pip"):
            conda_names.add(CONDA_TO_PIP.get(name, name))
    assert conda_names - pip_names == set(), "in environment.yml but not in pyproject.toml"
    assert pip_names - conda_names == set(), "in pyproject.toml but not in environment.yml"
    assert environment["channels"] == ["conda-forge"]
    assert "-e ." in pip_section  # the package itself comes in with pip


def test_torch_is_not_pinned_to_one_version():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    torch = [r for r in project["dependencies"] if _name(r) == "torch"]
    assert torch and "==" not in torch[0]


def test_ci_runs_the_readme_test_command_word_for_word():
    readme = (REPO / "README.md").read_text()
    ci = (REPO / ".ci" / "run").read_text()
    command = [line for line in ci.splitlines() if "pytest" in line]
    assert len(command) == 1
    assert command[0].strip() in readme
