"""Inference time of distilled students against their teachers, measured interleaved in one process (the ratio
holds where absolute times drift); writes JSON.

    python experiments/distill_speed.py runs/dd20_distill_s0 runs/dd20_distill_s1 --size 64 --out runs/distill_speed.json

Each argument is a ``fusionnet distill`` run folder; its ``distill.json`` names the teacher's checkpoints and the
students' best checkpoints. For every pair, ``--rounds`` rounds time the teacher and each student on the same random
batch (``fusionnet.workflows.distill.inference_rate``, batch 32, CPU) in turn; the ratio is the median over rounds.
"""

import argparse
import json
import statistics
from pathlib import Path

from fusionnet.workflows.distill import Teacher, inference_rate
from fusionnet.models.factory import load_fusionnet
from fusionnet.utils.files import atomic_write_json


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", default="runs/distill_speed.json")
    args = ap.parse_args()
    result = {}
    for run in args.runs:
        report = json.loads((Path(run) / "distill.json").read_text())
        rows = report["rows"]
        members = [load_fusionnet(p) for p in rows["teacher"]["checkpoints"]]
        teacher = Teacher(members, range(len(members[0].class_names)))
        students = {name: load_fusionnet(r["checkpoint"]) for name, r in rows.items() if name != "teacher"}
        rates = {"teacher": [], **{n: [] for n in students}}
        for _ in range(args.rounds):
            rates["teacher"].append(inference_rate(teacher, args.size))
            for name, model in students.items():
                rates[name].append(inference_rate(model, args.size))
        result[run] = {name: {"img_s": statistics.median(r),
                              "time_vs_teacher": statistics.median(t / s for t, s in zip(rates["teacher"], r))}
                       for name, r in rates.items()}
        print(run, json.dumps(result[run]), flush=True)
        atomic_write_json(args.out, result)


if __name__ == "__main__":
    main()
