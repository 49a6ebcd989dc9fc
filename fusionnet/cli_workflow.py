"""The practitioner's subcommands of ``fusionnet``: ``train``, ``predict``, ``vote`` and ``fuse`` (arguments and
thin handlers; the work is in :mod:`fusionnet.workflow`, :mod:`fusionnet.train` and friends)."""

from __future__ import annotations

import argparse
import csv
import json
import shutil
from dataclasses import fields
from pathlib import Path

from fusionnet.errors import ConfigError
from fusionnet.fusers import FUSIONS

VOTE_METHODS = {"soft": "soft voting", "hard": "hard voting", "weighted": "weighted voting (NLL-fitted)",
                "greedy": "greedy selection (Caruana)", "exhaustive": "best subset (exhaustive)",
                "temperature": "soft voting, temperature-scaled", "stacking": "stacking (logistic regression)",
                "stacking-hgb": "stacking (gradient boosting)"}


def run_folder(out: str, overwrite: bool) -> Path:
    """``out`` as a fresh run folder: an existing non-empty one is refused unless ``overwrite`` (then emptied)."""
    p = Path(out)
    if p.exists() and not p.is_dir():
        raise ConfigError(f"--out {str(p)!r} is a file; give a folder for the run")
    blocked = next((a for a in p.parents if a.exists() and not a.is_dir()), None)
    if blocked is not None:
        raise ConfigError(f"--out {str(p)!r}: a part of its folder path is a file ({str(blocked)!r}); choose "
                          f"another folder")
    if p.is_dir() and any(p.iterdir()):
        if not overwrite:
            raise ConfigError(f"run folder {str(p)!r} exists already; choose another --out, or pass --overwrite "
                              f"to replace it")
        shutil.rmtree(p)
    return p


def add_parsers(sub, positive_int) -> None:
    p = sub.add_parser("train", help="train a member (one backbone) or a FusionNet (several) on your folders",
                       formatter_class=argparse.RawDescriptionHelpFormatter, description=(
                           "examples:\n  fusionnet train --data data --backbones resnet18 --out runs/resnet18\n"
                           "  fusionnet train --data data --backbones efficientnet_lite0 efficientnet_lite1 "
                           "--fusion gated --strategy frozen --epochs 10 --out runs/fused\n"
                           "  fusionnet train --config train.yaml   # the same keys as the flags, in YAML or JSON"))
    p.add_argument("--config", help="a YAML or JSON file of settings (flags given too win)")
    p.add_argument("--data", help="folder with train/ (val/, test/ optional)")
    p.add_argument("--backbones", nargs="+")
    p.add_argument("--fusion", choices=list(FUSIONS))
    p.add_argument("--strategy", choices=["full", "frozen", "gradual"])
    p.add_argument("--loss", choices=["ce", "focal"])
    p.add_argument("--class-weighting", action="store_true", default=None)
    p.add_argument("--balanced-sampling", action="store_true", default=None)
    p.add_argument("--policy", choices=["default", "strong", "none"], help="augmentation policy")
    p.add_argument("--epochs", type=positive_int)
    p.add_argument("--batch-size", type=positive_int)
    p.add_argument("--lr", type=float)
    p.add_argument("--monitor", choices=["acc", "macro_f1", "nll", "ece"])
    p.add_argument("--patience", type=positive_int)
    p.add_argument("--size", type=positive_int)
    p.add_argument("--seed", type=int)
    p.add_argument("--workers", type=int)
    p.add_argument("--image-cache", help="a folder: decode every image once into it and train from there (fast on "
                                         "large photos; reused by later runs on the same files)")
    p.add_argument("--device")
    p.add_argument("--no-pretrained", action="store_true", default=None)
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its final.pth")
    p.add_argument("--out", help="run folder (default runs/<backbones>)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--no-progress", action="store_true")

    p = sub.add_parser("predict", help="saved probabilities of a split (.pt, what vote reads), or a class per image "
                                       "of a folder (CSV)", formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="examples:\n  fusionnet predict runs/resnet18/best.pth --data data --split test "
                                   "--out runs/resnet18/test_probs.pt\n  fusionnet predict runs/resnet18/best.pth "
                                   "--images new_photos/ --out predictions.csv")
    p.add_argument("checkpoint")
    p.add_argument("--data", help="folder with train/ (val/, test/): predict one --split of it")
    p.add_argument("--split", choices=["val", "test"], default="test")
    p.add_argument("--images", help="a folder of images (any layout): a class per image, as CSV")
    p.add_argument("--size", type=positive_int, default=128)
    p.add_argument("--seed", type=int, default=0, help="the seed of the validation split made from train/")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", required=True, help=".pt for --data, .csv for --images")

    p = sub.add_parser("vote", help="an output-ensemble method over saved probability files",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="example:\n  fusionnet vote --method greedy --val a_val.pt b_val.pt "
                                   "--test a_test.pt b_test.pt\nmethods: " + ", ".join(VOTE_METHODS))
    p.add_argument("--method", choices=list(VOTE_METHODS), default="soft")
    p.add_argument("--val", nargs="+", required=True, help="each member's validation probabilities (.pt)")
    p.add_argument("--test", nargs="+", required=True, help="each member's test probabilities, same member order")
    p.add_argument("--out", help="write the ensemble's test probabilities and metrics as JSON")

    p = sub.add_parser("fuse", help="fuse your member checkpoints into one FusionNet, train its head on your data, "
                                    "and report it beside soft voting of the same members",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="example:\n  fusionnet fuse --members weights/*_best.pth --data data "
                                   "--out runs/fuse")
    p.add_argument("--members", nargs="+", required=True, help="member checkpoints (fusionnet or plain state dicts)")
    p.add_argument("--data", required=True)
    p.add_argument("--heads", nargs="+", choices=["trained", "stacked"], default=["trained", "stacked"],
                   help="fused heads to fit: trained (the members' heads trained on as one, from their logit "
                        "average) and/or stacked (late fusion fitted out of fold); both: chosen by validation NLL")
    p.add_argument("--stacked-taps", type=int, default=4,
                   help="earlier trunk levels the stacked head may add per branch, where they help (0: none)")
    p.add_argument("--epochs", type=positive_int, default=10)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--size", type=positive_int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default="runs/fuse")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--no-progress", action="store_true")


def _train_settings(args) -> dict:
    settings: dict = {}
    if args.config:
        path = Path(args.config)
        if not path.is_file():
            raise ConfigError(f"config file not found: {str(path)!r}")
        text = path.read_text()
        if path.suffix in (".yaml", ".yml"):
            import yaml

            settings = yaml.safe_load(text) or {}
        else:
            settings = json.loads(text)
        if not isinstance(settings, dict):
            raise ConfigError(f"{str(path)!r} must hold a mapping of settings, got {type(settings).__name__}")
    flags = {k: v for k, v in vars(args).items() if v is not None and k not in ("command", "debug", "config")}
    return {**settings, **{k.replace("-", "_"): v for k, v in flags.items()}}


def handle_train(args) -> None:
    from fusionnet.data import load_splits
    from fusionnet.distributed import resolve_device
    from fusionnet.factory import create_fusionnet
    from fusionnet.train import TrainConfig, fit

    s = _train_settings(args)
    for required in ("data", "backbones"):
        if not s.get(required):
            raise ConfigError(f"train needs --{required} (or '{required}' in --config)")
    out = s.get("out") or "runs/" + "+".join(b.replace("/", "_") for b in s["backbones"])
    names = ("epochs", "batch_size", "lr", "loss", "class_weighting", "balanced_sampling", "strategy", "monitor",
             "patience", "seed", "device")
    cfg = {k: s[k] for k in names if k in s}
    cfg.update(num_workers=s.get("workers", 0), progress=not s.get("no_progress", False))
    unknown = sorted(set(s) - set(names) - {f.name for f in fields(TrainConfig)} - {
        "data", "backbones", "fusion", "policy", "size", "workers", "no_pretrained", "resume", "out", "overwrite",
        "no_progress", "image_cache"})
    if unknown:
        raise ConfigError(f"unknown setting(s) {unknown} in the config")
    train_cfg = TrainConfig(**cfg)  # every setting checked before an earlier run is replaced or an image read
    resolve_device(train_cfg.device)
    if not s.get("resume"):
        run_folder(out, bool(s.get("overwrite")))
    splits = load_splits(s["data"], size=s.get("size", 128), seed=s.get("seed", 0), policy=s.get("policy", "default"),
                         image_cache=s.get("image_cache"), progress=not s.get("no_progress", False))
    model = create_fusionnet(s["backbones"], class_names=splits.class_names, pretrained=not s.get("no_pretrained"),
                             fusion=s.get("fusion", "concat"))
    result = fit(model, splits.train, splits.val, train_cfg, out_dir=out, resume=bool(s.get("resume")))
    from fusionnet.distributed import rank_world

    if rank_world()[0] == 0:  # under torchrun, one report
        print(f"best epoch {result.best_epoch} ({cfg.get('monitor', 'macro_f1')} {result.best_score:.4f}); wrote "
              f"{result.best_path}, {result.final_path}, {out}/history.json, history.png")


def handle_predict(args) -> None:
    from fusionnet.data import FolderImages, eval_transform, load_splits
    from fusionnet.factory import load_fusionnet
    from fusionnet.inference import predict
    from fusionnet.voting import member_outputs

    if (args.data is None) == (args.images is None):
        raise ConfigError("predict needs exactly one of --data (a split, saved as .pt) or --images (CSV)")
    model = load_fusionnet(args.checkpoint)
    if args.data:
        splits = load_splits(args.data, size=args.size, seed=args.seed)
        data = getattr(splits, args.split)
        if data is None:
            raise ConfigError(f"{args.data!r} has no {args.split}/ folder")
        out = member_outputs(model, data, member=Path(args.checkpoint).parent.name, split=args.split,
                             checkpoint=args.checkpoint, device=args.device)
        print(f"wrote {str(out.save(args.out))!r} ({len(out.labels)} rows, accuracy "
              f"{float((out.probs.argmax(1) == out.labels).double().mean()):.4f})")
        return
    images = _FlatFolder(args.images, eval_transform(args.size))
    probs, _ = predict(model, images, device=args.device)
    names = model.class_names or [str(i) for i in range(probs.shape[1])]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "class", "probability"])
        for path, p in zip(images.paths, probs):
            writer.writerow([path, names[int(p.argmax())], f"{float(p.max()):.4f}"])
    print(f"wrote {args.out!r} ({len(images)} images)")


class _FlatFolder:
    """Every image under a folder, any layout, label 0: for predicting classes of new images."""

    def __init__(self, root: str, transform) -> None:
        from fusionnet.data import ImageDataset, images_in
        from fusionnet.files import resolve_path

        files = images_in(resolve_path(root, what="image folder"))
        if not files:
            raise ConfigError(f"no images under {root!r}")
        self.data = ImageDataset([(f, 0) for f in files], ["?"], transform)
        self.paths = self.data.paths

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i):
        return self.data[i]


def handle_vote(args) -> None:
    from fusionnet.files import atomic_write_json
    from fusionnet.workflow import vote_files

    res = vote_files(args.val, args.test, VOTE_METHODS[args.method])
    probs = res.pop("probs")
    print(f"{res['method']} over {', '.join(res['members'])}: test acc {res['acc']:.4f}, macro-F1 "
          f"{res['macro_f1']:.4f}, NLL {res['nll']:.4f}, ECE {res['ece']:.4f}"
          + (f"; weights {[round(w, 3) for w in res['weights']]}" if res.get("weights") else ""))
    if args.out:
        atomic_write_json(args.out, {**res, "test_probs": probs.tolist()})
        print(f"wrote {args.out!r}")


def handle_fuse(args) -> None:
    from fusionnet.workflow import fuse_checkpoints

    out = run_folder(args.out, args.overwrite)
    fuse_checkpoints(args.members, args.data, out=out, size=args.size, epochs=args.epochs, lr=args.lr,
                     seed=args.seed, heads=args.heads, stacked_taps=args.stacked_taps, device=args.device,
                     progress=not args.no_progress)
    models = ", ".join(f"{d}/best.pth" for h, d in (("trained", "fused"), ("stacked", "stacked")) if h in args.heads)
    print((out / "fuse.md").read_text() + f"wrote {out}/fuse.md, fuse.json, {models}")


HANDLERS = {"train": handle_train, "predict": handle_predict, "vote": handle_vote, "fuse": handle_fuse}
