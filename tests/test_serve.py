"""The HTTP server (fusionnet.serving.serve): answers, every bad input as a 4xx that leaves it serving, batching, limits."""

import asyncio
import io
import struct
import threading
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from fusionnet import FusionNet  # noqa: E402
from fusionnet.models.factory import save_model
from fusionnet.errors import ConfigError  # noqa: E402
from fusionnet.serving.serve import Batcher, Limits, ModelHandler, Overloaded, ServeSettings, check_bind, create_app  # noqa: E402

CLASSES = ["blue", "green", "red"]


@pytest.fixture
def checkpoint(tmp_path):
    torch.manual_seed(0)
    return save_model(FusionNet(backbones=["timm/test_efficientnet"], num_classes=3, class_names=CLASSES),
                      tmp_path / "model.pth")


def _png(w=40, h=30, colour=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((h, w, 3), colour, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _bomb_png(side=50_000) -> bytes:
    """A PNG whose header says side x side pixels: a few hundred bytes (decoding it would need gigabytes)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 1000)) + \
        chunk(b"IEND", b"")


def _client(paths, **settings):
    handler = ModelHandler([str(p) for p in paths], device="cpu", limits=Limits(max_bytes=200_000))
    return TestClient(create_app(handler, ServeSettings(**settings)))


def test_classify_a_photo_as_upload_and_as_raw_body(checkpoint):
    with _client([checkpoint]) as client:
        r = client.post("/v1/classify?top=2", files={"file": ("a.png", _png(), "image/png")})
        assert r.status_code == 200
        top = r.json()["top"]
        assert len(top) == 2 and {t["class"] for t in top} <= set(CLASSES) and top[0]["prob"] >= top[1]["prob"]
        raw = client.post("/v1/classify?top=2", content=_png(), headers={"content-type": "image/png"})
        assert raw.json() == r.json()
        info = client.get("/v1/model").json()
        assert info["classes"] == CLASSES and info["kind"] == "fusionnet" and len(info["sha256"]) == 64
        assert client.get("/health").json() == {"status": "ok"} and client.get("/ready").status_code == 200
        assert "fusionnet" in client.get("/").text


BAD = [
    ("empty body", b"", "image/png", 400),
    ("wrong content type", b'{"image": 1}', "application/json", 415),
    ("not an image", b"hello, this is text" * 10, "image/png", 415),
    ("truncated PNG", _png(400, 300, (1, 2, 3))[:200], "image/png", 422),
    ("decompression bomb", _bomb_png(), "image/png", 413),
    ("too large", b"\0" * 300_000, "application/octet-stream", 413),
]


def test_every_bad_input_is_a_4xx_with_a_json_error_and_the_server_keeps_serving(checkpoint):
    with _client([checkpoint]) as client:
        for name, body, ctype, status in BAD:
            r = client.post("/v1/classify", content=body, headers={"content-type": ctype})
            assert r.status_code == status, (name, r.status_code, r.text)
            assert isinstance(r.json()["error"], str) and r.json()["error"], name
            assert client.post("/v1/classify", content=_png(), headers={"content-type": "image/png"}).status_code == 200
        r = client.post("/v1/classify", files={"other": (None, "text")})
        assert r.status_code == 422 and "file" in r.json()["error"]
        for top in ("0", "-2"):  # not a silent fall-back to the default
            r = client.post(f"/v1/classify?top={top}", content=_png(), headers={"content-type": "image/png"})
            assert r.status_code == 422 and "top must be" in r.json()["error"]
        metrics = client.get("/metrics").text
        assert 'fusionnet_requests_total{status="413"} 2.0' in metrics and "fusionnet_batch_size_bucket" in metrics


def test_a_vote_of_members_answers_with_each_members_class(checkpoint, tmp_path):
    torch.manual_seed(1)
    other = save_model(FusionNet(backbones=["timm/test_resnet"], num_classes=3, class_names=CLASSES),
                       tmp_path / "b.pth")
    with _client([checkpoint, other]) as client:
        body = client.post("/v1/classify?members=1", content=_png(), headers={"content-type": "image/png"}).json()
        assert set(body["members"]) == {"model", "b"} and client.get("/v1/model").json()["kind"] == "vote"


def test_the_batcher_runs_waiting_images_together_and_refuses_when_full(checkpoint):
    handler = ModelHandler([str(checkpoint)], device="cpu")
    seen = []

    async def burst():
        batcher = Batcher(handler, max_batch=8, max_delay_ms=200, queue_size=64, on_batch=lambda n, s: seen.append(n))
        batcher.start()
        image = handler.decode(_png())
        results = await asyncio.gather(*[batcher.submit(image) for _ in range(8)])
        await batcher.stop()
        return results

    results = asyncio.run(burst())
    assert seen == [8]  # one model call for the eight requests
    assert all(torch.allclose(r[0], results[0][0]) for r in results)

    gate = threading.Event()
    slow = ModelHandler([str(checkpoint)], device="cpu")
    real = slow.predict
    slow.predict = lambda batch: (gate.wait(10), real(batch))[1]

    async def flood():
        batcher = Batcher(slow, max_batch=1, max_delay_ms=0, queue_size=2)
        batcher.start()
        image = slow.decode(_png())
        first = asyncio.ensure_future(batcher.submit(image))
        await asyncio.sleep(0.05)  # the first is in the model, the queue is empty
        waiting = [asyncio.ensure_future(batcher.submit(image)) for _ in range(2)]
        await asyncio.sleep(0)
        with pytest.raises(Overloaded):
            await batcher.submit(image)
        gate.set()
        await asyncio.gather(first, *waiting)
        await batcher.stop()

    asyncio.run(flood())


def test_binding_beyond_loopback_needs_a_token_and_the_token_is_checked(checkpoint):
    check_bind("127.0.0.1", None, False)
    with pytest.raises(ConfigError, match="give --token SECRET .* or pass --no-auth"):
        check_bind("0.0.0.0", None, False)
    check_bind("0.0.0.0", "s3cret", False)
    with _client([checkpoint], token="s3cret") as client:
        assert client.post("/v1/classify", content=_png(), headers={"content-type": "image/png"}).status_code == 401
        ok = client.post("/v1/classify", content=_png(),
                         headers={"content-type": "image/png", "authorization": "Bearer s3cret"})
        assert ok.status_code == 200 and client.get("/health").status_code == 200


def test_sigterm_lets_a_request_in_flight_finish_then_exits(checkpoint, tmp_path):
    """A request waiting in a long batch window when SIGTERM arrives still gets its 200; then the server exits."""
    import socket
    import subprocess
    import sys

    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "fusionnet", "serve", str(checkpoint), "--port", str(port),
                               "--device", "cpu", "--max-batch", "64", "--max-delay-ms", "3000"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if httpx.get(url + "/ready", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if server.poll() is not None:
                pytest.fail(server.stderr.read()[-2000:])
            threading.Event().wait(0.1)
        answer = {}

        def classify():
            answer["r"] = httpx.post(url + "/v1/classify", content=_png(), headers={"content-type": "image/png"},
                                     timeout=30)
        client = threading.Thread(target=classify)
        client.start()
        threading.Event().wait(1.0)  # the request now waits in the 3-second batch window
        server.terminate()
        client.join(timeout=30)
        assert answer["r"].status_code == 200 and answer["r"].json()["top"]
        assert server.wait(timeout=30) in (0, -15)
    finally:
        if server.poll() is None:
            server.kill()
