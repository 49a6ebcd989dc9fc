"""bf16 on the CPU: speed and cost, side by side in one process; writes JSON (issue 30).

    OMP_NUM_THREADS=2 python experiments/bench_bf16.py --data ../shared/data/flowers5_128 --size 64 \\
        --out runs/bench_bf16.json

Speed, interleaved (every mode once per round, --rounds rounds, medians): for each trunk, fp32 / bf16 autocast x
contiguous / channels-last, (a) inference of a FusionNet member at batch --batch (predict's work), (b) the frozen
feature pass of its branch (the feature cache's work), (c) one training step of every layer at batch 32 (forward,
backward, AdamW). Cost, on real images: a branch classifier (the late_oof head's per-branch fit) fitted on fp32
features of the training split, then validation predicted from fp32 and from bf16 features (top-1 agreement, the
change in validation NLL and accuracy); and the same classifier fitted on bf16 features, scored on bf16 validation
features (what ``--amp true`` gives end to end for a frozen-trunk head).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from fusionnet import create_fusionnet
from fusionnet.data.splits import eval_view, load_splits
from fusionnet.engine.feature_cache import compute_features
from fusionnet.utils.files import atomic_write_json

MODES = [(p, f) for p in ("fp32", "bf16") for f in ("contiguous", "channels_last")]


def context(precision: str):
    return torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else nullcontext()


def _fmt(x: torch.Tensor, fmt: str) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if fmt == "channels_last" else x.contiguous()


def speed(backbone: str, size: int, batch: int, rounds: int) -> dict:
    model = create_fusionnet([backbone], num_classes=5, pretrained=True).eval()
    branch = next(iter(model.branches.values()))
    x_inf, x_train = torch.rand(batch, 3, size, size), torch.rand(32, 3, size, size)
    y = torch.randint(0, 5, (32,))
    trainee = create_fusionnet([backbone], num_classes=5, pretrained=True)
    trainee.set_trainable_stages(None)
    opt = torch.optim.AdamW(trainee.parameters(), lr=1e-4)
    times = {f"{p}/{f}": {"predict_s": [], "features_s": [], "train_step_s": []} for p, f in MODES}

    def run(precision, fmt):
        for m in (model, trainee):
            m.to(memory_format=torch.channels_last if fmt == "channels_last" else torch.contiguous_format)
        out = times[f"{precision}/{fmt}"]
        with torch.no_grad(), context(precision):
            t0 = time.perf_counter()
            model(_fmt(x_inf, fmt))
            out["predict_s"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            branch(_fmt(x_inf, fmt))
            out["features_s"].append(time.perf_counter() - t0)
        trainee.train()
        t0 = time.perf_counter()
        with context(precision):
            loss = torch.nn.functional.cross_entropy(trainee(_fmt(x_train, fmt)).float(), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        out["train_step_s"].append(time.perf_counter() - t0)

    for p, f in MODES:  # warm-up, untimed
        run(p, f)
    for t in times.values():
        for v in t.values():
            v.clear()
    for _ in range(rounds):
        for p, f in MODES:
            run(p, f)
    medians = {mode: {k: statistics.median(v) for k, v in t.items()} for mode, t in times.items()}
    ref = medians["fp32/channels_last"]
    for mode, m in medians.items():
        m.update({f"speedup_{k[:-2]}_vs_fp32_cl": ref[k] / m[k] for k in ("predict_s", "features_s", "train_step_s")})
    return medians


def cost(backbone: str, splits, seed: int) -> dict:
    from sklearn.model_selection import StratifiedKFold

    from fusionnet.engine.late_fit import fit_branch

    def features(view, precision):
        model = create_fusionnet([backbone], num_classes=len(splits.class_names), pretrained=True, fusion="late",
                                 freeze_trunks=True)
        (name,) = model.branches
        with context(precision):
            feats, labels = compute_features(dict(model.feature_extractors()), view, device="cpu")
        return model, name, feats[name].float(), labels

    train_view = eval_view(splits.train, splits.val)
    result = {}
    scored = {}
    for fitted_on in ("fp32", "bf16"):
        model, name, x_train, y_train = features(train_view, fitted_on)
        cv = StratifiedKFold(n_splits=5, shuffle=True, random_state=seed)
        fit = fit_branch(model, name, x_train, y_train, cv)
        classifier = model.fuser.classifiers[0]
        for predicted_with in ("fp32", "bf16"):
            _, _, x_val, y_val = features(splits.val, predicted_with)
            with torch.no_grad():
                lp = classifier(x_val).double().log_softmax(1)
            scored[(fitted_on, predicted_with)] = lp
            result[f"fit_{fitted_on}/predict_{predicted_with}"] = {
                "val_acc": float((lp.argmax(1) == y_val).double().mean()),
                "val_nll": float(-lp[torch.arange(len(y_val)), y_val].mean()), "C": fit.C}
    ref = scored[("fp32", "fp32")].argmax(1)
    for (f, p), lp in scored.items():
        result[f"fit_{f}/predict_{p}"]["top1_agreement_with_fp32"] = float((lp.argmax(1) == ref).double().mean())
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--backbones", nargs="+", default=["efficientnet_lite0", "efficientnet_lite1"])
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="runs/bench_bf16.json")
    args = ap.parse_args()
    splits = load_splits(args.data, size=args.size, seed=args.seed, progress=False)
    report = {"budget": vars(args), "threads": torch.get_num_threads(), "cpu_bf16": torch.backends.mkldnn.is_available(),
              "speed": {}, "cost": {}}
    for b in args.backbones:
        report["speed"][b] = speed(b, args.size, args.batch, args.rounds)
        atomic_write_json(args.out, report)
        report["cost"][b] = cost(b, splits, args.seed)
        atomic_write_json(args.out, report)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
