"""The README's commands are what CI runs."""

import json
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
    assert len(namespace["bagged"]) == 2 and (tmp_path / "runs" / "digits_bagged" / "bag1" / "best.pth").is_file()


# Each README command runs as written, in a sandbox holding the files it names (tiny generated image folders at
# the same paths), with a smaller budget appended: argparse lets the last flag win, so the command itself is
# unchanged. The two set-up commands are CI's own job (.ci/run).
BUDGET = {
    "train": ["--epochs", "1", "--size", "32", "--no-progress"],
    "predict": ["--size", "32"],
    "fuse": ["--epochs", "1", "--size", "32", "--no-progress"],
    "export": ["--size", "32"],
    "distill": ["--epochs", "1", "--size", "32", "--no-progress"],
    "gap": ["--size", "32"],
    "auto": ["--sizes", "32", "--time-limit", "2m", "--no-finetune", "--no-progress"],
    "compare": ["--epochs", "1", "--size", "32", "--no-progress", "--backbones", "timm/test_efficientnet",
                "timm/test_resnet", "--no-pretrained", "--variants", "late_oof", "--seeds", "0", "1"],  # tiny trunks
    # (the Lite trunks are the other commands'); every variant: test_compare.py; two seeds still take the path
    # that aggregates over seeds
}


def _readme_commands(readme: str) -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", readme, flags=re.S)
    lines = [line.split("  #")[0].strip() for block in blocks for line in block.splitlines()]
    return [line for line in lines if line and not line.startswith("python3 -m venv")]


def _fake_demo_run(work: Path) -> None:
    """runs/demo as `fusionnet demo` leaves it, with a tiny model as the fusion validation chose."""
    from fusionnet import FusionNet
    from fusionnet.models.factory import save_model

    model = FusionNet(backbones=["timm/test_efficientnet", "timm/test_resnet"], num_classes=3, fusion="late",
                      class_names=["a", "b", "c"])
    path = save_model(model, work / "runs/demo/models/fusion_late_oof/best.pth", data={"input_size": 32})
    results = {"selected": {"fusion": {"id": "late_oof", "checkpoint": str(path)}},
               "fusion": {"late_oof": {"checkpoint": str(path)}}}
    (work / "runs/demo/results.json").write_text(json.dumps(results))


def _start_server(argv: list[str], work: Path):
    import subprocess
    import sys
    import time
    import urllib.request

    port = argv[argv.index("--port") + 1]
    server = subprocess.Popen([sys.executable, "-m", "fusionnet.cli.main", *argv[1:]], cwd=work, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    for _ in range(240):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=1) as r:
                if r.status == 200:
                    return server
        except OSError:
            time.sleep(0.5)
        assert server.poll() is None, server.stderr.read()[-2000:]
    raise AssertionError("the server did not become ready in 2 minutes")


def test_readme_commands_run_as_written(tmp_path, monkeypatch):
    import shlex
    import subprocess
    import sys

    import torch
    import torchvision
    from PIL import Image

    from fusionnet.cli.main import main
    from toydata import make_splits

    readme = (ROOT / "README.md").read_text()
    commands = _readme_commands(readme)
    assert {c.split()[1] for c in commands if c.startswith("fusionnet")} >= {
        "backbones", "inspect", "classify", "train", "predict", "vote", "fuse", "gap", "export", "compare", "distill",
        "serve"}
    work = tmp_path / "work"
    for folder in ("data", "runs/demo/digits", "../shared/data/flowers5_128"):
        make_splits(work / folder, per_class=12)
    (work / "weights").mkdir()
    _fake_demo_run(work)
    torch.save(torchvision.models.googlenet(weights=None, aux_logits=True, init_weights=False, num_classes=3)
               .state_dict(), work / "weights" / "googlenet_best.pth")
    torch.save(torchvision.models.resnet18(weights=None, num_classes=3).state_dict(),
               work / "weights" / "resnet18_best.pth")
    rows = [f"{f.relative_to(work)},{f.parent.name},{f.parent.parent.name}"
            for f in sorted((work / "data").rglob("*.png"))]
    (work / "labels.csv").write_text("path,label,split\n" + "\n".join(rows) + "\n")  # the Data section's table
    for name in ("photo1.jpg", "photo2.jpg"):
        Image.open(next((work / "data" / "test" / "a").iterdir())).convert("RGB").save(work / name)
    (yaml_block,) = re.findall(r"```yaml\n(.*?)```", readme, flags=re.S)
    (work / "train.yaml").write_text(yaml_block)
    monkeypatch.chdir(work)
    for command in commands:
        argv = shlex.split(command)
        extra = BUDGET.get(argv[1], []) if argv[0] == "fusionnet" else []
        if argv[:2] == ["fusionnet", "serve"]:  # runs until stopped: start it, wait until ready, the curl line next
            server = _start_server(argv, work)
            continue
        if argv[0] == "curl":
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=60)
            server.terminate()  # SIGTERM: in-flight requests finish, then uvicorn re-raises the signal and exits
            assert server.wait(timeout=60) in (0, -15), server.stderr.read()[-2000:]
            answer = json.loads(proc.stdout)
            assert len(answer["top"]) == 3 and answer["members"], proc.stdout
            continue
        if argv[0] == "torchrun":  # a subprocess per rank: run it as the README says, with the tiny budget
            argv = [sys.executable, "-m", "torch.distributed.run", *argv[1:], *BUDGET["train"]]
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=300,
                                  env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
            assert proc.returncode == 0, (command, proc.stderr[-2000:])
            continue
        assert argv[0] == "fusionnet", command
        assert main(argv[1:] + extra) == 0, command
    for written in ("runs/lite0/best.pth", "runs/lite1/best.pth", "runs/lite0_val.pt", "runs/fuse/fuse.md",
                    "predictions.csv", "runs/gap/gap.png", "fused.onnx", "runs/lite0_ddp/best.pth",
                    "runs/flowers_seeds3/results.md", "runs/digits_seeds3/results.md", "runs/distill/distill.md",
                    "student.csv", "runs/from_table/best.pth", "fused_model/model.safetensors",
                    "folder_predictions.csv"):
        assert (work / written).is_file(), written
