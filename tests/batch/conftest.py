"""Batch test fixtures: one shared AsyncEngine on the tiny checkpoint, real uvicorn servers on loopback (each on
its own data dir), batch input files, and polling helpers."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from glm_serve.api import ServerSettings
from glm_serve.engine.async_engine import AsyncEngine
from glm_serve.engine.config import EngineConfig
from glm_serve.engine.engine import LLMEngine

from api.conftest import _free_port, start_server  # tests/ is on sys.path (rootdir-relative packages)

MODEL = "glm-4-tiny"
ALIASES = [MODEL, "glm-4-plus", "glm-4-flash"]
TERMINAL = ("completed", "failed", "expired", "cancelled")


@dataclass
class Server:
    url: str  # http://127.0.0.1:PORT
    app: object
    engine: AsyncEngine
    uvicorn: object
    thread: threading.Thread

    @property
    def vendor_base(self) -> str:
        return self.url + "/api/paas/v4/"

    @property
    def worker(self):
        return self.app.state.batches.worker

    def stop(self) -> None:
        self.uvicorn.should_exit = True
        # Generous: on a loaded 2-core machine the shutdown (batch worker, aborts) has taken over 20 s, and a
        # server still stopping keeps its data dir locked for the next one.
        self.thread.join(timeout=90)
        assert not self.thread.is_alive(), "the server did not stop within 90 s\n" + _stuck_report()


def _stuck_report() -> str:
    """Where a server that does not stop is stuck: every thread's stack and every pending task of the running
    event loops (a hang seen once in CI, under load, and not reproduced since)."""
    import asyncio  # noqa: PLC0415
    import gc  # noqa: PLC0415
    import io  # noqa: PLC0415
    import sys  # noqa: PLC0415
    import traceback  # noqa: PLC0415

    out = io.StringIO()
    for ident, frame in sys._current_frames().items():
        out.write(f"--- thread {ident}\n{''.join(traceback.format_stack(frame))}")
    for loop in [o for o in gc.get_objects() if issubclass(type(o), asyncio.AbstractEventLoop) and o.is_running()]:
        for task in list(asyncio.all_tasks(loop)):
            out.write(f"--- task {task!r}\n")
            task.print_stack(file=out)
    return out.getvalue()


def free_port() -> int:
    return _free_port()


@pytest.fixture(scope="session")
def engine(tiny_hf):
    eng = AsyncEngine(LLMEngine(EngineConfig(model=str(tiny_hf), kv_cache_tokens=16384, max_batch_tokens=1024,
                                             max_num_seqs=64, max_model_len=2048)))
    yield eng
    eng.shutdown()


@pytest.fixture(scope="session")
def make_server(engine):
    """Start a server over the shared engine (stopped at the end of the session unless stopped before)."""
    running: list[Server] = []

    def make(**kw) -> Server:
        kw.setdefault("served_model_names", ALIASES)
        api, server, thread = start_server(engine, ServerSettings(**kw))
        srv = Server(api.url, api.app, engine, server, thread)
        running.append(srv)
        return srv

    yield make
    for srv in running:
        srv.stop()


@pytest.fixture(scope="module")
def server(make_server, tmp_path_factory) -> Server:
    return make_server(data_dir=tmp_path_factory.mktemp("data"), batch_concurrency=8)


def chat_body(content: str, max_tokens: int = 4, model: str = "glm-4-plus", **kw) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
            "do_sample": False, **kw}


def batch_line(custom_id: str, body: dict, url: str = "/v4/chat/completions") -> str:
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": url, "body": body}, ensure_ascii=False)


def write_jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def read_jsonl(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def wait_batch(base: str, batch_id: str, statuses=TERMINAL, timeout: float = 120.0, headers=None) -> dict:
    """Poll GET /batches/{id} until its status is one of `statuses`."""
    deadline = time.monotonic() + timeout
    while True:
        b = httpx.get(f"{base}batches/{batch_id}", headers=headers, timeout=10).json()
        if b["status"] in statuses:
            return b
        if time.monotonic() > deadline:
            raise AssertionError(f"batch {batch_id} still {b['status']} after {timeout}s: {b['request_counts']}")
        time.sleep(0.05)


def upload(base: str, path: Path, headers=None) -> str:
    with open(path, "rb") as f:
        r = httpx.post(f"{base}files", files={"file": (path.name, f, "application/jsonl")},
                       data={"purpose": "batch"}, headers=headers, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()["id"]


def create(base: str, file_id: str, window: str = "24h", headers=None, **kw) -> dict:
    r = httpx.post(f"{base}batches", json={"input_file_id": file_id, "endpoint": "/v4/chat/completions",
                                           "completion_window": window, **kw}, headers=headers, timeout=10)
    assert r.status_code == 200, r.text
    return r.json()


def content(base: str, file_id: str, headers=None) -> str:
    r = httpx.get(f"{base}files/{file_id}/content", headers=headers, timeout=30)
    assert r.status_code == 200, r.text
    return r.text


class frozen:
    """Hold the engine loop before its next step until exit: requests stay in flight, nothing is generated."""

    def __init__(self, engine: AsyncEngine):
        self.core, self.gate = engine.engine, threading.Event()

    def __enter__(self):
        real, core, gate = type(self.core).step, self.core, self.gate

        def step():
            gate.wait(timeout=60)
            return real(core)

        core.step = step
        return self

    def __exit__(self, *exc):
        del self.core.step
        self.gate.set()


def wait_for(cond, timeout: float = 60.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while not (value := cond()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)
    return value
