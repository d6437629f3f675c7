"""The async-task store (POST /async/chat/completions, GET /async-result/{id}): polling never drops a result;
only a new task makes room, at the cost of the oldest finished ones, and a full store of running tasks
refuses with 1305. With a TaskLog, a task is on disk before its id goes out, its outcome follows, and a submit
cancelled while the record is written leaves no task behind."""

from __future__ import annotations

import asyncio
import sqlite3
import threading

import pytest

from glm_serve.api.errors import APIError
from glm_serve.api.task_log import TaskLog
from glm_serve.api.tasks import SUCCESS, Task, TaskStore


async def _answer() -> dict:
    return {"choices": [], "usage": {}, "created": 0}


def test_polling_a_full_store_keeps_every_result():
    async def main():
        store = TaskStore(ttl_s=3600, max_tasks=2)
        for tid in ("a", "b"):
            await store.submit(Task(tid, tid, "m"), _answer(), lambda: None)
        await asyncio.sleep(0.01)
        # Both finished and the store is full: polls (several, in any order) find both.
        for tid in ("b", "a", "b", "a"):
            assert store.get(tid).status == SUCCESS
        # A new task makes room: the oldest finished result goes, the newer one stays.
        await store.submit(Task("c", "c", "m"), _answer(), lambda: None)
        with pytest.raises(APIError) as e:
            store.get("a")
        assert e.value.status == 404
        assert store.get("b").status == SUCCESS

    asyncio.run(main())


def test_a_store_full_of_running_tasks_refuses_without_leaking():
    async def main():
        store, released = TaskStore(ttl_s=3600, max_tasks=1), []
        gate = asyncio.Event()

        async def slow() -> dict:
            await gate.wait()
            return await _answer()

        await store.submit(Task("a", "a", "m"), slow(), lambda: released.append("a"))
        refused = _answer()
        with pytest.raises(APIError) as e:
            await store.submit(Task("b", "b", "m"), refused, lambda: released.append("b"))
        assert e.value.code == "1305" and released == ["b"]
        assert refused.cr_frame is None  # closed, not left for a "coroutine was never awaited" warning
        gate.set()
        await asyncio.sleep(0.01)
        assert store.get("a").status == SUCCESS and released == ["b", "a"]

    asyncio.run(main())


def test_a_task_result_is_fetched_with_the_key_that_submitted_it():
    async def main():
        store = TaskStore(ttl_s=3600, max_tasks=4)
        await store.submit(Task("t", "t", "m", owner="ka"), _answer(), lambda: None)
        await asyncio.sleep(0.01)
        assert store.get("t", "ka").status == SUCCESS
        with pytest.raises(APIError) as e:
            store.get("t", "kb")
        assert e.value.status == 404 and e.value.code == "1214"

    asyncio.run(main())


def _rows(path) -> list[tuple]:
    """What another connection (a restarted server) reads from the file."""
    db = sqlite3.connect(str(path))
    try:
        return db.execute("SELECT id, status, body FROM tasks ORDER BY seq").fetchall()
    finally:
        db.close()


def test_a_task_is_on_disk_before_submit_returns_and_its_outcome_follows(tmp_path):
    async def main():
        log = TaskLog(tmp_path / "tasks.sqlite3")
        store = TaskStore(ttl_s=3600, max_tasks=4, log_=log)
        gate = asyncio.Event()

        async def slow() -> dict:
            await gate.wait()
            return await _answer()

        await store.submit(Task("t", "t", "m"), slow(), lambda: None, {"messages": ["数学"]})
        assert _rows(tmp_path / "tasks.sqlite3") == [("t", "PROCESSING", '{"messages": ["数学"]}')]
        # The answer is ready but its record waits for a slow disk: polls see it running until it is on disk (after
        # a crash, a task a client saw finished must not run again and answer differently)
        disk = threading.Event()
        log._writer.submit(disk.wait)
        gate.set()
        for _ in range(20):
            await asyncio.sleep(0.01)
            assert store.get("t").status == "PROCESSING"
        disk.set()
        await store.get("t").handle
        assert store.get("t").status == SUCCESS
        await store.stop()  # closing the log waits for the queued outcome
        assert _rows(tmp_path / "tasks.sqlite3") == [("t", SUCCESS, None)]
        await log.finish("t", "FAIL", None, {"code": "500"})  # a write after the stop is dropped with a warning
        log.delete(["t"])
        assert _rows(tmp_path / "tasks.sqlite3") == [("t", SUCCESS, None)]

    asyncio.run(main())


def test_a_submit_cancelled_while_its_record_is_written_leaves_nothing(tmp_path):
    # The client goes away while the record is being written: no task in memory, none on record (it would run
    # again at the next start for nobody), its admission released and its work never started.
    async def main():
        log = TaskLog(tmp_path / "tasks.sqlite3")
        store, released = TaskStore(ttl_s=3600, max_tasks=4, log_=log), []
        disk = threading.Event()
        log._writer.submit(disk.wait)  # a slow disk: the add waits behind this
        work = _answer()
        submit = asyncio.ensure_future(store.submit(Task("t", "t", "m"), work, lambda: released.append("t"), {}))
        await asyncio.sleep(0.05)
        assert not submit.done()
        submit.cancel()
        with pytest.raises(asyncio.CancelledError):
            await submit
        disk.set()
        assert released == ["t"] and work.cr_frame is None
        with pytest.raises(APIError):
            store.get("t")
        await store.stop()
        assert _rows(tmp_path / "tasks.sqlite3") == []

    asyncio.run(main())
