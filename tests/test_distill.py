"""The KD baseline `distill`: the student learns, keeps each teacher's head frozen, starts from model 0 or the
average, resumes bit-identically, and refuses what it cannot distil, saying why."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from hetmerge.data.few_shot import FewShot, TaskImages
from hetmerge.methods import MergeContext, MergeError, build_method, learned
from hetmerge.methods.average import mean_state
from hetmerge.methods.distill import kd_loss
from hetmerge.params import ParameterError

MLP = {"hidden": [32, 16], "batch_norm": False}
FAST = {"epochs": 6, "lr": 1e-2, "batch_size": 8}


@pytest.fixture
def pair(make_model):
    """Two tiny MLPs from different seeds, one per task (A: 3 classes, B: 4)."""
    return make_model("mlp", MLP, {"A": 3}, seed=1).eval(), make_model("mlp", MLP, {"B": 4}, seed=2).eval()


@pytest.fixture(scope="module")
def few(digits):
    """Digits 0–4 (task A) and 5–9 (task B): 12 training and 6 held-out images per task (random images would need
    far more than 24 to generalise from)."""
    x = (digits.train_images.float() / 255 - digits.mean[0]) / digits.std[0]
    task = (digits.train_labels >= 5).long()

    def part(lo: int, hi: int) -> TaskImages:
        rows = torch.cat([(task == t).nonzero().squeeze(1)[lo:hi] for t in (0, 1)])
        return TaskImages(x[rows], task[rows], ("A", "B"))

    return FewShot(part(0, 12), part(12, 18), originals=4, aug_factor=2)


def task_images(n_per_task: int, seed: int, names=("A", "B"), counts=None) -> TaskImages:
    """Random images, `counts` (default `n_per_task` each) per task of `names`."""
    counts = counts or [n_per_task] * len(names)
    g = torch.Generator().manual_seed(seed)
    tasks = torch.cat([torch.full((c,), t) for t, c in enumerate(counts)])
    return TaskImages(torch.randn(len(tasks), 1, 8, 8, generator=g), tasks, tuple(names))


def context(few_shot: FewShot | None, **kwargs) -> MergeContext:
    return MergeContext(device=torch.device("cpu"), few_shot=few_shot, **kwargs)


def body_mse(body, models, few: FewShot) -> float:
    """The features loss over the validation slice, by hand: each image against its own task's model."""
    data = few.val
    with torch.no_grad():
        targets = torch.stack([models[int(t)].body(x[None])[0] for x, t in zip(data.images, data.tasks, strict=True)])
        return float(F.mse_loss(body(data.images), targets))


def test_distillation_lowers_the_loss_and_keeps_each_teachers_head(pair, few):
    ctx = context(few)
    merged = build_method("distill", FAST)(pair, ctx)
    record = ctx.notes["distill"]
    assert record["best_val_loss"] < 0.7 * record["initial_val_loss"] and record["resumed_from"] == 0
    assert record["initial_val_loss"] == pytest.approx(body_mse(pair[0].body, pair, ctx.few_shot), rel=1e-6)
    assert record["best_val_loss"] == pytest.approx(body_mse(merged.trunk.body, pair, ctx.few_shot), rel=1e-6)
    assert ctx.notes["settings"]["optimizer"] == "adamw" and ctx.notes["owners"] == {"A": 0, "B": 1}
    student = merged.trunk.state_dict()
    for model, task in zip(pair, ("A", "B"), strict=True):
        for name, value in model.heads[task].state_dict().items():
            assert torch.equal(student[f"heads.{task}.{name}"], value)
    assert not torch.equal(student["body.fc0.linear.weight"], pair[0].state_dict()["body.fc0.linear.weight"])


def test_average_init_starts_from_the_mean_body(pair, few):
    ctx = context(few)
    build_method("distill", {**FAST, "init": "average"})(pair, ctx)
    average = copy.deepcopy(pair[0])
    average.load_state_dict({k: v for k, v in mean_state(pair).items() if not k.startswith("heads.")}, strict=False)
    expected = body_mse(average.body, pair, ctx.few_shot)
    assert ctx.notes["distill"]["initial_val_loss"] == pytest.approx(expected, rel=1e-6)
    assert expected != pytest.approx(body_mse(pair[0].body, pair, ctx.few_shot), rel=1e-3)


def test_distilling_a_model_with_itself_keeps_it(pair, few):
    """Two copies of one body (heads A and B): the start reconstructs both teachers exactly (loss 0), so nothing can
    improve on it and keep_best returns the start, AdamW's weight decay notwithstanding."""
    twin = copy.deepcopy(pair[1])
    twin.body.load_state_dict(pair[0].body.state_dict())
    ctx = context(few)
    merged = build_method("distill", FAST)([pair[0], twin], ctx)
    record = ctx.notes["distill"]
    assert record["initial_val_loss"] == 0.0 and record["best_epoch"] == 0 and record["epochs_run"] == 6
    x = ctx.few_shot.val.images
    assert torch.equal(merged(x)["A"], pair[0](x)["A"]) and torch.equal(merged(x)["B"], twin(x)["B"])


def test_kd_loss_is_the_tempered_kl_on_each_rows_own_head(pair):
    student = copy.deepcopy(pair[0])
    student.heads["B"] = pair[1].heads["B"]
    g = torch.Generator().manual_seed(4)
    features, targets = torch.randn(5, 16, generator=g), torch.randn(5, 16, generator=g)
    tasks = torch.tensor([0, 1, 1, 0, 1])
    tau = 2.0
    expected = 0.0
    student.requires_grad_(False)
    for row, t in enumerate(tasks.tolist()):
        head = student.heads["AB"[t]]
        teacher = F.softmax(head(targets[row]) / tau, dim=-1)
        expected += float((teacher * (teacher.log() - F.log_softmax(head(features[row]) / tau, dim=-1))).sum())
    got = kd_loss(student, features, targets, tasks, ("A", "B"), tau)
    assert float(got) == pytest.approx(tau**2 * expected / 5, rel=1e-5)


def test_logits_mode_learns(pair, few):
    ctx = context(few)
    build_method("distill", {**FAST, "target": "logits", "temperature": 2.0})(pair, ctx)
    record = ctx.notes["distill"]
    assert record["best_val_loss"] < record["initial_val_loss"] and ctx.notes["settings"]["target"] == "logits"


def test_an_interrupted_distillation_resumes_bit_identically(pair, few, tmp_path, monkeypatch):
    params = {**FAST, "epochs": 5}
    reference = build_method("distill", params)(pair, context(few, seed=3)).state_dict()
    real_fit = learned.fit

    def dying_fit(params, loss_on, *args, **kwargs):
        calls = iter(range(10**6))

        def dying(idx: torch.Tensor) -> torch.Tensor:
            if next(calls) == 3 * 3 + 1:  # 24 rows in batches of 8: in epoch 4
                raise KeyboardInterrupt
            return loss_on(idx)

        return real_fit(params, dying, *args, **kwargs)

    monkeypatch.setattr(learned, "fit", dying_fit)
    with pytest.raises(KeyboardInterrupt):
        build_method("distill", params)(pair, context(few, seed=3, state_dir=tmp_path))
    monkeypatch.setattr(learned, "fit", real_fit)
    assert (tmp_path / "distill.safetensors").is_file()
    ctx = context(few, seed=3, state_dir=tmp_path)
    resumed = build_method("distill", params)(pair, ctx).state_dict()
    assert ctx.notes["distill"]["resumed_from"] == 3
    assert resumed.keys() == reference.keys() and all(torch.equal(resumed[k], reference[k]) for k in reference)
    with pytest.raises(ValueError, match="written for another run"):
        build_method("distill", {**params, "lr": 2e-2})(pair, context(few, seed=3, state_dir=tmp_path))


def test_errors_name_their_cause(pair, make_model, few):
    with pytest.raises(MergeError, match="needs the few-shot slice"):
        build_method("distill", FAST)(pair, context(None))
    bad = FewShot(task_images(12, 0), task_images(6, 1, counts=[6, 0]), originals=4, aug_factor=2)
    with pytest.raises(ValueError, match=r"validation slice: task 'B' has no images"):
        build_method("distill", FAST)(pair, context(bad))
    bad = FewShot(task_images(12, 0, names=("A",)), task_images(6, 1, names=("A",)), originals=4, aug_factor=2)
    with pytest.raises(ValueError, match=r"training slice: task 'B' has no images"):
        build_method("distill", FAST)(pair, context(bad))
    names = ("A", "B", "C")
    bad = FewShot(task_images(4, 0, names=names), task_images(2, 1, names=names), originals=4, aug_factor=0)
    with pytest.raises(MergeError, match="no model has a head 'C'"):
        build_method("distill", FAST)(pair, context(bad))
    wider = make_model("mlp", {"hidden": [32, 8], "batch_norm": False}, {"B": 4}, seed=2)
    with pytest.raises(MergeError, match="needs models of one architecture"):
        build_method("distill").check([pair[0], wider])
    with pytest.raises(ParameterError, match=r"momentum 0\.9 is SGD's"):
        build_method("distill", {"momentum": 0.9}).check(pair)
    with pytest.raises(ParameterError, match="outside the allowed range"):
        build_method("distill", {"temperature": 0.0})
