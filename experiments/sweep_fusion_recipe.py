"""Choose the fusion recipe on validation: run the comparison under several recipes and print validation scores only.

    python experiments/sweep_fusion_recipe.py --data runs/demo/digits --size 64 --epochs 8 --out runs/sweep_digits

Every recipe runs the whole comparison with a shared feature cache (frozen regime); the table shows each row's
validation accuracy and NLL, never a test score, so the choice it informs cannot see the test split. Writes
runs/<out>/sweep.json.
"""

import argparse
import json
from pathlib import Path

from fusionnet.workflows.compare import CompareConfig, regime_train_config, compare

RECIPES = [  # (fused-head dropout, branch dropout, label smoothing, monitor)
    dict(fusion_dropout=0.2, branch_dropout=0.0, label_smoothing=0.0, monitor="macro_f1"),  # round 1's
    dict(fusion_dropout=0.2, branch_dropout=0.0, label_smoothing=0.0, monitor="nll"),
    dict(fusion_dropout=0.5, branch_dropout=0.25, label_smoothing=0.0, monitor="nll"),
    dict(fusion_dropout=0.2, branch_dropout=0.0, label_smoothing=0.1, monitor="nll"),
    dict(fusion_dropout=0.5, branch_dropout=0.25, label_smoothing=0.1, monitor="nll"),
    dict(fusion_dropout=0.5, branch_dropout=0.25, label_smoothing=0.1, monitor="macro_f1"),
]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="runs/sweep")
    args = ap.parse_args()
    rows = []
    shared = Path(args.out) / "shared_cache"
    shared.mkdir(parents=True, exist_ok=True)
    for recipe in RECIPES:
        name = "_".join(f"{k}={v}" for k, v in recipe.items())
        (Path(args.out) / name / "cache").mkdir(parents=True, exist_ok=True)
        link = Path(args.out) / name / "cache" / "shared"  # one feature cache for every recipe (keys keep it exact)
        if not link.exists():
            link.symlink_to(shared.resolve(), target_is_directory=True)
        train_fields = {k: v for k, v in recipe.items() if k in ("label_smoothing", "monitor")}
        compare_fields = {k: v for k, v in recipe.items() if k not in train_fields}
        train = regime_train_config("frozen", epochs=args.epochs, seed=args.seed, progress=False, **train_fields)
        res = compare(CompareConfig(data=args.data, size=args.size, regime="frozen", shared_cache=True,
                                           train=train, out=str(Path(args.out) / name), **compare_fields), log=None)
        val = {m: r["val"] for m, r in res["methods"].items() if r.get("val")}
        rows.append({"recipe": recipe, "val": val})
        print(name, {m: round(v["nll"], 4) for m, v in val.items() if m.startswith(("fusion:", "selected:")) or
                     m == "soft"}, flush=True)
    (Path(args.out) / "sweep.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
