"""Every example on the site and in the README runs as written: the README's set-up commands are what CI runs; every
other shell command and Python block of README.md and of each docs page runs in one sandbox, page by page in the
site's order and block by block in each page's order, as a reader would (docs/extending.md's Python blocks run in
tests/test_extending.py, which also checks what they register)."""

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


# Each command runs as written, in a sandbox holding the files it names (tiny generated image folders at the same
# paths), with a smaller budget appended: argparse lets the last flag win, so the command itself is unchanged. The
# two set-up commands are CI's own job (.ci/run).
BUDGET = {
    "train": ["--epochs", "1", "--size", "32", "--no-progress"],
    "predict": ["--size", "32"],
    "fuse": ["--epochs", "1", "--size", "32", "--no-progress"],
    "export": ["--size", "32"],
    "distill": ["--epochs", "1", "--size", "32", "--no-progress"],
    "gap": ["--size", "32"],
    "auto": ["--sizes", "32", "--time-limit", "2m", "--no-finetune", "--no-progress"],
    "compare": ["--epochs", "1", "--size", "32", "--no-progress", "--backbones", "timm/test_efficientnet",
                "timm/test_resnet", "--no-pretrained", "--variants", "late_oof", "--seeds", "0"],  # tiny trunks
    # (the Lite trunks are the other commands'); every variant: test_compare.py; the path that aggregates over
    # seeds: test_auto.py's local two-seed compare
}


DOCS = ROOT / "docs"
RUN_ELSEWHERE = {"extending.md": "tests/test_extending.py"}  # page: the test that runs its Python blocks


def pages() -> list[Path]:
    """README.md, then the site's pages in the order of docs/index.md's table of contents."""
    index = (DOCS / "index.md").read_text()
    names = [line.strip() for block in re.findall(r"```\{toctree\}\n(.*?)```", index, flags=re.S)
             for line in block.splitlines() if line.strip() and not line.startswith(":")]
    return [ROOT / "README.md", *[DOCS / f"{name}.md" for name in names]]


def blocks(page: Path) -> list[tuple[str, str]]:
    """(language, text) of each fenced code block of ``page``, in order."""
    return re.findall(r"^```(\w+)\n(.*?)^```", page.read_text(), flags=re.S | re.M)


def commands(text: str) -> list[str]:
    lines = [line.split("  #")[0].strip() for line in text.splitlines()]
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


def _sandbox(work: Path) -> None:
    """The files the examples name: image folders, the user's plain checkpoints, a table, photos, train.yaml."""
    import torch
    import torchvision
    from PIL import Image

    from toydata import make_splits

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
    (work / "labels.csv").write_text("path,label,split\n" + "\n".join(rows) + "\n")  # the data page's table
    for name in ("photo1.jpg", "photo2.jpg"):
        Image.open(next((work / "data" / "test" / "a").iterdir())).convert("RGB").save(work / name)
    (yaml_block,) = [text for page in pages() for language, text in blocks(page) if language == "yaml"]
    (work / "train.yaml").write_text(yaml_block)


def _run_command(command: str, work: Path, state: dict) -> None:
    import shlex
    import subprocess
    import sys

    from fusionnet.cli.main import main

    argv = shlex.split(command)
    extra = BUDGET.get(argv[1], []) if argv[0] == "fusionnet" else []
    if argv[:2] == ["fusionnet", "serve"]:  # runs until stopped: start it, wait until ready, the curl line next
        state["server"] = _start_server(argv, work)
    elif argv[0] == "curl":
        server = state.pop("server")
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        server.terminate()  # SIGTERM: in-flight requests finish, then uvicorn re-raises the signal and exits
        assert server.wait(timeout=60) in (0, -15), server.stderr.read()[-2000:]
        answer = json.loads(proc.stdout)
        assert len(answer["top"]) == 3 and answer["members"], proc.stdout
    elif argv[0] == "torchrun":  # a subprocess per rank: run it as written, with the tiny budget
        argv = [sys.executable, "-m", "torch.distributed.run", *argv[1:], *BUDGET["train"]]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=300,
                              env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
        assert proc.returncode == 0, (command, proc.stderr[-2000:])
    else:
        assert argv[0] == "fusionnet", f"{command!r}: a shell example runs in the tests; mark a block that must " \
                                        "not (an install step) as ```text"
        assert main(argv[1:] + extra) == 0, command


def test_every_example_runs_as_written(tmp_path, monkeypatch):
    every = [c for page in pages() for language, text in blocks(page) if language == "bash" for c in commands(text)]
    assert {c.split()[1] for c in every if c.startswith("fusionnet")} >= {
        "backbones", "inspect", "classify", "train", "predict", "vote", "fuse", "gap", "export", "compare", "distill",
        "serve"}
    work = tmp_path / "work"
    _sandbox(work)
    monkeypatch.chdir(work)
    state: dict = {}
    namespaces: dict = {}
    ran: set[str] = set()
    for page in pages():
        for language, text in blocks(page):
            if language == "python" and page.name not in RUN_ELSEWHERE:
                exec(compile(text, str(page), "exec"), namespaces.setdefault(page.name, {}))
            elif language == "bash":
                for command in commands(text):
                    if command not in ran:  # a command shown on two pages runs once
                        _run_command(command, work, state)
                        ran.add(command)
    assert not state, "a server was started without a curl line after it"
    for written in ("runs/lite0/best.pth", "runs/lite1/best.pth", "runs/lite0_val.pt", "runs/fuse/fuse.md",
                    "predictions.csv", "runs/gap/gap.png", "fused.onnx", "runs/lite0_ddp/best.pth",
                    "runs/flowers_seeds3/results.md", "runs/digits_seeds3/results.md", "runs/distill/distill.md",
                    "student.csv", "runs/from_table/best.pth", "fused_model/model.safetensors",
                    "folder_predictions.csv", "runs/fused/model/model.safetensors", "predictions_readme.csv",
                    "runs/fuse_plain/selected.pth", "plain_fused.onnx", "runs/fuse/model/config.json",
                    "runs/fusion/best.pth", "runs/digits_lite0/final.pth", "runs/digits_bagged/bag1/best.pth",
                    "vote.csv", "vote.onnx"):
        assert (work / written).is_file(), written
    readme = namespaces["README.md"]
    assert list(readme["best"].branches) == ["efficientnet_lite0", "efficientnet_lite1"]
    started = namespaces["getting-started.md"]
    assert started["logits"].shape == (2, 5)
    training = namespaces["training.md"]
    assert sum(training["chosen"].weights) == pytest.approx(1.0) and len(training["bagged"]) == 2
    assert namespaces["data.md"]["splits"].class_names == ["a", "b", "c"]
