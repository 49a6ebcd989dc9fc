"""The same model handler scaled out with Ray Serve: ``fusionnet serve MODEL --ray --replicas N``.

Each replica holds a :class:`fusionnet.serving.serve.ModelHandler` (the same loading, decoding limits and batch inference as
the embedded server) and batches with Ray's ``@serve.batch`` (``max_batch`` images, or what arrived within
``max_delay_ms`` of the first). Ray's proxy routes HTTP requests to the replicas, so a Ray cluster of several
machines serves one model behind one address. Routes: ``POST /v1/classify`` (the same answers and 4xx errors as
the embedded server) and ``GET /v1/model``; metrics come from Ray's own dashboard and Prometheus exporter.

Needs the ``ray`` extra: ``pip install "fusionnet[ray]"``.
"""

from __future__ import annotations

from typing import Sequence

import torch
from ray import serve
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse

from fusionnet.serving.serve import (AUTH_ERROR, BadInput, Limits, ModelHandler, ServeSettings, _answer, _upload,
                             authorized, top_k)


@serve.deployment(name="fusionnet")
class ServeReplica:
    """A Ray Serve replica: one ModelHandler, requests batched by ``@serve.batch``."""

    def __init__(self, sources: Sequence[str], device: str, limits: Limits, settings: ServeSettings) -> None:
        self.handler = ModelHandler(list(sources), device=device, limits=limits, plain=settings.plain,
                                    size=settings.size)
        self.settings = settings
        self.run_batch.set_max_batch_size(settings.max_batch)
        self.run_batch.set_batch_wait_timeout_s(settings.max_delay_ms / 1000)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def run_batch(self, images: list[torch.Tensor]) -> list[tuple[torch.Tensor, dict]]:
        probs, parts = await run_in_threadpool(self.handler.predict, torch.stack(images))
        return [(probs[i], {k: v[i] for k, v in parts.items()}) for i in range(len(images))]

    async def __call__(self, request: Request):
        s, path = self.settings, request.url.path.rstrip("/")
        if not authorized(request.headers, s.token):
            return JSONResponse({"error": AUTH_ERROR}, status_code=401)
        if path.endswith("/v1/model") and request.method == "GET":
            return self.handler.info()
        if not (path.endswith("/v1/classify") and request.method == "POST"):
            return JSONResponse({"error": f"no route {request.method} {request.url.path}; POST /v1/classify or "
                                          f"GET /v1/model"}, status_code=404)
        try:
            k = top_k(request.query_params.get("top"), s.top, len(self.handler.class_names))
            image = await run_in_threadpool(self.handler.decode, await _upload(request, self.handler.limits.max_bytes))
        except BadInput as exc:
            return JSONResponse({"error": str(exc)}, status_code=exc.status)
        probs, parts = await self.run_batch(image)
        members = request.query_params.get("members", "0").lower() in ("1", "true", "yes")
        return _answer(self.handler.class_names, probs, parts, k, members)


def deploy(sources: Sequence[str], *, replicas: int = 1, host: str = "127.0.0.1", port: int = 8000,
           device: str = "auto", settings: ServeSettings | None = None, limits: Limits | None = None,
           blocking: bool = True):
    """Start (or join, with ``RAY_ADDRESS``) a Ray instance, deploy ``replicas`` copies of the model behind Ray's
    HTTP proxy on ``host:port`` and, with ``blocking``, serve until interrupted. Returns the deployment handle."""
    import ray

    if not ray.is_initialized():
        ray.init(include_dashboard=False, logging_level="warning")
    serve.start(http_options={"host": host, "port": port})
    app = ServeReplica.options(num_replicas=replicas).bind(list(sources), device, limits or Limits(),
                                                        settings or ServeSettings())
    return serve.run(app, name="fusionnet", route_prefix="/", blocking=blocking)
