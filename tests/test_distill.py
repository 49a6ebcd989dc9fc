"""Distillation (fusionnet.workflows.distill, callbacks.Distillation): same views, a detached teacher, clear refusals."""

import json

import pytest
import torch
from torch import nn

from fusionnet import FusionNet
from fusionnet.models.factory import save_model
from fusionnet.engine.callbacks import Distillation, distillation_loss
from fusionnet.config import DistillConfig, distill_train_config
from fusionnet.data.splits import load_splits
from fusionnet.workflows.distill import Teacher, distill, load_teacher
from fusionnet.errors import ConfigError
from fusionnet.engine.train import TrainConfig, fit
from toydata import make_splits

TINY = "timm/test_efficientnet"


@pytest.fixture
def data(tmp_path):
    return make_splits(tmp_path / "data")


def _cfg(**kw):
    return TrainConfig(**{**dict(epochs=2, batch_size=8, lr=3e-3, progress=False, warmup_epochs=0, seed=0), **kw})


class Spy(nn.Module):
    """A linear classifier that records the inputs it sees (training mode only) and returns fixed or own logits."""

    def __init__(self, constant=None):
        super().__init__()
        self.fc = nn.Linear(3 * 32 * 32, 3)
        self.constant = constant
        self.seen = []

    def forward(self, x):
        self.seen.append(x.detach().clone())
        if self.constant is not None:
            return self.constant.to(x.device).expand(len(x), -1)
        return self.fc(x.flatten(1))


def test_teacher_and_student_see_the_same_view_and_the_teacher_gets_no_gradient(data):
    splits = load_splits(data, size=32, val_fraction=0.25)
    teacher, student = Spy(), Spy()
    fit(student, splits.train, splits.val, _cfg(epochs=1, mixup=0.4), callbacks=[Distillation(teacher)], log=None)
    steps = len(teacher.seen)
    assert steps >= 2 and all(torch.equal(a, b) for a, b in zip(teacher.seen, student.seen[:steps]))
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())


def test_a_student_of_a_constant_teacher_learns_the_constant(data):
    splits = load_splits(data, size=32, val_fraction=0.25)
    constant = torch.tensor([[2.0, 0.0, -1.0]])
    student = Spy()
    fit(student, splits.train, splits.val, _cfg(epochs=12, lr=1e-2),
        callbacks=[Distillation(Spy(constant), temperature=2.0)], log=None)
    with torch.no_grad():
        probs = student(torch.stack([splits.val[i][0] for i in range(len(splits.val))])).softmax(1).mean(0)
    torch.testing.assert_close(probs, constant.softmax(1)[0], atol=0.03, rtol=0)


def test_the_kl_term_is_zero_at_the_teacher_and_its_gradient_reaches_only_the_student():
    s = torch.randn(4, 3, requires_grad=True)
    t = torch.randn(4, 3, requires_grad=True)
    assert float(distillation_loss(t.detach().clone(), t.detach(), 2.0)) == pytest.approx(0, abs=1e-6)
    distillation_loss(s, t, 2.0).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0 and t.grad is None


def test_a_soft_vote_teacher_averages_probabilities_in_the_datas_class_order():
    a, b = Spy(torch.tensor([[0.0, 1.0, 2.0]])), Spy(torch.tensor([[2.0, 1.0, 0.0]]))
    teacher = Teacher([a, b], order=[2, 1, 0])
    probs = teacher(torch.rand(2, 3, 32, 32)).softmax(1)
    expected = (torch.tensor([[0.0, 1.0, 2.0]]).softmax(1) + torch.tensor([[2.0, 1.0, 0.0]]).softmax(1)) / 2
    torch.testing.assert_close(probs, expected[:, [2, 1, 0]].expand(2, -1))


def test_bad_teachers_and_students_are_refused_before_training(data, tmp_path):
    other = save_model(FusionNet(backbones=[TINY], num_classes=2, class_names=["cat", "dog"]), tmp_path / "o.pth")
    with pytest.raises(ConfigError, match=r"trained on classes \['cat', 'dog'\], the data has"):
        load_teacher([str(other)], ["blue", "green", "red"])
    with pytest.raises(FileNotFoundError, match="is neither a checkpoint, a model folder .* nor a run folder"):
        load_teacher([str(tmp_path / "nothing")], ["a", "b"])
    splits = load_splits(data, size=32)
    good = save_model(FusionNet(backbones=[TINY], num_classes=3, class_names=splits.class_names), tmp_path / "t.pth")
    cfg = DistillConfig(teacher=[str(good)], data=str(data), student="resnet81", size=32, pretrained=False,
                        out=str(tmp_path / "run"), train=distill_train_config(epochs=1, progress=False))
    with pytest.raises(ValueError, match="resnet81"):
        distill(cfg, log=None)
    assert not (tmp_path / "run").exists()  # nothing trained, nothing written
    with pytest.raises(ConfigError, match="temperature must be a number > 0"):
        DistillConfig(teacher=["t.pth"], data="d", temperature=0)


def test_distill_writes_a_student_and_a_label_baseline_with_their_costs(data, tmp_path):
    splits = load_splits(data, size=32)
    teacher = FusionNet(backbones=[TINY, "timm/test_resnet"], num_classes=3, class_names=splits.class_names)
    path = save_model(teacher, tmp_path / "teacher.pth")
    cfg = DistillConfig(teacher=[str(path)], data=str(data), student=TINY, size=32, pretrained=False,
                        out=str(tmp_path / "run"), train=distill_train_config(epochs=1, batch_size=8, progress=False))
    report = distill(cfg, log=None)
    rows = report["rows"]
    assert set(rows) == {"teacher", f"student {TINY} (distilled)", f"student {TINY} (labels)"}
    assert rows["teacher"]["time_vs_teacher"] == pytest.approx(1.0)
    assert rows[f"student {TINY} (distilled)"]["params"] < rows["teacher"]["params"]
    assert json.loads((tmp_path / "run" / "distill.json").read_text())["budget"]["student"] == TINY
    assert "| teacher |" in (tmp_path / "run" / "distill.md").read_text()


# ---- test-time augmentation -------------------------------------------------------------------------------------
class MirrorInvariant(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3 * 32 * 32, 3)

    def forward(self, x):
        return self.fc((x + x.flip(-1)).flatten(1))


@pytest.mark.parametrize("space", ["prob", "logit"])
def test_flip_tta_of_a_flip_invariant_model_equals_the_model(data, space):
    from fusionnet.engine.inference import predict

    splits = load_splits(data, size=32)
    torch.manual_seed(0)
    model = MirrorInvariant()
    plain, _ = predict(model, splits.val, device="cpu")
    flipped, _ = predict(model, splits.val, device="cpu", tta="flip", tta_space=space)
    torch.testing.assert_close(flipped, plain, atol=1e-6, rtol=0)
    zoomed, _ = predict(model, splits.val, device="cpu", tta="flip-zoom", tta_space=space)
    assert not torch.allclose(zoomed, plain) and torch.allclose(zoomed.sum(1), torch.ones(len(zoomed)))


def test_tta_settings_are_checked():
    from fusionnet.data.tta import check_tta

    with pytest.raises(ConfigError, match="unknown test-time augmentation 'rotate'; choose one of flip, flip-zoom"):
        check_tta("rotate", "prob")
    with pytest.raises(ConfigError, match="unknown TTA averaging space 'mean'"):
        check_tta("flip", "mean")
