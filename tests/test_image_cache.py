import pickle

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

import fusionnet.data.splits as data_module
from fusionnet.data.splits import eval_view, load_splits, read_rgb
from fusionnet.errors import DataError
from fusionnet.engine.feature_cache import cache_key
from fusionnet.data.image_cache import ImageStore, shrink, train_side
from toydata import make_splits


def _photos(root, n=4):
    """root/{train,test}/<class>/ with large JPEGs (wider than tall) and small PNGs."""
    rng = np.random.default_rng(0)
    for split, count in (("train", n), ("test", 2)):
        for c, name in enumerate(("a", "b")):
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                big = rng.integers(0, 255, size=(150, 200, 3), dtype=np.uint8)
                big[..., c] = 255
                Image.fromarray(big).save(root / split / name / f"{i}.jpg", quality=90)
                small = rng.integers(0, 255, size=(20, 24, 3), dtype=np.uint8)
                Image.fromarray(small).save(root / split / name / f"s{i}.png")
    return root


def _no_decoding(monkeypatch):
    def refuse(path):
        raise AssertionError(f"decoded {path} although it is in the image cache")

    monkeypatch.setattr(data_module, "read_rgb", refuse)


def test_eval_images_from_the_cache_equal_the_files_and_train_images_are_stored_at_twice_the_size(tmp_path,
                                                                                                monkeypatch):
    root = _photos(tmp_path / "data")
    plain = load_splits(root, size=32, val_fraction=0.25)
    cached = load_splits(root, size=32, val_fraction=0.25, image_cache=tmp_path / "images", progress=False)
    expected = {split: [getattr(plain, split)[i][0] for i in range(len(getattr(plain, split)))]
                for split in ("val", "test")}
    expected_train_view = [eval_view(plain.train, plain.val)[i][0] for i in range(len(plain.train))]
    _no_decoding(monkeypatch)  # from here on, every image comes out of the store
    for split, tensors in expected.items():
        got = [getattr(cached, split)[i][0] for i in range(len(tensors))]
        assert all(torch.equal(a, b) for a, b in zip(got, tensors)), split
    view = eval_view(cached.train, cached.val)  # the training images through the val pipeline: exact too
    assert all(torch.equal(view[i][0], t) for i, t in enumerate(expected_train_view))
    stored = {path: cached.train.store.get(path) for path in cached.train.paths}
    monkeypatch.undo()
    for path, image in stored.items():  # short side at most 2 x 32 (area-averaged), never enlarged, aspect kept
        if path.endswith(".jpg"):
            assert image.shape == (train_side(32), round(200 * train_side(32) / 150), 3)
            assert np.array_equal(image, shrink(read_rgb(path), train_side(32), "area"))
        else:
            assert np.array_equal(image, read_rgb(path))
    x, _ = cached.train[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32


def test_a_second_run_reuses_the_store_and_a_changed_file_rebuilds_it(tmp_path):
    root = _photos(tmp_path / "data", n=2)
    paths = sorted(str(p) for p in (root / "train").rglob("*.*"))
    first = ImageStore(tmp_path / "images", paths, 64, progress=False)
    again = ImageStore(tmp_path / "images", paths, 64, progress=False)
    assert first.built and not again.built and len(again) == len(paths)
    other_side = ImageStore(tmp_path / "images", paths, 48, progress=False)
    assert other_side.built and other_side.data_path != first.data_path
    Image.fromarray(np.zeros((150, 200, 3), np.uint8)).save(paths[0])  # new content, size and mtime
    changed = ImageStore(tmp_path / "images", paths, 64, progress=False)
    assert changed.built and changed.data_path != first.data_path
    assert changed.get(paths[0]).max() == 0 and first.get(paths[0]).max() > 0


def test_small_files_decode_in_process_large_ones_in_workers_with_the_same_store(tmp_path, monkeypatch):
    import fusionnet.data.image_cache as image_cache

    root = _photos(tmp_path / "data", n=3)
    paths = sorted(str(p) for p in (root / "train").rglob("*.*"))
    started = []
    real_loader = image_cache.DataLoader
    monkeypatch.setattr(image_cache, "DataLoader", lambda *a, **k: started.append(k) or real_loader(*a, **k))
    here = ImageStore(tmp_path / "here", paths, 64, workers=2, progress=False)  # 12 small files: no workers
    assert here.built and not started
    monkeypatch.setattr(image_cache, "PROBE", 2)
    monkeypatch.setattr(image_cache, "WORKERS_WORTH_S", 0.0)  # as if the files were large: the rest in workers
    there = ImageStore(tmp_path / "there", paths, 64, workers=2, progress=False)
    assert started and started[0]["num_workers"] == 2
    assert there.data_path.read_bytes() == here.data_path.read_bytes()
    assert there.index_path.read_text() == here.index_path.read_text()
    bad = paths[:3] + [str(tmp_path / "junk.jpg")]
    (tmp_path / "junk.jpg").write_bytes(b"not an image")
    with pytest.raises(DataError, match=r"cannot decode .*junk.jpg"):  # a worker's error, named as in-process
        ImageStore(tmp_path / "bad", bad, 64, workers=2, progress=False)


def test_a_damaged_store_is_rebuilt_not_trusted(tmp_path):
    root = _photos(tmp_path / "data", n=2)
    paths = sorted(str(p) for p in (root / "train").rglob("*.*"))
    store = ImageStore(tmp_path / "images", paths, 64, progress=False)
    good = store.get(paths[-1]).copy()
    blob = store.data_path.read_bytes()
    store.data_path.write_bytes(blob[: len(blob) // 2])  # e.g. a crash or a full disk while copying the cache
    rebuilt = ImageStore(tmp_path / "images", paths, 64, progress=False)
    assert rebuilt.built and np.array_equal(rebuilt.get(paths[-1]), good)
    store.index_path.write_text("{not json")
    assert ImageStore(tmp_path / "images", paths, 64, progress=False).built


def test_store_errors_name_the_value(tmp_path):
    root = _photos(tmp_path / "data", n=1)
    paths = sorted(str(p) for p in (root / "train").rglob("*.jpg"))
    with pytest.raises(ValueError, match=r"interpolation 'cubic'.*linear, area"):
        ImageStore(tmp_path / "images", paths, 64, interpolation="cubic")
    with pytest.raises(ValueError, match=r"short_side must be a positive int, got 0"):
        ImageStore(tmp_path / "images", paths, 0)
    with pytest.raises(DataError, match="same file twice"):
        ImageStore(tmp_path / "images", paths + paths[:1], 64)
    (tmp_path / "junk.jpg").write_bytes(b"not an image")
    with pytest.raises(DataError, match=r"cannot decode .*junk.jpg"):
        ImageStore(tmp_path / "images", [str(tmp_path / "junk.jpg")], 64, workers=0, progress=False)
    assert not list((tmp_path / "images").glob("*.u8")), "a failed build leaves no store behind"
    (tmp_path / "a file").write_text("")  # a folder that cannot be made: the error names it and the way out
    with pytest.raises(DataError, match=r"cannot write the image cache in .*a file/sub.*give a writable folder"):
        ImageStore(tmp_path / "a file" / "sub", paths, 64, workers=0, progress=False)


def test_the_store_serves_loader_workers_and_keys_the_feature_cache(tmp_path):
    root = make_splits(tmp_path / "data", per_class=6)
    cached = load_splits(root, size=16, image_cache=tmp_path / "images", progress=False)
    plain = load_splits(root, size=16)
    cached.val[0]  # opens the memory map in this process; a worker gets its own
    assert pickle.loads(pickle.dumps(cached.val.store)).get(cached.val.paths[0]) is not None
    batches = list(DataLoader(cached.val, batch_size=4, num_workers=2))
    reference = list(DataLoader(plain.val, batch_size=4))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, reference))
    model = torch.nn.Conv2d(3, 1, 1)
    assert cache_key(model, cached.val) != cache_key(model, plain.val)  # features record where images came from
