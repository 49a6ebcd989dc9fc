"""How a model reads an image (fusionnet.config.Reading), on the seed's path: a plain torchvision member gives the
answers of the user's own torchvision script, its size is never assumed silently, splits and class orders are
checked, members that read differently are not fused silently, and nothing the user kept is lost."""

import csv
import json
import warnings

import numpy as np
import pytest
import torch
import torchvision
import torchvision.transforms as T
from PIL import Image

from fusionnet.cli.main import main
from fusionnet.config import PlainConfig, Reading
from fusionnet.data.datasets import FolderImages, SkippedImagesWarning
from fusionnet.data.splits import load_splits
from fusionnet.data.transforms import eval_transform
from fusionnet.errors import ConfigError, DataError
from fusionnet.models.factory import create_fusionnet, save_model
from fusionnet.models.plain import load_member
from toydata import make_splits

IMAGENET = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Real photos (the two scikit-learn ships, 427 x 640) cut into JPEGs of several sizes and aspect ratios, as
    class folders a/ and b/ of a test split."""
    from sklearn.datasets import load_sample_images

    root = tmp_path_factory.mktemp("photos")
    boxes = [(0, 0, 640, 427), (50, 20, 350, 420), (200, 100, 600, 300), (10, 10, 170, 250), (300, 0, 640, 200)]
    for label, image in zip("ab", load_sample_images().images):
        (root / label).mkdir()
        for i, box in enumerate(boxes):
            Image.fromarray(image).crop(box).save(root / label / f"{i}.jpg", quality=92)
    return root


def sharp_plain_member(arch: str, folder, seed: int = 0):
    """A plain torchvision classifier whose logits are large (so a small change of input shows in its
    probabilities), saved as a state dict with classes.txt."""
    torch.manual_seed(seed)
    model = getattr(torchvision.models, arch)(weights=None, num_classes=2).eval()
    head = model.fc if arch == "resnet18" else model.classifier[-1]
    with torch.no_grad():
        head.weight.mul_(40.0)
    torch.save(model.state_dict(), folder / f"{arch}.pth")
    (folder / "classes.txt").write_text("a\nb\n")
    return model


def torchvision_probs(model, files, resize: str, size: int, crop_pct: float = 1.0) -> torch.Tensor:
    """The user's own script: ImageFolder's decoding, Resize / CenterCrop / ToTensor / Normalize."""
    side = int(size / crop_pct)
    tf = T.Compose([T.Resize((side, side)) if resize == "stretch" else T.Resize(side), T.CenterCrop(size),
                    T.ToTensor(), T.Normalize(*IMAGENET)])
    with torch.no_grad():
        return model(torch.stack([tf(Image.open(f).convert("RGB")) for f in files])).softmax(1)


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v2"])
def test_a_plain_member_gives_the_answers_of_the_users_torchvision_script(photos, tmp_path, arch, capsys):
    model = sharp_plain_member(arch, tmp_path)
    files = sorted(str(p) for p in photos.rglob("*.jpg"))
    for resize, size, crop in (("stretch", 64, 1.0), ("shorter", 64, 1.0), ("shorter", 56, 0.875)):
        out = tmp_path / f"{resize}_{crop}.csv"
        assert main(["predict", str(tmp_path / f"{arch}.pth"), "--images", str(photos), "--size", str(size),
                     "--resize", resize, "--crop-pct", str(crop), "--top", "2", "--out", str(out)]) == 0
        assert "reads: " in capsys.readouterr().out
        with open(out) as f:
            rows = {r["path"]: r for r in csv.DictReader(f)}
        ours = torch.tensor([[float(rows[f]["probability_1"]) if rows[f]["class_1"] == c else
                              float(rows[f]["probability_2"]) for c in "ab"] for f in files])
        theirs = torchvision_probs(model, files, resize, size, crop)
        assert (ours - theirs).abs().max() <= 2e-3  # the CSV rounds to 4 decimals
        # the library's own (OpenCV) pipeline reads these photos differently enough to show: the check can fail
        member = load_member(tmp_path / f"{arch}.pth", plain=PlainConfig(size=size, resize=resize, crop_pct=crop))
        own = FolderImages(photos, eval_transform(size, resize=resize, crop_pct=crop))
        with torch.no_grad():
            other = member(torch.stack([own[i][0] for i in range(len(own))])).softmax(1)
        assert (other - theirs).abs().max() > 2e-3


def test_the_torchvision_reader_decodes_as_imagefolder_does(tmp_path):
    """No EXIF rotation (ImageFolder applies none) and torchvision's own size rounding (Resize(256) for 224 at
    0.875)."""
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (60, 100, 3), dtype=np.uint8))
    exif = img.getexif()
    exif[0x0112] = 6  # "rotate 90 degrees": image viewers (and the albumentations reader) turn it upright
    img.save(tmp_path / "rot.jpg", exif=exif)
    tv = eval_transform(32, resize="stretch", reader="torchvision")
    ours = tv(tv.decode(tmp_path / "rot.jpg"))
    ref = T.Compose([T.Resize((32, 32)), T.ToTensor()])(Image.open(tmp_path / "rot.jpg").convert("RGB"))
    assert torch.equal(ours, ref)
    assert Reading(224, "shorter", 0.875, "torchvision").describe().startswith(
        "torchvision: Resize(256) + CenterCrop(224) on the PIL image (antialiased")


def test_a_plain_members_size_is_chosen_on_validation_and_said(tmp_path, capsys, monkeypatch):
    root = make_splits(tmp_path / "data", per_class=8)
    sharp_plain_member("resnet18", tmp_path)
    (tmp_path / "classes.txt").write_text("a\nb\nc\n")
    torch.save(torchvision.models.resnet18(weights=None, num_classes=3).state_dict(), tmp_path / "resnet18.pth")
    path = str(tmp_path / "resnet18.pth")
    assert main(["inspect", path]) == 0
    assert "size:         unknown: chosen on validation" in capsys.readouterr().out
    # without data nothing can choose it: refused, naming the fix
    assert main(["predict", path, "--images", str(root / "test"), "--out", str(tmp_path / "p.csv")]) == 2
    assert "does not say the input size it was trained at; give --size" in capsys.readouterr().err
    assert not (tmp_path / "p.csv").exists()
    # with data: every candidate scored on validation, the lowest NLL kept and said (here made to be 96 px)
    import fusionnet.workflows.reading as reading

    scored = []

    def score(model, val, r, *, device="auto"):
        scored.append(r.size)
        return {"acc": 0.5, "nll": abs(r.size - 96) / 100 + 1}

    monkeypatch.setattr(reading, "score_reading", score)
    assert main(["predict", path, "--data", str(root), "--out", str(tmp_path / "t.pt")]) == 0
    out = capsys.readouterr().out
    assert scored == [64, 96, 128, 160, 224]
    assert "input size: 96 px, chosen on validation NLL" in out and "at 96 px" in out
    # a manifest's size is used as it is: nothing scored
    (tmp_path / "resnet18.json").write_text(json.dumps({"size": 48}))
    scored.clear()
    assert main(["predict", path, "--data", str(root), "--out", str(tmp_path / "t.pt"), "--overwrite"]) == 0
    assert scored == [] and "at 48 px" in capsys.readouterr().out


def fitted_plain_member(root, folder, size: int = 32):
    """A plain resnet18 whose classifier is fitted (least squares) on the toy training images read at ``size``:
    accurate enough there for the class-order check to see a wrong order."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=3).eval()
    tf = T.Compose([T.Resize(size), T.CenterCrop(size), T.ToTensor(), T.Normalize(*IMAGENET)])
    files = sorted((root / "train").rglob("*.png"))
    x = torch.stack([tf(Image.open(f).convert("RGB")) for f in files])
    y = torch.tensor(["abc".index(f.parent.name) for f in files])
    with torch.no_grad():
        model.fc = torch.nn.Identity()
        feats = model(x)
        model.fc = torch.nn.Linear(512, 3)
        a = torch.cat([feats, torch.ones(len(feats), 1)], 1)
        sol = torch.linalg.lstsq(a, torch.nn.functional.one_hot(y, 3).float() * 20 - 10).solution
        model.fc.weight.copy_(sol[:-1].T)
        model.fc.bias.copy_(sol[-1])
    torch.save(model.state_dict(), folder / "r18.pth")
    return folder / "r18.pth"


def test_predict_checks_the_class_order_and_vote_checks_splits(tmp_path, capsys):
    root = make_splits(tmp_path / "data", per_class=28)  # 13 validation images: enough for the check
    path = fitted_plain_member(root, tmp_path)
    common = ["--data", str(root), "--size", "32", "--seed", "0"]
    assert main(["predict", str(path), *common, "--classes", "b", "c", "a", "--out", str(tmp_path / "x.pt")]) == 2
    assert "trained with another class order" in capsys.readouterr().err and not (tmp_path / "x.pt").exists()
    for split in ("val", "test"):
        assert main(["predict", str(path), *common, "--classes", "a", "b", "c", "--split", split, "--out",
                     str(tmp_path / f"{split}.pt")]) == 0
    capsys.readouterr()
    assert main(["vote", "--val", str(tmp_path / "test.pt"), "--test", str(tmp_path / "val.pt")]) == 2
    err = capsys.readouterr().err
    assert "holds the 'test' split (as it records), but was given as --val" in err
    assert main(["vote", "--val", str(tmp_path / "val.pt"), "--test", str(tmp_path / "test.pt")]) == 0


def test_the_order_is_not_blamed_when_another_reading_explains_the_fit(monkeypatch):
    from fusionnet.ensembles.voting import MemberOutputs
    import fusionnet.workflows.reading as reading
    from fusionnet.workflows.fuse import check_class_order

    labels = torch.arange(3).repeat(4)
    wrong = torch.nn.functional.one_hot((labels + 1) % 3, 3).float() * 0.9 + 0.1 / 3
    outputs = MemberOutputs(member="m", split="val", probs=wrong, labels=labels, class_names=["a", "b", "c"],
                            sample_ids=[str(i) for i in range(12)])
    model = create_fusionnet(["resnet18"], num_classes=3, reader="torchvision", image_size=32)
    monkeypatch.setattr(reading, "val_sample", lambda val: val)
    monkeypatch.setattr(reading, "score_reading", lambda m, v, r, device="auto": {
        "acc": 1.0 if (r.size, r.resize) == (64, "stretch") else 0.0, "nll": 1.0})
    advice = check_class_order(outputs, model=model, val=object())
    assert "read at 64 px with --resize stretch it scores 1.00" in advice and "--size 64 --resize stretch" in advice
    monkeypatch.setattr(reading, "score_reading", lambda m, v, r, device="auto": {"acc": 0.0, "nll": 1.0})
    with pytest.raises(DataError, match="trained with another class order"):
        check_class_order(outputs, model=model, val=object())


def test_members_that_read_differently_are_not_fused_the_vote_is_named(tmp_path, capsys):
    root = make_splits(tmp_path / "data", per_class=8)
    own = create_fusionnet(["resnet18"], class_names=["a", "b", "c"])
    save_model(own, tmp_path / "own.pth", data={"input_size": 32})
    torch.save(torchvision.models.resnet18(weights=None, num_classes=3).state_dict(), tmp_path / "plain.pth")
    (tmp_path / "classes.txt").write_text("a\nb\nc\n")
    args = ["fuse", "--members", str(tmp_path / "own.pth"), str(tmp_path / "plain.pth"), "--data", str(root),
            "--size", "32", "--out", str(tmp_path / "fuse")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "albumentations: Resize(32) + CenterCrop(32)" in err and "read their images differently" in err
    assert "torchvision: Resize(32) + CenterCrop(32)" in err and "fusionnet vote" in err
    assert not (tmp_path / "fuse").exists()
    from fusionnet.models.factory import fuse_members

    with pytest.raises(ConfigError, match="read their images differently"):
        fuse_members([load_member(tmp_path / "own.pth"), load_member(tmp_path / "plain.pth",
                                                                     plain=PlainConfig(size=32))])


def test_a_checkpoint_with_another_class_count_warns_that_its_head_is_dropped(tmp_path):
    torch.save(torchvision.models.resnet18(weights=None, num_classes=3).state_dict(), tmp_path / "r18.pth")
    with pytest.warns(UserWarning, match="its trained classifier has 3 classes but the model has num_classes=5"):
        create_fusionnet(["resnet18", "mobilenet_v2"], num_classes=5, checkpoints={"resnet18": tmp_path / "r18.pth"})
    with warnings.catch_warnings():  # the same class count: kept (one branch) or fused (several), no warning
        warnings.simplefilter("error")
        create_fusionnet(["resnet18"], num_classes=3, checkpoints={"resnet18": tmp_path / "r18.pth"})


def test_overwrite_keeps_the_files_the_command_did_not_write(tmp_path, capsys):
    from fusionnet.utils.staging import output_folder

    out = tmp_path / "run"
    with output_folder(out, False) as work:
        work.mkdir()
        (work / "best.pth").write_text("run 1")
        (work / "models").mkdir()
        (work / "models" / "old.pth").write_text("run 1")
    (out / "val.pt").write_text("mine")  # the README's path saves predictions beside the model
    (out / "models" / "notes.txt").write_text("mine too")
    with output_folder(out, True) as work:
        (work / "best.pth").write_text("run 2")
    assert (out / "best.pth").read_text() == "run 2" and (out / "val.pt").read_text() == "mine"
    assert (out / "models" / "notes.txt").read_text() == "mine too" and not (out / "models" / "old.pth").exists()
    assert "kept 2 file(s)" in capsys.readouterr().out and "val.pt" in json.dumps(sorted(p.name for p in out.iterdir()))
    with output_folder(out, True) as work:  # kept again by the next run, which did not write them either
        (work / "best.pth").write_text("run 3")
    assert (out / "val.pt").read_text() == "mine"
    (out / "best.pth").write_text("edited by hand")  # a file of the run's own name: replaced, and said so
    (out / "preds.csv").write_text("mine")
    capsys.readouterr()
    with output_folder(out, True) as work:
        (work / "best.pth").write_text("run 4")
        (work / "preds.csv").write_text("the run's")
    said = capsys.readouterr().out
    assert "replaced by the new run's own 1 file(s)" in said and "preds.csv" in said
    # a run folder from before the record: its top-level files the new run does not write are kept, except the
    # kinds commands write (an earlier run's selected.pth must not stand beside the new run)
    legacy = tmp_path / "legacy"
    (legacy / "models").mkdir(parents=True)
    (legacy / "best.pth").write_text("old")
    (legacy / "selected.pth").write_text("old")
    (legacy / "test.pt").write_text("mine")
    (legacy / "models" / "x.pth").write_text("old")
    with output_folder(legacy, True) as work:
        (work / "best.pth").write_text("new")
    assert (legacy / "test.pt").read_text() == "mine" and not (legacy / "models").exists()
    assert not (legacy / "selected.pth").exists()


def test_unreadable_images_one_line_strict_and_a_row_each(tmp_path, capsys):
    root = make_splits(tmp_path / "data", per_class=6)
    for name in ("bad1.png", "bad2.png"):
        (root / "test" / "a" / name).write_bytes(b"not an image")
    (root / "train" / "b" / "bad3.jpg").write_bytes(b"\xff\xd8 truncated")
    with pytest.warns(SkippedImagesWarning) as caught:
        load_splits(root, size=32)
    assert len(caught) == 1 and str(caught[0].message).startswith("skipped 3 unreadable image(s): ")
    with pytest.raises(DataError, match="3 unreadable image"):
        load_splits(root, size=32, strict=True)
    member = torchvision.models.resnet18(weights=None, num_classes=3)
    torch.save(member.state_dict(), tmp_path / "r18.pth")
    (tmp_path / "classes.txt").write_text("a\nb\nc\n")
    args = ["predict", str(tmp_path / "r18.pth"), "--images", str(root / "test"), "--size", "32", "--out",
            str(tmp_path / "p.csv")]
    assert main(args) == 0
    captured = capsys.readouterr()
    assert captured.err.count("WARNING: skipped 2 unreadable image(s)") == 1 and "warnings.warn" not in captured.err
    with open(tmp_path / "p.csv") as f:
        rows = list(csv.DictReader(f))
    files = sorted(p for p in (root / "test").rglob("*") if p.is_file())
    assert len(rows) == len(files)
    bad = [r for r in rows if r["error"]]
    assert sorted(r["path"].rsplit("/", 1)[1] for r in bad) == ["bad1.png", "bad2.png"] and not bad[0]["class"]
    assert main(args + ["--strict", "--overwrite"]) == 2 and "2 unreadable image(s)" in capsys.readouterr().err
    assert main(["gap", "--train", str(root / "train"), "--test", str(root / "test"), "--strict", "--out",
                 str(tmp_path / "gap")]) == 2
    assert "unreadable image" in capsys.readouterr().err and not (tmp_path / "gap").exists()


def test_the_reliability_diagram_has_a_readable_panel_per_row():
    from fusionnet.utils.metrics import equal_mass_bins, expected_calibration_error
    from fusionnet.utils.plots import reliability_diagram

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 600)
    sharp = np.eye(3)[labels] * 0.9 + 0.1 / 3
    soft = rng.dirichlet([1, 1, 1], 600)
    bins = equal_mass_bins(soft, labels, 10)
    assert [b["count"] for b in bins] == [60] * 10
    assert len(equal_mass_bins(soft[:50], labels[:50], 10)) == 2  # at least 20 images a bin
    fig = reliability_diagram({"sharp": (sharp, labels), "soft": (soft, labels), "third": (soft, labels)})
    panels = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in panels] == ["sharp", "soft", "third"]
    legend = panels[1].get_legend().get_texts()[0].get_text()
    assert legend == f"ECE {expected_calibration_error(soft, labels):.3f}"
    assert sorted(int(t.get_text()) for t in panels[1].texts) == [60] * 10  # the count by each point


def test_commands_use_as_many_threads_as_cores_are_idle(monkeypatch):
    import fusionnet.utils.threads as threads

    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    said = []
    try:
        torch.set_num_threads(2)
        monkeypatch.setattr(threads, "idle_cpus", lambda: 1.0)  # another process keeps one of two cores busy
        assert threads.threads_for_idle_cores(log=said.append) == 1 and torch.get_num_threads() == 1
        assert said == ["other work keeps 1.0 of 2 cores busy: torch uses 1 thread(s) (OMP_NUM_THREADS to choose)"]
        torch.set_num_threads(2)
        monkeypatch.setattr(threads, "idle_cpus", lambda: 1.9)  # an idle machine: nothing changes
        assert threads.threads_for_idle_cores() is None and torch.get_num_threads() == 2
        monkeypatch.setenv("OMP_NUM_THREADS", "2")  # the user's word wins
        monkeypatch.setattr(threads, "idle_cpus", lambda: 0.0)
        assert threads.threads_for_idle_cores() is None and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_idle_cpus_reads_proc_stat():
    from fusionnet.utils.threads import idle_cpus

    idle = idle_cpus(0.05)
    import os

    assert idle is None or 0 <= idle <= (os.cpu_count() or 1) + 1e-9


def test_the_commands_size_wins_over_what_a_fusionnet_member_records(tmp_path):
    from fusionnet.serving.model import ModelHandler

    for name, size in (("a", 32), ("b", 48)):
        save_model(create_fusionnet(["timm/test_resnet"], class_names=["a", "b", "c"]), tmp_path / f"{name}.pth",
                   data={"input_size": size})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "records no input size" warning when --size is given
        assert load_member(tmp_path / "a.pth", plain=PlainConfig(size=40)).config.image_size == 40
        save_model(create_fusionnet(["timm/test_resnet"], class_names=["a", "b", "c"]), tmp_path / "c.pth")
        assert load_member(tmp_path / "c.pth", plain=PlainConfig(size=40)).config.image_size == 40
    with pytest.raises(ConfigError, match="trained at different input sizes"):
        ModelHandler([str(tmp_path / "a.pth"), str(tmp_path / "b.pth")], device="cpu")
    handler = ModelHandler([str(tmp_path / "a.pth"), str(tmp_path / "b.pth")], device="cpu", size=40)
    assert handler.size == 40 and handler.info()["reading"]["size"] == 40


def test_autos_backbone_candidates_read_as_the_members_they_are_scored_beside(tmp_path):
    from fusionnet.config.reading import common_reading
    from fusionnet.workflows.auto.screening import Candidate

    torch.save(torchvision.models.resnet18(weights=None, num_classes=3).state_dict(), tmp_path / "r18.pth")
    plain = PlainConfig(classes=["a", "b", "c"], resize="stretch")
    member = Candidate("resnet18", 32, str(tmp_path / "r18.pth")).build(["a", "b", "c"], taps=0, pretrained=False,
                                                                       seed=0, plain=plain)
    reading = member.config.reading().split_fields()
    backbone = Candidate("timm/test_resnet", 32).build(["a", "b", "c"], taps=0, pretrained=False, seed=0,
                                                       reading=reading)
    assert backbone.config.reader == "torchvision" and backbone.config.resize == "stretch"
    common_reading({"member": member.config.reading(), "backbone": backbone.config.reading()})  # fuses: no refusal
