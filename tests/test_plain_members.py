"""Plain torchvision state dicts as members, the newcomer's path: every trained head kept (VGG's three layers
too), preprocessing as the member was trained (resize mode, mean/std from flags or a manifest), the validation
split the members were validated on (--val-list), and what is assumed stated."""

import csv
import json

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from fusionnet.cli.main import main
from fusionnet.config import PlainConfig
from fusionnet.data.splits import load_splits
from fusionnet.data.transforms import apply_transform, eval_transform
from fusionnet.errors import ConfigError, DataError
from fusionnet.models.factory import create_fusionnet, fuse_members, load_fusionnet
from fusionnet.models.plain import load_member
from toydata import make_splits

IMAGENET = (torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))


@pytest.fixture(scope="module")
def vgg16_plain(vgg16_files):
    """A plain torchvision vgg16 state dict for 3 classes (the 25088->4096->4096->3 classifier), its classes.txt."""
    model, path = vgg16_files["vgg16"]
    (path.parent / "classes.txt").write_text("a\nb\nc\n")
    return model, path


def test_a_plain_vgg16_keeps_its_whole_classifier_and_fuses(vgg16_plain, tmp_path):
    reference, path = vgg16_plain
    member = load_member(path).eval()
    assert member.config.branches[0].backbone == "vgg16_mlp" and member.load_reports["vgg16_mlp"].head_kept
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():  # the same answers as the torchvision model on the images it normalises itself
        assert torch.allclose(member(x), reference((x - IMAGENET[0]) / IMAGENET[1]), atol=1e-5)
    resnet = torchvision.models.resnet18(weights=None, num_classes=3).eval()
    torch.save(resnet.state_dict(), tmp_path / "resnet18.pth")
    other = load_member(tmp_path / "resnet18.pth", plain=PlainConfig(classes=["a", "b", "c"])).eval()
    fused = fuse_members([member, other]).eval()
    with torch.no_grad():  # the fused head starts at the members' logit average
        assert torch.allclose(fused(x), (member(x) + other(x)) / 2, atol=1e-5)
    # the conv-only vgg16 branch warns that it cannot keep the classifier, naming the branch that can
    with pytest.warns(UserWarning, match="build the branch as 'vgg16_mlp'"):
        create_fusionnet(["vgg16"], num_classes=3, checkpoints={"vgg16": path})


def test_stretch_resize_and_normalisation_come_from_flags_or_a_manifest(tmp_path):
    torch.save(torchvision.models.resnet18(weights=None, num_classes=3).state_dict(), tmp_path / "r18.pth")
    (tmp_path / "r18.json").write_text(json.dumps({"classes": ["c", "b", "a"], "resize": "stretch",
                                                   "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}))
    member = load_member(tmp_path / "r18.pth", class_names=["a", "b", "c"])
    assert member.config.resize == "stretch" and member.class_names == ["a", "b", "c"]
    assert member.branches["resnet18"].mean.flatten().tolist() == [0.5] * 3
    flagged = load_member(tmp_path / "r18.pth", plain=PlainConfig(resize="shorter", std=[0.5, 0.5, 0.5]))
    assert flagged.config.resize == "shorter" and flagged.branches["resnet18"].std.flatten().tolist() == [0.5] * 3
    # a fused model reads its images as its members did, and says so in its checkpoint
    saved = tmp_path / "fused.pth"
    from fusionnet.models.factory import save_model

    save_model(fuse_members([member, member]), saved)
    assert load_fusionnet(saved).config.resize == "stretch"
    for bad, match in (({"resize": "squash"}, "resize must be one of shorter, stretch, got 'squash'"),
                       ({"colour": 1}, r"unknown entries \['colour'\]"), ({"mean": [0.5]}, "three numbers")):
        (tmp_path / "r18.json").write_text(json.dumps(bad))
        with pytest.raises(ConfigError, match=match):
            load_member(tmp_path / "r18.pth", plain=PlainConfig(classes=["a", "b", "c"]))


def test_stretch_is_the_whole_image_resized():
    yy, xx = np.mgrid[0:40, 0:80]  # a smooth 2:1 image: a crop would lose its left and right quarters
    image = np.stack([xx * 3, yy * 6, xx + yy], axis=-1).astype(np.uint8)
    stretched = apply_transform(eval_transform(32, resize="stretch"), image)
    expected = torchvision.transforms.functional.pil_to_tensor(Image.fromarray(image).resize((32, 32),
                                                                                            Image.BILINEAR))
    assert stretched.shape == (3, 32, 32) and (stretched * 255 - expected.float()).abs().mean() < 2
    cropped = apply_transform(eval_transform(32), image)
    assert (cropped - stretched).abs().mean() > 0.05  # shorter + crop sees another image


def test_val_list_is_the_validation_split(tmp_path):
    root = make_splits(tmp_path / "data", per_class=6)
    every = sorted(p.relative_to(root).as_posix() for p in (root / "train").rglob("*.png"))
    chosen = every[::4]
    listing = tmp_path / "val.txt"
    listing.write_text("# the members' validation images\n" + "\n".join(chosen) + "\n")
    splits = load_splits(root, size=32, val_list=listing)
    val = sorted(str(p) for p in splits.val.paths)
    assert val == sorted(str((root / c).resolve()) for c in chosen)
    assert not set(val) & set(map(str, splits.train.paths)) and len(val) + len(splits.train) == len(every)
    listing.write_text(chosen[0].removeprefix("train/") + "\nnot/there.png\n")  # relative to train/ works too
    with pytest.raises(DataError, match=r"names 1 file\(s\) that are not images of .*'not/there.png'"):
        load_splits(root, size=32, val_list=listing)
    (root / "val").mkdir()
    with pytest.raises(ConfigError, match="has a val/ folder and val_list"):
        load_splits(root, size=32, val_list=listing)


def test_newcomer_path_plain_members_to_a_served_model(tmp_path, capsys):
    """Plain resnet18 (trained on Resize((s, s)): a manifest says so), googlenet with aux heads and mobilenet_v2
    fuse into a model that reads its images as they did, served with the same answers at any batch size (vgg16's
    whole classifier fuses too: the first test)."""
    root = make_splits(tmp_path / "data", per_class=8)
    members = tmp_path / "members"
    members.mkdir()
    other = tmp_path / "other"  # a member of another folder, whose classes.txt is its own
    other.mkdir()
    torch.save(torchvision.models.mobilenet_v2(weights=None, num_classes=3).state_dict(), other / "mobilenet.pth")
    (other / "classes.txt").write_text("a\nb\nc\n")
    torch.save(torchvision.models.resnet18(weights=None, num_classes=3).state_dict(), members / "resnet18.pth")
    torch.save(torchvision.models.googlenet(weights=None, num_classes=3, aux_logits=True,
                                            init_weights=True).state_dict(), members / "googlenet.pth")
    (members / "classes.txt").write_text("a\nb\nc\n")
    for name in ("resnet18", "googlenet"):
        (members / f"{name}.json").write_text(json.dumps({"resize": "stretch"}))
    # the mobilenet member says nothing of its resize: one pipeline cannot feed all, so fuse is told
    args = ["fuse", "--members", str(members / "resnet18.pth"), str(members / "googlenet.pth"),
            str(other / "mobilenet.pth"),
            "--data", str(root), "--size", "32", "--epochs", "1", "--no-progress", "--out", str(tmp_path / "fuse")]
    err = capsys.readouterr().err if main(args) == 2 else ""
    assert "read their images differently" in err and "fusionnet vote" in err
    assert not (tmp_path / "fuse").exists()
    assert main(args + ["--resize", "stretch", "--names", "r18"]) == 2
    assert "--names gives 1 name(s) ['r18'] for 3 members" in capsys.readouterr().err
    assert main(args + ["--resize", "stretch", "--names", "r18", "goog", "mobile"]) == 0
    out = capsys.readouterr().out
    assert "do not record the images they were trained on" in out and "--val-list" in out
    assert {"member:r18", "member:goog", "member:mobile"} <= set(json.loads((tmp_path / "fuse" / "fuse.json")
                                                                        .read_text())["methods"])
    selected = load_fusionnet(tmp_path / "fuse" / "selected.pth")
    assert selected.config.resize == "stretch"
    from fusionnet.serving.serve import ModelHandler

    handler = ModelHandler([str(tmp_path / "fuse" / "selected.pth")], device="cpu")
    assert handler.reading.resize == "stretch" and handler.reading.reader == "torchvision" and handler.size == 32
    images = torch.stack([handler.decode((p).read_bytes()) for p in sorted((root / "test").rglob("*.png"))])
    together, _ = handler.predict(images)
    alone = torch.cat([handler.predict(images[i:i + 1])[0] for i in range(len(images))])
    assert torch.equal(together.argmax(1), alone.argmax(1)) and torch.allclose(together, alone, atol=1e-5)
    # serve takes the plain members themselves too (their soft vote), with the same flags
    vote = ModelHandler([str(members / "resnet18.pth"), str(members / "googlenet.pth")], device="cpu",
                        plain=PlainConfig(resize="stretch"), size=32)
    assert vote.class_names == ["a", "b", "c"] and vote.predict(images[:2])[0].shape == (2, 3)


def test_predict_and_inspect_take_plain_members(tmp_path, capsys):
    root = make_splits(tmp_path / "data", per_class=8)
    path = tmp_path / "mobilenet_v2.pth"
    torch.save(torchvision.models.mobilenet_v2(weights=None, num_classes=3).state_dict(), path)
    assert main(["inspect", str(path)]) == 0
    text = capsys.readouterr().out
    assert "class order:  unknown" in text and "resize:       shorter (assumed" in text and "--val-list" in text
    assert main(["predict", str(path), "--images", str(root / "test"), "--size", "32", "--out",
                 str(tmp_path / "p.csv")]) == 2
    assert "--classes" in capsys.readouterr().err
    assert main(["predict", str(path), "--images", str(root / "test"), "--size", "32", "--classes", "a", "b", "c",
                 "--resize", "stretch", "--top", "2", "--out", str(tmp_path / "p.csv")]) == 0
    with open(tmp_path / "p.csv") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["path", "class_1", "probability_1", "class_2", "probability_2", "error"] and len(rows) > 1
    assert float(rows[1][2]) >= float(rows[1][4])
    assert main(["predict", str(path), "--data", str(root), "--split", "val", "--size", "32", "--classes", "a", "b",
                 "c", "--out", str(tmp_path / "val.pt")]) == 0
    assert "do not record the images they were trained on" in capsys.readouterr().out
