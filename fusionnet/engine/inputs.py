"""Where ``fit``'s batches come from: cached branch features (frozen trunks), the GPU input path
(:mod:`fusionnet.data.device_input`) or one DataLoader per run over the per-image pipeline; and the sampler."""

from __future__ import annotations

import math

import torch
from torch.utils.data import DistributedSampler
from tqdm.auto import tqdm

from fusionnet.config import TrainConfig
from fusionnet.data.device_input import BatchAugment, DeviceImages, fits
from fusionnet.data.loader import training_loader
from fusionnet.data.splits import balanced_sampler, eval_view
from fusionnet.data.transforms import spec_of
from fusionnet.engine.feature_cache import FeatureDataset, cache_blocker, cached_features
from fusionnet.engine.state import Run
from fusionnet.errors import ConfigError
from fusionnet.models.interface import Classifier
from fusionnet.utils.distributed import to_device


def _is_deterministic(dataset) -> bool:
    """Whether the pipeline gives the same tensor twice for the same sample (no random augmentation)."""
    a, b = dataset[0][0], dataset[0][0]
    return isinstance(a, torch.Tensor) and torch.equal(a, b)


def steps_per_epoch(n: int, cfg: TrainConfig, world: int, drop_last: bool) -> int:
    per_rank = math.ceil(n / world)
    return max(per_rank // cfg.batch_size, 1) if drop_last else math.ceil(per_rank / cfg.batch_size)


def mixup(cfg: TrainConfig, num_classes: int | None):
    """timm's Mixup for ``mixup`` / ``cutmix`` (one of them per batch when both are on), or None."""
    if not (cfg.mixup or cfg.cutmix):
        return None
    if num_classes is None:
        raise ConfigError("mixup/cutmix need the number of classes: give a dataset with class names (a "
                          "fusionnet.data.datasets.LabelledData such as FolderImages) or a model that knows them")
    from timm.data import Mixup

    return Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, label_smoothing=cfg.label_smoothing,
                 num_classes=num_classes)


def maybe_device_input(run: Run, train_data) -> None:
    """Switch ``run`` to the GPU input path (:mod:`fusionnet.data.device_input`) when ``device_augment`` allows it."""
    cfg = run.cfg
    if cfg.device_augment is False or (cfg.device_augment == "auto" and run.device.type != "cuda"):
        return  # the CPU keeps the per-image loader unless asked
    spec = spec_of(train_data.transform)
    side = spec.size if spec is not None else 0
    reason = ("the training pipeline is not a fusionnet train_transform" if spec is None else
              "distributed training shards the images per process" if run.world > 1 else
              "a callback draws the samples" if _drawn(run, len(train_data)) else
              "the training images do not fit in a quarter of the free GPU memory"
              if run.device.type == "cuda" and not fits(len(train_data), side, run.device) else None)
    if reason is not None:
        if cfg.device_augment is True:
            raise ConfigError(f"device_augment=True, but {reason}; use device_augment='auto' or False")
        run.say(f"GPU input path off: {reason}")
        return
    bar = (lambda it: tqdm(it, desc="images to device", leave=False)) if cfg.progress else None
    try:
        run.inputs.device_images = DeviceImages.load(train_data, side, run.device, num_workers=cfg.num_workers,
                                                     progress=bar)
    except ConfigError as exc:
        if cfg.device_augment is True:
            raise
        run.say(f"GPU input path off: {exc}")
        return
    run.inputs.augment = BatchAugment(spec)
    run.say(f"GPU input path: {len(train_data)} images at {side} px on {run.device} "
            f"({run.inputs.device_images.images.numel() / 2 ** 20:.0f} MiB), augmented per batch there")


def maybe_cache(clf: Classifier, train_data, val_data, cfg: TrainConfig, device, world: int, say):
    """(train source, val source, cached?): FeatureDatasets when the settings allow, else the datasets."""
    if cfg.strategy != "frozen" or cfg.cache_features is False:
        return train_data, val_data, False
    reason = cache_blocker(clf) or ("distributed training" if world > 1 else None) or (
        "mixup/cutmix mix images, not cached features" if cfg.mixup or cfg.cutmix else None)
    train_for_cache = train_data
    if reason is None and not _is_deterministic(train_data):
        try:  # frozen trunks: un-augmented cached features, as good on validation and many times faster (config.py)
            train_for_cache = eval_view(train_data, val_data)
            say("feature cache: training on un-augmented train features (frozen trunks; --cache-features false "
                "trains on augmented images instead)")
        except ConfigError as exc:
            reason = f"the train pipeline is random and {exc}"
    if reason is not None:
        if cfg.cache_features is True:
            raise ConfigError(f"cache_features=True, but the features cannot be cached: {reason}")
        say(f"feature cache off: {reason}")
        return train_data, val_data, False
    bar = (lambda d: (lambda it: tqdm(it, desc=d, leave=False))) if cfg.progress else (lambda d: None)
    kw = dict(cache_dir=cfg.cache_dir, batch_size=max(cfg.batch_size, 64), device=device,
              num_workers=cfg.num_workers)
    train_f, hit_tr = cached_features(clf, train_for_cache, progress=bar("cache train"), **kw)
    val_f, hit_va = cached_features(clf, val_data, progress=bar("cache val"), **kw)
    say(f"feature cache: train {'loaded' if hit_tr else 'computed'}, val {'loaded' if hit_va else 'computed'}"
        + (f" ({cfg.cache_dir!r})" if cfg.cache_dir else " (memory)"))
    return train_f, val_f, True


def _drawn(run: Run, n: int) -> bool:
    """Whether a callback draws the training samples (e.g. :class:`fusionnet.engine.callbacks.Resample`)."""
    return _callback_sampler(run, n, torch.Generator()) is not None


def _callback_sampler(run: Run, n: int, generator: torch.Generator):
    """The first callback's own sampler of the ``n`` training samples, or None."""
    return next((s for cb in run.callbacks if (s := cb.sampler(n, generator)) is not None), None)


def _sampler(dataset, run: Run, epoch: int, generator):
    cfg = run.cfg
    if run.world > 1:
        sampler = DistributedSampler(dataset, shuffle=True, seed=cfg.seed)
        sampler.set_epoch(epoch)
        return sampler
    drawn = _callback_sampler(run, len(dataset), generator)
    if drawn is not None:
        return drawn
    if cfg.balanced_sampling:
        return balanced_sampler(run.inputs.labels, generator=generator)
    return torch.utils.data.RandomSampler(dataset, generator=generator)


def batches(run: Run, epoch: int, epoch_seed: int):
    """(batches of (x, y) on the device, their number) for one epoch, from the run's input source."""
    cfg, dataset = run.cfg, run.inputs.train
    generator = torch.Generator().manual_seed(epoch_seed)
    sampler = _sampler(dataset, run, epoch, generator)
    drop_last = run.inputs.mix is not None and len(sampler) >= cfg.batch_size  # mixup pairs need even, full batches
    count = steps_per_epoch(len(sampler), cfg, 1, drop_last)
    if run.inputs.device_images is not None:  # the GPU input path: indices in the sampler's order, augmented on the device
        order = torch.tensor(list(sampler))
        gen = torch.Generator(device=run.device).manual_seed(epoch_seed)
        return ((run.inputs.device_images.batch(order[i * cfg.batch_size:(i + 1) * cfg.batch_size], run.inputs.augment, gen)
                 for i in range(count)), count)
    if isinstance(dataset, FeatureDataset):  # cached features: whole batches by indexing, the same batches
        loader = dataset.batches(sampler, cfg.batch_size)
    else:  # one loader per run: its workers persist; each batch carries its augmentation seed (loader.py)
        if run.inputs.loader is None:
            run.inputs.loader = training_loader(dataset, cfg.batch_size, num_workers=cfg.num_workers,
                                                pin_memory=run.device.type == "cuda", drop_last=drop_last)
        loader, epoch_sampler = run.inputs.loader
        epoch_sampler.start(sampler, epoch_seed * 1_000 + run.rank)
    device = run.device
    return ((to_device(x, device, non_blocking=True), torch.as_tensor(y).to(device, non_blocking=True))
            for x, y in loader), count
