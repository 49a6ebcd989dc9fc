"""Serving a fused model, a vote of members or an ONNX export over HTTP: dynamic batching, hard limits, metrics.

Three layers, each usable alone:

* :class:`ModelHandler` knows the model and nothing of HTTP: it loads a fusionnet checkpoint (a FusionNet), several
  member checkpoints (their soft vote) or an ``.onnx`` file (onnxruntime), decodes an upload with hard limits
  (:meth:`ModelHandler.decode`: size, pixel count read from the header before any pixel is decoded, format, truncation)
  and runs a batch (:meth:`ModelHandler.predict`) in the fastest mode measured that matches fp32 on the device (fp32
  channels-last on the CPU, bf16 autocast on CUDA; :func:`fusionnet.engine.inference.predict`).
* :class:`Batcher` queues single images and runs them together, up to ``max_batch`` or ``max_delay_ms`` after the
  first one, whichever comes first, on one inference thread; a full queue refuses at once (:class:`Overloaded`)
  instead of growing without bound.
* :func:`create_app` is the FastAPI app: ``POST /v1/classify`` (multipart upload or raw body; ``?top=k``,
  ``?members=1``), ``GET /v1/model``, ``/health``, ``/ready``, ``/metrics`` (Prometheus) and an upload page at ``/``.
  Every bad input is a 4xx with a JSON ``{"error": ...}``; decoding runs in a thread pool, off the event loop and the
  inference thread. :func:`serve` runs it with uvicorn, on 127.0.0.1 unless a bearer ``token`` (or an explicit
  ``no_auth``) allows another address; SIGTERM lets requests in flight finish, then exits.

Needs the ``serve`` extra: ``pip install "fusionnet[serve]"`` (FastAPI, uvicorn, python-multipart, prometheus-client).
"""


import asyncio
import hashlib
import io
import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from fusionnet.models.losses import soft_vote
from fusionnet.errors import ConfigError

LOOPBACK = ("127.0.0.1", "localhost", "::1")


class BadInput(Exception):
    """An upload the server refuses: ``status`` (4xx) and a message naming the problem."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class Overloaded(Exception):
    """The request queue is full: answer 503 with Retry-After."""


@dataclass
class Limits:
    max_bytes: int = 20 * 2 ** 20  # an upload's size
    max_pixels: int = 40_000_000  # width x height, read from the header before decoding (decompression bombs)


# ---- the model ---------------------------------------------------------------------------------------------------
class ModelHandler:
    """A model to serve, with its decoding and batch inference; see the module docstring."""

    def __init__(self, sources: Sequence[str], *, device: str = "auto", limits: Limits | None = None) -> None:
        from fusionnet.utils.distributed import resolve_device

        if not sources:
            raise ConfigError("serve needs a model: a checkpoint, several member checkpoints, or an .onnx file")
        paths = [Path(s) for s in sources]
        for p in paths:
            if not p.is_file():
                raise ConfigError(f"model file {str(p)!r} not found")
        self.paths, self.limits = paths, limits or Limits()
        self.device = resolve_device(device)
        self.onnx = paths[0].suffix == ".onnx"
        if self.onnx:
            if len(paths) > 1:
                raise ConfigError("serve takes one .onnx file (an export of one model), not several")
            self._load_onnx(paths[0])
        else:
            self._load_checkpoints(paths)
        self.hash = _sha256(paths)
        from fusionnet.data.transforms import eval_transform

        self.transform = eval_transform(self.size)

    def _load_checkpoints(self, paths: list[Path]) -> None:
        from fusionnet.models.factory import load_fusionnet

        self.models = [load_fusionnet(p).eval().to(self.device) for p in paths]
        names = [m.class_names for m in self.models]
        if any(n is None for n in names) or any(n != names[0] for n in names):
            raise ConfigError(f"the members disagree on their classes (or do not know them): {names}")
        self.class_names = list(names[0])
        from fusionnet.models.checkpoints import read_checkpoint

        self.size = int((read_checkpoint(paths[0]).get("data") or {}).get("input_size") or 128)
        if self.device.type == "cpu":  # predict's fastest correct CPU mode
            for m in self.models:
                m.to(memory_format=torch.channels_last)
        self.backbones = [[br.cfg.backbone for br in m.branches.values()] for m in self.models]
        self.member_names = [p.parent.name if p.name in ("best.pth", "final.pth") else p.stem for p in paths]

    def _load_onnx(self, path: Path) -> None:
        import onnxruntime as ort

        self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        meta = self.session.get_modelmeta().custom_metadata_map
        if "class_names" not in meta:
            raise ConfigError(f"{str(path)!r} carries no class names; export it with fusionnet export")
        self.class_names = json.loads(meta["class_names"])
        self.size = int(meta.get("input_size", 224))
        self.backbones, self.member_names, self.models = [], [path.stem], []

    def info(self) -> dict:
        kind = "onnx" if self.onnx else ("vote" if len(self.models) > 1 else "fusionnet")
        return {"kind": kind, "classes": self.class_names, "backbones": self.backbones, "input_size": self.size,
                "members": self.member_names if kind == "vote" else [], "sha256": self.hash,
                "device": str(self.device)}

    def decode(self, data: bytes) -> torch.Tensor:
        """An upload as a (3, size, size) tensor in [0, 1]; :class:`BadInput` names whatever is wrong with it."""
        from PIL import Image, ImageOps, UnidentifiedImageError

        if not data:
            raise BadInput(400, "empty body: send an image file (multipart field 'file', or the raw bytes)")
        if len(data) > self.limits.max_bytes:
            raise BadInput(413, f"the upload is {len(data)} bytes; the limit is {self.limits.max_bytes}")
        try:
            with Image.open(io.BytesIO(data)) as img:
                pixels = img.size[0] * img.size[1]  # from the header: nothing decoded yet
                if pixels > self.limits.max_pixels:
                    raise BadInput(413, f"the image is {img.size[0]} x {img.size[1]} = {pixels} pixels; the limit is "
                                        f"{self.limits.max_pixels} (a decompression bomb, or resize it first)")
                img.load()
                rgb = np.asarray(ImageOps.exif_transpose(img).convert("RGB"))
        except BadInput:
            raise
        except UnidentifiedImageError:
            raise BadInput(415, "not an image PIL can read (send a JPEG, PNG, WebP, BMP, GIF or TIFF file)") from None
        except (OSError, ValueError, SyntaxError) as exc:  # truncated data, broken chunks, unsupported modes
            raise BadInput(422, f"the image could not be decoded: {exc}") from None
        except Image.DecompressionBombError as exc:
            raise BadInput(413, str(exc)) from None
        from fusionnet.data.transforms import apply_transform

        return apply_transform(self.transform, rgb)

    @torch.no_grad()
    def predict(self, batch: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(probabilities (B, K), {member or branch: probabilities (B, K)}) for images (B, 3, size, size)."""
        if self.onnx:
            logits = self.session.run(None, {self.session.get_inputs()[0].name: batch.numpy()})[0]
            return torch.from_numpy(logits).float().softmax(1), {}
        from fusionnet.utils.distributed import autocast

        x = batch.to(self.device)
        if self.device.type == "cpu":
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(self.device, "auto"):
            outputs = [m.forward_output(x) for m in self.models]
        if len(self.models) > 1:
            each = {n: o.logits.float().softmax(1).cpu() for n, o in zip(self.member_names, outputs)}
            return soft_vote(torch.stack(list(each.values()))), each
        out = outputs[0]
        parts = {n: a.float().softmax(1).cpu() for n, a in out.aux.items()}
        branch = out.extras.get("branch_logits")  # late / stacked fusion: each branch's own classifier (B, M, K)
        if branch is not None:
            parts.update({n: branch[:, j].float().softmax(1).cpu() for j, n in enumerate(self.models[0].branches)})
        return out.logits.float().softmax(1).cpu(), parts


def _sha256(paths: Sequence[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


# ---- dynamic batching --------------------------------------------------------------------------------------------
class Batcher:
    """Single images in, batches out: up to ``max_batch`` images, or what arrived within ``max_delay_ms`` of the
    first one; one inference thread; at most ``queue_size`` waiting images (then :class:`Overloaded`)."""

    def __init__(self, handler: ModelHandler, *, max_batch: int = 16, max_delay_ms: float = 5.0,
                 queue_size: int = 256, on_batch=None) -> None:
        self.handler, self.max_batch, self.delay = handler, max_batch, max_delay_ms / 1000
        self.queue: asyncio.Queue | None = None
        self.queue_size = queue_size
        self.on_batch = on_batch or (lambda n, seconds: None)
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inference")
        self.task: asyncio.Task | None = None

    def start(self) -> None:
        self.queue = asyncio.Queue(maxsize=self.queue_size)
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
        self.executor.shutdown(wait=True)

    @property
    def depth(self) -> int:
        return self.queue.qsize() if self.queue is not None else 0

    async def submit(self, image: torch.Tensor) -> tuple[torch.Tensor, dict]:
        future = asyncio.get_running_loop().create_future()
        try:
            self.queue.put_nowait((image, future))
        except asyncio.QueueFull:
            raise Overloaded(f"{self.queue_size} images are waiting already") from None
        return await future

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            items = [await self.queue.get()]
            deadline = loop.time() + self.delay
            while len(items) < self.max_batch:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    items.append(await asyncio.wait_for(self.queue.get(), remaining))
                except asyncio.TimeoutError:
                    break
            t0 = time.perf_counter()
            try:
                probs, parts = await loop.run_in_executor(self.executor, self.handler.predict,
                                                          torch.stack([image for image, _ in items]))
            except Exception as exc:  # noqa: BLE001  (an inference failure answers every waiting request)
                for _, future in items:
                    if not future.done():
                        future.set_exception(exc)
                continue
            self.on_batch(len(items), time.perf_counter() - t0)
            for i, (_, future) in enumerate(items):
                if not future.done():
                    future.set_result((probs[i], {k: v[i] for k, v in parts.items()}))


# ---- the HTTP app ------------------------------------------------------------------------------------------------
@dataclass
class ServeSettings:
    max_batch: int = 16
    max_delay_ms: float = 5.0
    queue_size: int = 256
    top: int = 5
    token: str | None = None


PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>fusionnet</title></head><body>
<h1>fusionnet</h1><p id="model"></p>
<input type="file" id="file" accept="image/*"> <button id="go">Classify</button>
<pre id="out"></pre>
<script>
fetch('v1/model').then(r => r.json()).then(m => {
  document.getElementById('model').textContent = m.kind + ': ' + m.classes.join(', ');
});
document.getElementById('go').onclick = async () => {
  const f = document.getElementById('file').files[0];
  if (!f) { document.getElementById('out').textContent = 'choose an image first'; return; }
  const body = new FormData(); body.append('file', f);
  const r = await fetch('v1/classify?members=1', {method: 'POST', body});
  document.getElementById('out').textContent = JSON.stringify(await r.json(), null, 2);
};
</script></body></html>"""


class _Metrics:
    """The server's Prometheus metrics, in a registry of its own (one per app)."""

    def __init__(self, depth) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter("fusionnet_requests", "classify requests by HTTP status", ["status"],
                                registry=self.registry)
        self.latency = Histogram("fusionnet_request_seconds", "classify latency", registry=self.registry,
                                 buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10))
        self.batch_sizes = Histogram("fusionnet_batch_size", "images per model call", registry=self.registry,
                                     buckets=(1, 2, 4, 8, 16, 32, 64, 128))
        Gauge("fusionnet_queue_depth", "images waiting for the model", registry=self.registry).set_function(depth)


def _answer(class_names: list[str], probs: torch.Tensor, parts: dict, k: int, members: bool) -> dict:
    """The JSON body of a classification: the top ``k`` classes, and each member's or branch's top class."""
    values, index = probs.topk(k)
    body = {"top": [{"class": class_names[i], "prob": float(p)} for p, i in zip(values, index.tolist())]}
    if members:
        body["members"] = {name: {"class": class_names[int(p.argmax())], "prob": float(p.max())}
                           for name, p in parts.items()}
    return body


AUTH_ERROR = "missing or wrong bearer token (send 'Authorization: Bearer <token>')"


def authorized(headers, token: str | None) -> bool:
    """Whether a request's headers carry the bearer ``token`` (always, when the server has none)."""
    return not token or headers.get("authorization") == f"Bearer {token}"


def top_k(value, default: int, classes: int) -> int:
    """``?top=`` as a number of classes (at most ``classes``; ``default`` when not given); :class:`BadInput` (422)
    unless it is a whole number >= 1."""
    if value is None:
        return min(default, classes)
    text = str(value)
    if not text.lstrip("-").isdigit() or int(text) < 1:
        raise BadInput(422, f"top must be a whole number >= 1, got {text!r}")
    return min(int(text), classes)


def _info_routes(app, handler: ModelHandler, state: dict, registry) -> None:
    """``GET /v1/model``, ``/health``, ``/ready`` (503 until the batcher runs), ``/metrics`` and the page at ``/``."""
    from fastapi.responses import HTMLResponse, JSONResponse, Response
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    @app.get("/v1/model")
    async def model_info():
        return handler.info()

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/ready")
    async def ready():
        return {"ready": True} if state["ready"] else JSONResponse({"ready": False}, status_code=503)

    @app.get("/metrics")
    async def prometheus():
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return PAGE


def create_app(handler: ModelHandler, settings: ServeSettings | None = None):
    """The FastAPI app serving ``handler``; see the module docstring."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse
    from starlette.concurrency import run_in_threadpool

    s = settings or ServeSettings()
    batcher = Batcher(handler, max_batch=s.max_batch, max_delay_ms=s.max_delay_ms, queue_size=s.queue_size,
                      on_batch=lambda n, _seconds: metrics.batch_sizes.observe(n))
    metrics = _Metrics(lambda: batcher.depth)
    state = {"ready": False}

    @asynccontextmanager
    async def lifespan(_app):
        batcher.start()
        state["ready"] = True
        yield
        state["ready"] = False
        await batcher.stop()

    app = FastAPI(title="fusionnet", lifespan=lifespan)
    app.state.batcher = batcher

    def error(status: int, message: str, headers: dict | None = None):
        metrics.requests.labels(str(status)).inc()
        return JSONResponse({"error": message}, status_code=status, headers=headers)

    @app.middleware("http")
    async def auth(request: Request, call_next):
        if request.url.path not in ("/health", "/ready") and not authorized(request.headers, s.token):
            return error(401, AUTH_ERROR)
        return await call_next(request)

    @app.post("/v1/classify")
    async def classify(request: Request, top: int | None = None, members: bool = False):
        t0 = time.perf_counter()
        try:
            k = top_k(top, s.top, len(handler.class_names))
            data = await _upload(request, handler.limits.max_bytes)
            image = await run_in_threadpool(handler.decode, data)
            probs, parts = await batcher.submit(image)
        except BadInput as exc:
            return error(exc.status, str(exc))
        except Overloaded as exc:
            return error(503, f"the server is at capacity ({exc}); retry shortly", {"Retry-After": "1"})
        body = _answer(handler.class_names, probs, parts, k, members)
        metrics.latency.observe(time.perf_counter() - t0)
        metrics.requests.labels("200").inc()
        return body

    _info_routes(app, handler, state, metrics.registry)
    return app


IMAGE_TYPES = ("image/", "application/octet-stream")


async def _upload(request, max_bytes: int) -> bytes:
    """The image bytes of a multipart upload (the first file field) or a raw body, read up to ``max_bytes``."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > max_bytes + 4096:
        raise BadInput(413, f"the request is {length} bytes; the limit is {max_bytes}")
    ctype = request.headers.get("content-type", "")
    if ctype.startswith("multipart/form-data"):
        form = await request.form()
        files = [v for v in form.values() if hasattr(v, "read")]
        if not files:
            raise BadInput(422, "the multipart form has no file field; send the image as 'file'")
        return await files[0].read()
    if not ctype or ctype.startswith(IMAGE_TYPES):
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_bytes:
                raise BadInput(413, f"the upload is over the limit of {max_bytes} bytes")
            chunks.append(chunk)
        return b"".join(chunks)
    raise BadInput(415, f"content type {ctype!r} is not an image; send multipart/form-data with a file field, or the "
                        f"raw image as image/* or application/octet-stream")


def serve(sources: Sequence[str], *, host: str = "127.0.0.1", port: int = 8000, token: str | None = None,
          no_auth: bool = False, device: str = "auto", settings: ServeSettings | None = None,
          limits: Limits | None = None) -> None:
    """Run the app with uvicorn until SIGTERM / Ctrl-C (requests in flight finish first)."""
    import uvicorn

    check_bind(host, token, no_auth)
    s = settings or ServeSettings()
    s.token = token
    handler = ModelHandler(sources, device=device, limits=limits)
    app = create_app(handler, s)
    uvicorn.run(app, host=host, port=port, timeout_graceful_shutdown=30, limit_concurrency=4 * s.queue_size,
                timeout_keep_alive=5, log_level="warning")


def check_bind(host: str, token: str | None, no_auth: bool) -> None:
    if host not in LOOPBACK and not token and not no_auth:
        raise ConfigError(f"--host {host!r} lets other machines reach the server; give --token SECRET (clients send "
                          f"'Authorization: Bearer SECRET') or pass --no-auth to serve without one")

