"""Every method and stage on a CUDA device: emulated on the CPU in every run, on a real GPU with `-m gpu`.

The emulated device (tests/fake_cuda.py) raises on a CPU tensor meeting a cuda:0 tensor, as CUDA does, so
these tests catch device bugs on machines without a GPU. Its arithmetic is the CPU's, so an emulated merge
must equal the CPU merge exactly; on a real GPU, to float tolerance.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator

import pytest
import torch
from fake_cuda import fake_cuda, is_on_fake_cuda

from hetmerge.batchnorm import reset_batchnorm
from hetmerge.data.few_shot import FewShot, TaskImages
from hetmerge.depth import layer_cka
from hetmerge.matching import solvers
from hetmerge.merged import MergedModel
from hetmerge.methods import REGISTRY, MergeContext, build_method
from hetmerge.models import build_model
from hetmerge.spaces import FeatureSpace
from hetmerge.statistics import collect_statistics

SHAPE = (1, 8, 8)
VGG = ("vgg", {"depth": 11, "width": 0.0625})
VIT = ("vit", {"depth": 2, "width": 16, "heads": 2, "patch": 4, "mlp_ratio": 2.0})
PLAIN_VGG = ("vgg", {"depth": 11, "width": 0.0625, "batch_norm": False})  # the neuron-interpolation paper's kind
QUICK = {"epochs": 1, "head_epochs": 1}
# (models, params) per registered method; every registered method must appear here (see the test below)
CASES: dict[str, list[tuple[tuple, tuple, dict]]] = {
    "average": [(VGG, VGG, {})],
    "ensemble": [(VGG, VGG, {"reset_bn": True})],
    "permute": [(VGG, VGG, {}), (VIT, VIT, {})],
    "zipit": [(VGG, VGG, {"alpha": 0.5, "beta": 0.5}), (VGG, VGG, {"stop_after": "conv3"})],
    "weight_matching": [(VGG, VGG, {"max_iter": 5})],
    "mudsc": [
        (VGG, VGG, {"solver": "zip", "lam": 0.5, "max_sweeps": 3}),
        (VGG, VGG, {"solver": "align", "lam_grid": [0.0, 0.5], "max_sweeps": 3}),
        (VIT, VIT, {"solver": "zip", "lam": 0.5, "max_sweeps": 2}),
        (VIT, VIT, {"solver": "align", "lam": 0.0, "max_sweeps": 2}),
    ],
    "hetero": [
        (("resnet", {"depth": 14, "width": 0.25}), ("resnet", {"depth": 8, "width": 0.25}), {"strategy": "segment"}),
        (
            ("resnet", {"depth": 14, "width": 0.5}),
            ("resnet", {"depth": 8, "width": 0.25}),
            {"strategy": "layer", "solver": "zip", "lam": 0.5, "max_sweeps": 2},
        ),
    ],
    # same-task fusion: both models have one head over the same classes (see models_for)
    "otfusion": [
        (PLAIN_VGG, PLAIN_VGG, {"importance": "conductance"}),
        (PLAIN_VGG, PLAIN_VGG, {"cost": "weights", "solver": "sinkhorn"}),
        (VIT, VIT, {"importance": "deeplift"}),
    ],
    "hf": [(PLAIN_VGG, PLAIN_VGG, {"importance": "deeplift"})],
    "kf": [(PLAIN_VGG, PLAIN_VGG, {"importance": "conductance", "restarts": 2})],
    "kf_gradient": [(PLAIN_VGG, PLAIN_VGG, {**QUICK, "importance": "conductance"}), (VIT, VIT, QUICK)],
    "last_layer_kd": [(PLAIN_VGG, PLAIN_VGG, {"epochs": 2})],
    # the merges that learn from each task's few-shot slice (see few_shot_on)
    "regmean": [(VGG, VGG, {}), (VIT, VIT, {"align": "permute"})],
    "distill": [(VGG, VGG, {"epochs": 2, "batch_size": 16})],
    "fs_merge": [
        (VGG, VGG, {"epochs": 2, "batch_size": 16, "rank": 1}),
        (VIT, VIT, {"epochs": 1, "batch_size": 16, "rank": 1, "mode": "local"}),
    ],
}


def real_cuda() -> Iterator[torch.device]:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device: the gpu tests need one (the emulated tests cover the CPU-only case)")
    yield torch.device("cuda", 0)


@pytest.fixture(params=["emulated", pytest.param("real", marks=pytest.mark.gpu)])
def device(request) -> Iterator[torch.device]:
    """cuda:0, emulated on the CPU or (gpu marker) a real GPU."""
    if request.param == "emulated":
        with fake_cuda() as dev:
            yield dev
    else:
        yield from real_cuda()


def exact(device: torch.device) -> bool:
    """The emulation computes on the CPU, bit for bit; a real GPU only to float tolerance."""
    return is_on_fake_cuda(torch.empty(0, device=device))


def on_device(module: torch.nn.Module, device: torch.device) -> bool:
    return all(t.device == device for t in [*module.parameters(), *module.buffers()])


def assert_states_match(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], tight: bool) -> None:
    assert got.keys() == want.keys()
    for key, value in want.items():
        other = got[key].cpu()
        if tight:
            assert torch.equal(other, value), key
        else:
            torch.testing.assert_close(other, value, atol=1e-4, rtol=1e-4, msg=key)


def models_for(a_desc: tuple, b_desc: tuple, same_task: bool = False) -> list[torch.nn.Module]:
    """Two models of tasks A and B, or (`same_task`) of one task over the same 4 classes."""
    torch.manual_seed(1)
    a = build_model(*a_desc, SHAPE, {"all": 4} if same_task else {"A": 3})
    torch.manual_seed(2)
    b = build_model(*b_desc, SHAPE, {"all": 4} if same_task else {"B": 4})
    with torch.no_grad():  # non-trivial BatchNorm statistics, so the reset visibly matters
        for m in [*a.modules(), *b.modules()]:
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 1.5)
    return [a.eval(), b.eval()]


def data_on(device: torch.device) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    return [(torch.randn(16, *SHAPE, generator=gen) * 2 + 0.5).to(device) for _ in range(3)]


def few_shot_cpu() -> FewShot:
    """Tasks A and B's few-shot slice, on the CPU as a caller may hand it over: the method moves it."""
    gen = torch.Generator().manual_seed(11)

    def part(n: int) -> TaskImages:
        return TaskImages(torch.randn(2 * n, *SHAPE, generator=gen), torch.arange(2).repeat_interleave(n), ("A", "B"))

    return FewShot(part(24), part(8), 24, 0)


def merge_on(
    device: torch.device, method: str, params: dict, descs: tuple
) -> tuple[MergedModel, dict, list[torch.nn.Module]]:
    same_task = REGISTRY[method].same_task
    models = models_for(*descs, same_task=same_task)
    data = data_on(device)
    models = [m.to(device) for m in models]
    labels = [torch.arange(len(x), device=device) % 4 for x in data]
    shares = torch.tensor([[0.7, 0.2, 0.5, 0.0], [0.3, 0.8, 0.5, 1.0]], device=device)

    def score(model: MergedModel) -> float:
        with torch.no_grad():
            return float(sum(out.float().mean() for x in data for out in model(x).values()))

    ctx = MergeContext(
        device=device,
        batches=lambda: iter(data),
        labelled=(lambda: zip(data, labels, strict=True)) if same_task else None,
        class_shares=shares if same_task else None,
        seed=3,
        score=score,
        few_shot=few_shot_cpu() if REGISTRY[method].uses_few_shot else None,
    )
    merged = build_method(method, params)(models, ctx)
    return merged, ctx.notes, models


def test_every_registered_method_is_covered():
    assert set(CASES) == set(REGISTRY)


@pytest.mark.parametrize(
    ("method", "case"), [(m, k) for m, cases in CASES.items() for k in range(len(cases))], ids=lambda v: str(v)
)
def test_every_method_merges_on_cuda_as_on_the_cpu(device, method, case):
    """Models and data on cuda:0: the merge stays there and equals the CPU merge (same matching, same weights)."""
    a_desc, b_desc, params = CASES[method][case]
    merged, notes, models = merge_on(device, method, params, (a_desc, b_desc))
    assert on_device(merged, device)
    want, want_notes, _ = merge_on(torch.device("cpu"), method, params, (a_desc, b_desc))
    assert_states_match(merged.state_dict(), want.state_dict(), exact(device))
    if exact(device):
        assert notes == want_notes
    else:  # a GPU's float differences may move λ scores, not the choice
        assert notes.keys() == want_notes.keys() and notes.get("lam") == want_notes.get("lam")
    x = data_on(device)[0]
    with torch.no_grad():
        outputs = merged(x)
    assert all(v.device == device for v in outputs.values())
    assert all(on_device(m, device) for m in models)


def test_statistics_cka_and_bn_reset_on_cuda(device):
    models = [m.to(device) for m in models_for(VGG, VGG)]
    cpu_models = models_for(VGG, VGG)
    data, cpu_data = data_on(device), data_on(torch.device("cpu"))
    stats = collect_statistics(models, iter(data))
    want = collect_statistics(cpu_models, iter(cpu_data))
    for name, s in want.items():
        torch.testing.assert_close(stats[name].cov.cpu(), s.cov, atol=1e-9, rtol=1e-9)
    deep = build_model("resnet", {"depth": 14, "width": 0.25}, SHAPE, {"A": 3}).eval()
    shallow = build_model("resnet", {"depth": 8, "width": 0.25}, SHAPE, {"B": 3}).eval()
    blocks = [[f"body.{b}" for stage in m.depth_stages() for b in stage] for m in (deep, shallow)]
    cka = layer_cka(copy.deepcopy(deep).to(device), copy.deepcopy(shallow).to(device), iter(data), *blocks)
    torch.testing.assert_close(cka.cpu(), layer_cka(deep, shallow, iter(cpu_data), *blocks), atol=1e-6, rtol=1e-6)
    model = copy.deepcopy(cpu_models[0])
    assert reset_batchnorm(models[0], iter(data)) == reset_batchnorm(model, iter(cpu_data)) > 0
    assert_states_match(models[0].state_dict(), model.state_dict(), exact(device))


def test_the_emulation_raises_where_cuda_raises():
    """The guard itself: a CPU tensor meeting a cuda:0 one fails, as on a GPU; what CUDA allows passes."""
    with fake_cuda() as dev:
        w = torch.randn(4, 4).to(dev)
        with pytest.raises(RuntimeError, match="same device"):
            w @ torch.randn(4, 4)
        with pytest.raises(RuntimeError, match="same device"):
            w.index_select(0, torch.tensor([0, 1]))
        with pytest.raises(TypeError, match="numpy"):
            w.numpy()
        with pytest.raises(RuntimeError, match="generator"):
            torch.randperm(4, generator=torch.Generator(), device=dev)
        assert (w * torch.tensor(2.0)).device == dev  # CPU scalars are fine
        assert w[torch.tensor([0, 1])].device == dev  # CPU indices are fine
        assert w.cpu().device.type == "cpu" and torch.zeros(2, device=w.device).device == dev
        layer = torch.nn.Linear(4, 2).to(dev)
        layer(w).sum().backward()
        assert layer.weight.grad.device == dev


@pytest.mark.parametrize("solver", [solvers.align, solvers.Zip(0.5, 1.0)], ids=["align", "zip"])
@pytest.mark.parametrize("groups", [1, 2])
def test_solvers_take_similarities_from_any_device(device, solver, groups):
    """Matching runs on the CPU: similarities on cuda:0 give the CPU's merges, as CPU tensors."""
    gen = torch.Generator().manual_seed(groups)
    z = torch.randn(8, 30, generator=gen, dtype=torch.float64)
    sim = (torch.corrcoef(z) + torch.corrcoef(z).T) / 2
    space = FeatureSpace("h", 4, (), (), "x", groups=groups)
    (want,) = solver.scored([sim], [space], [(4, 4)])
    (got,) = solver.scored([sim.to(device)], [space], [(4, 4)])
    assert got.value == want.value
    for a, b in zip(got.merge.unmerge + got.merge.merge, want.merge.unmerge + want.merge.merge, strict=True):
        assert a.device.type == "cpu" and torch.equal(a, b)
