"""The vote as one artifact (fusionnet.models.vote.Vote): its folder (config.json, README.md, members/<name>/ model
folders, no pickle) reads back bit-identically, from a Hub cache offline too; push sends the members; serve,
predict and export take it; fuse writes its selected ensemble as one; a bad vote folder is one line, exit 2."""

import json
import shutil
from pathlib import Path

import pytest
import torch

import fusionnet
from fusionnet import ConfigError, create_fusionnet
from fusionnet.cli.main import main
from fusionnet.ensembles.voting import VotingModule
from fusionnet.models.vote import Vote
from fusionnet.utils.probabilities import soft_vote
from toydata import make_splits

CLASSES = ["a", "b", "c"]
WEIGHTS, TEMPS = [0.625, 0.375], [1.5, 0.75]


def _members():
    torch.manual_seed(0)
    return [create_fusionnet([b], class_names=CLASSES, image_size=32).eval()
            for b in ("timm/test_resnet", "timm/test_efficientnet")]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A vote of two tiny members, and its folder."""
    vote = Vote(_members(), ["resnet", "effnet"], weights=WEIGHTS, temperatures=TEMPS, method="greedy selection")
    folder = vote.eval().save_pretrained(tmp_path_factory.mktemp("v") / "vote", metrics={"test_acc": 0.5})
    return vote, folder


def _probs(model, x):
    with torch.no_grad():
        return model(x).softmax(1)


def test_a_vote_folder_holds_no_pickle_and_reads_back_bit_identically(saved):
    vote, folder = saved
    x = torch.rand(4, 3, 32, 32)
    files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and ".written" not in p.name)
    assert files == ["README.md", "config.json", *(f"members/{n}/{f}" for n in ("effnet", "resnet")
                                                    for f in ("README.md", "config.json", "model.safetensors"))]
    config = json.loads((folder / "config.json").read_text())
    assert config["format"] == "fusionnet-vote" and config["voting"] == "soft"
    assert config["members"] == [{"name": "resnet", "weight": 0.625, "temperature": 1.5},
                                 {"name": "effnet", "weight": 0.375, "temperature": 0.75}]
    card = (folder / "README.md").read_text()
    assert "| resnet | timm/test_resnet | 0.6250 | 1.5 |" in card and "test_acc 0.5000" in card
    loaded = fusionnet.load(folder)
    assert isinstance(loaded, Vote) and loaded.class_names == CLASSES
    with torch.no_grad():
        assert torch.equal(loaded(x), vote(x))  # bit for bit
        live = VotingModule(list(vote.members), weights=WEIGHTS, temperatures=TEMPS)(x)
        scaled = torch.stack([(m(x) / t).softmax(1) for m, t in zip(vote.members, TEMPS)])
    assert torch.allclose(_probs(loaded, x), live, atol=1e-6)
    assert torch.allclose(_probs(loaded, x), soft_vote(scaled, WEIGHTS), atol=1e-6)


def test_a_vote_is_soft_and_its_members_must_agree(saved):
    import copy

    members = list(saved[0].members)
    with pytest.raises(ConfigError, match="soft vote .* hard"):
        Vote(members, ["a", "b"], voting="hard")
    with pytest.raises(ConfigError, match="sum to 1.1"):
        Vote(members, ["a", "b"], weights=[0.6, 0.5])
    odd = copy.deepcopy(members[0])
    odd.config.resize = "stretch"
    with pytest.raises(ConfigError, match="members \\['a', 'b'\\] .* saved outputs"):
        Vote([members[0], odd], ["a", "b"])
    other = copy.deepcopy(members[0])
    other.config.class_names = ["x", "y", "z"]
    with pytest.raises(ConfigError, match="disagree on their class names"):
        Vote([members[0], other], ["a", "b"])


def test_a_hub_id_of_a_vote_loads_from_the_cache_offline(saved, tmp_path, monkeypatch):
    import huggingface_hub.constants as hub

    vote, folder = saved
    repo = tmp_path / "hub" / "models--someone--vote"
    shutil.copytree(folder, repo / "snapshots" / "abc123")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(fusionnet.load("someone/vote")(x), vote(x))


def test_push_sends_the_vote_with_its_member_folders(saved, monkeypatch):
    import fnmatch

    import huggingface_hub

    vote, folder = saved
    sent = {}

    def upload_folder(self, *, repo_id, folder_path, allow_patterns, **kw):
        files = [str(p.relative_to(folder_path)) for p in Path(folder_path).rglob("*") if p.is_file()]
        sent["files"] = sorted(f for f in files if any(fnmatch.fnmatch(f, pat) for pat in allow_patterns))
        sent["token"] = self.token

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", lambda self, repo_id, **kw: f"https://hf.co/{repo_id}")
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    assert main(["push", str(folder), "--repo", "someone/vote", "--token", "t0k"]) == 0
    assert sent["token"] == "t0k" and sent["files"] == [
        "README.md", "config.json", *(f"members/{n}/{f}" for n in ("effnet", "resnet")
                                      for f in ("README.md", "config.json", "model.safetensors"))]


def test_serve_predict_and_export_take_a_vote_folder(saved, tmp_path, capsys):
    import onnxruntime as ort

    from fusionnet.serving.model import ModelHandler

    vote, folder = saved
    x = torch.rand(3, 3, 32, 32)
    handler = ModelHandler([str(folder)], device="cpu")
    probs, parts = handler.predict(x)
    info = handler.info()
    assert info["kind"] == "vote" and info["members"] == ["resnet", "effnet"] and info["input_size"] == 32
    assert [w["weight"] for w in info["weights"]] == WEIGHTS
    assert torch.allclose(probs, _probs(vote, x), atol=1e-6) and set(parts) == {"resnet", "effnet"}
    data = make_splits(tmp_path / "data", per_class=2)
    assert main(["predict", str(folder), "--images", str(data / "test"), "--out", str(tmp_path / "p.csv")]) == 0
    assert (tmp_path / "p.csv").read_text().startswith("path,class,probability,error")
    capsys.readouterr()
    assert main(["predict", str(folder), "--images", str(data / "test"), "--size", "48", "--out",
                 str(tmp_path / "p48.csv")]) == 0
    assert "at 48 px" in capsys.readouterr().out  # --size is the command's, as for one model
    assert main(["export", str(folder), "--out", str(tmp_path / "vote.onnx")]) == 0
    session = ort.InferenceSession(str(tmp_path / "vote.onnx"), providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta().custom_metadata_map
    assert json.loads(meta["class_names"]) == CLASSES and meta["input_size"] == "32" and "vote" in meta
    (logits,) = session.run(None, {"images": x.numpy()})
    assert torch.allclose(torch.from_numpy(logits).softmax(1), _probs(vote, x), atol=1e-4)


def _broken(folder: Path, tmp_path: Path, how: str) -> Path:
    bad = tmp_path / how
    shutil.copytree(folder, bad)
    config = json.loads((bad / "config.json").read_text())
    if how == "missing_member":
        shutil.rmtree(bad / "members" / "effnet")
    elif how == "newer":
        config["format_version"] = 99
    elif how in ("weights_sum", "negative"):
        config["members"][0]["weight"] = 0.7 if how == "weights_sum" else -0.625
    elif how == "damaged":
        weights = bad / "members" / "resnet" / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:100])
    elif how == "not_a_number":
        config["members"][0]["weight"] = "x"
    elif how == "outside":
        config["members"][0]["name"] = "../../elsewhere"
    elif how == "hard":
        config["voting"] = "hard"
    (bad / "config.json").write_text(json.dumps(config))
    return bad


@pytest.mark.parametrize("how, says", [("missing_member", "lists member 'effnet'.* not a model folder"),
                                       ("newer", "format version 99 .* upgrade fusionnet"),
                                       ("weights_sum", "sum to 1.075, not 1"),
                                       ("negative", "finite and non-negative"),
                                       ("damaged", "resnet/model.safetensors' cannot be read .* damaged"),
                                       ("not_a_number", "no valid member table"),
                                       ("outside", "no valid member table"),
                                       ("hard", "'voting' must be 'soft'")])
def test_a_bad_vote_folder_is_one_line_and_writes_nothing(saved, tmp_path, capsys, how, says):
    import re

    if how == "not_a_number":  # and in Python: a clear error, not fusionnet.save's file that nothing reads
        with pytest.raises(ConfigError, match="saved as a folder of its members"):
            fusionnet.save(saved[0], tmp_path / "vote.pth")

    bad = _broken(saved[1], tmp_path, how)
    (tmp_path / "images").mkdir()
    capsys.readouterr()
    assert main(["predict", str(bad), "--images", str(tmp_path / "images"), "--out", str(tmp_path / "p.csv")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.search(says, err), err
    assert not (tmp_path / "p.csv").exists()


def test_a_vote_teaches_but_is_refused_where_one_model_is_needed(saved, tmp_path, capsys):
    from fusionnet.workflows.distill import load_teacher

    x = torch.rand(2, 3, 32, 32)
    teacher, _ = load_teacher([str(saved[1])], ["c", "b", "a"])  # distill --teacher: the vote, in the data's order
    assert torch.allclose(_probs(teacher, x), _probs(saved[0], x)[:, [2, 1, 0]], atol=1e-6)
    data = make_splits(tmp_path / "data", per_class=2)
    capsys.readouterr()
    assert main(["fuse", "--members", str(saved[1]), str(saved[1] / "members" / "resnet"), "--data", str(data),
                 "--out", str(tmp_path / "f")]) == 2
    err = capsys.readouterr().err
    assert "is a vote folder" in err and "members/<name>" in err and not (tmp_path / "f").exists()


def test_fuse_writes_its_selected_ensemble_as_a_vote_folder(saved, tmp_path, capsys):
    from fusionnet.ensembles.voting import MemberOutputs

    data = make_splits(tmp_path / "data", per_class=6)
    members = [str(saved[1] / "members" / name) for name in ("resnet", "effnet")]  # two model folders
    assert main(["fuse", "--members", *members, "--data", str(data),
                 "--heads", "from_members", "--epochs", "1", "--no-progress", "--out", str(tmp_path / "fused")]) == 0
    assert "vote folder" in capsys.readouterr().out
    report = json.loads((tmp_path / "fused" / "fuse.json").read_text())
    vote = fusionnet.load(tmp_path / "fused" / "vote")
    assert report["vote"] == str(tmp_path / "fused" / "vote")
    assert vote.method in ("soft voting", "greedy selection (Caruana)") and "Vote: the selected ensemble" in (
        tmp_path / "fused" / "fuse.md").read_text()
    assert main(["predict", str(tmp_path / "fused" / "vote"), "--data", str(data), "--split", "test",
                 "--out", str(tmp_path / "y.pt")]) == 0
    ours = MemberOutputs.load(tmp_path / "y.pt")
    saved = [MemberOutputs.load(tmp_path / "fused" / "outputs" / f"{n}_test.pt") for n in vote.names]
    assert torch.allclose(ours.probs, soft_vote(torch.stack([o.probs for o in saved]), vote.weights), atol=1e-5)
    assert ours.probs.argmax(1).tolist() == report["methods"]["selected:ensemble"]["pred"]
    from types import SimpleNamespace

    from fusionnet.workflows.runs import write_vote

    stacked = SimpleNamespace(rows={"selected:ensemble": {"chosen": "stacking"}})  # not a vote: nothing written
    assert "not a weighted soft vote" in write_vote(stacked, {}, [], tmp_path / "none")
    assert not (tmp_path / "none").exists()


def test_compare_writes_its_selected_ensemble_as_a_vote_folder(tmp_path):
    """(With --keep outputs it writes none: tests/test_compare.py.)"""
    data = make_splits(tmp_path / "data", per_class=8)
    tiny = ["--data", str(data), "--epochs", "1", "--size", "32", "--no-progress", "--backbones",
            "timm/test_efficientnet", "timm/test_resnet", "--no-pretrained", "--variants", "late_oof"]
    assert main(["compare", *tiny, "--out", str(tmp_path / "c")]) == 0
    results = json.loads((tmp_path / "c" / "results.json").read_text())
    assert results["selected"]["ensemble"]["vote"] == str(tmp_path / "c" / "vote")
    vote = fusionnet.load(tmp_path / "c" / "vote")
    assert vote.input_size == 32 and vote.class_names == ["a", "b", "c"]
    assert main(["predict", str(tmp_path / "c" / "vote"), "--data", str(data), "--split", "test",
                 "--out", str(tmp_path / "y.pt")]) == 0
    from fusionnet.ensembles.voting import MemberOutputs

    assert MemberOutputs.load(tmp_path / "y.pt").probs.argmax(1).tolist() == \
        results["methods"]["selected:ensemble"]["pred"]


@pytest.mark.parametrize("method", ["soft", "weighted", "greedy", "exhaustive", "temperature"])
def test_the_vote_a_run_writes_gives_its_ensemble_methods_probabilities(method, tmp_path):
    """For every method that declares itself a vote: the folder write_vote makes from a run's table gives, on the
    test images, the probabilities the method computed from the members' saved outputs, on confident members (large
    logit gaps, where a temperature applied to logits instead of to probabilities would differ) - weights,
    temperatures, dropped members and the ensemble temperature included."""
    from types import SimpleNamespace

    from fusionnet.ensembles.methods import ENSEMBLES, MemberProbs
    from fusionnet.workflows.runs import write_vote

    torch.manual_seed(1)
    members = []
    for i, backbone in enumerate(("timm/test_resnet", "timm/test_efficientnet", "timm/test_resnet")):
        m = create_fusionnet([backbone], class_names=CLASSES, image_size=32).eval()
        with torch.no_grad():
            m.head.fc.weight.mul_(60 * (i + 1))  # logit gaps of tens to hundreds
        members.append(m)
    x_val, x_test = torch.rand(30, 3, 32, 32), torch.rand(12, 3, 32, 32)
    probs = {split: torch.stack([_probs(m, x) for m in members]) for split, x in (("val", x_val), ("test", x_test))}
    labels = torch.randint(0, 3, (30,), generator=torch.Generator().manual_seed(0))  # no member dominates: the
    # NLL-fitted and greedy weights mix two members (and drop one), the temperatures stay moderate (33-66 where
    # the logit gaps reach 39)
    member_probs = MemberProbs(probs["val"], labels, probs["test"], 0)
    res = ENSEMBLES.get(method).run(member_probs)
    table = SimpleNamespace(rows={"selected:ensemble": {"chosen": method, "probs": res.test, "acc": 1.0}},
                            member_probs=lambda seed: member_probs)
    note = write_vote(table, dict(zip(["m1", "m2", "m3"], members)), [None] * 3, tmp_path / "vote")
    assert "written as a vote folder" in note, note
    vote = fusionnet.load(tmp_path / "vote")
    assert (probs["test"] < 1e-12).any()  # confident: probabilities below the clamp, logit gaps over 27.6
    assert torch.allclose(_probs(vote, x_test), res.test, atol=2e-5)
    assert len(vote.names) == sum(w > 0 for w in (res.weights or [1, 1, 1]))
    if method == "greedy":
        assert len(vote.names) == 2 and min(vote.weights.tolist()) > 0.1  # a real mixture, one member dropped
    # the run's folder: a rerun replaces it; a vote that cannot be written is one line, never a lost run
    assert "written as a vote folder" in write_vote(table, dict(zip(["m1", "m2", "m3"], members)), [None] * 3,
                                                     tmp_path / "vote")
    (tmp_path / "file").write_text("x")
    assert "could not be written" in write_vote(table, dict(zip(["m1", "m2", "m3"], members)), [None] * 3,
                                                 tmp_path / "file" / "vote")
