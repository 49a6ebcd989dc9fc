"""The house: packages by layer, each importing only from the layers below (function-level imports included)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "fusionnet"
TOP = {"errors", "registry", "config"}  # torch-free modules every layer may use
ALLOWED = {  # layer -> the layers (and top-level modules) its modules may import
    "errors": set(),
    "registry": {"errors"},
    "config": {"errors", "registry"},
    "utils": {"errors", "registry"},
    "data": {"utils"} | TOP,  # config is torch-free settings: the resize modes, how plain members were trained
    "models": {"utils"} | TOP,
    "engine": {"models", "data", "utils"} | TOP,
    "ensembles": {"engine", "models", "data", "utils"} | TOP,
    "workflows": {"ensembles", "engine", "models", "data", "utils"} | TOP,
    "diagnostics": {"ensembles", "engine", "models", "data", "utils"} | TOP,  # of trained models, for notebooks
    "serving": {"models", "data", "utils"} | TOP,
    "cli": {"workflows", "serving", "ensembles", "engine", "models", "data", "utils"} | TOP,
}


def _layer(module: str) -> str:
    """'fusionnet.models.fusion' -> 'models'; 'fusionnet.errors' -> 'errors'; 'fusionnet' -> ''."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("fusionnet")}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("fusionnet"):
            if node.module == "fusionnet":
                found |= {f"fusionnet.{a.name}" for a in node.names}
            else:
                found.add(node.module)
    return found


def test_every_import_points_down_the_layers():
    upward = []
    for path in sorted(PKG.rglob("*.py")):
        mod = ".".join(path.relative_to(PKG.parent).with_suffix("").parts)
        layer = _layer(mod)
        if layer in ("", "__init__", "__main__"):
            continue
        for target in _imports(path):
            to = _layer(target)
            if to and to != layer and to not in ALLOWED[layer]:
                upward.append(f"{mod} imports {target}")
    assert upward == []


def test_the_top_level_is_small_and_the_layers_are_packages():
    top_modules = sorted(p.name for p in PKG.glob("*.py"))
    packages = sorted(p.name for p in PKG.iterdir() if (p / "__init__.py").is_file())
    assert len(top_modules) <= 8, top_modules
    assert set(packages) == set(ALLOWED) - TOP - {"errors"} | {"config"}, packages  # config: a package of its own
    assert all(_layer(f"fusionnet.{p}") in ALLOWED for p in packages)


def test_no_module_over_450_lines():
    long = {str(p.relative_to(PKG)): n for p in PKG.rglob("*.py") if (n := len(p.read_text().splitlines())) > 450}
    assert long == {}


def test_no_function_over_60_lines():
    long = []
    for path in PKG.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 60:
                long.append(f"{path.relative_to(PKG)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1})")
    assert long == []


def test_no_public_function_takes_more_than_8_parameters():
    """A longer list is a settings object waiting to be named (a Context for the workflows). The exception: the
    top-level API's functions spell their settings out as keywords, so that an editor, help() and an API reference
    show them (tests/test_api.py); each builds its settings object (Inference, SplitSettings, FusionConfig)."""
    import fusionnet

    api = {(m.replace(".", "/") + ".py", name) for name, m in fusionnet._MODULE_OF.items()}
    long = []
    for path in PKG.rglob("*.py"):
        where = str(path.relative_to(PKG.parent))
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef) and not node.name.startswith("_") and (where, node.name) not in api:
                a = node.args
                names = [x.arg for x in a.posonlyargs + a.args + a.kwonlyargs if x.arg not in ("self", "cls")]
                if len(names) > 8:
                    long.append(f"{path.relative_to(PKG)}:{node.lineno} {node.name} ({len(names)})")
    assert long == []


def test_every_training_flag_reaches_every_command_that_trains():
    """A new TrainConfig field (a callback's setting) becomes a flag of train, compare, fuse and distill."""
    from fusionnet.cli.main import build_parser

    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    for name in ("train", "compare", "fuse", "distill"):
        flags = {o for a in commands[name]._actions for o in a.option_strings}
        assert {"--ema-decay", "--ogm-alpha", "--branch-streams", "--checkpoint-activations"} <= flags, name


@pytest.mark.parametrize("config", ["TrainConfig", "TrainRun", "CompareConfig", "FuseConfig", "DistillConfig"])
def test_building_a_config_imports_no_torch(config):
    args = {"TrainRun": "data='d', backbones=['resnet18']", "CompareConfig": "data='d'",
            "FuseConfig": "members=['a', 'b'], data='d'", "DistillConfig": "teacher=['t'], data='d'"}.get(config, "")
    code = (f"import sys; from fusionnet.config import {config}; {config}({args}); "
            f"from fusionnet.cli.args import COMMANDS; "
            f"bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'numpy', 'timm')); "
            f"print(bad); sys.exit(1 if bad else 0)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_training_setting_has_one_concern():
    """TrainConfig's fields are grouped by concern (optimisation, recipe, callbacks, loading, runtime): --help shows
    them so, and a new field must say where it belongs."""
    from dataclasses import fields

    from fusionnet.config import TrainConfig
    from fusionnet.config.train import TRAIN_CONCERNS

    listed = [n for names in TRAIN_CONCERNS.values() for n in names]
    assert sorted(listed) == sorted(f.name for f in fields(TrainConfig))  # each once, none missing
