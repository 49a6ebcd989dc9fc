"""The README's commands are what CI runs."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"```bash\n(python3 -m venv[^\n]*)\n```", readme)
    assert len(commands) == 2, commands  # exactly two set-up commands: the main job, and the tests
    test_command = next(c for c in commands if "pytest" in c)
    assert test_command in (ROOT / ".ci" / "run").read_text().splitlines()


def test_readme_python_example_runs(tmp_path, monkeypatch):
    """The Use section's example, with a random-weight stand-in for the user's fine-tuned ResNet18."""
    import torch
    import torchvision

    readme = (ROOT / "README.md").read_text()
    examples = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    assert len(examples) == 3  # use, training, ensembles: run in order, as a reader would
    monkeypatch.chdir(tmp_path)
    (tmp_path / "weights").mkdir()
    torch.save(torchvision.models.resnet18(weights=None, num_classes=5).state_dict(),
               tmp_path / "weights" / "resnet18_best.pth")
    namespace: dict = {}
    for example in examples:
        exec(compile(example, "README.md", "exec"), namespace)
    assert namespace["logits"].shape == (2, 5)
    assert (tmp_path / "runs" / "fusion" / "best.pth").is_file()
    assert (tmp_path / "runs" / "digits_lite0" / "final.pth").is_file()
    assert sum(namespace["chosen"].weights) == pytest.approx(1.0)
