"""Benchmark: frozen-trunk training with and without the feature cache, on the same data, seed and order.

    python experiments/bench_feature_cache.py --data ../shared/data/flowers5_128 --epochs 10

Writes runs/bench_feature_cache/results.json: wall time of each mode, their ratio, and how far the two heads'
weights are apart (they should match within float tolerance).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch

from fusionnet import FusionNet, create_fusionnet
from fusionnet.data.splits import eval_transform, load_splits
from fusionnet.engine.train import TrainConfig, fit


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="../shared/data/flowers5_128")
    ap.add_argument("--backbones", nargs="+", default=["efficientnet_lite0", "efficientnet_lite1",
                                                        "efficientnet_lite2"])
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="runs/bench_feature_cache")
    args = ap.parse_args()

    out = Path(args.out)
    cache_dir = out / "cache"
    shutil.rmtree(cache_dir, ignore_errors=True)
    splits = load_splits(args.data, size=args.size, seed=args.seed)
    train = splits.train.with_transform(eval_transform(args.size))  # deterministic: the cache's precondition

    def run(cache: bool) -> tuple[float, FusionNet, dict]:
        torch.manual_seed(args.seed)
        model = create_fusionnet(backbones=args.backbones, num_classes=len(splits.class_names), pretrained=True,
                          freeze_trunks=True, class_names=splits.class_names)
        cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, strategy="frozen", seed=args.seed,
                          cache_features=cache, cache_dir=str(cache_dir) if cache else None, progress=False)
        t0 = time.perf_counter()
        result = fit(model, train, splits.val, cfg, log=print)
        return time.perf_counter() - t0, model, result.history[-1]

    t_plain, m_plain, last_plain = run(False)
    t_cold, m_cold, last_cold = run(True)
    t_warm, _, _ = run(True)  # the disk cache from the cold run
    pairs = zip(m_plain.head.parameters(), m_cold.head.parameters())
    diff = max(float((a - b).detach().abs().max()) for a, b in pairs)
    results = {
        "budget": {"backbones": args.backbones, "epochs": args.epochs, "size": args.size,
                   "batch_size": args.batch_size, "seed": args.seed, "train_images": len(train),
                   "val_images": len(splits.val), "threads": torch.get_num_threads()},
        "seconds": {"uncached": t_plain, "cache_cold": t_cold, "cache_warm": t_warm},
        "speedup": {"cold": t_plain / t_cold, "warm": t_plain / t_warm},
        "head_max_abs_diff": diff,
        "final_val": {"uncached": last_plain, "cached": last_cold},
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(json.dumps({k: results[k] for k in ("seconds", "speedup", "head_max_abs_diff")}, indent=2))


if __name__ == "__main__":
    main()
