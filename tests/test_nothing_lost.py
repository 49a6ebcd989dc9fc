"""Nothing the user already has is lost to a failed command (fusionnet.utils.staging).

Per class, not per case: for every command that writes, an existing output plus each kind of bad input leaves
it byte-identical and exits 2 with one line; a training run killed (SIGTERM, SIGKILL) during --overwrite leaves
the old run loadable and identical, and what it left is cleaned by the next run.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fusionnet.cli.main import main
from fusionnet.utils.staging import clean_leftovers, output_folder
from toydata import make_splits

TINY = ["--backbones", "timm/test_resnet", "--no-pretrained", "--size", "32", "--batch-size", "8", "--no-progress"]


def snapshot(path: Path) -> dict[str, str]:
    """Every file under ``path`` (or the file itself) with its sha256: what must stay identical."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p.relative_to(path.parent)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Tiny data, two trained members (their run folders are the existing outputs), their saved outputs."""
    root = tmp_path_factory.mktemp("world")
    data = make_splits(root / "data", per_class=8)
    for name in ("a", "b"):
        assert main(["train", "--data", str(data), "--out", str(root / name), "--epochs", "1", *TINY]) == 0
        for split in ("val", "test"):
            assert main(["predict", str(root / name / "best.pth"), "--data", str(data), "--split", split,
                         "--size", "32", "--out", str(root / f"{name}_{split}.pt")]) == 0
    return root


def _existing(kind: str, root: Path) -> Path:
    """An output the user already has: a run folder (a trained run's files) or a file."""
    if kind == "folder":
        out = root / "existing_run"
        out.mkdir(exist_ok=True)
        (out / "best.pth").write_bytes(b"a week of training")
        (out / "history.json").write_text("[1, 2, 3]")
    else:
        out = root / "existing.file"
        out.write_bytes(b"the user's file")
    return out


def _cases(w: Path):
    """(command argv with OUT for the output, output kind) per writing command and per kind of bad input."""
    data, ckpt = str(w / "data"), str(w / "a" / "best.pth")
    return {
        "train: missing data folder": (["train", "--data", "/typo", "--epochs", "1", *TINY, "--out", "OUT"], "folder"),
        "train: unknown backbone": (["train", "--data", data, "--backbones", "resnet81", "--out", "OUT"], "folder"),
        "train: unknown fusion": (["train", "--data", data, "--backbones", "timm/test_resnet", "timm/test_efficientnet",
                                   "--fusion", "concta", "--no-pretrained", "--out", "OUT"], "folder"),
        "train: a number out of range": (["train", "--data", data, *TINY, "--lr", "-1", "--out", "OUT"], "folder"),
        "compare: missing data folder": (["compare", "--data", "/typo", "--backbones", "timm/test_resnet",
                                          "timm/test_efficientnet", "--out", "OUT"], "folder"),
        "compare: unknown variant": (["compare", "--data", data, "--backbones", "timm/test_resnet",
                                      "timm/test_efficientnet", "--variants", "stackd", "--out", "OUT"], "folder"),
        "fuse: a member that is not a checkpoint": (["fuse", "--members", ckpt, str(w / "a" / "history.json"),
                                                     "--data", data, "--size", "32", "--out", "OUT"], "folder"),
        "fuse: missing member": (["fuse", "--members", ckpt, "/typo.pth", "--data", data, "--out", "OUT"], "folder"),
        "distill: missing teacher": (["distill", "--teacher", "/typo.pth", "--data", data, "--out", "OUT"], "folder"),
        "distill: unreadable teacher": (["distill", "--teacher", str(w / "a" / "history.json"), "--data", data,
                                         "--size", "32", "--out", "OUT"], "folder"),
        "distill: unknown student": (["distill", "--teacher", ckpt, "--data", data, "--student", "resnet81",
                                      "--size", "32", "--out", "OUT"], "folder"),
        "gap: missing folder": (["gap", "--train", "/typo", "--test", data + "/test", "--out", "OUT"], "folder"),
        "predict: missing checkpoint": (["predict", "/typo.pth", "--data", data, "--out", "OUT"], "file"),
        "predict: missing images": (["predict", ckpt, "--images", "/typo", "--out", "OUT"], "file"),
        "export: not a checkpoint": (["export", str(w / "a" / "history.json"), "--out", "OUT"], "file"),
        "vote: unknown method": (["vote", "--method", "gredy", "--val", str(w / "a_val.pt"), str(w / "b_val.pt"),
                                  "--test", str(w / "a_test.pt"), str(w / "b_test.pt"), "--out", "OUT"], "file"),
        "vote: files of different members": (["vote", "--val", str(w / "a_val.pt"), str(w / "b_val.pt"), "--test",
                                              str(w / "b_test.pt"), str(w / "a_test.pt"), "--out", "OUT"], "file"),
    }


CASES = sorted(_cases(Path("w")))


@pytest.mark.parametrize("case", CASES)
def test_bad_input_keeps_what_was_there_and_exits_2_with_one_line(world, tmp_path, capsys, case):
    argv, kind = _cases(world)[case]
    out = _existing(kind, tmp_path)
    before = snapshot(out)
    argv = [str(out) if a == "OUT" else a for a in argv] + ["--overwrite"]
    assert main(argv) == 2, case
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "error:" in err, err
    assert snapshot(out) == before
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]


def test_a_failure_mid_run_keeps_the_old_run_and_removes_the_partial_one(tmp_path):
    out = _existing("folder", tmp_path)
    before = snapshot(out)
    with pytest.raises(RuntimeError, match="boom"):
        with output_folder(out, overwrite=True) as work:
            assert work != out and work.parent == out.parent and ".partial-" in work.name
            (work / "best.pth").write_bytes(b"half a new run")
            raise RuntimeError("boom")
    assert snapshot(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["existing_run"]
    with output_folder(out, overwrite=True) as work:  # a successful one is swapped in, its paths pointing at out
        (work / "results.json").write_text(f'{{"checkpoint": "{work}/best.pth"}}')
    assert (out / "results.json").read_text() == f'{{"checkpoint": "{out}/best.pth"}}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing_run"]


def test_leftovers_of_a_killed_command_are_cleaned_and_a_run_caught_between_renames_restored(tmp_path):
    dead = 2 ** 22 + 12345  # no such process
    out = tmp_path / "run"
    (tmp_path / f".run.partial-{dead}").mkdir()
    (tmp_path / f".run.replaced-{dead}").mkdir()
    (tmp_path / f".run.replaced-{dead}" / "best.pth").write_bytes(b"old")
    clean_leftovers(out)  # the run was renamed aside, the new one not yet in: the old comes back
    assert (out / "best.pth").read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def _start_training(args: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "fusionnet", *args], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _wait_for_partial(parent: Path, proc: subprocess.Popen) -> Path:
    for _ in range(600):
        partial = [p for p in parent.iterdir() if ".partial-" in p.name and (p / "history.json").is_file()]
        if partial:
            return partial[0]
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.1)
    raise AssertionError("the training run never wrote its first epoch")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_a_run_killed_during_overwrite_training_leaves_the_old_run_loadable_and_identical(world, tmp_path, sig):
    from fusionnet.models.factory import load_fusionnet

    old = tmp_path / "lite"
    subprocess.run(["cp", "-r", str(world / "a"), str(old)], check=True)
    before = snapshot(old)
    proc = _start_training(["train", "--data", str(world / "data"), "--out", str(old), "--epochs", "500",
                            *TINY, "--overwrite"], tmp_path)
    partial = _wait_for_partial(tmp_path, proc)
    os.kill(proc.pid, sig)
    code = proc.wait(timeout=60)
    assert snapshot(old) == before
    load_fusionnet(old / "best.pth")
    if sig == signal.SIGTERM:  # handled: the partial run is removed, and the command says so
        assert code == 143 and "terminated" in proc.stderr.read()
        assert not partial.exists()
    else:  # nothing runs after kill -9: the partial run stays under its name, and the next run cleans it
        assert code == -9 and partial.exists()
        assert main(["train", "--data", str(world / "data"), "--out", str(old), "--epochs", "1", *TINY,
                     "--overwrite"]) == 0
        assert not partial.exists() and snapshot(old) != before


def test_an_output_folder_that_holds_an_input_is_refused_before_anything_is_written(world, tmp_path, capsys):
    """--overwrite onto the data folder (or a folder holding a member) would replace it by the new run."""
    data = tmp_path / "data"
    subprocess.run(["cp", "-r", str(world / "data"), str(data)], check=True)
    before = snapshot(data)
    for out in (data, tmp_path):
        assert main(["train", "--data", str(data), "--out", str(out), "--epochs", "1", *TINY, "--overwrite"]) == 2
        assert "holds an input of this command" in capsys.readouterr().err
    assert snapshot(data) == before


def test_a_restored_run_is_checked_like_any_other_and_a_failed_swap_keeps_the_old_run(tmp_path, monkeypatch):
    from fusionnet.errors import ConfigError
    from fusionnet.utils import staging

    dead = 2 ** 22 + 12345
    (tmp_path / f".run.replaced-{dead}").mkdir()
    (tmp_path / f".run.replaced-{dead}" / "best.pth").write_bytes(b"old")
    with pytest.raises(ConfigError, match="exists already"):  # restored first, so not replaced without --overwrite
        with output_folder(tmp_path / "run", overwrite=False):
            pass
    assert (tmp_path / "run" / "best.pth").read_bytes() == b"old"

    def full_disk(work, final):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(staging, "_rewrite_paths", full_disk)
    with pytest.raises(OSError, match="No space left"):
        with output_folder(tmp_path / "run", overwrite=True) as work:
            (work / "best.pth").write_bytes(b"new")
    assert (tmp_path / "run" / "best.pth").read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
