"""The plan of same-task fusion experiments: partitions of one task, their models, and start-up refusals."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import yaml
from snakemake.utils import validate

from hetmerge.plan import ConfigError, plan

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny() -> dict:
    config = yaml.safe_load((REPO / "config" / "test" / "tiny.yaml").read_text())
    validate(config, str(REPO / "config" / "schema.yaml"), set_default=True)
    return config


def fusion_config(tiny: dict, setting: str = "non_iid", n: int = 3, methods: tuple[str, ...] = ("average",)) -> dict:
    config = copy.deepcopy(tiny)
    config["architectures"]["mlp_nobn"] = {"family": "mlp", "spec": {"hidden": [16], "batch_norm": False}, "train": {}}
    config["methods"].update(
        hf={"method": "hf", "params": {}},
        kf={"method": "kf", "params": {}},
    )
    config["experiments"] = {
        "fuse": {
            "models": ["mlp_nobn"] * n,
            "setting": setting,
            "table": "fusion",
            "methods": list(methods),
            "lambda_sweep": [],
        }
    }
    return config


def test_same_task_experiment_trains_each_model_on_its_partition(tiny):
    result = plan(fusion_config(tiny, n=3, methods=("ensemble", "average", "kf")), "tiny")
    splits = result["jobs"]["split"]
    assert len(splits) == 2  # one per seed
    for name, job in splits.items():
        assert re.fullmatch(r"digits/non_iid3-s[01]-\w{6}", name), name
        assert job["args"]["kind"] == "non_iid" and job["args"]["num_tasks"] == 3
        assert job["args"]["fusion_size"] == tiny["split"]["fusion_size"]
        assert job["args"]["concentration"] == [1.0, 5.0]
        assert "merge_per_class" not in job["args"]
    trains = result["jobs"]["train"].values()
    assert sorted((job["args"]["partition"], job["args"]["task"]) for job in trains) == [(p, "all") for p in "AABBCC"]
    spec = result["report"]["spec"]["experiments"][0]
    assert (spec["setting"], spec["n_models"], spec["layout"]) == ("non_iid", 3, "fusion")
    assert [row["key"] for row in spec["rows"]][:3] == ["model_a", "model_b", "model_c"]
    merges = result["jobs"]["merge"].values()
    assert {job["args"]["method"] for job in merges} == {"average", "kf"}


def test_only_non_iid_splits_depend_on_the_concentration(tiny):
    for setting, changes in (("non_iid", True), ("sharded", False)):
        config = fusion_config(tiny, setting)
        edited = copy.deepcopy(config)
        edited["split"]["concentration"] = [0.5, 2.0]
        before, after = plan(config, "tiny")["jobs"], plan(edited, "tiny")["jobs"]
        assert (before["split"] != after["split"]) is changes
        # the class-disjoint settings' merge slice never matters to a same-task split
        edited["split"]["merge_per_class"] = 3
        assert plan(edited, "tiny")["jobs"]["split"] == after["split"]


@pytest.mark.parametrize(
    ("setting", "n", "method", "named"),
    [
        ("non_iid", 3, "hf", "fuses exactly 2 models, but got 3: its Hungarian"),
        ("class_disjoint", 2, "kf", "one label space"),
    ],
)
def test_a_fusion_that_can_never_run_fails_at_start_up(tiny, setting, n, method, named):
    with pytest.raises(ConfigError, match=r"experiments\.fuse\.methods: 'hf'|experiments\.fuse\.methods: 'kf'") as err:
        plan(fusion_config(tiny, setting, n, (method,)), "tiny")
    assert named in str(err.value)


def test_neuron_importance_is_computed_once_per_models_and_kind(tiny):
    """OTF, HF, KF and KF-Gradient with conductance read one precomputed input; uniform reads none."""
    config = fusion_config(tiny, n=2, methods=("otf", "hf", "kf", "kfg", "average"))
    for key, method in (("otf", "otfusion"), ("kfg", "kf_gradient")):
        config["methods"][key] = {"method": method, "params": {"importance": "conductance"}}
    config["methods"]["hf"]["params"] = {"importance": "conductance"}
    config["methods"]["kf"]["params"] = {"importance": "uniform"}
    result = plan(config, "tiny")
    precomputed = result["jobs"]["precompute"]
    assert sorted(job["args"]["name"] for job in precomputed.values()) == ["importance_conductance"] * 2  # 2 seeds
    for job in result["jobs"]["merge"].values():
        reads = job.get("precomputed", {})
        if job["args"]["method"] in ("otfusion", "hf", "kf_gradient"):
            assert list(reads) == ["importance_conductance"] and reads["importance_conductance"] in {
                f"results/precomputed/{name}.json" for name in precomputed
            }
        else:
            assert not reads
