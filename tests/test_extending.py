"""Each extension point is one stated place (CONTRIBUTING.md): a toy backbone, fusion method, ensemble method,
comparison variant, callback and CLI command, each registered there, show up in --help, in compare and in its
report, and leave the registries as they were."""

from __future__ import annotations

import json
import pytest
import torch

from fusionnet.cli.args import COMMANDS, Command
from fusionnet.cli.main import main
from fusionnet.config import CompareConfig, regime_train_config
from fusionnet.engine.callbacks import CALLBACKS, Callback
from fusionnet.ensembles.methods import ENSEMBLES, MethodOutput, register_ensemble
from fusionnet.models.backbones import BACKBONES, BackboneSpec, register_backbone
from fusionnet.models.fusers import FUSIONS, Fuser, register_fusion
from fusionnet.workflows.compare import VARIANTS, Variant, _joint, register_variant, run_comparison
from toydata import make_splits

CALLS = {"callback": 0, "command": 0}


class ToyCallback(Callback):
    @classmethod
    def from_config(cls, cfg):
        return cls()

    def on_step_end(self, model) -> None:
        CALLS["callback"] += 1


def handle_toy(args) -> None:
    CALLS["command"] += 1
    print(f"toy says {args.word}")


@pytest.fixture
def toys():
    """Register one toy of each kind; unregister them afterwards."""
    register_backbone(BackboneSpec("toy_trunk", "timm", "test_resnet", 0))

    @register_fusion("toy_mean")
    class MeanFusion(Fuser):  # the branches' mean (all of one width): the fused vector has D_1 columns
        def __init__(self, dims, *, num_classes, width):
            super().__init__(dims, num_classes=num_classes, width=width)
            self.out_dim = dims[0]

        def forward(self, feats):
            return torch.stack([f[:, :self.out_dim] for f in feats]).mean(0), {}

    @register_ensemble("toy_first", label="the first member alone")
    def first(p) -> MethodOutput:
        return MethodOutput(p.test[0], p.val[0], [1.0] + [0.0] * (len(p.val) - 1))

    register_variant(Variant("toy_twice", _joint("concat"), regimes=("frozen",), default=False))
    ToyCallback.key = "toy"
    CALLBACKS.register("toy", ToyCallback)
    COMMANDS.register("toy", Command("say a word (a toy command)", lambda p: p.add_argument("word"), {},
                                     "test_extending:handle_toy"))
    yield
    BACKBONES.unregister("toy_trunk")
    FUSIONS.unregister("toy_mean")
    ENSEMBLES.unregister("toy_first")
    VARIANTS.unregister("toy_twice")
    CALLBACKS.unregister("toy")
    COMMANDS.unregister("toy")


def test_a_toy_of_each_kind_shows_in_help_in_compare_and_in_the_report(toys, tmp_path, capsys):
    from fusionnet.cli.main import build_parser

    assert "say a word (a toy command)" in build_parser().format_help()
    assert main(["toy", "hello"]) == 0 and "toy says hello" in capsys.readouterr().out
    assert main(["backbones"]) == 0 and "toy_trunk" in capsys.readouterr().out

    data = make_splits(tmp_path / "data", per_class=6)
    cfg = CompareConfig(data=str(data), backbones=["toy_trunk", "timm/test_efficientnet"], size=32,
                        pretrained=False, out=str(tmp_path / "run"), variants=["toy_mean", "toy_twice"],
                        train=regime_train_config("frozen", epochs=1, batch_size=8, progress=False))
    results = run_comparison(cfg, log=None)
    report = (tmp_path / "run" / "results.md").read_text()
    for label in ("member: toy_trunk", "FusionNet (toy mean)", "FusionNet (toy twice)", "the first member alone"):
        assert f"| {label} |" in report
    assert CALLS["callback"] > 0 and CALLS["command"] == 1
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["selected"]["fusion"]["id"] in {"toy_mean", "toy_twice"}
    assert set(results["fusion"]) == {"toy_mean", "toy_twice"}


def test_a_new_fusion_method_is_opt_in_and_registries_refuse_duplicates(toys):
    from fusionnet.errors import ConfigError
    from fusionnet.workflows.compare import resolve_variants

    assert "toy_mean" not in resolve_variants("frozen", None) and "toy_twice" not in resolve_variants("frozen", None)
    assert "toy_mean" in resolve_variants("frozen", ["toy_mean"])
    for registry, name in ((FUSIONS, "toy_mean"), (ENSEMBLES, "toy_first"), (CALLBACKS, "toy"), (COMMANDS, "toy"),
                           (BACKBONES, "toy_trunk"), (VARIANTS, "toy_twice")):
        with pytest.raises(ConfigError, match=f"'{name}' is already registered"):
            registry.register(name, object())
        with pytest.raises(ConfigError, match=f"did you mean '{name}'"):
            registry.get(name + "x")
