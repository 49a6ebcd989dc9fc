"""The notebooks run top to bottom from notebooks/, the folder Jupyter starts their kernel in."""

import json
import shutil
from pathlib import Path

import matplotlib

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


def _run(name: str, root: Path, monkeypatch, parameters: dict | None = None) -> dict:
    """Execute the code cells in order, with the kernel's working directory at <root>/notebooks; ``parameters``
    are set right after the cell tagged "parameters" (as papermill injects them)."""
    matplotlib.use("Agg")
    (root / "notebooks").mkdir(parents=True, exist_ok=True)
    shutil.copy(NOTEBOOKS / name, root / "notebooks" / name)
    monkeypatch.chdir(root / "notebooks")
    nb = json.loads((root / "notebooks" / name).read_text())
    assert all(not c.get("outputs") for c in nb["cells"] if c["cell_type"] == "code"), "outputs are stripped in git"
    namespace: dict = {}
    tagged = [c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert not parameters or len(tagged) == 1, "a notebook run with parameters has one cell tagged 'parameters'"
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            exec(compile("".join(cell["source"]), name, "exec"), namespace)
            if cell in tagged:
                assert set(parameters or {}) <= set(namespace), "only the notebook's own parameters are set"
                namespace.update(parameters or {})
    return namespace


def test_branch_features_notebook_runs_offline(tmp_path, monkeypatch):
    # the mechanics at a smaller budget (32 px, one epoch, 40 scans per digit); the notebook's own 48 px, 4 epochs
    # and all 1,797 scans are for reading
    namespace = _run("branch_features.ipynb", tmp_path, monkeypatch,
                     parameters={"SIZE": 32, "EPOCHS": 1, "PER_CLASS": 40})
    assert (tmp_path / "runs" / "notebook_branches" / "results.md").is_file()
    cka = namespace["cka"]
    assert cka.shape == (3, 3) and abs(cka.trace() - 3) < 1e-6
    assert namespace["gates"].sum(1).allclose(namespace["gates"].new_ones(len(namespace["test_y"])))
    assert set(namespace["ablation"]) == {"all"} | {f"{w} efficientnet_lite{i}" for w in ("without", "only")
                                               for i in range(3)}
    assert set(namespace["probes"]) == {"efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2",
                                        "concatenated"}
    assert set(namespace["rows"]) == {"probe: efficientnet_lite0", "probe: efficientnet_lite1",
                                      "probe: efficientnet_lite2", "gated FusionNet"}
