"""Every generation request, as a persisted record: the v2 job queue's state and the history API.

One row per request, whatever surface it came through (v1, v2, OpenAI): its parameters, cost,
status, timings, outputs and error. v2 clients poll it (QUEUED → PROCESSING → COMPLETED or
FAILED); a restarted server finds the v2 jobs it had accepted and runs them; a key's owner pages
through it as history. It lives in the ledger's database, so that replicas sharing a PostgreSQL
ledger share their jobs too.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from decimal import Decimal
from typing import Any, Literal, cast

from sqlalchemy import Engine, insert, select, update

from server.credits import from_micro, to_micro
from server.db.tables import as_utc, jobs, utc_now
from server.schemas import recorded_params

JobStatus = Literal["QUEUED", "PROCESSING", "COMPLETED", "FAILED"]
Surface = Literal["v1", "v2", "openai"]
PENDING: tuple[JobStatus, ...] = ("QUEUED", "PROCESSING")
FINAL: tuple[JobStatus, ...] = ("COMPLETED", "FAILED")
# Progress is written at most this often per job: a step takes milliseconds on a big GPU.
PROGRESS_WRITE_INTERVAL_S = 0.5


@dataclass(frozen=True)
class JobRecord:
    request_id: str
    key_id: int
    surface: Surface
    model: str
    status: JobStatus
    params: dict[str, Any]
    seed: int | None
    cost: Decimal
    outputs: list[str]
    error: str | None
    owner: str
    progress_step: int
    progress_total: int
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    inference_s: float | None

    @property
    def queue_s(self) -> float | None:
        if self.started_at is None:
            return None
        return (self.started_at - self.created_at).total_seconds()

    @property
    def run_s(self) -> float | None:
        """From the device starting the job to its completion record: with `queue_s`, the two parts
        of `total_s` (the stored `inference_s` is timed from submission, queue wait included)."""
        if self.started_at is None or self.finished_at is None:
            return None
        return (self.finished_at - self.started_at).total_seconds()

    @property
    def total_s(self) -> float | None:
        if self.finished_at is None:
            return None
        return (self.finished_at - self.created_at).total_seconds()


def _record(row: Any) -> JobRecord:
    return JobRecord(
        request_id=row.request_id,
        key_id=row.key_id,
        surface=cast(Surface, row.surface),
        model=row.model,
        status=cast(JobStatus, row.status),
        params=json.loads(row.params),
        seed=row.seed,
        cost=from_micro(row.cost_micro),
        outputs=json.loads(row.outputs),
        error=row.error,
        owner=row.owner,
        progress_step=row.progress_step,
        progress_total=row.progress_total,
        created_at=as_utc(row.created_at),
        started_at=as_utc(row.started_at),
        finished_at=as_utc(row.finished_at),
        inference_s=row.inference_s,
    )


class JobStore:
    def __init__(self, engine: Engine) -> None:
        # The ledger's engine: one database, one pool; the Ledger opening it checked the schema.
        self._engine = engine
        self._last_progress_write: dict[str, float] = {}
        self._lock = threading.Lock()

    def create(
        self,
        *,
        request_id: str,
        key_id: int,
        surface: Surface,
        model: str,
        params: dict[str, Any],
        cost: Decimal,
        owner: str,
    ) -> JobRecord:
        with self._engine.begin() as conn:
            conn.execute(
                insert(jobs).values(
                    request_id=request_id,
                    key_id=key_id,
                    surface=surface,
                    model=model,
                    status="QUEUED",
                    params=json.dumps(params),
                    cost_micro=to_micro(cost),
                    outputs="[]",
                    owner=owner,
                    progress_step=0,
                    progress_total=0,
                    created_at=utc_now(),
                )
            )
        record = self.get(request_id)
        assert record is not None
        return record

    def _update(self, request_id: str, *, when: tuple[JobStatus, ...], **values: Any) -> bool:
        """Write `values` only while the job's status is one of `when`; whether it did.

        Every transition is one conditional UPDATE, so states only move forward whatever the order
        in which threads land: the device thread's progress write that arrives after the job was
        failed or completed changes nothing, and a finished job is never PROCESSING again.
        """
        with self._engine.begin() as conn:
            matched = conn.execute(
                update(jobs).where(jobs.c.request_id == request_id, jobs.c.status.in_(when)).values(**values)
            ).rowcount
        return bool(matched)

    def started(self, request_id: str, *, seed: int, total: int = 0) -> None:
        """QUEUED → PROCESSING, with the first step already done when `total` is given (one write).

        A job resumed after a restart may still be PROCESSING from its first run: it starts again.
        """
        with self._lock:
            self._last_progress_write[request_id] = time.monotonic()
        self._update(
            request_id,
            when=PENDING,
            status="PROCESSING",
            seed=seed,
            started_at=utc_now(),
            progress_step=1 if total else 0,
            progress_total=total,
        )

    def progress(self, request_id: str, *, step: int, total: int) -> None:
        """Record that `step` of `total` is done (throttled: the last step is always written)."""
        now = time.monotonic()
        with self._lock:
            last = self._last_progress_write.get(request_id, 0.0)
            if now - last < PROGRESS_WRITE_INTERVAL_S and step + 1 < total:
                return
            self._last_progress_write[request_id] = now
        self._update(request_id, when=("PROCESSING",), progress_step=step + 1, progress_total=total)

    def completed(self, request_id: str, *, outputs: list[str], inference_s: float) -> None:
        self._forget_progress(request_id)
        self._finish(
            request_id,
            status="COMPLETED",
            outputs=json.dumps(outputs),
            inference_s=inference_s,
            finished_at=utc_now(),
        )

    def failed(self, request_id: str, *, error: str) -> None:
        """QUEUED or PROCESSING → FAILED; a job that already finished keeps its outcome."""
        self._forget_progress(request_id)
        self._finish(request_id, status="FAILED", error=error, finished_at=utc_now())

    def _finish(self, request_id: str, **values: Any) -> None:
        """A pending job → its outcome, in one transaction that also drops what only a pending job
        needs: an accepted v2 img2img job keeps its input image (megabytes of base64) to be rebuilt
        after a restart, and once it has finished the row keeps only the image's length."""
        with self._engine.begin() as conn:
            row = conn.execute(
                select(jobs.c.params).where(jobs.c.request_id == request_id, jobs.c.status.in_(PENDING))
            ).first()
            if row is None:
                return
            kept = recorded_params(json.loads(row.params))
            conn.execute(
                update(jobs)
                .where(jobs.c.request_id == request_id, jobs.c.status.in_(PENDING))
                .values(params=json.dumps(kept), **values)
            )

    def requeue(self, request_ids: list[str]) -> None:
        """PROCESSING → QUEUED for jobs a stopping server hands to its next start (seed kept)."""
        for request_id in request_ids:
            self._forget_progress(request_id)
            self._update(
                request_id,
                when=PENDING,
                status="QUEUED",
                started_at=None,
                progress_step=0,
                progress_total=0,
            )

    def _forget_progress(self, request_id: str) -> None:
        with self._lock:
            self._last_progress_write.pop(request_id, None)

    def get(self, request_id: str) -> JobRecord | None:
        with self._engine.connect() as conn:
            row = conn.execute(select(jobs).where(jobs.c.request_id == request_id)).one_or_none()
        return None if row is None else _record(row)

    def pending(self, *, owner: str, surface: Surface) -> list[JobRecord]:
        """Jobs `owner` accepted and never finished, oldest first (to run again after a restart)."""
        with self._engine.connect() as conn:
            rows = conn.execute(
                select(jobs)
                .where(jobs.c.owner == owner, jobs.c.surface == surface, jobs.c.status.in_(PENDING))
                .order_by(jobs.c.created_at)
            ).all()
        return [_record(row) for row in rows]

    def history(
        self, key_id: int, *, limit: int, before: datetime | None = None, before_id: str | None = None
    ) -> list[JobRecord]:
        """A key's requests, newest first (ties broken by request id, descending).

        For the next page pass the last row's `created_at` as `before` and its `request_id` as
        `before_id`: rows created in the same microsecond are then neither skipped nor repeated.
        `before` alone returns the rows created strictly before it. A naive `before` is UTC; an
        aware one is converted, because SQLite stores UTC wall times and would otherwise compare
        a "+10:00" time as if it were UTC.
        """
        query = select(jobs).where(jobs.c.key_id == key_id)
        if before is not None:
            before = as_utc(before).astimezone(timezone.utc)
            earlier = jobs.c.created_at < before
            if before_id is not None:
                earlier = earlier | ((jobs.c.created_at == before) & (jobs.c.request_id < before_id))
            query = query.where(earlier)
        order = (jobs.c.created_at.desc(), jobs.c.request_id.desc())
        with self._engine.connect() as conn:
            rows = conn.execute(query.order_by(*order).limit(limit)).all()
        return [_record(row) for row in rows]
