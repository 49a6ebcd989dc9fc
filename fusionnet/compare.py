"""The fusion-vs-voting experiment: same data, same backbones, same training budget.

1. each backbone is trained alone as a member (a single-backbone FusionNet);
2. each fusion variant is trained with the same epochs, augmentation, schedule and input size: FusionNet with
   ``concat`` / ``gated`` / ``attention`` / ``late`` fusion trained jointly, ``from members`` (the members' trained
   trunks fused, the head starting at their logit average and trained on top; its time includes the members'),
   and ``stacked`` (``late`` fusion on frozen trunks, the pretrained ones or, fine-tuned, the members' with their
   time counted, its branch classifiers and combiner fitted in closed form on out-of-fold predictions of the
   training split: :mod:`fusionnet.late_head`; each branch also offers its classifier up to ``stacked_taps``
   earlier feature levels, used where they lower the out-of-fold NLL);
3. every output-ensemble method of :data:`fusionnet.ensembles.METHODS` runs on the members' saved outputs;
4. two rows choose on validation only: "FusionNet (selected on val)" (the fusion variant with the best validation
   NLL, a proper score that is far less noisy than accuracy on a small validation split) and "ensemble (selected
   on val)" (likewise among the ensemble methods); a temperature-scaled copy of the selected fusion is added;
5. ``runs/<name>/``: ``config.json``, ``results.json``, ``results.md``, ``confusion.png``, ``reliability.png``,
   member checkpoints and saved probabilities. With several seeds: ``seed_<s>/`` each, and a summary with mean
   +- sd per row and a paired test between the two selected rows (:mod:`fusionnet.report`).

Every choice (early stopping, selection, weights, temperatures, stacking, the selected rows) is made on the
validation split; the test split is only predicted.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch

from fusionnet.calibration import fit_temperature
from fusionnet.data import Splits, load_splits
from fusionnet.distributed import resolve_device
from fusionnet.ensembles import METHODS, MemberProbs, MethodOutput
from fusionnet.errors import ConfigError, DataError, check_settings, is_finite, is_int
from fusionnet.feature_cache import cached_features
from fusionnet.factory import create_fusionnet, fuse_members, load_fusionnet, save_model
from fusionnet.files import atomic_write_json, resolve_path
from fusionnet.fusers import FUSIONS
from fusionnet.late_head import fit_late_head_on
from fusionnet.metrics import accuracy, classification_metrics, nll
from fusionnet.report import write_report, write_seed_summary
from fusionnet.train import TrainConfig, fit
from fusionnet.voting import MemberOutputs, check_aligned, member_outputs

REGIMES = ("frozen", "finetune")
VARIANTS = (*FUSIONS, "from_members", "stacked")


@dataclass
class CompareConfig:
    data: str  # root with train/ and test/ (val/ optional)
    backbones: list[str] = field(default_factory=lambda: ["efficientnet_lite0", "efficientnet_lite1",
                                                          "efficientnet_lite2"])
    regime: str = "frozen"  # frozen: trunks fixed, heads trained on cached features | finetune: everything trains
    size: int = 128
    epochs: int = 10
    batch_size: int = 32
    lr: float | None = None  # default: 3e-3 frozen, 1e-3 fine-tuning
    trunk_lr_mult: float = 1.0  # fine-tuning: trunks at lr * this (TrainConfig's default, chosen on validation)
    seed: int = 0
    seeds: list[int] | None = None  # several seeds: the whole comparison per seed, then mean +- sd
    val_fraction: float = 0.15
    pretrained: bool = True
    monitor: str = "nll"  # the validation metric that picks each model's best epoch (acc | macro_f1 | nll); NLL:
    # chosen on validation (experiments/sweep_fusion_recipe.py), it lets the from-members fusion keep its start
    variants: list[str] = field(default_factory=lambda: list(VARIANTS))  # fusion variants to train
    fusion_dropout: float = 0.2  # the fused head's dropout
    branch_dropout: float = 0.0  # the fused head's branch dropout (jointly trained variants)
    label_smoothing: float = 0.0  # every model's training loss
    weight_decay: float = 1e-4  # every model's AdamW weight decay
    from_members_lr_mult: float = 1.0  # the from-members fusion trains its head at lr * this
    select_by: str = "nll"  # the validation score that picks the selected rows: nll (lower) | acc (higher)
    shared_cache: bool = False  # frozen: one feature cache for all models (fast; then wall times exclude features
    # an earlier model computed, and val/test are predicted from cached features too)
    cache_root: str | None = None  # where feature caches live (default <out>/cache; seeds share their parent's)
    image_cache: bool = True  # decode every image once into <cache root>/images (fusionnet.image_cache)
    stacked_taps: int = 4  # the stacked fusion's branches offer up to this many earlier trunk
    # levels to their classifiers, used where they lower the out-of-fold NLL (fusionnet.late_head)
    out: str = "runs/fusion_vs_voting"
    progress: bool = True
    device: str = "auto"
    workers: int = 0  # DataLoader worker processes for every model's training and prediction over images

    def __post_init__(self) -> None:
        """Every setting is checked here, before any image is read or model trained (a bad value found after an
        hour of training members is an hour lost)."""
        if self.regime not in REGIMES:
            raise ConfigError(f"unknown regime {self.regime!r}; choose one of {', '.join(REGIMES)}")
        if len(self.backbones) < 2:
            raise ConfigError(f"the comparison needs at least 2 backbones, got {self.backbones}")
        bad = [v for v in self.variants if v not in VARIANTS]
        if bad or not self.variants:
            raise ConfigError(f"unknown fusion variant(s) {bad or '(none given)'}; choose from {', '.join(VARIANTS)}")
        if self.select_by not in ("nll", "acc"):
            raise ConfigError(f"select_by must be 'nll' or 'acc', got {self.select_by!r}")
        if self.seeds is not None and len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"seeds must be distinct, got {self.seeds}")
        check_settings([
            (is_int(self.size) and self.size >= 1, f"size must be a whole number of pixels >= 1, got {self.size!r}"),
            (is_int(self.stacked_taps) and self.stacked_taps >= 0,
             f"stacked_taps must be a whole number >= 0, got {self.stacked_taps!r}"),
            (is_finite(self.val_fraction) and 0 < self.val_fraction < 1,
             f"val_fraction must be in (0, 1), got {self.val_fraction!r}"),
            (is_finite(self.from_members_lr_mult) and self.from_members_lr_mult > 0,
             f"from_members_lr_mult must be > 0, got {self.from_members_lr_mult!r}"),
        ] + [(is_finite(getattr(self, f)) and 0 <= getattr(self, f) < 1,
              f"{f} must be in [0, 1), got {getattr(self, f)!r}") for f in ("fusion_dropout", "branch_dropout")])
        self.train_config()  # epochs, batch size, rates, monitor, workers: TrainConfig's own checks
        resolve_device(self.device)

    def train_config(self, model_name: str = "model") -> TrainConfig:
        """The budget every model gets. Each model has its own feature cache, so that every wall time includes
        computing its own trunk features (a fusion model could otherwise reuse its members')."""
        frozen = self.regime == "frozen"
        return TrainConfig(epochs=self.epochs, batch_size=self.batch_size,
                           lr=self.lr if self.lr is not None else (3e-3 if frozen else 1e-3),
                           trunk_lr_mult=self.trunk_lr_mult, strategy="frozen" if frozen else "full",
                           cache_features=True if frozen else False,
                           cache_dir=str(Path(self.cache_root or Path(self.out) / "cache")
                                         / ("shared" if self.shared_cache else model_name)) if frozen else None,
                           seed=self.seed, progress=self.progress, monitor=self.monitor, device=self.device,
                           label_smoothing=self.label_smoothing, weight_decay=self.weight_decay,
                           num_workers=self.workers)


def _params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _train_and_predict(name: str, model, splits: Splits, cfg: CompareConfig, out: Path, say,
                       train_cfg: TrainConfig | None = None) -> tuple[dict[str, MemberOutputs], dict]:
    train_cfg = train_cfg or cfg.train_config(name)
    t0 = time.perf_counter()
    result = fit(model, splits.train, splits.val, train_cfg, out_dir=out / "models" / name, log=say)
    train_s = time.perf_counter() - t0
    best = load_fusionnet(result.best_path)  # the epoch chosen on validation
    t1 = time.perf_counter()
    outputs = {}
    for split, data in (("val", splits.val), ("test", splits.test)):
        source = data
        if cfg.shared_cache and cfg.regime == "frozen":  # the same eval-mode branch outputs, computed once
            source, _ = cached_features(best, data, cache_dir=train_cfg.cache_dir, device=cfg.device, batch_size=64,
                                        num_workers=cfg.workers)
        outputs[split] = member_outputs(best, source, member=name, split=split, checkpoint=result.best_path,
                                        sample_ids=data.paths, batch_size=64, device=cfg.device,
                                        progress=cfg.progress, num_workers=cfg.workers if source is data else 0)
        outputs[split].save(out / "outputs" / f"{name}_{split}.pt")
    info = {"train_seconds": train_s, "predict_seconds": time.perf_counter() - t1, "params": _params(best),
            "best_epoch": result.best_epoch, "epochs_run": len(result.history), "checkpoint": result.best_path,
            "val": val_scores(outputs["val"].probs, outputs["val"].labels)}
    return outputs, info


def _fusion_model(variant: str, cfg: CompareConfig, splits: Splits, member_info: dict):
    """(model, extra seconds already spent on it): a jointly trained variant, or one fused from the members."""
    names, k = splits.class_names, len(splits.class_names)
    torch.manual_seed(cfg.seed)
    if variant == "from_members":
        members = [member_info[b]["checkpoint"] for b in cfg.backbones]
        model = fuse_members(members, freeze_trunks=cfg.regime == "frozen", dropout=cfg.fusion_dropout)
        return model, sum(member_info[b]["train_seconds"] for b in cfg.backbones)
    model = create_fusionnet(cfg.backbones, num_classes=k, class_names=names, pretrained=cfg.pretrained,
                             fusion=variant, dropout=cfg.fusion_dropout, branch_dropout=cfg.branch_dropout)
    return model, 0.0


def _stacked_fusion(cfg: CompareConfig, splits: Splits, member_info: dict, out: Path, say
                    ) -> tuple[dict[str, MemberOutputs], dict, dict[str, torch.Tensor]]:
    """Late fusion on frozen trunks with its head fitted by out-of-fold stacking on the training split: (its val and
    test outputs, its info, the soft vote of its own branch classifiers on val and test)."""
    names, k = splits.class_names, len(splits.class_names)
    t0 = time.perf_counter()
    prior_s = 0.0
    if cfg.regime == "frozen":
        torch.manual_seed(cfg.seed)
        model = create_fusionnet(cfg.backbones, num_classes=k, class_names=names, pretrained=cfg.pretrained,
                                 fusion="late", freeze_trunks=True, taps=cfg.stacked_taps)
    else:  # the members' fine-tuned trunks, frozen
        model = fuse_members([member_info[b]["checkpoint"] for b in cfg.backbones], fusion="late",
                             taps=cfg.stacked_taps)
        prior_s = sum(member_info[b]["train_seconds"] for b in cfg.backbones)
    cache_dir = cfg.train_config("fusion_stacked").cache_dir
    fit_info = fit_late_head_on(model, splits, cache_dir=cache_dir, device=cfg.device, seed=cfg.seed, log=say,
                                num_workers=cfg.workers)
    path = out / "models" / "fusion_stacked" / "best.pth"
    save_model(model, path, metrics={"late_head": asdict(fit_info)})
    train_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    outputs, sources = {}, {}
    for split, data in (("val", splits.val), ("test", splits.test)):
        sources[split], _ = cached_features(model, data, cache_dir=cache_dir, device=cfg.device, batch_size=64,
                                            num_workers=cfg.workers)
        outputs[split] = member_outputs(model, sources[split], member="fusion_stacked", split=split,
                                        checkpoint=str(path), sample_ids=data.paths, batch_size=64,
                                        device=cfg.device, progress=cfg.progress)
        outputs[split].save(out / "outputs" / f"fusion_stacked_{split}.pt")
    predict_s = time.perf_counter() - t1
    model.cpu().eval()  # the cached features are on the CPU; the model is not needed on the device any more
    with torch.no_grad():  # the same branch classifiers as independent members: their soft vote
        branch_vote = {split: model.forward_head_output(src.features).extras["branch_logits"].float()
                       .softmax(-1).mean(1) for split, src in sources.items()}
    info = {"train_seconds": train_s, "predict_seconds": predict_s, "params": _params(model), "best_epoch": None,
            "epochs_run": 0, "checkpoint": str(path), "late_head": asdict(fit_info),
            "val": val_scores(outputs["val"].probs, outputs["val"].labels),
            "seconds": prior_s + train_s + predict_s}
    return outputs, info, branch_vote


def run_comparison(cfg: CompareConfig, *, log: Callable[[str], None] | None = print) -> dict:
    """Run the whole experiment (per seed when ``cfg.seeds`` has several); returns what ``results.json`` holds."""
    if cfg.seeds and len(cfg.seeds) > 1:
        per_seed = {}
        for s in cfg.seeds:
            (log or (lambda _m: None))(f"==== seed {s}")
            per_seed[s] = run_comparison(replace(cfg, seed=s, seeds=None, out=str(Path(cfg.out) / f"seed_{s}"),
                                                 cache_root=cfg.cache_root or str(Path(cfg.out) / "cache")), log=log)
        return write_seed_summary(per_seed, Path(cfg.out), asdict(cfg))
    if cfg.seeds:
        cfg = replace(cfg, seed=cfg.seeds[0], seeds=None)
    cfg = replace(cfg, data=str(resolve_path(cfg.data, what="data folder").resolve()))  # found from any folder
    say = log or (lambda _m: None)
    out = Path(cfg.out)
    images = Path(cfg.cache_root or out / "cache") / "images" if cfg.image_cache else None
    splits = load_splits(cfg.data, size=cfg.size, val_fraction=cfg.val_fraction, seed=cfg.seed, image_cache=images,
                         progress=cfg.progress)
    if splits.test is None:
        raise DataError(f"{cfg.data!r} has no test/ folder; the comparison reports test metrics")
    atomic_write_json(out / "config.json", {"compare": asdict(cfg), "train": asdict(cfg.train_config())})
    names, k = splits.class_names, len(splits.class_names)

    members, info = {}, {}
    for b in cfg.backbones:
        say(f"== member {b}")
        torch.manual_seed(cfg.seed)
        model = create_fusionnet([b], num_classes=k, class_names=names, pretrained=cfg.pretrained)
        members[b], info[b] = _train_and_predict(b, model, splits, cfg, out, say)
    val_outs = [members[b]["val"] for b in cfg.backbones]
    test_outs = [members[b]["test"] for b in cfg.backbones]
    check_aligned(val_outs)
    check_aligned(test_outs)
    y_val, y_test = val_outs[0].labels, test_outs[0].labels
    probs = MemberProbs(torch.stack([o.probs for o in val_outs]), y_val, torch.stack([o.probs for o in test_outs]),
                        cfg.seed)
    member_seconds = sum(info[b]["train_seconds"] + info[b]["predict_seconds"] for b in cfg.backbones)
    member_params = [info[b]["params"] for b in cfg.backbones]

    rows: dict[str, dict] = {}

    def add(method: str, test_probs: torch.Tensor, seconds: float, params: int, val: dict | None,
            kind: str, **extra) -> None:
        m = classification_metrics(test_probs, y_test, names)
        rows[method] = {"acc": m["acc"], "macro_f1": m["macro_f1"], "nll": m["nll"], "ece": m["ece"],
                        "seconds": seconds, "params": params, "val": val, "kind": kind,
                        "confusion": m["confusion"], "pred": test_probs.argmax(1).tolist(), "probs": test_probs,
                        **extra}

    for i, b in enumerate(cfg.backbones):
        add(f"member: {b}", probs.test[i], info[b]["train_seconds"] + info[b]["predict_seconds"], member_params[i],
            info[b]["val"], "member")
    skipped = {}
    for method, run in METHODS.items():
        t0 = time.perf_counter()
        try:
            res: MethodOutput = run(probs)
        except DataError as exc:  # e.g. stacking on a validation split too small for its folds
            skipped[method] = str(exc)
            say(f"skipped {method}: {exc}")
            continue
        used = sum(p for p, w in zip(member_params, res.weights or [1] * len(member_params)) if w > 0)
        scores = res.val_scores if res.val is None else val_scores(res.val, y_val)
        add(method, res.test, member_seconds + time.perf_counter() - t0, used, scores, "ensemble", **res.extra)

    fusion_info, fusion_val = {}, {}
    for variant in cfg.variants:
        label = f"FusionNet ({variant.replace('_', ' ')})"
        say(f"== {label}")
        if variant == "stacked":
            outputs, fi, vote = _stacked_fusion(cfg, splits, info, out, say)
            check_aligned([val_outs[0], outputs["val"]])
            check_aligned([test_outs[0], outputs["test"]])
            fusion_info[variant], fusion_val[label] = fi, outputs
            add(label, outputs["test"].probs, fi["seconds"], fi["params"], fi["val"], "fusion")
            # its branch classifiers alone, soft-voted: an output ensemble of members given the stacked head's
            # solver and features, which shows how much of the fusion's edge is the combiner's
            add("soft voting (stacked model's branch classifiers)", vote["test"], fi["seconds"], fi["params"],
                val_scores(vote["val"], y_val), "ensemble")
            continue
        model, prior_s = _fusion_model(variant, cfg, splits, info)
        # from members: its starting point (the members' logit average) is validated too, so training can only
        # move away from it where validation says so
        train_cfg = cfg.train_config(f"fusion_{variant}")
        if variant == "from_members":
            train_cfg = replace(train_cfg, validate_start=True, lr=train_cfg.lr * cfg.from_members_lr_mult)
        outputs, fi = _train_and_predict(f"fusion_{variant}", model, splits, cfg, out, say, train_cfg)
        check_aligned([val_outs[0], outputs["val"]])
        check_aligned([test_outs[0], outputs["test"]])
        fi["seconds"] = prior_s + fi["train_seconds"] + fi["predict_seconds"]
        fusion_info[variant], fusion_val[label] = fi, outputs
        add(label, outputs["test"].probs, fi["seconds"], fi["params"], fi["val"], "fusion")
    _add_selected(rows, fusion_val, y_val, add, cfg.select_by)

    results = {
        "budget": {"regime": cfg.regime, "epochs": cfg.epochs, "size": cfg.size, "seed": cfg.seed,
                   "monitor": cfg.monitor, "batch_size": cfg.batch_size, "train": len(splits.train),
                   "val": len(splits.val), "test": len(splits.test), "backbones": cfg.backbones,
                   "shared_cache": cfg.shared_cache and cfg.regime == "frozen"},
        "methods": rows, "skipped": skipped, "members": info, "fusion": fusion_info,
        "test_labels": y_test.tolist(),
    }
    write_report(results, out, names, reliability={
        "FusionNet (selected on val)": (rows["FusionNet (selected on val)"]["probs"], y_test),
        "soft voting": (rows["soft voting"]["probs"], y_test) if "soft voting" in rows else None,
        **{b: (probs.test[i], y_test) for i, b in enumerate(cfg.backbones)}})
    say((out / "results.md").read_text())
    return results


def val_scores(probs: torch.Tensor, labels: torch.Tensor) -> dict:
    return {"acc": accuracy(probs, labels), "nll": nll(probs, labels)}


def _pick(rows: dict, names: list[str], by: str) -> str:
    """The row with the best validation score (NLL: lowest; accuracy: highest); the first on ties."""
    sign = 1.0 if by == "nll" else -1.0
    return min(names, key=lambda n: (sign * rows[n]["val"][by], names.index(n)))


def _add_selected(rows: dict, fusion_val: dict[str, dict[str, MemberOutputs]], y_val: torch.Tensor, add,
                  by: str) -> None:
    """The val-selected fusion row (and its temperature-scaled copy) and the val-selected ensemble row."""
    best_fusion = _pick(rows, list(fusion_val), by)
    chosen = fusion_val[best_fusion]
    r = rows[best_fusion]
    add("FusionNet (selected on val)", chosen["test"].probs, r["seconds"], r["params"], r["val"], "selected",
        chosen=best_fusion)
    temp = fit_temperature(chosen["val"].probs, y_val)
    add("FusionNet (selected on val), temperature-scaled", temp.apply(chosen["test"].probs), r["seconds"],
        r["params"], val_scores(temp.apply(chosen["val"].probs), y_val), "calibrated", temperature=temp.temperature)
    ensembles = [n for n, row in rows.items() if row["kind"] == "ensemble" and row["val"] is not None]
    if ensembles:
        best_ens = _pick(rows, ensembles, by)
        e = rows[best_ens]
        add("ensemble (selected on val)", e["probs"], e["seconds"], e["params"], e["val"], "selected",
            chosen=best_ens)
