"""``fusionnet auto --ray``: the screening of every candidate as a Ray task (one GPU each where the cluster has GPUs,
else one CPU), on a local Ray instance or the cluster ``RAY_ADDRESS`` names. Each task reads the data folder itself
(on a cluster, the same path on every node) and runs :func:`fusionnet.workflows.auto.screen` as the local run
does, so the results are the local run's. Tasks not finished at the time limit are cancelled and reported."""

from __future__ import annotations

import os

import torch

from fusionnet.errors import TrainingError


def _screen_task(candidate, data: dict, settings):
    from fusionnet.data.splits import load_splits
    from fusionnet.workflows.auto.screening import screen

    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    splits = load_splits(data["root"], size=data["size"], val_fraction=data["val_fraction"], seed=data["seed"],
                         image_column=data["image_column"], label_column=data["label_column"],
                         image_root=data["image_root"], progress=False,
                         **(settings.reading or {}))
    return screen(candidate, splits, settings, log=lambda _m: None)


def screen_with_ray(candidates, cfg, settings, budget, log) -> list:
    from fusionnet.utils.ray_tasks import ray_map

    data = {"root": str(cfg.data), "size": max(c.size for c in candidates), "val_fraction": cfg.val_fraction,
            "seed": cfg.seed, "image_column": cfg.image_column, "label_column": cfg.label_column,
            "image_root": cfg.image_root}
    log(f"screening {len(candidates)} candidates as Ray tasks")
    results = ray_map(lambda c: _screen_task(c, data, settings), candidates,
                      timeout_s=max(budget.left() * 0.9, 1.0))
    for c, (finished, _) in zip(candidates, results):
        if not finished:
            log(f"screening {c.id} did not finish within the time limit: left out")
    screened = [r for finished, r in results if finished]
    if not screened:
        raise TrainingError("no screening task finished within the time limit; give auto more time")
    return screened
