"""The ``fusionnet`` command's arguments, derived from the config dataclasses of :mod:`fusionnet.config`.

Each config field with help text is a flag: ``batch_size`` is ``--batch-size``, a ``bool`` is ``--x`` / ``--no-x``,
a ``Literal`` gives the choices, ``list[...]`` takes several values, an optional number takes ``none``. Flags
default to "not given", so a preset, a ``--config FILE`` and the dataclass defaults fill in the rest; a flag given
on the command line wins. No torch here: ``fusionnet X --help`` answers at once.

:data:`COMMANDS` registers every subcommand as a :class:`Command`: its one-line help, a function adding its
arguments and the handler (``"module:function"``, imported only when the command runs). Adding a command is one
entry and one handler.
"""

from __future__ import annotations

import argparse
import json
import types
import typing
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any, Callable, Literal, NamedTuple, get_args, get_origin

from fusionnet.config.train import TRAIN_CONCERNS
from fusionnet.config import (TRACKERS, AutoConfig, CompareConfig, DistillConfig, FuseConfig, PlainConfig, TrainConfig,
                              TrainRun, check_installed)
from fusionnet.errors import ConfigError
from fusionnet.registry import Registry


# ---- fields -> flags ---------------------------------------------------------------------------------------------
def _optional(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse_or_none(text: str):
        return None if text.lower() == "none" else parse(text)
    parse_or_none.__name__ = parse.__name__
    return parse_or_none


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {value}")
    return value


def _auto_bool(text: str) -> bool | str:
    value = {"auto": "auto", "true": True, "false": False}.get(text.lower())
    if value is None:
        raise argparse.ArgumentTypeError(f"expected auto, true or false, got {text!r}")
    return value


def _kwargs(hint) -> dict:
    """argparse keywords for a field's type."""
    args = [a for a in get_args(hint) if a is not type(None)]
    optional = get_origin(hint) in (typing.Union, types.UnionType) and type(None) in get_args(hint)
    if hint is bool:
        return {"action": argparse.BooleanOptionalAction}
    if set(get_args(hint)) == {bool, str}:
        return {"type": _auto_bool, "metavar": "{auto,true,false}"}
    if get_origin(hint) is Literal:
        return {"choices": list(get_args(hint))}
    if get_origin(hint) is list or (optional and get_origin(args[0]) is list):
        (item,) = get_args(hint if get_origin(hint) is list else args[0])
        return {"nargs": "+", "type": item}
    base = args[0] if optional else hint
    return {"type": _optional(base) if optional else base}


def add_fields(parser: argparse.ArgumentParser, cls, *, skip: tuple[str, ...] = (),
               only: tuple[str, ...] | None = None, title: str | None = None) -> None:
    """A flag for each field of ``cls`` that has help text (see the module docstring); TrainConfig's flags in a group
    per concern (:data:`fusionnet.config.train.TRAIN_CONCERNS`)."""
    group = parser.add_argument_group(title or cls.__name__)
    groups = {c: parser.add_argument_group(f"training: {c}") for c in TRAIN_CONCERNS} if cls is TrainConfig else {}
    by_concern = {name: groups[c] for c, names in TRAIN_CONCERNS.items() for name in names} if groups else {}
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        if "help" not in f.metadata or f.name in skip or (only is not None and f.name not in only):
            continue
        if hints[f.name] is TrainConfig or hints[f.name] == TrainConfig | None:  # a nested config: its own flags
            continue
        flag = f.metadata.get("flag") or "--" + f.name.replace("_", "-")
        default = f" (default: {f.default})" if f.default is not MISSING and f.default is not None else ""
        by_concern.get(f.name, group).add_argument(flag, dest=f.name, default=None, help=(f.metadata["help"] + default).replace("%", "%%"), **_kwargs(hints[f.name]))


def given(settings: dict, cls) -> dict:
    """The entries of ``settings`` that are fields of ``cls``."""
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in settings.items() if k in names}


def settings(args: argparse.Namespace, *classes, extra: tuple[str, ...] = ()) -> dict:
    """The flags given on the command line over a ``--config`` file's keys (flat, or a config.json's nested
    ``compare``/``train`` sections); keys that are no field of ``classes`` are refused."""
    from_file = _read_config(args.config) if getattr(args, "config", None) else {}
    flags = {k: v for k, v in vars(args).items() if v is not None and k not in _CONTROL}
    merged = {**from_file, **flags}
    known = {f.name for cls in classes for f in fields(cls)} | _CONTROL | set(extra)
    unknown = sorted(set(merged) - known)
    if unknown:
        raise ConfigError(f"unknown setting(s) {unknown}; settings: {', '.join(sorted(known - _CONTROL))}")
    if merged.get("log") in TRACKERS:  # the tracker's package, checked before any folder is touched (a config
        check_installed(merged["log"], merged["log"], "--log " + merged["log"])  # itself loads anywhere)
    return merged


_CONTROL = {"command", "debug", "config", "overwrite", "resume"}


def _read_config(path_text: str) -> dict:
    path = Path(path_text)
    if not path.is_file():
        raise ConfigError(f"config file not found: {str(path)!r}")
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        import yaml

        data = yaml.safe_load(text) or {}
    else:
        data = json.loads(text)
    if not isinstance(data, dict):
        raise ConfigError(f"{str(path)!r} must hold a mapping of settings, got {type(data).__name__}")
    compare = data.get("compare") or {}  # a compare run's saved config.json: {"compare": {..., "train": {...}}}
    flat = {**{k: v for k, v in compare.items() if k != "train"}, **(compare.get("train") or {}),
            **{k: v for k, v in data.items() if k not in ("compare", "train")}, **(data.get("train") or {})}
    return _renamed({k.replace("-", "_"): v for k, v in flat.items()})


# Settings and values renamed in fusionnet 0.4 (one name per idea): a config file of 0.3 reads as today's
_RENAMED_KEYS = {"stacked_taps": "late_oof_taps", "stacked_folds": "late_oof_folds"}
_RENAMED_VALUES = {"variants": {"stacked": "late_oof"}, "heads": {"trained": "from_members", "stacked": "late_oof"}}


def _renamed(settings: dict) -> dict:
    out = {_RENAMED_KEYS.get(k, k): v for k, v in settings.items()}
    for key, names in _RENAMED_VALUES.items():
        if isinstance(out.get(key), list):
            out[key] = [names.get(v, v) for v in out[key]]
    return out


# ---- the commands ------------------------------------------------------------------------------------------------
def _examples(*lines: str) -> dict:
    return {"formatter_class": argparse.RawDescriptionHelpFormatter,
            "description": "examples:\n" + "\n".join(f"  {line}" for line in lines)}


def _train(p) -> None:
    p.add_argument("--config", help="a YAML or JSON file of settings, the flags' names with _ (flags given win)")
    add_fields(p, TrainRun, title="data and model")
    add_fields(p, TrainConfig, skip=("cache_dir",), title="training")
    p.add_argument("--resume", action="store_true", default=None, help="continue the run in --out from final.pth")
    p.add_argument("--overwrite", action="store_true", default=None, help="replace an earlier run in --out")


def _compare(p) -> None:
    p.add_argument("--config", help="a YAML or JSON file of settings, or a run's config.json (flags given win)")
    add_fields(p, CompareConfig, title="comparison")
    add_fields(p, TrainConfig, skip=("strategy", "cache_features", "cache_dir", "validate_start"),
               title="training (every model; default: the regime's preset)")
    p.add_argument("--overwrite", action="store_true", default=None, help="replace an earlier run in --out")


def _auto(p) -> None:
    p.add_argument("--config", help="a YAML or JSON file of settings, the flags' names with _ (flags given win)")
    add_fields(p, AutoConfig, title="auto")
    p.add_argument("--overwrite", action="store_true", default=None, help="replace an earlier run in --out")


def _plain(p) -> None:
    add_fields(p, PlainConfig, skip=("size",),  # --size is each command's own flag
               title="plain state-dict members (what their files cannot say; else a manifest <checkpoint stem>.json "
                     "or classes.txt beside each; fusionnet inspect shows the assumptions)")


def _fuse(p) -> None:
    add_fields(p, FuseConfig, title="fusing")
    _plain(p)
    add_fields(p, TrainConfig, skip=("strategy", "cache_features", "cache_dir", "validate_start", "mixup", "cutmix",
                                      "codistill", "codistill_temperature", "codistill_teacher", "codistill_rampup"),
               title="the trained head (frozen trunks on cached features, so no mixup and no branch heads; every "
                     "other training setting applies)")
    p.add_argument("--out", default="runs/fuse", help="run folder (default runs/fuse)")
    p.add_argument("--overwrite", action="store_true", default=None, help="replace an earlier run in --out")


def _distill(p) -> None:
    p.add_argument("--config", help="a YAML or JSON file of settings, the flags' names with _ (flags given win)")
    add_fields(p, DistillConfig, title="distillation")
    add_fields(p, TrainConfig, skip=("cache_features", "cache_dir"), title="the student's training")
    p.add_argument("--overwrite", action="store_true", default=None, help="replace an earlier run in --out")


def _serve(p) -> None:
    p.add_argument("models", nargs="+", help="a fusionnet checkpoint, several member checkpoints (their soft vote), an "
                                             ".onnx export, or a run folder of compare / fuse / train")
    p.add_argument("--host", default="127.0.0.1", help="the address to bind (other than loopback: --token or "
                                                       "--no-auth)")
    p.add_argument("--port", type=positive_int, default=8000, help="the port to listen on")
    p.add_argument("--token", default=None, help="clients must send 'Authorization: Bearer TOKEN'")
    p.add_argument("--no-auth", action="store_true", help="serve a non-loopback address without a token")
    p.add_argument("--ray", action="store_true", help="deploy with Ray Serve (a local Ray instance, or the cluster "
                                                      "RAY_ADDRESS names) behind Ray's HTTP proxy; pip install "
                                                      "'fusionnet[ray]'")
    p.add_argument("--replicas", type=positive_int, default=1, help="--ray: copies of the model, each batching")
    p.add_argument("--max-batch", type=positive_int, default=16, help="images per model call (1: no batching)")
    p.add_argument("--max-delay-ms", type=float, default=5.0,
                   help="how long the first waiting image waits for others to join its batch")
    p.add_argument("--queue-size", type=positive_int, default=256, help="waiting images before 503 + Retry-After")
    p.add_argument("--top", type=positive_int, default=5, help="classes in an answer (?top=k per request)")
    p.add_argument("--max-mb", type=float, default=20.0, help="the largest upload in MiB (413 above)")
    p.add_argument("--max-pixels", type=positive_int, default=40_000_000,
                   help="the most pixels an image may have, read from its header before decoding (413 above)")
    p.add_argument("--size", type=positive_int, default=None,
                   help="input size in pixels (default: the size the model records or its manifest says; a plain "
                        "member without one is refused: give it)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, or auto (CUDA when available)")
    _plain(p)


def _predict(p) -> None:
    p.add_argument("checkpoint", help="a fusionnet checkpoint, a plain torchvision/timm state dict, or a run folder "
                                      "(fuse, auto: selected.pth; compare: its selected fusion; train: best.pth)")
    p.add_argument("--data", help="folder with train/ (val/, test/), or a table of image paths and labels (CSV, TSV "
                                  "or Parquet): predict one --split of it")
    p.add_argument("--image-column", default=None, help="--data a table: its image-path column (default: path or "
                                                         "image)")
    p.add_argument("--label-column", default="label", help="--data a table: its label column")
    p.add_argument("--image-root", default=None, help="--data a table: the folder its image paths start at "
                                                       "(default: the table's own)")
    p.add_argument("--split", choices=["val", "test"], default="test", help="with --data: the split to predict")
    p.add_argument("--tta", choices=["flip", "flip-zoom"], default=None,
                   help="test-time augmentation: average each image's prediction over its views (a forward pass "
                        "each; off by default, see the README for where it helped)")
    p.add_argument("--tta-space", choices=["prob", "logit"], default="prob", help="average probabilities or logits")
    p.add_argument("--images", help="a folder of images (any layout): a class per image, as CSV")
    p.add_argument("--size", type=positive_int, default=None,
                   help="input size in pixels (default: the size the model records; a plain member's: its manifest's, "
                        "else chosen on the validation split of --data)")
    p.add_argument("--strict", action="store_true", help="refuse unreadable images, naming them (default: skip "
                                                         "them, saying how many; --images writes their rows with "
                                                         "the reason)")
    p.add_argument("--seed", type=int, default=None, help="the seed of the validation split made from train/ "
                                                          "(default: the one the model was trained with, else 0)")
    p.add_argument("--val-list", default=None, help="a file naming the images of train/ that are the validation "
                                                    "split (a path per line, relative to --data or its train/)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, or auto (CUDA when available)")
    p.add_argument("--out", required=True, help=".pt for --data, .csv for --images (with the top --top classes)")
    p.add_argument("--top", type=positive_int, default=1, help="--images: classes per image in the CSV, most "
                                                              "probable first (default 1)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    _plain(p)


def _vote(p) -> None:
    p.add_argument("--method", default="soft", help="an output-ensemble method by its registered id, e.g. soft, "
                   "greedy or stacking (fusionnet.ensembles.methods.ENSEMBLES); an unknown id lists every one")
    p.add_argument("--val", nargs="+", required=True, help="each member's validation probabilities (.pt)")
    p.add_argument("--test", nargs="+", required=True, help="each member's test probabilities, same member order")
    p.add_argument("--out", help="write the ensemble's test probabilities and metrics as JSON")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")


def _inspect(p) -> None:
    p.add_argument("path", help="a checkpoint, a model folder, saved outputs (.pt) or an .onnx file")


def _classify(p) -> None:
    p.add_argument("images", nargs="*", help="image files (default: the photos scikit-learn ships)")
    p.add_argument("--backbone", default="efficientnet_lite0", choices=["efficientnet_lite0", "efficientnet_lite1",
                                                                          "efficientnet_lite2"],
                   help="the ImageNet-pretrained single-backbone classifier")
    p.add_argument("--top", type=positive_int, default=3, help="how many classes to show per image (1-1000)")


def _export(p) -> None:
    p.add_argument("checkpoint", help="a model saved by fusionnet (best.pth, selected.pth, a model folder) or a run "
                                      "folder")
    p.add_argument("--out", required=True, help="the .onnx file to write (--format hf: the folder)")
    p.add_argument("--preprocess", action="store_true",
                   help="onnx: the graph takes uint8 photos (batch, H, W, 3) of any size and returns probabilities, "
                        "the model's own resize, crop and normalisation inside")
    p.add_argument("--format", choices=["onnx", "hf"], default="onnx",
                   help="onnx: an ONNX graph checked with onnxruntime; hf: the folder format (config.json, "
                        "model.safetensors, README.md model card) that FusionNet.from_pretrained, fusionnet.load and "
                        "every command read, and the Hugging Face Hub takes")
    p.add_argument("--size", type=positive_int, default=None,
                   help="input size in pixels (default: the size the model was trained at; 128, said aloud, for one "
                        "saved without it)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--exporter", choices=["auto", "torchscript", "dynamo"], default="auto",
                   help="PyTorch's ONNX exporter: torchscript (fast), dynamo (torch.export); auto: torchscript "
                        "while PyTorch has it")


def _push(p) -> None:
    p.add_argument("checkpoint", help="a model fusionnet reads (a checkpoint, a model folder, a run folder)")
    p.add_argument("--repo", required=True, help="the Hugging Face Hub repository, user/name (created if missing)")
    p.add_argument("--private", action="store_true", help="create the repository private")
    p.add_argument("--token", default=None, help="a Hub token (default: HF_TOKEN or huggingface-cli login's)")


def _gap(p) -> None:
    p.add_argument("--train", required=True, help="the training images: class sub-folders or a flat folder, a table "
                                                  "(CSV, TSV, Parquet) or a Hugging Face dataset; SOURCE#SPLIT takes "
                                                  "one split of a table or dataset (labels.csv#train)")
    p.add_argument("--test", required=True, help="the test images, as --train (labels.csv#test)")
    p.add_argument("--backbone", default="efficientnet_lite0", help="the pretrained trunk for the feature check")
    p.add_argument("--size", type=positive_int, default=128, help="input size of the feature check, in pixels")
    p.add_argument("--max-images", type=positive_int, default=500, help="images sampled per folder")
    p.add_argument("--strict", action="store_true", help="refuse unreadable images, naming them (default: skip "
                                                         "them, saying how many)")
    p.add_argument("--out", default="runs/gap", help="run folder for gap.md and gap.png")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier run in --out")


def _demo(p) -> None:
    p.add_argument("--out", default="runs/demo", help="run folder of the comparison")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier demo run in --out")
    p.add_argument("--epochs", type=positive_int, default=8, help="passes over the training split per model")
    p.add_argument("--keep", choices=["best", "all", "outputs"], default="best",
                   help="model files kept: best (each model's best.pth, about 340 MB), all (also the resume points), "
                        "outputs (none: the results only)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")


def _nothing(p) -> None:
    pass


class Command(NamedTuple):
    """A subcommand: its one-line help, the function adding its arguments, parser options, and its handler: a
    function of the parsed arguments, or ``"module:function"`` naming one (imported only when the command runs:
    the library's own; tests/test_cli.py resolves every one)."""

    help: str
    arguments: Callable[[argparse.ArgumentParser], None]
    options: dict
    handler: str | Callable[[argparse.Namespace], None]


H = "fusionnet.cli.handlers:"
COMMANDS: Registry[Command] = Registry("command")
for _name, _command in {  # name: (help, arguments, parser options, handler)
    "demo": ("the comparison on scikit-learn's digits with offline EfficientNet-Lite weights", _demo, {},
             H + "handle_demo"),
    "backbones": ("list the registered backbones", _nothing, {}, H + "handle_backbones"),
    "inspect": ("say what a file is: a checkpoint (architecture, classes, aux heads, prefixes), saved outputs, "
                "ONNX", _inspect, {}, H + "handle_inspect"),
    "classify": ("classify images with an ImageNet-pretrained single-backbone FusionNet (offline EfficientNet-Lite "
                 "weights); default: scikit-learn's sample photos", _classify, {}, H + "handle_classify"),
    "train": ("train a member (one backbone) or a FusionNet (several) on your folders", _train, _examples(
        "fusionnet train --data data --backbones resnet18 --out runs/resnet18",
        "fusionnet train --data data --backbones efficientnet_lite0 efficientnet_lite1 --fusion gated "
        "--strategy frozen --epochs 10 --out runs/fused",
        "fusionnet train --config train.yaml   # the same keys as the flags, in YAML or JSON"), H + "handle_train"),
    "predict": ("saved probabilities of a split (.pt, what vote reads), or a class per image of a folder (CSV)",
                _predict, _examples("fusionnet predict runs/resnet18/best.pth --data data --split test "
                                    "--out runs/resnet18/test_probs.pt",
                                    "fusionnet predict runs/resnet18/best.pth --images new_photos/ "
                                    "--out predictions.csv"), H + "handle_predict"),
    "vote": ("an output-ensemble method over saved probability files", _vote, _examples(
        "fusionnet vote --method greedy --val a_val.pt b_val.pt --test a_test.pt b_test.pt"), H + "handle_vote"),
    "fuse": ("fuse your member checkpoints into one FusionNet, fit its head on your data, and report it beside "
             "every member and their soft vote", _fuse, _examples(
                 "fusionnet fuse --members weights/*_best.pth --data data --out runs/fuse"), H + "handle_fuse"),
    "distill": ("train one small network to match a fusion or an ensemble (same augmented views, KL), beside the "
                "same network trained on labels; writes runs/<name>/distill.md", _distill, _examples(
                    "fusionnet distill --teacher runs/demo --data runs/demo/digits --size 64 --out runs/distill",
                    "fusionnet distill --teacher runs/lite0/best.pth runs/lite1/best.pth --data data --student "
                    "mobilenet_v2"), H + "handle_distill"),
    "serve": ("serve a model, a vote of members or an ONNX export over HTTP (FastAPI + uvicorn, dynamic batching; "
              "pip install 'fusionnet[serve]')", _serve, _examples(
                  "fusionnet serve runs/demo --port 8000",
                  "curl -F file=@photo.jpg http://127.0.0.1:8000/v1/classify"), H + "handle_serve"),
    "auto": ("choose which trunks to fuse within a time limit: screen every candidate, select greedily by the "
             "late_oof fusion's out-of-fold NLL, fuse, fine-tune if it fits; writes runs/<name>/selected.pth and "
             "leaderboard.md", _auto, _examples(
                 "fusionnet auto --data data --time-limit 30m --out runs/auto",
                 "fusionnet auto --data data --sizes 96 128 --members weights/*_best.pth --classes a b c "
                 "--max-latency-ms 20"), H + "handle_auto"),
    "compare": ("train members and FusionNets on the same budget and compare them with every output-ensemble "
                "method; writes runs/<name>/", _compare, {}, H + "handle_compare"),
    "push": ("upload a model to the Hugging Face Hub as a model folder (config.json, model.safetensors, model card)",
             _push, _examples("fusionnet push runs/fuse --repo someone/flowers-fusion"), H + "handle_push"),
    "gap": ("why test accuracy is below validation: compare two image folders", _gap, _examples(
        "fusionnet gap --train data/train --test data/test --out runs/gap"), H + "handle_gap"),
    "export": ("write a saved model as ONNX (dynamic batch) and check it with onnxruntime", _export, _examples(
        "fusionnet export runs/fuse/selected.pth --out fused.onnx --size 128"), H + "handle_export"),
}.items():
    COMMANDS.register(_name, Command(*_command))


def register_command(name: str, command: Command) -> Command:
    """Add a ``fusionnet name`` subcommand; names are unique."""
    if not isinstance(command, Command):
        raise ConfigError(f"register_command({name!r}) takes a Command(help, arguments, options, handler), got "
                          f"{type(command).__name__}")
    return COMMANDS.register(name, command)
