import json
import os

import pytest
import torch

from fusionnet import FusionNet, create_fusionnet
from fusionnet.models.factory import load_fusionnet
from fusionnet.models.checkpoints import read_checkpoint
from fusionnet.data.splits import eval_transform, load_splits
from fusionnet.models.losses import FocalLoss
from fusionnet.engine.inference import evaluate
from fusionnet.engine.train import TrainConfig, fit
from toydata import crash_at_epoch, make_splits

TINY = ["timm/test_efficientnet", "timm/test_resnet"]


@pytest.fixture
def splits(tmp_path):
    return load_splits(make_splits(tmp_path / "data"), size=32, val_fraction=0.25, seed=0)


def _cfg(**kw):
    base = dict(epochs=2, batch_size=8, lr=3e-3, progress=False, warmup_epochs=0, seed=0)
    return TrainConfig(**{**base, **kw})


def test_loss_decreases_on_a_fixed_batch():
    model = FusionNet(backbones=TINY, num_classes=3)
    x, y = torch.rand(8, 3, 32, 32), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_fit_writes_best_and_final_checkpoints_that_reload(splits, tmp_path):
    model = FusionNet(backbones=TINY, num_classes=3, class_names=splits.class_names)
    result = fit(model, splits.train, splits.val, _cfg(epochs=3), out_dir=tmp_path / "run", log=None)
    run = tmp_path / "run"
    assert {"best.pth", "final.pth", "history.json", "history.png", "train_config.json"} <= set(os.listdir(run))
    history = json.loads((run / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2, 3] and history[-1]["train_loss"] < history[0]["train_loss"]
    best = max(history, key=lambda h: h["val_macro_f1"])  # first of the maxima, as fit keeps the first
    assert result.best_epoch == best["epoch"]
    final = load_fusionnet(run / "final.pth")
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(final(x), model.eval()(x))
    best_model = load_fusionnet(run / "best.pth")
    assert read_checkpoint(run / "best.pth")["metrics"]["epoch"] == result.best_epoch
    assert evaluate(best_model, splits.val, device="cpu")["macro_f1"] == pytest.approx(result.best_score)


def test_frozen_strategy_keeps_trunk_weights_and_batchnorm_buffers_bit_for_bit(splits):
    model = FusionNet(backbones=TINY, num_classes=3)
    before = {k: v.clone() for k, v in model.state_dict().items() if ".trunk." in k}
    fit(model, splits.train, splits.val, _cfg(strategy="frozen", cache_features=False), log=None)
    after = model.state_dict()
    assert any("running_mean" in k for k in before)
    assert all(torch.equal(v, after[k]) for k, v in before.items())
    assert not torch.equal(model.head.fc.weight, FusionNet(backbones=TINY, num_classes=3).head.fc.weight)


def test_gradual_unfreezing_releases_top_stages_on_schedule(splits):
    model = FusionNet(backbones=["timm/test_resnet"], num_classes=3)
    trunk = model.branches["test_resnet"].trunk
    stem = next(trunk.parameters()).clone()
    top_before = {k: v.clone() for k, v in trunk.layer4.state_dict().items()}
    result = fit(model, splits.train, splits.val,
                 _cfg(epochs=3, strategy="gradual", unfreeze_after=1, unfreeze_every=1), log=None)
    counts = [h["trainable_params"] for h in result.history]
    assert counts[0] < counts[1] < counts[2]  # head only, then one stage more each epoch
    assert torch.equal(next(trunk.parameters()), stem)  # the stem never unfroze
    assert any(not torch.equal(v, trunk.layer4.state_dict()[k]) for k, v in top_before.items())


def test_a_crashed_run_resumes_from_final_and_matches_an_uninterrupted_one(splits, tmp_path):
    torch.manual_seed(0)
    initial = FusionNet(backbones=["timm/test_efficientnet"], num_classes=3).state_dict()

    def model():
        m = FusionNet(backbones=["timm/test_efficientnet"], num_classes=3)
        m.load_state_dict(initial)
        return m

    cfg = _cfg(epochs=4, warmup_epochs=1)
    fit(model(), splits.train, splits.val, cfg, out_dir=tmp_path / "a", log=None)

    with pytest.raises(KeyboardInterrupt):
        fit(model(), splits.train, splits.val, cfg, out_dir=tmp_path / "b", log=crash_at_epoch(2, 4))
    assert json.loads((tmp_path / "b" / "history.json").read_text())[-1]["epoch"] == 1
    resumed = FusionNet(backbones=["timm/test_efficientnet"], num_classes=3)
    result = fit(resumed, splits.train, splits.val, cfg, out_dir=tmp_path / "b", resume=True, log=None)
    assert [h["epoch"] for h in result.history] == [1, 2, 3, 4]
    expected = load_fusionnet(tmp_path / "a" / "final.pth").state_dict()
    got = resumed.state_dict()
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("pace, first", [(1e15, 1), (1.0, 3)])
def test_checkpoints_are_written_each_epoch_unless_writing_would_outweigh_the_epochs(splits, tmp_path, monkeypatch,
                                                                                    pace, first):
    import fusionnet.engine.run_writer as run_writer

    written = []
    save = run_writer.ckpt.save_checkpoint
    monkeypatch.setattr(run_writer, "WRITE_BYTES_PER_S", pace)  # the first write's estimated cost: ~0 or hours
    monkeypatch.setattr(run_writer.ckpt, "save_checkpoint",
                        lambda path, **kw: written.append((path.name, kw["metrics"]["epoch"])) or save(path, **kw))
    model = FusionNet(backbones=TINY, num_classes=3, class_names=splits.class_names)
    fit(model, splits.train, splits.val, _cfg(epochs=3), out_dir=tmp_path / "run", log=None)
    finals = [e for name, e in written if name == "final.pth"]
    assert finals[0] == first and finals[-1] == 3  # a write estimated at hours waits for the last epoch
    assert len(json.loads((tmp_path / "run" / "history.json").read_text())) == 3  # the history: every epoch


def test_resume_without_a_previous_run_says_what_is_missing(splits, tmp_path):
    with pytest.raises(FileNotFoundError, match="resume=True needs .*final.pth"):
        fit(FusionNet(backbones=TINY, num_classes=3), splits.train, splits.val, _cfg(), out_dir=tmp_path / "x",
            resume=True, log=None)


def test_early_stopping_stops_after_patience(splits, tmp_path):
    model = FusionNet(backbones=["timm/test_efficientnet"], num_classes=3)
    result = fit(model, splits.train, splits.val, _cfg(epochs=8, lr=1e-9, patience=2, monitor="acc"), log=None)
    assert result.stopped_early and len(result.history) == result.best_epoch + 2


def test_feature_cache_matches_the_uncached_path_and_persists(splits, tmp_path, monkeypatch):
    def run(cache):
        torch.manual_seed(0)
        model = FusionNet(backbones=TINY, num_classes=3, freeze_trunks=True)
        tr = splits.train.with_transform(eval_transform(32))  # deterministic pipeline
        res = fit(model, tr, splits.val, _cfg(epochs=3, strategy="frozen", cache_features=cache,
                                                cache_dir=str(tmp_path / "cache")), log=None)
        return model, res

    plain, res_plain = run(False)
    cached, res_cached = run("auto")
    assert res_cached.used_cache and not res_plain.used_cache
    torch.testing.assert_close(cached.head.fc.weight, plain.head.fc.weight, rtol=1e-4, atol=1e-5)
    assert len(os.listdir(tmp_path / "cache")) == 4  # one file per branch (2) and split (train, val)
    # a second run must not touch the trunks at all
    monkeypatch.setattr("fusionnet.models.fusion.Branch.forward", lambda *a: (_ for _ in ()).throw(AssertionError))
    again, res_again = run("auto")
    torch.testing.assert_close(again.head.fc.weight, cached.head.fc.weight)


def test_frozen_trunks_train_on_cached_unaugmented_features_by_default(splits):
    """Chosen on validation (config.py: flowers5_128, Lite0): frozen trunks train the head on cached features of
    the un-augmented training images unless told otherwise; a dataset that cannot switch pipelines falls back."""
    from torch.utils.data import Dataset

    model = FusionNet(backbones=TINY, num_classes=3)
    messages = []
    res = fit(model, splits.train, splits.val, _cfg(epochs=1, strategy="frozen"), log=messages.append)
    assert res.used_cache and any("un-augmented" in m for m in messages)
    res = fit(model, splits.train, splits.val, _cfg(epochs=1, strategy="frozen", cache_features=False), log=None)
    assert not res.used_cache

    class Augmenting(Dataset):  # a plain dataset whose samples change every read: its pipeline is its own
        def __len__(self):
            return len(splits.train)

        def __getitem__(self, i):
            x, y = splits.train[i]
            return x + 0.01 * torch.rand_like(x), y

    messages.clear()
    res = fit(model, Augmenting(), splits.val, _cfg(epochs=1, strategy="frozen"), log=messages.append)
    assert not res.used_cache and any("feature cache off: the train pipeline is random" in m for m in messages)
    with pytest.raises(ValueError, match="cache_features=True, but the features cannot be cached"):
        fit(model, Augmenting(), splits.val, _cfg(epochs=1, strategy="frozen", cache_features=True), log=None)


def test_focal_loss_matches_its_formula():
    logits, y = torch.randn(6, 4), torch.tensor([0, 1, 2, 3, 1, 0])
    torch.testing.assert_close(FocalLoss(gamma=0)(logits, y), torch.nn.functional.cross_entropy(logits, y))
    p = logits.softmax(1)[torch.arange(6), y]
    alpha = torch.tensor([1.0, 2.0, 0.5, 1.5])
    expected = (-alpha[y] * (1 - p) ** 2 * p.log()).mean()
    torch.testing.assert_close(FocalLoss(gamma=2, alpha=alpha)(logits, y), expected)
    with pytest.raises(ValueError, match="focal gamma must be >= 0, got -1"):
        FocalLoss(gamma=-1)


def test_bad_train_config_values_are_named():
    from fusionnet.errors import ConfigError

    with pytest.raises(ValueError, match="unknown strategy 'freeze'; choose one of full, frozen, gradual"):
        TrainConfig(strategy="freeze")
    with pytest.raises(ValueError, match="unknown monitor 'f1'"):
        TrainConfig(monitor="f1")
    with pytest.raises(ConfigError, match="unknown log 'wandb'; choose one of tensorboard, mlflow"):
        TrainConfig(log="wandb")
    with pytest.raises(ConfigError, match="log_dir names where --log writes; give --log too"):
        TrainConfig(log_dir="runs/tb")
    with pytest.raises(ConfigError, match="soup must be 0"):
        TrainConfig(soup=1)


def test_fit_trains_a_focal_class_weighted_balanced_member(tmp_path):
    from toydata import make_folder

    make_folder(tmp_path / "d" / "train", {"a": 30, "b": 6, "c": 6})
    splits = load_splits(tmp_path / "d", size=32, val_fraction=0.3)
    import fusionnet.engine.inputs as inputs_module
    import fusionnet.engine.train as train_module

    seen = {}
    real_loss, real_sampler, real_opt = train_module.make_loss, inputs_module.balanced_sampler, \
        train_module.make_optimizer

    def loss_spy(name, **kw):
        seen["loss"], seen["alpha"] = name, kw["weight"]
        return real_loss(name, **kw)

    def sampler_spy(labels, **kw):
        sampler = real_sampler(labels, **kw)
        seen["drawn"] = [labels[i] for i in sampler]
        return sampler

    def opt_spy(model, cfg):
        seen["optimizer"] = real_opt(model, cfg)
        return seen["optimizer"]

    monkey = pytest.MonkeyPatch()
    monkey.setattr(train_module, "make_loss", loss_spy)
    monkey.setattr(inputs_module, "balanced_sampler", sampler_spy)
    monkey.setattr(train_module, "make_optimizer", opt_spy)
    try:
        model = FusionNet(backbones=["timm/test_efficientnet"], num_classes=3)
        res = fit(model, splits.train, splits.val, _cfg(epochs=2, loss="focal", class_weighting=True,
                                                        balanced_sampling=True, optimizer="sgd"), log=None)
    finally:
        monkey.undo()
    counts = torch.bincount(torch.tensor(splits.train.labels), minlength=3).float()
    assert seen["loss"] == "focal"
    torch.testing.assert_close(seen["alpha"].cpu(), counts.sum() / (3 * counts))  # inverse frequency
    drawn = torch.bincount(torch.tensor(seen["drawn"]), minlength=3).float() / len(seen["drawn"])
    assert drawn.min() > 0.15  # the rare classes (6 of 42 each) are drawn far above their 14 % share
    assert isinstance(seen["optimizer"], torch.optim.SGD) and len(res.history) == 2


def test_one_short_epoch_on_real_flowers(flowers_root, tmp_path):
    """Integration: a FusionNet of two pretrained trunks on the real photos (a stratified slice, one epoch)."""
    from fusionnet.data.splits import stratified_split

    splits = load_splits(flowers_root, size=64, val_fraction=0.15, seed=0)
    _, keep = stratified_split(splits.train.labels, 0.06, seed=0)  # ~200 training photos
    train = splits.train.subset(keep)
    model = create_fusionnet(backbones=["efficientnet_lite0", "timm/test_resnet"], num_classes=5,
                      pretrained=["efficientnet_lite0"], class_names=splits.class_names)
    res = fit(model, train, splits.val, _cfg(epochs=1, batch_size=16, lr=3e-3), out_dir=tmp_path / "run", log=None)
    majority = max(splits.val.counts().values()) / len(splits.val)  # always guessing dandelion: about 0.24
    assert res.history[0]["val_acc"] > majority + 0.08  # 11 steps on ~180 photos: 0.40 at seed 0
    assert (tmp_path / "run" / "best.pth").is_file()


def test_googlenet_aux_heads_train_with_their_weight_and_inference_ignores_them(tmp_path):
    import torchvision

    from fusionnet import BranchConfig

    torch.manual_seed(0)
    seed_model = torchvision.models.googlenet(weights=None, aux_logits=True, num_classes=3, init_weights=True)
    torch.save(seed_model.state_dict(), tmp_path / "g.pth")

    def build():
        return create_fusionnet(backbones=[BranchConfig("googlenet", aux_heads=True)], num_classes=3,
                         checkpoints={"googlenet": tmp_path / "g.pth"})

    model = build()
    trunk = model.branches["googlenet"].trunk
    assert torch.equal(trunk.aux1.fc2.weight, seed_model.aux1.fc2.weight)  # the checkpoint's aux heads loaded
    model.train()
    out = model.forward_output(torch.rand(2, 3, 64, 64))
    assert {k: tuple(a.shape) for k, a in out.aux.items()} == {"googlenet:aux1": (2, 3), "googlenet:aux2": (2, 3)}
    model.eval()
    assert model.forward_output(torch.rand(2, 3, 64, 64)).aux == {}  # inference: main output only
    stages = model.branches["googlenet"].stages
    assert not any(trunk.aux1 is s or trunk.aux2 is s for s in stages)  # heads, not stages to unfreeze
    assert id(trunk.aux1.fc2.weight) not in {id(p) for p in model.trunk_parameters()}  # head learning rate

    x, y = torch.rand(4, 3, 64, 64), torch.tensor([0, 1, 2, 0])

    class Data(torch.utils.data.Dataset):
        class_names = ["a", "b", "c"]
        labels = y.tolist()

        def __len__(self):
            return 4

        def __getitem__(self, i):
            return x[i], int(y[i])

    for weight, changes in ((0.3, True), (0.0, False)):
        m = build()
        before = m.branches["googlenet"].trunk.aux2.fc2.weight.clone()
        fit(m, Data(), Data(), _cfg(epochs=1, batch_size=4, aux_weight=weight), log=None)
        assert (not torch.equal(before, m.branches["googlenet"].trunk.aux2.fc2.weight)) == changes


def test_short_epochs_write_checkpoints_every_few_epochs_yet_keep_the_best_and_the_last(splits, tmp_path,
                                                                                        monkeypatch):
    import time

    import fusionnet.engine.train as train_module

    def run(folder):
        torch.manual_seed(0)
        model = FusionNet(backbones=TINY, num_classes=3, freeze_trunks=True)
        cfg = _cfg(epochs=6, strategy="frozen", cache_features=True, monitor="nll", lr=0.05)
        return fit(model, splits.train, splits.val, cfg, out_dir=tmp_path / folder, log=None)

    reference = run("every_epoch")  # tiny checkpoints: written after every epoch
    real_save, written = train_module.ckpt.save_checkpoint, []

    def slow_save(path, **kw):  # as if the checkpoints were large: each write far longer than an epoch
        time.sleep(0.5)
        written.append((path.name, json.loads((path.parent / "history.json").read_text())[-1]["epoch"]))
        return real_save(path, **kw)

    monkeypatch.setattr(train_module.ckpt, "save_checkpoint", slow_save)
    result = run("slow_disk")
    finals = [epoch for name, epoch in written if name == "final.pth"]
    assert finals[-1] == 6 and len(finals) < 6  # the last epoch, not every one
    assert [h["epoch"] for h in json.loads((tmp_path / "slow_disk" / "history.json").read_text())] == list(range(1, 7))
    assert result.best_epoch == reference.best_epoch
    for name in ("best.pth", "final.pth"):  # the same files as writing every epoch gives
        got, expected = (read_checkpoint(tmp_path / f / name) for f in ("slow_disk", "every_epoch"))
        assert got["metrics"]["epoch"] == expected["metrics"]["epoch"]
        for k, v in expected["state_dict"].items():
            assert torch.equal(got["state_dict"][k], v), (name, k)


def test_cached_feature_batches_are_the_dataloaders_batches():
    """The trainer and predict gather batches of cached features by indexing: the same indices and values as a
    DataLoader over the same sampler (so a run's numbers do not depend on the path)."""
    from torch.utils.data import DataLoader, RandomSampler

    from fusionnet.engine.feature_cache import FeatureDataset

    data = FeatureDataset({"a": torch.randn(23, 4), "b": torch.randn(23, 2)}, torch.arange(23) % 3)
    fast = list(data.batches(RandomSampler(data, generator=torch.Generator().manual_seed(5)), 8))
    slow = list(DataLoader(data, batch_size=8, sampler=RandomSampler(data, generator=torch.Generator().manual_seed(5))))
    assert len(fast) == len(slow) == 3
    # predicting (validation inside fit) leaves the global random stream as it found it, on either path: the
    # training's dropout masks do not depend on how, or how often, it is validated
    from fusionnet import FusionNet, predict

    model = FusionNet(backbones=["timm/test_resnet"], num_classes=3, dropout=0.5)
    images = torch.utils.data.TensorDataset(torch.rand(5, 3, 32, 32), torch.arange(5) % 3)
    cached = FeatureDataset({"test_resnet": torch.randn(5, model.branches["test_resnet"].out_dim)}, torch.arange(5) % 3)
    for source in (images, cached):
        torch.manual_seed(1)
        expected = torch.rand(3)
        torch.manual_seed(1)
        predict(model, source, batch_size=2)
        assert torch.equal(torch.rand(3), expected)
    for (xf, yf), (xs, ys) in zip(fast, slow):
        assert torch.equal(yf, ys) and all(torch.equal(xf[k], xs[k]) for k in ("a", "b"))


@pytest.mark.parametrize("kind", ["tensorboard", "mlflow"])
def test_log_writes_every_epoch_with_the_librarys_own_writer(kind, tmp_path):
    """--log tensorboard / mlflow: each epoch's validation metrics, readable back with the library's own reader."""
    from fusionnet import FusionNet
    from fusionnet.config import TrainConfig
    from fusionnet.engine.train import fit
    from toydata import make_splits
    from fusionnet.data.splits import load_splits

    splits = load_splits(make_splits(tmp_path / "data", per_class=6), size=32)
    where = str(tmp_path / "tb") if kind == "tensorboard" else f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = TrainConfig(epochs=2, batch_size=8, progress=False, log=kind, log_dir=where, run_name="member_a")
    result = fit(FusionNet(backbones=["timm/test_resnet"], num_classes=3), splits.train, splits.val, cfg, log=None)
    expected = [row["val_nll"] for row in result.history]
    if kind == "tensorboard":
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        events = EventAccumulator(str(tmp_path / "tb" / "member_a"))
        events.Reload()
        got = [(e.step, e.value) for e in events.Scalars("val/nll")]
        assert [s for s, _ in got] == [1, 2] and [v for _, v in got] == pytest.approx(expected, rel=1e-6)
        assert "train/loss" in events.Tags()["scalars"]
    else:
        import mlflow

        mlflow.set_tracking_uri(where)
        (run,) = mlflow.search_runs(search_all_experiments=True, output_format="list")
        assert run.info.run_name == "member_a" and run.data.params["epochs"] == "2"
        history = mlflow.MlflowClient(where).get_metric_history(run.info.run_id, "val_nll")
        assert [m.step for m in history] == [1, 2] and [m.value for m in history] == pytest.approx(expected, rel=1e-6)


def test_greedy_soup_averages_best_epochs_only_where_validation_holds(tmp_path):
    """TrainConfig.soup: best.pth holds the greedy soup; its validation score is at least the best epoch's."""
    from fusionnet.engine.soup import SoupPool, average

    a = torch.nn.Linear(2, 2)
    b = torch.nn.Linear(2, 2)
    pool = SoupPool(2, higher_is_better=False)
    pool.offer(0.5, 1, a)
    pool.offer(0.4, 2, b)
    pool.offer(0.9, 3, torch.nn.Linear(2, 2))  # worse than both: not kept
    assert [e for _, e, _ in pool.pool] == [2, 1]
    target = torch.nn.Linear(2, 2)
    mean = average([b.state_dict(), a.state_dict()])
    # the average validates better than the best epoch: kept; then worse: refused
    assert pool.cook(target, lambda: 0.3)[0] == [2, 1]
    assert torch.allclose(target.weight, mean["weight"])
    assert pool.cook(target, lambda: 0.45) == ([2], 0.4) and torch.equal(target.weight, b.weight)
    splits = load_splits(make_splits(tmp_path / "data", per_class=6), size=32)
    cfg = TrainConfig(epochs=4, batch_size=8, progress=False, soup=3, monitor="nll")
    result = fit(FusionNet(backbones=["timm/test_resnet"], num_classes=3), splits.train, splits.val, cfg,
                 out_dir=tmp_path / "run", log=None)
    soup = result.extra["soup"]
    assert soup["score"] <= soup["best_epoch_score"] and soup["epochs"][0] == result.best_epoch
    saved = read_checkpoint(tmp_path / "run" / "best.pth")["metrics"]
    assert saved["soup_epochs"] == soup["epochs"]
    single = read_checkpoint(tmp_path / "run" / "best_epoch.pth")["metrics"]  # the best epoch alone, kept
    assert single["epoch"] == result.best_epoch and "soup_epochs" not in single
    assert evaluate(load_fusionnet(tmp_path / "run" / "best_epoch.pth"), splits.val, device="cpu")["nll"] == \
        pytest.approx(soup["best_epoch_score"], rel=1e-4)
    scores = evaluate(load_fusionnet(tmp_path / "run" / "best.pth"), splits.val, device="cpu")
    assert scores["nll"] == pytest.approx(soup["score"], rel=1e-4)
