"""The HTTP server under load, beside predict's offline rate for the same model in the same run; writes JSON.

    python experiments/bench_serve.py --out runs/bench_serve.json                      # fused Lite0/1/2 at 128 px
    python experiments/bench_serve.py --model runs/demo --clients 16 --seconds 20 ...  # your own model

For each server setting (batching off: ``--max-batch 1``; on: ``--max-batch 16`` with each ``--windows`` delay in
ms) the script starts ``fusionnet serve`` on a free loopback port, lets ``--clients`` concurrent httpx clients post
the same JPEG for ``--seconds`` (after a warm-up), and records throughput, p50/p95/p99 latency and the mean batch
size (from the server's /metrics). The offline rate is ``predict`` over as many copies of the image, batch 16, on
the same machine in the same run: the server's ceiling.

``--flood N`` adds a flood row: N concurrent clients against a server with ``--queue-size 32``; it records how many
requests were refused with 503 and the server's resident memory (VmRSS, sampled every 0.2 s) at rest and at its peak,
to show that a full queue refuses instead of growing.
"""

import argparse
import asyncio
import io
import json
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fusionnet import FusionNet
from fusionnet.models.factory import save_model
from fusionnet.utils.files import atomic_write_json


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(model: str, port: int, max_batch: int, delay_ms: float, threads: int, extra=()) -> subprocess.Popen:
    server = subprocess.Popen([sys.executable, "-m", "fusionnet.cli.main", "serve", model, "--port", str(port),
                               "--max-batch", str(max_batch), "--max-delay-ms", str(delay_ms),
                               "--device", "cpu", *extra], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True)
    for _ in range(240):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=1):
                return server
        except OSError:
            time.sleep(0.5)
    server.kill()
    raise RuntimeError(f"the server did not start: {server.stderr.read()[-2000:]}")


async def drive(port: int, image: bytes, clients: int, seconds: float, warmup: float) -> dict:
    import httpx

    url = f"http://127.0.0.1:{port}/v1/classify"
    latencies, statuses = [], {}
    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=clients)) as client:
        async def one_client(until: float, record: bool) -> None:
            while time.perf_counter() < until:
                t0 = time.perf_counter()
                r = await client.post(url, content=image, headers={"content-type": "image/jpeg"})
                if record:
                    latencies.append(time.perf_counter() - t0)
                    statuses[r.status_code] = statuses.get(r.status_code, 0) + 1

        await asyncio.gather(*[one_client(time.perf_counter() + warmup, False) for _ in range(clients)])
        t0 = time.perf_counter()
        await asyncio.gather(*[one_client(t0 + seconds, True) for _ in range(clients)])
        wall = time.perf_counter() - t0
    q = statistics.quantiles(latencies, n=100)
    return {"requests": len(latencies), "img_s": statuses.get(200, 0) / wall, "statuses": statuses,
            "p50_ms": q[49] * 1e3, "p95_ms": q[94] * 1e3, "p99_ms": q[98] * 1e3}


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def flood(model: str, image: bytes, clients: int, seconds: float) -> dict:
    """N clients against a server whose queue holds 32 images: 503s instead of growing memory."""
    port = free_port()
    server = start(model, port, 16, 10.0, torch.get_num_threads(), ["--queue-size", "32"])
    peak, stop = [], False

    async def sample():
        while not stop:
            peak.append(rss_mb(server.pid))
            await asyncio.sleep(0.2)

    async def run():
        nonlocal stop
        sampler = asyncio.create_task(sample())
        row = await drive(port, image, clients, seconds, 2.0)
        stop = True
        await sampler
        return row
    try:
        rest = rss_mb(server.pid)
        row = asyncio.run(run())
    finally:
        server.terminate()
        server.wait(timeout=60)
    return {**row, "clients": clients, "queue_size": 32, "rss_rest_mb": rest, "rss_peak_mb": max(peak)}


def mean_batch(port: int) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
    total = float(re.search(r"^fusionnet_batch_size_sum ([0-9.e+]+)$", text, re.M).group(1))
    count = float(re.search(r"^fusionnet_batch_size_count ([0-9.e+]+)$", text, re.M).group(1))
    return total / max(count, 1)


def offline_rate(model_path: str, image: bytes, n: int) -> float:
    from fusionnet.serving.serve import ModelHandler

    handler = ModelHandler([model_path], device="cpu")
    x = handler.decode(image)
    batch = torch.stack([x] * 16)
    handler.predict(batch)  # warm-up
    t0 = time.perf_counter()
    for _ in range(max(1, n // 16)):
        handler.predict(batch)
    return 16 * max(1, n // 16) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="what fusionnet serve takes (default: a fused Lite0/1/2)")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--warmup", type=float, default=3)
    ap.add_argument("--windows", type=float, nargs="+", default=[2, 10, 25])
    ap.add_argument("--flood", type=int, default=0, help="also flood a queue of 32 with this many clients (0: no)")
    ap.add_argument("--out", default="runs/bench_serve.json")
    args = ap.parse_args()
    model = args.model
    if model is None:
        torch.manual_seed(0)
        fused = FusionNet(backbones=["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"], num_classes=5,
                          class_names=list("abcde"))
        model = str(save_model(fused, Path(tempfile.mkdtemp()) / "fused.pth"))  # speed does not depend on weights
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (240, 320, 3), dtype=np.uint8)).save(buf, "JPEG")
    image = buf.getvalue()
    result = {"model": model, "clients": args.clients, "seconds": args.seconds, "threads": torch.get_num_threads(),
              "settings": []}
    result["offline_img_s"] = offline_rate(model, image, 256)
    print(f"offline predict: {result['offline_img_s']:.1f} img/s", flush=True)
    for max_batch, delay in [(1, 0.0)] + [(16, w) for w in args.windows]:
        port = free_port()
        server = start(model, port, max_batch, delay, torch.get_num_threads())
        try:
            row = asyncio.run(drive(port, image, args.clients, args.seconds, args.warmup))
            row.update(max_batch=max_batch, max_delay_ms=delay, mean_batch=mean_batch(port))
        finally:
            server.terminate()
            server.wait(timeout=60)
        row["vs_offline"] = row["img_s"] / result["offline_img_s"]
        result["settings"].append(row)
        print(json.dumps(row), flush=True)
        atomic_write_json(args.out, result)
    off = result["settings"][0]["img_s"]
    for row in result["settings"]:
        row["vs_batching_off"] = row["img_s"] / off
    if args.flood:
        result["flood"] = flood(model, image, args.flood, args.seconds)
        print(json.dumps(result["flood"]), flush=True)
    atomic_write_json(args.out, result)


if __name__ == "__main__":
    main()
