"""``fusionnet auto``'s leaderboard: every model tried, its validation and test scores, cost and time
(``leaderboard.md``), and validation NLL against inference cost with the Pareto front (``pareto.png``)."""

from __future__ import annotations

import os

KINDS = {"trunk": "one trunk", "fusion": "late_oof fusion", "screening": "model: best trunk",
         "finetuned": "fine-tuned"}


def leaderboard_markdown(report: dict) -> str:
    rows = report["rows"]
    order = sorted(rows, key=lambda r: (rows[r]["val"]["nll"], r))
    lines = [f"# fusionnet auto: {report['data']}", "",
             f"Time limit {report['time_limit_s']:.0f} s, used {report['seconds']:.0f} s. Selected on validation "
             f"NLL: **{report['selected']}**, written to `{report['selected_model']}`.", "",
             "| model | kind | val acc | val NLL | test acc | test NLL | out-of-fold NLL | ms / image | params (M) "
             "| time (s) |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in order:
        row = rows[r]
        mark = (" **(selected)**" if r == report["selected"] else "") + (" *" if row.get("finalist") else "")
        lines.append(f"| {r}{mark} | {KINDS.get(row['kind'], row['kind'])} | {row['val']['acc']:.4f} | "
                     f"{row['val']['nll']:.4f} | {row['test']['acc']:.4f} | {row['test']['nll']:.4f} | "
                     f"{_num(row.get('oof_nll'))} | {_num(row.get('ms_per_image'), 2)} | "
                     f"{_num(row['params'] / 1e6 if row.get('params') else None, 1)} | "
                     f"{_num(row.get('seconds'), 0)} |")
    steps = report["selection"]["steps"]
    if steps:
        lines += ["", "Greedy selection by the late_oof fusion's out-of-fold NLL on the training split:", ""]
        lines += [f"{i}. add {s['added']}: out-of-fold NLL {s['oof_nll']:.4f} (lower by {s['gain']:.4f})"
                  for i, s in enumerate(steps, 1)]
        lines.append(f"\nStopped: {report['selection']['stopped']}. The fused model's trunks were chosen on "
                     f"validation NLL among the greedy path's sets, the final set plus each other candidate and the final "
                     f"set with its last pick swapped for each other candidate "
                     f"(rows marked *): {' + '.join(report['selection'].get('finalist') or [])}.")
    if report["skipped"]:
        lines += ["", "Left out for time:"] + [f"- {what}: {why}" for what, why in report["skipped"].items()]
    lines += ["", "Stages: " + "; ".join(f"{s['stage']} at {s['seconds']:.0f} s ({s['what']}"
                                         + (", now selected)" if s["selected"] else ")") for s in report["stages"])]
    return "\n".join(lines) + "\n"


def _num(value, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def pareto_figure(report: dict, path: str | os.PathLike) -> None:
    """Validation NLL against inference time per image, the Pareto front joined."""
    from fusionnet.utils.plots import new_figure, save
    from fusionnet.workflows.auto.screening import pareto

    rows = {r: row for r, row in report["rows"].items() if row.get("ms_per_image")}
    if not rows:
        return
    names = list(rows)
    points = [(rows[r]["ms_per_image"], rows[r]["val"]["nll"]) for r in names]
    fig, ax = new_figure((6.4, 4.2))
    for (x, y), name in zip(points, names):
        ax.scatter(x, y, s=28, color="tab:blue" if rows[name]["kind"] == "trunk" else "tab:orange", zorder=3)
        ax.annotate(name, (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
    front = pareto(points)
    ax.plot([points[i][0] for i in front], [points[i][1] for i in front], color="tab:green", lw=1,
            label="Pareto front")
    ax.set_xlabel("inference time (ms / image, this device)")
    ax.set_ylabel("validation NLL")
    ax.set_title("trunks (blue) and late_oof fusions (orange)")
    ax.legend(fontsize=7)
    save(fig, path)
