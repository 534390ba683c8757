"""The pipeline's plan: content-addressed jobs, shared computations, what reaches which job, code versions."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from snakemake.utils import validate

from hetmerge import code_version as cv
from hetmerge.plan import ConfigError, digest, plan

REPO = Path(__file__).resolve().parents[1]


def load(name: str) -> dict:
    config = yaml.safe_load((REPO / "config" / name).read_text())
    validate(config, str(REPO / "config" / "schema.yaml"), set_default=True)
    return config


@pytest.fixture(scope="module")
def tiny() -> dict:
    return load("test/tiny.yaml")


@pytest.fixture(scope="module")
def default_plan() -> dict:
    return plan(load("config.yaml"), "default")


def jobs_of(result: dict) -> dict:
    """Every job's entry without the report: what a config edit must not touch unless it changes a result."""
    return result["jobs"]


def test_shared_computations_are_one_job(default_plan):
    """ResNet-20 x1/2 is merged by ZipIt! (alpha 0.5, beta 1) in experiments resnet_mudsc and resnet_half_homo,
    and by MuDSC-zip in resnet_mudsc, resnet_half_homo: one job each per seed, whatever lists them."""
    merges = default_plan["jobs"]["merge"]
    resnet = [
        name
        for name, job in merges.items()
        if "/resnet+resnet-" in name and job["args"]["method"] == "zipit" and job["args"]["params"]["beta"] == 1.0
    ]
    assert len(resnet) == 2  # one per seed
    spec = default_plan["report"]["spec"]
    paths = {
        row["results"]["0"]
        for exp in spec["experiments"]
        if exp["key"] in ("resnet_mudsc", "resnet_half_homo")
        for row in exp["rows"]
        if row["key"] == "act_zip"
    }
    assert len(paths) == 1
    # every experiment that lists a model reads the one result of that model
    base = {
        row["results"]["0"]
        for exp in spec["experiments"]
        if exp["models"] == ["resnet", "resnet"]
        for row in exp["rows"]
        if row["key"] == "model_a"
    }
    assert len(base) == 1


def test_hetero_alignment_is_computed_once_per_pair_and_seed(default_plan):
    precomputed = {
        n: job for n, job in default_plan["jobs"]["precompute"].items() if job["args"]["name"] == "alignment"
    }
    pairs = {(name.split("/")[1], name.split("/")[2].rsplit("-", 1)[0]) for name in precomputed}
    assert len(pairs) == len(precomputed) == 8  # (vgg19s, vgg13s), (vgg13s, vgg19s) and the ResNets, 2 seeds


def test_a_choosing_method_is_one_job_with_its_curve(default_plan):
    """MuDSC without a fixed λ: one job per pair, seed and solver, scoring its grid and the figure's values."""
    curves = [job for job in default_plan["jobs"]["merge"].values() if job["args"]["curve_values"]]
    # align and zip for the resnet, resnet_gn and vit pairs (resnet_half_homo's zip is resnet_mudsc's), zip for
    # the three other pairs of the width group and for the mlp pair (its FS-Merge table's MuDSC row, the vit's is
    # the vit experiment's); two seeds each
    assert len(curves) == (3 * 2 + 3 + 1) * 2
    # the figure's values (0 and 1) only where an experiment of those models draws the λ figure
    drawn = {"resnet+resnet", "resnet_gn+resnet_gn", "vit+vit"}
    for name, job in default_plan["jobs"]["merge"].items():
        if job["args"]["curve_values"]:
            pair = name.split("/")[2].rsplit("-", 1)[0]
            want = [0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 1.0] if pair in drawn else [0.1, 0.3, 0.5, 0.7, 0.9]
            assert job["args"]["curve_values"] == want, name


def test_labels_and_rows_reach_only_the_report(tiny):
    edited = copy.deepcopy(tiny)
    edited["methods"]["average"]["label"] = "Weight averaging"
    edited["architectures"]["mlp"]["label"] = "Perceptron"
    edited["experiments"]["mlp"]["methods"] = ["zipit", "average", "ensemble"]
    edited["experiments"]["vgg"]["label"] = "Another VGG"
    before, after = plan(tiny, "tiny"), plan(edited, "tiny")
    assert jobs_of(before) == jobs_of(after)
    assert before["report"]["spec"] != after["report"]["spec"]


def test_a_parameter_edit_changes_only_that_rows_merges(tiny):
    edited = copy.deepcopy(tiny)
    edited["methods"]["average"]["params"]["reset_bn"] = False
    before, after = plan(tiny, "tiny")["jobs"], plan(edited, "tiny")["jobs"]
    changed = {kind: set(after[kind]) ^ set(before[kind]) for kind in before}
    assert {kind for kind, names in changed.items() if names} == {"merge"}
    # mlp, vgg, fuse_2 and fuse_3 list it: 8 merges out, 8 in
    assert all("/average-" in name for name in changed["merge"]) and len(changed["merge"]) == 16


def test_explicit_defaults_are_the_same_computation(tiny):
    """Canonical params: spelling out a default, or 1 for 1.0, names the same merge."""
    edited = copy.deepcopy(tiny)
    edited["methods"]["average"]["params"] = {"reset_bn": True}
    edited["methods"]["zipit"]["params"] = {"alpha": 0.3, "beta": 0.125, "stop_after": None}
    assert plan(tiny, "tiny")["jobs"] == plan(edited, "tiny")["jobs"]


def test_configs_never_share_a_path_with_different_content(tiny):
    edited = copy.deepcopy(tiny)
    edited["split"]["merge_per_class"] = 5
    before, after = plan(tiny, "tiny")["jobs"], plan(edited, "tiny")["jobs"]
    for kind in ("split", "train", "merge"):
        shared = set(before[kind]) & set(after[kind])
        assert all(before[kind][name] == after[kind][name] for name in shared), kind
        # only the same-task settings' jobs, which the class-disjoint merge slice does not touch, stay
        assert shared and all("non_iid" in name or "mlp_fuse" in name for name in shared), kind


def test_report_outputs_come_from_the_layouts(tiny):
    from hetmerge.report.layout import declared_outputs

    result = plan(tiny, "tiny")
    assert result["report"]["folder"] == "results/paper/tiny"
    assert result["report"]["outputs"] == [o.as_dict() for o in declared_outputs(result["report"]["spec"])]


def test_rules_name_no_method_and_no_layout():
    """Adding a method or a layout is one module plus config: the rules know neither by name."""
    from hetmerge.methods import REGISTRY
    from hetmerge.report.layout import LAYOUTS

    text = "\n".join(p.read_text() for p in [REPO / "Snakefile", *sorted((REPO / "rules").glob("*.smk"))])
    words = set(json.dumps(text).replace("\\n", " ").replace('"', " ").split())
    for name in [*REGISTRY, *LAYOUTS, "mudsc", "zipit", "hetero", "lam", "stop_after"]:
        assert not any(name == w.strip("(),:[]'{}.") for w in words), name


@pytest.mark.parametrize(
    ("edit", "named"),
    [
        (lambda c: c["experiments"]["mlp"].update(lambda_sweep=["zipit"]), "experiments.mlp.lambda_sweep: 'zipit'"),
        (lambda c: c["experiments"]["mlp"].update(landscape="ensemble"), "experiments.mlp.landscape: 'ensemble'"),
        (lambda c: c["experiments"]["depth"].update(landscape="het_sma_zip"), "experiments.depth.landscape"),
        (lambda c: c["experiments"]["mlp"].update(table="wide"), "experiments.mlp.table: unknown table layout 'wide'"),
    ],
)
def test_what_no_row_or_layout_offers_is_refused_naming_the_key(tiny, edit, named):
    edited = copy.deepcopy(tiny)
    edit(edited)
    with pytest.raises(ConfigError, match=re.escape(named)):
        plan(edited, "tiny")


@given(
    st.recursive(
        st.none() | st.booleans() | st.integers(-5, 5) | st.text(max_size=3),
        lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=3), c, max_size=3),
        max_leaves=8,
    )
)
@settings(max_examples=50, deadline=None)
def test_digest_ignores_key_order_and_int_float_spelling(value):
    def respell(v):
        if isinstance(v, bool) or not isinstance(v, int | dict | list):
            return v
        if isinstance(v, int):
            return float(v)
        if isinstance(v, dict):
            return dict(reversed([(k, respell(x)) for k, x in v.items()]))
        return [respell(x) for x in v]

    assert digest(value) == digest(respell(value))


def test_digest_tells_values_apart():
    assert len({digest(v) for v in [0, 1, [0], [0, 0], {"a": 0}, {"b": 0}, "0", None, True]}) == 9


def test_code_version_covers_what_a_module_imports_and_nothing_else(tmp_path, monkeypatch):
    """A copy of the package: editing a module changes the version of every stage that imports it, only those."""
    root = tmp_path / "hetmerge"
    (root / "methods").mkdir(parents=True)
    (root / "__init__.py").write_text("")
    (root / "methods" / "__init__.py").write_text("from hetmerge.methods import a, b\n")
    (root / "methods" / "a.py").write_text("from hetmerge import shared\n")
    (root / "methods" / "b.py").write_text("def f():\n    from hetmerge.methods.a import x\n")
    (root / "shared.py").write_text("x = 1\n")
    (root / "training.py").write_text("import os\n")
    monkeypatch.setattr(cv, "ROOT", root)
    cv._imports.cache_clear()

    def versions():
        cv._imports.cache_clear()
        return {m: cv.code_version(f"hetmerge.{m}") for m in ("methods.a", "methods.b", "training")}

    before = versions()
    (root / "shared.py").write_text("x = 2\n")
    after = versions()
    assert {m for m in before if before[m] != after[m]} == {"methods.a", "methods.b"}  # b imports a inside f
    (root / "training.py").write_text("import os  # edited\n")
    assert {m for m, v in versions().items() if v != after[m]} == {"training"}
    assert [p.name for p in cv.closure(["hetmerge.methods.b"])] == ["a.py", "b.py", "shared.py"]
    cv._imports.cache_clear()


def test_the_paper_scale_fs_merge_config_plans():
    """Its few-shot sizes and augmentation counts reach the merge jobs of the methods that learn, and only theirs."""
    result = plan(load("cifar10_fs_merge.yaml"), "cifar10_fs_merge")
    few = {
        (job["args"]["method"], job["args"]["few_shot"]["originals"]): job["args"]["few_shot"]
        for job in result["jobs"]["merge"].values()
        if "few_shot" in job["args"]
    }
    assert {method for method, _ in few} == {"regmean", "distill", "fs_merge"}
    assert few["fs_merge", 16] == {"originals": 16, "aug_factor": 50, "val_per_task": 300}
    assert few["fs_merge", 100]["aug_factor"] == 8 and ("regmean", 50) not in few
    assert not any("few_shot" in j["args"] for j in result["jobs"]["merge"].values() if j["args"]["method"] == "zipit")
