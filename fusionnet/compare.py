"""The fusion-vs-voting experiment: same data, same backbones, same training budget.

1. each backbone is trained alone as a member (a single-backbone FusionNet);
2. a FusionNet over all of them is trained with the same epochs, augmentation, schedule and input size;
3. on the test split: every member, soft / weighted / hard voting, greedy and exhaustive selection, stacking
   (logistic regression and gradient-boosted trees), temperature-scaled voting, and FusionNet: accuracy, macro-F1,
   NLL, ECE, wall time, parameter count;
4. ``runs/<name>/``: ``config.json``, ``results.json``, ``results.md``, ``confusion.png``, ``reliability.png``,
   member checkpoints and their saved probabilities.

Every choice (early stopping, selection, weights, temperatures, stacking) is made on the validation split; the test
split is only predicted.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from fusionnet.checkpoints import atomic_write_json
from fusionnet.data import Splits, load_splits
from fusionnet.fusion import FusionNet
from fusionnet.metrics import classification_metrics
from fusionnet.plots import confusion_grid, reliability_diagram
from fusionnet.selection import (diversity, exhaustive_selection, fit_temperature, fit_weights, greedy_selection,
                                 stacking)
from fusionnet.train import TrainConfig, fit
from fusionnet.voting import MemberOutputs, check_aligned, hard_vote, member_outputs, soft_vote

REGIMES = ("frozen", "finetune")


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
    trunk_lr_mult: float = 0.1
    seed: int = 0
    val_fraction: float = 0.15
    pretrained: bool = True
    monitor: str = "macro_f1"  # the validation metric that picks each model's best epoch (acc | macro_f1 | nll)
    out: str = "runs/fusion_vs_voting"
    progress: bool = True

    def __post_init__(self) -> None:
        if self.regime not in REGIMES:
            raise ValueError(f"unknown regime {self.regime!r}; choose one of {', '.join(REGIMES)}")
        if len(self.backbones) < 2:
            raise ValueError(f"the comparison needs at least 2 backbones, got {self.backbones}")

    def train_config(self, model_name: str = "model") -> TrainConfig:
        """The budget every model gets. Each model has its own feature cache, so that every wall time includes
        computing its own trunk features (a fusion model could otherwise reuse its members')."""
        frozen = self.regime == "frozen"
        return TrainConfig(epochs=self.epochs, batch_size=self.batch_size,
                           lr=self.lr if self.lr is not None else (3e-3 if frozen else 1e-3),
                           trunk_lr_mult=self.trunk_lr_mult, strategy="frozen" if frozen else "full",
                           cache_features=True if frozen else False,
                           cache_dir=str(Path(self.out) / "cache" / model_name) if frozen else None,
                           seed=self.seed, progress=self.progress, monitor=self.monitor)


def _params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _train_and_predict(name: str, model: FusionNet, splits: Splits, cfg: CompareConfig, out: Path, say
                       ) -> tuple[dict[str, MemberOutputs], dict]:
    t0 = time.perf_counter()
    result = fit(model, splits.train, splits.val, cfg.train_config(name), out_dir=out / "models" / name, log=say)
    train_s = time.perf_counter() - t0
    best = FusionNet.from_checkpoint(result.best_path)  # the epoch chosen on validation
    t1 = time.perf_counter()
    outputs = {}
    for split, data in (("val", splits.val), ("test", splits.test)):
        outputs[split] = member_outputs(best, data, member=name, split=split, checkpoint=result.best_path,
                                        batch_size=64, device="auto", progress=cfg.progress)
        outputs[split].save(out / "outputs" / f"{name}_{split}.pt")
    info = {"train_seconds": train_s, "predict_seconds": time.perf_counter() - t1, "params": _params(best),
            "best_epoch": result.best_epoch, "epochs_run": len(result.history)}
    return outputs, info


def run_comparison(cfg: CompareConfig, *, log: Callable[[str], None] | None = print) -> dict:
    """Run the whole experiment; returns what ``results.json`` holds."""
    say = log or (lambda _m: None)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "config.json", {"compare": asdict(cfg), "train": asdict(cfg.train_config())})
    splits = load_splits(cfg.data, size=cfg.size, val_fraction=cfg.val_fraction, seed=cfg.seed)
    if splits.test is None:
        raise ValueError(f"{cfg.data!r} has no test/ folder; the comparison reports test metrics")
    names, k = splits.class_names, len(splits.class_names)

    def build(backbones: list[str]) -> FusionNet:
        torch.manual_seed(cfg.seed)
        return FusionNet(backbones=backbones, num_classes=k, pretrained=cfg.pretrained, class_names=names)

    members, info = {}, {}
    for b in cfg.backbones:
        say(f"== member {b}")
        members[b], info[b] = _train_and_predict(b, build([b]), splits, cfg, out, say)
    say("== FusionNet " + " + ".join(cfg.backbones))
    fusion, fusion_info = _train_and_predict("fusionnet", build(cfg.backbones), splits, cfg, out, say)

    val = [members[b]["val"] for b in cfg.backbones]
    test = [members[b]["test"] for b in cfg.backbones]
    check_aligned(val)
    check_aligned(test + [fusion["test"]])
    v, y_val = torch.stack([o.probs for o in val]), val[0].labels
    t, y_test = torch.stack([o.probs for o in test]), test[0].labels
    member_train = sum(info[b]["train_seconds"] + info[b]["predict_seconds"] for b in cfg.backbones)
    member_params = [info[b]["params"] for b in cfg.backbones]

    rows: dict[str, dict] = {}

    def add(method: str, probs: torch.Tensor, seconds: float, params: int, **extra) -> None:
        m = classification_metrics(probs, y_test, names)
        rows[method] = {"acc": m["acc"], "macro_f1": m["macro_f1"], "nll": m["nll"], "ece": m["ece"],
                        "seconds": seconds, "params": params, "confusion": m["confusion"], **extra}

    for i, b in enumerate(cfg.backbones):
        add(f"member: {b}", t[i], info[b]["train_seconds"] + info[b]["predict_seconds"], member_params[i])

    def timed(fn):
        t0 = time.perf_counter()
        value = fn()
        return value, time.perf_counter() - t0

    used = lambda w: sum(p for p, wi in zip(member_params, w) if wi > 0)  # noqa: E731
    add("soft voting", soft_vote(t), member_train, sum(member_params))
    add("hard voting", hard_vote(t), member_train, sum(member_params))
    weights, s = timed(lambda: fit_weights(v, y_val))
    add("weighted voting (NLL-fitted)", soft_vote(t, weights), member_train + s, used(weights), weights=weights)
    greedy, s = timed(lambda: greedy_selection(v, y_val, metric="nll", n_init=1, rounds=25))
    add("greedy selection (Caruana)", soft_vote(t, greedy.weights), member_train + s, used(greedy.weights),
        weights=greedy.weights, trajectory=greedy.trajectory)
    exhaustive, s = timed(lambda: exhaustive_selection(v, y_val, metric="nll"))
    add("best subset (exhaustive)", soft_vote(t, exhaustive.weights), member_train + s, used(exhaustive.weights),
        weights=exhaustive.weights)
    temps, s = timed(lambda: [fit_temperature(v[i], y_val) for i in range(len(val))])
    scaled_v = torch.stack([tp.apply(v[i]) for i, tp in enumerate(temps)])
    scaled_t = torch.stack([tp.apply(t[i]) for i, tp in enumerate(temps)])
    ens_temp = fit_temperature(soft_vote(scaled_v), y_val)
    add("soft voting, temperature-scaled", ens_temp.apply(soft_vote(scaled_t)), member_train + s,
        sum(member_params), temperatures=[tp.temperature for tp in temps], ensemble_temperature=ens_temp.temperature)
    for method, label in (("logreg", "stacking (logistic regression)"), ("hgb", "stacking (gradient boosting)")):
        st, s = timed(lambda: stacking(v, y_val, t, method=method, cv=5, seed=cfg.seed))
        add(label, st.test_probs, member_train + s, sum(member_params), cv_acc_on_val=st.cv_acc)
    add("FusionNet", fusion["test"].probs, fusion_info["train_seconds"] + fusion_info["predict_seconds"],
        fusion_info["params"])

    results = {
        "budget": {"regime": cfg.regime, "epochs": cfg.epochs, "size": cfg.size, "seed": cfg.seed,
                   "monitor": cfg.monitor,
                   "batch_size": cfg.batch_size, "train": len(splits.train), "val": len(splits.val),
                   "test": len(splits.test), "backbones": cfg.backbones},
        "methods": rows,
        "members": info,
        "fusion": fusion_info,
        "diversity_val": diversity(v, y_val),
        "temperature_val": {b: asdict(tp) for b, tp in zip(cfg.backbones, temps)},
    }
    atomic_write_json(out / "results.json", results)
    (out / "results.md").write_text(markdown_table(results))
    confusion_grid({m: rows[m]["confusion"] for m in ["soft voting", "FusionNet"] + [f"member: {cfg.backbones[0]}"]},
                   names, out / "confusion.png")
    reliability_diagram({m: (p.numpy(), y_test.numpy()) for m, p in
                         [("FusionNet", fusion["test"].probs), ("soft voting", soft_vote(t))]
                         + [(b, t[i]) for i, b in enumerate(cfg.backbones)]}, out / "reliability.png")
    say(markdown_table(results))
    return results


def markdown_table(results: dict) -> str:
    b = results["budget"]
    lines = [f"Regime **{b['regime']}**, {b['epochs']} epochs, {b['size']} px, seed {b['seed']}, batch "
             f"{b['batch_size']}, best epoch by val {b.get('monitor', 'nll')}; train/val/test = "
             f"{b['train']}/{b['val']}/{b['test']} images.", "",
             "| method | test acc | macro-F1 | NLL | ECE | wall s | params |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, r in results["methods"].items():
        lines.append(f"| {name} | {r['acc']:.4f} | {r['macro_f1']:.4f} | {r['nll']:.4f} | {r['ece']:.4f} | "
                     f"{r['seconds']:.1f} | {r['params'] / 1e6:.2f}M |")
    lines += ["", "Wall time of an ensemble method counts training and predicting all of its members; "
                  "selection and stacking add their own (small) time. Every model computes its own trunk features.",
              "Hard voting's 'probabilities' are vote fractions, so its NLL and ECE are not comparable with the "
              "other rows."]
    return "\n".join(lines) + "\n"
