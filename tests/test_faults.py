"""Bad input and faults: clear errors, nothing lost, no temporary files left, models run where their inputs are."""

import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from fusionnet import CheckpointMismatchError, DataError, FusionNet, FusionNetError, TrainConfig, TrainingError, fit
from fusionnet.models.factory import load_fusionnet, save_model
from fusionnet.models.checkpoints import read_state_dict
from fusionnet.models.checkpoints import read_checkpoint
from fusionnet.data.splits import FolderImages, load_splits, read_rgb
from fusionnet.errors import WriteError
from fusionnet.utils.files import atomic_write, atomic_write_json, remove_orphaned_temp_files
from fusionnet.engine.inference import predict
from fusionnet.ensembles.voting import member_outputs
from toydata import make_folder, make_splits

TINY = ["timm/test_resnet"]


# ---- where a model runs -----------------------------------------------------------------------------------------
class PlacedModel(nn.Module):
    """Pretends to live on ``cuda:0`` until ``.to()`` moves it, and asserts its inputs are where it lives: the bug
    class behind `compare` crashing on a GPU (a model left on one device, its batches sent to another)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 2)
        self.placed = torch.device("cuda:0")

    def to(self, *args, **kwargs):
        device = torch._C._nn._parse_to(*args, **kwargs)[0]
        if device is not None:
            self.placed = device
        return super().to(*args, **kwargs)

    def forward(self, x):
        assert x.device == self.placed, f"input on {x.device}, model on {self.placed}"
        return self.fc(x.mean((2, 3)))


class Tiny(torch.utils.data.Dataset):
    class_names = ["a", "b"]
    labels = [0, 1, 0, 1]

    def __len__(self):
        return 4

    def __getitem__(self, i):
        return torch.full((3, 4, 4), float(i)), i % 2


def test_predict_and_member_outputs_move_the_model_to_their_device():
    probs, labels = predict(PlacedModel(), Tiny(), device="cpu")
    assert probs.shape == (4, 2) and labels.tolist() == [0, 1, 0, 1]
    assert member_outputs(PlacedModel(), Tiny(), member="m", split="val", device="cpu").probs.shape == (4, 2)


def test_a_non_finite_loss_stops_training_and_keeps_the_last_good_checkpoints(tmp_path):
    splits = load_splits(make_splits(tmp_path / "data", per_class=8), size=32, val_fraction=0.25)
    model = FusionNet(backbones=TINY, num_classes=3)
    cfg = TrainConfig(epochs=1, batch_size=8, progress=False, warmup_epochs=0)
    fit(model, splits.train, splits.val, cfg, out_dir=tmp_path / "run", log=None)
    good = read_checkpoint(tmp_path / "run" / "best.pth")["state_dict"]
    with torch.no_grad():
        model.head.fc.weight.fill_(float("nan"))
    with pytest.raises(TrainingError, match=r"loss became non-finite at epoch 1, step 1"):
        fit(model, splits.train, splits.val, cfg, out_dir=tmp_path / "run", log=None)
    kept = read_checkpoint(tmp_path / "run" / "best.pth")["state_dict"]
    assert all(torch.equal(good[k], kept[k]) for k in good)


# ---- checkpoints ------------------------------------------------------------------------------------------------
class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


@pytest.mark.parametrize("kind", ["empty", "text", "truncated", "pickled code", "bad safetensors"])
def test_unreadable_checkpoints_give_one_clear_error(tmp_path, kind):
    path = tmp_path / ("w.safetensors" if kind == "bad safetensors" else "w.pth")
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "text":
        path.write_text("hello, not weights\n" * 10)
    elif kind == "truncated":
        torch.save({"w": torch.zeros(1000)}, path)
        path.write_bytes(path.read_bytes()[:300])
    elif kind == "pickled code":
        path.write_bytes(pickle.dumps(Evil()))
    else:
        path.write_bytes(b"\xff" * 64)
    for reader in (read_state_dict, read_checkpoint, load_fusionnet):
        with pytest.raises(CheckpointMismatchError) as info:
            reader(path)
        message = str(info.value)
        assert repr(str(path)) in message and "weights_only=False" not in message


def test_a_newer_checkpoint_format_is_refused_with_the_fix(tmp_path):
    path = save_model(FusionNet(backbones=TINY, num_classes=2), tmp_path / "m.pth")
    payload = torch.load(path, weights_only=True)
    payload["version"] = 99
    torch.save(payload, path)
    with pytest.raises(CheckpointMismatchError, match="format version 99; this fusionnet reads up to 2: upgrade"):
        load_fusionnet(path)


def test_a_version_1_checkpoint_keeps_its_concatenating_pool(tmp_path):
    model = FusionNet(backbones=[{"backbone": "timm/test_resnet", "pool": "catavgmax"}], num_classes=2).eval()
    path = save_model(model, tmp_path / "m.pth")
    payload = torch.load(path, weights_only=True)
    payload["version"], payload["config"]["branches"][0]["pool"] = 1, "avgmax"  # version 1's name for it
    torch.save(payload, path)
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(load_fusionnet(path)(x), model(x))


# ---- writes -----------------------------------------------------------------------------------------------------
def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    atomic_write_json(tmp_path / "h.json", {"a": 1})
    with pytest.raises(ZeroDivisionError):
        atomic_write(tmp_path / "h.json", lambda f: (f.write(b"half a fi"), 1 / 0))
    assert sorted(os.listdir(tmp_path)) == ["h.json"] and json.loads((tmp_path / "h.json").read_text()) == {"a": 1}
    with pytest.raises(WriteError, match="a part of its folder path is a file"):
        atomic_write_json(tmp_path / "h.json" / "x.json", {})


def test_temporary_files_of_killed_saves_are_removed_by_the_next_save(tmp_path):
    script = ("import os, sys, torch\nfrom fusionnet.utils.files import atomic_write\n"
              "atomic_write(sys.argv[1], lambda f: (f.write(b'x' * 1000), f.flush(), os._exit(9)))\n")
    for _ in range(3):  # each writer dies mid-write, as under kill -9; each new write removes earlier orphans
        subprocess.run([sys.executable, "-c", script, str(tmp_path / "model.pth")], check=False)
        assert len([p for p in os.listdir(tmp_path) if p.endswith(".tmp")]) == 1
    save_model(FusionNet(backbones=TINY, num_classes=2), tmp_path / "model.pth")
    assert os.listdir(tmp_path) == ["model.pth"]
    assert remove_orphaned_temp_files(tmp_path) == []


# ---- data -------------------------------------------------------------------------------------------------------
def test_16_bit_images_decode_by_their_own_depth(tmp_path):
    ramp = (np.linspace(0, 65535, 64 * 64).reshape(64, 64)).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "deep.png")
    rgb = read_rgb(tmp_path / "deep.png")
    assert rgb.shape == (64, 64, 3) and rgb.dtype == np.uint8
    assert abs(float(rgb.mean()) - 127.5) < 2 and (rgb == 255).mean() < 0.01


def test_a_class_whose_every_image_is_unreadable_is_an_error_like_an_empty_folder(tmp_path):
    make_folder(tmp_path / "d", {"a": 3, "b": 3})
    for f in (tmp_path / "d" / "b").iterdir():
        f.write_text("not an image")
    with pytest.raises(DataError, match=r"every image of class\(es\) 'b' is unreadable"):
        FolderImages(tmp_path / "d")


def test_one_class_or_empty_train_splits_are_refused(tmp_path):
    class One(Tiny):
        labels = [0, 0, 0, 0]

    class Empty(Tiny):
        def __len__(self):
            return 0

    model = FusionNet(backbones=TINY, num_classes=2)
    with pytest.raises(DataError, match="holds a single class"):
        fit(model, One(), Tiny(), TrainConfig(epochs=1, progress=False), log=None)
    with pytest.raises(DataError, match="the train split is empty"):
        fit(model, Empty(), Tiny(), TrainConfig(epochs=1, progress=False), log=None)
    assert issubclass(DataError, FusionNetError) and issubclass(DataError, ValueError)


# ---- the command line -------------------------------------------------------------------------------------------
def test_cli_bad_input_exits_2_with_one_line_and_no_traceback(tmp_path, monkeypatch, capsys):
    from fusionnet.cli.main import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "x.jpg").write_text("not a photo")
    (tmp_path / "dir.jpg").mkdir()
    (tmp_path / "afile").write_text("")
    for args, expected in ((["classify", "x.jpg"], "cannot read"),
                           (["classify", "dir.jpg"], "is a folder, not an image"),
                           (["classify", "--top", "-1"], "expected a whole number >= 1"),
                           (["inspect", "x.jpg"], "is a text file, not a checkpoint"),
                           (["compare", "--data", "missing"], "data folder not found"),
                           (["compare", "--data", "missing", "--out", "afile"], "is a file; give a folder"),
                           (["demo", "--out", "afile/demo"], "a part of its folder path is a file")):
        try:
            code = main(args)
        except SystemExit as exc:  # argparse's usage errors
            code = exc.code
        err = capsys.readouterr().err
        assert code == 2, (args, err)
        assert expected in err and "Traceback" not in err, (args, err)
        assert len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "runs").exists()  # a run that failed on its input leaves no folder behind


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="no /dev/full here to make stdout fail")
def test_cli_unexpected_failures_exit_1_and_keep_the_traceback():
    r = subprocess.run(f"{sys.executable} -m fusionnet backbones > /dev/full", shell=True, capture_output=True,
                       text=True)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert "unexpected OSError" in r.stderr and "full traceback in" in r.stderr
    log = r.stderr.split("full traceback in '")[1].split("'")[0]
    assert "Traceback" in open(log).read()


def test_an_interrupt_during_a_checkpoint_write_stays_an_interrupt(tmp_path):
    """Ctrl-C or SIGTERM while torch.save writes comes out of torch as a RuntimeError ("unexpected pos") raised while
    handling it; it must stay the interrupt (the command then says "terminated", exit 143), not become "could not
    write ... check free disk space" (exit 2), and leave no temporary file behind."""
    from fusionnet.utils.files import atomic_write

    class Terminated(BaseException):
        pass

    class Interrupted:  # a file whose third write is interrupted by the signal handler
        def __init__(self, f):
            self.f, self.n = f, 0

        def write(self, data):
            self.n += 1
            if self.n == 3:
                raise Terminated("signal 15")
            return self.f.write(data)

        def flush(self):
            self.f.flush()

    with pytest.raises(Terminated):
        atomic_write(tmp_path / "best.pth", lambda f: torch.save({"w": torch.zeros(100_000)}, Interrupted(f)))
    assert list(tmp_path.iterdir()) == []
