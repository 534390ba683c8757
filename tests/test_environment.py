"""The conda environment and the pip requirements must list the same packages and bounds."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
CONDA_NAMES = {"torch": "pytorch"}  # pip name -> conda-forge name where they differ


def _requirement(line: str) -> tuple[str, str]:
    name, bounds = re.match(r"([A-Za-z0-9_.-]+)\s*(.*)", line.strip()).groups()
    return name.lower(), bounds.replace(" ", "")


def test_conda_env_matches_requirements():
    pip = dict(
        _requirement(line)
        for line in (ROOT / "envs" / "requirements.txt").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    )
    env = yaml.safe_load((ROOT / "envs" / "hetmerge.yaml").read_text())
    conda: dict[str, str] = {}
    for dep in env["dependencies"]:
        entries = dep["pip"] if isinstance(dep, dict) else [dep]
        conda.update(_requirement(e) for e in entries)
    for name, bounds in pip.items():
        conda_name = CONDA_NAMES.get(name, name)
        assert conda_name in conda, f"{name} is in requirements.txt but not in envs/hetmerge.yaml"
        assert conda[conda_name] == bounds, f"{name}: {bounds!r} in requirements.txt, {conda[conda_name]!r} in conda"
