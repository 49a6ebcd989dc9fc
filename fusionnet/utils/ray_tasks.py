"""Independent work as Ray tasks: ``--ray`` (or ``RAY_ADDRESS`` set) runs each item of a map as a task on a local
Ray instance or the cluster ``RAY_ADDRESS`` names, one GPU each where the cluster has GPUs, else one CPU. Tasks
read and write the same paths as the local run (on a cluster: a file system every node shares), so they give the
local run's results. Needs the ``ray`` extra."""

from __future__ import annotations

import os
from typing import Any, Callable, Sequence

from fusionnet.errors import MissingDependencyError, install_hint


def ray_requested(flag: bool) -> bool:
    """The ``--ray`` flag, or a Ray cluster named by ``RAY_ADDRESS``."""
    return bool(flag or os.environ.get("RAY_ADDRESS"))


def ray_module():
    try:
        import ray
    except ImportError as exc:
        raise MissingDependencyError(f"--ray needs Ray: {install_hint('ray')} ({exc})") from None
    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS") or None, include_dashboard=False, logging_level="error")
    return ray


def ray_map(fn: Callable[[Any], Any], items: Sequence[Any], *, timeout_s: float | None = None
            ) -> list[tuple[bool, Any]]:
    """``[(finished, fn(item))]`` in the order of ``items``, each call a Ray task; those not finished within
    ``timeout_s`` are cancelled and come back as ``(False, None)``."""
    ray = ray_module()
    gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
    task = ray.remote(num_cpus=1, num_gpus=gpus)(fn)
    refs = [task.remote(item) for item in items]
    done, late = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
    for ref in late:
        ray.cancel(ref, force=True)
    finished = set(done)
    return [(True, ray.get(ref)) if ref in finished else (False, None) for ref in refs]
