"""Labelled images from a table (CSV, TSV, Parquet, a DataFrame) read as the folder tree holding the same files:
the same splits, the same comparison; everything wrong with a table refused before anything is written."""

import csv
import json
import random

import pytest

from fusionnet import DataError, load_splits
from toydata import make_splits


def _rows(data):
    """(path relative to data's parent, label, split) of every image of a train/test folder tree."""
    rows = []
    for split in ("train", "test"):
        for f in sorted((data / split).rglob("*.png")):
            rows.append((str(f.relative_to(data.parent)), f.parent.name, split))
    return rows


def _write_csv(path, rows, header=("path", "label", "split"), delimiter=","):
    with open(path, "w", newline="") as f:
        w = csv.writer(f, delimiter=delimiter)
        w.writerow(header)
        w.writerows(rows)
    return path


def _samples(splits):
    return {name: list(zip(part.paths, part.labels)) for name, part in
            (("train", splits.train), ("val", splits.val), ("test", splits.test))}


def test_a_table_in_any_form_gives_the_folders_splits(tmp_path):
    import pandas as pd

    data = make_splits(tmp_path / "data", per_class=9)
    rows = _rows(data)
    random.Random(0).shuffle(rows)  # row order must not matter
    rows = [(("./" + p) if i % 3 == 0 else p, y, s) for i, (p, y, s) in enumerate(rows)]  # nor path spelling
    csv_file = _write_csv(tmp_path / "labels.csv", rows)
    tsv_file = _write_csv(tmp_path / "labels.tsv", rows, delimiter="\t")
    frame = pd.DataFrame(rows, columns=["image", "label", "split"])
    frame.to_parquet(tmp_path / "labels.parquet")
    folder = _samples(load_splits(data, size=32, seed=3))
    for source in (csv_file, tsv_file, tmp_path / "labels.parquet"):
        assert _samples(load_splits(source, size=32, seed=3)) == folder, source
    with pytest.MonkeyPatch.context() as mp:  # a DataFrame's relative paths start at the working directory
        mp.chdir(tmp_path)
        assert _samples(load_splits(frame, size=32, seed=3)) == folder


def test_a_table_and_its_folder_give_the_same_comparison(tmp_path):
    data = make_splits(tmp_path / "data", per_class=10)
    rows = _rows(data)
    random.Random(1).shuffle(rows)
    table = _write_csv(tmp_path / "labels.csv", rows)
    assert _table_of(data, tmp_path / "folder") == _table_of(table, tmp_path / "table")


def _table_of(source, out) -> dict:
    """A tiny comparison's rows (acc, NLL to four decimals) on ``source``."""
    from fusionnet import CompareConfig, compare
    from fusionnet.config import regime_train_config

    cfg = CompareConfig(data=str(source), backbones=["timm/test_resnet", "timm/test_efficientnet"], size=32,
                        pretrained=False, variants=["concat"], out=str(out),
                        train=regime_train_config("frozen", epochs=1, batch_size=8, progress=False))
    return {k: (round(r["acc"], 4), round(r["nll"], 4)) for k, r in compare(cfg, log=None)["methods"].items()}


@pytest.mark.parametrize("rows, header, message", [
    ([], ("path", "label"), "has no rows"),
    ([("train/a/000.png", "a")], ("file", "label"),
     r"no image path column 'path' or 'image'; its columns are \['file', 'label'\]"),
    ([("train/a/000.png", "a", "holdout")], ("path", "label", "split"),
     "unknown split 'holdout'; use train, val or test"),
    ([("train/a/000.png", "a", "train"), ("train/b/000.png", "b", "")], ("path", "label", "split"),
     "row 2: an empty split; use train, val or test"),
    ([("train/a/000.png", "a"), ("nope/1.png", "a"), ("nope/2.png", "b")], ("path", "label"),
     r"lists 2 file\(s\) that do not exist, e.g. 'nope/1.png', 'nope/2.png'"),
    ([("train/a/000.png", "a"), ("train/a/000.png", "b")], ("path", "label"), "twice with different labels"),
    ([("train/a/000.png", "a", "train"), ("train/b/000.png", "b", "test")], ("path", "label", "split"),
     r"class\(es\) \['b'\] have no training rows"),
])
def test_a_bad_table_is_refused_naming_what_is_wrong(tmp_path, rows, header, message):
    make_splits(tmp_path / "data", per_class=2, test=False)
    table = _write_csv(tmp_path / "data" / "bad.csv", rows, header=header)
    with pytest.raises(DataError, match=message):
        load_splits(table, size=32)


def test_repeated_rows_are_used_once_with_a_warning(tmp_path):
    data = make_splits(tmp_path / "data", per_class=6, test=False)
    rows = [(p, y) for p, y, _ in _rows(data)]
    table = _write_csv(tmp_path / "labels.csv", rows + rows[:2], header=("path", "label"))
    with pytest.warns(UserWarning, match=r"repeats 2 row\(s\)"):
        splits = load_splits(table, size=32)
    assert len(splits.train) + len(splits.val) == len(rows)


def test_commands_take_a_table_and_refuse_a_bad_one_before_writing(tmp_path, capsys):
    from fusionnet.cli.main import main

    data = make_splits(tmp_path / "data", per_class=6)
    table = _write_csv(tmp_path / "labels.csv", _rows(data))
    assert main(["train", "--data", str(table), "--backbones", "timm/test_resnet", "--no-pretrained", "--size", "32",
                 "--epochs", "1", "--no-progress", "--out", str(tmp_path / "run")]) == 0
    assert json.loads((tmp_path / "run" / "history.json").read_text())
    bad = _write_csv(tmp_path / "bad.csv", [("gone.png", "a")], header=("path", "label"))
    assert main(["train", "--data", str(bad), "--backbones", "timm/test_resnet", "--out", str(tmp_path / "x")]) == 2
    assert "do not exist" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_other_column_names_are_given_by_flag_or_keyword(tmp_path, capsys):
    from fusionnet.cli.main import main

    data = make_splits(tmp_path / "data", per_class=6)
    table = _write_csv(tmp_path / "kinds.csv", _rows(data), header=("file", "kind", "split"))
    splits = load_splits(table, size=32, image_column="file", label_column="kind")
    assert splits.class_names == ["a", "b", "c"] and len(splits.test) == 6
    run = ["compare", "--data", str(table), "--backbones", "timm/test_resnet", "timm/test_efficientnet",
           "--no-pretrained", "--size", "32", "--epochs", "1", "--no-progress", "--variants", "concat"]
    assert main([*run, "--out", str(tmp_path / "bad")]) == 2
    assert "no image path column 'path' or 'image'" in capsys.readouterr().err and not (tmp_path / "bad").exists()
    assert main([*run, "--image-column", "file", "--label-column", "kind", "--out", str(tmp_path / "run")]) == 0
    assert (tmp_path / "run" / "results.md").is_file()


def _saved_hf_dataset(data, out):
    """The folder tree's images as a Hugging Face DatasetDict (Image and ClassLabel features), saved to disk."""
    import datasets

    names = sorted(p.name for p in (data / "train").iterdir())
    parts = {}
    for split in ("train", "test"):
        files = sorted((data / split).rglob("*.png"))
        random.Random(7).shuffle(files)  # the rows' order must not matter
        parts[split] = datasets.Dataset.from_dict(
            {"img": [str(f) for f in files], "digit": [names.index(f.parent.name) for f in files]},
            features=datasets.Features({"img": datasets.Image(), "digit": datasets.ClassLabel(names=names)}))
    datasets.DatasetDict(parts).save_to_disk(str(out))
    return out


def test_a_saved_hugging_face_dataset_gives_the_folders_splits_and_comparison(tmp_path, monkeypatch):
    import numpy as np

    from fusionnet.utils.images import read_rgb

    monkeypatch.setenv("FUSIONNET_CACHE", str(tmp_path / "cache"))
    data = make_splits(tmp_path / "data", per_class=10)
    saved = _saved_hf_dataset(data, tmp_path / "hf")
    a, b = load_splits(data, size=32, seed=2), load_splits(saved, size=32, seed=2)  # columns found from features
    assert a.class_names == b.class_names
    for part in ("train", "val", "test"):
        pa, pb = getattr(a, part), getattr(b, part)
        assert pa.labels == pb.labels
        assert all(np.array_equal(read_rgb(x), read_rgb(y)) for x, y in zip(pa.paths, pb.paths))
    assert _table_of(data, tmp_path / "folder") == _table_of(saved, tmp_path / "hf")


def test_a_hub_dataset_offline_and_not_cached_is_one_line(tmp_path, monkeypatch, capsys):
    from fusionnet.cli.main import main

    import datasets.config
    import huggingface_hub.constants

    for module, names in ((datasets.config, ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")),
                          (huggingface_hub.constants, ("HF_HUB_OFFLINE",))):
        for name in names:  # set from the environment by the load below; restored for the tests after this one
            monkeypatch.setattr(module, name, getattr(module, name))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    with pytest.raises(DataError, match="offline and not in the cache"):
        load_splits("hf:nobody/no-such-dataset", size=32)
    assert main(["train", "--data", "hf:nobody/no-such-dataset", "--backbones", "timm/test_resnet",
                 "--out", str(tmp_path / "run")]) == 2
    assert "offline and not in the cache" in capsys.readouterr().err and not (tmp_path / "run").exists()


def test_gap_takes_two_splits_of_one_table_as_it_takes_two_folders(tmp_path, capsys):
    from fusionnet.cli.main import main
    from fusionnet.workflows.gap import GapSettings, gap_check

    data = make_splits(tmp_path / "data", per_class=8)
    table = _write_csv(tmp_path / "labels.csv", _rows(data))
    how = GapSettings(backbone="timm/test_resnet", pretrained=False, size=32)
    folders = gap_check(data / "train", data / "test", how)
    splits = gap_check(f"{table}#train", f"{table}#test", how)
    assert splits["domain_auc"] == folders["domain_auc"] and splits["stats"] == folders["stats"]
    assert main(["gap", "--train", f"{table}#train", "--test", f"{table}#holdout", "--out", str(tmp_path / "g")]) == 2
    assert "unknown split 'holdout'" in capsys.readouterr().err and not (tmp_path / "g").exists()


def test_every_command_that_reads_labelled_data_takes_a_table_and_a_saved_dataset(tmp_path, monkeypatch, capsys):
    """train, fuse, predict --data, distill and auto on a CSV and a saved Hugging Face dataset of the same images
    (compare and gap: the tests above); a model trained from the table is refused on a split of the folder that
    holds its training images, as it would be on the table's."""
    from fusionnet.cli.main import main

    monkeypatch.setenv("FUSIONNET_CACHE", str(tmp_path / "cache"))
    data = make_splits(tmp_path / "data", per_class=8)
    table = str(_write_csv(tmp_path / "labels.csv", _rows(data)))
    saved = str(_saved_hf_dataset(data, tmp_path / "hf"))
    tiny = ["--size", "32", "--epochs", "1", "--no-progress", "--no-pretrained"]
    for i, backbone in enumerate(("timm/test_resnet", "timm/test_efficientnet")):
        assert main(["train", "--data", table, "--backbones", backbone, *tiny, "--out", str(tmp_path / f"m{i}")]) == 0
    members = [str(tmp_path / f"m{i}" / "best.pth") for i in range(2)]
    assert main(["fuse", "--members", *members, "--data", saved, "--size", "32", "--epochs", "1", "--no-progress",
                 "--out", str(tmp_path / "fuse")]) == 0
    assert main(["predict", members[0], "--data", saved, "--split", "test", "--out", str(tmp_path / "p.pt")]) == 0
    assert main(["distill", "--teacher", *members, "--data", table, "--student", "timm/test_resnet", *tiny,
                 "--out", str(tmp_path / "distill")]) == 0
    assert main(["auto", "--data", saved, "--candidates", "timm/test_resnet", "timm/test_efficientnet", "--sizes",
                 "32", "--no-pretrained", "--no-finetune", "--time-limit", "2m", "--no-progress",
                 "--out", str(tmp_path / "auto")]) == 0
    capsys.readouterr()
    assert main(["predict", members[0], "--data", str(data), "--split", "val", "--seed", "5",
                 "--out", str(tmp_path / "v.pt")]) == 2
    assert "was trained on" in capsys.readouterr().err and not (tmp_path / "v.pt").exists()


def test_paths_may_start_at_another_folder_than_the_tables(tmp_path):
    data = make_splits(tmp_path / "data", per_class=6)
    (tmp_path / "tables").mkdir()
    table = _write_csv(tmp_path / "tables" / "labels.csv", _rows(data))  # paths relative to tmp_path, not tables/
    with pytest.raises(DataError, match="do not exist"):
        load_splits(table, size=32)
    assert _samples(load_splits(table, size=32, image_root=tmp_path)) == _samples(load_splits(data, size=32))
    with pytest.raises(DataError, match="is not a folder"):
        load_splits(table, size=32, image_root=tmp_path / "nowhere")


def test_a_file_that_is_no_table_names_the_forms_taken(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(DataError, match=r"is a file: give a folder with train/.*a table .*\.csv.*Hugging Face"):
        load_splits(tmp_path / "notes.txt", size=32)
