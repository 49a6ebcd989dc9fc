"""Time the late_oof head's closed-form fit (fusionnet.engine.late_fit.fit_late_head) on one data set's frozen
features, and optionally another implementation of it side by side (e.g. a checkout of an earlier version), with
the chosen C per branch and the out-of-fold NLL of each: writes JSON.

    python experiments/bench_late_head.py --data runs/demo/digits --size 64 --out runs/bench_late_head.json \
        --other /tmp/base          # a folder holding an earlier fusionnet/ (its late_head module is loaded from there)
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import sys
import time
from pathlib import Path

import torch

from fusionnet import create_fusionnet
from fusionnet.data.splits import eval_view, load_splits
from fusionnet.engine.feature_cache import cached_features
from fusionnet.engine.late_fit import fit_late_head


def _load_other(root: str):
    path = Path(root) / "fusionnet" / "models" / "late_head.py"
    if not path.is_file():  # a checkout from before the packages
        path = Path(root) / "fusionnet" / "late_head.py"
    spec = importlib.util.spec_from_file_location("other_late_head", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module.fit_late_head


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--backbones", nargs="+", default=["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"])
    ap.add_argument("--taps", type=int, default=4)
    ap.add_argument("--cache", default="runs/bench_late_head_cache")
    ap.add_argument("--other", help="a folder with another fusionnet/engine/late_fit.py to time beside this one")
    ap.add_argument("--out", default="runs/bench_late_head.json")
    args = ap.parse_args()
    splits = load_splits(args.data, size=args.size, seed=0)
    torch.manual_seed(0)
    model = create_fusionnet(args.backbones, class_names=splits.class_names, pretrained=True, fusion="late",
                             freeze_trunks=True, taps=args.taps)
    feats, _ = cached_features(model, eval_view(splits.train, splits.val), cache_dir=args.cache, batch_size=64)
    impls = {"this": fit_late_head, **({"other": _load_other(args.other)} if args.other else {})}
    results = {}
    for name, fit in impls.items():
        m = copy.deepcopy(model)
        t0 = time.perf_counter()
        res = fit(m, feats.features, feats.targets, seed=0)
        results[name] = {"seconds": time.perf_counter() - t0, "branch_C": res.branch_C,
                         "branch_taps": res.branch_taps, "oof_nll": res.oof_nll, "oof_acc": res.oof_acc}
        print(name, json.dumps(results[name]), flush=True)
    if "other" in results:
        results["ratio_other_over_this"] = results["other"]["seconds"] / results["this"]["seconds"]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"args": vars(args), "train_rows": len(feats), **results}, indent=2))


if __name__ == "__main__":
    main()
