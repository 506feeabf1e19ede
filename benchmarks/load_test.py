"""A bounded open-loop load test on loopback: a fixed arrival rate for a fixed time.

    python benchmarks/load_test.py [--rate 1.5] [--duration 60] [--size 512] [--steps 10]

Starts `sd3-server serve --model tiny` as a separate process (so its memory is its own), sends
requests at a constant rate whether or not earlier ones have finished (open loop: a slow server
builds a queue instead of slowing the client down), and reports the status codes, latency
percentiles, the server's resident memory sampled through the run (flat = no leak), and the
ledger audit afterwards. Requests alternate v1 (synchronous) and a v2 submit+poll every fifth.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from decimal import Decimal
from pathlib import Path

import httpx
from pydantic import ValidationError

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from server.schemas import Txt2ImgRequest  # noqa: E402

SLUG = "stable-diffusion-3-medium-txt2img"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def one_request(client: httpx.AsyncClient, i: int, body: dict, key: str) -> tuple[int, float]:
    started = time.perf_counter()
    headers = {"x-api-key": key}
    if i % 5 == 4:  # a v2 job: submit, then poll until it is done
        submitted = await client.post(f"/v2/{SLUG}", json=body, headers=headers)
        if submitted.status_code != 200:
            return submitted.status_code, time.perf_counter() - started
        status_url = submitted.json()["status_url"]
        while True:
            status = await client.get(status_url, headers=headers)
            state = status.json().get("status")
            if state in ("COMPLETED", "FAILED"):
                return (200 if state == "COMPLETED" else status.status_code), time.perf_counter() - started
            await asyncio.sleep(0.1)
    response = await client.post(f"/v1/{SLUG}", json=body, headers=headers)
    return response.status_code, time.perf_counter() - started


def request_body(args: argparse.Namespace) -> dict[str, object]:
    return {
        "prompt": "load test",
        "img_width": args.size,
        "img_height": args.size,
        "num_inference_steps": args.steps,
    }


async def run(args: argparse.Namespace, base_url: str, key: str, pid: int) -> None:
    body = request_body(args)
    results: list[tuple[int, float]] = []
    memory: list[tuple[float, float]] = []
    async with httpx.AsyncClient(base_url=base_url, timeout=600) as client:
        # One warm-up request: first-call allocations are not a leak.
        await one_request(client, 0, {**body, "seed": 0}, key)
        memory.append((0.0, rss_mib(pid)))
        started = time.perf_counter()
        tasks = []
        total = int(args.rate * args.duration)
        for i in range(total):
            # Open loop: the i-th request leaves at i / rate seconds, whatever the server does.
            await asyncio.sleep(max(0.0, started + i / args.rate - time.perf_counter()))
            tasks.append(asyncio.create_task(one_request(client, i, {**body, "seed": i}, key)))
            if i % max(1, int(args.rate * 5)) == 0:
                memory.append((time.perf_counter() - started, rss_mib(pid)))
        results = await asyncio.gather(*tasks)
        memory.append((time.perf_counter() - started, rss_mib(pid)))
        elapsed = time.perf_counter() - started

    codes = Counter(code for code, _ in results)
    latencies = [seconds for code, seconds in results if code == 200]
    print(
        f"{len(results)} requests at {args.rate}/s for {args.duration} s ({args.size}², {args.steps} steps, "
        f"every 5th through v2), finished in {elapsed:.1f} s"
    )
    print(f"status codes: {dict(sorted(codes.items()))}")
    if latencies:
        print(
            f"latency (s): p50 {statistics.median(latencies):.2f}  p90 {percentile(latencies, 0.9):.2f}  "
            f"p99 {percentile(latencies, 0.99):.2f}  max {max(latencies):.2f}"
        )
    rss = [value for _, value in memory]
    print("server RSS (MiB) over time: " + ", ".join(f"{t:.0f}s={v:.0f}" for t, v in memory))
    half = len(rss) // 2
    drift = statistics.mean(rss[half:]) - statistics.mean(rss[:half]) if half else 0.0
    print(f"RSS drift (second half mean − first half mean): {drift:+.1f} MiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rate", type=float, default=1.5, help="requests per second")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of arrivals")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    try:  # a load test of 422s measures nothing: the server's own schema checks the request first
        Txt2ImgRequest.model_validate(request_body(args))
    except ValidationError as exc:
        parser.error(f"--size/--steps make a request the API refuses: {exc}")

    data_dir = Path(tempfile.mkdtemp(prefix="sd3-load-"))
    port = free_port()
    env = {
        **os.environ,
        "SD3_DATA_DIR": str(data_dir),
        "SD3_LOG_LEVEL": "warning",
        "SD3_QUEUE__MAX_PENDING": "1000",
    }
    server = subprocess.Popen(
        [str(Path(sys.executable).with_name("sd3-server")), "serve", "--model", "tiny", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base_url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{base_url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or server.poll() is not None:
                raise SystemExit("the server did not start")
            time.sleep(0.2)
        from server.ledger import Ledger

        ledger = Ledger(f"sqlite:///{(data_dir / 'ledger.sqlite3').resolve()}")
        _, key = ledger.create_key(name="load", credits=Decimal(1000))
        asyncio.run(run(args, base_url, key, server.pid))
        rows = ledger.audit()
        print(f"ledger audit: {'ok' if all(r.ok and r.open_reservations == 0 for r in rows) else 'MISMATCH'}")
    finally:
        server.terminate()
        server.wait(30)


if __name__ == "__main__":
    main()
