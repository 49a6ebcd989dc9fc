"""What each selection rule chooses in finished ``fusionnet compare`` runs, from their saved outputs (no training).

    python experiments/reselect.py runs/cmp_s0 runs/cmp_s1 runs/cmp_s2 --out runs/reselect.json

For every run and every rule (``nll_scaled``, ``nll``, ``acc``), the members' and fusion variants' saved validation
and test outputs are put in a :class:`fusionnet.workflows.pipeline.Table` again, every output ensemble is re-run on the
members' outputs (with the run's seed), and the two val-selected rows are chosen as ``compare`` chooses them. It
prints which row each rule picks and its test accuracy, and the exact McNemar test between the two selected rows
pooled over the runs. It shows what a change of the default rule does to runs already made; it never chooses
anything on the test split. ``--write-report RULE`` also rewrites each run's results.json / results.md with the
selected rows of that rule (rows the saved outputs cannot rebuild, such as the late_oof model's branch vote, are kept
as they were), e.g. before ``experiments/seed_summary.py``.
"""

import argparse
import json
from pathlib import Path

from fusionnet.workflows.rows import SELECTED_ENSEMBLE, SELECTED_FUSION, fusion_id, label
from fusionnet.workflows.pipeline import Scored, Table, val_scores
from fusionnet.workflows.compare.report import mcnemar, write_report
from fusionnet.ensembles.voting import MemberOutputs

RULES = ("nll_scaled", "nll", "acc")


def table_of(run: Path) -> Table:
    """The run's members and fusion variants, from ``outputs/``, with every output ensemble re-run."""
    results = json.loads((run / "results.json").read_text())

    def scored(name: str, info: dict, kind: str) -> Scored:
        outputs = {s: MemberOutputs.load(run / "outputs" / f"{name}_{s}.pt") for s in ("val", "test")}
        return Scored(name, kind, outputs, {**info, "val": val_scores(outputs["val"].probs, outputs["val"].labels)})

    members = [scored(b, info, "member") for b, info in results["members"].items()]
    table = Table(members, members[0].outputs["val"].class_names)
    table.add_ensembles(seed=results["budget"]["seed"])
    for variant, info in results["fusion"].items():
        table.add_fusion(scored(f"fusion_{variant}", info, "fusion"), fusion_id(variant))
    return table


def rewrite(run: Path, table: Table, rule: str) -> None:
    """The run's results.json / results.md with the selected rows of ``rule`` (``table``: :func:`table_of` it)."""
    results = json.loads((run / "results.json").read_text())
    table.add_selected(rule)
    labels = {label(i) for i in table.rows}  # a run written before the ids keys its rows by these labels
    kept = {n: r for n, r in results["methods"].items() if n not in table.rows and n not in labels
            and not n.startswith("selected:") and "selected on val" not in n}
    for r in kept.values():  # scored by an older rule than the saved outputs can recompute
        r["val"] = r["val"] and {k: v for k, v in r["val"].items() if k != "nll_scaled"}
    results["methods"] = {**table.rows, **kept}
    results["budget"]["select_by"] = rule
    y = table.y_test
    write_report(results, run, table.class_names, reliability={
        SELECTED_FUSION: (table.rows[SELECTED_FUSION]["probs"], y), "soft": (table.rows["soft"]["probs"], y)})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--out", required=True)
    ap.add_argument("--write-report", choices=RULES, help="rewrite each run's report with this rule's selected rows")
    args = ap.parse_args()
    tables = {run: table_of(run) for run in map(Path, args.runs)}  # each rule's selection replaces the last's rows
    for run, table in tables.items() if args.write_report else ():
        rewrite(run, table, args.write_report)
    report: dict = {}
    for rule in RULES:
        per_run, fusion_right, ensemble_right = {}, [], []
        for run, table in tables.items():
            table.add_selected(rule)
            f, e = table.rows[SELECTED_FUSION], table.rows[SELECTED_ENSEMBLE]
            per_run[str(run)] = {"fusion": f["chosen"], "fusion_acc": f["acc"], "ensemble": e["chosen"],
                                 "ensemble_acc": e["acc"]}
            y = table.y_test.tolist()
            fusion_right += [p == t for p, t in zip(f["pred"], y)]
            ensemble_right += [p == t for p, t in zip(e["pred"], y)]
        test = mcnemar(fusion_right, ensemble_right)
        only_f, only_e = test["a_only"], test["b_only"]
        n = len(per_run)
        report[rule] = {"runs": per_run,
                        "fusion_acc_mean": sum(r["fusion_acc"] for r in per_run.values()) / n,
                        "ensemble_acc_mean": sum(r["ensemble_acc"] for r in per_run.values()) / n,
                        "only_fusion_right": only_f, "only_ensemble_right": only_e,
                        "mcnemar_p": test["p_value"]}
        print(f"{rule}: fusion {report[rule]['fusion_acc_mean']:.4f} vs ensemble "
              f"{report[rule]['ensemble_acc_mean']:.4f} ({only_f} vs {only_e}, p = {report[rule]['mcnemar_p']:.3g})")
        for run, r in per_run.items():
            print(f"  {run}: {r['fusion']} {r['fusion_acc']:.4f} | {r['ensemble']} {r['ensemble_acc']:.4f}")
    Path(args.out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
