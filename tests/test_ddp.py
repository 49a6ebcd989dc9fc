import json
import subprocess
import sys
from pathlib import Path

import torch

from toydata import make_splits


def test_fit_under_torchrun_with_two_gloo_processes(tmp_path):
    make_splits(tmp_path / "data", per_class=12)
    worker = Path(__file__).with_name("ddp_worker.py")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(worker),
           str(tmp_path / "data"), str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={"OMP_NUM_THREADS": "1",
                                                                                  "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert all(torch.equal(a[k], b[k]) for k in a)  # DDP kept both replicas identical
    h0, h1 = ([{k: v for k, v in row.items() if k != "seconds"} for row in
               json.loads((tmp_path / f"rank{r}.json").read_text())] for r in (0, 1))
    assert h0 == h1  # metrics reduced across ranks: both see the same numbers (wall time aside)
    assert h0[-1]["train_loss"] < h0[0]["train_loss"]
    written = json.loads((tmp_path / "run" / "history.json").read_text())
    assert [{k: v for k, v in row.items() if k != "seconds"} for row in written] == h0  # rank 0 wrote it
