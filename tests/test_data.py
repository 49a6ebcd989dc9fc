
import numpy as np
import pytest
import torch
from PIL import Image

from fusionnet.data.splits import (CsvImages, DataError, FolderImages, balanced_sampler, class_weights, eval_transform,
                            load_splits, read_rgb, train_transform)
from toydata import make_folder, make_splits


def test_images_decode_to_rgb_whatever_their_mode(tmp_path):
    arr = (np.random.default_rng(0).random((8, 8)) * 255).astype(np.uint8)
    Image.fromarray(arr, "L").save(tmp_path / "gray.png")
    Image.fromarray(np.dstack([arr] * 3 + [arr]), "RGBA").save(tmp_path / "rgba.png")
    Image.fromarray(np.dstack([arr] * 3)).convert("P").save(tmp_path / "palette.png")
    Image.fromarray(np.dstack([arr] * 3)).convert("CMYK").save(tmp_path / "cmyk.jpg")
    for name in ["gray.png", "rgba.png", "palette.png", "cmyk.jpg"]:
        out = read_rgb(tmp_path / name)
        assert out.shape == (8, 8, 3) and out.dtype == np.uint8, name
    assert (read_rgb(tmp_path / "gray.png")[..., 0] == arr).all()


def test_a_photo_with_an_exif_orientation_decodes_upright(tmp_path):
    pixels = np.zeros((30, 60, 3), np.uint8)
    pixels[:, :30] = 255  # the left half white, as stored
    img = Image.fromarray(pixels)
    exif = img.getexif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display", as phones write portrait photos
    img.save(tmp_path / "portrait.jpg", exif=exif, quality=95)
    out = read_rgb(tmp_path / "portrait.jpg")
    assert out.shape == (60, 30, 3)  # upright: taller than wide
    assert out[:25].mean() > 200 and out[-25:].mean() < 50  # the stored left half is now on top


def test_pipelines_produce_unit_range_tensors_of_the_asked_size(tmp_path):
    img = (np.random.default_rng(0).random((50, 70, 3)) * 255).astype(np.uint8)
    for tf in [train_transform(32), train_transform(32, policy="strong"), eval_transform(32),
               eval_transform(32, crop_pct=0.875)]:
        x = tf(image=img)["image"]
        assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    with pytest.raises(ValueError, match="unknown augmentation policy 'heavy'"):
        train_transform(32, policy="heavy")


def test_folder_dataset_and_stratified_seeded_split(tmp_path):
    make_splits(tmp_path, per_class=20)
    splits = load_splits(tmp_path, size=32, val_fraction=0.25, seed=3)
    assert splits.class_names == ["a", "b", "c"]
    assert splits.val.counts() == {"a": 5, "b": 5, "c": 5} and len(splits.train) == 45
    assert not set(splits.train.paths) & set(splits.val.paths)
    again = load_splits(tmp_path, size=32, val_fraction=0.25, seed=3)
    assert again.val.paths == splits.val.paths
    x, y = splits.test[0]
    assert x.shape == (3, 32, 32) and y == 0


def test_val_folder_is_used_when_present(tmp_path):
    make_splits(tmp_path, per_class=6)
    make_folder(tmp_path / "val", {"a": 2, "b": 2, "c": 2}, seed=5)
    splits = load_splits(tmp_path, size=32)
    assert len(splits.train) == 18 and len(splits.val) == 6


def test_missing_root_shows_the_quoted_path_and_the_stray_space(tmp_path):
    (tmp_path / "data" / "train").mkdir(parents=True)
    bad = str(tmp_path / "data" / " train")
    with pytest.raises(FileNotFoundError) as err:
        FolderImages(bad)
    assert repr(bad) in str(err.value) and "' train' have leading/trailing spaces" in str(err.value)


def test_empty_class_folder_is_named(tmp_path):
    make_folder(tmp_path, {"cat": 2})
    (tmp_path / "dog").mkdir()
    with pytest.raises(DataError, match=r"class folder\(s\) with no images in .*: 'dog'"):
        FolderImages(tmp_path)


@pytest.mark.parametrize("size", [0, -3, 32.5, True])
def test_a_bad_image_size_is_named(tmp_path, size):
    with pytest.raises(ValueError, match=rf"size must be a whole number of pixels >= 1, got {size!r}"):
        load_splits(make_splits(tmp_path, per_class=4), size=size)


def test_train_and_test_with_different_classes_are_refused(tmp_path):
    make_folder(tmp_path / "train", {"a": 2, "b": 2, "c": 2})
    make_folder(tmp_path / "test", {"a": 2, "b": 2, "d": 2})
    with pytest.raises(DataError, match=r"differ from the train classes: missing \['c'\], extra \['d'\]"):
        load_splits(tmp_path, size=32)


def test_corrupt_and_truncated_files_are_skipped_and_counted_or_fail_when_strict(tmp_path):
    make_folder(tmp_path, {"a": 3, "b": 3}, ext="jpg")
    (tmp_path / "a" / "junk.jpg").write_bytes(b"not an image")
    good = (tmp_path / "b" / "000.jpg").read_bytes()
    (tmp_path / "b" / "cut.jpg").write_bytes(good[: len(good) // 2])
    with pytest.warns(UserWarning, match=r"skipped 2 unreadable image\(s\)"):
        ds = FolderImages(tmp_path)
    assert len(ds) == 6 and sorted(s.path.rsplit("/", 1)[1] for s in ds.skipped) == ["cut.jpg", "junk.jpg"]
    with pytest.raises(DataError, match=r"2 unreadable image\(s\): .*junk.jpg.*cut.jpg.*strict=False"):
        FolderImages(tmp_path, strict=True)


def test_csv_dataset_and_its_errors(tmp_path):
    make_folder(tmp_path / "imgs", {"a": 2, "b": 2})
    (tmp_path / "ok.csv").write_text("path,label\nimgs/a/000.png,a\nimgs/b/001.png,b\n")
    ds = CsvImages(tmp_path / "ok.csv")
    assert ds.class_names == ["a", "b"] and ds.labels == [0, 1] and ds[1][0].shape == (3, 32, 32)
    (tmp_path / "unknown.csv").write_text("path,label\nimgs/a/000.png,zebra\n")
    with pytest.raises(DataError, match=r"labels not in class_names: \['zebra'\]"):
        CsvImages(tmp_path / "unknown.csv", class_names=["a", "b"])
    (tmp_path / "missing.csv").write_text("path,label\nimgs/a/999.png,a\n")
    with pytest.raises(DataError, match=r"lists 1 file\(s\) that do not exist, e.g. '.*imgs/a/999.png'"):
        CsvImages(tmp_path / "missing.csv")
    (tmp_path / "header.csv").write_text("file,class\nimgs/a/000.png,a\n")
    with pytest.raises(DataError, match="needs a header with columns 'path' and 'label'"):
        CsvImages(tmp_path / "header.csv")


def test_class_weights_and_sampler_balance_a_skewed_set():
    labels = [0] * 90 + [1] * 10
    w = class_weights(labels, 2)
    torch.testing.assert_close(w, torch.tensor([100 / 180, 100 / 20]))
    assert float((w[torch.tensor(labels)]).mean()) == pytest.approx(1.0)
    sampler = balanced_sampler(labels, num_samples=4000, generator=torch.Generator().manual_seed(0))
    drawn = torch.tensor(labels)[torch.tensor(list(sampler))]
    assert abs(float((drawn == 1).float().mean()) - 0.5) < 0.04
    with pytest.raises(DataError, match=r"class index\(es\) \[2\] have no samples"):
        class_weights(labels, 3)


def test_too_small_validation_split_is_explained(tmp_path):
    make_folder(tmp_path / "train", {"a": 2, "b": 2, "c": 2})
    with pytest.raises(DataError, match=r"val_fraction=0.15 of 6 images leaves 1 for validation .* fewer than the 3"):
        load_splits(tmp_path, size=32)


def test_any_torch_dataset_is_seen_through_the_dataset_protocol():
    """as_dataset: the library's datasets as they are; a plain torch Dataset wrapped, with what it commonly
    exposes (labels/targets, class_names/classes, paths/samples) read in that one place, the rest unknown."""
    import pytest
    from torch.utils.data import TensorDataset

    from fusionnet.data.datasets import LabelledData, as_dataset
    from fusionnet.data.splits import eval_view
    from fusionnet.errors import ConfigError

    bare = as_dataset(TensorDataset(torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 0, 1])))
    assert isinstance(bare, LabelledData) and len(bare) == 4
    assert bare.labels is None and bare.class_names is None and bare.paths is None and bare.transform is None

    class TorchvisionLike(TensorDataset):
        classes = ["cat", "dog"]
        targets = [0, 1, 1]
        samples = [("a.jpg", 0), ("b.jpg", 1), ("c.jpg", 1)]

    seen = as_dataset(TorchvisionLike(torch.rand(3, 3, 8, 8), torch.tensor([0, 1, 1])))
    assert seen.labels == [0, 1, 1] and seen.class_names == ["cat", "dog"] and seen.paths == ["a.jpg", "b.jpg", "c.jpg"]
    assert as_dataset(seen) is seen
    with pytest.raises(ConfigError, match="cannot be given another pipeline"):
        eval_view(bare, bare)  # a plain dataset's pipeline is its own
    with pytest.raises(ConfigError, match="expected a torch Dataset"):
        as_dataset(42)
