"""Owns the on-disk record of async chat tasks (tasks.sqlite3 in the server's data dir), so that an accepted task
is not lost when the server stops or is killed: a task is written (its request body with it) before its id goes
back to the client, its result when it ends (before a poll can see it: a task whose result a client has seen never
runs again, which unseeded sampling would answer differently). At the next start the store reads the results still within their time
to live, and runs again the tasks that were still running when the server stopped or died (api/tasks.py:
TaskStore.recover).

Every write is committed with an fsync (synchronous=FULL), so a recorded task survives a power loss too, and
runs on one writer thread, in order, so the event loop never waits on the disk: `add` and `finish` are awaited,
`delete` is queued behind them. `load` runs at start, before any write."""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from glm_serve.batch.store import open_sqlite

log = logging.getLogger(__name__)

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
        self._db = open_sqlite(Path(path), _SCHEMA)  # each commit fsynced: a power loss loses no recorded task
        # One thread: the writes reach the file in the order they were made (a finish after its add)
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="task-log")

    async def add(self, task, body: dict) -> None:
        """Record a new task with its request; returns once the record is on disk."""
        row = (task.id, task.request_id, task.model, task.owner, json.dumps(body, ensure_ascii=False), task.status)
        await asyncio.get_running_loop().run_in_executor(self._writer, self._write, _ADD, [row])

    async def finish(self, task_id: str, status: str, result: dict | None, error: dict | None) -> None:
        """Record a task's outcome (its request body is no longer needed); returns once it is on disk. After the
        log closed (the server stopped), nothing is written: the task runs again at the next start."""
        row = (status, _dumps(result), _dumps(error), time.time(), task_id)
        try:
            written = asyncio.get_running_loop().run_in_executor(self._writer, self._write, _FINISH, [row])
        except RuntimeError:  # closed
            log.warning("task log: closed, the outcome of task %s not written", task_id)
            return
        await written

    def delete(self, ids: list[str]) -> None:
        if ids:
            self._submit(_DELETE, [(i,) for i in ids])

    def _submit(self, sql: str, rows: list[tuple]) -> None:
        try:
            self._writer.submit(self._write, sql, rows)
        except RuntimeError:  # closed: the server has stopped (what was recorded stays as it was)
            log.warning("task log: closed, not written (%s)", sql.split(" (")[0])

    def _write(self, sql: str, rows: list[tuple]) -> None:
        try:
            self._db.executemany(sql, rows)
        except sqlite3.Error:
            log.exception("task log: a write failed (%s)", sql.split(" (")[0])
            raise

    def load(self) -> list[TaskRow]:
        """Every task on record, oldest first (at start, before any write)."""
        rows = self._db.execute("SELECT id, request_id, model, owner, body, status, result, error, finished_at "
                                "FROM tasks ORDER BY seq").fetchall()
        return [TaskRow(tid, rid, model, owner, _loads(body), status, _loads(result), _loads(error), finished_at)
                for tid, rid, model, owner, body, status, result, error, finished_at in rows]

    def close(self) -> None:
        """After the queued writes are on disk."""
        self._writer.shutdown(wait=True)
        self._db.close()


_ADD = "INSERT OR REPLACE INTO tasks (id, request_id, model, owner, body, status) VALUES (?, ?, ?, ?, ?, ?)"
_FINISH = "UPDATE tasks SET status = ?, result = ?, error = ?, finished_at = ?, body = NULL WHERE id = ?"
_DELETE = "DELETE FROM tasks WHERE id = ?"


def _dumps(value) -> str | None:
    return None if value is None else json.dumps(value, ensure_ascii=False)


def _loads(text: str | None):
    return None if text is None else json.loads(text)
