"""The offline EfficientNet-Lite weights: the remap is complete, and classifies real photos like the reference."""

import glob

import pytest
import timm
import torch

from fusionnet import create_fusionnet
from fusionnet.workflows.demo import imagenet_model, load_image, sample_photo_paths
from fusionnet.models.efficientnet_lite import STAGE_REPEATS, lite_package_path, load_lite_package_state_dict


@pytest.mark.parametrize("arch", sorted(STAGE_REPEATS))
def test_remapped_keys_fit_timm_one_to_one(arch):
    state = load_lite_package_state_dict(arch)
    expected = timm.create_model(arch).state_dict()
    assert state.keys() == expected.keys()
    assert all(state[k].shape == expected[k].shape for k in expected)


def test_the_weight_file_is_read_once_and_each_caller_gets_its_own_dict(monkeypatch):
    import fusionnet.models.efficientnet_lite as lite

    first = load_lite_package_state_dict("tf_efficientnet_lite0")
    first.pop("classifier.weight")  # a caller's change to its dict reaches no other caller
    monkeypatch.setattr(lite.torch, "load", lambda *a, **k: pytest.fail("read the weight file again"))
    again = load_lite_package_state_dict("tf_efficientnet_lite0")
    assert "classifier.weight" in again and again is not first
    model = create_fusionnet(["efficientnet_lite0"], num_classes=3, pretrained=True)
    assert torch.equal(model.branches["efficientnet_lite0"].trunk.conv_stem.weight, again["conv_stem.weight"])


def _reference(n: int, size: int):
    from efficientnet_lite_pytorch import EfficientNet

    ref = EfficientNet.from_name(f"efficientnet-lite{n}", image_size=size)
    ref.load_state_dict(torch.load(lite_package_path(f"tf_efficientnet_lite{n}"), weights_only=True))
    return ref.eval()


def test_trunk_classifies_real_photos_like_the_packaged_model(flowers_root):
    paths = sample_photo_paths() + sorted(glob.glob(str(flowers_root / "test" / "daisy" / "*.jpg")))[:6]
    x = torch.stack([load_image(p, 224) for p in paths])
    ours = imagenet_model("efficientnet_lite0")
    with torch.no_grad():
        a, b = ours(x), _reference(0, 224)((x * 255 - 127) / 128)
    assert torch.equal(a.argmax(1), b.argmax(1))
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert (a.argmax(1) == 985).sum() >= 2  # ImageNet's "daisy": the weights are real, not just consistent


def test_pretrained_true_uses_the_package_offline():
    model = create_fusionnet(backbones=["efficientnet_lite1"], num_classes=5, pretrained=True)
    state = load_lite_package_state_dict("tf_efficientnet_lite1")
    trunk = model.branches["efficientnet_lite1"].trunk.state_dict()
    assert all(torch.equal(trunk[k], state[k]) for k in trunk)
