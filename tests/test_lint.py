"""The repository's code style as tests, and the Snakemake workflow catalog's files kept true to the workflow.

ruff (lint and format) checks the Python code and snakefmt the Snakefile and rules/, each with the settings in
pyproject.toml. The tools come from the running interpreter's environment (the `dev` extra installs them), never
from elsewhere on PATH, so their versions are the project's; a test skips, naming the tool, where one is missing.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from snakemake.utils import validate

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
CONFIG = REPO / "config"
# The catalog's documented keys (snakemake-workflow-catalog, "Adding workflows"): what its pages show.
CATALOG_KEYS = {"mandatory-flags", "software-stack-deployment", "report"}
DEPLOYMENT_KEYS = {"conda", "apptainer", "apptainer+conda"}
RULE = re.compile(r"^rule (\w+):\n((?:(?:[ \t].*)?\n)*)", re.MULTILINE)


def tool(name: str) -> str:
    """The path of `name` in this interpreter's environment; skips the test where it is not installed."""
    path = shutil.which(name, path=str(BIN))
    if path is None:
        pytest.skip(f"{name} is not installed in {BIN} (pip install -e '.[dev]')")
    return path


def run(*command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)


def test_ruff_check():
    proc = run(tool("ruff"), "check", "--no-cache", ".")
    assert proc.returncode == 0, f"{proc.stdout}{proc.stderr}(fix: ruff check --fix)"


def test_ruff_format():
    proc = run(tool("ruff"), "format", "--no-cache", "--diff", ".")
    assert proc.returncode == 0, f"{proc.stdout}{proc.stderr}(fix: ruff format)"


def test_snakefmt():
    """The files the catalog's formatting check reads: the Snakefile and rules/*.smk."""
    proc = run(tool("snakefmt"), "--check", "--compact-diff", "Snakefile", "rules")
    assert proc.returncode == 0, f"{proc.stdout}{proc.stderr}(fix: snakefmt Snakefile rules)"


def test_catalog_file_has_the_documented_keys():
    settings = yaml.safe_load((REPO / ".snakemake-workflow-catalog.yml").read_text())
    assert set(settings) == {"usage"}
    usage = settings["usage"]
    assert set(usage) <= CATALOG_KEYS, f"undocumented keys {set(usage) - CATALOG_KEYS}"
    flags = usage["mandatory-flags"]
    assert set(flags) == {"desc", "flags"}
    assert isinstance(flags["desc"], str)
    assert isinstance(flags["flags"], str) or all(isinstance(flag, str) for flag in flags["flags"])
    deployment = usage["software-stack-deployment"]
    assert set(deployment) <= DEPLOYMENT_KEYS, f"undocumented keys {set(deployment) - DEPLOYMENT_KEYS}"
    assert all(isinstance(value, bool) for value in deployment.values())
    assert isinstance(usage["report"], bool)


def test_catalog_claims_hold():
    """`conda: true`: every rule that runs something names an existing conda environment; `report: true`: the
    Snakefile declares the report's front page."""
    usage = yaml.safe_load((REPO / ".snakemake-workflow-catalog.yml").read_text())["usage"]
    snakefiles = [REPO / "Snakefile", *sorted((REPO / "rules").glob("*.smk"))]
    rules = [(path, *match.groups()) for path in snakefiles for match in RULE.finditer(path.read_text())]
    actions = [(path, name, body) for path, name, body in rules if re.search(r"^\s+(shell|run|script):", body, re.M)]
    assert len(actions) >= 9, [name for _, name, _ in actions]  # every stage rule besides `all`
    if usage["software-stack-deployment"].get("conda"):
        for path, name, body in actions:
            env = re.search(r'^\s+conda:\n\s+"([^"]+)"', body, re.M)
            assert env, f"rule {name} ({path.name}) names no conda environment"
            assert (path.parent / env[1]).is_file(), f"rule {name}: {env[1]} does not exist"
    if usage["report"]:
        front = re.search(r'^report: "([^"]+)"', (REPO / "Snakefile").read_text(), re.M)
        assert front and (REPO / front[1]).is_file()


def test_config_readme_names_every_key_and_config_file():
    """config/README.md is what the catalog shows: a top-level key or a config file it does not name fails."""
    readme = (CONFIG / "README.md").read_text()
    schema = yaml.safe_load((CONFIG / "schema.yaml").read_text())
    missing = [key for key in schema["properties"] if f"`{key}`" not in readme]
    assert not missing, f"config/README.md does not describe {missing}"
    files = [path.relative_to(CONFIG).as_posix() for path in CONFIG.rglob("*.yaml") if path.name != "schema.yaml"]
    unnamed = [name for name in files if f"`{name}`" not in readme and f"`{Path(name).name}`" not in readme]
    assert not unnamed, f"config/README.md does not name {unnamed}"


def test_config_readme_example_adds_only_new_jobs():
    """The README's example, added to the default config, is valid, and every existing job stays as it was."""
    from hetmerge.plan import plan

    (example,) = re.findall(r"```yaml\n(.*?)```", (CONFIG / "README.md").read_text(), re.DOTALL)
    config = yaml.safe_load((CONFIG / "config.yaml").read_text())
    extended = yaml.safe_load((CONFIG / "config.yaml").read_text())
    for key, entries in yaml.safe_load(example).items():
        assert not entries.keys() & extended[key].keys(), "the example must add entries, not replace them"
        extended[key].update(entries)
    for each in (config, extended):
        validate(each, str(CONFIG / "schema.yaml"), set_default=True)
    before, after = plan(config, "default"), plan(extended, "default")
    for stage, jobs in before["jobs"].items():
        assert jobs.items() <= after["jobs"][stage].items(), stage
    assert sum(map(len, after["jobs"].values())) > sum(map(len, before["jobs"].values()))
    outputs = {output["path"] for output in after["report"]["outputs"]}
    assert {"tables/standard_mlp_wide.tex", "tables/standard_mlp_wide.html"} <= outputs
