"""The Ray Serve path (fusionnet.serving.serve_ray) against a local Ray instance on the loopback address: the same
answers, to 1e-5, as the embedded server, and the same 4xx errors."""

import socket

import httpx
import pytest
import torch

pytest.importorskip("ray.serve")
from fastapi.testclient import TestClient  # noqa: E402

from fusionnet import FusionNet  # noqa: E402
from fusionnet.models.factory import save_model
from fusionnet.serving.serve import Limits, ModelHandler, ServeSettings, create_app  # noqa: E402
from test_serve import CLASSES, _png  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def members(tmp_path):
    paths = []
    for seed, backbone in enumerate(["timm/test_efficientnet", "timm/test_resnet"]):
        torch.manual_seed(seed)
        paths.append(str(save_model(FusionNet(backbones=[backbone], num_classes=3, class_names=CLASSES),
                                    tmp_path / f"m{seed}.pth")))
    return paths


def test_ray_serve_answers_as_the_embedded_server(members, local_ray):
    from ray import serve

    from fusionnet.serving.serve_ray import deploy

    images = [_png(colour=c) for c in ((200, 30, 30), (30, 200, 30), (30, 30, 200), (120, 120, 120))]
    settings = ServeSettings(max_batch=4, max_delay_ms=20)
    limits = Limits(max_bytes=200_000)
    with TestClient(create_app(ModelHandler(members, device="cpu", limits=limits), settings)) as client:
        embedded = [client.post("/v1/classify?top=3&members=1", content=b, headers={"content-type": "image/png"}).json()
                    for b in images]
    port = _free_port()
    try:
        deploy(members, replicas=1, port=port, device="cpu", settings=settings, limits=limits, blocking=False)
        url = f"http://127.0.0.1:{port}"
        with httpx.Client(timeout=60) as http:
            answers = [http.post(f"{url}/v1/classify?top=3&members=1", content=b,
                                 headers={"content-type": "image/png"}) for b in images]
            assert [r.status_code for r in answers] == [200] * len(images)
            for mine, theirs in zip(embedded, (r.json() for r in answers)):
                assert [t["class"] for t in mine["top"]] == [t["class"] for t in theirs["top"]]
                for a, b in zip(mine["top"], theirs["top"]):
                    assert a["prob"] == pytest.approx(b["prob"], abs=1e-5)
                assert mine["members"].keys() == theirs["members"].keys()
            upload = http.post(f"{url}/v1/classify", files={"file": ("a.png", images[0], "image/png")})
            assert upload.status_code == 200
            assert http.get(f"{url}/v1/model").json()["kind"] == "vote"
            # bad input: the same 4xx with a JSON error, and the replica keeps serving
            for kwargs, status in (({"content": b""}, 400), ({"content": b"not an image"}, 415),
                                   ({"content": images[0], "params": {"top": "0"}}, 422),
                                   ({"content": images[0][:60]}, 422), ({"content": b"x" * 300_000}, 413)):
                r = http.post(f"{url}/v1/classify", headers={"content-type": "image/png"}, **kwargs)
                assert r.status_code == status and "error" in r.json(), (kwargs.get("params"), r.text)
            assert http.post(f"{url}/v1/classify", content=images[1],
                             headers={"content-type": "image/png"}).status_code == 200
    finally:
        serve.shutdown()
