import pytest
import torch
import torchvision

from fusionnet.cli.main import main


def test_inspect_prints_the_summary(tmp_path, capsys):
    sd = torchvision.models.mobilenet_v2(weights=None, num_classes=4).state_dict()
    torch.save({"model": {f"module.{k}": v for k, v in sd.items()}}, tmp_path / "m.pth")
    assert main(["inspect", str(tmp_path / "m.pth")]) == 0
    out = capsys.readouterr().out
    assert "architecture: mobilenet_v2" in out and "classes:      4" in out and "prefixes:     module." in out


def test_missing_file_is_an_error_exit_with_the_quoted_path(capsys):
    assert main(["inspect", "weights/ best.pth"]) == 2
    assert "'weights/ best.pth'" in capsys.readouterr().err


def test_backbones_lists_the_registry(capsys):
    assert main(["backbones"]) == 0
    out = capsys.readouterr().out
    assert "googlenet" in out and "efficientnet_lite0" in out


def test_classify_runs_offline_on_the_shipped_photos(capsys):
    assert main(["classify", "--top", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("china.jpg: ") and lines[1].startswith("flower.jpg: daisy ")


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_export_writes_an_onnx_file_that_matches_pytorch_at_any_batch(tmp_path, capsys, exporter):
    import torch

    from fusionnet import FusionNet
    from fusionnet.models.factory import save_model
    from fusionnet.models.export import check_onnx

    model = FusionNet(backbones=["timm/test_resnet", "timm/test_efficientnet"], num_classes=3,
                      taps={"timm/test_resnet": 2}).eval()  # taps: pooled earlier levels, collected by hooks
    save_model(model, tmp_path / "m.pth")
    assert main(["export", str(tmp_path / "m.pth"), "--out", str(tmp_path / "m.onnx"), "--size", "32",
                 "--exporter", exporter]) == 0
    assert "max abs diff" in capsys.readouterr().out
    for batch in (1, 5):
        assert check_onnx(model, tmp_path / "m.onnx", torch.rand(batch, 3, 32, 32)) <= 1e-4


def test_the_demo_builds_its_comparison_as_the_readme_runs_it(tmp_path):
    """`fusionnet demo` is CI's set-up command, not run by the suite: its settings must still build (and be the
    documented budget: frozen Lite0/1/2 at 64 px, 8 epochs, one shared cache)."""
    from fusionnet.workflows.demo import demo_config

    cfg = demo_config(str(tmp_path / "demo"))
    assert cfg.regime == "frozen" and cfg.size == 64 and cfg.train.epochs == 8 and cfg.shared_cache
    assert cfg.backbones == ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"]
    assert (tmp_path / "demo" / "digits" / "train").is_dir()


def test_every_command_resolves_to_a_handler_and_has_help():
    from fusionnet.cli.args import COMMANDS
    from fusionnet.cli.main import build_parser, handler

    assert len(COMMANDS) >= 13
    for name, command in COMMANDS.items():
        assert callable(handler(name)), name
        assert command.help.strip(), name
    help_text = build_parser().format_help()
    assert all(name in help_text for name in COMMANDS)


def test_an_unknown_vote_method_is_bad_input_with_a_suggestion(tmp_path, capsys):
    assert main(["vote", "--method", "gredy", "--val", "a.pt", "b.pt", "--test", "c.pt", "d.pt"]) == 2
    err = capsys.readouterr().err
    assert "unknown ensemble method 'gredy'; did you mean 'greedy'?" in err and "stacking_hgb" in err


def test_an_export_beyond_its_tolerance_fails_and_writes_nothing(tmp_path, capsys, monkeypatch):
    from fusionnet import FusionNet
    from fusionnet.models.factory import save_model
    from fusionnet.models import export

    save_model(FusionNet(backbones=["timm/test_resnet"], num_classes=3), tmp_path / "m.pth")
    (tmp_path / "old.onnx").write_bytes(b"the user's earlier export")
    monkeypatch.setattr(export, "check_onnx", lambda *a: 0.401)  # as if the graph computed something else
    assert main(["export", str(tmp_path / "m.pth"), "--out", str(tmp_path / "old.onnx"), "--size", "32",
                 "--overwrite"]) == 1
    assert "differ from PyTorch's by 4.01e-01" in capsys.readouterr().err
    assert (tmp_path / "old.onnx").read_bytes() == b"the user's earlier export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pth", "old.onnx"]
