"""Generated images kept on disk for a while, served at `GET /v1/outputs/<id>.jpg` (`.png`, `.webp`
for the SD3.5 slugs' other formats).

The OpenAI surface (`response_format="url"`) and the v2 jobs answer with URLs rather than bytes;
this store is what those URLs point at. Like the hosted service's signed output URLs, an output
URL is a *capability*: whoever holds it can fetch the image, without an API key. That is safe only
because the id is 128 random bits (uuid4), which cannot be guessed or enumerated; the id is the
whole secret, so it is never derived from the key, the request id or a counter.

Files are kept `retention_s` seconds (the hosted service keeps output files 7 days) and are judged
by their modification time, so the store needs no index: a restart keeps serving what is on disk.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import tempfile
import time
import uuid
from pathlib import Path

log = logging.getLogger(__name__)

DEFAULT_RETENTION_S = 7 * 24 * 3600
SUFFIX = ".jpg"
# An image format (server/schemas.py IMAGE_FORMATS) → its file's suffix.
SUFFIXES = {"jpeg": ".jpg", "png": ".png", "webp": ".webp"}
# Expired files are no longer served at once (`path` checks the age); the purge only frees the disk,
# so an hour between purges is plenty.
PURGE_INTERVAL_S = 3600.0
# Exactly what `save` produces (uuid4().hex). Anything else — "..", slashes, NUL, upper case,
# another length — is refused before the file system is touched, so no id can escape the directory.
_ID = re.compile(r"[0-9a-f]{32}")


class OutputStore:
    def __init__(self, directory: Path, retention_s: int = DEFAULT_RETENTION_S) -> None:
        if retention_s < 1:
            raise ValueError(f"retention_s must be at least 1 second (got {retention_s})")
        self.directory = Path(directory)
        self.retention_s = retention_s
        self.directory.mkdir(parents=True, exist_ok=True)

    def save(self, jpeg: bytes, *, owner_key_id: int, image_format: str = "jpeg") -> str:
        """Write one image (a JPEG unless `image_format` says otherwise) and return its new unguessable id.

        `owner_key_id` is recorded in the log only: access is by capability (the id), as on the
        hosted service, so the owner is not checked when the file is served.
        """
        output_id = uuid.uuid4().hex
        suffix = SUFFIXES[image_format]
        target = self.directory / f"{output_id}{suffix}"
        # Write to a temporary file in the same directory, then rename: a concurrent GET sees either
        # no file or the whole JPEG, never a truncated one, and a crash leaves no partial output.
        fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=".tmp-", suffix=suffix)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(jpeg)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        log.debug("output %s saved for key %d (%d bytes)", output_id, owner_key_id, len(jpeg))
        return output_id

    def path(self, output_id: str, suffix: str = SUFFIX) -> Path | None:
        """The file of a live output; None when the id is malformed, unknown or expired."""
        if not _ID.fullmatch(output_id) or suffix not in SUFFIXES.values():
            return None
        candidate = self.directory / f"{output_id}{suffix}"
        try:
            mtime = candidate.stat().st_mtime
        except OSError:
            return None
        if self._expired(mtime, time.time()):
            # Not deleted here: the purge does that; an expired file is simply no longer served.
            return None
        return candidate

    def purge_expired(self) -> int:
        """Delete expired outputs (and temporary files a crash left behind); return how many."""
        now = time.time()
        removed = 0
        for entry in self.directory.iterdir():
            if not entry.name.endswith(tuple(SUFFIXES.values())):
                continue
            try:
                if self._expired(entry.stat().st_mtime, now):
                    entry.unlink()
                    removed += 1
            except FileNotFoundError:
                continue  # removed concurrently by another purge: nothing to do
        return removed

    async def purge_forever(self, interval_s: float = PURGE_INTERVAL_S) -> None:
        """Purge now and then every `interval_s` until cancelled (the app's lifespan runs this).

        Without it a long-running server would keep every image ever made: expiry alone only stops
        serving them.
        """
        while True:
            try:
                removed = await asyncio.to_thread(self.purge_expired)
                if removed:
                    log.info("purged %d expired output(s)", removed)
            except OSError:
                # A full or read-only disk must not kill the purger: the next round tries again.
                log.exception("purging expired outputs failed")
            await asyncio.sleep(interval_s)

    def _expired(self, mtime: float, now: float) -> bool:
        return now - mtime > self.retention_s
