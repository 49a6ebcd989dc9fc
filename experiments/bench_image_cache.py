"""Benchmark: reading training images from the files vs from the decoded-image cache (fusionnet.data.image_cache).

    python experiments/bench_image_cache.py --data ../shared/data/flowers5_128 --out runs/bench_image_cache.json

On the same data, seed and loader settings (batch, workers), measured side by side in one run:

* the time to build the cache (every file decoded once, in worker processes);
* a loader pass over the training split through the training pipeline, and over val + test through the eval
  pipeline, from the files and from the cache (median of ``--repeats`` passes, with min and max);
* a fine-tuning epoch of one member (``fit``, all layers training) from the files and from the cache, and the share
  of that epoch which a loader pass alone takes.

Writes one JSON file with the figures and their ratios.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import ConcatDataset, DataLoader

from fusionnet import create_fusionnet
from fusionnet.data.splits import load_splits
from fusionnet.engine.train import TrainConfig, fit


def timed(fn, repeats: int) -> dict:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "runs": repeats}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="../shared/data/flowers5_128")
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--fit-epochs", type=int, default=1, help="fine-tuning epochs timed per source (0: skip)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="runs/bench_image_cache.json")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        files = load_splits(args.data, size=args.size, seed=args.seed, progress=False)
        list_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        cached = load_splits(args.data, size=args.size, seed=args.seed, image_cache=Path(tmp) / "images",
                             progress=False)
        build_s = time.perf_counter() - t0 - list_s  # listing and checking the files is the same in both
        sources = {"files": files, "cache": cached}

        def loader_pass(splits, which):
            data = splits.train if which == "train" else ConcatDataset([d for d in (splits.val, splits.test) if d])
            for _ in DataLoader(data, batch_size=args.batch_size, shuffle=which == "train",
                                num_workers=args.workers):
                pass

        loading = {name: {which: timed(lambda s=s, w=which: loader_pass(s, w), args.repeats)
                          for which in ("train", "eval")} for name, s in sources.items()}
        epochs = {}
        for name, s in sources.items() if args.fit_epochs else ():
            torch.manual_seed(args.seed)
            model = create_fusionnet([args.backbone], class_names=s.class_names, pretrained=True)
            cfg = TrainConfig(epochs=args.fit_epochs, batch_size=args.batch_size, strategy="full",
                              num_workers=args.workers, seed=args.seed, progress=False)
            res = fit(model, s.train, s.val, cfg, log=None)
            train_s = statistics.median(row["seconds"] for row in res.history)
            epochs[name] = {"epoch_seconds": train_s,
                            "loader_share_of_epoch": loading[name]["train"]["median_s"] / train_s}
    ratio = {which: loading["files"][which]["median_s"] / loading["cache"][which]["median_s"]
             for which in ("train", "eval")}
    results = {
        "budget": {"data": args.data, "size": args.size, "batch_size": args.batch_size, "workers": args.workers,
                   "train": len(files.train), "val": len(files.val), "test": len(files.test or []),
                   "backbone": args.backbone, "fit_epochs": args.fit_epochs, "threads": torch.get_num_threads(),
                   "torch": torch.__version__},
        "cache_build_seconds": build_s, "loader": loading, "files_over_cache": ratio, "fine_tune_epoch": epochs,
        "command": "python experiments/bench_image_cache.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "out"),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(json.dumps({"cache_build_seconds": build_s, "files_over_cache": ratio, "fine_tune_epoch": epochs},
                     indent=2))


if __name__ == "__main__":
    main()
