"""Owns the on-disk record of async chat tasks (tasks.sqlite3 in the server's data dir), so that an accepted task
is not lost when the server stops or is killed: a task is written (its request body with it) before its id goes
back to the client, its result when it ends. At the next start the store reads the results still within their time
to live, and runs again the tasks that were still running when the server stopped or died (api/tasks.py:
TaskStore.recover).

Calls come from the event loop (one at a time); the connection is opened where the app is built, so it is
shared across threads under a lock."""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

_SCHEMA = """
CREATE TABLE IF NOT EXISTS tasks (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT UNIQUE NOT NULL, request_id TEXT NOT NULL, model TEXT NOT NULL,
    owner TEXT, body TEXT, status TEXT NOT NULL, result TEXT, error TEXT, finished_at REAL);
"""


@dataclass
class TaskRow:
    id: str
    request_id: str
    model: str
    owner: str | None
    body: dict | None  # the request, while the task runs
    status: str
    result: dict | None
    error: dict | None
    finished_at: float | None  # time.time()


class TaskLog:
    def __init__(self, path: str | Path):
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        # These writes run on the event loop: NORMAL (in WAL mode) does not fsync each commit, which would stall every
        # stream for milliseconds per task. A killed process loses nothing committed; a power loss may lose the
        # last tasks (the batch store, written off the loop, syncs each commit).
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        self._lock = threading.Lock()

    def add(self, task, body: dict) -> None:
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO tasks (id, request_id, model, owner, body, status) "
                             "VALUES (?, ?, ?, ?, ?, ?)", (task.id, task.request_id, task.model, task.owner,
                                                           json.dumps(body, ensure_ascii=False), task.status))

    def finish(self, task) -> None:
        """The task's outcome; its request body is no longer needed."""
        with self._lock:
            self._db.execute("UPDATE tasks SET status = ?, result = ?, error = ?, finished_at = ?, body = NULL "
                             "WHERE id = ?", (task.status, _dumps(task.result), _dumps(task.error), time.time(),
                                              task.id))

    def delete(self, ids: list[str]) -> None:
        if ids:
            with self._lock:
                self._db.executemany("DELETE FROM tasks WHERE id = ?", [(i,) for i in ids])

    def load(self) -> list[TaskRow]:
        """Every task on record, oldest first."""
        with self._lock:
            rows = self._db.execute("SELECT id, request_id, model, owner, body, status, result, error, finished_at "
                                    "FROM tasks ORDER BY seq").fetchall()
        return [TaskRow(tid, rid, model, owner, _loads(body), status, _loads(result), _loads(error), finished_at)
                for tid, rid, model, owner, body, status, result, error, finished_at in rows]

    def close(self) -> None:
        with self._lock:
            self._db.close()


def _dumps(value) -> str | None:
    return None if value is None else json.dumps(value, ensure_ascii=False)


def _loads(text: str | None):
    return None if text is None else json.loads(text)
