"""Test-time augmentation rows for a comparison's models: each TTA setting on validation and test, with its cost.

    python experiments/tta.py runs/demo --out runs/tta_digits.json
    python experiments/tta.py runs/flowers_frozen --out runs/tta_flowers.json

Reads a ``compare`` run folder (its config.json and the kept best.pth files): every member, their soft vote, and
the fusion that validation selected, each predicted on the validation and test splits with no TTA, ``flip`` and
``flip-zoom`` (fusionnet.data.tta), averaged in probability and in logit space. The setting to recommend is chosen on
validation alone: the lowest mean validation NLL over the models; its test figures are reported beside it, with
the time of each setting relative to no TTA (measured in the same run).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from fusionnet.models.factory import load_fusionnet
from fusionnet.data.splits import load_splits
from fusionnet.workflows.runs import selected_in_comparison
from fusionnet.utils.files import atomic_write_json
from fusionnet.engine.inference import predict
from fusionnet.utils.metrics import classification_metrics

SETTINGS = [(None, "prob"), ("flip", "prob"), ("flip", "logit"), ("flip-zoom", "prob"), ("flip-zoom", "logit")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", help="a compare run folder with its model files (--keep best)")
    ap.add_argument("--out", default="runs/tta.json")
    args = ap.parse_args()
    run = Path(args.run)
    config = json.loads((run / "config.json").read_text())["compare"]
    seed = (config.get("train") or {}).get("seed", 0)
    splits = load_splits(config["data"], size=config["size"], val_fraction=config["val_fraction"], seed=seed,
                         progress=False)
    models = {b: run / "models" / b / "best.pth" for b in config["backbones"]}
    models["FusionNet (selected on val)"] = selected_in_comparison(run)
    rows: dict = {}
    for tta, space in SETTINGS:
        key = "none" if tta is None else f"{tta} ({space})"
        rows[key] = {"models": {}, "seconds": 0.0}
        member_probs = {"val": [], "test": []}
        for name, path in models.items():
            model = load_fusionnet(path)
            row = {}
            for split in ("val", "test"):
                t0 = time.perf_counter()
                probs, labels = predict(model, getattr(splits, split), device="cpu", tta=tta, tta_space=space)
                rows[key]["seconds"] += time.perf_counter() - t0
                m = classification_metrics(probs, labels, splits.class_names)
                row[split] = {"acc": m["acc"], "nll": m["nll"]}
                if name in config["backbones"]:
                    member_probs[split].append((probs, labels))
            rows[key]["models"][name] = row
        vote = {}
        for split, pairs in member_probs.items():
            m = classification_metrics(torch.stack([p for p, _ in pairs]).mean(0), pairs[0][1], splits.class_names)
            vote[split] = {"acc": m["acc"], "nll": m["nll"]}
        rows[key]["models"]["soft voting"] = vote
        scored = rows[key]["models"].values()
        rows[key]["mean_val_nll"] = sum(r["val"]["nll"] for r in scored) / len(scored)
        print(key, {n: (round(r["val"]["acc"], 4), round(r["test"]["acc"], 4)) for n, r in rows[key]["models"].items()},
              f"{rows[key]['seconds']:.1f}s", flush=True)
    for row in rows.values():
        row["time_vs_none"] = row["seconds"] / rows["none"]["seconds"]
    chosen = min(rows, key=lambda k: rows[k]["mean_val_nll"])
    atomic_write_json(args.out, {"run": str(run), "budget": {"size": config["size"], "seed": seed},
                                 "settings": rows, "chosen_on_val": chosen})
    print(f"validation chooses: {chosen}; wrote {args.out}")


if __name__ == "__main__":
    main()
