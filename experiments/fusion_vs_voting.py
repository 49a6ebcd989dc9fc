"""Fusion vs voting on the same data and budget (a thin wrapper of `fusionnet compare`).

    python experiments/fusion_vs_voting.py --data ../shared/data/flowers5_128 --regime frozen --epochs 10 \
        --out runs/flowers_frozen
    python experiments/fusion_vs_voting.py --data ../shared/data/flowers5_128 --regime finetune --epochs 3 \
        --out runs/flowers_finetune

Writes runs/<name>/{config.json, results.json, results.md, confusion.png, reliability.png}.
"""

import sys

from fusionnet.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["compare", *sys.argv[1:]]))
