"""The GPU input path (fusionnet.data.device_input), run on CPU tensors: the same code as on a GPU."""

import numpy as np
import pytest
import torch

from fusionnet.data.device_input import BatchAugment, DeviceImages
from fusionnet.errors import ConfigError
from fusionnet.data.transforms import AugmentSpec


def _images(n=8, side=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, side, side), generator=g, dtype=torch.uint8)


@pytest.mark.parametrize("policy", ["default", "strong", "none"])
def test_output_shape_range_and_reproducible(policy):
    aug = BatchAugment(AugmentSpec(32, policy))
    x = _images()
    a = aug(x, torch.Generator().manual_seed(1))
    b = aug(x, torch.Generator().manual_seed(1))
    assert a.shape == (8, 3, 32, 32) and a.dtype == torch.float32
    assert a.min() >= 0 and a.max() <= 1
    assert torch.equal(a, b)  # one generator drives every draw


def test_parameters_differ_across_the_samples_of_a_batch():
    # the same image eight times: per-sample draws give eight different views (a per-batch draw would give one)
    x = _images(1).expand(8, -1, -1, -1).contiguous()
    out = BatchAugment(AugmentSpec(32, "default", erase_p=0.0))(x, torch.Generator().manual_seed(0))
    flat = out.flatten(1)
    distinct = {tuple(row.round(decimals=4).tolist()) for row in flat}
    assert len(distinct) == 8


def test_crop_of_whole_image_without_flip_or_colour_is_a_resize():
    # scale (1, 1) with aspect near 1 keeps nearly the whole image; a constant image stays constant under any crop,
    # flip and geometric op, and its colour can only be scaled: never out of [0, 1]
    x = torch.full((4, 3, 40, 40), 128, dtype=torch.uint8)
    out = BatchAugment(AugmentSpec(32, "default", erase_p=0.0, scale=(1.0, 1.0)))(x, torch.Generator().manual_seed(0))
    per_image = out.flatten(1)
    assert torch.allclose(per_image.max(1).values, per_image.min(1).values, atol=1e-5)  # each stays uniform


def test_flip_is_per_sample():
    # an image whose left half is black and right half white: a flipped sample runs bright-to-dark
    x = torch.zeros(16, 3, 32, 32, dtype=torch.uint8)
    x[..., 16:] = 255
    aug = BatchAugment(AugmentSpec(32, "default", erase_p=0.0, scale=(1.0, 1.0)))
    aug.colour = lambda t, g: t  # isolate the geometry
    out = aug(x, torch.Generator().manual_seed(3))
    left_bright = out[:, 0, 16, :4].mean(1) > 0.5
    assert 0 < int(left_bright.sum()) < 16  # some samples flipped, some not
    rows = out[:, 0, 16, :]  # dark-to-bright from left to right unless flipped
    steps = rows[:, 1:] - rows[:, :-1]
    assert (steps[~left_bright] >= -1e-5).all() and (steps[left_bright] <= 1e-5).all()


def test_erasing_sets_rectangles_to_zero_for_chosen_samples_only():
    x = torch.full((64, 3, 32, 32), 255, dtype=torch.uint8)
    aug = BatchAugment(AugmentSpec(32, "default", erase_p=0.5, scale=(1.0, 1.0)))
    aug.colour = lambda t, g: t
    out = aug(x, torch.Generator().manual_seed(0))
    erased = (out == 0).all(1).flatten(1).any(1)
    assert 10 < int(erased.sum()) < 54  # about half the samples
    share = (out == 0).all(1).flatten(1).float().mean(1)[erased]
    assert share.min() >= 0.005 and share.max() <= 0.3  # 1-3 holes of 10-30 % of each side


def test_bad_input_is_a_clear_error():
    with pytest.raises(ConfigError, match="uint8 images"):
        BatchAugment(AugmentSpec(32))(torch.rand(2, 3, 32, 32), torch.Generator())
    with pytest.raises(ValueError, match="unknown augmentation policy 'heavy'"):
        AugmentSpec(32, "heavy")


def test_device_images_decode_once_and_index_batches(tmp_path):
    from PIL import Image

    from fusionnet.data.datasets import FolderImages
    from fusionnet.data.transforms import train_transform

    for c in ("a", "b"):
        (tmp_path / c).mkdir()
        for i in range(3):
            Image.fromarray(np.full((30, 50, 3), 40 * i + (100 if c == "b" else 0), np.uint8)).save(
                tmp_path / c / f"{i}.png")
    data = FolderImages(tmp_path, train_transform(16))
    store = DeviceImages.load(data, 20, torch.device("cpu"))
    assert store.images.shape == (6, 3, 20, 20) and store.images.dtype == torch.uint8
    assert store.labels.tolist() == data.labels
    assert int(store.images[4, 0, 0, 0]) == 140  # class b, image 1: decoded exactly (a uniform image)
    x, y = store.batch(torch.tensor([4, 0]), BatchAugment(AugmentSpec(16)), torch.Generator().manual_seed(0))
    assert x.shape == (2, 3, 16, 16) and y.tolist() == [1, 0]
