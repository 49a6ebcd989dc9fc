"""Throughput of members, voting and FusionNet per execution mode, side by side in one process; writes JSON.

    python experiments/bench_throughput.py --out runs/bench_throughput.json            # CPU (or CUDA if present)
    python experiments/bench_throughput.py --device cuda --batch 256 --compile         # on a GPU machine

Modes: precision (fp32 | bf16 autocast) x memory format (contiguous | channels_last) x torch.compile (off | on,
with --compile) x, on CUDA, the fusion's branches in turn or each on its own CUDA stream (``branch_streams``).
For each mode: inference img/s of every member, of voting (the members in turn, then a soft vote) and of
FusionNet, the ratio FusionNet time / sum of member times, and the largest logit difference from fp32 contiguous
eager **on the same device** with TF32 off (a mode is "correct" within --tol for fp32 and --tol-bf16 for bf16; a
CPU reference would call every CUDA fp32 mode wrong, as TF32 convolutions differ from it by ~1e-2). On CUDA every
fp32 mode is timed with TF32 off and on (``tf32`` in the mode), and ``fastest_correct`` names the fastest correct
mode: the one ``predict`` should default to there. Training: the step rate on a
batch already in device memory (forward + backward + AdamW step, no data loading) for one member and for the
fusion, beside ``fit``'s measured rate over image files on disk (data loading included). Every figure is a median
of --runs timed runs after warm-up, with min and max. Untrained weights (pretrained=False): speed does not depend
on them.
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import statistics
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fusionnet import FusionNet, TrainConfig, fit
from fusionnet.models.streams import StreamRunner
from fusionnet.data.splits import load_splits
from fusionnet.utils.distributed import resolve_device
from fusionnet.utils.files import atomic_write_json
from fusionnet.ensembles.voting import soft_vote


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, runs: int, warmup: int = 2) -> dict:
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times)}


def rate(t: dict, n: int) -> dict:
    return {"median": n / t["median_s"], "min": n / t["max_s"], "max": n / t["min_s"]}


def prepare(model, mode, device):
    model = model.to(device).eval()
    if mode["channels_last"]:
        model = model.to(memory_format=torch.channels_last)
    return torch.compile(model) if mode["compile"] else model


def autocast(mode, device):
    return torch.autocast(device.type, dtype=torch.bfloat16) if mode["bf16"] else nullcontext()


def set_tf32(device, on: bool) -> None:
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = on
        torch.backends.cudnn.allow_tf32 = on


def fastest_correct(results: list[dict]) -> dict | None:
    correct = [r for r in results if r["correct"]]
    return max(correct, key=lambda r: r["fusion_img_s"]["median"])["mode"] if correct else None


def inference(args, device) -> list[dict]:
    torch.manual_seed(0)
    members = [FusionNet(backbones=[b], num_classes=5) for b in args.backbones]
    fusion = FusionNet(backbones=args.backbones, num_classes=5)
    for m, (name, br) in zip(members, fusion.branches.items()):  # same trunks: equal work, comparable logits
        m.branches[name].load_state_dict(br.state_dict())
    x0 = torch.rand(args.batch, 3, args.size, args.size)
    set_tf32(device, False)
    with torch.no_grad():  # the reference: fp32, contiguous, eager, TF32 off, on the device being measured
        reference = fusion.to(device).eval()(x0.to(device)).float().cpu()
    results = []
    precisions = (False,) if args.no_bf16 else (False, True)
    streams = (False, True) if device.type == "cuda" and len(args.backbones) > 1 else (False,)
    tf32s = (False, True) if device.type == "cuda" else (False,)
    for bf16, cl, comp, st, tf32 in itertools.product(precisions, (False, True),
                                                      (False, True) if args.compile else (False,), streams, tf32s):
        if bf16 and tf32:
            continue  # TF32 only changes fp32 matmuls and convolutions
        mode = {"bf16": bf16, "channels_last": cl, "compile": comp, "streams": st, "tf32": tf32}
        set_tf32(device, tf32)
        fusion.set_branch_runner(StreamRunner() if st else None)
        x = x0.to(device)
        x = x.contiguous(memory_format=torch.channels_last) if cl else x
        ms = [prepare(m, mode, device) for m in members]
        fu = prepare(fusion, mode, device)

        def run(model):
            with torch.no_grad(), autocast(mode, device):
                return model(x)

        def vote():
            with torch.no_grad(), autocast(mode, device):
                return soft_vote(torch.stack([m(x).float().softmax(1) for m in ms]))

        t_members = [timed(lambda m=m: run(m), device, args.runs) for m in ms]
        t_vote = timed(vote, device, args.runs)
        t_fusion = timed(lambda: run(fu), device, args.runs)
        pairs = []  # interleaved: the fusion and its members timed back to back, so both see the same machine state
        for _ in range(args.pairs):
            tf = timed(lambda: run(fu), device, 1, warmup=0)["median_s"]
            pairs.append(tf / sum(timed(lambda m=m: run(m), device, 1, warmup=0)["median_s"] for m in ms))
        diff = float((run(fu).float().cpu() - reference).abs().max())
        results.append({
            "mode": mode, "members_img_s": {b: rate(t, args.batch) for b, t in zip(args.backbones, t_members)},
            "voting_img_s": rate(t_vote, args.batch), "fusion_img_s": rate(t_fusion, args.batch),
            "fusion_over_sum_members_time": t_fusion["median_s"] / sum(t["median_s"] for t in t_members),
            "fusion_over_sum_members_interleaved": {"median": statistics.median(pairs), "min": min(pairs),
                                                    "max": max(pairs)},
            "max_abs_logit_diff_vs_fp32": diff, "correct": diff <= (args.tol_bf16 if bf16 else args.tol)})
        print(json.dumps(results[-1]["mode"]), f"fusion {results[-1]['fusion_img_s']['median']:.1f} img/s, "
              f"ratio {results[-1]['fusion_over_sum_members_time']:.3f} (interleaved "
              f"{results[-1]['fusion_over_sum_members_interleaved']['median']:.3f}), diff {diff:.2e}", flush=True)
    return results


def train_rates(args, device) -> dict:
    """Compute-bound step rate vs fit's rate over files, for one member and for the fusion."""
    folder = Path(tempfile.mkdtemp()) / "data"
    rng = np.random.default_rng(0)
    for split, n in (("train", args.train_images), ("test", 8)):
        for c in range(2):
            (folder / split / str(c)).mkdir(parents=True)
            for i in range(n // 2):
                pixels = rng.integers(0, 255, (args.size + 32, args.size + 32, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / split / str(c) / f"{i}.jpg", quality=90)
    splits = load_splits(folder, size=args.size, val_fraction=0.1)
    out = {}
    for name, backbones in (("member", args.backbones[:1]), ("fusion", args.backbones)):
        model = FusionNet(backbones=backbones, num_classes=2).to(device).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        x = torch.rand(args.train_batch, 3, args.size, args.size, device=device)
        y = torch.randint(0, 2, (args.train_batch,), device=device)

        def step():
            with autocast({"bf16": device.type == "cuda"}, device):
                loss = torch.nn.functional.cross_entropy(model(x).float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        step_rate = rate(timed(step, device, args.runs, warmup=2), args.train_batch)
        loader = torch.utils.data.DataLoader(splits.train, batch_size=args.train_batch, shuffle=True,
                                             num_workers=args.workers)
        t0 = time.perf_counter()
        for _ in loader:  # decoding and augmentation alone, as fit's loader does them
            pass
        loader_s = time.perf_counter() - t0
        out[name] = {"step_img_s": step_rate, "loader_seconds": loader_s}
        for path, batched in (("loader", False), ("batched", True)):  # the input paths (device_input.py)
            cfg = TrainConfig(epochs=1, batch_size=args.train_batch, progress=False, num_workers=args.workers,
                              device=str(device), warmup_epochs=0, device_augment=batched)
            fit_model = FusionNet(backbones=backbones, num_classes=2)
            fit(fit_model, splits.train, splits.val, cfg, log=None)  # warm-up epoch (allocator, loaders)
            res = fit(fit_model, splits.train, splits.val, cfg, log=None)
            fit_rate = len(splits.train) / res.history[-1]["seconds"]  # the epoch's time includes its validation
            out[name][path] = {"fit_img_s": fit_rate, "fit_over_step": fit_rate / step_rate["median"],
                               "fit_epoch_seconds": res.history[-1]["seconds"],
                               "loader_share_of_epoch": loader_s / res.history[-1]["seconds"]}
            print(name, path, f"step {step_rate['median']:.1f} img/s, fit {fit_rate:.1f} img/s", flush=True)
    return out


MEMORY_STEP = """
import resource, sys, time, torch
from fusionnet import FusionNet
from fusionnet.models.streams import StreamRunner
backbones, batch, size, ckpt = sys.argv[1].split(","), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1"
torch.manual_seed(0)
model = FusionNet(backbones=backbones, num_classes=5).train()
model.set_activation_checkpointing(ckpt)
x = torch.rand(batch, 3, size, size)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
model.forward_output(x).logits.float().logsumexp(1).mean().backward()
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before, time.perf_counter() - t0)
"""


def memory(args, device) -> dict:
    """Peak memory of one training step of the fusion (training forward + backward), with and without trunk
    checkpointing: CUDA's peak allocation on a GPU; on the CPU the growth of the process's peak resident memory
    during the step, each in a fresh process so that the two do not share an allocator."""
    import subprocess
    import sys

    out = {}
    for ckpt in (False, True):
        if device.type == "cuda":
            torch.manual_seed(0)
            model = FusionNet(backbones=args.backbones, num_classes=5).to(device).train()
            model.set_activation_checkpointing(ckpt)
            x = torch.rand(args.mem_batch, 3, args.mem_size, args.mem_size, device=device)
            torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            model.forward_output(x).logits.float().logsumexp(1).mean().backward()
            sync(device)
            peak, seconds = torch.cuda.max_memory_allocated(), time.perf_counter() - t0
        else:
            r = subprocess.run([sys.executable, "-c", MEMORY_STEP, ",".join(args.backbones), str(args.mem_batch),
                                str(args.mem_size), "1" if ckpt else "0"], capture_output=True, text=True, check=True)
            kib, seconds = r.stdout.split()
            peak, seconds = int(kib) * 1024, float(seconds)
        out["checkpointed" if ckpt else "plain"] = {"peak_bytes": peak, "step_seconds": seconds, "measure":
                                                    "cuda peak" if device.type == "cuda" else "peak RSS growth"}
    out["peak_ratio"] = out["checkpointed"]["peak_bytes"] / out["plain"]["peak_bytes"]
    out["time_ratio"] = out["checkpointed"]["step_seconds"] / out["plain"]["step_seconds"]
    print(f"memory: checkpointed/plain {out['peak_ratio']:.3f}, time x{out['time_ratio']:.2f}", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbones", nargs="+", default=["efficientnet_lite0", "efficientnet_lite1",
                                                        "efficientnet_lite2"])
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--train-batch", type=int, default=16)
    ap.add_argument("--train-images", type=int, default=128, help="images fit trains on (>= 2000 on a GPU, so "
                    "that epoch start-up does not dominate)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile'd models")
    ap.add_argument("--no-train", action="store_true")
    ap.add_argument("--no-bf16", action="store_true", help="fp32 modes only (bf16 autocast is very slow on CPUs)")
    ap.add_argument("--pairs", type=int, default=15, help="interleaved fusion/members timings for the ratio")
    ap.add_argument("--mem-batch", type=int, default=32)
    ap.add_argument("--mem-size", type=int, default=224)
    ap.add_argument("--tol", type=float, default=1e-3)
    ap.add_argument("--tol-bf16", type=float, default=0.25)
    ap.add_argument("--out", default="runs/bench_throughput.json")
    args = ap.parse_args()
    device = resolve_device(args.device)
    result = {"machine": {"device": str(device), "cpu_threads": torch.get_num_threads(),
                          "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None,
                          "python": platform.python_version(), "torch": torch.__version__},
              "settings": vars(args), "inference": inference(args, device)}
    result["fastest_correct_mode"] = fastest_correct(result["inference"])
    if not args.no_train:
        result["training"] = train_rates(args, device)
        result["memory"] = memory(args, device)
    atomic_write_json(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
