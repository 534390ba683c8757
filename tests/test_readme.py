"""README.md must stay true: its library example runs, and its quick start names the commands CI uses."""

from __future__ import annotations

import re
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_library_examples_run(tmp_path, monkeypatch):
    """The merge example, then the same-task fusion and the FS-Merge examples, which continue in its namespace."""
    blocks = re.findall(r"```python\n(.*?)```", README, flags=re.S)
    assert len(blocks) == 3, "README should have three Python examples: merging, same-task fusion, FS-Merge"
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

    exec(compile(blocks[1], "README.md", "exec"), namespace)
    fused, parents = namespace["fused"], namespace["parents"]
    assert namespace["digits"].shape == (8, 10)
    assert fused.trunk.describe() == parents[0].describe()  # one network of the parents' architecture
    assert not torch.equal(fused.trunk.body.fc0.linear.weight, parents[0].body.fc0.linear.weight)

    exec(compile(blocks[2], "README.md", "exec"), namespace)
    folded, low = namespace["folded"], namespace["low"]
    assert set(folded.heads) == {"low", "high"} and folded.spec == low.spec  # one plain MLP of the original width
    x = torch.randn(4, 1, 28, 28)
    torch.testing.assert_close(folded(x)["low"], namespace["merged"](x)["low"])


def test_quick_start_is_two_commands_and_ci_runs_the_test_one():
    quick = README.split("## Quick start", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    commands = [line.split("#")[0].strip() for line in quick.strip().splitlines()]
    assert commands == ["./run.sh snakemake all --cores 2", "./run.sh pytest"]
    ci = (ROOT / ".ci" / "run").read_text()
    assert "./run.sh pytest" in ci
