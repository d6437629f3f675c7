"""A batch whose engine process dies mid-run loses nothing: the lines that were running when it died are not
recorded as failed (they failed because of the engine, not because of themselves; their run counts as one at a
crash, as when the whole server dies), no new line starts, and the next server on the same data dir answers every
line."""

from __future__ import annotations

import os
import signal
import time

import httpx

from glm_serve.api import ServerSettings
from glm_serve.engine.config import EngineConfig
from glm_serve.engine.process import ProcessEngine

from api.conftest import start_server  # tests/ is on sys.path (rootdir-relative packages)

from .conftest import ALIASES, batch_line, chat_body, content, create, read_jsonl, upload, wait_batch, wait_for, \
    write_jsonl

LINES = 12


def test_lines_running_when_the_engine_process_dies_run_again_after_a_restart(tiny_hf, tmp_path, make_server):
    data = tmp_path / "data"
    eng = ProcessEngine(EngineConfig(model=str(tiny_hf), kv_cache_tokens=16384, max_batch_tokens=1024,
                                     max_num_seqs=64, max_model_len=2048))
    api, server, thread = start_server(eng, ServerSettings(served_model_names=ALIASES, data_dir=data,
                                                           batch_concurrency=4))
    base = api.vendor_base
    try:
        lines = [batch_line(f"q{i}", chat_body(f"question {i}", max_tokens=400, ignore_eos=True))
                 for i in range(LINES)]
        batch = create(base, upload(base, write_jsonl(tmp_path / "in.jsonl", lines)))
        worker = api.app.state.batches.worker
        wait_for(lambda: worker.in_flight > 0, what="lines in flight")
        time.sleep(0.5)  # the lines run
        os.kill(eng.pid, signal.SIGKILL)
        wait_for(lambda: not eng.alive, what="the engine process gone")
        wait_for(lambda: worker.in_flight == 0, what="the running lines to end")
        time.sleep(1.5)  # a poll or two of the worker: it must not start lines on a dead engine
        b = httpx.get(f"{base}batches/{batch['id']}", timeout=10).json()
        assert b["status"] == "in_progress" and b["request_counts"]["failed"] == 0, b
        assert b["request_counts"]["completed"] < LINES
        # ...but their run counts as one at a crash, as when the whole server dies: a line that kills the engine
        # process (a GPU fault, the OOM killer) is not run again after MAX_LINE_CRASHES deaths (worker.py)
        store = api.app.state.batches.store
        assert any(item.starts == 1 for item in store.pending_items(batch["id"], LINES, set()))
    finally:
        server.should_exit = True
        thread.join(timeout=20)
        eng.shutdown()

    srv = make_server(data_dir=data, batch_concurrency=8)  # the restart (an engine on a thread this time)
    done = wait_batch(srv.vendor_base, batch["id"])
    assert done["status"] == "completed" and done["request_counts"] == {"total": LINES, "completed": LINES,
                                                                        "failed": 0}, done
    out = read_jsonl(content(srv.vendor_base, done["output_file_id"]))
    assert sorted(r["custom_id"] for r in out) == sorted(f"q{i}" for i in range(LINES))
    assert all(r["response"]["status_code"] == 200 for r in out)
