"""Train one more jointly trained fusion variant on a finished ``fusionnet compare`` run's exact settings (its
config.json: data, split seed, size, training preset, budget) and compare it, paired, with a row of that run.

    python experiments/add_variant.py runs/cmp_s0 --variant concat --against distilled --out runs/cmp_s0_concat

An ablation without re-training the members: e.g. the born-again fusion (``distilled``, trained on the members'
soft vote) against the same concat FusionNet trained on the labels alone. Writes ``<out>/add_variant.json``: the
new row's test accuracy and NLL, its validation scores, the other row's, and the exact McNemar test on their test
predictions. Only variants that need no members (the registered fusion methods) can be added this way.
"""

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

from fusionnet.workflows.compare import CompareConfig, _context, _run_variant
from fusionnet.utils.files import atomic_write_json
from fusionnet.models.fusers import FUSIONS
from fusionnet.utils.metrics import accuracy, nll
from fusionnet.workflows.compare.report import mcnemar
from fusionnet.ensembles.voting import MemberOutputs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run")
    ap.add_argument("--variant", default="concat", choices=sorted(FUSIONS))
    ap.add_argument("--against", default="distilled", help="the run's fusion variant to pair it with")
    ap.add_argument("--out", required=True)
    ap.add_argument("--wait", action="store_true", help="wait for the run to write that row's test outputs (when "
                                                        "both run side by side)")
    args = ap.parse_args()
    run = Path(args.run)
    saved = json.loads((run / "config.json").read_text())["compare"]
    cfg = replace(CompareConfig(**saved), variants=[args.variant], out=args.out, cache_root=None)
    ctx = _context(cfg, print)
    new = _run_variant(args.variant, cfg, ctx, {})
    while args.wait and not (run / "outputs" / f"fusion_{args.against}_test.pt").is_file():
        time.sleep(30)
    other = {s: MemberOutputs.load(run / "outputs" / f"fusion_{args.against}_{s}.pt") for s in ("val", "test")}
    y = other["test"].labels
    if new.outputs["test"].sample_ids != other["test"].sample_ids:
        raise SystemExit("the new row's test images differ from the run's: was the data folder changed?")

    def row(outputs) -> dict:
        return {"test_acc": accuracy(outputs["test"].probs, y), "test_nll": nll(outputs["test"].probs, y),
                "val_acc": accuracy(outputs["val"].probs, outputs["val"].labels),
                "val_nll": nll(outputs["val"].probs, outputs["val"].labels)}

    right = lambda o: (o["test"].probs.argmax(1) == y).tolist()  # noqa: E731
    report = {"run": str(run), "seed": cfg.seed, "budget": {"epochs": cfg.train.epochs, "size": cfg.size,
                                                            "patience": cfg.train.patience},
              args.variant: {**row(new.outputs), "best_epoch": new.info["best_epoch"],
                             "seconds": new.info["seconds"]},
              args.against: row(other), "mcnemar": mcnemar(right(new.outputs), right(other))}
    atomic_write_json(Path(args.out) / "add_variant.json", report)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
