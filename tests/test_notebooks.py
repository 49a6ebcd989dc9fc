"""The notebooks run: their code cells are executed in order on a small demo run."""

import json
from pathlib import Path

import matplotlib

from fusionnet.demo import run_demo

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


def test_branch_contributions_notebook_runs(tmp_path, monkeypatch):
    matplotlib.use("Agg")
    run_demo(str(tmp_path / "runs" / "demo"), epochs=1, size=32, progress=False, log=None)
    monkeypatch.chdir(tmp_path)
    nb = json.loads((NOTEBOOKS / "branch_contributions.ipynb").read_text())
    namespace: dict = {}
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            exec(compile("".join(cell["source"]), "branch_contributions.ipynb", "exec"), namespace)
    ablation, probes = namespace["ablation"], namespace["probes"]
    assert set(ablation) == {"all"} | {f"{w} efficientnet_lite{i}" for w in ("without", "only") for i in range(3)}
    assert ablation["all"] > 0.5 and set(probes) == {"efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2",
                                                     "concatenated"}
    assert namespace["xy"].shape == (len(namespace["test_y"]), 2)
