"""Throughput with 4 concurrent clients, batching on vs off.

    python benchmarks/throughput.py [--clients 4] [--requests 4] [--rounds 6] [--batch 4] [--data-dir DIR]

Two real uvicorn servers share one loaded tiny SD3 (read-only weights; the generator is
thread-safe) and differ only in `queue.max_batch_images`: 1 (batching off, the default setting) and
`--batch` (4). Each round, `--clients` threads start together behind a barrier and each sends
`--requests` requests one after the other (512x512, 10 steps, CFG 5, DPM++ 2M — deterministic, so
batchable — the same parameters, a different prompt and seed per request). Rounds alternate which
server goes first, so the noise of this shared machine hits both alike. Prints images/s (median of
the per-round figures and overall), p50/p90 request latency, the speed-up, and how many sampling
batches of each size the batching server ran (counted by a wrapper around the generator).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path

import httpx
from baseline_server import serve_in_thread, stop_server
from server_overhead import machine_line, percentile

from pipelines.request import GenerationRequest, GenerationResult
from server.app import create_app
from server.config import Settings
from server.ledger import Ledger
from server.queue import BatchGenerator
from server.runtime import Runtime, load_runtime

SLUG = "stable-diffusion-3-medium-txt2img"
BODY = {
    "negative_prompt": "",
    "samples": 1,
    "scheduler": "DPM++ 2M",
    "num_inference_steps": 10,
    "guidance_scale": 5,
    "img_width": 512,
    "img_height": 512,
    "base64": False,
}


class CountingGenerator:
    """Records the image count of every sampling batch the queue hands to the generator."""

    def __init__(self, inner: BatchGenerator) -> None:
        self.inner = inner
        self.batches: Counter[int] = Counter()

    def generate_batch(
        self, requests: list[GenerationRequest], *, callback: Callable[[int, int], None] | None = None
    ) -> list[GenerationResult]:
        self.batches[sum(r.samples for r in requests)] += 1
        return self.inner.generate_batch(requests, callback=callback)

    def count_tokens(self, text: str) -> int:
        # The server counts every prompt's tokens before admitting it (limits.max_prompt_tokens).
        return self.inner.count_tokens(text)


@dataclass
class Contender:
    name: str
    url: str
    counter: CountingGenerator
    round_rates: list[float] = field(default_factory=list)  # images/s of each round
    latencies: list[float] = field(default_factory=list)
    images: int = 0
    wall_s: float = 0.0


def run_round(
    contender: Contender, *, clients: int, requests: int, key: str, tag: str, seed_base: int
) -> None:
    barrier = threading.Barrier(clients + 1)
    errors: list[str] = []
    latencies: list[float] = []
    lock = threading.Lock()

    def client_loop(index: int) -> None:
        with httpx.Client(timeout=600) as client:
            barrier.wait()
            for i in range(requests):
                # Same length for every prompt: prompts of different token counts cannot share a batch.
                body = {**BODY, "prompt": f"a lighthouse at dusk, {tag} {index:02d} {i:03d}"}
                body["seed"] = seed_base + 1000 * index + i
                t0 = time.perf_counter()
                response = client.post(contender.url, json=body, headers={"x-api-key": key})
                elapsed = time.perf_counter() - t0
                with lock:
                    if response.status_code != 200:
                        errors.append(f"{response.status_code} {response.text[:200]}")
                    latencies.append(elapsed)

    threads = [threading.Thread(target=client_loop, args=(c,)) for c in range(clients)]
    for thread in threads:
        thread.start()
    barrier.wait()
    t0 = time.perf_counter()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - t0
    if errors:
        raise RuntimeError(f"{contender.name}: {len(errors)} failed requests, first: {errors[0]}")
    contender.round_rates.append(clients * requests / wall)
    contender.latencies.extend(latencies)
    contender.images += clients * requests
    contender.wall_s += wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--requests", type=int, default=4, help="requests per client per round")
    parser.add_argument("--rounds", type=int, default=6, help="timed rounds per server (after 1 warm-up)")
    parser.add_argument("--batch", type=int, default=4, help="max_batch_images of the batching server")
    parser.add_argument("--data-dir", type=Path, default=None)
    args = parser.parse_args()
    data_dir = args.data_dir or Path(tempfile.mkdtemp(prefix="sd3-bench-"))
    base = Settings(data_dir=data_dir, model={"id": "tiny"})
    runtime = load_runtime(base)

    contenders: list[Contender] = []
    servers = []
    for name, max_batch in (("batching off", 1), (f"batching {args.batch}", args.batch)):
        queue = base.queue.model_copy(update={"max_batch_images": max_batch})
        settings = base.model_copy(update={"queue": queue})
        counter = CountingGenerator(runtime.generator)
        app = create_app(settings, Runtime(counter, runtime.description, runtime.device))
        server, thread, url = serve_in_thread(app)
        servers.append((server, thread))
        contenders.append(Contender(name, f"{url}/v1/{SLUG}", counter))
    ledger = Ledger(base.resolved_database_url)
    _, key = ledger.create_key(name=f"bench-{time.time_ns()}", credits=Decimal(10_000))

    print(machine_line())
    print(
        f"load: {args.clients} concurrent clients x {args.requests} sequential requests per round;"
        " 512x512, 10 steps, CFG 5, DPM++ 2M, a different prompt and seed per request;"
        f" {args.rounds} rounds per server, alternating which goes first, after 1 warm-up round each"
    )
    try:
        for contender in contenders:  # warm-up: allocations at each batch size, then forget it
            run_round(
                contender, clients=args.clients, requests=args.requests, key=key, tag="warm", seed_base=0
            )
            contender.round_rates.clear()
            contender.latencies.clear()
            contender.images, contender.wall_s = 0, 0.0
            contender.counter.batches.clear()
        for round_index in range(args.rounds):
            order = contenders if round_index % 2 == 0 else contenders[::-1]
            for contender in order:
                run_round(
                    contender,
                    clients=args.clients,
                    requests=args.requests,
                    key=key,
                    tag=f"r{round_index}{contender.name[-1]}",
                    seed_base=1_000_000 * (round_index + 1),
                )
    finally:
        for server, thread in servers:
            stop_server(server, thread)
        ledger.close()

    header = ("server", "img/s median", "img/s overall", "p50 s", "p90 s", "batches run")
    print("\n  {:<12} {:>12} {:>13} {:>7} {:>7}  {}".format(*header))
    for c in contenders:
        batches = ", ".join(f"{n}x{size}" for size, n in sorted(c.counter.batches.items()))
        print(
            f"  {c.name:<12} {statistics.median(c.round_rates):12.3f} {c.images / c.wall_s:13.3f}"
            f" {statistics.median(c.latencies):7.3f} {percentile(c.latencies, 0.9):7.3f}  {batches}"
        )
    off, on = contenders
    by_rounds = statistics.median(on.round_rates) / statistics.median(off.round_rates)
    overall = (on.images / on.wall_s) / (off.images / off.wall_s)
    print(f"  speed-up batching on / off: {by_rounds:.3f} (median of rounds), {overall:.3f} (overall)")
    print("  ('batches run': <count>x<images per batch>, timed rounds only)")
    print(machine_line().replace("machine:", "at the end:"))


if __name__ == "__main__":
    main()
