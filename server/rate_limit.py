"""Per-key request rate limits: a sliding window of the last minute, in this process.

With several replicas each one counts its own requests, so the effective limit is per replica;
a shared limit would need a shared store (Redis), which one machine does not need.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict, deque
from dataclasses import dataclass
from datetime import datetime, timezone

WINDOW_S = 60.0


@dataclass(frozen=True)
class RateDecision:
    allowed: bool
    remaining: int
    reset_at: float  # epoch seconds when the oldest counted request leaves the window

    def headers(self) -> dict[str, str]:
        headers = {
            "x-rate-limit-remaining": str(self.remaining),
            "x-rate-limit-reset-at-utc": reset_at_utc(self.reset_at),
        }
        if not self.allowed:
            headers["Retry-After"] = str(max(1, int(self.reset_at - time.time() + 0.999)))
        return headers


def reset_at_utc(epoch_s: float) -> str:
    """The `x-rate-limit-reset-at-utc` value of every 429 (rate limit or full queue)."""
    return datetime.fromtimestamp(epoch_s, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class RateLimiter:
    def __init__(self, per_minute: int) -> None:
        self.per_minute = per_minute
        self._hits: dict[int, deque[float]] = defaultdict(deque)
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.per_minute > 0

    def check(self, key_id: int, *, now: float | None = None) -> RateDecision:
        """Count one request for `key_id` if it is within the limit."""
        now = time.time() if now is None else now
        with self._lock:
            hits = self._hits[key_id]
            while hits and hits[0] <= now - WINDOW_S:
                hits.popleft()
            allowed = len(hits) < self.per_minute
            if allowed:
                hits.append(now)
            reset_at = (hits[0] if hits else now) + WINDOW_S
            return RateDecision(allowed, max(0, self.per_minute - len(hits)), reset_at)
