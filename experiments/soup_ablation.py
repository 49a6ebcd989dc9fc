"""With and without greedy soups, from the same training runs: finished ``fusionnet compare --soup K`` runs.

    python experiments/soup_ablation.py runs/j30_s0 runs/j30_s1 --out runs/j30_soup.json

A run trained with ``--soup K`` keeps each member's single best epoch as ``models/<member>/best_epoch.pth`` beside
the soup in ``best.pth`` (:func:`fusionnet.engine.train.fit`). This script scores those best-epoch members again on
the run's own validation and test splits (same data, size and seed), re-runs every output ensemble on them, chooses
the selected ensemble on validation as ``compare`` does, and sets the rows beside the run's own (souped) rows: test
accuracy and NLL per run and their mean, and pooled exact McNemar tests (souped against not souped, per member and
for the selected ensemble; the run's selected fusion against the selected ensemble without soups). Nothing is chosen
on the test split. The fusion is not rebuilt without soups (its cross-fitted fold models are not kept).
"""

import argparse
import json
from pathlib import Path

from fusionnet.data.splits import load_splits
from fusionnet.models.factory import load_fusionnet
from fusionnet.workflows.pipeline import Context, Table, score
from fusionnet.workflows.compare.report import mcnemar
from fusionnet.workflows.rows import SELECTED_ENSEMBLE, SELECTED_FUSION, member_id

from reselect import table_of  # noqa: E402  (experiments/ is the script's own folder)

ROWS = ("soft", "weighted", "greedy", "temperature", "stacking", "stacking_hgb", SELECTED_ENSEMBLE)


def unsouped_table(run: Path, results: dict) -> Table:
    """The run's members at their single best epoch, scored on the run's splits, with every output ensemble
    (``results``: the run's results.json)."""
    cfg = json.loads((run / "config.json").read_text())["compare"]
    seed = results["budget"]["seed"]
    cache = Path(cfg.get("cache_root") or run / "cache") / "images" if cfg.get("image_cache") else None
    splits = load_splits(cfg["data"], size=cfg["size"], val_fraction=cfg["val_fraction"], seed=seed,
                         image_cache=cache, progress=False)
    ctx = Context(splits, run / "soup_ablation", device="cpu", progress=False)
    members = []
    for name in results["members"]:
        path = run / "models" / name / "best_epoch.pth"
        if not path.is_file():
            raise SystemExit(f"{path} is missing: the run was not trained with --soup, or the soup kept one epoch")
        scored = score(load_fusionnet(path), ctx, name, "member", checkpoint=str(path))
        scored.info["seconds"] = results["members"][name]["seconds"]
        members.append(scored)
    table = Table(members, splits.class_names)
    table.add_ensembles(seed=seed)
    table.add_selected(results["budget"]["select_by"])
    return table


def right(row: dict, labels: list[int]) -> list[bool]:
    return [p == t for p, t in zip(row["pred"], labels)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    per_run, pooled = {}, {}
    for run in map(Path, args.runs):
        results = json.loads((run / "results.json").read_text())
        souped, plain = table_of(run), unsouped_table(run, results)
        souped.add_selected(results["budget"]["select_by"])
        if plain.y_test.tolist() != souped.y_test.tolist():
            raise SystemExit(f"{run}: the best-epoch members' test split differs from the run's")
        y = souped.y_test.tolist()
        names = [member_id(m.name) for m in souped.members] + [r for r in ROWS if r in plain.rows]
        per_run[str(run)] = {n: {"soup": _metrics(souped.rows[n]), "no_soup": _metrics(plain.rows[n])}
                             for n in names}
        per_run[str(run)][SELECTED_FUSION] = {"soup": _metrics(souped.rows[SELECTED_FUSION])}
        for n in names:
            a, b = pooled.setdefault(n, ([], []))
            a += right(souped.rows[n], y)
            b += right(plain.rows[n], y)
        fa, fb = pooled.setdefault("fusion_soup_vs_ensemble_no_soup", ([], []))
        fa += right(souped.rows[SELECTED_FUSION], y)
        fb += right(plain.rows[SELECTED_ENSEMBLE], y)
    tests = {n: mcnemar(a, b) for n, (a, b) in pooled.items()}
    means = {n: {k: {m: sum(r[n][k][m] for r in per_run.values()) / len(per_run) for m in ("acc", "nll")}
                 for k in per_run[next(iter(per_run))][n]} for n in per_run[next(iter(per_run))]}
    Path(args.out).write_text(json.dumps({"runs": per_run, "mean": means, "mcnemar": tests}, indent=2))
    for n, m in means.items():
        line = "  ".join(f"{k} acc {v['acc']:.4f} nll {v['nll']:.3f}" for k, v in m.items())
        t = tests.get(n)
        print(f"{n:22s} {line}" + (f"  (soup only {t['a_only']} / without only {t['b_only']}, p = {t['p_value']:.3g})"
                                   if t else ""))
    t = tests["fusion_soup_vs_ensemble_no_soup"]
    print(f"selected fusion (soup) vs selected ensemble (no soup): {t['a_only']} / {t['b_only']}, p = {t['p_value']:.3g}")


def _metrics(row: dict) -> dict:
    out = {"acc": row["acc"], "nll": row["nll"]}
    return {**out, "chosen": row["chosen"]} if "chosen" in row else out


if __name__ == "__main__":
    main()
