"""The fusion-vs-voting experiment: same data, same backbones, same training budget.

1. each backbone is trained alone as a member (a single-backbone FusionNet);
2. each fusion variant is trained with the same epochs, augmentation, schedule and input size: FusionNet with
   ``concat`` / ``gated`` / ``attention`` / ``late`` fusion trained jointly, ``from members`` (the members' trained
   trunks fused, the head starting at their logit average and trained on top; its time includes the members'),
   and ``late_oof`` (``late`` fusion on frozen trunks, the pretrained ones or, fine-tuned, the members' with their
   time counted, its branch classifiers and combiner fitted in closed form on out-of-fold predictions of the
   training split: :mod:`fusionnet.engine.late_fit`; each branch also offers its classifier up to ``late_oof_taps``
   earlier feature levels, used where they lower the out-of-fold NLL);
3. every registered output-ensemble method (:data:`fusionnet.ensembles.methods.ENSEMBLES`) runs on the members' saved outputs;
4. two rows choose on validation only: "FusionNet (selected on val)" (the fusion variant with the best validation
   NLL, a proper score that is far less noisy than accuracy on a small validation split) and "ensemble (selected
   on val)" (likewise among the output ensembles of the separately trained members); a temperature-scaled copy of
   the selected fusion is added. The soft vote of the late_oof model's own branch classifiers is a row of its own,
   read as a variant of the fusion, and neither selected row chooses it;
5. ``runs/<name>/``: ``config.json``, ``results.json``, ``results.md``, ``confusion.png``, ``reliability.png``,
   member checkpoints and saved probabilities. With several seeds: ``seed_<s>/`` each, and a summary with mean
   +- sd per row and a paired test between the two selected rows (:mod:`fusionnet.workflows.compare.report`).

Every choice (early stopping, selection, weights, temperatures, stacking, the selected rows) is made on the
validation split; the test split is only predicted. Every model is an entry of :mod:`fusionnet.workflows.pipeline`; the
settings are a :class:`CompareConfig` holding the :class:`~fusionnet.engine.train.TrainConfig` every model trains with.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

import torch

from fusionnet.config import DEFAULT_FUSION, REGIMES, CompareConfig, regime_train_config  # noqa: F401  (re-exported)
from fusionnet.data.splits import load_splits
from fusionnet.errors import ConfigError, DataError
from fusionnet.utils.probabilities import soft_vote
from fusionnet.registry import Registry
from fusionnet.utils.distributed import resolve_device
from fusionnet.models.factory import create_fusionnet, fuse_members
from fusionnet.engine.feature_cache import cached_features
from fusionnet.utils.files import atomic_write_json, resolve_path
from fusionnet.utils.ray_tasks import ray_map, ray_requested
from fusionnet.engine.late_fit import closed_form_fusion
from fusionnet.models.fusers import FUSIONS
from fusionnet.workflows.pipeline import ClosedForm, Context, Scored, Table, Trained, choose_output, val_scores
from fusionnet.workflows.compare.report import write_report, write_seed_summary
from fusionnet.workflows.rows import (SELECTED_ENSEMBLE, SELECTED_FUSION, branch_vote_id, fusion_id, fusion_label,
                                      member_id)

# ---- the fusion variants: each makes one pipeline entry ----------------------------------------------------------
def _joint(variant: str):
    def entry(cfg: CompareConfig, splits, members: dict[str, Scored]) -> Trained:
        def build():
            torch.manual_seed(cfg.seed)
            return create_fusionnet(cfg.backbones, class_names=splits.class_names, pretrained=cfg.pretrained,
                                    fusion=variant, dropout=cfg.fusion_dropout, branch_dropout=cfg.branch_dropout,
                                    input_size=cfg.input_size), 0.0
        return Trained(f"fusion_{variant}", build, cfg.train_config(f"fusion_{variant}"))
    return entry


def _members(cfg: CompareConfig, members: dict[str, Scored]) -> tuple[list, float]:
    """The trained members (their best epochs, in memory) and the seconds they took."""
    return [members[b].model for b in cfg.backbones], sum(members[b].info["seconds"] for b in cfg.backbones)


def _from_members(cfg: CompareConfig, splits, members: dict[str, Scored]) -> Trained:
    """The members' trained trunks fused, the head starting at their logit average; that start is validated too
    (epoch 0), so training can only move away from it where validation says so."""
    def build():
        models, prior_s = _members(cfg, members)
        torch.manual_seed(cfg.seed)
        return fuse_members(models, freeze_trunks=cfg.regime == "frozen", dropout=cfg.fusion_dropout), prior_s
    train = cfg.train_config("fusion_from_members", validate_start=True, lr=cfg.train.lr * cfg.from_members_lr_mult)
    return Trained("fusion_from_members", build, train)


def _distilled_from_members(cfg: CompareConfig, splits, members: dict[str, Scored]) -> Trained:
    """The from-members fusion trained on the members' soft vote as its teacher (Born-Again style: the same
    augmented view for both, KL at ``distill_temperature`` plus ``distill_label_weight`` of the label loss), its
    trunks at a tenth of the rate, its start (their logit average) validated too: training on top learns the
    ensemble's function on new views instead of refitting labels the members have already memorised."""
    def build():
        models, prior_s = _members(cfg, members)
        torch.manual_seed(cfg.seed)
        return fuse_members(models, freeze_trunks=False, dropout=cfg.fusion_dropout), prior_s

    train = cfg.train_config("fusion_distilled_from_members", validate_start=True, cache_features=False,
                             lr=cfg.train.lr * cfg.from_members_lr_mult, trunk_lr_mult=cfg.train.trunk_lr_mult * 0.1)
    return Trained("fusion_distilled_from_members", build, train, callbacks=_members_teacher(cfg, splits, members))


def _distilled(cfg: CompareConfig, splits, members: dict[str, Scored]) -> Trained:
    """Born-again fusion: a concat FusionNet from fresh (pretrained) trunks trained on the members' soft vote as
    its teacher, by function matching (the same augmented view for both, KL at ``distill_temperature``, plus
    ``distill_label_weight`` of the label loss). Unlike ``distilled_from_members`` it does not start where its
    teacher is, so there is a function to learn: the ensemble's, on new views, with the members' dark knowledge
    instead of labels they have already memorised. Its time counts the members' (the teacher)."""
    def build():
        _, prior_s = _members(cfg, members)
        torch.manual_seed(cfg.seed)
        return create_fusionnet(cfg.backbones, class_names=splits.class_names, pretrained=cfg.pretrained,
                                fusion=DEFAULT_FUSION, dropout=cfg.fusion_dropout, branch_dropout=cfg.branch_dropout,
                                input_size=cfg.input_size), prior_s
    train = cfg.train_config("fusion_distilled", cache_features=False)
    return Trained("fusion_distilled", build, train, callbacks=_members_teacher(cfg, splits, members))


def _members_teacher(cfg: CompareConfig, splits, members: dict[str, Scored]):
    """The callbacks that make a model learn the members' soft vote (made when its entry runs)."""
    def callbacks():
        from fusionnet.engine.callbacks import Distillation
        from fusionnet.workflows.distill import Teacher

        models, _ = _members(cfg, members)
        return [Distillation(Teacher(models, range(len(splits.class_names))), cfg.distill_temperature,
                             cfg.distill_label_weight)]
    return callbacks


def _codistilled(cfg: CompareConfig, splits, members: dict[str, Scored]) -> Trained:
    """Concat fusion trained jointly with a head per branch, every head co-distilled from the soft vote of all
    of them (:class:`fusionnet.engine.callbacks.CoDistillation`; the branch heads' label loss at full weight); what it
    predicts (fused head, branch vote, both) is chosen on validation and saved with it."""
    def build():
        torch.manual_seed(cfg.seed)
        return create_fusionnet(cfg.backbones, class_names=splits.class_names, pretrained=cfg.pretrained,
                                fusion=DEFAULT_FUSION, branch_heads=True, dropout=cfg.fusion_dropout,
                                branch_dropout=cfg.branch_dropout, input_size=cfg.input_size), 0.0
    train = cfg.train_config("fusion_codistilled", codistill=cfg.train.codistill or 1.0, aux_weight=1.0)
    return Trained("fusion_codistilled", build, train, after=choose_output)


LATE_OOF_WARNING = ("the late_oof fusion fits its branch classifiers and combiner on features of fine-tuned trunks "
                   "that were trained on these very images: its out-of-fold scores on the training split are "
                   "optimistic and its combiner may trust the branches too much (its validation scores are honest). "
                   "--late-oof-folds 3 cross-fits it instead (each member trained 3 more times, on 2/3 of the "
                   "training split each; the tapped levels' classifiers and the combiner fit on those models' "
                   "predictions for the images they did not train on)")


def _late_oof(cfg: CompareConfig, splits, members: dict[str, Scored]):
    """Late fusion on frozen trunks (the pretrained ones or, fine-tuned, the members' with their time counted),
    fitted in closed form on out-of-fold predictions of the training split; fine-tuned with ``late_oof_folds``,
    the members' heads combined by a combiner fitted on cross-fitted member predictions
    (:mod:`fusionnet.workflows.compare.crossfit`)."""
    if cfg.regime == "finetune" and cfg.late_oof_folds:
        from fusionnet.workflows.compare.crossfit import CrossFitted

        models, prior_s = _members(cfg, members)
        builders = {b: (lambda b=b: _member_builder(cfg, splits.class_names, b)()[0]) for b in cfg.backbones}
        return CrossFitted("fusion_late_oof", builders, models, prior_s, cfg.train_config("fusion_late_oof"),
                           cfg.late_oof_folds, seed=cfg.seed, taps=cfg.late_oof_taps)

    def build():
        if cfg.regime == "frozen":
            torch.manual_seed(cfg.seed)
            return create_fusionnet(cfg.backbones, class_names=splits.class_names, pretrained=cfg.pretrained,
                                    fusion=closed_form_fusion(), freeze_trunks=True, taps=cfg.late_oof_taps,
                                    input_size=cfg.input_size), 0.0
        models, prior_s = _members(cfg, members)
        return fuse_members(models, fusion=closed_form_fusion(), taps=cfg.late_oof_taps), prior_s
    return ClosedForm("fusion_late_oof", build, seed=cfg.seed,
                      warning=LATE_OOF_WARNING if cfg.regime == "finetune" else None)


@dataclass(frozen=True)
class Variant:
    """A fusion variant of the comparison: ``make(cfg, splits, members)`` gives its pipeline entry."""

    name: str
    make: Callable
    regimes: tuple[str, ...] = REGIMES  # where it can run; elsewhere it is reported as skipped with ``why_not``
    why_not: str = ""
    first_when_frozen: bool = False  # frozen: starts before the members (its trunk pass caches their features;
    # an entry with a start(), ClosedForm, then fits in a thread of its own beside them)
    default: bool = True  # runs when no --variants are given


VARIANTS: Registry[Variant] = Registry("comparison variant")  # registered variants; every fusion method trained
# jointly is a variant too (list_variants)


def register_variant(variant: Variant) -> Variant:
    """Add a comparison variant (``compare --variants name``; with ``default``, in the default set too)."""
    return VARIANTS.register(variant.name, variant)


_NEEDS_IMAGES = ("the teacher needs the members on images, so it runs in the finetune regime only (frozen, the "
                 "members share their trunks' features)")
for _variant in (Variant("from_members", _from_members),
                 Variant("distilled", _distilled, ("finetune",), _NEEDS_IMAGES),
                 Variant("distilled_from_members", _distilled_from_members, ("finetune",), _NEEDS_IMAGES),
                 Variant("codistilled", _codistilled),
                 Variant("late_oof", _late_oof, first_when_frozen=True)):
    register_variant(_variant)


def variant_table() -> Registry[Variant]:
    """Every comparison variant: each registered fusion method trained jointly, then the registered variants (read
    when asked: a fusion method registered later is in it)."""
    table: Registry[Variant] = Registry("comparison variant")
    for name, fuser in FUSIONS.items():
        table.register(name, Variant(name, _joint(name), default=fuser.compare_default))
    for name, variant in VARIANTS.items():
        table.register(name, variant)
    return table


def list_variants() -> list[str]:
    """The names ``compare --variants`` takes."""
    return variant_table().names()


def resolve_variants(regime: str, names: list[str] | None) -> list[str]:
    """The one check of ``--variants``: every name registered (did-you-mean otherwise); none given: the default
    variants that run in ``regime``."""
    table = variant_table()
    if names is None:
        return [n for n, v in table.items() if v.default and regime in v.regimes]
    if not names:
        raise ConfigError(f"no fusion variant given; choose from {', '.join(table)}")
    return table.check(names)


def fusion_entry(variant: str, cfg: CompareConfig, splits, members: dict[str, Scored]):
    return variant_table().get(variant).make(cfg, splits, members)


def validate(cfg: CompareConfig) -> CompareConfig:
    """Everything about ``cfg`` that needs the registries or torch, before anything is read or written: its
    variants (resolved to the regime's defaults when not given) and its device."""
    resolve_device(cfg.train.device)
    return replace(cfg, variants=resolve_variants(cfg.regime, cfg.variants))


def branch_vote(fitted: Scored, ctx: Context) -> dict[str, torch.Tensor]:
    """The soft vote of a late-fusion model's own branch classifiers on val and test (from its feature cache)."""
    votes = {}
    for split in ("val", "test"):
        feats, _ = cached_features(fitted.model, getattr(ctx.splits, split), cache_dir=ctx.cache_dir(fitted.name),
                                   device="cpu", batch_size=64)
        with torch.no_grad():
            logits = fitted.model.forward_head_output(feats.features).extras["branch_logits"]
        votes[split] = soft_vote(logits.float().softmax(-1).transpose(0, 1))  # (B, M, K) -> (M, B, K) -> (B, K)
    return votes


# ---- the experiment ---------------------------------------------------------------------------------------------
def compare(cfg: CompareConfig, *, log: Callable[[str], None] | None = print) -> dict:
    """Run the whole experiment (per seed when ``cfg.seeds`` has several); returns what ``results.json`` holds."""
    cfg = validate(cfg)
    if cfg.seeds and len(cfg.seeds) > 1:
        one = {s: replace(cfg, train=replace(cfg.train, seed=s), seeds=None, out=str(Path(cfg.out) / f"seed_{s}"),
                          cache_root=cfg.cache_root or str(Path(cfg.out) / "cache")) for s in cfg.seeds}
        if ray_requested(cfg.ray):  # a task per seed; inside one, its members train in turn
            done = ray_map(lambda c: compare(replace(c, ray=False), log=None), list(one.values()))
            per_seed = {s: result for s, (_, result) in zip(one, done)}
        else:
            per_seed = {}
            for s, seed_cfg in one.items():
                (log or (lambda _m: None))(f"==== seed {s}")
                per_seed[s] = compare(seed_cfg, log=log)
        return write_seed_summary(per_seed, Path(cfg.out), asdict(cfg))
    if cfg.seeds:
        cfg = replace(cfg, train=replace(cfg.train, seed=cfg.seeds[0]), seeds=None)
    cfg = replace(cfg, data=str(resolve_path(cfg.data, what="data folder").resolve()))  # found from any folder
    ctx = _context(cfg, log)
    atomic_write_json(ctx.out / "config.json", {"compare": asdict(cfg)})
    # frozen, the late_oof fusion needs no member: it starts first, its trunk pass with taps also caches the plain
    # features the members and the other variants then load (one pass per trunk with a shared cache); its
    # closed-form fit then runs in a thread of its own beside them (ClosedForm.start)
    table_of = variant_table()
    early = {v: _start_variant(v, cfg, ctx) for v in cfg.variants
             if cfg.regime == "frozen" and table_of.get(v).first_when_frozen}
    def check() -> None:  # a fit that failed in its thread stops the run now, not after every other model
        for pending in early.values():
            pending.raise_if_failed()

    try:
        members = _train_members(cfg, ctx)
        check()
        table = Table([members[b] for b in cfg.backbones], ctx.splits.class_names)
        table.add_ensembles(seed=cfg.seed, log=ctx.log)
        fusion = {}
        for variant in cfg.variants:
            check()
            spec = table_of.get(variant)
            if cfg.regime not in spec.regimes:
                table.skipped[fusion_id(variant)] = spec.why_not
                continue
            scored = early[variant].result() if variant in early else _run_variant(variant, cfg, ctx, members)
            fusion[variant] = scored.info
            table.add_fusion(scored, fusion_id(variant))
            if variant == "late_oof":  # its branch classifiers alone, soft-voted: how much of its edge is the
                vote = branch_vote(scored, ctx)  # combiner's
                table.add(branch_vote_id(variant), vote["test"], scored.info["seconds"], scored.info["params"],
                          val_scores(vote["val"], table.y_val), "fusion variant")
    finally:  # a fit still running in its thread (an error or Ctrl-C here) is stopped before this returns
        for pending in early.values():
            pending.stop()
    table.add_selected(cfg.select_by)
    return _write(cfg, ctx, table, members, fusion)


def _train_members(cfg: CompareConfig, ctx: Context) -> dict[str, Scored]:
    """Every member trained and scored: in turn, or each as a Ray task (``cfg.ray``)."""
    entries = {b: Trained(b, _member_builder(cfg, ctx.splits.class_names, b), cfg.train_config(b), kind="member")
               for b in cfg.backbones}
    if ray_requested(cfg.ray):
        ctx.log(f"== members {', '.join(entries)} as Ray tasks")
        quiet = replace(ctx, log=lambda _m: None)
        return {b: scored for b, (_, scored) in zip(entries, ray_map(lambda e: e.run(quiet), list(entries.values())))}
    members = {}
    for b, entry in entries.items():
        ctx.log(f"== member {b}")
        members[b] = entry.run(ctx)
    return members


def _start_variant(variant: str, cfg: CompareConfig, ctx: Context):
    """A variant that needs no member, started before the members: in a thread of its own where its entry can
    (:meth:`fusionnet.workflows.pipeline.ClosedForm.start`), else run here. Returns a Pending."""
    from fusionnet.workflows.pipeline import Pending

    ctx.log(f"== {fusion_label(variant)}")
    entry = fusion_entry(variant, cfg, ctx.splits, {})
    start = getattr(entry, "start", None)
    return start(ctx, background=True) if start else Pending.done(entry.run(ctx))


def _run_variant(variant: str, cfg: CompareConfig, ctx: Context, members: dict[str, Scored]) -> Scored:
    ctx.log(f"== {fusion_label(variant)}")
    return fusion_entry(variant, cfg, ctx.splits, members).run(ctx)


def _context(cfg: CompareConfig, log) -> Context:
    out = Path(cfg.out)
    images = Path(cfg.cache_root or out / "cache") / "images" if cfg.image_cache else None
    splits = load_splits(cfg.data, image_column=cfg.image_column, label_column=cfg.label_column,
                         image_root=cfg.image_root,
                         size=cfg.size, val_fraction=cfg.val_fraction, seed=cfg.seed, image_cache=images,
                         progress=cfg.train.progress, strict=cfg.strict)
    if splits.test is None:
        raise DataError(f"{cfg.data!r} has no test/ folder; the comparison reports test metrics")
    return Context.of(splits, out, cfg.train, log=log, cache_dir=cfg.cache_dir, keep=cfg.keep,
                      predict_from_cache=cfg.shared_cache and cfg.regime == "frozen")


def _member_builder(cfg: CompareConfig, class_names: list[str], backbone: str):
    def build():
        torch.manual_seed(cfg.seed)
        return create_fusionnet([backbone], class_names=class_names, pretrained=cfg.pretrained,
                                input_size=cfg.input_size), 0.0
    return build


def _selected_ids(rows: dict, fusion: dict) -> dict:
    """The selected rows by stable id (a variant's name, an ensemble method's id) and the fusion's checkpoint: what
    distill, serve and the experiments read."""
    chosen = rows[SELECTED_FUSION]["chosen"].partition(":")[2]  # "fusion:late_oof" -> "late_oof"
    selected = {"fusion": {"id": chosen, "checkpoint": fusion[chosen].get("checkpoint")}}
    if SELECTED_ENSEMBLE in rows:
        selected["ensemble"] = {"id": rows[SELECTED_ENSEMBLE]["chosen"]}
    return selected


def _write(cfg: CompareConfig, ctx: Context, table: Table, members: dict[str, Scored], fusion: dict) -> dict:
    splits, rows, y_test = ctx.splits, table.rows, table.y_test
    selected = _selected_ids(rows, fusion)
    if "ensemble" in selected:  # the selected ensemble as one model, where it is a vote and model files are kept
        selected["ensemble"]["vote"] = _write_vote(cfg, ctx, table, members)
    results = {
        "budget": {"regime": cfg.regime, "epochs": cfg.train.epochs, "size": cfg.size, "seed": cfg.seed,
                   "monitor": cfg.train.monitor, "select_by": cfg.select_by, "batch_size": cfg.train.batch_size,
                   "train": len(splits.train), "val": len(splits.val), "test": len(splits.test),
                   "backbones": cfg.backbones, "shared_cache": cfg.shared_cache and cfg.regime == "frozen"},
        "methods": rows, "skipped": table.skipped, "members": {b: s.info for b, s in members.items()},
        "fusion": fusion, "selected": selected, "test_labels": y_test.tolist(),
    }
    write_report(results, ctx.out, splits.class_names, reliability={
        SELECTED_FUSION: (rows[SELECTED_FUSION]["probs"], y_test),
        "soft": (rows["soft"]["probs"], y_test) if "soft" in rows else None,
        **{member_id(b): (s.outputs["test"].probs, y_test) for b, s in members.items()}})
    ctx.log((ctx.out / "results.md").read_text())
    return results


def _write_vote(cfg: CompareConfig, ctx: Context, table: Table, members: dict[str, Scored]) -> str | None:
    """``out/vote``: the selected ensemble as a vote's folder (:func:`fusionnet.workflows.runs.write_vote`), unless
    ``--keep outputs`` (no model files); its path, or None where none was written."""
    if cfg.keep == "outputs":
        ctx.log("vote: --keep outputs writes no model files, so no vote folder")
        return None
    from fusionnet.models.checkpoints import read_checkpoint
    from fusionnet.models.plain import load_member
    from fusionnet.workflows.runs import write_vote

    paths = {b: s.info.get("checkpoint") for b, s in members.items()}  # best.pth: the scored weights, with the
    if not all(p and Path(p).is_file() for p in paths.values()):  # size and images they were trained on
        ctx.log("vote: a member's model file is missing, so no vote folder")
        return None
    note = write_vote(table, {b: load_member(p) for b, p in paths.items()},
                      [read_checkpoint(p).get("data") for p in paths.values()], ctx.out / "vote", seed=cfg.seed)
    ctx.log(f"vote: {note}")
    return str(ctx.out / "vote") if (ctx.out / "vote").is_dir() else None
