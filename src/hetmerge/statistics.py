"""Streaming activation statistics of every feature space, for all models of a merge at once.

For a space observed in N models with widths d_1..d_N, the concatenated feature z ∈ R^{Σd} is collected
at every sample and spatial position. Sums of z and z zᵀ are accumulated with one matrix product per
batch in float64, outside autocast, so 50k-image passes do not lose precision. Correlations clamp the
standard deviations, so dead units (zero variance) give zero correlation instead of NaN. A NaN or infinite
activation is an error naming the space and batch: it would make every correlation NaN.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from hetmerge.checkpoint import CheckpointError, load_tensors, save_tensors
from hetmerge.compatibility import nonfinite
from hetmerge.models import MultiTaskNet
from hetmerge.progress import track


@dataclass(frozen=True)
class SpaceStats:
    """Mean and covariance of the concatenated features of one space over N models."""

    widths: tuple[int, ...]
    mean: torch.Tensor  # (O,), float64
    cov: torch.Tensor  # (O, O), float64
    count: int

    def correlation(self, eps: float = 1e-7) -> torch.Tensor:
        cov = (self.cov + self.cov.T) / 2  # exactly symmetric: the greedy zip relies on it
        std = cov.diagonal().clamp_min(0).sqrt()
        return cov / torch.outer(std, std).clamp_min(eps)


def _as_units(h: torch.Tensor, unit_dim: int) -> torch.Tensor:
    """Units of dimension `unit_dim` become rows: (C, samples·positions), one column per sample and position."""
    h = h.detach().movedim(unit_dim, 0)
    return h.reshape(h.shape[0], -1)


@torch.no_grad()
def collect_statistics(
    models: Sequence[MultiTaskNet], batches: Iterable[torch.Tensor], spaces: Sequence[str] | None = None
) -> dict[str, SpaceStats]:
    """One pass over `batches` through every model, accumulating statistics of the named spaces.

    `spaces` defaults to every space the models share. All models must describe the same spaces.
    """
    graphs = [m.space_graph() for m in models]
    names = list(spaces) if spaces is not None else list(graphs[0].names)
    for i, graph in enumerate(graphs[1:], start=1):
        missing = sorted(set(names) - set(graph.names))
        if missing:
            raise ValueError(f"model {i} has no feature space(s) {missing}; statistics need them in every model")
    captured: dict[tuple[int, str], torch.Tensor] = {}
    handles = []
    for i, (model, graph) in enumerate(zip(models, graphs, strict=True)):
        model.eval()
        for name in names:

            def hook(module: torch.nn.Module, args: object, out: torch.Tensor, key=(i, name)) -> None:
                captured[key] = out

            handles.append(model.get_submodule(graph[name].observe).register_forward_hook(hook))
    sums: dict[str, torch.Tensor] = {}
    outers: dict[str, torch.Tensor] = {}
    finite: dict[str, list[torch.Tensor]] = {name: [] for name in names}  # per batch, checked once at the end
    columns = dict.fromkeys(names, 0)
    try:
        with torch.autocast("cuda", enabled=False), torch.autocast("cpu", enabled=False):
            for x in track(batches, desc="activation statistics", unit="batch"):
                for model in models:
                    model(x)
                for name in names:
                    z = torch.cat(
                        [_as_units(captured[(i, name)], graphs[i][name].unit_dim) for i in range(len(models))]
                    ).double()
                    if name not in sums:
                        sums[name] = torch.zeros(z.shape[0], dtype=torch.float64, device=z.device)
                        outers[name] = torch.zeros(z.shape[0], z.shape[0], dtype=torch.float64, device=z.device)
                    row_sums = z.sum(1)  # non-finite exactly where z is: float64 sums of float32 values never overflow
                    finite[name].append(torch.isfinite(row_sums).all())
                    sums[name] += row_sums
                    outers[name] += z @ z.T
                    columns[name] += z.shape[1]
    finally:
        for h in handles:
            h.remove()
    if not sums:
        raise ValueError("activation statistics got no data")
    for name in nonfinite(sums):
        batch = int(torch.stack(finite[name]).logical_not().nonzero()[0])
        owners = torch.isfinite(sums[name]).split([g[name].width for g in graphs])
        culprits = [i for i, ok in enumerate(owners) if not bool(ok.all())]
        raise ValueError(
            f"activations of feature space {name!r} hold NaN or inf (first in batch {batch} of the data, in model(s) "
            f"{culprits}, counted from 0): check those models' weights and the input images"
        )
    stats = {}
    for name in names:
        widths = tuple(g[name].width for g in graphs)
        mean = sums[name] / columns[name]
        cov = outers[name] / columns[name] - torch.outer(mean, mean)
        stats[name] = SpaceStats(widths, mean.cpu(), cov.cpu(), columns[name])
    return stats


def save_statistics(
    stats: dict[str, SpaceStats],
    path: str | os.PathLike[str],
    sources: Sequence[Mapping[str, Any]] | None = None,
) -> None:
    """Write statistics with `sources`, the fingerprints of the models they describe
    (`hetmerge.compatibility.source_records`), so that they are never used for other models."""
    tensors = {}
    meta = {}
    for name, s in stats.items():
        tensors[f"{name}.mean"] = s.mean
        tensors[f"{name}.cov"] = s.cov
        meta[name] = {"widths": list(s.widths), "count": s.count}
    record = {} if sources is None else {"sources": [dict(r) for r in sources]}
    save_tensors(path, tensors, {"kind": "statistics", "spaces": meta, **record})


def load_statistics(path: str | os.PathLike[str]) -> tuple[dict[str, SpaceStats], list[dict[str, Any]] | None]:
    """The statistics of every space and the fingerprints of their models (None: the file does not record them)."""
    tensors, meta = load_tensors(path)
    if meta.get("kind") != "statistics":
        raise CheckpointError(f"{path} holds {meta.get('kind')!r}, not activation statistics")
    try:
        stats = {
            name: SpaceStats(tuple(info["widths"]), tensors[f"{name}.mean"], tensors[f"{name}.cov"], info["count"])
            for name, info in meta["spaces"].items()
        }
    except KeyError as err:
        raise CheckpointError(f"{path}: statistics file lacks {err}") from err
    bad = nonfinite(tensors)
    if bad:
        spaces = sorted({name.rsplit(".", 1)[0] for name in bad})
        raise CheckpointError(f"{path}: statistics of feature space(s) {spaces} hold NaN or inf; compute them again")
    return stats, meta.get("sources")
