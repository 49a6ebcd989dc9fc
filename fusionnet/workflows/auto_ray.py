"""``fusionnet auto --ray``: the screening of every candidate as a Ray task (one GPU each where the cluster has GPUs,
else one CPU), on a local Ray instance or the cluster ``RAY_ADDRESS`` names. Each task reads the data folder itself
(on a cluster, the same path on every node) and runs :func:`fusionnet.workflows.auto.screen` as the local run
does, so the results are the local run's. Tasks not finished at the time limit are cancelled and reported."""

from __future__ import annotations

import os

import torch

from fusionnet.errors import MissingDependencyError, TrainingError, install_hint


def _screen_task(candidate, data: dict, settings):
    from fusionnet.data.splits import load_splits
    from fusionnet.workflows.auto import screen

    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    splits = load_splits(data["root"], size=data["size"], val_fraction=data["val_fraction"], seed=data["seed"],
                         resize=data["resize"], progress=False)
    return screen(candidate, splits, settings, log=lambda _m: None)


def screen_with_ray(candidates, cfg, settings, resize: str, budget, log) -> list:
    try:
        import ray
    except ImportError as exc:
        raise MissingDependencyError(f"auto --ray needs Ray: {install_hint('ray')} ({exc})") from None
    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS") or None, include_dashboard=False, logging_level="error")
    gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
    task = ray.remote(num_cpus=1, num_gpus=gpus)(_screen_task)
    data = {"root": str(cfg.data), "size": max(c.size for c in candidates), "val_fraction": cfg.val_fraction,
            "seed": cfg.seed, "resize": resize}
    pending = {task.remote(c, data, settings): c for c in candidates}
    log(f"screening {len(pending)} candidates as Ray tasks ({'a GPU' if gpus else 'a CPU'} each)")
    done, late = ray.wait(list(pending), num_returns=len(pending), timeout=max(budget.left() * 0.9, 1.0))
    for ref in late:
        ray.cancel(ref, force=True)
    results = {pending[ref].id: ray.get(ref) for ref in done}
    for ref in late:
        log(f"screening {pending[ref].id} did not finish within the time limit: left out")
    if not results:
        raise TrainingError("no screening task finished within the time limit; give auto more time")
    return [results[c.id] for c in candidates if c.id in results]
