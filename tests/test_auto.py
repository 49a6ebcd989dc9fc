"""fusionnet auto: candidates refused before work, screening, greedy selection (a dead trunk and a duplicate never
chosen), the time limit (a fake clock), a usable selected.pth after every stage, and Ray screening = local."""

import json

import pytest
import torch

from fusionnet.cli.main import main
from fusionnet.config import AutoConfig
from fusionnet.data.splits import load_splits
from fusionnet.models.factory import load_fusionnet, save_model
import fusionnet.workflows.auto as auto_run
from fusionnet.workflows.auto.screening import Candidate, ScreenSettings, screen, select
from fusionnet.workflows.auto import run_auto
from toydata import make_splits

TINY = dict(candidates=["timm/test_resnet", "timm/test_efficientnet"], pretrained=False, sizes=[32],
            progress=False, finetune=False)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_splits(tmp_path_factory.mktemp("auto") / "data", per_class=12)


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _planted(tmp_path, data):
    """A member whose trunk gives constant features (every weight 0), and a copy of the timm/test_efficientnet
    candidate's own trunk saved as a member (the same features: a duplicate)."""
    classes = load_splits(data, size=32).class_names
    dead = Candidate("timm/test_resnet", 32).build(classes, taps=0, pretrained=False, seed=0)
    with torch.no_grad():
        for p in dead.branches["test_resnet"].trunk.parameters():
            p.zero_()
    save_model(dead, tmp_path / "dead.pth")
    copy = Candidate("timm/test_efficientnet", 32).build(classes, taps=0, pretrained=False, seed=0)
    save_model(copy, tmp_path / "copy.pth")
    return [str(tmp_path / "dead.pth"), str(tmp_path / "copy.pth")]


def test_auto_never_chooses_a_dead_trunk_or_a_duplicate_and_leaves_a_usable_model(data, tmp_path):
    members = _planted(tmp_path, data)
    cfg = AutoConfig(data=str(data), time_limit="10m", members=members, **TINY)
    report = run_auto(cfg, out=tmp_path / "run", log=lambda _m: None)
    chosen = report["selection"]["steps"][-1]["chosen"] if report["selection"]["steps"] else []
    assert "member:dead@32" not in chosen
    assert not {"member:copy@32", "timm/test_efficientnet@32"} <= set(chosen)  # a duplicate adds nothing
    rows = report["rows"]
    assert {"member:dead@32", "member:copy@32", "timm/test_resnet@32", "timm/test_efficientnet@32"} <= set(rows)
    assert rows["member:dead@32"]["oof_nll"] == pytest.approx(float(torch.log(torch.tensor(3.0))), abs=0.02)
    assert rows["member:copy@32"]["oof_nll"] == pytest.approx(rows["timm/test_efficientnet@32"]["oof_nll"], abs=1e-6)
    # selected.pth: the stage model of lowest validation NLL, answering as its row says
    model = load_fusionnet(tmp_path / "run" / "selected.pth")
    best = rows[report["selected"]]
    assert best["val"]["nll"] == min(r["val"]["nll"] for r in rows.values() if r.get("model"))
    from fusionnet.engine.inference import predict

    splits = load_splits(data, size=32)
    probs, labels = predict(model, splits.val, device="cpu")
    assert float((probs.argmax(1) == labels).double().mean()) == pytest.approx(best["val"]["acc"])
    text = (tmp_path / "run" / "leaderboard.md").read_text()
    assert "**(selected)**" in text and "Greedy selection" in text and (tmp_path / "run" / "pareto.png").is_file()
    assert json.loads((tmp_path / "run" / "results.json").read_text())["selected"] == report["selected"]


def test_selection_follows_the_out_of_fold_nll_and_the_limits(data):
    splits = load_splits(data, size=32)
    settings = ScreenSettings(splits.class_names, taps=0, pretrained=False, seed=0, cache_dir=None, device="cpu")
    screened = [screen(Candidate(b, 32), splits, settings, log=lambda _m: None)
                for b in ("timm/test_resnet", "timm/test_efficientnet")]
    labels = torch.as_tensor(splits.train.labels)
    first = min(screened, key=lambda s: s.oof_nll)
    picked = select(screened, labels, min_gain=0.0, seed=0)
    assert picked.chosen[0] == first.id and picked.steps[0].gain > 0
    assert select(screened, labels, min_gain=10.0, seed=0).chosen == [picked.chosen[0]]  # nothing gains 10 nats
    cheap = min(screened, key=lambda s: s.ms_per_image)
    limited = select(screened, labels, min_gain=0.0, seed=0, max_latency_ms=cheap.ms_per_image * 1.0001)
    assert limited.chosen == [cheap.id] and "within the limits" in limited.stopped


def test_the_time_limit_holds_on_a_fake_clock(data, tmp_path, monkeypatch):
    """Each screening takes 100 fake seconds: with 250 s, the third candidate would pass the limit and is left out;
    the fine-tuning stage, estimated from real step times against the fake time left, is skipped with its reason."""
    clock = FakeClock()
    real = auto_run.screen

    def slow(candidate, splits, settings, log=print):
        result = real(candidate, splits, settings, log)
        clock.now += 100.0
        result.seconds = 100.0
        return result

    monkeypatch.setattr(auto_run, "screen", slow)
    monkeypatch.setattr("fusionnet.workflows.auto.finetune.plan_epochs", lambda *a: 1)  # under MIN_EPOCHS
    cfg = AutoConfig(data=str(data), time_limit="250s", **{**TINY, "sizes": [32, 40], "finetune": True})
    report = run_auto(cfg, out=tmp_path / "run", clock=clock, log=lambda _m: None)
    assert report["seconds"] <= 1.1 * 250
    assert len([r for r in report["rows"].values() if r["kind"] == "trunk"]) == 2
    assert len(report["skipped"]) == 3 and "would pass the time limit" in list(report["skipped"].values())[0]
    assert "fine-tuning" in report["skipped"] and (tmp_path / "run" / "selected.pth").is_file()


def test_the_fine_tuning_stage_runs_when_it_fits(data, tmp_path):
    cfg = AutoConfig(data=str(data), time_limit="10m", **{**TINY, "finetune": True, "min_gain": 0.0, "folds": 2})
    report = run_auto(cfg, out=tmp_path / "run", log=lambda _m: None)
    tuned = [r for r in report["rows"].values() if r["kind"] == "finetuned"]
    assert len(tuned) == 1 and tuned[0]["val"]["nll"] > 0 and report["seconds"] < 600


def test_bad_candidates_are_refused_before_any_work(data, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["auto", "--data", str(data), "--no-pretrained", "--no-progress", "--out", str(out)]
    assert main(args + ["--candidates", "resnet81", "timm/test_resnet", "--members", str(tmp_path / "nope.pth")]) == 2
    err = capsys.readouterr().err
    assert "'resnet81'" in err and "did you mean 'resnet18'" in err and "nope.pth" in err and not out.exists()
    assert main(args + ["--candidates", "timm/test_resnet", "timm/test_resnet"]) == 2
    assert "named more than once" in capsys.readouterr().err and not out.exists()
    assert main(args + ["--candidates", "timm/test_resnet", "--time-limit", "soon"]) == 2
    assert "time limit 'soon' is not a duration" in capsys.readouterr().err


def test_auto_from_the_command_line_and_its_run_folder_everywhere(data, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["auto", "--data", str(data), "--candidates", "timm/test_resnet", "timm/test_efficientnet",
                 "--no-pretrained", "--sizes", "32", "--time-limit", "2m", "--no-finetune", "--no-progress",
                 "--out", str(out)]) == 0
    assert "the model validation chose" in capsys.readouterr().out
    assert main(["predict", str(out), "--images", str(data / "test"), "--out", str(tmp_path / "p.csv")]) == 0
    assert main(["export", str(out), "--out", str(tmp_path / "m.onnx")]) == 0
    from fusionnet.workflows.runs import checkpoints_in

    assert checkpoints_in([str(out)]) == [out / "selected.pth"]  # serve and distill --teacher read the folder so


def test_ray_screening_gives_the_local_results(data, local_ray):
    from fusionnet.workflows.auto.screening import Budget
    from fusionnet.workflows.auto.on_ray import screen_with_ray

    splits = load_splits(data, size=32)
    settings = ScreenSettings(splits.class_names, taps=0, pretrained=False, seed=0, cache_dir=None, device="cpu")
    candidates = [Candidate("timm/test_resnet", 32), Candidate("timm/test_efficientnet", 32)]
    local = [screen(c, splits, settings, log=lambda _m: None) for c in candidates]
    cfg = AutoConfig(data=str(data), **TINY)
    remote = screen_with_ray(candidates, cfg, settings, Budget(600), log=lambda _m: None)
    assert [r.id for r in remote] == [c.id for c in candidates]
    for a, b in zip(local, remote):
        assert a.C == b.C and a.taps == b.taps and a.oof_nll == pytest.approx(b.oof_nll, rel=1e-4)
        assert torch.allclose(a.log_probs["test"], b.log_probs["test"], atol=1e-4)


def _compare(data, out, ray: bool, seeds) -> dict:
    from fusionnet.config import CompareConfig, regime_train_config
    from fusionnet.workflows.compare import compare

    train = regime_train_config("frozen", epochs=1, batch_size=8, progress=False)
    cfg = CompareConfig(data=str(data), backbones=["timm/test_resnet", "timm/test_efficientnet"], size=32,
                        pretrained=False, variants=["late_oof"], seeds=seeds, train=train, ray=ray, out=str(out))
    return compare(cfg, log=None)


def test_compare_with_ray_maps_its_seeds_then_its_members(data, tmp_path, monkeypatch):
    """compare --ray: a task per seed (inside one, members in turn); one seed: a task per member. ray_map runs here
    in this process (a real Ray instance runs auto's screening tasks above), and the tables are the local ones."""
    import fusionnet.workflows.compare as compare

    mapped = []

    def local_map(fn, items, timeout_s=None):
        mapped.append([getattr(i, "name", None) or getattr(i, "train").seed for i in items])
        return [(True, fn(i)) for i in items]

    monkeypatch.setattr(compare, "ray_map", local_map)
    remote = {}
    for seeds in ([0, 1], [0]):
        mapped.clear()
        remote[len(seeds)] = _compare(data, tmp_path / f"ray{len(seeds)}", True, seeds)
        assert mapped == ([[0, 1]] if len(seeds) > 1 else [["timm/test_resnet", "timm/test_efficientnet"]])
    local = _compare(data, tmp_path / "local", False, [0, 1])  # one local run serves both: its seed 0 is [0]'s
    local0 = json.loads((tmp_path / "local" / "seed_0" / "results.json").read_text())
    assert remote[2]["methods"]["soft"]["acc"] == local["methods"]["soft"]["acc"]
    assert remote[1]["methods"]["soft"]["acc"] == local0["methods"]["soft"]["acc"]
    assert remote[1]["methods"]["soft"]["pred"] == local0["methods"]["soft"]["pred"]


def _screened(name: str, log_probs: torch.Tensor, ms: float = 1.0):
    from fusionnet.workflows.auto.screening import Screened

    return Screened(name, Candidate(name, 32), (torch.zeros(3, 1), torch.zeros(3)), 1.0, 0, log_probs.double(),
                    0.0, 0.0, {}, ms, 1000, 1.0)


def test_greedy_selection_adds_the_complementary_trunk_not_a_dead_one_or_a_duplicate():
    """A knows classes 0 and 1 and confuses 2 with 1; B knows class 2 only; dead says the prior; copy is A."""
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(300) % 3

    def informed(knows: set[int]) -> torch.Tensor:
        p = torch.full((300, 3), 1 / 3)
        for i, y in enumerate(labels.tolist()):
            if y in knows and torch.rand(1, generator=g) < 0.9:
                p[i] = 0.05
                p[i, y] = 0.9
            elif y not in knows:  # A says "1" for a 2, as for its own 1s; B cannot tell 0 from 1
                p[i] = torch.tensor([0.05, 0.9, 0.05]) if 2 not in knows else torch.tensor([0.45, 0.45, 0.1])
        return p.log()

    a = informed({0, 1})
    trunks = [_screened("A", a), _screened("B", informed({2})), _screened("dead", torch.full((300, 3), 1 / 3).log()),
              _screened("copy", a.clone())]
    picked = select(trunks, labels, min_gain=0.002, seed=0)
    assert sorted(picked.chosen) == ["A", "B"], picked
    assert picked.steps[1].gain > 0.05 and "lowers the out-of-fold NLL by 0.002" in picked.stopped
    from fusionnet.workflows.auto.screening import finalists

    # validation then chooses among the greedy path's sets and the final set plus each other candidate
    first = picked.chosen[0]
    assert finalists(picked, trunks) == [picked.chosen, picked.chosen + ["dead"], picked.chosen + ["copy"],
                                         [first, "dead"], [first, "copy"]]
    assert finalists(picked, trunks, max_latency_ms=2.5) == [picked.chosen, [first, "dead"], [first, "copy"]]
