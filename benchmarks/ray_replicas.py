"""Throughput of the plain server against Ray Serve with 1 and 2 CPU replicas of the tiny model.

    python benchmarks/ray_replicas.py [--requests 48] [--clients 8]      # needs the `ray` extra

Each setup gets 2 warm-up requests, 5 requests alone (the single-request latency), then
`--requests` from `--clients` concurrent clients (images/s and p50 latency). The figures in
docs/scale-out.md come from this script. On 2 CPU cores it shows that replicas run in parallel and
what Ray's proxy costs; it says nothing about GPU throughput.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from pathlib import Path

import httpx
from baseline_server import serve_in_thread, stop_server

from server.app import create_app
from server.config import Settings
from server.db.migrations import upgrade_to_head
from server.ledger import Ledger
from server.runtime import load_runtime

BODY = {"prompt": "a lighthouse", "img_width": 512, "img_height": 512, "num_inference_steps": 10}


def load(base: str, key: str, *, requests: int, clients: int) -> str:
    def post(seed: int) -> float:
        started = time.perf_counter()
        response = httpx.post(
            f"{base}/v1/stable-diffusion-3-medium-txt2img",
            json={**BODY, "seed": seed},
            headers={"x-api-key": key},
            timeout=300,
        )
        assert response.status_code == 200, response.text
        return time.perf_counter() - started

    for seed in range(2):
        post(seed)
    alone = statistics.median(post(seed) for seed in range(5))
    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        latencies = list(pool.map(post, range(requests)))
    wall = time.perf_counter() - started
    return (
        f"{requests / wall:6.2f} images/s, p50 {statistics.median(latencies):.2f} s, one alone {alone:.2f} s"
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--clients", type=int, default=8)
    args = parser.parse_args()
    data_dir = Path(tempfile.mkdtemp(prefix="sd3-ray-bench-"))
    database = f"sqlite:///{data_dir / 'ledger.sqlite3'}"
    settings = Settings(data_dir=data_dir, model={"id": "tiny"}, database_url=database)
    upgrade_to_head(database)  # as a server's start-up does, before the key it needs
    _, key = Ledger(database).create_key(name="bench", credits=Decimal(100))

    import torch

    server, thread, base = serve_in_thread(create_app(settings, load_runtime(settings)))
    print(
        f"plain sd3-server (torch {torch.get_num_threads()} threads): "
        f"{load(base, key, requests=args.requests, clients=args.clients)}"
    )
    stop_server(server, thread)

    import ray
    from ray import serve

    from server.ray_app import ScaleOptions, build_app

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        for replicas, cpus in ((1, 2), (2, 1)):
            options = ScaleOptions(replicas=replicas, gpus_per_replica=0, cpus_per_replica=cpus)
            serve.run(build_app(settings, options), name="sd3", route_prefix="/")
            result = load(f"http://127.0.0.1:{port}", key, requests=args.requests, clients=args.clients)
            print(f"Ray, {replicas} replica(s) x {cpus} CPU: {result}")
            serve.delete("sd3")
    finally:
        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    main()
