"""Owns the stored responses of the Responses API (responses.sqlite3 in the server's data dir, beside tasks.sqlite3):
each finished response kept with `store` (OpenAI's default), so that GET /v1/responses/{id} returns it, its
input_items list what made it, and a later request continues its conversation with `previous_response_id`. Records
outlive a restart; each is kept 30 days (OpenAI's retention for stored responses), then purged: at start, and at
most once an hour as responses are written.

A record is visible only to the API key that made it (with keys configured); a server without keys shows
everything, as the batch store does (batch/records.visible). Methods block (sqlite): the routes call them in a
worker thread (asyncio.to_thread), so a large conversation's write never holds the event loop.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from glm_serve.batch.records import visible
from glm_serve.batch.store import open_sqlite

log = logging.getLogger(__name__)

TTL_S = 30 * 86400  # OpenAI keeps a stored response 30 days
PURGE_EVERY_S = 3600.0  # expired records are dropped at most this often while writing (and at every start)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS responses (
    id TEXT PRIMARY KEY, owner TEXT, created_at REAL NOT NULL, expires_at REAL NOT NULL,
    response TEXT NOT NULL, input_items TEXT NOT NULL, conversation TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS responses_expiry ON responses (expires_at);
"""


@dataclass
class StoredResponse:
    """One stored response, as routes_responses.py builds it."""

    id: str  # "resp_<hex>"
    owner: str | None  # the creating API key's id (auth.KeyStore); None on a server without keys
    response: dict  # the Response object as returned (its final status: completed, incomplete or failed)
    # Every item of the conversation before this response's output, oldest first, each with its "id": the previous
    # response's input items and output, then this request's input (`instructions` are no item). What
    # GET .../input_items lists.
    input_items: list[dict]
    # The chat messages a follow-up continues from (previous_response_id): the whole conversation so far, this
    # response's output included, without any `instructions` (they apply to one response only).
    conversation: list[dict]


class ResponseStore:
    def __init__(self, path: str | Path, ttl_s: float = TTL_S, clock: Callable[[], float] = time.time):
        self.ttl_s, self._clock = ttl_s, clock
        # Each commit fsynced (the routes write from a worker thread): a power loss loses no stored response whose
        # answer went out, which a follow-up's previous_response_id may name
        self._db: sqlite3.Connection | None = open_sqlite(Path(path), _SCHEMA)
        self._lock = threading.Lock()
        self._purged_at = 0.0
        dropped = self.purge()
        if dropped:
            log.info("dropped %d stored response(s) older than %d days", dropped, round(ttl_s / 86400))

    def put(self, rec: StoredResponse) -> None:
        now = self._clock()
        row = (rec.id, rec.owner, now, now + self.ttl_s, _dumps(rec.response), _dumps(rec.input_items),
               _dumps(rec.conversation))
        with self._lock:
            if self._db is None:  # a stream that ended after the server closed its stores (shutdown)
                log.warning("response %s not stored: the server is shutting down", rec.id)
                return
            self._db.execute("INSERT OR REPLACE INTO responses (id, owner, created_at, expires_at, response, "
                             "input_items, conversation) VALUES (?, ?, ?, ?, ?, ?, ?)", row)
        if now - self._purged_at >= PURGE_EVERY_S:
            self.purge()

    def response(self, response_id: str, caller: str | None) -> dict | None:
        """The Response object, or None when there is none for this caller (unknown, expired, another key's)."""
        return self._field(response_id, caller, "response")

    def input_items(self, response_id: str, caller: str | None) -> list[dict] | None:
        return self._field(response_id, caller, "input_items")

    def continuation(self, response_id: str, caller: str | None) -> tuple[list[dict], list[dict]] | None:
        """What a follow-up needs: (conversation, the items before it: input items + the response's output)."""
        with self._lock:
            row = self._row(response_id, caller, "response, input_items, conversation")
        if row is None:
            return None
        response, items, conversation = (json.loads(v) for v in row)
        return conversation, items + _kept_output(response)

    def delete(self, response_id: str, caller: str | None) -> bool:
        with self._lock:
            if self._row(response_id, caller, "id") is None:
                return False
            self._db.execute("DELETE FROM responses WHERE id = ?", (response_id,))
        return True

    def purge(self) -> int:
        """Drop the records past their time; -> how many."""
        now = self._clock()
        with self._lock:
            if self._db is None:
                return 0
            self._purged_at = now
            return self._db.execute("DELETE FROM responses WHERE expires_at <= ?", (now,)).rowcount

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    def _field(self, response_id: str, caller: str | None, column: str):
        with self._lock:
            row = self._row(response_id, caller, column)
        return None if row is None else json.loads(row[0])

    def _row(self, response_id: str, caller: str | None, columns: str) -> tuple | None:
        """The columns of a live record the caller may see (under the lock); None otherwise. An expired record not
        purged yet is gone already for the caller."""
        if self._db is None:
            return None
        row = self._db.execute(f"SELECT owner, {columns} FROM responses WHERE id = ? AND expires_at > ?",
                               (response_id, self._clock())).fetchone()
        if row is None or not visible(row[0], caller):
            return None
        return row[1:]


def _kept_output(response: dict) -> list[dict]:
    """A response's output as the items a follow-up's input_items list: none for a failed response, whose
    conversation ended before its output (stored as such: routes_responses.py)."""
    return [] if response.get("status") == "failed" else list(response.get("output") or [])


def _dumps(value) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))
