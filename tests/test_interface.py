"""The model interface, pooling layouts, fusion variants, fusing trained members, and the balancing remedies."""

import pytest
import torch
from torch import nn

from fusionnet import BranchConfig, ConfigError, FusionNet, TrainConfig, create_fusionnet, fit, fuse_members
from fusionnet.models.factory import load_fusionnet, save_model
from fusionnet.engine.callbacks import Callback, GradientModulation, ogm_coefficients
from fusionnet.models.fusers import branch_dropout
from fusionnet.models.interface import ModelOutput, PlainClassifier, as_classifier
from fusionnet.models.pooling import Pool

TINY = ["timm/test_efficientnet", "timm/test_resnet"]


class Data(torch.utils.data.Dataset):
    class_names = ["a", "b", "c"]

    def __init__(self, n=12, size=32, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.y = torch.arange(n) % 3
        self.x = torch.rand(n, 3, size, size, generator=g) * 0.3 + self.y.view(-1, 1, 1, 1) * 0.3
        self.labels = self.y.tolist()

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], int(self.y[i])


def _cfg(**kw):
    return TrainConfig(**{"epochs": 1, "batch_size": 4, "progress": False, "warmup_epochs": 0, **kw})


def test_a_plain_module_trains_full_and_refuses_frozen():
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 3))
    before = net[1].weight.clone()
    fit(net, Data(), Data(seed=1), _cfg(), log=None)
    assert not torch.equal(before, net[1].weight)
    assert isinstance(as_classifier(net), PlainClassifier) and as_classifier(as_classifier(net)) is not net
    with pytest.raises(ConfigError, match="has no trunk stages to freeze; use strategy='full'"):
        fit(net, Data(), Data(), _cfg(strategy="frozen"), log=None)


def test_pool_layouts_agree_and_tokens_skip_prefix_tokens():
    x = torch.rand(2, 5, 3, 4)  # (B, C, h, w)
    for kind in ("avg", "max", "avgmax", "catavgmax"):
        torch.testing.assert_close(Pool(kind, "NCHW")(x), Pool(kind, "NHWC")(x.permute(0, 2, 3, 1)))
    tokens = torch.rand(2, 7, 5)  # (B, N, C) with one class token
    torch.testing.assert_close(Pool("avg", "NLC", 1)(tokens), tokens[:, 1:].mean(1))
    torch.testing.assert_close(Pool("token", "NLC", 1)(tokens), tokens[:, 0])
    with pytest.raises(ConfigError, match="pool 'token' takes the class token"):
        Pool("token", "NCHW")


def test_transformer_nhwc_and_convnext_branches_train_together():
    model = FusionNet(backbones=["timm/test_vit", "timm/test_mambaout", "timm/test_convnext"], num_classes=3)
    dims = {n: br.out_dim for n, br in model.branches.items()}
    assert dims == {"test_vit": 64, "test_mambaout": 64, "test_convnext": 64}
    assert model.branches["test_vit"].input_size == 160  # a ViT takes its own size only: resized inside
    out = model.forward_output(torch.rand(2, 3, 32, 32))
    out.logits.sum().backward()
    grads = {n: any(p.grad is not None and p.grad.abs().sum() > 0 for p in br.parameters())
             for n, br in model.branches.items()}
    assert grads == {"test_vit": True, "test_mambaout": True, "test_convnext": True}


def tapped_member(member: FusionNet) -> FusionNet:
    (b,) = member.config.branches
    return FusionNet(backbones=[BranchConfig(b.backbone, taps=2)], num_classes=3, class_names=member.class_names)


@pytest.mark.parametrize("fusion", ["concat", "gated"])
def test_fusing_members_starts_at_the_mean_of_their_logits(tmp_path, fusion):
    torch.manual_seed(0)
    members = [FusionNet(backbones=[b], num_classes=3, class_names=["a", "b", "c"]).eval() for b in TINY]
    for m in members:  # members as if trained: heads far from their initialisation
        nn.init.normal_(m.head.fc.weight, std=0.5)
        nn.init.normal_(m.head.fc.bias, std=0.5)
    save_model(members[1], tmp_path / "m1.pth")
    fused = fuse_members([members[0], tmp_path / "m1.pth"], fusion=fusion)
    x = torch.rand(4, 3, 32, 32)
    mean = torch.stack([m(x) for m in members]).mean(0)
    torch.testing.assert_close(fused(x), mean, rtol=1e-5, atol=1e-5)
    assert all(not p.requires_grad for br in fused.branches.values() for p in br.trunk.parameters())
    # with earlier trunk levels added to every branch (weight 0 in the members' heads): the same start
    tapped = fuse_members(members, fusion=fusion, taps=2)
    assert all(len(br.taps) == 2 for br in tapped.branches.values())
    torch.testing.assert_close(tapped(x), mean, rtol=1e-5, atol=1e-5)
    with pytest.raises(ConfigError, match="has 2 taps, more than the fused branch's 1"):
        fuse_members([tapped_member(members[0]), members[1]], fusion=fusion, taps=1)
    with pytest.raises(ConfigError, match="members must be trained on the same classes"):
        fuse_members([members[0], FusionNet(backbones=["timm/test_resnet"], num_classes=4)])


def test_fusing_members_refuses_a_method_that_cannot_start_from_their_heads():
    members = [FusionNet(backbones=[b], num_classes=3, class_names=["a", "b", "c"]) for b in TINY]
    with pytest.raises(ConfigError, match=r"fusion 'attention' cannot start from the members' heads.*"
                                          r"\(concat, gated, late\)"):
        fuse_members(members, fusion="attention")
    with pytest.raises(ConfigError, match="head_hidden=64: a hidden head layer cannot start"):
        fuse_members(members, head_hidden=64)


def test_gate_and_attention_weights_sum_to_one_over_branches():
    x = torch.rand(3, 3, 32, 32)
    for fusion, key in (("gated", "gates"), ("attention", "attention")):
        model = FusionNet(backbones=TINY, num_classes=3, fusion=fusion)
        with torch.no_grad():
            for p in model.fuser.parameters():
                p.add_(torch.randn_like(p) * 0.1)  # away from the uniform start
        w = model.forward_output(x).extras[key]
        assert w.shape == (3, 2)
        torch.testing.assert_close(w.sum(1), torch.ones(3))
        assert not torch.allclose(w, torch.full_like(w, 0.5))


def test_branch_dropout_never_drops_every_branch_rescales_and_is_off_in_eval():
    torch.manual_seed(0)
    feats = [torch.ones(500, 4), torch.ones(500, 4), torch.ones(500, 4)]
    out = branch_dropout(feats, p=0.9, training=True)
    kept = torch.stack([o[:, 0] > 0 for o in out], 1)  # (B, M)
    assert kept.any(1).all() and not kept.all()
    scale = torch.stack([o[:, 0] for o in out], 1).sum(1)  # kept ones carry M / kept each: sum is M
    torch.testing.assert_close(scale, torch.full((500,), 3.0))
    assert all(o is f for o, f in zip(branch_dropout(feats, p=0.9, training=False), feats))
    model = FusionNet(backbones=TINY, num_classes=3, branch_dropout=0.5).eval()
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(model(x), model(x))


def test_branch_heads_receive_gradients_through_the_aux_loss():
    model = FusionNet(backbones=TINY, num_classes=3, branch_heads=True)
    before = {n: h.weight.clone() for n, h in model.branch_heads.items()}
    fit(model, Data(), Data(seed=1), _cfg(aux_weight=0.5), log=None)
    assert all(not torch.equal(before[n], h.weight) for n, h in model.branch_heads.items())
    out = model.train().forward_output(torch.rand(2, 3, 32, 32))
    assert set(out.aux) == {"branch:test_efficientnet", "branch:test_resnet"}


def test_ogm_coefficient_damps_only_the_dominant_branch():
    y = torch.tensor([0, 1, 2, 0])
    strong = torch.nn.functional.one_hot(y, 3).float() * 10  # predicts the labels confidently
    weak = torch.zeros(4, 3)  # uniform
    k = ogm_coefficients([strong, weak], y, alpha=0.5)
    rho = (4 * 1.0) / (4 / 3)  # scores: ~4 vs 4/3
    assert k[1] == 1.0 and k[0] == pytest.approx(1 - torch.tanh(torch.tensor(0.5 * (rho - 1))).item(), rel=1e-3)
    # a training callback: the config switches it on, the loop calls it after every backward pass
    seen = GradientModulation(0.5)
    model = FusionNet(backbones=TINY, num_classes=3)
    fit(model, Data(), Data(seed=1), _cfg(ogm_alpha=0.5), log=None, callbacks=[seen])
    assert set(seen.last) == set(model.branches) and all(0 < k <= 1 for k in seen.last.values())
    with pytest.raises(ConfigError, match="OGM-GE"):
        fit(FusionNet(backbones=TINY, num_classes=3, fusion="attention"), Data(), Data(seed=1), _cfg(ogm_alpha=0.5),
            log=None)


def test_callbacks_are_called_at_their_points_and_released_after_a_failure():
    calls = []

    class Spy(Callback):
        def on_fit_start(self, model):
            calls.append("start")

        def extra_loss(self, model, output, target):
            calls.append("loss")
            return {"zero": output.logits.sum() * 0}

        def on_after_backward(self, model, output, target):
            assert any(p.grad is not None for p in model.parameters())  # after backward, before the step
            calls.append("backward")

        def on_fit_end(self, model):
            calls.append("end")

    fit(FusionNet(backbones=TINY, num_classes=3), Data(), Data(seed=1), _cfg(epochs=1), log=None, callbacks=[Spy()])
    assert calls[0] == "start" and calls[-1] == "end" and calls[1:3] == ["loss", "backward"]

    class Boom(Callback):
        def on_after_backward(self, model, output, target):
            raise RuntimeError("boom")

    model = FusionNet(backbones=TINY, num_classes=3)
    with pytest.raises(RuntimeError, match="boom"):
        fit(model, Data(), Data(seed=1), _cfg(epochs=1, checkpoint_activations=True), log=None, callbacks=[Boom()])
    assert model.checkpoint_activations is False  # the trick's switch is released even when training fails


def test_fusion_variants_save_and_load_bit_identically(tmp_path):
    x = torch.rand(2, 3, 32, 32)
    for fusion in ("gated", "attention"):
        model = FusionNet(backbones=TINY, num_classes=3, fusion=fusion, branch_heads=True).eval()
        loaded = load_fusionnet(save_model(model, tmp_path / f"{fusion}.pth"))
        assert torch.equal(model(x), loaded(x))


def test_model_output_is_what_training_sees():
    model = FusionNet(backbones=[BranchConfig("timm/test_resnet", pool="catavgmax")], num_classes=3)
    out = model.forward_output(torch.rand(2, 3, 32, 32))
    assert isinstance(out, ModelOutput) and out.logits.shape == (2, 3) and dict(out.aux) == {}
    assert create_fusionnet(["timm/test_resnet"], num_classes=3).config.branches[0].name == "test_resnet"


@pytest.mark.parametrize("branches", [TINY, [BranchConfig("googlenet", aux_heads=True)]], ids=["tiny", "googlenet-aux"])
def test_trunk_checkpointing_gives_the_same_gradients_and_saves_fewer_activations(branches):
    def run(checkpoint):
        torch.manual_seed(0)
        model = FusionNet(backbones=branches, num_classes=3).train()
        model.set_activation_checkpointing(checkpoint)
        for m in model.modules():  # BatchNorm would update its statistics twice under recomputation
            if isinstance(m, nn.BatchNorm2d):
                m.eval()
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel() * t.element_size()) or t,
                                                      lambda t: t):
            out = model.forward_output(torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1)))
            loss = out.logits.sum() + sum(a.sum() for a in out.aux.values())  # GoogLeNet's aux heads too
        loss.backward()
        return [p.grad.clone() for p in model.parameters() if p.grad is not None], sum(saved)

    plain, plain_bytes = run(False)
    ckpt, ckpt_bytes = run(True)
    assert len(plain) == len(ckpt) and all(torch.allclose(a, b, atol=1e-6) for a, b in zip(plain, ckpt))
    assert ckpt_bytes < 0.3 * plain_bytes
