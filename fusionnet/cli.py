"""The ``fusionnet`` command: parses arguments and calls the library; no logic of its own.

Every run writes into its own folder (``--out``) and never over an earlier run unless ``--overwrite``.
Exit codes: 0 success; 2 bad usage or bad input (one line naming the value and the fix, no traceback); 1 an
unexpected failure (one line, and the path of a file holding the full traceback; ``--debug`` prints it instead).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import traceback
from typing import Sequence

from fusionnet.cli_workflow import HANDLERS, add_parsers, run_folder


class _Parser(argparse.ArgumentParser):
    """Bad usage is one line on stderr (what is wrong, and where the help is) and exit code 2."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def main(argv: Sequence[str] | None = None) -> int:
    parser = _Parser(prog="fusionnet", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", help="print full tracebacks of unexpected failures")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("inspect", help="say what a checkpoint file is (architecture, classes, aux heads, prefixes)")
    p.add_argument("path")

    sub.add_parser("backbones", help="list the registered backbones")

    p = sub.add_parser("classify", help="classify images with an ImageNet-pretrained single-backbone FusionNet "
                                        "(offline EfficientNet-Lite weights); default: scikit-learn's sample photos")
    p.add_argument("images", nargs="*", help="image files (default: the photos scikit-learn ships)")
    p.add_argument("--backbone", default="efficientnet_lite0", choices=["efficientnet_lite0", "efficientnet_lite1",
                                                                          "efficientnet_lite2"])
    p.add_argument("--top", type=_positive_int, default=3, help="how many classes to show per image (1-1000)")

    p = sub.add_parser("compare", help="train members and a FusionNet on the same budget and compare them with "
                                       "every output-ensemble method; writes runs/<name>/")
    p.add_argument("--data", required=True, help="folder with train/ and test/ (val/ optional)")
    p.add_argument("--backbones", nargs="+", default=["efficientnet_lite0", "efficientnet_lite1",
                                                        "efficientnet_lite2"])
    p.add_argument("--regime", choices=["frozen", "finetune"], default="frozen")
    p.add_argument("--epochs", type=_positive_int, default=10)
    p.add_argument("--size", type=_positive_int, default=128)
    p.add_argument("--batch-size", type=_positive_int, default=32)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seeds", type=int, nargs="+", default=None,
                   help="run the whole comparison once per seed and report mean +- sd, e.g. --seeds 0 1 2")
    p.add_argument("--variants", nargs="+", default=None,
                   help="fusion variants: concat gated attention late from_members stacked (default: all)")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N")
    p.add_argument("--workers", type=int, default=0,
                   help="DataLoader worker processes for training and predicting over images (0: in the main one)")
    p.add_argument("--shared-cache", action="store_true",
                   help="frozen regime: compute each trunk's features once for all models (fast; wall times then "
                        "leave out features an earlier model computed)")
    p.add_argument("--cache-root", default=None,
                   help="frozen regime: where feature caches live, e.g. shared between runs (default <out>/cache)")
    p.add_argument("--stacked-taps", type=int, default=4,
                   help="earlier trunk levels the stacked fusion may add per branch (0: none)")
    p.add_argument("--no-image-cache", action="store_true",
                   help="decode the image files for every model and epoch instead of once into <cache root>/images")
    p.add_argument("--monitor", choices=["acc", "macro_f1", "nll"], default="nll",
                   help="validation metric that picks each model's best epoch")
    p.add_argument("--out", default=None, help="run folder (default runs/<regime>)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier run in --out")
    p.add_argument("--no-progress", action="store_true")

    p = sub.add_parser("export", help="write a saved model as ONNX (dynamic batch) and check it with onnxruntime",
                       description="example: fusionnet export runs/flowers/models/fusion_concat/best.pth "
                                   "--out fusion.onnx --size 128")
    p.add_argument("checkpoint", help="a model saved by fusionnet (best.pth / final.pth)")
    p.add_argument("--out", required=True, help="the .onnx file to write")
    p.add_argument("--size", type=_positive_int, default=224, help="input image size in pixels")
    p.add_argument("--exporter", choices=["auto", "torchscript", "dynamo"], default="auto",
                   help="PyTorch's ONNX exporter: torchscript (fast), dynamo (torch.export); auto: torchscript "
                        "while PyTorch has it")

    p = sub.add_parser("gap", help="why test accuracy is below validation: compare two image folders",
                       description="example: fusionnet gap --train data/train --test data/test --out runs/gap")
    p.add_argument("--train", required=True, help="the training images (class sub-folders or a flat folder)")
    p.add_argument("--test", required=True, help="the test images")
    p.add_argument("--backbone", default="efficientnet_lite0", help="the pretrained trunk for the feature check")
    p.add_argument("--size", type=_positive_int, default=128)
    p.add_argument("--max-images", type=_positive_int, default=500, help="images sampled per folder")
    p.add_argument("--out", default="runs/gap")
    p.add_argument("--overwrite", action="store_true")

    add_parsers(sub, _positive_int)

    p = sub.add_parser("demo", help="the comparison on scikit-learn's digits with offline EfficientNet-Lite weights")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier demo run in --out")
    p.add_argument("--epochs", type=_positive_int, default=8)
    p.add_argument("--no-progress", action="store_true")

    args = parser.parse_args(argv)
    return _run(args)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {value}")
    return value


def _run(args: argparse.Namespace) -> int:
    from fusionnet.errors import FusionNetError

    try:
        _dispatch(args)
        sys.stdout.flush()  # a full or closed stdout fails here, inside the handler
    except KeyboardInterrupt:
        print(f"fusionnet {args.command}: interrupted", file=sys.stderr)
        return 130
    except (FusionNetError, FileNotFoundError) as exc:
        print(f"fusionnet {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except Exception as exc:  # a bug or an environment failure (out of memory, a full disk): keep the traceback
        _silence_stdout()
        if args.debug:
            traceback.print_exc()
            return 1
        fd, log = tempfile.mkstemp(prefix="fusionnet-error-", suffix=".log")
        with os.fdopen(fd, "w") as f:
            traceback.print_exc(file=f)
        print(f"fusionnet {args.command}: unexpected {type(exc).__name__}: {_one_line(exc)} (full traceback in "
              f"{log!r}; --debug prints it)", file=sys.stderr)
        return 1
    return 0


def _one_line(exc: BaseException) -> str:
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    return " / ".join(lines[:4]) if lines else type(exc).__name__


def _silence_stdout() -> None:
    """After stdout failed (e.g. > /dev/full), point it at devnull so the interpreter's exit flush stays quiet."""
    try:
        sys.stdout.flush()
    except Exception:  # noqa: BLE001 - the failure was already reported
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())


def _dispatch(args: argparse.Namespace) -> None:
    if args.command in HANDLERS:
        HANDLERS[args.command](args)
    elif args.command == "inspect":
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

        variants = {"variants": args.variants} if args.variants else {}
        cfg = CompareConfig(data=args.data, backbones=args.backbones, regime=args.regime, epochs=args.epochs,
                            size=args.size, batch_size=args.batch_size, lr=args.lr, seed=args.seed, seeds=args.seeds,
                            monitor=args.monitor, out=args.out or f"runs/{args.regime}", device=args.device,
                            workers=args.workers, shared_cache=args.shared_cache, cache_root=args.cache_root,
                            image_cache=not args.no_image_cache, stacked_taps=args.stacked_taps,
                            progress=not args.no_progress, **variants)  # settings checked before the folder
        run_folder(cfg.out, args.overwrite)
        run_comparison(cfg)
    elif args.command == "export":
        import torch

        from fusionnet.export import check_onnx, export_onnx
        from fusionnet.factory import load_fusionnet

        model = load_fusionnet(args.checkpoint)
        path = export_onnx(model, args.out, size=args.size, exporter=args.exporter)
        diff = check_onnx(model, path, torch.rand(3, 3, args.size, args.size))
        print(f"wrote {str(path)!r}; onnxruntime vs PyTorch logits: max abs diff {diff:.2e}")
    elif args.command == "gap":
        from fusionnet.gap import gap_check, gap_markdown

        report = gap_check(args.train, args.test, backbone=args.backbone, size=args.size,
                           max_images=args.max_images, out=run_folder(args.out, args.overwrite))
        print(gap_markdown(report))
        print(f"wrote {args.out}/gap.json, gap.md, gap.png")
    elif args.command == "demo":
        from fusionnet.demo import run_demo

        run_demo(str(run_folder(args.out, args.overwrite)), epochs=args.epochs, progress=not args.no_progress)
        print(f"wrote {args.out}/results.md, results.json, confusion.png, reliability.png")


if __name__ == "__main__":
    sys.exit(main())
