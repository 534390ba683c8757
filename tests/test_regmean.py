"""RegMean: closed forms on tiny models, im2col Grams, self-merges, alignment first, and its errors."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from hetmerge.batchnorm import reset_batchnorm
from hetmerge.data.few_shot import FewShot, TaskImages
from hetmerge.merged import MergedModel
from hetmerge.methods import MergeContext, MergeError, build_method
from hetmerge.methods.regmean import LayerSystem, input_grams, layer_rows
from hetmerge.models import MultiTaskNet, build_from_description, build_model
from hetmerge.params import ParameterError
from hetmerge.spaces import permute_state, random_permutations

SHAPE = (1, 8, 8)
SPECS = {
    "mlp": {"hidden": [12, 10]},
    "vgg": {"depth": 11, "width": 0.0625},
    "vit": {"patch": 4, "depth": 2, "width": 16, "heads": 2, "mlp_ratio": 2.0},
}


def task_images(per_task: dict[str, torch.Tensor]) -> FewShot:
    """A few-shot slice with the given images per task (no augmented copies; val = train, unused by RegMean)."""
    names = tuple(per_task)
    images = torch.cat(list(per_task.values()))
    tasks = torch.cat([torch.full((len(x),), t) for t, x in enumerate(per_task.values())])
    data = TaskImages(images, tasks, names)
    return FewShot(data, data, originals=len(per_task[names[0]]), aug_factor=0)


def random_images(n: int, shape=SHAPE, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, *shape, generator=torch.Generator().manual_seed(seed))


def context(few_shot: FewShot | None, batches: list[torch.Tensor] | None = None) -> MergeContext:
    return MergeContext(
        device=torch.device("cpu"), few_shot=few_shot, batches=None if batches is None else lambda: iter(batches)
    )


def two_task_data(shape=SHAPE, n: int = 10) -> FewShot:
    return task_images({"A": random_images(n, shape, 1), "B": random_images(n, shape, 2) + 0.5})


def renamed(model: MultiTaskNet, head: str) -> MultiTaskNet:
    """The same network with its one head renamed: a copy that owns another task."""
    (old,) = model.heads
    twin = build_from_description({**model.describe(), "heads": {head: model.heads[old].out_features}})
    twin.load_state_dict({k.replace(f"heads.{old}.", f"heads.{head}."): v for k, v in model.state_dict().items()})
    return twin.eval()


def regmean(models, few_shot, batches=None, **params) -> tuple[MergedModel, dict]:
    ctx = context(few_shot, batches)
    merged = build_method("regmean", params)(models, ctx)
    return merged, ctx.notes


def assert_same_function(merged: MergedModel, model: MultiTaskNet, x: torch.Tensor, atol: float = 1e-5) -> None:
    with torch.no_grad():
        want = model(x)[next(iter(model.heads))]
        got = merged(x)
    for task in got:
        torch.testing.assert_close(got[task], want, rtol=0, atol=atol, msg=task)


# ---------------------------------------------------------------------------------------------------------
# Closed forms


def rows_of(images: torch.Tensor) -> torch.Tensor:
    return images.reshape(len(images), -1).double()


@pytest.mark.parametrize("reg_coef", [0.0, 0.7, 1.0])
def test_two_linear_layers_match_the_closed_form(reg_coef, make_model):
    """W* = (Σ G̃ᵢ)⁻¹ Σ G̃ᵢ Wᵢᵀ per layer, with each model's Gram from its own inputs on its own task's images."""
    shape = (1, 2, 2)
    a = make_model("mlp", {"hidden": [3, 3], "batch_norm": False}, {"A": 2}, input_shape=shape, seed=1).eval()
    b = make_model("mlp", {"hidden": [3, 3], "batch_norm": False}, {"B": 2}, input_shape=shape, seed=2).eval()
    for model in (a, b):
        nn.init.ones_(model.body.fc0.linear.bias)  # every unit active on some image: no dead input to fc1
    data = {"A": random_images(6, shape, 1), "B": random_images(6, shape, 2)}
    merged, _ = regmean([a, b], task_images(data), reg_coef=reg_coef)
    inputs = {0: [], 1: []}  # per layer, per model: that layer's input on the model's own images
    for model, task in ((a, "A"), (b, "B")):
        x = rows_of(data[task])
        inputs[0].append(x)
        lin = model.body.fc0.linear
        inputs[1].append(torch.relu(x @ lin.weight.double().T + lin.bias.double()))
    assert all(bool((h.abs().sum(0) > 0).all()) for h in inputs[1]), "a dead unit would make the check vacuous"
    for layer in (0, 1):
        ws = [getattr(m.body, f"fc{layer}").linear.weight.double() for m in (a, b)]
        grams = [x.T @ x for x in inputs[layer]]
        grams = [reg_coef * g + (1 - reg_coef) * torch.diag(torch.diagonal(g)) for g in grams]
        want = (torch.linalg.inv(sum(grams)) @ sum(g @ w.T for g, w in zip(grams, ws, strict=True))).T
        got = getattr(merged.trunk.body, f"fc{layer}").linear.weight.double()
        torch.testing.assert_close(got, want.float().double(), rtol=1e-5, atol=1e-6)
        bias = getattr(merged.trunk.body, f"fc{layer}").linear.bias
        torch.testing.assert_close(
            bias, (getattr(a.body, f"fc{layer}").linear.bias + getattr(b.body, f"fc{layer}").linear.bias) / 2
        )
    torch.testing.assert_close(merged.trunk.heads["A"].weight, a.heads["A"].weight, rtol=0, atol=0)
    torch.testing.assert_close(merged.trunk.heads["B"].weight, b.heads["B"].weight, rtol=0, atol=0)


def test_one_linear_layer_is_the_least_squares_fit_of_every_model_on_its_own_data(make_model):
    """reg_coef 1: W* minimises Σᵢ ‖Xᵢ Wᵀ − Xᵢ Wᵢᵀ‖², solved here by lstsq on the stacked rows."""
    a = make_model("mlp", {"hidden": [5], "batch_norm": False}, {"A": 2}, seed=3).eval()
    b = make_model("mlp", {"hidden": [5], "batch_norm": False}, {"B": 2}, seed=4).eval()
    data = {"A": random_images(40, seed=5), "B": random_images(50, seed=6) * 2}
    merged, notes = regmean([a, b], task_images(data), reg_coef=1.0)
    xs = [rows_of(data["A"]), rows_of(data["B"])]
    targets = [x @ m.body.fc0.linear.weight.double().T for x, m in zip(xs, (a, b), strict=True)]
    want = torch.linalg.lstsq(torch.cat(xs), torch.cat(targets)).solution.T
    torch.testing.assert_close(merged.trunk.body.fc0.linear.weight.double(), want, rtol=1e-4, atol=1e-5)
    average = (a.body.fc0.linear.weight + b.body.fc0.linear.weight) / 2
    assert not torch.allclose(merged.trunk.body.fc0.linear.weight, average, atol=1e-3)
    assert notes["gram_rows"] == {"body.fc0.linear": [40, 50]}
    assert notes["images"] == [40, 50]
    assert (notes["reg_coef"], notes["align"]) == (1.0, "none")
    assert 1 <= notes["condition_max"] == notes["condition"]["body.fc0.linear"] < 1e6


def spd(n: int, seed: int) -> torch.Tensor:
    x = torch.randn(2 * n, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return x.T @ x


@settings(max_examples=25, deadline=None)
@given(
    models=st.integers(2, 4),
    d_in=st.integers(1, 6),
    d_out=st.integers(1, 5),
    reg_coef=st.floats(0, 1),
    seed=st.integers(0, 1000),
)
def test_equal_grams_give_the_plain_average(models, d_in, d_out, reg_coef, seed):
    gram = spd(d_in, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    weights = [torch.randn(d_out, d_in, generator=gen, dtype=torch.float64) for _ in range(models)]
    eye_in, eye_out = torch.eye(d_in, dtype=torch.float64), torch.eye(d_out, dtype=torch.float64)
    system = LayerSystem("layer", [eye_in] * models, [eye_out] * models, taps=1)
    for i, w in enumerate(weights):
        system.add(i, gram, w, reg_coef)
    merged, condition, unreached = system.solve()
    torch.testing.assert_close(merged, torch.stack(weights).mean(0))
    assert unreached == 0
    assert condition >= 1


@pytest.mark.parametrize("reg_coef", [0.0, 0.7, 1.0])
def test_a_first_layer_that_sees_the_same_images_in_both_models_is_averaged(reg_coef, make_model):
    a = make_model("mlp", {"hidden": [6, 4]}, {"A": 2}, seed=1).eval()
    b = make_model("mlp", {"hidden": [6, 4]}, {"B": 2}, seed=2).eval()
    images = random_images(80, seed=3)
    merged, _ = regmean([a, b], task_images({"A": images, "B": images}), reg_coef=reg_coef)
    want = (a.body.fc0.linear.weight + b.body.fc0.linear.weight) / 2
    torch.testing.assert_close(merged.trunk.body.fc0.linear.weight, want)
    # the second layer's inputs differ between the models, so there RegMean is no average
    average = (a.body.fc1.linear.weight + b.body.fc1.linear.weight) / 2
    assert not torch.allclose(merged.trunk.body.fc1.linear.weight, average, atol=1e-3)
    torch.testing.assert_close(
        merged.trunk.body.fc0.norm.running_var, (a.body.fc0.norm.running_var + b.body.fc0.norm.running_var) / 2
    )


# ---------------------------------------------------------------------------------------------------------
# im2col


def looped_rows(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """One row per (sample, output position): the patch the kernel reads there, zero outside the image."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = conv.kernel_size, conv.stride, conv.padding, conv.dilation
    padded = nn.functional.pad(x, (pw, pw, ph, ph))
    out_h = (x.shape[2] + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    out_w = (x.shape[3] + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    rows = []
    for b in range(x.shape[0]):
        for i in range(out_h):
            for j in range(out_w):
                patch = padded[b, :, i * sh : i * sh + dh * (kh - 1) + 1 : dh, j * sw : j * sw + dw * (kw - 1) + 1 : dw]
                rows.append(patch.reshape(-1))
    return torch.stack(rows)


@settings(max_examples=20, deadline=None)
@given(
    kernel=st.integers(1, 3),
    stride=st.integers(1, 2),
    padding=st.integers(0, 2),
    dilation=st.integers(1, 2),
    size=st.integers(5, 7),
    seed=st.integers(0, 100),
)
def test_conv_rows_are_the_patches_the_kernel_reads(kernel, stride, padding, dilation, size, seed):
    torch.manual_seed(seed)
    conv = nn.Conv2d(2, 3, kernel, stride=stride, padding=padding, dilation=dilation, bias=False)
    x = torch.randn(2, 2, size, size)
    rows = layer_rows(conv, x)
    torch.testing.assert_close(rows, looped_rows(conv, x), rtol=0, atol=0)
    # and the rows are what the conv multiplies with its flattened weight
    out = conv(x).permute(0, 2, 3, 1).reshape(-1, 3)
    torch.testing.assert_close(rows @ conv.weight.reshape(3, -1).T, out, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("family", "layers"), [("vgg", ["body.conv0.conv", "body.conv2.conv"]), ("vit", ["body.embed.proj"])]
)
def test_conv_input_grams_equal_the_gram_of_a_per_patch_loop(family, layers, make_model):
    model = make_model(family, SPECS[family], {"A": 2}, input_shape=SHAPE, seed=1).eval()
    images = random_images(300, seed=2)  # more than one chunk of images
    grams, rows = input_grams(model, images, layers)
    inputs: dict[str, torch.Tensor] = {}
    handles = [
        model.get_submodule(n).register_forward_pre_hook(lambda m, a, n=n: inputs.__setitem__(n, a[0])) for n in layers
    ]
    with torch.no_grad():
        model.body(images)
    for handle in handles:
        handle.remove()
    for name in layers:
        explicit = looped_rows(model.get_submodule(name), inputs[name]).double()
        assert rows[name] == len(explicit)
        torch.testing.assert_close(grams[name], explicit.T @ explicit, rtol=1e-9, atol=1e-9)


# ---------------------------------------------------------------------------------------------------------
# Self-merges and alignment


@pytest.mark.parametrize("family", sorted(SPECS))
def test_merging_a_model_with_itself_returns_it(family, make_model, randomize_bn):
    model = randomize_bn(make_model(family, SPECS[family], {"A": 3}, seed=1), 1).eval()
    merged, notes = regmean([model, renamed(model, "B")], two_task_data())
    for key, value in model.state_dict().items():
        if not key.startswith("heads."):
            torch.testing.assert_close(merged.trunk.state_dict()[key], value, rtol=1e-5, atol=1e-6, msg=key)
    assert_same_function(merged, model, random_images(16, seed=9))
    if family == "vgg":  # its deepest convs see 1x1 maps: every tap but the centre reads padding only
        assert notes["unreached_inputs"]["body.conv7.conv"] >= 8 * model.body.conv7.conv.in_channels


@torch.no_grad()
def live_model(family: str, seed: int, data: list[torch.Tensor]) -> MultiTaskNet:
    """A model whose units all vary on `data` (BN bias 0.5, statistics from `data`): dead units would be matched
    arbitrarily, which has nothing to do with the code under test."""
    torch.manual_seed(seed)
    model = build_model(family, SPECS[family], SHAPE, {"A": 3})
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.bias.fill_(0.5)
    reset_batchnorm(model, data)
    return model.eval()


def permuted_copy(model: MultiTaskNet, head: str, seed: int) -> MultiTaskNet:
    twin = renamed(model, head)
    graph = twin.space_graph()
    perms = random_permutations(graph, torch.Generator().manual_seed(seed))
    twin.load_state_dict(permute_state(twin.state_dict(), graph, perms))
    return twin


@pytest.mark.parametrize("family", sorted(SPECS))
@pytest.mark.parametrize(
    "params", [{"align": "permute"}, {"align": "zipit", "zip_alpha": 0.5, "zip_beta": 0.0}], ids=["permute", "zipit"]
)
def test_alignment_then_regmean_recovers_a_permuted_copy(family, params):
    data = [random_images(32, seed=s) for s in range(2)]
    model = live_model(family, 1, data)
    twin = permuted_copy(model, "B", 3)
    merged, notes = regmean([model, twin], two_task_data(), batches=data, **params)
    assert_same_function(merged, model, torch.cat(data))
    if params["align"] == "permute":  # model 0's units in model 0's order
        for key, value in model.state_dict().items():
            if value.is_floating_point() and not key.startswith("heads."):
                torch.testing.assert_close(merged.trunk.state_dict()[key], value, rtol=1e-5, atol=1e-6, msg=key)
    # without alignment the copy's units meet the wrong partners
    unaligned, _ = regmean([model, twin], two_task_data())
    with pytest.raises(AssertionError):
        assert_same_function(unaligned, model, torch.cat(data), atol=1e-2)
    assert notes["align"] == params["align"]


def least_squares_rows(xs, weights, readers, writers, reg_coef):
    """The merged-basis objective written out as explicit rows: merged row k fits every member's output on its
    model's data from that model's inputs in the merged basis (the mean of its members), the shrinkage written as
    rows too (G̃ = αXᵀX + (1 − α)·diag(XᵀX) is the Gram of [√α·X; √((1 − α)·diag(XᵀX))]); min-norm lstsq."""
    merged = []
    for k in range(writers[0].shape[1]):
        design, target = [], []
        for x, w, v, u in zip(xs, weights, readers, writers, strict=True):
            rows = torch.cat([reg_coef**0.5 * x, torch.diag(((1 - reg_coef) * (x * x).sum(0)).sqrt())])
            for j in u[:, k].nonzero().flatten().tolist():
                design.append(rows @ v)
                target.append(rows @ w[j])
        merged.append(torch.linalg.lstsq(torch.cat(design), torch.cat(target)[:, None], driver="gelsd").solution[:, 0])
    return torch.stack(merged)


@pytest.mark.parametrize("reg_coef", [0.3, 1.0])
def test_merged_basis_system_with_same_model_merges_solves_its_least_squares(reg_coef):
    """A zip with same-model merges. Inputs: merged unit 0 = model 0's units 0, 1 and model 1's unit 0; model 0
    has no unit in merged unit 2. Outputs: merged unit 0 = model 0's unit 0 and model 1's units 0, 1; merged unit
    1 = model 0's units 1, 2 only; merged unit 2 = model 1's unit 2 only."""
    gen = torch.Generator().manual_seed(0)
    u_in = [torch.tensor([[1.0, 0, 0], [1, 0, 0], [0, 1, 0]]), torch.eye(3)]
    u_out = [torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 1, 0]]), torch.tensor([[1.0, 0, 0], [1, 0, 0], [0, 0, 1]])]
    xs = [torch.randn(20, 3, generator=gen, dtype=torch.float64) for _ in range(2)]
    weights = [torch.randn(3, 3, generator=gen, dtype=torch.float64) for _ in range(2)]
    system = LayerSystem("layer", u_in, u_out, taps=1)
    for i, (x, w) in enumerate(zip(xs, weights, strict=True)):
        system.add(i, x.T @ x, w, reg_coef)
    got, _, unreached = system.solve()
    readers = [u.double() / u.sum(0).clamp_min(1) for u in u_in]
    want = least_squares_rows(xs, weights, readers, [u.double() for u in u_out], reg_coef)
    torch.testing.assert_close(got, want)
    # merged output 1 is model 0's alone, and model 0's data never reaches merged input 2: that entry is free, and
    # the members' mean (0: model 0 has no weight there) is also the min-norm choice
    assert unreached == 1
    assert got[1, 2] == 0


def test_an_input_no_image_reaches_gets_the_members_mean_column():
    gram = torch.diag(torch.tensor([2.0, 0.0, 3.0], dtype=torch.float64))
    weights = [
        torch.tensor([[1.0, 4.0, 0.0]], dtype=torch.float64),
        torch.tensor([[3.0, 8.0, 2.0]], dtype=torch.float64),
    ]
    eye3, eye1 = torch.eye(3, dtype=torch.float64), torch.eye(1, dtype=torch.float64)
    system = LayerSystem("layer", [eye3, eye3], [eye1, eye1], taps=1)
    for i, w in enumerate(weights):
        system.add(i, gram, w, 0.7)
    got, _, unreached = system.solve()
    torch.testing.assert_close(got, torch.tensor([[2.0, 6.0, 1.0]], dtype=torch.float64))
    assert unreached == 1


# ---------------------------------------------------------------------------------------------------------
# Errors


def test_without_few_shot_data_it_refuses(make_model):
    a = make_model("mlp", {"hidden": [4]}, {"A": 2}, seed=1)
    b = make_model("mlp", {"hidden": [4]}, {"B": 2}, seed=2)
    with pytest.raises(MergeError, match="'regmean' needs the few-shot slice of every task"):
        regmean([a, b], None)


def test_a_task_without_images_is_named(make_model):
    a = make_model("mlp", {"hidden": [4]}, {"A": 2}, seed=1)
    b = make_model("mlp", {"hidden": [4]}, {"B": 2}, seed=2)
    data = task_images({"A": random_images(4), "B": random_images(0)})
    with pytest.raises(ValueError, match="'regmean': task 'B' has no images"):
        regmean([a, b], data)


def test_models_of_different_architectures_are_refused(make_model):
    a = make_model("mlp", {"hidden": [4]}, {"A": 2}, seed=1)
    b = make_model("mlp", {"hidden": [5]}, {"B": 2}, seed=2)
    with pytest.raises(MergeError, match="'regmean' needs models of one architecture"):
        regmean([a, b], two_task_data())


def test_two_models_with_one_task_are_refused(make_model):
    a = make_model("mlp", {"hidden": [4]}, {"A": 2}, seed=1)
    b = make_model("mlp", {"hidden": [4]}, {"A": 2}, seed=2)
    with pytest.raises(MergeError, match=r"models \[0, 1\] all have a head 'A'"):
        regmean([a, b], two_task_data())


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"reg_coef": 1.5}, r"reg_coef.*outside the allowed range \[0, 1\]"),
        ({"reg_coef": -0.1}, r"reg_coef.*outside the allowed range \[0, 1\]"),
        ({"align": "rebasin"}, r"'rebasin' is not one of \['none', 'permute', 'zipit'\]"),
        ({"align": "zipit", "zip_beta": 1.5}, r"zip_beta.*outside the allowed range \[0, 1\]"),
    ],
)
def test_bad_parameters_are_refused(params, message):
    with pytest.raises(ParameterError, match=message):
        build_method("regmean", params)


def test_a_singular_least_squares_is_refused_naming_the_layer(make_model):
    """reg_coef 1 with fewer images than inputs: the Gram of the 64 pixels has rank 8."""
    a = make_model("mlp", {"hidden": [4]}, {"A": 2}, seed=1)
    b = make_model("mlp", {"hidden": [4]}, {"B": 2}, seed=2)
    data = task_images({"A": random_images(4, seed=1), "B": random_images(4, seed=2)})
    with pytest.raises(MergeError, match=r"Gram matrix of layer 'body\.fc0\.linear' is singular"):
        regmean([a, b], data, reg_coef=1.0)
    merged, _ = regmean([a, b], data, reg_coef=0.7)  # the kept diagonal makes it positive definite
    assert torch.isfinite(merged.trunk.body.fc0.linear.weight).all()


def test_the_sources_are_left_unchanged(make_model):
    a = make_model("vgg", SPECS["vgg"], {"A": 2}, seed=1)
    b = make_model("vgg", SPECS["vgg"], {"B": 2}, seed=2)
    before = [copy.deepcopy(m.state_dict()) for m in (a, b)]
    regmean([a, b], two_task_data())
    for model, state in zip((a, b), before, strict=True):
        for key, value in model.state_dict().items():
            assert torch.equal(value, state[key]), key
