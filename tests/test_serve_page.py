"""The upload page at / (fusionnet.serving.serve.PAGE) in headless Chromium: it names the model, uploads a photo and shows
the answer. Runs where Debian's Chromium (or $CHROMIUM) and playwright are installed; skipped elsewhere, saying why."""

import json
import os
import shutil
import socket
import threading
import time

import pytest
import torch

pytest.importorskip("fastapi")
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
CHROMIUM = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
if not CHROMIUM:
    pytest.skip("no Chromium on this machine (apt-get install chromium, or set $CHROMIUM)", allow_module_level=True)

import uvicorn  # noqa: E402

from fusionnet import FusionNet  # noqa: E402
from fusionnet.models.factory import save_model
from fusionnet.serving.serve import Limits, ModelHandler, ServeSettings, create_app  # noqa: E402
from test_serve import CLASSES, _png  # noqa: E402


@pytest.fixture
def server(tmp_path):
    torch.manual_seed(0)
    path = save_model(FusionNet(backbones=["timm/test_efficientnet"], num_classes=3, class_names=CLASSES),
                      tmp_path / "model.pth")
    app = create_app(ModelHandler([str(path)], device="cpu", limits=Limits()), ServeSettings())
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    for _ in range(200):
        if srv.started:
            break
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(timeout=10)


def test_the_page_uploads_a_photo_and_shows_the_answer(server, tmp_path):
    photo = tmp_path / "photo.png"
    photo.write_bytes(_png())
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.goto(server + "/")
            page.wait_for_function("document.getElementById('model').textContent.length > 0")
            assert page.text_content("#model") == "fusionnet: " + ", ".join(CLASSES)
            page.click("#go")  # nothing chosen yet: the page says so instead of sending an empty form
            assert page.text_content("#out") == "choose an image first"
            page.set_input_files("#file", str(photo))
            page.click("#go")
            page.wait_for_function("document.getElementById('out').textContent.includes('top')")
            answer = json.loads(page.text_content("#out"))
        finally:
            browser.close()
    assert [t["class"] for t in answer["top"]] and {t["class"] for t in answer["top"]} <= set(CLASSES)
    assert abs(sum(t["prob"] for t in answer["top"]) - 1) < 1e-4  # all three classes, probabilities summing to 1
