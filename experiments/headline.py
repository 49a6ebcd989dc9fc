"""Write one data set's row of the headline figures (docs/_data/headline.json: the README's table, the docs page's
table and plot) from a finished multi-seed comparison, so no figure is copied by hand.

    python experiments/headline.py runs/digits_seeds3 --set "digits, frozen" \
        --source "fusionnet compare --data runs/demo/digits --size 64 --epochs 8 --seeds 0 1 2 --shared-cache ..."
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

HEADLINE = Path(__file__).resolve().parents[1] / "docs" / "_data" / "headline.json"
COLUMNS = {  # the table's column: the row id in a comparison's results.json
    "soft voting": "soft",
    "greedy selection": "greedy",
    "LR stacking": "stacking",
    "ensemble (selected on val)": "selected:ensemble",
    "FusionNet (selected on val)": "selected:fusion",
    "jointly trained concat": "fusion:concat",
}


def budget(results: dict) -> str:
    b = results["budget"]
    trunks = "EfficientNet-Lite" + "/".join(n.removeprefix("efficientnet_lite") for n in b["backbones"]) \
        if all(n.startswith("efficientnet_lite") for n in b["backbones"]) else ", ".join(b["backbones"])
    seeds = ", ".join(str(s) for s in results["seeds"])
    return f"{trunks} {b['regime']}, {b['epochs']} epochs, {b['size']} px, seeds {seeds}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="a compare run folder with --seeds (its results.json)")
    parser.add_argument("--set", required=True, help="the headline row's name, e.g. 'digits, frozen'")
    parser.add_argument("--source", required=True, help="the command that produced the run")
    args = parser.parse_args()
    results = json.loads((args.run / "results.json").read_text())
    if "seeds" not in results:
        parser.error(f"{args.run} is a single-seed run; the headline figures are over seeds (compare --seeds 0 1 2)")
    rows = {name: [round(results["methods"][key]["acc"]["mean"], 4), round(results["methods"][key]["acc"]["sd"], 4)]
            for name, key in COLUMNS.items() if key in results["methods"]}
    headline = json.loads(HEADLINE.read_text())
    block = {"name": args.set, "budget": budget(results), "source": args.source, "rows": rows}
    sets = [block if s["name"] == args.set else s for s in headline["sets"]]
    headline["sets"] = sets if block in sets else [*sets, block]
    headline["columns"] = list(dict.fromkeys([*COLUMNS, *headline.get("columns", [])]))
    HEADLINE.write_text(json.dumps(headline, indent=2) + "\n")
    print(f"wrote {HEADLINE}: {args.set}: {block['budget']}")


if __name__ == "__main__":
    main()
