"""The environments, extras, lock file, licence and citations must say the same thing, and stay installable."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement

from hetmerge.papers import PAPERS

ROOT = Path(__file__).resolve().parents[1]
ENVS = ROOT / "envs"
CONDA_NAMES = {"torch": "pytorch"}  # pip name -> conda-forge name where they differ
IMPORT_NAMES = {"scikit-learn": "sklearn", "pot": "ot", "pyyaml": "yaml"}  # distribution -> module
EXTRAS = ("test", "dev", "slurm")


def _requirements(path: Path) -> dict[str, Requirement]:
    lines = [line for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]
    return {(req := Requirement(line)).name.lower(): req for line in lines}


def _pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_conda_env_matches_runtime_requirements():
    pip = _requirements(ENVS / "requirements.txt")
    env = yaml.safe_load((ENVS / "hetmerge.yaml").read_text())
    conda = {}
    for dep in env["dependencies"]:
        assert isinstance(dep, str), f"envs/hetmerge.yaml: runtime dependencies only, no pip section: {dep}"
        name, bounds = re.match(r"([A-Za-z0-9_.-]+)\s*(.*)", dep).groups()
        conda[name.lower()] = bounds.replace(" ", "")
    conda.pop("python")
    assert set(conda) == {CONDA_NAMES.get(name, name) for name in pip}
    for name, req in pip.items():
        assert set(conda[CONDA_NAMES.get(name, name)].split(",")) == {str(s) for s in req.specifier}, name


def test_conda_channels_reach_snakemake():
    """Snakemake is distributed through Bioconda, which builds on conda-forge: both, conda-forge first."""
    channels = yaml.safe_load((ENVS / "hetmerge.yaml").read_text())["channels"]
    assert channels.index("conda-forge") < channels.index("bioconda")
    assert "defaults" not in channels


def test_every_runtime_dependency_is_imported():
    """A runtime dependency the package, the Snakefile and the rules never import is dead weight for every user."""
    sources = [*ROOT.joinpath("src").rglob("*.py"), ROOT / "Snakefile", *ROOT.joinpath("rules").glob("*.smk")]
    imported: set[str] = set()
    for path in sources:
        imported |= set(re.findall(r"^\s*(?:from|import)\s+([A-Za-z_]\w*)", path.read_text(), flags=re.M))
    unused = [name for name in _requirements(ENVS / "requirements.txt") if IMPORT_NAMES.get(name, name) not in imported]
    assert not unused, f"declared in envs/requirements.txt but never imported: {unused}"


def test_test_tools_are_extras_not_runtime():
    runtime = _requirements(ENVS / "requirements.txt")
    for tool in ("pytest", "hypothesis", "ruff", "snakefmt", "snakemake-executor-plugin-slurm"):
        assert tool not in runtime
    extras = _pyproject()["tool"]["setuptools"]["dynamic"]["optional-dependencies"]
    assert set(extras) == set(EXTRAS)
    for extra in EXTRAS:
        assert extras[extra] == {"file": [f"envs/requirements-{extra}.txt"]}
    assert "pytest" in _requirements(ENVS / "requirements-test.txt")
    assert {"ruff", "snakefmt"} <= set(_requirements(ENVS / "requirements-dev.txt"))
    assert "snakemake-executor-plugin-slurm" in _requirements(ENVS / "requirements-slurm.txt")


def test_lock_pins_every_requirement_within_its_bounds_with_hashes():
    text = (ENVS / "requirements.lock").read_text()
    entries = re.findall(
        r"^([A-Za-z0-9_.-]+)==(\S+)(?: ;[^\\\n]*)? \\\n((?:\s+--hash=sha256:[0-9a-f]{64}(?: \\)?\n)+)", text, re.M
    )
    pinned = {name.lower().replace("_", "-"): version for name, version, _ in entries}
    assert len(entries) == len(re.findall(r"^[A-Za-z0-9_.-]+==", text, re.M)), "a pinned line without hashes"
    for path in sorted(ENVS.glob("requirements*.txt")):
        for name, req in _requirements(path).items():
            assert name in pinned, f"{name} ({path.name}) is not in envs/requirements.lock: regenerate it"
            assert req.specifier.contains(pinned[name], prereleases=True), f"lock pins {name}=={pinned[name]}: {req}"


def test_package_data_exists_and_reaches_the_wheel(tmp_path):
    patterns = _pyproject()["tool"]["setuptools"]["package-data"]["hetmerge"]
    package = ROOT / "src" / "hetmerge"
    for pattern in patterns:
        assert list(package.glob(pattern)), f"package-data names {pattern!r}, which matches no file"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("hetmerge-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for pattern in patterns:
        for file in package.glob(pattern):
            assert f"hetmerge/{file.relative_to(package).as_posix()}" in names, (
                f"{file.name} is missing from {wheel.name}"
            )
    metadata = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("/METADATA"))).decode()
    assert "License-Expression: MIT" in metadata
    assert any(n.endswith("licenses/LICENSE") for n in names)
    for extra in EXTRAS:
        assert f"Provides-Extra: {extra}" in metadata


def test_licence_is_mit_in_file_and_metadata():
    assert (ROOT / "LICENSE").read_text().startswith("MIT License")
    assert _pyproject()["project"]["license"] == "MIT"


def test_version_has_one_source():
    tree = ast.parse((ROOT / "src" / "hetmerge" / "__init__.py").read_text())
    (version,) = [n.value.value for n in tree.body if isinstance(n, ast.Assign) and n.targets[0].id == "__version__"]
    assert _pyproject()["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "hetmerge.__version__"}
    assert yaml.safe_load((ROOT / "CITATION.cff").read_text())["version"] == version


def test_citation_cff_references_every_paper():
    cff = yaml.safe_load((ROOT / "CITATION.cff").read_text())
    assert cff["cff-version"] == "1.2.0" and cff["license"] == "MIT"
    references = {ref["url"]: ref for ref in cff["references"]}
    assert set(references) == {paper.url for paper in PAPERS.values()}
    for paper in PAPERS.values():
        ref = references[paper.url]
        assert (ref["title"], ref["year"]) == (paper.title, paper.year)
        assert [f"{a['given-names']} {a['family-names']}" for a in ref["authors"]] == paper.authors.split(", ")


def test_readme_cites_and_links_every_paper():
    readme = " ".join((ROOT / "README.md").read_text().split())  # titles may wrap
    for paper in PAPERS.values():
        assert paper.url in readme, f"README.md does not link {paper.short} ({paper.url})"
        assert paper.title in readme, f"README.md does not cite {paper.short} by title"
