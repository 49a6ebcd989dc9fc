"""Serving a fused model, a vote of members or an ONNX export over HTTP: dynamic batching, hard limits, metrics.

Three layers, each usable alone:

* :class:`~fusionnet.serving.model.ModelHandler` knows the model and nothing of HTTP: it loads a fusionnet checkpoint (a FusionNet), several
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
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Sequence

import torch

from fusionnet.config import PlainConfig
from fusionnet.errors import ConfigError
from fusionnet.serving.model import BadInput, Limits, ModelHandler  # noqa: F401  (re-exported: the model's module)

LOOPBACK = ("127.0.0.1", "localhost", "::1")


class Overloaded(Exception):
    """The request queue is full: answer 503 with Retry-After."""


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
    plain: PlainConfig | None = None  # how plain state-dict members were trained (fusionnet.models.plain)
    size: int | None = None  # the input size (default: what the model records, else 128)


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
    handler = ModelHandler(sources, device=device, limits=limits, plain=s.plain, size=s.size)
    app = create_app(handler, s)
    uvicorn.run(app, host=host, port=port, timeout_graceful_shutdown=30, limit_concurrency=4 * s.queue_size,
                timeout_keep_alive=5, log_level="warning")


def check_bind(host: str, token: str | None, no_auth: bool) -> None:
    if host not in LOOPBACK and not token and not no_auth:
        raise ConfigError(f"--host {host!r} lets other machines reach the server; give --token SECRET (clients send "
                          f"'Authorization: Bearer SECRET') or pass --no-auth to serve without one")

