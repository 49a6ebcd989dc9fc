"""fit's rate against the step rate, per input path, side by side in one process; writes JSON.

    python experiments/bench_fit_input.py --data ../shared/data/flowers5_128 --size 64 --out runs/bench_fit_input.json
    python experiments/bench_fit_input.py --device cuda --size 128 --images 2935 --batch 64 ...   # on a GPU

For one member (``--backbones`` one name) or a fusion (several): the training step rate on a batch already in
device memory (forward + backward + AdamW, no data), then one-epoch ``fit`` runs over ``--images`` training images
with each input path, interleaved ``--repeats`` times so that both see the same machine load:

* ``loader``: the per-image albumentations pipeline in a DataLoader (``device_augment=False``);
* ``batched``: the GPU input path (``device_augment=True``: uint8 images on the device, augmented per batch).

Reported per path: fit img/s (training images / the epoch's seconds, which include validating 64 images), its ratio to
the step rate, and the loader share of the epoch (one pass of the loader alone / the epoch). Run it with an older
checkout on PYTHONPATH for a before/after comparison: a path the installed fusionnet lacks is skipped.
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import statistics
import time

import torch

from fusionnet import FusionNet, TrainConfig, fit
from fusionnet.data.splits import load_splits
from fusionnet.utils.distributed import resolve_device
from fusionnet.utils.files import atomic_write_json


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def step_rate(backbones, num_classes, size, batch, device, runs=8) -> float:
    model = FusionNet(backbones=backbones, num_classes=num_classes).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x, y = torch.rand(batch, 3, size, size, device=device), torch.randint(0, num_classes, (batch,), device=device)
    times = []
    for i in range(runs + 2):
        t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False):
            loss = torch.nn.functional.cross_entropy(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sync(device)
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return batch / statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--backbones", nargs="+", default=["efficientnet_lite0"])
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--images", type=int, default=600, help="training images per epoch")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--paths", nargs="+", default=["loader", "batched"], choices=["loader", "batched"])
    ap.add_argument("--out", default="runs/bench_fit_input.json")
    args = ap.parse_args()
    device = resolve_device(args.device)
    splits = load_splits(args.data, size=args.size, seed=0, progress=False)
    gen = torch.Generator().manual_seed(0)
    train = splits.train.subset(torch.randperm(len(splits.train), generator=gen)[:args.images].tolist())
    val = splits.val.subset(list(range(min(64, len(splits.val)))))
    k = len(splits.class_names)
    has_device_path = "device_augment" in {f.name for f in dataclasses.fields(TrainConfig)}
    paths = [p for p in args.paths if p == "loader" or has_device_path]
    result = {"machine": platform.platform(), "threads": torch.get_num_threads(), "device": str(device),
              "torch": torch.__version__, "budget": vars(args), "step_img_s": step_rate(
                  args.backbones, k, args.size, args.batch, device), "paths": {p: [] for p in paths}}
    t0 = time.perf_counter()
    for _ in torch.utils.data.DataLoader(train, batch_size=args.batch, num_workers=args.workers):
        pass
    result["loader_pass_s"] = time.perf_counter() - t0
    for _ in range(args.repeats):
        for path in paths:
            extra = {"device_augment": path == "batched"} if has_device_path else {}
            cfg = TrainConfig(epochs=1, batch_size=args.batch, num_workers=args.workers, progress=False,
                              device=str(device), warmup_epochs=0, **extra)
            model = FusionNet(backbones=args.backbones, num_classes=k)
            t0 = time.perf_counter()
            res = fit(model, train, val, cfg, log=None)
            total = time.perf_counter() - t0
            epoch_s = res.history[-1]["seconds"]
            result["paths"][path].append({"fit_call_s": total, "epoch_s": epoch_s})
            print(f"{path:8s} epoch {epoch_s:.1f}s (fit call {total:.1f}s)", flush=True)
    for path, rows in result["paths"].items():
        epoch = statistics.median(r["epoch_s"] for r in rows)
        rate = args.images / epoch
        result[path] = {"epoch_s_median": epoch, "fit_img_s": rate, "fit_over_step": rate / result["step_img_s"],
                        "loader_share_of_epoch": result["loader_pass_s"] / epoch}
        print(f"{path:8s} fit {rate:.1f} img/s = {rate / result['step_img_s']:.2f}x the step rate "
              f"({result['step_img_s']:.1f} img/s); loader share {result[path]['loader_share_of_epoch']:.2f}")
    atomic_write_json(args.out, result)


if __name__ == "__main__":
    main()
