"""The practitioner's subcommands end to end on tiny generated data: train, predict, vote, fuse."""

import csv
import json
import subprocess
import sys

import pytest

from fusionnet.cli.main import main
from toydata import make_splits

MEMBER = ["--backbones", "timm/test_resnet", "--no-pretrained", "--epochs", "1", "--size", "32", "--batch-size", "8",
          "--no-progress"]


@pytest.fixture
def data(tmp_path):
    return make_splits(tmp_path / "data", per_class=8)


def test_every_subcommand_has_help_with_an_example(capsys):
    for command in ("train", "predict", "vote", "fuse", "gap", "export"):
        with pytest.raises(SystemExit) as exit_info:
            main([command, "--help"])
        out = capsys.readouterr().out
        assert exit_info.value.code == 0 and "usage: fusionnet " + command in out and "example" in out
    r = subprocess.run([sys.executable, "-m", "fusionnet", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "Exit codes" in r.stdout  # also as python -m fusionnet


def test_train_predict_vote_and_fuse_from_the_command_line(data, tmp_path, capsys):
    config = tmp_path / "train.json"
    config.write_text(json.dumps({"loss": "focal", "class_weighting": True, "monitor": "acc"}))
    runs = {}
    for name, backbone in (("a", "timm/test_resnet"), ("b", "timm/test_efficientnet")):
        runs[name] = tmp_path / "runs" / name
        args = ["train", "--config", str(config), "--data", str(data), "--out", str(runs[name]), *MEMBER]
        args[args.index("timm/test_resnet")] = backbone
        if name == "b":  # this member reads its images from a decoded-image cache
            args += ["--image-cache", str(tmp_path / "images")]
        assert main(args) == 0
        assert {"best.pth", "final.pth", "history.json", "history.png"} <= {p.name for p in runs[name].iterdir()}
        saved = json.loads((runs[name] / "train_config.json").read_text())
        assert saved["loss"] == "focal" and saved["class_weighting"] and saved["monitor"] == "acc"
    assert len(list((tmp_path / "images").glob("images-*.u8"))) == 2
    # never over an earlier run unless --overwrite
    assert main(["train", "--data", str(data), "--out", str(runs["a"]), *MEMBER]) == 2
    assert "exists already" in capsys.readouterr().err
    # --resume continues the run in --out (nothing left to train: it ends at once), --overwrite replaces it
    assert main(["train", "--data", str(data), "--out", str(runs["a"]), *MEMBER, "--resume"]) == 0
    assert "resumed from" in capsys.readouterr().out
    assert main(["train", "--data", str(data), "--out", str(runs["a"]), *MEMBER, "--overwrite"]) == 0
    for name in runs:
        for split in ("val", "test"):
            assert main(["predict", str(runs[name] / "best.pth"), "--data", str(data), "--split", split, "--size",
                         "32", "--out", str(tmp_path / f"{name}_{split}.pt")]) == 0
    assert main(["predict", str(runs["a"] / "best.pth"), "--images", str(data / "test"), "--size", "32",
                 "--out", str(tmp_path / "classes.csv")]) == 0
    with open(tmp_path / "classes.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6 and {r["class"] for r in rows} <= {"a", "b", "c"}
    capsys.readouterr()
    assert main(["vote", "--method", "greedy", "--val", str(tmp_path / "a_val.pt"), str(tmp_path / "b_val.pt"),
                 "--test", str(tmp_path / "a_test.pt"), str(tmp_path / "b_test.pt"),
                 "--out", str(tmp_path / "vote.json")]) == 0
    assert "greedy selection (Caruana) over" in capsys.readouterr().out
    assert len(json.loads((tmp_path / "vote.json").read_text())["test_probs"]) == 6
    assert main(["vote", "--val", str(tmp_path / "a_val.pt"), "--test", str(tmp_path / "b_test.pt"),
                 str(tmp_path / "a_test.pt")]) == 2
    assert main(["fuse", "--members", str(runs["a"] / "best.pth"), str(runs["b"] / "best.pth"), "--data", str(data),
                 "--size", "32", "--epochs", "2", "--out", str(tmp_path / "fuse"), "--no-progress"]) == 0
    report = json.loads((tmp_path / "fuse" / "fuse.json").read_text())
    assert {"soft", "fusion:from_members", "fusion:late_oof", "selected:fusion"} <= set(report["methods"])
    fused = {n: r for n, r in report["methods"].items() if n in ("fusion:from_members", "fusion:late_oof")}
    assert report["selected"] == min(fused, key=lambda n: fused[n]["val"]["nll"])  # chosen on validation
    same = {k: v for k, v in report["methods"]["selected:fusion"].items() if k != "label"}
    assert same == {k: v for k, v in report["methods"][report["selected"]].items() if k != "label"}
    assert report["methods"]["selected:fusion"]["label"] == "FusionNet (selected on val)"
    for row in report["methods"].values():  # per-image predictions, for paired tests, agree with the accuracy
        right = [p == y for p, y in zip(row["pred"], report["test_labels"])]
        assert len(right) == len(report["test_labels"]) and abs(sum(right) / len(right) - row["acc"]) < 1e-9
    assert (tmp_path / "fuse" / "models" / "fusion_late_oof" / "best.pth").is_file()
    # the model validation chose is where the next step looks: selected.pth, the chosen head's own file
    chosen_file = {"fusion:from_members": "models/fusion_from_members/best.pth",
                   "fusion:late_oof": "models/fusion_late_oof/best.pth"}
    assert report["selected_model"] == str(tmp_path / "fuse" / "selected.pth")
    assert (tmp_path / "fuse" / "selected.pth").read_bytes() == \
        (tmp_path / "fuse" / chosen_file[report["selected"]]).read_bytes()
    assert "selected.pth" in capsys.readouterr().out  # the command says which file to use
    assert "| soft voting |" in (tmp_path / "fuse" / "fuse.md").read_text()


def test_a_validation_split_holding_training_images_is_refused(data, tmp_path, capsys):
    """Wrong answer 1: predict --split val with another seed than training scored training images as validation."""
    from fusionnet.models.checkpoints import read_checkpoint

    run = tmp_path / "runs" / "a"
    assert main(["train", "--data", str(data), "--out", str(run), "--seed", "0", *MEMBER]) == 0
    record = read_checkpoint(run / "best.pth")["data"]
    assert record["seed"] == 0 and record["input_size"] == 32 and len(record["files"]) == record["train_images"]
    out = tmp_path / "val.pt"
    assert main(["predict", str(run / "best.pth"), "--data", str(data), "--split", "val", "--seed", "1",
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "was trained on" in err and "--seed 0" in err and not out.exists()
    # by default predict makes the split the model was trained with (its seed, its size): accepted
    assert main(["predict", str(run / "best.pth"), "--data", str(data), "--split", "val", "--out", str(out)]) == 0
    # and an existing output is not replaced without --overwrite
    assert main(["predict", str(run / "best.pth"), "--data", str(data), "--split", "val", "--out", str(out)]) == 2
    assert "exists already" in capsys.readouterr().err


def test_export_defaults_to_the_trained_size_and_describes_its_input(data, tmp_path, capsys):
    """Wrong answer 4: export defaulted to 224 px for a model trained at 128; the ONNX file now says what it takes."""
    onnx = pytest.importorskip("onnx")
    run = tmp_path / "runs" / "a"
    assert main(["train", "--data", str(data), "--out", str(run), *MEMBER]) == 0
    assert main(["export", str(run / "best.pth"), "--out", str(tmp_path / "m.onnx")]) == 0
    assert "32 x 32 px" in capsys.readouterr().out
    proto = onnx.load(str(tmp_path / "m.onnx"))
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["input_size"] == "32" and json.loads(meta["class_names"]) == ["a", "b", "c"]
    assert "[0, 1]" in meta["input"] and "test_resnet" in json.loads(meta["normalisation"])
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims[1:]] == [3, 32, 32]


def test_foreign_members_must_state_their_class_order(data, tmp_path, capsys):
    """Wrong answer 2: a plain state dict's outputs were mapped onto the data's class order without a word."""
    import torch
    import torchvision

    from fusionnet.ensembles.voting import MemberOutputs
    from fusionnet.config import PlainConfig
    from fusionnet.models.plain import load_member
    from fusionnet.workflows.fuse import check_class_order

    plain = tmp_path / "weights" / "resnet18.pth"
    plain.parent.mkdir()
    torch.save(torchvision.models.resnet18(weights=None, num_classes=3).state_dict(), plain)
    with pytest.raises(Exception, match=r"does not say its class order.*sorted order: --classes a b c"):
        load_member(plain, num_classes=3, class_names=["a", "b", "c"])
    reference = load_member(plain, num_classes=3, class_names=["a", "b", "c"],
                            plain=PlainConfig(classes=["a", "b", "c"]))
    (plain.parent / "classes.txt").write_text("c\na\nb\n")  # trained with another order: rows put in the data's
    reordered = load_member(plain, num_classes=3, class_names=["a", "b", "c"])
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(reordered.eval()(x), reference.eval()(x)[:, [1, 2, 0]])
    # the check on validation predictions: a member whose classes are rotated is refused, a right one passes
    labels = torch.arange(30) % 3
    right = torch.nn.functional.one_hot(labels, 3).float()
    outputs = dict(member="m", split="val", labels=labels, class_names=["a", "b", "c"],
                   sample_ids=[str(i) for i in range(30)])
    assert check_class_order(MemberOutputs(probs=right, **outputs)) is None
    with pytest.raises(Exception, match="trained with another class order"):
        check_class_order(MemberOutputs(probs=right[:, [1, 2, 0]], **outputs))
    # a weak member whose predictions fit another order somewhat better: not refused, but warned about
    weak = right.clone()
    weak[12:] = right[12:][:, [1, 2, 0]]  # 12 of 30 images predicted in the data's order, 18 in a rotated one
    assert check_class_order(MemberOutputs(probs=weak, **outputs)).startswith(
        "member 'm' scores 0.40 on validation in the data's class order but 0.60 if")


def test_inspect_says_what_each_of_the_librarys_files_is(data, tmp_path, capsys):
    """inspect on our own outputs file said 'holds a dict without tensors', on ONNX a truncated unpickling error;
    a checkpoint's metrics were one raw dict."""
    pytest.importorskip("onnx")
    run = tmp_path / "runs" / "a"
    assert main(["train", "--data", str(data), "--out", str(run), *MEMBER]) == 0
    assert main(["predict", str(run / "best.pth"), "--data", str(data), "--split", "val",
                 "--out", str(tmp_path / "val.pt")]) == 0
    assert main(["export", str(run / "best.pth"), "--out", str(tmp_path / "m.onnx")]) == 0
    capsys.readouterr()
    assert main(["inspect", str(run / "best.pth")]) == 0
    out = capsys.readouterr().out
    assert "trained on:" in out and "32 px" in out and "\nmetrics:\n  epoch " in out and "{" not in out
    assert main(["inspect", str(tmp_path / "val.pt")]) == 0
    out = capsys.readouterr().out
    assert "saved member outputs" in out and "split:        val" in out and "accuracy:" in out
    assert main(["inspect", str(tmp_path / "m.onnx")]) == 0
    out = capsys.readouterr().out
    assert "ONNX model" in out and "images (batch, 3, 32, 32)" in out and "class_names:" in out


def test_a_run_folder_names_its_selected_model_by_id_also_in_the_older_format(tmp_path):
    import pytest

    from fusionnet.errors import ConfigError, MissingFileError
    from fusionnet.workflows.runs import checkpoints_in

    model = tmp_path / "m.pth"
    model.write_bytes(b"x")
    new, old, gone = tmp_path / "new", tmp_path / "old", tmp_path / "gone"
    for folder in (new, old, gone):
        folder.mkdir()
    (new / "results.json").write_text(json.dumps({"selected": {"fusion": {"id": "late_oof",
                                                                          "checkpoint": str(model)}}}))
    (old / "results.json").write_text(json.dumps({  # fusionnet 0.3: rows keyed by label
        "methods": {"FusionNet (selected on val)": {"chosen": "FusionNet (from members)"}},
        "fusion": {"from_members": {"checkpoint": str(model)}}}))
    (gone / "results.json").write_text(json.dumps({"selected": {"fusion": {"id": "concat",
                                                                           "checkpoint": str(tmp_path / "no.pth")}}}))
    assert checkpoints_in([str(new), str(old)]) == [model, model]
    with pytest.raises(MissingFileError, match="validation chose 'concat', but its model file"):
        checkpoints_in([str(gone)])
    (gone / "results.json").write_text("{not json")
    with pytest.raises(ConfigError, match="results.json cannot be read"):
        checkpoints_in([str(gone)])


def test_members_are_named_by_file_stem_or_by_folder_and_inspect_says_what_a_json_file_is(tmp_path, capsys):
    from fusionnet.workflows.runs import member_names

    assert member_names(["w/resnet18_best.pth", "runs/lite0/best.pth", "runs/lite1/best.pth", "x/lite0.pth"]) == [
        "resnet18_best", "lite0", "lite1", "lite0_2"]
    report = tmp_path / "results.json"
    report.write_text(json.dumps({"budget": {}, "methods": {}, "selected": {"fusion": {"id": "late_oof"}}}))
    assert main(["inspect", str(report)]) == 0
    out = capsys.readouterr().out
    assert "a comparison's or fuse's results" in out and '"id": "late_oof"' in out
    assert main(["predict", str(report), "--images", str(tmp_path), "--out", str(tmp_path / "p.csv")]) == 2
    err = capsys.readouterr().err
    assert "is a JSON file, not a checkpoint" in err and len(err.strip().splitlines()) == 1
