"""Messages a new user reads: near-miss paths, install hints, load reports, early refusals (issue 22)."""

import pytest
import torch
import torchvision

from fusionnet import create_fusionnet
from fusionnet.data.splits import load_splits
from fusionnet.errors import DataError, MissingFileError, install_hint
from fusionnet.utils.files import resolve_path
from toydata import make_folder


def test_a_missing_path_names_the_near_miss_that_exists(tmp_path):
    (tmp_path / "my models ").mkdir()  # a folder whose name ends in a space
    (tmp_path / "my models " / "a.pth").write_bytes(b"x")
    for typed in ("my models", "My Models", "my modles "):
        with pytest.raises(MissingFileError, match=r"did you mean '.*my models /a.pth'\? \(it exists\)"):
            resolve_path(tmp_path / typed / "a.pth")
    with pytest.raises(MissingFileError, match="does not exist either"):
        resolve_path(tmp_path / "elsewhere" / "a.pth")


def test_the_install_hint_fits_how_fusionnet_was_installed(monkeypatch):
    import json
    from importlib import metadata

    class Dist:
        def __init__(self, direct):
            self.direct = direct

        def read_text(self, name):
            return json.dumps(self.direct) if self.direct is not None else None

    monkeypatch.setattr(metadata, "distribution", lambda _n: Dist({"dir_info": {"editable": True},
                                                                   "url": "file:///src/fusion%20net"}))
    assert install_hint("export") == 'pip install -e "/src/fusion net[export]"'
    monkeypatch.setattr(metadata, "distribution", lambda _n: Dist(None))
    assert install_hint("export") == "pip install 'fusionnet[export]'"


def test_a_kept_head_is_not_reported_as_dropped(tmp_path):
    path = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18(weights=None, num_classes=3).state_dict(), path)
    model = create_fusionnet(["resnet18"], num_classes=3, checkpoints={"resnet18": path})
    report = model.load_reports["resnet18"]
    assert report.head_kept and not any(k.startswith("fc.") for k in report.dropped)


def test_a_train_folder_with_one_class_is_refused_before_any_work(tmp_path):
    make_folder(tmp_path / "data" / "train", {"only": 4}, seed=0)
    with pytest.raises(DataError, match="has one class \\('only'\\)"):
        load_splits(tmp_path / "data", size=32)
