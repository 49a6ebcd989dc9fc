"""Writing a comparison's results: ``results.json``, ``results.md`` and figures; and the summary over seeds.

Running the experiment (:mod:`fusionnet.workflows.compare`) and writing it up are separate: everything here works from
the results dict (per-row test metrics and predictions), so a report can be rewritten without training.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path

import torch

from fusionnet.errors import DataError
from fusionnet.utils.files import atomic_write_json, atomic_write_text
from fusionnet.utils.plots import confusion_grid, reliability_diagram
from fusionnet.workflows.rows import SELECTED_ENSEMBLE, SELECTED_FUSION, label

SELECTED = (SELECTED_FUSION, SELECTED_ENSEMBLE)


def write_report(results: dict, out: Path, class_names: list[str], reliability: dict) -> None:
    """``results.json`` (rows by id, each with its label; probabilities left out), ``results.md``,
    ``confusion.png`` and ``reliability.png`` (``reliability``: {row id: (test probs, labels) or None})."""
    rows = results["methods"]
    atomic_write_json(out / "results.json", {**results, "methods": {
        name: {"label": label(name), **{k: v for k, v in row.items() if k != "probs"}}
        for name, row in rows.items()}})
    atomic_write_text(out / "results.md", markdown_table(results))
    shown = [m for m in (*SELECTED, "soft") if m in rows]
    confusion_grid({label(m): rows[m]["confusion"] for m in shown}, class_names, out / "confusion.png")
    reliability_diagram({label(m): (torch.as_tensor(p).numpy(), torch.as_tensor(y).numpy())
                         for m, pair in reliability.items() if pair is not None for p, y in [pair]},
                        out / "reliability.png")


def _budget_line(b: dict) -> str:
    return (f"Regime **{b['regime']}**, {b['epochs']} epochs, {b['size']} px, seed {b['seed']}, batch "
            f"{b['batch_size']}, best epoch by val {b.get('monitor', 'nll')}; train/val/test = "
            f"{b['train']}/{b['val']}/{b['test']} images.")


NOTES = ["", "Wall time of an ensemble method counts training and predicting all of its members; selection and "
             "stacking add their own (small) time. The fusion built from members counts its members' training time "
             "too.",
         "For methods fitted on validation (weights, selection, temperatures) the val scores are in-sample and so "
         "optimistic; stacking shows its out-of-fold scores (and its NLL stands for its scaled NLL). The selected "
         "ensemble chooses by each method's scores cross-validated on validation (fitted on 4/5 of it, scored on "
         "the rest; `val_cv` in results.json), the selected fusion by its own validation scores (no fusion model "
         "is fitted on validation).",
         "Hard voting's 'probabilities' are vote fractions, so its NLL and ECE are not comparable with the other "
         "rows."]


SELECT_NOTES = {"nll_scaled": "The selected rows choose by `val NLL scaled` (lowest): the validation NLL after each "
                              "row's own temperature fitted on validation, so a row's confidence does not decide, "
                              "only how well it ranks the classes.",
                "nll": "The selected rows choose by `val NLL` (lowest).",
                "acc": "The selected rows choose by `val acc` (highest; the first on ties)."}

SHARED_NOTE = ("Features were computed once per trunk and shared by every model (--shared-cache): a row's wall time "
               "leaves out trunk features that an earlier model computed, so wall times are not comparable here.")


def markdown_table(results: dict) -> str:
    lines = [_budget_line(results["budget"]), "",
             "| method | test acc | macro-F1 | NLL | ECE | val acc | val NLL | val NLL scaled | wall s | params |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, r in results["methods"].items():
        v = r.get("val")
        val = f"{v['acc']:.4f} | {v['nll']:.4f} | {v.get('nll_scaled', v['nll']):.4f}" if v else "- | - | -"
        shown = f"{label(name)} -> {label(r['chosen'])}" if r.get("chosen") else label(name)
        lines.append(f"| {shown} | {r['acc']:.4f} | {r['macro_f1']:.4f} | {r['nll']:.4f} | {r['ece']:.4f} | {val} | "
                     f"{r['seconds']:.1f} | {r['params'] / 1e6:.2f}M |")
    for name, why in results.get("skipped", {}).items():
        lines.append(f"| {label(name)} | skipped: {why} | | | | | | | | |")
    budget = results["budget"]
    notes = NOTES + [SELECT_NOTES[budget.get("select_by", "nll")],
                     SHARED_NOTE if budget.get("shared_cache") else
                     "Every model computes its own trunk features, so wall times compare."]
    return "\n".join(lines + notes) + "\n"


def mcnemar(correct_a: list[bool], correct_b: list[bool]) -> dict:
    """Exact McNemar test on paired predictions: b = A right and B wrong, c = the reverse; two-sided p-value
    from the binomial(b + c, 1/2) distribution."""
    if len(correct_a) != len(correct_b):
        raise DataError(f"paired test needs equal lengths, got {len(correct_a)} and {len(correct_b)}")
    b = sum(1 for x, y in zip(correct_a, correct_b) if x and not y)
    c = sum(1 for x, y in zip(correct_a, correct_b) if y and not x)
    n = b + c
    if n == 0:
        return {"a_only": 0, "b_only": 0, "p_value": 1.0}
    tail = sum(math.comb(n, i) for i in range(0, min(b, c) + 1)) / 2 ** n
    return {"a_only": b, "b_only": c, "p_value": min(1.0, 2 * tail)}


def write_seed_summary(per_seed: dict[int, dict], out: Path, config: dict) -> dict:
    """Mean +- sd of every row over seeds, and McNemar's test between the two val-selected rows on the test
    predictions of all seeds pooled (each test image once per seed, paired between the rows)."""
    seeds = list(per_seed)
    names = [n for n in per_seed[seeds[0]]["methods"] if all(n in per_seed[s]["methods"] for s in seeds)]
    summary: dict[str, dict] = {}
    for name in names:
        row = {}
        for metric in ("acc", "macro_f1", "nll", "ece", "seconds"):
            values = [per_seed[s]["methods"][name][metric] for s in seeds]
            row[metric] = {"mean": statistics.fmean(values),
                           "sd": statistics.stdev(values) if len(values) > 1 else 0.0, "values": values}
        summary[name] = row
    def right(n: str) -> list[bool]:
        return [p == y for s in seeds for p, y in zip(per_seed[s]["methods"][n]["pred"], per_seed[s]["test_labels"])]

    test, against = None, {}
    if all(n in names for n in SELECTED):
        test = {**mcnemar(right(SELECTED[0]), right(SELECTED[1])), "a": SELECTED[0], "b": SELECTED[1]}  # row ids
        ensembles = [n for n in names if per_seed[seeds[0]]["methods"][n].get("kind") == "ensemble"]
        against = {n: mcnemar(right(SELECTED[0]), right(n)) for n in ensembles}
    result = {"seeds": seeds, "config": config, "budget": per_seed[seeds[0]]["budget"], "methods": summary,
              "paired_test": test, "fusion_vs_each_ensemble": against}
    atomic_write_json(out / "results.json", result)
    atomic_write_text(out / "results.md", seed_table(result))
    return result


def seed_table(result: dict) -> str:
    b = {**result["budget"], "seed": ", ".join(map(str, result["seeds"]))}
    lines = [_budget_line(b).replace(f"seed {b['seed']}", f"seeds {b['seed']} (mean +- sd)"), "",
             "| method | test acc | macro-F1 | NLL | ECE | wall s |", "| --- | --- | --- | --- | --- | --- |"]
    for name, r in result["methods"].items():
        cells = [f"{r[m]['mean']:.4f} +- {r[m]['sd']:.4f}" for m in ("acc", "macro_f1", "nll", "ece")]
        lines.append(f"| {label(name)} | " + " | ".join(cells) + f" | {r['seconds']['mean']:.1f} |")
    t = result.get("paired_test")
    if t:
        verdict = "significant" if t["p_value"] < 0.05 else "not significant"
        lines += ["", f"Paired test (exact McNemar, test predictions of all seeds pooled): '{label(t['a'])}' right "
                      f"where '{label(t['b'])}' is wrong on {t['a_only']} images, the reverse on {t['b_only']}; p = "
                      f"{t['p_value']:.3g}, {verdict} at the 5 % level."]
    if result.get("fusion_vs_each_ensemble"):
        lines += ["", f"'{label(SELECTED[0])}' against each output ensemble (exact McNemar, all seeds pooled):", "",
                  "| ensemble | fusion right, it wrong | it right, fusion wrong | p |", "| --- | --- | --- | --- |"]
        lines += [f"| {label(n)} | {t['a_only']} | {t['b_only']} | {t['p_value']:.3g} |"
                  for n, t in result["fusion_vs_each_ensemble"].items()]
    return "\n".join(lines) + "\n"
