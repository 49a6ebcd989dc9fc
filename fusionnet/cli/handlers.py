"""The handlers of the ``fusionnet`` subcommands (their arguments: :mod:`fusionnet.cli.args`). Each is thin: it
builds the command's config from the flags and calls the library; heavy modules are imported inside, so a command
loads only what it uses."""

from __future__ import annotations

import csv
import io
from dataclasses import replace
from pathlib import Path

from fusionnet.cli.args import given, settings
from fusionnet.config import (AutoConfig, CompareConfig, DistillConfig, FuseConfig, PlainConfig, TrainConfig, TrainRun,
                              distill_train_config, fuse_train_config, regime_train_config)
from fusionnet.errors import ConfigError
from fusionnet.models.pretrained import is_vote_folder
from fusionnet.utils.files import atomic_write_text
from fusionnet.utils.staging import check_output_folder, output_folder


def fresh_file(out: str, overwrite: bool | None) -> Path:
    """``out`` as a file to write: an existing one is refused unless ``overwrite``."""
    p = Path(out)
    if p.is_dir():
        raise ConfigError(f"--out {str(p)!r} is a folder; give a file name")
    if p.exists() and not overwrite:
        raise ConfigError(f"{str(p)!r} exists already; choose another --out, or pass --overwrite to replace it")
    return p


def trained_on(checkpoint: str) -> dict:
    """What a fusionnet checkpoint records of its training data (files, seed, input size); {} for older files."""
    from fusionnet.models.checkpoints import read_checkpoint

    return read_checkpoint(checkpoint).get("data") or {}


def handle_train(args) -> None:
    from fusionnet.data.splits import load_splits
    from fusionnet.utils.distributed import rank_world, resolve_device
    from fusionnet.models.factory import create_fusionnet
    from fusionnet.engine.train import fit

    s = settings(args, TrainRun, TrainConfig)
    run, train_cfg = TrainRun(**given(s, TrainRun)), TrainConfig(**given(s, TrainConfig))  # checked first
    train_cfg = replace(train_cfg, run_name=train_cfg.run_name or Path(run.out).name)  # a tracked run's name
    resolve_device(train_cfg.device)
    if not args.resume:  # control flags are not settings: read from args (settings() leaves them out)
        check_output_folder(run.out, bool(args.overwrite), inputs=[run.data])
    splits = load_splits(run.data, image_column=run.image_column, label_column=run.label_column,
                         image_root=run.image_root,
                         size=run.size, val_fraction=run.val_fraction, seed=train_cfg.seed,
                         policy=run.policy, image_cache=run.image_cache, progress=train_cfg.progress,
                         strict=run.strict)
    model = create_fusionnet(run.backbones, class_names=splits.class_names, pretrained=run.pretrained,
                             fusion=run.fusion, input_size=run.input_size, branch_heads=bool(train_cfg.codistill))
    with _train_folder(run.out, args, [run.data]) as out:  # data and model checked: only now is --out touched
        result = fit(model, splits.train, splits.val, train_cfg, out_dir=out, resume=bool(args.resume))
        if rank_world()[0] == 0 and train_cfg.codistill:  # fused head, branch vote or both: chosen on validation
            from fusionnet.models.factory import load_fusionnet
            from fusionnet.engine.inference import choose_and_save_prediction

            choose_and_save_prediction(load_fusionnet(result.best_path), splits.val, result.best_path,
                                       device=train_cfg.device)
    if rank_world()[0] == 0:  # under torchrun, one report
        print(f"best epoch {result.best_epoch} ({train_cfg.monitor} {result.best_score:.4f}); wrote "
              f"{run.out}/best.pth, {run.out}/final.pth, {run.out}/history.json, history.png")


def _train_folder(out: str, args, inputs: list):
    """``--resume`` continues the run in place; otherwise a fresh folder, or a replacement swapped in when done.
    Under torchrun only rank 0 writes (and stages and swaps); the other ranks train with ``out`` as given."""
    import os
    from contextlib import nullcontext

    if args.resume or int(os.environ.get("RANK", "0")) != 0:
        return nullcontext(Path(out))
    return output_folder(out, bool(args.overwrite), inputs)


def handle_compare(args) -> None:
    from fusionnet.workflows.compare import compare, validate

    s = settings(args, CompareConfig, TrainConfig)
    fields = given(s, CompareConfig)
    regime = fields.get("regime", "frozen")
    train = regime_train_config(regime, **given(s, TrainConfig))
    cfg = validate(CompareConfig(**{"out": f"runs/{regime}", **fields, "train": train}))  # before the folder
    with output_folder(cfg.out, bool(args.overwrite), inputs=[cfg.data]) as work:
        compare(replace(cfg, out=str(work)))


def handle_auto(args) -> None:
    from fusionnet.workflows.auto import run_into_folder

    cfg = AutoConfig(**given(settings(args, AutoConfig), AutoConfig))  # every setting checked first
    report = run_into_folder(cfg, bool(args.overwrite))
    out = Path(cfg.out)
    print((out / "leaderboard.md").read_text() + f"wrote {out}/leaderboard.md, results.json, pareto.png; the model "
          f"validation chose ({report['selected']}): {out / 'selected.pth'}")


def handle_distill(args) -> None:
    from fusionnet.workflows.distill import distill

    s = settings(args, DistillConfig, TrainConfig)
    cfg = DistillConfig(**given(s, DistillConfig), train=distill_train_config(**given(s, TrainConfig)))
    with output_folder(cfg.out, bool(args.overwrite), inputs=[cfg.data, *cfg.teacher]) as work:
        distill(replace(cfg, out=str(work)))
    out = Path(cfg.out)
    print((out / "distill.md").read_text() + f"wrote {out}/distill.md, distill.json and the students' run folders")


def handle_serve(args) -> None:
    from fusionnet.errors import install_hint

    try:
        from fusionnet.serving.serve import Limits, ServeSettings, serve
        import fastapi, uvicorn  # noqa: F401, E401
    except ImportError as exc:
        raise ConfigError(f"serve needs FastAPI and uvicorn: {install_hint('serve')} ({exc})") from None
    from fusionnet.workflows.runs import checkpoints_in

    sources = [m for m in args.models if m.endswith(".onnx")] or [str(p) for p in checkpoints_in(args.models)]
    settings = ServeSettings(max_batch=args.max_batch, max_delay_ms=args.max_delay_ms, queue_size=args.queue_size,
                             top=args.top, plain=plain_config(args), size=args.size)
    limits = Limits(max_bytes=int(args.max_mb * 2 ** 20), max_pixels=args.max_pixels)
    if args.ray:
        _serve_with_ray(args, sources, settings, limits)
        return
    print(f"serving {sources} on http://{args.host}:{args.port} (POST /v1/classify; Ctrl-C or SIGTERM stops)")
    serve(sources, host=args.host, port=args.port, token=args.token, no_auth=args.no_auth, device=args.device,
          settings=settings, limits=limits)


def _serve_with_ray(args, sources, settings, limits) -> None:
    from fusionnet.errors import install_hint
    from fusionnet.serving.serve import check_bind

    check_bind(args.host, args.token, args.no_auth)
    try:
        from fusionnet.serving.serve_ray import deploy
    except ImportError as exc:
        raise ConfigError(f"serve --ray needs Ray Serve: {install_hint('ray')} ({exc})") from None
    settings.token = args.token
    print(f"serving {sources} with Ray Serve, {args.replicas} replica(s), on http://{args.host}:{args.port} "
          f"(POST /v1/classify; Ctrl-C stops)")
    deploy(sources, replicas=args.replicas, host=args.host, port=args.port, device=args.device, settings=settings,
           limits=limits)


def handle_fuse(args) -> None:
    from fusionnet.workflows.fuse import fuse_checkpoints

    s = settings(args, FuseConfig, TrainConfig, PlainConfig, extra=("out",))
    cfg = FuseConfig(**given(s, FuseConfig), train=fuse_train_config(**given(s, TrainConfig)),
                     plain=PlainConfig(**given(s, PlainConfig)))
    with output_folder(args.out, bool(args.overwrite), inputs=[cfg.data, *cfg.members]) as work:
        fuse_checkpoints(cfg, out=work)
    out = Path(args.out)
    vote = f"; the selected ensemble as a vote folder: {out / 'vote'}" if (out / "vote").is_dir() else ""
    print((out / "fuse.md").read_text() + f"wrote {out}/fuse.md, fuse.json; the model validation chose: "
          f"{out / 'selected.pth'}{vote}")


def handle_demo(args) -> None:
    from fusionnet.workflows.demo import run_demo

    with output_folder(args.out, args.overwrite) as work:
        run_demo(str(work), epochs=args.epochs, progress=args.progress, keep=args.keep)
    print(f"wrote {args.out}/results.md, results.json, confusion.png, reliability.png")


def handle_inspect(args) -> None:
    from fusionnet.workflows.describe import describe

    print(describe(args.path))


def handle_backbones(args) -> None:
    from fusionnet.models.backbones import get_spec, list_backbones

    for name in list_backbones():
        s = get_spec(name)
        print(f"{name:20s} {s.library:12s} dim={s.feature_dim:<5d} size={s.input_size:<4d} {s.notes}")
    print("...and any timm model as 'timm/<name>'")


def handle_classify(args) -> None:
    from fusionnet.workflows.demo import classify_imagenet

    for path, top in classify_imagenet(args.images or None, backbone=args.backbone, top=args.top):
        print(f"{path}: " + ", ".join(f"{name} {p:.2f}" for name, p in top))


def handle_export(args) -> None:
    import torch

    from fusionnet.models.export import EXPORT_TOLERANCE, export_checked
    from fusionnet.models.factory import load_fusionnet
    from fusionnet.models.plain import recorded_size

    args.checkpoint = model_file(args.checkpoint)
    if args.format == "hf":
        return _export_folder(args)
    out = fresh_file(args.out, args.overwrite)
    if is_vote_folder(args.checkpoint):  # the vote as one graph: every member, weighted, in it
        from fusionnet.models.vote import Vote

        model = Vote.from_pretrained(args.checkpoint)
        size = args.size or model.input_size
        if size is None:
            raise ConfigError(f"the vote {args.checkpoint!r} records no input size; give --size")
    else:
        model = load_fusionnet(args.checkpoint)
        size = args.size or recorded_size(model, args.checkpoint)
    diff = export_checked(model, out, torch.rand(3, 3, size, size), size=size, exporter=args.exporter,
                          photos=args.preprocess)
    takes = "uint8 photos of any size, read as the model reads them" if args.preprocess else f"{size} x {size} px input"
    print(f"wrote {str(out)!r} ({takes}); onnxruntime vs PyTorch logits: max abs diff {diff:.2e} "
          f"(tolerance {EXPORT_TOLERANCE:g})")


def _export_folder(args) -> None:
    """export --format hf: the model (any checkpoint fusionnet reads) as a model folder, with the metrics and the
    training record its .pth holds."""
    from fusionnet.models.checkpoints import inspect_checkpoint
    from fusionnet.models.plain import load_member
    from fusionnet.models.pretrained import save_pretrained

    if is_vote_folder(args.checkpoint):  # already a folder: copied, as it reads
        from fusionnet.models.vote import Vote

        Vote.from_pretrained(args.checkpoint).save_pretrained(args.out, overwrite=args.overwrite)
        print(f"wrote the vote's folder {args.out} (load: fusionnet.load({str(args.out)!r}))")
        return
    model = load_member(args.checkpoint)  # its input size from the checkpoint's record, where it has one
    saved = inspect_checkpoint(args.checkpoint).fusionnet or {}  # a plain state dict has no metrics or record
    save_pretrained(model, args.out, metrics=saved.get("metrics"), data=saved.get("data"), overwrite=args.overwrite)
    print(f"wrote {args.out}/config.json, model.safetensors, README.md (load: fusionnet.load({str(args.out)!r}))")


def handle_push(args) -> None:
    from fusionnet.models.io import load

    model = load(model_file(args.checkpoint))  # one model, or a vote's folder with its members' folders
    print(f"pushed to {model.push_to_hub(args.repo, token=args.token, private=args.private)}")


def handle_gap(args) -> None:
    from fusionnet.workflows.gap import GapSettings, gap_check, gap_markdown

    with output_folder(args.out, args.overwrite, inputs=[args.train, args.test]) as work:
        report = gap_check(args.train, args.test, GapSettings(backbone=args.backbone, size=args.size,
                                                              max_images=args.max_images, strict=args.strict),
                           out=work)
    print(gap_markdown(report))
    print(f"wrote {args.out}/gap.json, gap.md, gap.png")


def model_file(source: str) -> str:
    """A checkpoint as given, or the model a run folder holds (fuse / auto: selected.pth; compare: its selected
    fusion; train: best.pth)."""
    from fusionnet.workflows.runs import checkpoints_in

    return source if Path(source).is_file() else str(checkpoints_in([source])[0])


def plain_config(args) -> PlainConfig:
    """The plain-member flags of a command without a --config file (predict, serve)."""
    return PlainConfig(**{name: getattr(args, name) for name in PlainConfig.__dataclass_fields__})


def handle_predict(args) -> None:
    from fusionnet.data.datasets import check_unseen
    from fusionnet.data.transforms import reading_transform
    from fusionnet.models.plain import describe_members, is_plain, load_member
    from fusionnet.workflows.reading import settle_sizes
    from fusionnet.workflows.runs import member_name

    if (args.data is None) == (args.images is None):
        raise ConfigError("predict needs exactly one of --data (a split, saved as .pt) or --images (CSV)")
    if args.val_list is not None and args.data is None:
        raise ConfigError("--val-list names the validation split of --data; give --data too")
    fresh_file(args.out, args.overwrite)
    args.checkpoint = model_file(args.checkpoint)
    if is_vote_folder(args.checkpoint):
        return _predict_vote(args)
    model = load_member(args.checkpoint, plain=plain_config(args))  # its own class order, until the data's is read
    plain = is_plain(args.checkpoint)
    trained = trained_on(args.checkpoint) if not plain else {}
    name = member_name(args.checkpoint)
    if args.images:
        if model.config.image_size is None:
            raise ConfigError(f"{args.checkpoint!r} does not say the input size it was trained at; give --size (e.g. "
                              f"--size 64 for a model trained on Resize((64, 64))), a manifest with \"size\", or "
                              f"score it once with --data to choose the size on validation")
        print(f"reads: {describe_members({name: model})[0]}")
        _predict_images(args, model, _every_image(args.images, reading_transform(model.config.reading()),
                                                  strict=args.strict))
        return
    seed = args.seed if args.seed is not None else trained.get("seed", 0)  # its own validation split
    reading = model.config.reading()
    splits, data = _split_to_predict(args, reading, seed)
    check_unseen(trained, data, args.split, f"the model {args.checkpoint!r}")
    if args.split == "val" and not trained.get("files") and args.val_list is None:
        from fusionnet.workflows.fuse import unseen_warning

        print(f"WARNING: {unseen_warning([args.checkpoint], 0.15, seed)}")
    from fusionnet.models.plain import in_order

    model = in_order(model, model.class_names, splits.class_names, args.checkpoint)
    settle_sizes({name: model}, splits.val, device=args.device)
    if model.config.image_size != reading.size:  # the size chosen on validation: every split read at it
        data = getattr(splits, args.split).with_transform(reading_transform(model.config.reading()), store=None)
        splits.val = splits.val.with_transform(reading_transform(model.config.reading()), store=None)
    print(f"reads: {describe_members({name: model})[0]}")
    if plain:  # the same check as fuse: a plain member's class order is the user's word
        _check_class_order(model, splits.val, name, args)
    _write_outputs(args, model, data, name)


def _split_to_predict(args, reading, seed: int):
    """predict --data: the splits read as the model reads, and the one ``--split`` names."""
    from fusionnet.data.splits import load_splits

    splits = load_splits(args.data, size=reading.size or 128, seed=seed, val_list=args.val_list,
                         strict=args.strict, image_column=args.image_column, label_column=args.label_column,
                         image_root=args.image_root, **reading.split_fields())
    data = getattr(splits, args.split)
    if data is None:
        raise ConfigError(f"{args.data!r} has no {args.split} split (a {args.split}/ folder, or table rows)")
    return splits, data


def _write_outputs(args, model, data, name: str) -> None:
    """predict --data's file: the model's outputs on the split, as member outputs (``fusionnet vote`` reads them)."""
    from fusionnet.ensembles.voting import member_outputs

    out = member_outputs(model, data, member=name, split=args.split,
                         checkpoint=args.checkpoint, device=args.device, tta=args.tta, tta_space=args.tta_space)
    print(f"wrote {str(out.save(args.out))!r} ({len(out.labels)} rows, accuracy "
          f"{float((out.probs.argmax(1) == out.labels).double().mean()):.4f})")


def _predict_vote(args) -> None:
    """predict with a vote's folder: its weighted soft vote, the images read as its members read them."""
    from fusionnet.data.datasets import check_unseen
    from fusionnet.data.transforms import reading_transform
    from fusionnet.models.vote import Vote
    from fusionnet.workflows.runs import member_name

    vote = Vote.from_pretrained(args.checkpoint)
    reading = vote.reading.at(args.size) if args.size else vote.reading  # --size: the command's, as for a model
    print(f"reads: {reading.describe()} (a vote of {', '.join(vote.names)})")
    if args.images:
        _predict_images(args, vote, _every_image(args.images, reading_transform(reading), strict=args.strict))
        return
    seed = args.seed if args.seed is not None else next(iter(vote.records.values())).get("seed", 0)
    splits, data = _split_to_predict(args, reading, seed)
    for name, record in vote.records.items():  # a member that saw these images would make the scores optimistic
        check_unseen(record, data, args.split, f"member {name!r} of the vote {args.checkpoint!r}")
    _write_outputs(args, vote.in_order(splits.class_names), data, member_name(args.checkpoint))


def _check_class_order(model, val, name: str, args) -> None:
    """fuse's class-order check on the validation split (a DataError where another order is decisive)."""
    from fusionnet.ensembles.voting import member_outputs
    from fusionnet.workflows.fuse import check_class_order

    outputs = member_outputs(model, val, member=name, split="val", device=args.device)
    warning = check_class_order(outputs, model=model, val=val, device=args.device)
    if warning:
        print(f"WARNING: {warning}")


def _predict_images(args, model, images) -> None:
    """A CSV row per image file: its path, then the ``--top`` most probable classes, each with its probability,
    then ``error``: empty, or why the file could not be read (its class columns empty)."""
    from fusionnet.engine.inference import predict

    probs, _ = predict(model, images, device=args.device, tta=args.tta, tta_space=args.tta_space)
    names = model.class_names or [str(i) for i in range(probs.shape[1])]
    k = min(args.top, probs.shape[1])
    rows = io.StringIO(newline="")
    writer = csv.writer(rows)
    writer.writerow(["path"] + [c for i in range(1, k + 1) for c in (("class", "probability") if k == 1 else
                                                                      (f"class_{i}", f"probability_{i}"))]
                    + ["error"])
    found = {}
    for path, p in zip(images.paths, probs):
        top = p.topk(k)
        found[path] = [v for j, i in zip(top.values, top.indices) for v in (names[int(i)], f"{float(j):.4f}")] + [""]
    for s in images.skipped:
        found[s.path] = [""] * (2 * k) + [s.reason]
    for path in sorted(found):
        writer.writerow([path] + found[path])
    atomic_write_text(args.out, rows.getvalue())  # a file already there is replaced only by the finished one
    print(f"wrote {args.out!r} ({len(found)} images" + (f", {len(images.skipped)} unreadable: their rows say why"
                                                       if images.skipped else "") + ")")


def _every_image(root: str, transform, strict: bool = False):
    """Every image under a folder, any layout, label 0: for predicting the classes of new images."""
    from fusionnet.data.datasets import ImageDataset
    from fusionnet.utils.files import resolve_path
    from fusionnet.utils.images import images_in

    files = images_in(resolve_path(root, what="image folder"))
    if not files:
        raise ConfigError(f"no images under {root!r}")
    return ImageDataset([(f, 0) for f in files], ["?"], transform, strict=strict)


def handle_vote(args) -> None:
    from fusionnet.utils.files import atomic_write_json
    from fusionnet.workflows.fuse import vote_files

    if args.out:
        fresh_file(args.out, args.overwrite)
    res = vote_files(args.val, args.test, args.method)
    probs = res.pop("probs")
    print(f"{res['method']} over {', '.join(res['members'])}: test acc {res['acc']:.4f}, macro-F1 "
          f"{res['macro_f1']:.4f}, NLL {res['nll']:.4f}, ECE {res['ece']:.4f}"
          + (f"; weights {[round(w, 3) for w in res['weights']]}" if res.get("weights") else ""))
    if args.out:
        atomic_write_json(args.out, {**res, "test_probs": probs.tolist()})
        print(f"wrote {args.out!r}")
