import pytest
import torch

from fusionnet import FusionNet
from fusionnet.diagnostics.branches import branch_ablation, embedding_2d, linear_probes


def _informative_and_noise(n=60, seed=0):
    """Branch test_efficientnet ('signal') separates the classes; branch test_resnet ('noise') does not."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 2
    signal = torch.randn(n, 4, generator=g) * 0.3 + labels[:, None].float() * 2
    noise = torch.randn(n, 4, generator=g)
    return {"test_efficientnet": signal, "test_resnet": noise}, labels


def test_ablation_and_probes_find_the_informative_branch():
    feats, labels = _informative_and_noise()
    model = FusionNet(backbones=["timm/test_efficientnet", "timm/test_resnet"], num_classes=2)
    # a head on the toy 4+4 features that reads only the first 'signal' feature: logit_1 - logit_0 = 4 * (x - 1)
    with torch.no_grad():
        model.head.fc = torch.nn.Linear(8, 2)
        model.head.fc.weight.zero_()
        model.head.fc.bias.copy_(torch.tensor([2.0, -2.0]))
        model.head.fc.weight[1, 0] = 4.0
    result = branch_ablation(model, feats, labels)
    assert result["all"] == 1.0 and result["only test_efficientnet"] == 1.0
    assert result["without test_efficientnet"] == 0.5 and result["without test_resnet"] == 1.0

    test_feats, test_labels = _informative_and_noise(seed=1)
    probes = linear_probes(feats, labels, test_feats, test_labels)
    assert probes["test_efficientnet"] > 0.95 and probes["test_resnet"] < 0.8 and probes["concatenated"] > 0.9
    assert embedding_2d(feats["test_efficientnet"]).shape == (60, 2)


def test_linear_cka_is_one_on_itself_and_invariant_to_rotation_and_scale():
    from fusionnet.diagnostics.branches import cka_matrix, linear_cka

    torch.manual_seed(0)
    x = torch.randn(50, 8)
    q, _ = torch.linalg.qr(torch.randn(8, 8))
    assert linear_cka(x, x) == pytest.approx(1.0)
    assert linear_cka(x, 3.5 * x @ q) == pytest.approx(1.0)
    assert linear_cka(x, torch.randn(50, 8)) < 0.5
    names, m = cka_matrix({"a": x, "b": x @ q, "c": torch.randn(50, 4)})
    assert names == ["a", "b", "c"] and m[0, 1] == pytest.approx(1.0) and m[0, 2] < 0.5 and (m == m.T).all()


def test_grad_cam_maps_lie_in_unit_range_at_image_size():
    from fusionnet.diagnostics.branches import grad_cam

    model = FusionNet(backbones=["timm/test_resnet", "timm/test_efficientnet"], num_classes=3, freeze_trunks=True)
    cam = grad_cam(model, torch.rand(2, 3, 32, 32), "test_resnet")
    assert cam.shape == (2, 32, 32) and cam.min() >= 0 and cam.max() <= 1 + 1e-6
