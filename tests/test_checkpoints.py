import os

import pytest
import torch
import torchvision
from safetensors.torch import save_file

from fusionnet import CheckpointMismatchError, FusionNet, create_fusionnet
from fusionnet.models.factory import load_fusionnet, save_model
from fusionnet.models.checkpoints import inspect_checkpoint, read_state_dict
from fusionnet.models import checkpoints as ckpt


@pytest.fixture(scope="module")
def googlenet_aux3():
    """A GoogLeNet as practitioners train it: aux heads on, 3-class fc, saved from DataParallel with metadata."""
    torch.manual_seed(0)
    model = torchvision.models.googlenet(weights=None, aux_logits=True, num_classes=3, init_weights=True)
    return model.eval()


def _save(tmp_path, name, obj):
    path = tmp_path / name
    torch.save(obj, path)
    return path


def test_wrappers_prefixes_and_safetensors_read_the_same(tmp_path):
    sd = torchvision.models.resnet18(weights=None).state_dict()
    files = {
        "plain.pth": sd,
        "wrapped.pth": {"state_dict": sd, "epoch": 3},
        "model.pth": {"model": sd},
        "msd.pth": {"model_state_dict": sd, "optimizer_state_dict": {}, "best_acc": 0.9},
        "ddp.pth": {f"module.{k}": v for k, v in sd.items()},
        "compiled.pth": {f"_orig_mod.{k}": v for k, v in sd.items()},
        "ddp_compiled.pth": {"state_dict": {f"module._orig_mod.{k}": v for k, v in sd.items()}},
    }
    for name, obj in files.items():
        state, source = read_state_dict(_save(tmp_path, name, obj))
        assert state.keys() == sd.keys() and all(torch.equal(state[k], sd[k]) for k in sd), name
    save_file({k: v.contiguous() for k, v in sd.items()}, tmp_path / "w.safetensors")
    state, _ = read_state_dict(tmp_path / "w.safetensors")
    assert all(torch.equal(state[k], sd[k]) for k in sd)
    _, source = read_state_dict(tmp_path / "ddp_compiled.pth")
    assert source.wrapper == "state_dict" and source.prefixes == ["module.", "_orig_mod."]


def test_googlenet_with_aux_heads_and_3_class_fc_loads_and_keeps_its_head(tmp_path, googlenet_aux3):
    sd = {f"module.{k}": v for k, v in googlenet_aux3.state_dict().items()}
    path = _save(tmp_path, "googlenet_best.pth", {"model_state_dict": sd, "epoch": 12})
    model = create_fusionnet(backbones=["googlenet"], num_classes=3, checkpoints={"googlenet": path}).eval()
    report = model.load_reports["googlenet"]
    assert report.head_kept
    assert any(k.startswith("aux1.") for k in report.dropped) and any(k.startswith("aux2.") for k in report.dropped)
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():  # the branch normalises with 0.5/0.5 itself; the original got that input directly
        torch.testing.assert_close(model(x), googlenet_aux3((x - 0.5) / 0.5), rtol=1e-4, atol=1e-5)


def test_googlenet_checkpoint_with_other_class_count_loads_its_trunk_only(tmp_path, googlenet_aux3):
    sd = {k: v for k, v in googlenet_aux3.state_dict().items() if not k.startswith("aux")}  # no aux heads: fine
    model = create_fusionnet(backbones=["googlenet"], num_classes=7, checkpoints={"googlenet": _save(tmp_path, "g.pth", sd)})
    assert not model.load_reports["googlenet"].head_kept
    trunk = model.branches["googlenet"].trunk.state_dict()
    assert torch.equal(trunk["inception5b.branch1.conv.weight"], sd["inception5b.branch1.conv.weight"])


def test_vgg16_checkpoint_into_vgg16_bn_names_the_architecture(vgg16_files):
    reference, path = vgg16_files["vgg16"]
    with pytest.warns(UserWarning, match="not one Linear layer"):  # its 3-layer classifier: vgg16_mlp keeps it
        model = create_fusionnet(backbones=["vgg16"], num_classes=3, checkpoints={"vgg16": path})
    assert torch.equal(model.branches["vgg16"].trunk.state_dict()["features.28.weight"],
                       reference.state_dict()["features.28.weight"])
    with pytest.raises(CheckpointMismatchError,
                       match=r"was trained with 'vgg16' \(without BatchNorm\), but the branch is 'vgg16_bn'; "
                             r"build the branch as 'vgg16' instead"):
        create_fusionnet(backbones=["vgg16_bn"], num_classes=3, checkpoints={"vgg16_bn": path})
    with pytest.raises(CheckpointMismatchError, match=r"trained with 'vgg16_bn' \(with BatchNorm\)"):
        create_fusionnet(backbones=["vgg16"], num_classes=3, checkpoints={"vgg16": vgg16_files["vgg16_bn"][1]})


def test_other_mismatches_are_listed_compactly(tmp_path):
    path = _save(tmp_path, "r18.pth", torchvision.models.resnet18(weights=None).state_dict())
    with pytest.raises(CheckpointMismatchError) as err:
        create_fusionnet(backbones=["resnet50"], num_classes=2, checkpoints={"resnet50": path})
    msg = str(err.value)
    assert "does not fit backbone 'resnet50' (it looks like 'resnet18')" in msg
    assert "missing:" in msg and "wrong shape:" in msg and "more" in msg
    assert len(msg.splitlines()) <= 4  # a diagnosis, not a dump of hundreds of keys


def test_checkpoint_path_with_a_stray_space_is_shown_quoted(tmp_path):
    (tmp_path / "weights").mkdir()
    torch.save({}, tmp_path / "weights" / "googlenet_best.pth")
    bad = f"{tmp_path}/weights /googlenet_best.pth"
    with pytest.raises(FileNotFoundError) as err:
        create_fusionnet(backbones=["googlenet"], num_classes=3, checkpoints={"googlenet": bad})
    assert repr(bad) in str(err.value)
    assert "'weights ' have leading/trailing spaces" in str(err.value)
    assert f"did you mean {str(tmp_path / 'weights' / 'googlenet_best.pth')!r}" in str(err.value)


def test_checkpoint_key_must_name_a_branch(tmp_path, googlenet_aux3):
    path = _save(tmp_path, "g.pth", googlenet_aux3.state_dict())
    with pytest.raises(ValueError, match="checkpoint key 'resnet18' matches no branch; branches: googlenet"):
        create_fusionnet(backbones=["googlenet"], num_classes=3, checkpoints={"resnet18": path})


def test_inspect_reports_what_a_checkpoint_is(tmp_path, googlenet_aux3, vgg16_files):
    sd = {f"module.{k}": v for k, v in googlenet_aux3.state_dict().items()}
    info = inspect_checkpoint(_save(tmp_path, "g.pth", {"state_dict": sd}))
    assert info.architecture == "googlenet" and info.num_classes == 3
    assert info.aux_heads == ["aux1", "aux2"] and info.aux_classes == 3
    assert info.wrapper == "state_dict" and info.prefixes == ["module."]
    assert info.num_keys == len(sd)
    assert "aux heads:    aux1, aux2 (3 classes)" in info.summary()
    for arch in ("vgg16", "vgg16_bn"):
        assert inspect_checkpoint(vgg16_files[arch][1]).architecture == arch
    for arch, builder in [("resnet50", torchvision.models.resnet50), ("mobilenet_v2", torchvision.models.mobilenet_v2)]:
        path = _save(tmp_path, f"{arch}.pth", builder(weights=None).state_dict())
        assert inspect_checkpoint(path).architecture == arch


def test_own_single_branch_checkpoint_feeds_a_branch_of_a_fusion_model(tmp_path):
    member = FusionNet(backbones=["resnet18"], num_classes=3).eval()
    path = save_model(member, tmp_path / "member.pt")
    fused = create_fusionnet(backbones=["resnet18", "mobilenet_v2"], num_classes=3, checkpoints={"resnet18": path})
    a = member.branches["resnet18"].trunk.state_dict()
    b = fused.branches["resnet18"].trunk.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    single = create_fusionnet(backbones=["resnet18"], num_classes=3, checkpoints={"resnet18": path}).eval()
    assert single.load_reports["resnet18"].head_kept
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(single(x), member(x))


def test_a_crash_mid_write_leaves_the_old_checkpoint_intact(tmp_path, monkeypatch):
    model = FusionNet(backbones=["resnet18"], num_classes=2)
    path = save_model(model, tmp_path / "best.pth", metrics={"epoch": 1})
    before = path.read_bytes()

    def crash(obj, f, *a, **k):
        f.write(b"partial garbage")
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt.torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        save_model(model, path, metrics={"epoch": 2})
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["best.pth"]  # no temporary file left behind


def test_plain_state_dict_is_not_mistaken_for_our_format(tmp_path):
    path = _save(tmp_path, "plain.pth", torchvision.models.resnet18(weights=None).state_dict())
    with pytest.raises(CheckpointMismatchError, match="is not a fusionnet checkpoint.*checkpoints="):
        load_fusionnet(path)


def test_pickled_whole_model_gets_a_resave_hint(tmp_path):
    path = _save(tmp_path, "whole.pth", torchvision.models.resnet18(weights=None))
    with pytest.raises(CheckpointMismatchError, match=r"torch.save\(model.state_dict\(\), path\)"):
        read_state_dict(path)


def test_a_trained_classifier_that_cannot_be_kept_is_never_dropped_silently(tmp_path):
    """VGG's three-layer classifier (here: an MLP head on a plain torchvision resnet18) cannot become FusionNet's
    one Linear head: loading it says so, instead of attaching a random head without a word."""
    import warnings

    import torchvision

    from fusionnet import create_fusionnet

    net = torchvision.models.resnet18(num_classes=3)
    net.fc = torch.nn.Sequential(torch.nn.Linear(512, 64), torch.nn.ReLU(), torch.nn.Linear(64, 3))
    torch.save(net.state_dict(), tmp_path / "mlp_head.pth")
    with pytest.warns(UserWarning, match=r"trained classifier for 3 classes \(fc.0.weight \(64, 512\), fc.2.weight "
                                         r"\(3, 64\)\) is not one Linear layer"):
        model = create_fusionnet(["resnet18"], num_classes=3, checkpoints={"resnet18": tmp_path / "mlp_head.pth"})
    assert not model.load_reports["resnet18"].head_kept
    plain = torchvision.models.resnet18(num_classes=3)
    torch.save(plain.state_dict(), tmp_path / "linear_head.pth")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a Linear head is kept: nothing to say
        kept = create_fusionnet(["resnet18"], num_classes=3, checkpoints={"resnet18": tmp_path / "linear_head.pth"})
    assert kept.load_reports["resnet18"].head_kept
