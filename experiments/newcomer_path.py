"""The newcomer's path of issue 41, end to end: a member trained by a plain torchvision script on large photos read
at 64 px (``T.Resize((64, 64))``), saved with ``torch.save(model.state_dict())``, then scored by the user's own
script and by ``fusionnet predict`` (with and without ``--size``): the same answers, and the size fusionnet chose.

    python experiments/newcomer_path.py --flowers ../shared/data/flowers5_128 --out runs/newcomer

The photos: three flowers5_128 classes upscaled to random sizes and aspect ratios (200-320 px a side) as JPEGs, so
nothing is at the model's size. Writes ``<out>/newcomer.json``."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
import torchvision
import torchvision.transforms as T
from PIL import Image
from torchvision.datasets import ImageFolder

CLASSES = ("daisy", "rose", "tulip")
NORM = T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])


def make_photos(flowers: Path, out: Path, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for split in ("train", "test"):
        for c in CLASSES:
            (out / split / c).mkdir(parents=True, exist_ok=True)
            for f in sorted((flowers / split / c).glob("*.jpg")):
                w, h = (int(v) for v in rng.integers(200, 321, 2))
                Image.open(f).convert("RGB").resize((w, h), Image.BICUBIC).save(out / split / c / f.name, quality=90)
    return out


def train_plain(data: Path, path: Path, epochs: int) -> None:
    """The user's own script: ImageFolder, Resize((64, 64)), a resnet18 from scratch, Adam."""
    torch.manual_seed(0)
    tf = T.Compose([T.Resize((64, 64)), T.RandomHorizontalFlip(), T.ToTensor(), NORM])
    loader = torch.utils.data.DataLoader(ImageFolder(data / "train", tf), batch_size=32, shuffle=True)
    model = torchvision.models.resnet18(weights=None, num_classes=len(CLASSES))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for epoch in range(epochs):
        model.train()
        for x, y in loader:
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        print(f"epoch {epoch + 1}/{epochs}", flush=True)
    torch.save(model.eval().state_dict(), path)


@torch.no_grad()
def own_script(data: Path, path: Path) -> tuple[float, torch.Tensor]:
    model = torchvision.models.resnet18(weights=None, num_classes=len(CLASSES))
    model.load_state_dict(torch.load(path, weights_only=True))
    test = ImageFolder(data / "test", T.Compose([T.Resize((64, 64)), T.ToTensor(), NORM]))
    probs = torch.cat([model.eval()(x).softmax(1) for x, _ in torch.utils.data.DataLoader(test, batch_size=64)])
    labels = torch.tensor(test.targets)
    return float((probs.argmax(1) == labels).double().mean()), probs


def fusionnet_predict(data: Path, path: Path, out: Path, extra: list[str]) -> tuple[float, torch.Tensor, str]:
    cmd = [sys.executable, "-m", "fusionnet", "predict", str(path), "--data", str(data), "--split", "test",
           "--classes", *CLASSES, "--resize", "stretch", "--out", str(out), "--overwrite", *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
    saved = torch.load(out, weights_only=True)
    probs, labels = saved["probs"], saved["labels"]
    return float((probs.argmax(1) == labels).double().mean()), probs, proc.stdout


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--flowers", required=True)
    p.add_argument("--out", default="runs/newcomer")
    p.add_argument("--epochs", type=int, default=4)
    args = p.parse_args()
    out = Path(args.out)
    data = make_photos(Path(args.flowers), out / "data")
    member = out / "resnet18_best.pth"
    train_plain(data, member, args.epochs)
    theirs_acc, theirs = own_script(data, member)
    ours_acc, ours, said = fusionnet_predict(data, member, out / "test.pt", ["--size", "64"])
    chosen_acc, chosen, chose = fusionnet_predict(data, member, out / "test_chosen.pt", [])
    report = {"own_script_acc": theirs_acc, "fusionnet_size64_acc": ours_acc,
              "max_abs_prob_diff": float((ours - theirs).abs().max()),
              "top1_agreement": float((ours.argmax(1) == theirs.argmax(1)).double().mean()),
              "fusionnet_size_chosen_acc": chosen_acc, "fusionnet_size_chosen_log": chose.strip().splitlines(),
              "fusionnet_log": said.strip().splitlines(), "epochs": args.epochs, "test_images": len(theirs)}
    (out / "newcomer.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
