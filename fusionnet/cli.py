"""The ``fusionnet`` command: parses arguments and calls the library; no logic of its own."""

from __future__ import annotations

import argparse
import sys
from typing import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fusionnet", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("inspect", help="say what a checkpoint file is (architecture, classes, aux heads, prefixes)")
    p.add_argument("path")

    sub.add_parser("backbones", help="list the registered backbones")

    p = sub.add_parser("classify", help="classify images with an ImageNet-pretrained single-backbone FusionNet "
                                        "(offline EfficientNet-Lite weights); default: scikit-learn's sample photos")
    p.add_argument("images", nargs="*", help="image files (default: the photos scikit-learn ships)")
    p.add_argument("--backbone", default="efficientnet_lite0", choices=["efficientnet_lite0", "efficientnet_lite1",
                                                                          "efficientnet_lite2"])
    p.add_argument("--top", type=int, default=3)

    p = sub.add_parser("compare", help="train members and a FusionNet on the same budget and compare them with "
                                       "every output-ensemble method; writes runs/<name>/")
    p.add_argument("--data", required=True, help="folder with train/ and test/ (val/ optional)")
    p.add_argument("--backbones", nargs="+", default=["efficientnet_lite0", "efficientnet_lite1",
                                                        "efficientnet_lite2"])
    p.add_argument("--regime", choices=["frozen", "finetune"], default="frozen")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--monitor", choices=["acc", "macro_f1", "nll"], default="macro_f1",
                   help="validation metric that picks each model's best epoch")
    p.add_argument("--out", default=None, help="run folder (default runs/<regime>)")
    p.add_argument("--no-progress", action="store_true")

    p = sub.add_parser("demo", help="the comparison on scikit-learn's digits with offline EfficientNet-Lite weights")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--no-progress", action="store_true")

    args = parser.parse_args(argv)
    try:
        if args.command == "inspect":
            from fusionnet.checkpoints import inspect_checkpoint

            print(inspect_checkpoint(args.path).summary())
        elif args.command == "backbones":
            from fusionnet.backbones import get_spec, list_backbones

            for name in list_backbones():
                s = get_spec(name)
                print(f"{name:20s} {s.family:12s} dim={s.feature_dim:<5d} size={s.input_size:<4d} {s.notes}")
            print("...and any timm model as 'timm/<name>'")
        elif args.command == "classify":
            from fusionnet.demo import classify_imagenet

            for path, top in classify_imagenet(args.images or None, backbone=args.backbone, top=args.top):
                print(f"{path}: " + ", ".join(f"{name} {p:.2f}" for name, p in top))
        elif args.command == "compare":
            from fusionnet.compare import CompareConfig, run_comparison

            run_comparison(CompareConfig(data=args.data, backbones=args.backbones, regime=args.regime,
                                         epochs=args.epochs, size=args.size, batch_size=args.batch_size, lr=args.lr,
                                         seed=args.seed, monitor=args.monitor,
                                         out=args.out or f"runs/{args.regime}",
                                         progress=not args.no_progress))
        elif args.command == "demo":
            from fusionnet.demo import run_demo

            run_demo(args.out, epochs=args.epochs, progress=not args.no_progress)
            print(f"wrote {args.out}/results.md, results.json, confusion.png, reliability.png")
    except (FileNotFoundError, ValueError, RuntimeError, ImportError) as exc:
        print(f"fusionnet {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
