"""What the credit bookkeeping of one request costs: each ledger and job-store write, timed alone.

    python benchmarks/ledger_ops.py [--requests 200] [--database-url URL]

One v1 request does, besides generating: find the key, reserve, create its job row, mark it
started (on the device thread), settle, mark it completed, read the balance. Each is timed here
over `--requests` distinct requests on a fresh SQLite ledger in a temporary folder (WAL, as the
server opens it), or on the database `--database-url` names (e.g. PostgreSQL).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable
from decimal import Decimal

from server.db.migrations import upgrade_to_head
from server.job_store import JobStore
from server.keys import hash_key
from server.ledger import Ledger


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--database-url", default=None)
    args = parser.parse_args()
    url = args.database_url or f"sqlite:///{tempfile.mkdtemp(prefix='sd3-ledger-')}/ledger.sqlite3"
    upgrade_to_head(url)  # as a server's start-up does
    ledger = Ledger(url)
    jobs = JobStore(ledger.engine)
    record, key = ledger.create_key(name=f"bench-{uuid.uuid4().hex[:8]}", credits=Decimal(10**6))
    key_hash = hash_key(key)
    ids = [str(uuid.uuid4()) for _ in range(args.requests)]
    price = Decimal("0.039")

    steps: dict[str, Callable[[str], object]] = {
        "find the key": lambda _: ledger.find_by_hash(key_hash),
        "reserve": lambda rid: ledger.reserve(key_id=record.id, amount=price, request_id=rid, owner="bench"),
        "create the job row": lambda rid: jobs.create(
            request_id=rid,
            key_id=record.id,
            surface="v1",
            model="bench",
            params={},
            cost=price,
            owner="bench",
        ),
        "mark it started": lambda rid: jobs.started(rid, seed=1, total=25),
        "settle": lambda rid: ledger.settle(rid),
        "mark it completed": lambda rid: jobs.completed(rid, outputs=[], inference_s=1.0),
        "read the balance": lambda _: ledger.balance(record.id),
    }
    print(f"{ledger.engine.url.get_backend_name()}, {args.requests} requests; median per operation:")
    total = 0.0
    for name, step in steps.items():
        times = []
        for rid in ids:
            started = time.perf_counter()
            step(rid)
            times.append(time.perf_counter() - started)
        median_ms = statistics.median(times) * 1000
        total += median_ms
        print(f"  {name:<20} {median_ms:6.2f} ms")
    print(f"  {'one request, in all':<20} {total:6.2f} ms")
    ledger.close()


if __name__ == "__main__":
    main()
