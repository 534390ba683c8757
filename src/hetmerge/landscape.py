"""Loss landscape on the plane through model A, model B and a merge (MuDSC's figure), weights in A's basis.

Every point is a full parameter vector of the merged architecture (all task heads): a source model has
zeros for the heads it lacks, so each vertex is exactly that model. The plane is spanned by B − A and the
part of M − A orthogonal to it, coordinates in units of |B − A|. Merges that keep model 0's basis
(alignment-based ones and weight averaging) are used as they are; the others (zips) are first permuted
onto A by weight matching, only to place them. Off-plane merges are shown at their projection, with their
distance from the plane; every point's own losses are evaluated at the model itself.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from hetmerge.batchnorm import reset_batchnorm
from hetmerge.matching.weight_matching import weight_matching
from hetmerge.models import MultiTaskNet
from hetmerge.progress import Progress
from hetmerge.spaces import permute_state

Losses = Callable[[nn.Module], dict[str, float]]


def parameter_vector(model: MultiTaskNet, target: MultiTaskNet) -> torch.Tensor:
    """`model`'s parameters laid out like `target`'s, zeros where `model` lacks a tensor (another task's head)."""
    own = dict(model.named_parameters())
    parts = []
    for name, ref in target.named_parameters():
        value = own.get(name)
        if value is not None and value.shape != ref.shape:
            raise ValueError(
                f"tensor {name!r} has shape {tuple(value.shape)}, the plane's architecture {tuple(ref.shape)}"
            )
        parts.append((torch.zeros_like(ref) if value is None else value).detach().double().reshape(-1))
    return torch.cat(parts)


def load_vector(target: MultiTaskNet, vector: torch.Tensor) -> MultiTaskNet:
    """`target` with its parameters replaced by `vector` (layout of `parameter_vector`)."""
    offset = 0
    with torch.no_grad():
        for p in target.parameters():
            p.copy_(vector[offset : offset + p.numel()].view_as(p).to(p.dtype))
            offset += p.numel()
    return target


def onto_first_basis(model: MultiTaskNet, first: MultiTaskNet) -> MultiTaskNet:
    """A copy of `model` with its units permuted to best match `first`'s by weight matching."""
    graph = first.space_graph()
    perms, _ = weight_matching(first.state_dict(), model.state_dict(), graph)
    moved = type(model)(model.spec, model.input_shape, model.describe()["heads"])
    moved.load_state_dict(permute_state(model.state_dict(), graph, perms))
    return moved.eval()


@dataclass(frozen=True)
class Plane:
    origin: torch.Tensor
    basis: torch.Tensor  # (2, P) orthonormal
    scale: float  # |B − A|

    @classmethod
    def through(cls, a: torch.Tensor, b: torch.Tensor, m: torch.Tensor) -> Plane:
        u = b - a
        scale = float(u.norm())
        if scale == 0:
            raise ValueError("models A and B are identical: they span no plane")
        e1 = u / scale
        v = (m - a) - ((m - a) @ e1) * e1
        if float(v.norm()) < 1e-9 * scale:
            raise ValueError("the merge lies on the line through A and B: choose another merge for the plane")
        return cls(a, torch.stack([e1, v / v.norm()]), scale)

    def coordinates(self, point: torch.Tensor) -> tuple[float, float, float]:
        """(x, y, distance from the plane), all in units of |B − A|."""
        d = point - self.origin
        xy = self.basis @ d
        off = (d - xy @ self.basis).norm()
        return float(xy[0] / self.scale), float(xy[1] / self.scale), float(off / self.scale)

    def point(self, x: float, y: float) -> torch.Tensor:
        return self.origin + self.scale * (x * self.basis[0] + y * self.basis[1])


def loss_grid(
    plane: Plane,
    target: MultiTaskNet,
    xs: Sequence[float],
    ys: Sequence[float],
    losses: Losses,
    bn_batches: Callable[[], Iterable[torch.Tensor]] | None,
) -> dict[str, list[list[float]]]:
    """Each task's loss at every grid point (rows: y, columns: x), after a BatchNorm reset where given."""
    grid: dict[str, list[list[float]]] = {}
    with Progress("loss landscape", total=len(xs) * len(ys), unit="point") as progress:
        for y in ys:
            rows: dict[str, list[float]] = {}
            for x in xs:
                model = load_vector(target, plane.point(x, y))
                if bn_batches is not None:
                    reset_batchnorm(model, bn_batches())
                for task, value in losses(model.eval()).items():
                    rows.setdefault(task, []).append(value)
                progress.update()
            for task, row in rows.items():
                grid.setdefault(task, []).append(row)
    return grid


def grid_axis(values: Sequence[float], steps: int, margin: float = 0.3) -> list[float]:
    lo, hi = min(values) - margin, max(values) + margin
    return [round(lo + (hi - lo) * k / (steps - 1), 6) for k in range(steps)]


def task_losses(model: nn.Module, batches: Mapping[str, Sequence[tuple[torch.Tensor, torch.Tensor]]]) -> dict:
    """Mean cross-entropy of each task's head on that task's (images, local labels) batches."""
    out = {}
    with torch.no_grad():
        for task, pairs in batches.items():
            total = count = 0.0
            for x, y in pairs:
                logits = model(x)[task]
                total += float(nn.functional.cross_entropy(logits.float(), y, reduction="sum"))
                count += len(y)
            out[task] = total / count
    return out
