"""Paired test of distilled against label-trained students on the test split, all seeds pooled; writes JSON.

    python experiments/distill_paired.py runs/dd20_distill_s0 runs/dd20_distill_s1 runs/dd20_distill_s2 --data runs/digits --size 64

Each argument is a ``fusionnet distill`` run folder (its ``distill.json`` names the students' best checkpoints). The
students predict the test split again; the exact McNemar test pairs their per-image correctness.
"""

import argparse
import json
from pathlib import Path

from fusionnet.data.splits import load_splits
from fusionnet.models.factory import load_fusionnet
from fusionnet.utils.files import atomic_write_json
from fusionnet.engine.inference import predict
from fusionnet.workflows.compare.report import mcnemar


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--data", required=True)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--out", default="runs/distill_paired.json")
    args = ap.parse_args()
    right: dict[str, list[bool]] = {}
    test = load_splits(args.data, size=args.size).test
    for run in args.runs:
        rows = json.loads((Path(run) / "distill.json").read_text())["rows"]
        for name, row in rows.items():
            if name == "teacher":
                continue
            probs, labels = predict(load_fusionnet(row["checkpoint"]), test, device="cpu")
            right.setdefault(name, []).extend((probs.argmax(1) == labels).tolist())
    a, b = [n for n in right if "distilled" in n][0], [n for n in right if "labels" in n][0]
    result = {"a": a, "b": b, "images": len(right[a]), "acc": {n: sum(r) / len(r) for n, r in right.items()},
              **mcnemar(right[a], right[b])}
    print(json.dumps(result))
    atomic_write_json(args.out, result)


if __name__ == "__main__":
    main()
