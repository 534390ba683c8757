"""Knowledge distillation, FS-Merge's KD baseline (algorithms.md §2.8): one student of the models' architecture
learns, on every task's few-shot slice, to answer each image as the model of that image's task does.

The student starts as model 0 (`init="first"`, the paper's choice) or the elementwise average of all models. Its
heads are the task models' own heads, frozen: the paper feeds the student's output embedding to every task's head
(U_output = I), so its body must speak each teacher's feature language. The loss, for an image of task t, is the MSE
of the student's body output to model t's (`target="features"`, the paper's) or τ²·KL(teacher t ‖ student) on head
t's logits at temperature τ (`target="logits"`). Labels are never used. It trains with the FS-Merge trainer
(`hetmerge.fitting`) at FS-Merge's defaults, in eval mode: BatchNorm keeps its running statistics, dropout is off.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Annotated, Literal

import torch
import torch.nn.functional as F

from hetmerge.data.few_shot import TaskImages
from hetmerge.levels import seeded
from hetmerge.merged import MergedModel
from hetmerge.methods.average import mean_state, union_heads_model
from hetmerge.methods.base import MergeContext, MergeMethod, register, require_same_architecture
from hetmerge.methods.learned import FitParams, fit_on_tasks
from hetmerge.models import MultiTaskNet
from hetmerge.params import Range, as_dict
from hetmerge.task_targets import owner_features, task_owners


@dataclass(frozen=True)
class DistillParams(FitParams):
    """`init`: the student starts as model 0 or as the average of all models; `target`: the body output (MSE) or
    the tempered logits of the task's head (τ²·KL), with τ = `temperature`."""

    init: Literal["first", "average"] = "first"
    target: Literal["features", "logits"] = "features"
    temperature: Annotated[float, Range(0, open_low=True)] = 1.0


def kd_loss(
    student: MultiTaskNet,
    features: torch.Tensor,
    targets: torch.Tensor,
    tasks: torch.Tensor,
    names: Sequence[str],
    tau: float,
) -> torch.Tensor:
    """Mean over rows of τ²·KL(softmax(head_t(targets)/τ) ‖ softmax(head_t(features)/τ)), t each row's task: the
    student's head t is the teacher's, so the teacher's logits are that head on the teacher's features."""
    kl = features.new_zeros(len(features), dtype=torch.float32)
    for t, task in enumerate(names):  # every head on every row (heads are small), kept where the row is task t's
        head = student.heads[task]
        own = F.log_softmax(head(features).float() / tau, dim=-1)
        teacher = F.log_softmax(head(targets).float() / tau, dim=-1)
        rows = F.kl_div(own, teacher, reduction="none", log_target=True).sum(-1)
        kl = torch.where(tasks == t, rows, kl)
    return kl.mean() * tau**2


@register
class Distill(MergeMethod):
    """One student learns every task's model's features or logits on few-shot data (FS-Merge's KD baseline)."""

    name = "distill"
    paper = "KD"
    Params = DistillParams
    uses_few_shot = True
    params: DistillParams

    def keeps_first_basis(self) -> bool:
        return self.params.init == "first"

    def risk(self, models: Sequence[MultiTaskNet]) -> str | None:
        self.params.fit_settings()
        require_same_architecture(self.name, models)
        return None

    def combine(self, models: Sequence[MultiTaskNet], ctx: MergeContext) -> MergedModel:
        p = self.params
        few = ctx.require_few_shot(f"method {self.name!r}")
        owners = task_owners(self.name, models, few.train.names)
        with seeded(ctx.seed, torch.device("cpu")):  # a fresh net's init draws, all overwritten below
            student = union_heads_model(models)
        few.train.require_tasks(tuple(student.heads), f"method {self.name!r}, few-shot training slice")
        body = mean_state(models) if p.init == "average" else models[0].state_dict()
        state = {k: v for k, v in body.items() if not k.startswith("heads.")}
        for task, owner in zip(few.train.names, owners, strict=True):
            state.update({f"heads.{task}.{k}": v for k, v in models[owner].heads[task].state_dict().items()})
        student.load_state_dict(state)
        student.to(ctx.device).eval()
        student.heads.requires_grad_(False)
        params = list(student.body.parameters())
        for param in params:
            param.requires_grad_(True)

        def loss_for(data: TaskImages) -> Callable[[torch.Tensor], torch.Tensor]:
            targets = owner_features(models, data, owners)

            def loss_on(idx: torch.Tensor) -> torch.Tensor:
                features = student.body(data.images[idx])
                if p.target == "features":
                    return F.mse_loss(features.float(), targets[idx])
                return kd_loss(student, features, targets[idx], data.tasks[idx], data.names, p.temperature)

            return loss_on

        fit_on_tasks(self.name, models, params, loss_for, ctx, p.fit_settings(), self.name, as_dict(p))
        ctx.notes.update(settings=as_dict(p), owners=dict(zip(few.train.names, owners, strict=True)))
        return MergedModel(student)
