"""Each extension point is one stated place (docs/extending.md): the snippets there, run as written, register a
backbone (torchvision's ShuffleNetV2, not in the registry otherwise), a fusion method, an ensemble method, a
comparison variant, a callback and a CLI command; each shows up in --help, in compare and in its report, and the
registries are as they were afterwards."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from fusionnet.cli.args import COMMANDS
from fusionnet.cli.main import main
from fusionnet.config import CompareConfig, regime_train_config
from fusionnet.engine.callbacks import CALLBACKS
from fusionnet.ensembles.methods import ENSEMBLES
from fusionnet.models.backbones import BACKBONES
from fusionnet.models.fusers import FUSIONS
from fusionnet.workflows.compare import VARIANTS, compare
from toydata import make_splits

EXTENDING = Path(__file__).resolve().parents[1] / "docs" / "extending.md"
REGISTERED = ((BACKBONES, "shufflenet_v2_x1_0"), (FUSIONS, "mean"), (ENSEMBLES, "first_member"),
              (VARIANTS, "concat_no_dropout"), (CALLBACKS, "step_counter"), (COMMANDS, "say"))


@pytest.fixture
def snippets() -> dict:
    """Run every python snippet of docs/extending.md, in order, as a reader would; unregister what they added."""
    blocks = re.findall(r"```python\n(.*?)```", EXTENDING.read_text(), flags=re.S)
    assert len(blocks) == len(REGISTERED)  # one snippet per extension kind
    namespace: dict = {}
    try:
        for block in blocks:
            exec(compile(block, str(EXTENDING), "exec"), namespace)
        yield namespace
    finally:
        for registry, name in REGISTERED:
            if name in registry:
                registry.unregister(name)


def test_the_backbone_snippet_reads_torchvision_weights_and_fuses_with_a_registered_backbone(snippets, tmp_path):
    """The registered ShuffleNetV2 trunk keeps torchvision's names: a torchvision state dict loads into its branch
    key for key (its fc becomes the member's head), and it fuses with resnet18."""
    import torchvision

    from fusionnet import create_fusionnet

    torch.manual_seed(0)
    plain = torchvision.models.shufflenet_v2_x1_0(weights=None, num_classes=3).eval()
    torch.save(plain.state_dict(), tmp_path / "shufflenet.pth")
    member = create_fusionnet(["shufflenet_v2_x1_0"], num_classes=3, pretrained=False,
                              checkpoints={"shufflenet_v2_x1_0": tmp_path / "shufflenet.pth"}).eval()
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(member(x), plain(x), atol=1e-5)
    fused = create_fusionnet(["shufflenet_v2_x1_0", "resnet18"], num_classes=3, pretrained=False, fusion="gated")
    assert fused(x).shape == (2, 3)
    assert {n: br.out_dim for n, br in fused.branches.items()} == {"shufflenet_v2_x1_0": 1024, "resnet18": 512}


def test_each_snippet_shows_in_help_in_compare_and_in_the_report(snippets, tmp_path, capsys):
    from fusionnet.cli.main import build_parser

    assert "say a word" in build_parser().format_help()
    assert main(["say", "hello"]) == 0 and "fusionnet says hello" in capsys.readouterr().out
    assert main(["backbones"]) == 0 and "shufflenet_v2_x1_0" in capsys.readouterr().out

    data = make_splits(tmp_path / "data", per_class=6)
    cfg = CompareConfig(data=str(data), backbones=["shufflenet_v2_x1_0", "timm/test_efficientnet"], size=32,
                        pretrained=False, out=str(tmp_path / "run"), variants=["mean", "concat_no_dropout"],
                        train=regime_train_config("frozen", epochs=1, batch_size=8, progress=False))
    results = compare(cfg, log=None)
    report = (tmp_path / "run" / "results.md").read_text()
    for label in ("member: shufflenet_v2_x1_0", "FusionNet (mean)", "FusionNet (concat no dropout)",
                  "the first member alone"):
        assert f"| {label} |" in report
    assert snippets["StepCounter"].steps > 0
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["selected"]["fusion"]["id"] in {"mean", "concat_no_dropout"}
    assert set(results["fusion"]) == {"mean", "concat_no_dropout"}


def test_a_new_fusion_method_is_opt_in_and_registries_refuse_duplicates(snippets):
    from fusionnet.errors import ConfigError
    from fusionnet.workflows.compare import resolve_variants

    assert "mean" not in resolve_variants("frozen", None) and "concat_no_dropout" not in resolve_variants("frozen", None)
    assert "mean" in resolve_variants("frozen", ["mean"])
    for registry, name in REGISTERED:
        with pytest.raises(ConfigError, match=f"'{name}' is already registered"):
            registry.register(name, object())
        with pytest.raises(ConfigError, match=f"did you mean '{name}'"):
            registry.get(name + "x")
