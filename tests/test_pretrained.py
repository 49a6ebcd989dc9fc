"""The folder format (config.json, model.safetensors, README.md): written by save_pretrained and export --format hf,
read back bit-identically (in a fresh process too), by a Hugging Face Hub id from the local cache offline, by every
command that takes a model; a bad folder is one line."""

import json
import subprocess
import sys

import pytest
import torch

import fusionnet
from fusionnet import CheckpointMismatchError, FusionNet, MissingFileError, create_fusionnet
from fusionnet.models.factory import save_model
from toydata import make_splits

TINY = ["timm/test_resnet", "timm/test_efficientnet"]


def _model():
    torch.manual_seed(0)
    return create_fusionnet(TINY, class_names=["a", "b", "c"], fusion="gated", image_size=32).eval()


def test_a_folder_holds_no_pickle_and_reads_back_bit_identically_in_a_fresh_process(tmp_path):
    model, x = _model(), torch.rand(2, 3, 32, 32)
    folder = model.save_pretrained(tmp_path / "m", metrics={"val_acc": 0.5})
    assert sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) == [
        "README.md", "config.json", "model.safetensors"]  # (and the staging record of what was written)
    config = json.loads((folder / "config.json").read_text())  # plain JSON
    assert config["class_names"] == ["a", "b", "c"] and config["model"]["fusion"] == "gated"
    assert not (folder / "model.safetensors").read_bytes().startswith(b"\x80")  # no pickle protocol header
    card = (folder / "README.md").read_text()
    assert "Classes** (3): a, b, c" in card and "val_acc 0.5000" in card and "fusionnet.load(" in card
    torch.save(x, tmp_path / "x.pt")
    save_model(model, tmp_path / "m.pth")
    script = ("import sys, torch, fusionnet; from fusionnet.models.factory import load_fusionnet; "
              "x = torch.load(sys.argv[3]); a = fusionnet.FusionNet.from_pretrained(sys.argv[1]); "
              "b = load_fusionnet(sys.argv[2]); torch.save((a(x), b(x)), sys.argv[4])")
    subprocess.run([sys.executable, "-c", script, str(folder), str(tmp_path / "m.pth"), str(tmp_path / "x.pt"),
                    str(tmp_path / "y.pt")], check=True, timeout=300)
    from_folder, from_pth = torch.load(tmp_path / "y.pt")  # a fresh process: the folder as the .pth, bit for bit
    assert torch.equal(from_folder, from_pth)
    with torch.no_grad():
        assert torch.equal(fusionnet.load(folder)(x), model(x))


def test_a_hub_id_loads_from_the_local_cache_offline(tmp_path, monkeypatch):
    import huggingface_hub.constants as hub

    model = _model()
    snapshot = tmp_path / "hub" / "models--someone--fused" / "snapshots" / "abc123"
    model.save_pretrained(snapshot)
    (tmp_path / "hub" / "models--someone--fused" / "refs").mkdir()
    (tmp_path / "hub" / "models--someone--fused" / "refs" / "main").write_text("abc123")
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(fusionnet.load("someone/fused")(x), model(x))
    with pytest.raises(fusionnet.ConfigError, match="not in the Hugging Face cache"):
        fusionnet.load("someone/missing")
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", False)  # not told to stay offline, but the Hub does not answer:
    monkeypatch.setattr("fusionnet.models.weight_sources.host_reachable", lambda *a, **k: False)  # the cache, at once
    with torch.no_grad():
        assert torch.equal(fusionnet.load("someone/fused")(x), model(x))


def test_export_writes_the_folder_from_a_checkpoint_and_commands_take_it(tmp_path, capsys):
    from fusionnet.cli.main import main

    data = make_splits(tmp_path / "data", per_class=6)
    model = _model()
    save_model(model, tmp_path / "m.pth", metrics={"val_nll": 0.25})
    assert main(["export", str(tmp_path / "m.pth"), "--format", "hf", "--out", str(tmp_path / "folder")]) == 0
    assert "val_nll 0.2500" in (tmp_path / "folder" / "README.md").read_text()
    assert main(["predict", str(tmp_path / "folder"), "--images", str(data / "test"),
                 "--out", str(tmp_path / "p.csv")]) == 0
    assert main(["export", str(tmp_path / "folder"), "--out", str(tmp_path / "m.onnx")]) == 0
    other = create_fusionnet(["timm/test_resnet"], class_names=["a", "b", "c"], image_size=32)
    other.save_pretrained(tmp_path / "member2")
    save_model(create_fusionnet(["timm/test_efficientnet"], class_names=["a", "b", "c"], image_size=32),
               tmp_path / "member1.pth")
    assert main(["fuse", "--members", str(tmp_path / "member1.pth"), str(tmp_path / "member2"), "--data", str(data),
                 "--epochs", "1", "--no-progress", "--out", str(tmp_path / "fused")]) == 0
    from fusionnet.serving.model import ModelHandler

    handler = ModelHandler([str(tmp_path / "folder")], device="cpu")
    assert handler.class_names == ["a", "b", "c"]
    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "folder")]) == 0
    assert "architecture: fusionnet(timm/test_resnet+timm/test_efficientnet)" in capsys.readouterr().out
    assert (tmp_path / "p.csv").is_file() and (tmp_path / "m.onnx").is_file()


def test_a_bad_folder_is_one_clear_error(tmp_path):
    folder = _model().save_pretrained(tmp_path / "m")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MissingFileError, match="has no config.json"):
        FusionNet.from_pretrained(tmp_path / "empty")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "format_version": 99}))
    with pytest.raises(CheckpointMismatchError, match="format version 99 .* upgrade fusionnet"):
        FusionNet.from_pretrained(folder)
    (folder / "config.json").write_text(json.dumps(config))
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointMismatchError, match="cannot be read .* damaged"):
        FusionNet.from_pretrained(folder)
    other = create_fusionnet(["timm/test_resnet"], num_classes=3).save_pretrained(tmp_path / "other")
    (other / "config.json").write_text(json.dumps(config))  # weights of another architecture
    with pytest.raises(CheckpointMismatchError, match="does not fit its config.json"):
        FusionNet.from_pretrained(other)
    with pytest.raises(fusionnet.FusionNetError, match="exists"):
        _model().save_pretrained(folder)  # an existing folder is replaced only with overwrite
    _model().save_pretrained(folder, overwrite=True)
    assert FusionNet.from_pretrained(folder).config.fusion == "gated"


def test_push_uploads_the_folder_through_huggingface_hub_and_needs_a_token(tmp_path, monkeypatch, capsys):
    """The upload is intercepted at huggingface_hub's API: what would have been sent is checked; no network."""
    import huggingface_hub

    from fusionnet.cli.main import main

    sent = {}

    def create_repo(self, repo_id, **kw):
        sent["repo"] = (repo_id, kw.get("private"), self.token)
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, *, repo_id, folder_path, **kw):
        from pathlib import Path

        sent["files"] = sorted(p.name for p in Path(folder_path).iterdir() if p.name in kw["allow_patterns"])
        sent["config"] = json.loads((Path(folder_path) / "config.json").read_text())

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    save_model(_model(), tmp_path / "m.pth")
    assert main(["push", str(tmp_path / "m.pth"), "--repo", "someone/fused"]) == 2
    assert "needs a token" in capsys.readouterr().err and not sent
    assert main(["push", str(tmp_path / "m.pth"), "--repo", "someone/fused", "--token", "t0k", "--private"]) == 0
    assert sent["repo"] == ("someone/fused", True, "t0k")
    assert sent["files"] == ["README.md", "config.json", "model.safetensors"]
    assert sent["config"]["class_names"] == ["a", "b", "c"]


@pytest.mark.parametrize("resize", ["shorter", "stretch"])
def test_an_onnx_graph_that_takes_photos_reads_them_as_fusionnet_does(tmp_path, resize, capsys):
    """export --preprocess: uint8 photos of any size in, probabilities out, the model's own resize inside; on real
    photos of two sizes it gives fusionnet's own reading's probabilities (the same pixels: the test below)."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    from sklearn.datasets import load_sample_images

    from fusionnet.cli.main import main
    from fusionnet.data.transforms import apply_transform, decoder_of, reading_transform

    torch.manual_seed(0)
    model = create_fusionnet(TINY, class_names=["a", "b", "c"], image_size=48, resize=resize).eval()
    with torch.no_grad():  # confident logits, so that reading the photo another way shows (the other resize mode's
        model.head.fc.weight.mul_(40)  # graph differs by 0.01-0.06 here, this one's by about 1e-7)
    save_model(model, tmp_path / "m.pth")
    assert main(["export", str(tmp_path / "m.pth"), "--preprocess", "--out", str(tmp_path / "p.onnx")]) == 0
    meta = {p.key: p.value for p in onnx.load(str(tmp_path / "p.onnx")).metadata_props}
    assert meta["input"].startswith("photos: uint8") and meta["resize"] == resize
    session = ort.InferenceSession(str(tmp_path / "p.onnx"), providers=["CPUExecutionProvider"])
    tf = reading_transform(model.config.reading(48))
    for i, (photo, side) in enumerate(zip(load_sample_images().images, (70, 131))):
        from PIL import Image

        path = tmp_path / f"photo{i}.png"
        Image.fromarray(photo).resize((side * 3 // 2, side)).save(path)
        pixels = np.asarray(Image.open(path).convert("RGB"))
        (ours,) = session.run(["probabilities"], {"photos": np.stack([pixels, pixels])})
        with torch.no_grad():
            theirs = model(apply_transform(tf, decoder_of(tf)(str(path)))[None]).softmax(1).numpy()
        assert ours.shape == (2, 3) and np.abs(ours - theirs).max() < 1e-5


@pytest.mark.parametrize("reader", ["albumentations", "torchvision"])
def test_the_photo_graphs_pixels_are_fusionnets_readers_pixels(reader):
    """The graph's preprocessing alone, on noise (the hardest case for rounding) of odd sizes, up- and downscaled,
    tall and wide, 1 pixel and exact halves: OpenCV's INTER_LINEAR (albumentations) bit for bit; torchvision's sizes
    and crops exactly, its PIL resize within one grey level."""
    import numpy as np
    import onnxruntime as ort
    from onnx import helper

    from fusionnet.data.transforms import apply_transform, eval_transform
    from fusionnet.models.onnx_photos import preprocess_graph

    rng = np.random.default_rng(0)
    shapes = [(37, 53), (53, 37), (300, 97), (1, 1), (1, 9), (192, 256), (48, 48), (611, 71)]
    for resize, crop_pct in [("shorter", 1.0), ("shorter", 0.875), ("stretch", 1.0), ("stretch", 0.9)]:
        graph = helper.make_model(preprocess_graph(48, resize, crop_pct, reader=reader),
                                  opset_imports=[helper.make_opsetid("", 18)])
        session = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
        tf = eval_transform(48, crop_pct=crop_pct, resize=resize, reader=reader)
        for shape in shapes:
            photo = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
            (ours,) = session.run(["images"], {"photos": np.stack([photo, photo])})
            theirs = apply_transform(tf, photo).numpy()
            assert ours.shape == (2, 3, 48, 48) and np.array_equal(ours[0], ours[1])
            levels = np.abs(np.rint(ours[0] * 255) - np.rint(theirs * 255)).max()
            assert levels <= (0 if reader == "albumentations" else 1), (resize, crop_pct, shape, levels)
