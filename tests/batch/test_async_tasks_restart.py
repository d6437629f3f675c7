"""Async chat tasks outlive the server on its data dir: a task still running at shutdown runs again at the next
start (same id, same answer as the chat endpoint), a finished result is still there after a restart, and one
older than its time to live is gone. Nothing accepted is lost."""

from __future__ import annotations

import time

import httpx

from glm_serve.api.task_log import TaskLog

from .conftest import chat_body, frozen, wait_for


def _submit(srv, body: dict) -> str:
    r = httpx.post(srv.vendor_base + "async/chat/completions", json=body, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()["id"]


def _result(srv, task_id: str) -> dict:
    return httpx.get(srv.vendor_base + f"async-result/{task_id}", timeout=30).json()


def test_tasks_in_flight_run_again_and_results_stay_after_a_restart(make_server, tmp_path):
    data = tmp_path / "data"
    done_body = chat_body("finished before the stop", max_tokens=6)
    running_body = chat_body("still running at the stop 数学", max_tokens=9, request_id="client-7")
    srv = make_server(data_dir=data)
    done = _submit(srv, done_body)
    wait_for(lambda: _result(srv, done)["task_status"] == "SUCCESS", what="the first task")
    before = _result(srv, done)
    with frozen(srv.engine):  # the second task cannot finish before the server stops
        running = _submit(srv, running_body)
        assert _result(srv, running)["task_status"] == "PROCESSING"
        srv.stop()
    srv = make_server(data_dir=data)  # the next start, on the same data dir
    again = wait_for(lambda: (r := _result(srv, running))["task_status"] != "PROCESSING" and r, what="the rerun")
    want = httpx.post(srv.vendor_base + "chat/completions", json=running_body, timeout=60).json()
    assert again["task_status"] == "SUCCESS" and again["request_id"] == "client-7"
    assert again["choices"] == want["choices"] and again["usage"]["completion_tokens"] == 9
    assert _result(srv, done) == before  # a result from before the restart, as it was
    srv.stop()


def test_a_result_past_its_time_to_live_is_gone_after_a_restart(make_server, tmp_path):
    data = tmp_path / "data"
    srv = make_server(data_dir=data, task_ttl_s=1.0)
    task = _submit(srv, chat_body("hi", max_tokens=2))
    wait_for(lambda: _result(srv, task)["task_status"] == "SUCCESS", what="the task")
    srv.stop()
    time.sleep(1.2)
    srv = make_server(data_dir=data, task_ttl_s=1.0)
    r = httpx.get(srv.vendor_base + f"async-result/{task}", timeout=30)
    assert r.status_code == 404 and r.json()["error"]["code"] == "1214"
    srv.stop()
    log = TaskLog(data / "tasks.sqlite3")  # and its record was dropped, not only hidden
    assert [row.id for row in log.load()] == []
    log.close()
