"""README's results table comes from a results.csv by a command: its rows, its cells and the block it replaces."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
import pytest

from hetmerge.report.readme_table import END, START, readme_table, replace_block, update_readme

ROOT = Path(__file__).resolve().parents[1]


def _results() -> pd.DataFrame:
    rows = [  # (arch, arch_label, label, kind, joint_mean, joint_std, joint_n)
        ("mlp", "MLP", "Model A", "base", 0.45, 0.05, 2),
        ("mlp", "MLP", "Model B", "base", 0.47, 0.01, 2),
        ("mlp", "MLP", "Ensemble", "ensemble", 0.75, 0.0, 2),
        ("mlp", "MLP", "W.Avg", "merge", 0.64, 0.015, 2),
        ("mlp", "MLP", "ZipIt!", "merge", 0.7349, 0.031, 2),
        ("vit", "ViT", "Model A", "base", 0.39, float("nan"), 1),
        ("vit", "ViT", "KD", "merge", 0.531, float("nan"), 1),
    ]
    return pd.DataFrame(rows, columns=["arch", "arch_label", "label", "kind", "joint_mean", "joint_std", "joint_n"])


def test_table_by_hand():
    assert readme_table(_results()).splitlines()[2:] == [
        "| MLP | 47.0 ± 1.0 | 75.0 ± 0.0 | ZipIt! | 73.5 ± 3.1 | 2 |",
        "| ViT | 39.0 | – | KD | 53.1 | 1 |",
    ]


def test_experiments_choose_and_order_the_rows():
    lines = readme_table(_results(), ["vit", "mlp"]).splitlines()
    assert [line.split(" | ")[0] for line in lines[2:]] == ["| ViT", "| MLP"]
    with pytest.raises(ValueError, match=r"\['cnn'\] are not in the results"):
        readme_table(_results(), ["cnn"])


def test_update_replaces_only_the_block(tmp_path):
    csv = tmp_path / "results.csv"
    _results().to_csv(csv, index=False)
    readme = tmp_path / "README.md"
    readme.write_text(f"before\n{START}\nold table\n{END}\nafter\n")
    table = update_readme(readme, csv, ["mlp"])
    text = readme.read_text()
    assert text == f"before\n{START}\n\n{table}\n{END}\nafter\n" and "old table" not in text
    assert update_readme(readme, csv, ["mlp"]) == table and readme.read_text() == text  # idempotent
    with pytest.raises(ValueError, match="no results-table block"):
        replace_block("no markers", table, "README.md")


def test_readme_block_is_the_documented_commands_output_shape():
    """The README's block holds one row per experiment its command names (the numbers come from a run)."""
    readme = (ROOT / "README.md").read_text()
    command = re.search(
        r"\./run\.sh hetmerge readme-table results/paper/default/results\.csv .*--experiments (.*)", readme
    )
    assert command, "README.md does not show the readme-table command"
    block = readme.split(START, 1)[1].split(END, 1)[0]
    rows = [line for line in block.splitlines() if line.startswith("| ") and not line.startswith("| experiment")]
    assert len(rows) == len(command.group(1).split())


def test_command_line_prints_or_writes(tmp_path, capsys):
    from hetmerge.cli import main

    csv = tmp_path / "results.csv"
    _results().to_csv(csv, index=False)
    assert main(["readme-table", str(csv), "--experiments", "vit"]) == 0
    assert capsys.readouterr().out == readme_table(_results(), ["vit"])
    readme = tmp_path / "README.md"
    readme.write_text(f"{START}\n{END}\n")
    assert main(["readme-table", str(csv), "--readme", str(readme)]) == 0
    assert readme_table(_results()) in readme.read_text()
    assert main(["readme-table", str(csv), "--experiments", "cnn"]) == 1
    assert "['cnn'] are not in the results" in capsys.readouterr().err
