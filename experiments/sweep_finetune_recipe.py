"""Choose the fine-tuning recipe of one member on validation: learning rates, warm-up, augmentation, input size.

    python experiments/sweep_finetune_recipe.py --data runs/demo/digits --size 64 --epochs 4 --out runs/sweep_finetune
    python experiments/sweep_finetune_recipe.py ... --base label_smoothing=0.1 --recipes ...   # a second stage

``--base`` sets TrainConfig fields under every recipe (a recipe's own fields win), so a first stage can choose the
learning rates and a second stage the rest on top of the winner. ``--paired RECIPE`` trains nothing: it predicts
validation with every recipe's best model in the given sweep folders and writes an exact McNemar test of each
against RECIPE's model (paired.json in the first folder): is a gap more than the noise of one validation split?

    python experiments/sweep_finetune_recipe.py --data ... --out runs/a runs/b --paired "trunk x1"

Every recipe fine-tunes the same pretrained backbone (all layers, ``strategy="full"``) on the same data, seed and
epochs, reading images from one decoded-image cache; the table shows each recipe's best validation accuracy and NLL
(the epoch chosen by validation NLL) and its wall time, never a test score. Writes runs/<out>/sweep.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from fusionnet import create_fusionnet
from fusionnet.data.splits import load_splits
from fusionnet.utils.files import atomic_write_json
from fusionnet.engine.train import TrainConfig, fit

RECIPES = {  # name: (TrainConfig fields over its defaults and --base, augmentation policy, branch input size)
    "defaults": ({}, "default", None),
    "trunk x0.1": ({"trunk_lr_mult": 0.1}, "default", None),
    "trunk x1": ({"trunk_lr_mult": 1.0}, "default", None),
    "lr 3e-3": ({"lr": 3e-3}, "default", None),
    "lr 3e-4, trunk x1": ({"lr": 3e-4, "trunk_lr_mult": 1.0}, "default", None),
    "no warm-up": ({"warmup_epochs": 0.0}, "default", None),
    "strong augmentation": ({}, "strong", None),
    "no augmentation": ({}, "none", None),
    "label smoothing 0.1": ({"label_smoothing": 0.1}, "default", None),
    "head first (1 epoch), then all": ({"strategy": "gradual", "unfreeze_after": 1, "stages_per_step": 1000},
                                       "default", None),
    "input upsampled x1.75": ({}, "default", "x1.75"),
    "ema 0.998": ({"ema_decay": 0.998}, "default", None),
    "mixup 0.2": ({"mixup": 0.2}, "default", None),
    "cutmix 1.0": ({"cutmix": 1.0}, "default", None),
    "layer decay 0.8": ({"layer_decay": 0.8}, "default", None),
    "batched augmentation": ({"device_augment": True}, "default", None),  # the GPU input path, run on the CPU
}


def _field(item: str) -> tuple[str, object]:
    name, sep, value = item.partition("=")
    if not sep or not name:
        raise SystemExit(f"--base takes FIELD=VALUE items, got {item!r} (e.g. trunk_lr_mult=1.0)")
    try:
        return name, json.loads(value)
    except json.JSONDecodeError:
        return name, value


def _run_dir(out: Path, recipe: str) -> Path:
    return out / "runs" / recipe.replace(" ", "_")


def paired(args, folders: list[Path]) -> None:
    """Exact McNemar on validation between each recipe's best model and the reference recipe's."""
    from fusionnet.models.factory import load_fusionnet
    from fusionnet.engine.inference import predict
    from fusionnet.workflows.compare.report import mcnemar

    runs = {}
    for folder in folders:
        sweep = json.loads((folder / "sweep.json").read_text())
        for name, r in sweep["recipes"].items():
            runs[f"{name} ({folder.name})"] = (_run_dir(folder, name) / "best.pth", r, sweep["budget"])
    ref = next((k for k in runs if k.startswith(args.paired + " (")), None)
    if ref is None:
        raise SystemExit(f"--paired {args.paired!r}: no such recipe in {[str(f) for f in folders]}; have {list(runs)}")
    val = load_splits(args.data, size=args.size, seed=args.seed, progress=False).val
    correct = {}
    for key, (path, _r, _b) in runs.items():
        probs, labels = predict(load_fusionnet(path), val, batch_size=64)
        correct[key] = (probs.argmax(1) == labels).tolist()
    table = {key: {"val_acc": sum(c) / len(c), "val_nll": runs[key][1]["val_nll"], "base": runs[key][2]["base"],
                   "vs_reference": mcnemar(correct[key], correct[ref])} for key, c in correct.items()}
    for key, row in table.items():
        t = row["vs_reference"]
        print(f"{key:48s} val acc {row['val_acc']:.4f}  right where the reference is wrong {t['a_only']:3d}, "
              f"the reverse {t['b_only']:3d}, p = {t['p_value']:.3f}")
    atomic_write_json(folders[0] / "paired.json", {"reference": ref, "recipes": table})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    ap.add_argument("--base", nargs="*", default=[], metavar="FIELD=VALUE",
                    help="TrainConfig fields under every recipe, e.g. trunk_lr_mult=1.0 lr=3e-4")
    ap.add_argument("--out", nargs="+", default=["runs/sweep_finetune"], help="the sweep folder (--paired: folders)")
    ap.add_argument("--paired", metavar="RECIPE", default=None,
                    help="no training: McNemar on validation of every recipe's best model against RECIPE's")
    args = ap.parse_args()
    if args.paired:
        return paired(args, [Path(o) for o in args.out])
    base = dict(_field(item) for item in args.base)

    out = Path(args.out[0])
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    budget = {"data": args.data, "backbone": args.backbone, "size": args.size, "epochs": args.epochs,
              "batch_size": args.batch_size, "seed": args.seed, "threads": torch.get_num_threads(), "base": base}
    for name in args.recipes:
        fields, policy, input_size = RECIPES[name]
        splits = load_splits(args.data, size=args.size, seed=args.seed, policy=policy,
                             image_cache=out / "images", progress=False)
        torch.manual_seed(args.seed)
        size = int(round(args.size * 1.75)) if input_size == "x1.75" else None
        model = create_fusionnet([args.backbone], class_names=splits.class_names, pretrained=True, input_size=size)
        cfg = TrainConfig(**{"epochs": args.epochs, "batch_size": args.batch_size, "strategy": "full",
                             "monitor": "nll", "num_workers": args.workers, "seed": args.seed, "progress": False,
                             **base, **fields})
        t0 = time.perf_counter()
        res = fit(model, splits.train, splits.val, cfg, out_dir=_run_dir(out, name), log=None)
        best = res.history[res.best_epoch - 1]
        results[name] = {"val_acc": best["val_acc"], "val_nll": best["val_nll"], "best_epoch": res.best_epoch,
                         "seconds": time.perf_counter() - t0, "train_config": fields, "policy": policy,
                         "input_size": size, "history": res.history}
        print(f"{name:32s} val acc {best['val_acc']:.4f}  val NLL {best['val_nll']:.4f}  best epoch "
              f"{res.best_epoch}/{args.epochs}  {results[name]['seconds']:.0f}s", flush=True)
        # after every recipe, so a stopped sweep keeps what it measured
        atomic_write_json(out / "sweep.json", {"budget": budget, "recipes": results})


if __name__ == "__main__":
    main()
