"""Minibatch linear CKA between every hooked layer of one model and every hooked layer of another (§4.4).

Per minibatch of n samples, each layer's output X (flattened per sample) gives the linear Gram K = XXᵀ with
its diagonal zeroed, and the unbiased HSIC estimator (Song et al. 2012; Nguyen et al. 2021)

    HSIC₁(K, L) = [tr(KL) + 1ᵀK1·1ᵀL1 / ((n−1)(n−2)) − 2·1ᵀKL1 / (n−2)] / (n(n−3))

is averaged over minibatches for every pair, and CKA(i, j) = HSIC₁(K_i, L_j) / √(HSIC₁(K_i, K_i)·HSIC₁(L_j, L_j)).
The estimator is unbiased per batch, so the average over many small batches converges to the full-data CKA
without ever forming a data-sized Gram matrix. All L_x·L_y values of a batch come from three matrix
products over the stacked Grams: tr(K_i L_j) is a dot product of the flattened Grams (both symmetric) and
1ᵀK_i L_j 1 one of their row sums.

Features are centred per batch before the Gram: HSIC₁ is exactly invariant to shifting a layer's features
by a constant, and centring keeps the float64 cancellations small for ReLU outputs with large means.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from hetmerge.progress import track

MIN_BATCH = 4  # the unbiased estimator divides by n − 3


def _check_batch_size(n: int) -> None:
    if n < MIN_BATCH:
        raise ValueError(
            f"a minibatch of {n} samples is too small for the unbiased HSIC estimator, which needs at least "
            f"{MIN_BATCH} (it divides by n−3); use a fixed batch size and drop the last incomplete batch"
        )


def gram_stack(features: Sequence[torch.Tensor]) -> torch.Tensor:
    """(L, n, n) float64 linear Grams of centred, per-sample-flattened features, diagonals zeroed."""
    n = features[0].shape[0]
    grams = []
    for f in features:
        if f.shape[0] != n:
            raise ValueError(f"all layers of a batch need the same number of samples, got {f.shape[0]} and {n}")
        x = f.detach().reshape(n, -1).double()
        x = x - x.mean(0)
        grams.append(x @ x.T)
    k = torch.stack(grams)
    k.diagonal(dim1=1, dim2=2).zero_()
    return k


def _hsic_terms(k: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Unbiased HSIC of every pair (K_i, L_j) of two zero-diagonal Gram stacks: (L_x, L_y)."""
    n = k.shape[-1]
    row_k, row_l = k.sum(-1), g.sum(-1)  # (L, n): K1 and L1
    trace = k.flatten(1) @ g.flatten(1).T  # tr(K_i L_j) = Σ K_i ⊙ L_j for symmetric Grams
    totals = torch.outer(row_k.sum(-1), row_l.sum(-1))  # 1ᵀK1 · 1ᵀL1
    cross = row_k @ row_l.T  # 1ᵀ K L 1 = (K1)ᵀ(L1)
    return (trace + totals / ((n - 1) * (n - 2)) - 2 * cross / (n - 2)) / (n * (n - 3))


def _self_hsic(k: torch.Tensor) -> torch.Tensor:
    """HSIC₁(K_i, K_i) of every Gram of a stack: the diagonal of `_hsic_terms(k, k)` without the rest."""
    n = k.shape[-1]
    row = k.sum(-1)
    trace = (k * k).flatten(1).sum(1)
    return (trace + row.sum(-1) ** 2 / ((n - 1) * (n - 2)) - 2 * (row * row).sum(1) / (n - 2)) / (n * (n - 3))


class CKAAccumulator:
    """Streams minibatches of two models' layer outputs into the (L_x, L_y) minibatch-CKA matrix.

    Each batch weighs equally in the averages, as in the reference implementation (sums are kept: the
    common 1/batches cancels in the ratio). A layer whose features
    are exactly constant on every batch (e.g. a dead ReLU block) has zero self-HSIC; its CKA with anything is
    reported as 0, not NaN.
    """

    def __init__(self) -> None:
        self.batches = 0
        self._xy: torch.Tensor | None = None
        self._xx: torch.Tensor | None = None
        self._yy: torch.Tensor | None = None

    def update(self, xs: Sequence[torch.Tensor], ys: Sequence[torch.Tensor]) -> None:
        """Add one minibatch: `xs[i]` is model X's layer i output (n, ...), `ys[j]` model Y's layer j."""
        if not xs or not ys:
            raise ValueError("CKA needs at least one layer of each model")
        if xs[0].shape[0] != ys[0].shape[0]:
            raise ValueError(f"the two models saw batches of {xs[0].shape[0]} and {ys[0].shape[0]} samples")
        _check_batch_size(xs[0].shape[0])
        if self._xy is not None and self._xy.shape != (len(xs), len(ys)):
            raise ValueError(f"got {len(xs)}×{len(ys)} layers after {tuple(self._xy.shape)} in earlier batches")
        with torch.autocast("cuda", enabled=False), torch.autocast("cpu", enabled=False):
            k, g = gram_stack(xs), gram_stack(ys)
            xy, xx, yy = _hsic_terms(k, g), _self_hsic(k), _self_hsic(g)
        if self._xy is None:
            self._xy, self._xx, self._yy = xy, xx, yy
        else:
            self._xy += xy
            self._xx += xx
            self._yy += yy
        self.batches += 1

    def result(self) -> torch.Tensor:
        """The (L_x, L_y) float64 CKA matrix on the CPU."""
        if self._xy is None or self._xx is None or self._yy is None:
            raise ValueError("CKA got no batches")
        denominator = torch.outer(self._xx, self._yy).clamp_min(0).sqrt()
        cka = torch.where(denominator > 0, self._xy / denominator, torch.zeros_like(self._xy))
        return cka.cpu()


@torch.no_grad()
def layer_cka(
    model_x: torch.nn.Module,
    model_y: torch.nn.Module,
    batches: Iterable[torch.Tensor],
    layers_x: Sequence[str],
    layers_y: Sequence[str],
) -> torch.Tensor:
    """Minibatch CKA between the outputs of the named modules of two models: (len(layers_x), len(layers_y)).

    Both models see the same batches, in eval mode (their modes are restored afterwards). Put the deeper
    model first to get the deep × shallow matrix the depth alignment expects.
    """
    if not layers_x or not layers_y:
        raise ValueError("layer_cka needs at least one layer name for each model")
    captured: dict[tuple[int, str], torch.Tensor] = {}
    handles = []
    modes = [model_x.training, model_y.training]
    try:
        for i, (model, names) in enumerate(((model_x, layers_x), (model_y, layers_y))):
            model.eval()
            for name in names:

                def hook(module: torch.nn.Module, args: object, out: object, key=(i, name)) -> None:
                    if not isinstance(out, torch.Tensor):
                        raise TypeError(f"module {key[1]!r} returns {type(out).__name__}, not a tensor")
                    captured[key] = out

                handles.append(model.get_submodule(name).register_forward_hook(hook))
        acc = CKAAccumulator()
        for x in track(batches, desc="layer CKA", unit="batch"):
            _check_batch_size(x.shape[0])
            captured.clear()
            model_x(x)
            model_y(x)
            missing = [n for i, names in enumerate((layers_x, layers_y)) for n in names if (i, n) not in captured]
            if missing:
                raise ValueError(f"module(s) {missing} produced no output in the forward pass")
            acc.update([captured[(0, n)] for n in layers_x], [captured[(1, n)] for n in layers_y])
        return acc.result()
    finally:
        for h in handles:
            h.remove()
        model_x.train(modes[0])
        model_y.train(modes[1])
