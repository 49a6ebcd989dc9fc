"""The measured figures as plots, drawn from ``docs/_data/headline.json`` when the site builds (nothing drawn by
hand): ``_generated/headline.png``, test accuracy (mean +- sd over seeds) of the output ensembles and the fusion
on each data set and regime."""

from __future__ import annotations

import json
from pathlib import Path

from fusionnet_docs import GeneratedRst  # docs/_ext, beside this file

DATA = Path(__file__).resolve().parents[1] / "_data" / "headline.json"


def draw(out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = json.loads(DATA.read_text())["sets"]
    fig, axes = plt.subplots(1, len(sets), figsize=(4.2 * len(sets), 3.2), constrained_layout=True)
    for ax, block in zip(axes, sets):
        names = list(block["rows"])
        means = [block["rows"][n][0] for n in names]
        sds = [block["rows"][n][1] or 0.0 for n in names]
        colours = ["tab:orange" if n.startswith("FusionNet") else "tab:blue" for n in names]
        ax.barh(range(len(names)), means, xerr=sds, color=colours, capsize=3)
        ax.set_yticks(range(len(names)), names, fontsize=8)
        ax.invert_yaxis()
        low = min(m - s for m, s in zip(means, sds))
        ax.set_xlim(low - 0.02, min(1.0, max(m + s for m, s in zip(means, sds)) + 0.01))
        ax.set_xlabel("test accuracy (mean +- sd over seeds)", fontsize=8)
        ax.set_title(block["name"], fontsize=9)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def cells() -> tuple[list[str], list[list[str]]]:
    """The figures as table cells: the methods (columns), and a row per data set and regime (its name and budget,
    then ``mean +- sd`` per method, the best in bold)."""
    headline = json.loads(DATA.read_text())
    sets = headline["sets"]
    methods = [m for m in headline["columns"] if any(m in block["rows"] for block in sets)]
    rows = []
    for block in sets:
        best = max(v[0] for v in block["rows"].values())
        row = [f"{block['name']}: {block['budget']}"]
        for m in methods:
            mean, sd = block["rows"].get(m, (None, None))
            cell = "" if mean is None else f"{mean:.4f}" + (f" +- {sd:.4f}" if sd is not None else "")
            row.append(f"**{cell}**" if mean == best else cell)
        rows.append(row)
    return methods, rows


def table_lines() -> list[str]:
    """The figures as an rst list-table (the docs page)."""
    methods, rows = cells()
    out = [".. list-table::", "   :header-rows: 1", "", "   * - data, budget", *[f"     - {m}" for m in methods]]
    for row in rows:
        out += [f"   * - {row[0]}", *[f"     - {cell or ' '}" for cell in row[1:]]]
    return out


def markdown_table() -> str:
    """The figures as a Markdown table: the README's headline table is this text (tests/test_docs.py)."""
    methods, rows = cells()
    lines = ["| data, budget | " + " | ".join(methods) + " |", "| --- " * (len(methods) + 1) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


class HeadlineTable(GeneratedRst):
    """The figures as a table on a page (``fusionnet-headline``)."""

    def lines(self) -> list[str]:
        return table_lines()


def setup(app):
    app.connect("builder-inited", lambda app: draw(Path(app.srcdir) / "_generated" / "headline.png"))
    app.add_directive("fusionnet-headline", HeadlineTable)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
