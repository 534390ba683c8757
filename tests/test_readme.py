"""README.md must stay true: its library example runs, and its quick start names the commands CI uses."""

from __future__ import annotations

import re
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_library_example_runs(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", README, flags=re.S)
    assert len(blocks) == 1, "README should have exactly one Python example"
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)
    logits = namespace["logits"]
    assert set(logits) == {"cats", "dogs"}
    assert all(v.shape == (8, 5) for v in logits.values())
    x = torch.randn(4, 3, 32, 32)
    again = namespace["again"]
    merged = namespace["merged"]
    for task, value in merged(x).items():
        torch.testing.assert_close(again(x)[task], value)


def test_quick_start_is_two_commands_and_ci_runs_the_test_one():
    quick = README.split("## Quick start", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    commands = [line.split("#")[0].strip() for line in quick.strip().splitlines()]
    assert commands == ["./run.sh snakemake all --cores 2", "./run.sh pytest"]
    ci = (ROOT / ".ci" / "run").read_text()
    assert "./run.sh pytest" in ci
