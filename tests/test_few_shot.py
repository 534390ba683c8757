"""The few-shot slice of the merges that learn: its draw (nested, seeded, held-out validation) and FS-Merge's
augmentations (reflect crop, flip, one of grayscale/solarize/blur), each checked by hand or against torchvision."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image, ImageOps

from hetmerge.data.batches import _random_crop_flip
from hetmerge.data.few_shot import (
    AUGMENT_KINDS,
    CROP_PADDING,
    _blur,
    _grayscale,
    _photometric,
    _solarize,
    assemble_few_shot,
    augment_copies,
    augment_pixels,
    draw_few_shot,
    few_shot_indices,
)

MEAN, STD = (0.3,), (0.2,)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def row_pools(sizes: dict[str, int], side: int = 6) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Pools whose image j is the constant pixel (j + 1) / 256 (normalised with MEAN/STD), and labels j, so
    every drawn image and label tells which pool row it came from."""
    pools, labels = {}, {}
    for task, size in sizes.items():
        pixels = ((torch.arange(size, dtype=torch.float32) + 1) / 256).view(-1, 1, 1, 1).expand(-1, 1, side, side)
        pools[task] = (pixels - MEAN[0]) / STD[0]
        labels[task] = torch.arange(size)
    return pools, labels


@pytest.mark.parametrize("padding", [1, CROP_PADDING])
def test_reflect_crop_flip_is_a_window_of_the_reflect_padded_image(padding: int) -> None:
    batch = torch.rand(16, 2, 7, 9, generator=gen(0))
    got = _random_crop_flip(batch, padding, True, gen(1), mode="reflect")
    draws = gen(1)  # the same draws, in the order the function makes them
    offsets = torch.randint(0, 2 * padding + 1, (16, 2), generator=draws)
    flips = torch.rand(16, generator=draws) < 0.5
    padded = F.pad(batch, (padding,) * 4, mode="reflect")
    for i, ((top, left), flip) in enumerate(zip(offsets.tolist(), flips.tolist(), strict=True)):
        window = padded[i, :, top : top + 7, left : left + 9]
        assert torch.equal(got[i], window.flip(-1) if flip else window)
    assert 0 < int(flips.sum()) < 16


def test_reflect_padding_repeats_no_edge_pixel() -> None:
    row = torch.arange(6.0).view(1, 1, 1, 6).expand(1, 1, 6, 6)
    seen = {tuple(_random_crop_flip(row, 4, False, gen(s), mode="reflect")[0, 0, 0].tolist()) for s in range(60)}
    # the leftmost window of the row 0..5 reflected by 4 (no edge repeat) is 4 3 2 1 0 1
    assert (4.0, 3.0, 2.0, 1.0, 0.0, 1.0) in seen and (4.0, 5.0, 4.0, 3.0, 2.0, 1.0) in seen


def test_grayscale_by_hand() -> None:
    rgb = torch.tensor([1.0, 0.5, 0.25]).view(1, 3, 1, 1).expand(2, 3, 2, 2)
    grey = 0.2989 * 1.0 + 0.587 * 0.5 + 0.114 * 0.25
    assert torch.allclose(_grayscale(rgb), torch.full((2, 3, 2, 2), grey))
    random_rgb = torch.rand(4, 3, 5, 5, generator=gen(0))
    assert torch.allclose(_grayscale(random_rgb), TF.rgb_to_grayscale(random_rgb, num_output_channels=3), atol=1e-6)
    one_channel = torch.rand(3, 1, 5, 5, generator=gen(1))
    assert torch.equal(_grayscale(one_channel), one_channel)  # already grey
    with pytest.raises(ValueError, match="2 channels"):
        _grayscale(torch.rand(1, 2, 5, 5))


def test_solarize_by_hand_and_as_pil_does_it() -> None:
    pixels = torch.tensor([0.0, 0.2, 0.49, 0.5, 0.7, 1.0]).view(1, 1, 1, 6)
    assert torch.allclose(_solarize(pixels), torch.tensor([0.0, 0.2, 0.49, 0.5, 0.3, 0.0]).view(1, 1, 1, 6))
    assert torch.equal(_solarize(pixels), TF.solarize(pixels, 0.5))
    levels = np.arange(256, dtype=np.uint8).reshape(16, 16)
    pil = torch.from_numpy(np.array(ImageOps.solarize(Image.fromarray(levels)))).float()
    ours = _solarize(torch.from_numpy(levels).float().div(255).view(1, 1, 16, 16))[0, 0] * 255
    assert torch.allclose(ours, pil, atol=1e-4)  # the paper's PIL solarize (threshold 128) on uint8 pixels


def test_blur_by_hand_on_a_point() -> None:
    point = torch.zeros(2, 1, 5, 5)
    point[:, 0, 2, 2] = 1.0
    sigma = torch.tensor([0.5, 2.0])
    got = _blur(point, sigma)
    for i, s in enumerate(sigma.tolist()):
        w = math.exp(-0.5 / s**2)  # the 3-tap kernel is (w, 1, w) / (1 + 2w)
        expected = torch.zeros(5, 5)
        expected[1:4, 1:4] = torch.tensor([[w * w, w, w * w], [w, 1.0, w], [w * w, w, w * w]]) / (1 + 2 * w) ** 2
        assert torch.allclose(got[i, 0], expected, atol=1e-6)


def test_blur_matches_torchvision_with_each_images_own_sigma() -> None:
    images = torch.rand(4, 3, 6, 7, generator=gen(0))
    sigma = torch.tensor([0.1, 0.7, 1.3, 2.0])
    got = _blur(images, sigma)
    for i, s in enumerate(sigma.tolist()):
        assert torch.allclose(got[i], TF.gaussian_blur(images[i], [3, 3], [s, s]), atol=1e-6)


def test_each_image_gets_exactly_its_pinned_kind() -> None:
    pixels = torch.rand(5, 3, 6, 6, generator=gen(0))
    kinds = torch.tensor([AUGMENT_KINDS.index(k) for k in ("blur", "grayscale", "solarize", "grayscale", "blur")])
    sigma = torch.tensor([0.3, 1.0, 1.0, 1.0, 1.9])
    got = _photometric(pixels, kinds, sigma)
    assert torch.allclose(got[[1, 3]], _grayscale(pixels[[1, 3]]))
    assert torch.equal(got[2], _solarize(pixels[2:3])[0])
    assert torch.allclose(got[[0, 4]], _blur(pixels[[0, 4]], sigma[[0, 4]]))


def test_augment_pixels_is_crop_flip_then_the_drawn_kind() -> None:
    pixels = torch.rand(12, 3, 8, 8, generator=gen(0))
    draws = gen(3)
    cropped = _random_crop_flip(pixels, CROP_PADDING, True, draws, mode="reflect")
    kinds = torch.randint(3, (12,), generator=draws)
    sigma = 0.1 + 1.9 * torch.rand(12, generator=draws)
    assert set(kinds.tolist()) == {0, 1, 2}
    assert torch.equal(augment_pixels(pixels, gen(3)), _photometric(cropped, kinds, sigma))


@settings(max_examples=25, deadline=None)
@given(channels=st.sampled_from([1, 3]), n=st.integers(1, 12), seed=st.integers(0, 2**31), extreme=st.booleans())
def test_augmented_pixels_stay_in_unit_range(channels: int, n: int, seed: int, extreme: bool) -> None:
    pixels = torch.rand(n, channels, 6, 6, generator=gen(seed))
    if extreme:  # only black and white: solarize and blur are at their bounds
        pixels = pixels.round()
    out = augment_pixels(pixels, gen(seed + 1))
    assert out.shape == pixels.shape and float(out.min()) >= 0.0 and float(out.max()) <= 1.0


def test_augment_copies_is_copy_major_and_undoes_the_normalisation() -> None:
    # grey constant images below the solarize threshold: crop, flip and blur leave them as they are, grayscale
    # up to its weights' sum 0.9999
    values = torch.tensor([0.1, 0.25, 0.4])
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.3, 0.25)
    mean_t, std_t = torch.tensor(mean).view(3, 1, 1), torch.tensor(std).view(3, 1, 1)
    images = (values.view(3, 1, 1, 1).expand(3, 3, 6, 6) - mean_t) / std_t
    out = augment_copies(images, 4, gen(0), mean, std)
    assert out.shape == (12, 3, 6, 6)
    assert torch.allclose(out, images.repeat(4, 1, 1, 1), atol=1e-3)  # row k*3 + i is copy k of image i
    assert augment_copies(images, 0, gen(0), mean, std).shape == (0, 3, 6, 6)


def test_augment_copies_is_seeded() -> None:
    images = (torch.rand(6, 1, 8, 8, generator=gen(0)) - MEAN[0]) / STD[0]
    first = augment_copies(images, 3, gen(5), MEAN, STD)
    assert torch.equal(first, augment_copies(images, 3, gen(5), MEAN, STD))
    assert not torch.equal(first, augment_copies(images, 3, gen(6), MEAN, STD))
    assert not torch.equal(first[:6], first[6:12])  # the copies of one image differ


def test_augment_copies_errors() -> None:
    images = torch.zeros(2, 1, 6, 6)
    with pytest.raises(ValueError, match="outside"):
        augment_copies(images + 10, 1, gen(0), MEAN, STD)  # not normalised with these mean/std
    with pytest.raises(ValueError, match="copies"):
        augment_copies(images, -1, gen(0), MEAN, STD)
    with pytest.raises(ValueError, match="3 values for 1 channels"):
        augment_copies(images, 1, gen(0), (0.5,) * 3, (0.2,) * 3)
    with pytest.raises(ValueError, match="larger"):
        augment_copies(torch.zeros(2, 1, 4, 6), 1, gen(0), (0.0,), (1.0,))
    with pytest.raises(ValueError, match="2 channels"):
        augment_copies(torch.zeros(2, 2, 6, 6), 1, gen(0), (0.0,) * 2, (1.0,) * 2)
    with pytest.raises(ValueError, match="float"):
        augment_copies(torch.zeros(2, 1, 6, 6, dtype=torch.uint8), 1, gen(0), MEAN, STD)


def test_draw_few_shot_layout() -> None:
    pools, labels = row_pools({"b": 20, "a": 30})
    fs = draw_few_shot(pools, 3, 2, 4, gen(0), MEAN, STD, labels)
    assert (fs.originals, fs.aug_factor, fs.train.names, fs.val.names) == (3, 2, ("b", "a"), ("b", "a"))
    assert fs.train.images.shape == (18, 1, 6, 6) and fs.val.images.shape == (8, 1, 6, 6)
    assert fs.train.tasks.tolist() == [0, 0, 0, 1, 1, 1] * 3 and fs.val.tasks.tolist() == [0] * 4 + [1] * 4
    assert fs.train.labels is not None and fs.val.labels is not None
    assert torch.equal(fs.train.labels[6:], fs.train.labels[:6].repeat(2))
    # every image is the pool row its label names; the augmented copies too, since constant images below the
    # solarize threshold survive every augmentation unchanged
    for which in (fs.train, fs.val):
        for t, task in enumerate(which.names):
            assert torch.allclose(which.of(task), pools[task][which.labels[which.tasks == t]], atol=1e-5)


def test_draw_is_seeded_nested_and_keeps_validation_fixed() -> None:
    pools, labels = row_pools({"a": 40, "b": 25})
    small = draw_few_shot(pools, 4, 1, 5, gen(7), MEAN, STD, labels)
    again = draw_few_shot(pools, 4, 1, 5, gen(7), MEAN, STD, labels)
    assert torch.equal(small.train.images, again.train.images) and torch.equal(small.val.images, again.val.images)
    other = draw_few_shot(pools, 4, 1, 5, gen(8), MEAN, STD, labels)
    assert not torch.equal(small.train.labels, other.train.labels)
    large = draw_few_shot(pools, 20, 1, 5, gen(7), MEAN, STD, labels)
    assert small.train.labels is not None and large.train.labels is not None
    for t in range(2):
        small_rows = small.train.labels[:8][small.train.tasks[:8] == t]
        large_rows = large.train.labels[:40][large.train.tasks[:40] == t]
        assert torch.equal(large_rows[:4], small_rows)  # the 4 are the first 4 of the 20
        assert not set(large_rows.tolist()) & set(large.val.labels[large.val.tasks == t].tolist())
    assert torch.equal(small.val.images, large.val.images) and torch.equal(small.val.labels, large.val.labels)


def test_draw_equals_indices_then_assemble() -> None:
    pools, labels = row_pools({"a": 15, "b": 12})
    drawn = draw_few_shot(pools, 3, 2, 2, gen(4), MEAN, STD, labels)
    draws = gen(4)
    rows = few_shot_indices({"a": 15, "b": 12}, 3, 2, draws)
    built = assemble_few_shot(
        {t: pools[t][rows[t][0]] for t in pools},
        {t: pools[t][rows[t][1]] for t in pools},
        2,
        draws,
        MEAN,
        STD,
        {t: labels[t][rows[t][0]] for t in pools},
        {t: labels[t][rows[t][1]] for t in pools},
    )
    assert torch.equal(drawn.train.images, built.train.images) and torch.equal(drawn.val.labels, built.val.labels)


@settings(max_examples=40, deadline=None)
@given(
    sizes=st.lists(st.integers(2, 60), min_size=1, max_size=3),
    originals=st.integers(1, 30),
    val=st.integers(1, 30),
    seed=st.integers(0, 2**31),
)
def test_indices_are_disjoint_nested_and_in_range(sizes: list[int], originals: int, val: int, seed: int) -> None:
    pool_sizes = {f"t{i}": max(size, originals + val) for i, size in enumerate(sizes)}
    rows = few_shot_indices(pool_sizes, originals, val, gen(seed))
    fewer = few_shot_indices(pool_sizes, max(originals // 2, 1), val, gen(seed))
    assert list(rows) == list(pool_sizes)
    for task, (train, held_out) in rows.items():
        assert len(train) == originals and len(held_out) == val
        assert len(set(train) | set(held_out)) == originals + val
        assert all(0 <= r < pool_sizes[task] for r in train + held_out)
        assert fewer[task][0] == train[: len(fewer[task][0])] and fewer[task][1] == held_out


@pytest.mark.parametrize(
    ("sizes", "kwargs", "match"),
    [
        ({"a": 10, "b": 6}, {}, "task 'b' has 6 images"),
        ({"a": 10}, {"originals": 0}, "originals"),
        ({"a": 10}, {"aug_factor": -1}, "aug_factor"),
        ({"a": 10}, {"val_per_task": 0}, "val_per_task"),
        ({}, {}, "at least one task"),
    ],
)
def test_draw_errors(sizes: dict[str, int], kwargs: dict[str, int], match: str) -> None:
    pools, _ = row_pools(sizes)
    args = {"originals": 4, "aug_factor": 1, "val_per_task": 3} | kwargs
    with pytest.raises(ValueError, match=match):
        draw_few_shot(pools, generator=gen(0), mean=MEAN, std=STD, **args)


def test_label_and_shape_errors() -> None:
    pools, labels = row_pools({"a": 10, "b": 10})
    with pytest.raises(ValueError, match="task 'b': 10 pool images but labels of shape"):
        draw_few_shot(pools, 2, 1, 2, gen(0), MEAN, STD, {"a": labels["a"], "b": labels["b"][:5]})
    with pytest.raises(ValueError, match="labels are for tasks"):
        draw_few_shot(pools, 2, 1, 2, gen(0), MEAN, STD, {"a": labels["a"]})
    with pytest.raises(ValueError, match="differ in shape"):
        draw_few_shot({"a": pools["a"], "b": pools["b"][:, :, :5]}, 2, 1, 2, gen(0), MEAN, STD)
    with pytest.raises(ValueError, match="same number"):
        assemble_few_shot({"a": pools["a"][:2], "b": pools["b"][:3]}, pools, 1, gen(0), MEAN, STD)
    with pytest.raises(ValueError, match="no validation images"):
        assemble_few_shot(pools, {"a": pools["a"], "b": pools["b"][:0]}, 1, gen(0), MEAN, STD)
