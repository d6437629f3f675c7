"""The async-task store (POST /async/chat/completions, GET /async-result/{id}): polling never drops a result;
only a new task makes room, at the cost of the oldest finished ones, and a full store of running tasks
refuses with 1305."""

from __future__ import annotations

import asyncio

import pytest

from glm_serve.api.errors import APIError
from glm_serve.api.tasks import SUCCESS, Task, TaskStore


async def _answer() -> dict:
    return {"choices": [], "usage": {}, "created": 0}


def test_polling_a_full_store_keeps_every_result():
    async def main():
        store = TaskStore(ttl_s=3600, max_tasks=2)
        for tid in ("a", "b"):
            store.submit(Task(tid, tid, "m"), _answer(), lambda: None)
        await asyncio.sleep(0.01)
        # Both finished and the store is full: polls (several, in any order) find both.
        for tid in ("b", "a", "b", "a"):
            assert store.get(tid).status == SUCCESS
        # A new task makes room: the oldest finished result goes, the newer one stays.
        store.submit(Task("c", "c", "m"), _answer(), lambda: None)
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

        store.submit(Task("a", "a", "m"), slow(), lambda: released.append("a"))
        refused = _answer()
        with pytest.raises(APIError) as e:
            store.submit(Task("b", "b", "m"), refused, lambda: released.append("b"))
        assert e.value.code == "1305" and released == ["b"]
        assert refused.cr_frame is None  # closed, not left for a "coroutine was never awaited" warning
        gate.set()
        await asyncio.sleep(0.01)
        assert store.get("a").status == SUCCESS and released == ["b", "a"]

    asyncio.run(main())


def test_a_task_result_is_fetched_with_the_key_that_submitted_it():
    async def main():
        store = TaskStore(ttl_s=3600, max_tasks=4)
        store.submit(Task("t", "t", "m", owner="ka"), _answer(), lambda: None)
        await asyncio.sleep(0.01)
        assert store.get("t", "ka").status == SUCCESS
        with pytest.raises(APIError) as e:
            store.get("t", "kb")
        assert e.value.status == 404 and e.value.code == "1214"

    asyncio.run(main())
