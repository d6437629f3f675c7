"""Owns the stored responses of the Responses API (responses.sqlite3 in the server's data dir, beside tasks.sqlite3):
each finished response kept with `store` (OpenAI's default), so that GET /v1/responses/{id} returns it, its
input_items list what made it, and a later request continues its conversation with `previous_response_id`. Records
outlive a restart.

A record holds only what its own request added (its input items and messages, its output) and the id of the
response it continued: a conversation is read by following those links back. So a chain of n turns takes space
in n, not n^2 (an agent's hundred-turn loop would otherwise store its early turns a hundred times), and a record
must outlive the later ones that continue it: each response is visible for 30 days (OpenAI's retention) or until
deleted, and kept on disk as long as a visible response continues it (`keep_until`: the latest end of its own
days, unless deleted, and its children's keep_until; so never below a descendant's). Records past that are purged
at start, at most once an hour as responses are written, and as one is deleted (with it go the earlier turns only
it kept).

A record is visible only to the API key that made it (with keys configured); a server without keys shows
everything, as the batch store does (batch/records.visible). Methods block (sqlite): the routes call them in a
worker thread (asyncio.to_thread), so a large conversation's write never holds the event loop.
"""

from __future__ import annotations

import json
import logging
import math
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from glm_serve.batch.records import visible
from glm_serve.batch.store import open_sqlite

log = logging.getLogger(__name__)

TTL_S = 30 * 86400  # OpenAI keeps a stored response 30 days
PURGE_EVERY_S = 3600.0  # expired records are dropped at most this often while writing (and at every start)
# The server rounds keep_until up to a multiple of this (ResponseStore's keep_step_s): a put then extends its
# ancestors (a walk up the whole chain) once an hour per chain, not on every turn, and a record nothing needs any
# more outlives that by at most this long
KEEP_STEP_S = 3600.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS responses (
    id TEXT PRIMARY KEY, owner TEXT, parent TEXT, created_at REAL NOT NULL, expires_at REAL NOT NULL,
    keep_until REAL NOT NULL, deleted INTEGER NOT NULL DEFAULT 0,
    response TEXT NOT NULL, items TEXT NOT NULL, messages TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS responses_keep ON responses (keep_until);
CREATE INDEX IF NOT EXISTS responses_parent ON responses (parent);
"""


@dataclass
class StoredResponse:
    """One stored response: what its own request added to the conversation (routes_responses.py builds it)."""

    id: str  # "resp_<hex>"
    owner: str | None  # the creating API key's id (auth.KeyStore); None on a server without keys
    response: dict  # the Response object as returned (its final status: completed, incomplete or failed)
    parent: str | None  # the previous_response_id it continued (stored), None for a first turn
    # This request's input items as input_items lists them (each with its "id"; `instructions` are no item)
    items: list[dict]
    # The chat messages this turn adds to the conversation a follow-up continues: its input's (no `instructions`:
    # they apply to one response only), then its output's (none for a failed response)
    messages: list[dict]
    # The continued conversation as read when this request began (its messages, its items before this input):
    # stored with the record only if `parent` was deleted meanwhile, which then is no longer there to read it from
    inherited: tuple[list[dict], list[dict]] = ([], [])


class ResponseStore:
    def __init__(self, path: str | Path, ttl_s: float = TTL_S, clock: Callable[[], float] = time.time,
                 keep_step_s: float = 0.0):
        """keep_step_s: keep_until's rounding (KEEP_STEP_S: the server's; 0, exact, suits a short ttl_s)."""
        self.ttl_s, self._clock, self._step = ttl_s, clock, keep_step_s
        # Each commit fsynced (the routes write from a worker thread): a power loss loses no stored response whose
        # answer went out, which a follow-up's previous_response_id may name
        self._db: sqlite3.Connection | None = open_sqlite(Path(path), _SCHEMA)
        self._lock = threading.Lock()
        self._purged_at = 0.0
        dropped = self.purge()
        if dropped:
            log.info("dropped %d stored response(s) older than %d days", dropped, round(ttl_s / 86400))

    def put(self, rec: StoredResponse) -> None:
        """Store a response; its ancestors are kept at least as long (a chain is read through them). An id stored
        already is a ValueError (ids are made unique: replacing a record would change the conversation of the ones
        continuing it)."""
        now = self._clock()
        until = now + self.ttl_s
        keep = self._round(until)
        with self._lock:
            if self._db is None:  # a stream that ended after the server closed its stores (shutdown)
                log.warning("response %s not stored: the server is shutting down", rec.id)
                return
            with _transaction(self._db):  # the record and its ancestors' extension, together
                if self._db.execute("SELECT 1 FROM responses WHERE id = ?", (rec.id,)).fetchone():
                    raise ValueError(f"response {rec.id} is stored already")
                parent, messages, items = rec.parent, rec.messages, rec.items
                if parent is not None and self._db.execute("SELECT 1 FROM responses WHERE id = ?",
                                                           (parent,)).fetchone() is None:
                    # deleted (and gone) while this response ran: the conversation is stored whole with it
                    parent, messages, items = None, rec.inherited[0] + messages, rec.inherited[1] + items
                self._db.execute("INSERT INTO responses (id, owner, parent, created_at, expires_at, keep_until, "
                                 "response, items, messages) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                                 (rec.id, rec.owner, parent, now, until, keep, _dumps(rec.response),
                                  _dumps(items), _dumps(messages)))
                # Each ancestor kept as long, in one statement: up to the first one kept long enough (so are its
                # ancestors), which with keep_until rounded up is the parent itself for all but a chain's first
                # turn of the hour. (UNION: a damaged file's loop of parents ends.)
                self._db.execute(
                    "WITH RECURSIVE up(id) AS (SELECT ? UNION SELECT r.parent FROM responses r JOIN up "
                    "ON r.id = up.id WHERE r.keep_until < ? AND r.parent IS NOT NULL) "
                    "UPDATE responses SET keep_until = ? WHERE id IN (SELECT id FROM up) AND keep_until < ?",
                    (parent, keep, keep, keep))
        if now - self._purged_at >= PURGE_EVERY_S or now < self._purged_at:  # (a clock set back: purge anew)
            self.purge()

    def response(self, response_id: str, caller: str | None) -> dict | None:
        """The Response object, or None when there is none for this caller (unknown, expired, deleted, another
        key's)."""
        chain = self._chain(response_id, caller, whole=False)
        return None if chain is None else chain[-1][0]

    def input_items(self, response_id: str, caller: str | None) -> list[dict] | None:
        """Every item before the response's output, oldest first: the earlier turns' items and outputs, then its
        own input."""
        chain = self._chain(response_id, caller)
        if chain is None:
            return None
        return [item for response, items, _ in chain[:-1] for item in items + _kept_output(response)] + chain[-1][1]

    def continuation(self, response_id: str, caller: str | None) -> tuple[list[dict], list[dict]] | None:
        """What a follow-up needs: (the conversation's chat messages, every item before the follow-up's input)."""
        chain = self._chain(response_id, caller)
        if chain is None:
            return None
        return ([m for _, _, messages in chain for m in messages],
                [item for response, items, _ in chain for item in items + _kept_output(response)])

    def delete(self, response_id: str, caller: str | None) -> bool:
        """Hide it at once for good; its record goes as soon as no visible response continues it, and so do the
        earlier turns that only it kept."""
        with self._lock:
            if self._visible(response_id, caller) is None:
                return False
            now = self._clock()
            with _transaction(self._db):
                self._db.execute("UPDATE responses SET deleted = 1 WHERE id = ?", (response_id,))
                node = response_id
                while node is not None:  # keep_until anew up the chain: its own days unless deleted, its children's
                    row = self._db.execute("SELECT parent, deleted, expires_at, keep_until FROM responses WHERE "
                                           "id = ?", (node,)).fetchone()
                    if row is None:
                        break
                    below = self._db.execute("SELECT max(keep_until) FROM responses WHERE parent = ?",
                                             (node,)).fetchone()[0]
                    keep = max(v for v in (below, None if row[1] else self._round(row[2]), float("-inf"))
                               if v is not None)
                    if keep == row[3]:  # (so are its ancestors')
                        break
                    if keep == float("-inf"):  # deleted, nothing continues it
                        self._db.execute("DELETE FROM responses WHERE id = ?", (node,))
                    else:
                        self._db.execute("UPDATE responses SET keep_until = ? WHERE id = ?", (keep, node))
                    node = row[0]
                # what only it kept, past its own days: gone now (ancestors are kept as long as what they carry)
                self._db.execute("DELETE FROM responses WHERE keep_until <= ?", (now,))
        return True

    def purge(self) -> int:
        """Drop the records no longer kept (nor continued by a kept one); -> how many."""
        now = self._clock()
        with self._lock:
            if self._db is None:
                return 0
            self._purged_at = now
            return self._db.execute("DELETE FROM responses WHERE keep_until <= ?", (now,)).rowcount

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    def _visible(self, response_id: str, caller: str | None) -> tuple | None:
        """(parent, response, items, messages) of a record the caller may see (under the lock), else None. One
        past its 30 days is gone for the caller before any purge."""
        if self._db is None:
            return None
        row = self._db.execute("SELECT owner, parent, response, items, messages FROM responses WHERE id = ? AND "
                               "deleted = 0 AND expires_at > ?", (response_id, self._clock())).fetchone()
        return None if row is None or not visible(row[0], caller) else row[1:]

    def _chain(self, response_id: str, caller: str | None, whole: bool = True) -> list[tuple] | None:
        """[(response, items, messages)] from the first turn to this response (only it when not `whole`), which
        the caller must be able to see; its ancestors need only be kept (deleted or past their own days, they
        still carry the conversation). None when it is not visible, or (a damaged file) its chain is broken."""
        with self._lock:
            row = self._visible(response_id, caller)
            if row is None:
                return None
            chain, parent, seen = [row[1:]], row[0], {response_id}
            while whole and parent is not None:
                up = self._db.execute("SELECT parent, response, items, messages FROM responses WHERE id = ?",
                                      (parent,)).fetchone()
                if up is None or parent in seen:
                    log.warning("stored response %s: its conversation lost response %s", response_id, parent)
                    return None
                seen.add(parent)
                chain.append(up[1:])
                parent = up[0]
        chain.reverse()
        return [(json.loads(r), json.loads(i), json.loads(m)) for r, i, m in chain]

    def _round(self, t: float) -> float:
        """keep_until for a record visible until t: t rounded up to the step (module head)."""
        return math.ceil(t / self._step) * self._step if self._step > 0 else t


@contextmanager
def _transaction(db: sqlite3.Connection) -> Iterator[None]:
    """All of it or none (the connection autocommits each statement otherwise). A failed statement or COMMIT
    leaves no transaction open (the next BEGIN would fail), and its own error is the one raised (sqlite rolls back
    by itself on some errors, a full disk among them: a ROLLBACK then would fail and hide it)."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise


def _kept_output(response: dict) -> list[dict]:
    """A response's output as the items a follow-up's input_items list: none for a failed response, whose
    conversation ended before its output (stored as such: routes_responses.py)."""
    return [] if response.get("status") == "failed" else list(response.get("output") or [])


def _dumps(value) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))
