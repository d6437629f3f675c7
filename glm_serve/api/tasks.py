"""Async chat tasks (POST /async/chat/completions, GET /async-result/{id}): a chat that runs in the background
on the server's event loop while the client polls. Finished results are kept for a while, then dropped.
With API keys, a task's result is fetched with the key that submitted it (another key gets 404, as for an
unknown id). With a TaskLog (the server's data dir) tasks outlive the process: results within their time to
live are there after a restart, and a task that was running when the server stopped or died runs again."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from glm_serve.api.errors import APIError, internal_error_message
from glm_serve.api.task_log import TaskLog

log = logging.getLogger(__name__)

PROCESSING, SUCCESS, FAIL = "PROCESSING", "SUCCESS", "FAIL"


@dataclass
class Task:
    id: str
    request_id: str
    model: str
    owner: str | None = None  # API key id that submitted it (None: the server has no keys)
    status: str = PROCESSING
    result: dict | None = None  # the chat body, on SUCCESS
    error: dict | None = None  # {"code", "message"}, on FAIL
    finished_at: float | None = None  # time.monotonic()
    handle: asyncio.Task | None = field(default=None, repr=False)

    def to_dict(self) -> dict:
        out = {"id": self.id, "request_id": self.request_id, "model": self.model, "task_status": self.status}
        if self.status == SUCCESS and self.result is not None:
            out["choices"] = self.result["choices"]
            out["usage"] = self.result["usage"]
            out["created"] = self.result.get("created")
        elif self.status == FAIL:
            out["error"] = self.error
        return out


def _drop(work: Awaitable[dict], release: Callable[[], None]) -> None:
    """A task that will not run: its admission released, its coroutine closed (not left "never awaited")."""
    release()
    if asyncio.iscoroutine(work):
        work.close()


class TaskStore:
    def __init__(self, ttl_s: float, max_tasks: int, log_: TaskLog | None = None):
        if ttl_s <= 0 or max_tasks < 1:
            raise ValueError("task ttl must be > 0 and max_tasks >= 1")
        self.ttl_s, self.max_tasks = ttl_s, max_tasks
        self._tasks: dict[str, Task] = {}  # insertion order = age
        self._log = log_

    async def submit(self, task: Task, work: Awaitable[dict], release: Callable[[], None],
                     body: dict | None = None) -> Task:
        """Run `work` for `task`; `body` (the request) is recorded with it, to run it again after a restart."""
        self._purge()
        self._make_room()
        if len(self._tasks) >= self.max_tasks:
            _drop(work, release)
            raise APIError("1305", f"too many async tasks held ({self.max_tasks}); fetch or wait for results")
        self._tasks[task.id] = task  # holds its place (max_tasks) while the record is written
        if self._log is not None and body is not None:
            try:
                await self._log.add(task, body)  # on disk before the client has the id
            except BaseException:  # a disk error, or the client gone (cancelled): no task, and none on record
                self._tasks.pop(task.id, None)
                _drop(work, release)
                self._log.delete([task.id])  # (queued after the add, should that still be written)
                raise
        task.handle = asyncio.ensure_future(self._run(task, work, release))
        return task

    def recover(self, rerun: Callable[[Task, dict], Awaitable[dict]]) -> int:
        """At start: the recorded results still within their time to live, and the tasks that were running when
        the server stopped, run again (`rerun(task, body)`; they were admitted once already). -> tasks rerun."""
        if self._log is None:
            return 0
        rows, now, mono = self._log.load(), time.time(), time.monotonic()
        expired = {r.id for r in rows if r.finished_at is not None and now - r.finished_at > self.ttl_s}
        self._log.delete(sorted(expired))
        rerun_count = 0
        for r in rows:
            if r.id in expired:
                continue
            task = Task(r.id, r.request_id, r.model, owner=r.owner, status=r.status, result=r.result,
                        error=r.error)
            if r.finished_at is not None:
                task.finished_at = mono - (now - r.finished_at)
                self._tasks[task.id] = task
            elif r.body is not None:
                self._tasks[task.id] = task
                task.handle = asyncio.ensure_future(self._run(task, rerun(task, r.body), lambda: None))
                rerun_count += 1
        self._make_room(room=0)
        return rerun_count

    def get(self, task_id: str, caller: str | None = None) -> Task:
        self._purge()
        task = self._tasks.get(task_id)
        if task is None or (caller is not None and task.owner != caller):
            raise APIError("1214", f"no async task with id {task_id!r} (unknown, or its result expired)",
                           "id", status=404)
        return task

    async def _run(self, task: Task, work: Awaitable[dict], release: Callable[[], None]) -> None:
        result, error = None, None
        try:
            result, status = await work, SUCCESS
        except asyncio.CancelledError:  # the server is stopping: on record as running, to run again at the start
            release()
            raise
        except APIError as e:
            status, error = FAIL, {"code": e.code, "message": e.message}
        except Exception as e:  # noqa: BLE001 (a failed task is a FAIL result, not a dead server)
            log.exception("async task %s failed", task.id)
            status, error = FAIL, {"code": "500", "message": internal_error_message(e)}
        release()
        if self._log is not None:
            # On disk before a poll can see it: after a crash, a task a client saw finished must not run again
            try:
                await self._log.finish(task.id, status, result, error)
            except sqlite3.Error:  # (logged by the log) served from memory; after a restart it runs again
                pass
        task.result, task.error, task.status = result, error, status
        task.finished_at = time.monotonic()

    def _purge(self) -> None:
        """Drop the results older than the ttl."""
        now = time.monotonic()
        gone = [t.id for t in self._tasks.values() if t.finished_at is not None and now - t.finished_at > self.ttl_s]
        for tid in gone:
            del self._tasks[tid]
        if self._log is not None:
            self._log.delete(gone)

    def _make_room(self, room: int = 1) -> None:
        """Room for `room` more tasks, at the cost of the oldest finished results. Only a new task (or the start)
        may evict: a poll (get) that evicted would drop results nobody has fetched yet, the polled one among them."""
        over = len(self._tasks) - self.max_tasks + room
        if over > 0:  # drop the oldest finished ones first
            gone = [t.id for t in self._tasks.values() if t.finished_at is not None][:over]
            for tid in gone:
                del self._tasks[tid]
            if self._log is not None:
                self._log.delete(gone)

    def cancel_all(self) -> None:
        for t in self._tasks.values():
            if t.handle is not None and not t.handle.done():
                t.handle.cancel()

    async def stop(self) -> None:
        """At shutdown: cancel the running tasks (on record as running, they run again at the next start), wait
        for them to wind down, close the record."""
        self.cancel_all()
        running = [t.handle for t in self._tasks.values() if t.handle is not None]
        await asyncio.gather(*running, return_exceptions=True)
        if self._log is not None:
            self._log.close()
