"""Antialiased (torchvision's PIL reading) against the library's OpenCV downscaling, for fusionnet-trained models:
each checkpoint scored on the same validation split read both ways (and the test split, reported only).

    python experiments/reader_ablation.py runs/r41_lite0/best.pth ... --data ../shared/data/flowers5_128 \
        --size 64 --out runs/reader_ablation.json

The validation split is the one the checkpoint was trained with (its recorded seed, val_fraction 0.15)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from fusionnet.data.splits import load_splits
from fusionnet.engine.inference import predict
from fusionnet.models.checkpoints import read_checkpoint
from fusionnet.models.factory import load_fusionnet
from fusionnet.utils.metrics import accuracy, nll


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoints", nargs="+")
    p.add_argument("--data", required=True)
    p.add_argument("--size", type=int, required=True)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    rows = {}
    for path in args.checkpoints:
        model = load_fusionnet(path)
        seed = (read_checkpoint(path).get("data") or {}).get("seed", 0)
        rows[path] = {}
        for reader in ("albumentations", "torchvision"):
            splits = load_splits(args.data, size=args.size, seed=seed, reader=reader, progress=False)
            row = {}
            for split in ("val", "test"):
                probs, labels = predict(model, getattr(splits, split), device="cpu")
                row[split] = {"acc": accuracy(probs, labels), "nll": nll(probs, labels), "n": len(labels)}
            rows[path][reader] = row
            print(f"{path} {reader}: val acc {row['val']['acc']:.4f} NLL {row['val']['nll']:.4f} | test acc "
                  f"{row['test']['acc']:.4f} NLL {row['test']['nll']:.4f}", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"size": args.size, "data": args.data, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
