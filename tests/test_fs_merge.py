"""The `fs_merge` method: trained on task-tagged unlabelled images, folded into one plain network."""

from __future__ import annotations

import pytest
import torch

from hetmerge.data.few_shot import FewShot, TaskImages
from hetmerge.methods import MergeContext, MergeError, build_method
from hetmerge.models import MultiTaskNet

SPEC = {"hidden": [16, 16, 16], "batch_norm": False}
FAST = {"epochs": 4, "lr": 1e-2, "batch_size": 32}


def few_shot(names=("A", "B"), per_task=24, val=12, seed=0, labels=True) -> FewShot:
    gen, label_gen = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed + 1)

    def part(n: int) -> TaskImages:
        tasks = torch.arange(len(names)).repeat_interleave(n)
        y = torch.randint(0, 3, (len(tasks),), generator=label_gen) if labels else None
        return TaskImages(torch.randn(len(tasks), 1, 8, 8, generator=gen), tasks, tuple(names), y)

    return FewShot(part(per_task), part(val), per_task, 0)


def models(make_model, n=2, spec=SPEC, family="mlp"):
    return [make_model(family, spec, {t: 3}, seed=20 + i).eval() for i, t in enumerate("ABC"[:n])]


def run(method_params, nets, data, seed=0, state_dir=None):
    ctx = MergeContext(device=torch.device("cpu"), few_shot=data, seed=seed, state_dir=state_dir)
    merged = build_method("fs_merge", method_params)(nets, ctx)
    return merged, ctx


def test_merging_a_model_with_itself_returns_it(make_model):
    """Two copies of one network (heads of different names): at init `first` the SuperNet already reconstructs both
    exactly (validation loss 0), so the kept maps are the start and the fold is the model."""
    net = make_model("mlp", SPEC, {"A": 3}, seed=3).eval()
    twin = make_model("mlp", SPEC, {"B": 3}, seed=3).eval()
    twin.load_state_dict({k.replace("heads.A", "heads.B"): v for k, v in net.state_dict().items()})
    merged, ctx = run(FAST, [net, twin], few_shot())
    assert ctx.notes["fs_merge"]["best_val_loss"] == pytest.approx(0.0, abs=1e-10)
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(merged(x)["A"], net(x)["A"], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(merged(x)["B"], net(x)["A"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("maps", ["diagonal", "diagonal_and_low_rank", "full"])
def test_learns_and_folds(make_model, maps):
    nets = models(make_model)
    merged, ctx = run({**FAST, "maps": maps, "rank": 4}, nets, few_shot())
    fitted = ctx.notes["fs_merge"]
    assert fitted["best_val_loss"] < fitted["initial_val_loss"]
    [step] = ctx.notes["steps"]
    assert step["fold_error"]["max_rel"] < 1e-5
    trunk = merged.trunk
    assert isinstance(trunk, MultiTaskNet) and set(trunk.heads) == {"A", "B"} and not merged.branches
    assert trunk.describe()["spec"] == nets[0].describe()["spec"]


def test_labels_are_never_used(make_model):
    nets = models(make_model)
    with_labels, _ = run(FAST, nets, few_shot(labels=True))
    without, _ = run(FAST, nets, few_shot(labels=False))
    for (k, a), b in zip(with_labels.state_dict().items(), without.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


def test_deterministic_and_seeded(make_model):
    nets = models(make_model)
    a, _ = run(FAST, nets, few_shot())
    b, _ = run(FAST, nets, few_shot())
    c, _ = run(FAST, nets, few_shot(), seed=1)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), c.state_dict().values(), strict=True))


def test_local_mode_holds_less_for_the_backward_pass(make_model):
    nets = models(make_model, spec={"hidden": [64, 64, 64, 64], "batch_norm": False})
    data = few_shot(per_task=64)
    _, glob = run({**FAST, "batch_size": 64}, nets, data)
    _, loc = run({**FAST, "batch_size": 64, "mode": "local"}, nets, data)
    [g], [step] = glob.notes["steps"], loc.notes["steps"]
    assert [b["units"] for b in step["blocks"]] == [[0, 2], [2, 3], [3, 4], [4, 5]]  # flatten joins fc0
    assert step["memory"]["saved_activation_bytes"] < g["memory"]["saved_activation_bytes"]
    assert step["fold_error"]["max_rel"] < 1e-5
    for b in range(4):
        assert loc.notes[f"fs_merge-block{b}"]["best_val_loss"] <= loc.notes[f"fs_merge-block{b}"]["initial_val_loss"]


@pytest.mark.parametrize("order", ["joint", "sequential"])
def test_three_models(make_model, order):
    nets = models(make_model, 3)
    merged, ctx = run({**FAST, "order": order}, nets, few_shot(("A", "B", "C")))
    assert set(merged.trunk.heads) == {"A", "B", "C"}
    steps = ctx.notes["steps"]
    assert [s["models"] for s in steps] == ([2, 2] if order == "sequential" else [3])


def test_narrower_merged_model(make_model):
    merged, ctx = run({**FAST, "comp_factor": 0.5, "rank": 2}, models(make_model), few_shot())
    assert merged.trunk.spec.hidden == (8, 8, 8)
    assert ctx.notes["steps"][0]["fold_error"]["max_rel"] < 1e-5


def test_inner_feature_terms_change_the_fit(make_model):
    nets = models(make_model)
    plain, _ = run(FAST, nets, few_shot())
    inner, ctx = run({**FAST, "inner_weight": 1.0}, nets, few_shot())
    assert not torch.equal(plain.trunk.body.fc1.linear.weight, inner.trunk.body.fc1.linear.weight)
    assert ctx.notes["fs_merge"]["best_val_loss"] < ctx.notes["fs_merge"]["initial_val_loss"]


def test_vit_pair(make_model):
    spec = {"patch": 4, "depth": 2, "width": 8, "heads": 2, "mlp_ratio": 2.0}
    nets = models(make_model, spec=spec, family="vit")
    merged, ctx = run({**FAST, "rank": 2}, nets, few_shot())
    assert ctx.notes["steps"][0]["fold_error"]["max_rel"] < 1e-5
    assert merged.trunk.family == "vit"


def test_resumes_from_its_state(make_model, tmp_path):
    nets = models(make_model)
    whole, _ = run(FAST, nets, few_shot(), state_dir=tmp_path / "state")
    assert (tmp_path / "state" / "fs_merge.safetensors").is_file()
    again, ctx = run(FAST, nets, few_shot(), state_dir=tmp_path / "state")  # finds the finished state
    assert ctx.notes["fs_merge"]["resumed_from"] == FAST["epochs"]
    for a, b in zip(whole.state_dict().values(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_bad_input_is_refused_by_name(make_model):
    nets = models(make_model)
    with pytest.raises(MergeError, match="few-shot slice"):
        build_method("fs_merge", FAST)(nets, MergeContext(device=torch.device("cpu")))
    with pytest.raises(MergeError, match="task 'B' has no images"):
        run(FAST, nets, few_shot(("A", "C")))
    other = [nets[0], make_model("mlp", {"hidden": [16, 8, 16], "batch_norm": False}, {"B": 3})]
    with pytest.raises(MergeError, match="different architectures"):
        build_method("fs_merge", FAST).check(other)
    with pytest.raises(MergeError, match="rank 40 is out of range"):
        build_method("fs_merge", {"rank": 40}).check(nets)
    with pytest.raises(MergeError, match=r"comp_factor 3\.0 is out of range"):
        build_method("fs_merge", {"comp_factor": 3.0}).check(nets)
    with pytest.raises(MergeError, match="start at zero"):
        build_method("fs_merge", {"maps": "low_rank"}).check(nets)
    vgg = [make_model("vgg", {"depth": 11, "width": 0.0625}, {t: 3}, seed=i) for i, t in enumerate("AB")]
    with pytest.raises(MergeError, match="cannot be rebuilt at another width"):
        build_method("fs_merge", {"comp_factor": 0.5}).check(vgg)
    shared = [make_model("mlp", SPEC, {"A": 3}, seed=i) for i in range(2)]
    with pytest.raises(MergeError, match="all have a head 'A'"):
        run(FAST, shared, few_shot(("A",)))
