"""One seed summary from separate single-seed ``fusionnet compare`` runs (e.g. run side by side, one per core), and
the members' validation curves; writes results.json / results.md (mean +- sd, paired tests) and members_val.png.

    python experiments/seed_summary.py runs/cmp_s0 runs/cmp_s1 runs/cmp_s2 --out runs/cmp_seeds

The summary is :func:`fusionnet.workflows.compare.report.write_seed_summary`, as ``compare --seeds`` writes it: every row's mean +- sd,
an exact McNemar test between the two val-selected rows and between the selected fusion and each output ensemble.
The figure shows each member's validation NLL per epoch (``models/<member>/history.json``) with its best epoch marked,
so one can see that the members had converged.
"""

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from fusionnet.workflows.compare.report import write_seed_summary  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    per_seed, config = {}, {}
    for run in map(Path, args.runs):
        results = json.loads((run / "results.json").read_text())
        per_seed[results["budget"]["seed"]] = results
        config[str(run)] = json.loads((run / "config.json").read_text())
    out = Path(args.out)
    summary = write_seed_summary(per_seed, out, config)
    members = list(per_seed[next(iter(per_seed))]["members"])
    fig, axes = plt.subplots(1, len(members), figsize=(4.5 * len(members), 3.5), squeeze=False)
    curves = {}
    for ax, member in zip(axes[0], members):
        for run in map(Path, args.runs):
            history = json.loads((run / "models" / member / "history.json").read_text())
            rows = history if isinstance(history, list) else history["history"]
            nll = [r["val_nll"] for r in rows]
            best = min(range(len(nll)), key=nll.__getitem__)
            curves.setdefault(member, {})[run.name] = {"val_nll": nll, "best_epoch": best + 1, "epochs_run": len(nll)}
            line, = ax.plot(range(1, len(nll) + 1), nll, label=run.name)
            ax.plot(best + 1, nll[best], "o", color=line.get_color())
        ax.set(title=member, xlabel="epoch", ylabel="validation NLL", yscale="log")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "members_val.png", dpi=120)
    (out / "members_val.json").write_text(json.dumps(curves, indent=1))
    print((out / "results.md").read_text())
    print(json.dumps({m: {r: (c["best_epoch"], c["epochs_run"]) for r, c in v.items()} for m, v in curves.items()}))
    return summary


if __name__ == "__main__":
    main()
