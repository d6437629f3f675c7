"""A real `glm-serve serve` told to stop (SIGTERM) while long answers run: they get --shutdown-timeout seconds,
then end in the API's own format (a 503 error body; an in-band error event and [DONE] in a stream, which the
SDKs raise) and the process exits cleanly, instead of waiting for the answers to finish (minutes on a long
context) or for a supervisor's SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest

from glm_serve.api import ServerSettings

from .conftest import frozen_engine, start_server, wait_idle


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_up(proc: subprocess.Popen, port: int) -> None:
    """Until the server started as `proc` answers /health on `port` (it loads its model first)."""
    deadline = time.monotonic() + 120
    while True:
        assert proc.poll() is None and time.monotonic() < deadline, "server did not come up"
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.2)


def _wait_in_engine(base: str, n: int, timeout: float = 60.0) -> None:
    """Until the server's engine holds at least n sequences (running or waiting), as its /metrics say."""
    deadline = time.monotonic() + timeout
    while True:
        samples = {line.split()[0]: float(line.split()[-1])
                   for line in httpx.get(base + "/metrics", timeout=30).text.splitlines()
                   if line.startswith(("glm_serve_num_requests_running ", "glm_serve_num_requests_waiting "))}
        if sum(samples.values()) >= n:
            return
        assert time.monotonic() < deadline, f"the engine holds {samples}, not {n} sequences"
        time.sleep(0.05)


def _children(pid: int) -> set[int]:
    """The processes whose parent is `pid` (Linux /proc)."""
    found = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid and fields[0] != "Z":
                found.add(int(entry))
    return found


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


# The engine on a thread, stopped by SIGTERM (a supervisor); and in a process of its own (--engine-process),
# stopped by Ctrl-C or by a SIGTERM sent to the whole group (systemd's default KillMode=control-group): the
# engine process must not die of either mid-answer (the grace is the server's to give), and must end with the
# server.
@pytest.mark.parametrize("engine_process, group_signal", [(False, None), (True, signal.SIGINT),
                                                          (True, signal.SIGTERM)],
                         ids=["thread", "engine-process-ctrl-c", "engine-process-group-sigterm"])
def test_sigterm_ends_long_answers_in_the_api_format_after_the_shutdown_timeout(tiny_hf, tmp_path, engine_process,
                                                                                group_signal):
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "glm_serve.cli", "serve", "--model", str(tiny_hf), "--port",
                             str(port), "--served-model-name", "m", "--kv-cache-tokens", "65536",
                             "--shutdown-timeout", "2", "--log-level", "warning",
                             # its own data dir: the default one is locked by any other server on this machine
                             "--data-dir", str(tmp_path / "data"), *(["--engine-process"] * engine_process)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        _wait_up(proc, port)
        long = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 60000, "ignore_eos": True}
        got: dict = {}  # far more tokens than the test's whole run could generate

        def stream(name: str, url: str) -> None:
            try:
                req = {**long, "model": "m", "stream": True}
                if url.endswith("/v1/completions"):
                    req["prompt"] = req.pop("messages")[0]["content"]
                with httpx.stream("POST", url, json=req, timeout=120) as r:
                    got[name] = [line for line in r.iter_lines() if line][-2:]
            except httpx.HTTPError as e:
                got[name] = type(e).__name__

        def whole() -> None:
            try:
                r = httpx.post(f"{base}/v1/chat/completions", json={**long, "model": "m"}, timeout=120)
                got["whole"] = (r.status_code, r.json())
            except (httpx.HTTPError, ValueError) as e:
                got["whole"] = type(e).__name__

        base = f"http://127.0.0.1:{port}"
        readers = [threading.Thread(target=stream, args=("v1", f"{base}/v1/chat/completions")),
                   threading.Thread(target=stream, args=("completions", f"{base}/v1/completions")),
                   threading.Thread(target=whole)]
        for r in readers:
            r.start()
        _wait_in_engine(base, len(readers))  # the answers run (not a fixed 2 s: a loaded machine may take longer)
        assert all(r.is_alive() for r in readers), f"an answer ended before the signal: {got}"
        children = _children(proc.pid)
        assert children or not engine_process
        t0 = time.monotonic()
        if group_signal is not None:
            os.killpg(proc.pid, group_signal)  # Ctrl-C in a terminal; a supervisor stopping the whole group
        else:
            proc.send_signal(signal.SIGTERM)
        # uvicorn shuts down (the app's shutdown runs), then re-raises the signal it caught, as a process
        # stopped by SIGTERM should report (SIGINT: our cmd_serve catches the KeyboardInterrupt, exit 0)
        assert proc.wait(timeout=30) in (0, -signal.SIGTERM)
        deadline = time.monotonic() + 20
        while any(_alive(c) for c in children) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(_alive(c) for c in children), "a process of the server outlived it"
        for r in readers:
            r.join(timeout=30)
        assert time.monotonic() - t0 < 30
        status, body = got["whole"]
        assert status == 503 and "shutting down" in body["error"]["message"], got
        for name in ("v1", "completions"):
            error, done = got[name]
            assert done == "data: [DONE]", got
            assert "shutting down" in json.loads(error.removeprefix("data: "))["error"]["message"], got
    finally:
        if proc.poll() is None:
            proc.kill()


def _events(resp) -> list:
    return [line[6:] for line in resp.iter_lines() if line.startswith("data: ")]


def test_streams_that_end_as_the_grace_runs_out_end_normally_the_others_with_the_error(make_server):
    """In-process: `closing` set (the grace is about to run out). A stream whose last event is already due ends
    with its answer and [DONE]; only one that would go on gets the shutdown error (then [DONE])."""
    srv = make_server(served_model_names=["m"])
    srv.app.state.ctx.closing.set()  # no waiters yet: safe from this thread
    with httpx.Client(base_url=srv.openai_base, timeout=60) as client:
        for route, body in (("/completions", {"prompt": "hi"}),
                            ("/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})):
            for max_tokens, ends_normally in ((1, True), (8, False)):
                req = {"model": "m", "stream": True, "max_tokens": max_tokens, "ignore_eos": True, **body}
                with client.stream("POST", route, json=req) as resp:
                    assert resp.status_code == 200
                    events = _events(resp)
                assert events[-1] == "[DONE]", (route, max_tokens, events)
                errors = [e for e in events[:-1] if "error" in json.loads(e)]
                finishes = [c["finish_reason"] for e in events[:-1] for c in json.loads(e).get("choices", [])
                            if c.get("finish_reason")]
                if ends_normally:
                    assert not errors and finishes == ["length"], (route, events)
                else:
                    assert len(errors) == 1 and "shutting down" in json.dumps(errors[0]) and not finishes, \
                        (route, events)


def test_a_stream_still_waiting_for_its_first_token_when_the_grace_runs_out_gets_the_error(engine):
    """A stream with nothing to send (queued behind others, or in a long prefill: here the engine is held) has no
    output to notice `closing` at. It must still end with the shutdown error and [DONE] when the grace runs out,
    not be cut off by the server a moment later, and its engine request must be aborted."""
    srv, server, thread = start_server(engine, ServerSettings(served_model_names=["m"]))
    loop = server.servers[0].get_loop()
    got: dict = {}

    def stream(name: str, url: str, body: dict) -> None:
        req = {"model": "m", "stream": True, "max_tokens": 50, **body}
        try:
            with httpx.stream("POST", url, json=req, timeout=20) as r:
                got[name] = _events(r)
        except httpx.HTTPError as e:
            got[name] = type(e).__name__

    msgs = {"messages": [{"role": "user", "content": "hi"}]}
    readers = [threading.Thread(target=stream, args=("vendor", srv.vendor_base + "chat/completions", msgs)),
               threading.Thread(target=stream, args=("v1", srv.openai_base + "/chat/completions", msgs)),
               threading.Thread(target=stream, args=("completions", srv.openai_base + "/completions",
                                                     {"prompt": "hi"})),
               threading.Thread(target=stream, args=("responses", srv.openai_base + "/responses",
                                                     {"input": "hi", "max_output_tokens": 50}))]
    try:
        with frozen_engine(engine):
            for r in readers:
                r.start()
            # All of them wait for output from the engine, which makes no step. (Counted in the caller's sinks: the
            # held engine takes in one request and then waits in its step, the others' stay queued for it; counting
            # engine.engine.requests never reached 4, and the loop always ran out its 10 s and went on regardless.)
            deadline = time.monotonic() + 60
            while len(engine._sinks) < len(readers):
                assert time.monotonic() < deadline, f"{len(engine._sinks)} of {len(readers)} streams reached the engine"
                time.sleep(0.02)
            loop.call_soon_threadsafe(srv.app.state.ctx.begin_shutdown, 0.1)
            for r in readers:
                r.join(timeout=15)
        for name in ("vendor", "v1", "completions"):
            events = got[name]
            assert isinstance(events, list) and events[-1] == "[DONE]", got
            assert "shutting down" in json.loads(events[-2])["error"]["message"], got
        failed = json.loads(got["responses"][-1])  # the Responses stream's own end: response.failed, no [DONE]
        assert failed["type"] == "response.failed" and "shutting down" in failed["response"]["error"]["message"], got
        wait_idle(engine)  # aborted, not left to run
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def test_the_server_exits_with_an_error_when_its_engine_process_dies(tiny_hf, tmp_path):
    """Serving on with a dead engine would answer 503 until someone noticed: the server stops with exit code 1, so
    that a supervisor (systemd, a container's restart policy) starts a fresh one; batches resume there."""
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "glm_serve.cli", "serve", "--model", str(tiny_hf), "--port",
                             str(port), "--kv-cache-tokens", "4096", "--log-level", "warning", "--engine-process",
                             "--data-dir", str(tmp_path / "data")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _wait_up(proc, port)
        engine = [pid for pid in _children(proc.pid) if b"spawn_main" in open(f"/proc/{pid}/cmdline", "rb").read()]
        assert len(engine) == 1, engine
        os.kill(engine[0], signal.SIGKILL)
        assert proc.wait(timeout=30) == 1
        assert "engine process has stopped" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
