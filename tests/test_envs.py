"""The pinned pip requirements, the conda environment and pyproject agree."""

from __future__ import annotations

import re
from importlib import metadata
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[ ;]", requirement, maxsplit=1)[0].strip().lower().replace("_", "-")


def _pins(lines: list[str]) -> dict[str, str]:
    pins = {}
    for line in lines:
        line = line.split("#", 1)[0].strip()
        if not line or line.startswith("-"):
            continue
        name, _, version = line.partition("==")
        assert version, f"{line!r} is not pinned with =="
        pins[_name(name)] = version.strip()
    return pins


def test_conda_env_mirrors_pip_pins():
    pip_pins = _pins((REPO / "envs/requirements.txt").read_text().splitlines())
    env = yaml.safe_load((REPO / "envs/mgi.yaml").read_text())
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    assert _pins(pip_section) == pip_pins
    assert "python=3.11" in env["dependencies"]


def test_every_package_dependency_is_pinned():
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    pins = _pins((REPO / "envs/requirements.txt").read_text().splitlines())
    assert {_name(d) for d in project["dependencies"]} == set(pins)


def test_installed_versions_match_the_pins():
    pins = _pins((REPO / "envs/requirements.txt").read_text().splitlines())
    wrong = {name: (version, metadata.version(name)) for name, version in pins.items()
             if metadata.version(name) != version}
    assert not wrong, f"installed versions differ from envs/requirements.txt: {wrong}"
