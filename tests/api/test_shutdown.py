"""A real `glm-serve serve` told to stop (SIGTERM) while a long answer streams: the answer gets
--shutdown-timeout seconds, then its connection is closed and the process exits cleanly, instead of waiting for
the answer to finish (minutes on a long context) or for a supervisor's SIGKILL."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import threading
import time

import httpx


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sigterm_ends_a_long_stream_after_the_shutdown_timeout(tiny_hf):
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "glm_serve.cli", "serve", "--model", str(tiny_hf), "--port",
                             str(port), "--served-model-name", "m", "--kv-cache-tokens", "65536",
                             "--shutdown-timeout", "1", "--log-level", "warning"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, "server did not come up"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        got: dict = {}

        def stream() -> None:  # far more tokens than the test's whole run could generate
            body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 60000,
                    "ignore_eos": True, "stream": True}
            try:
                with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/chat/completions", json=body,
                                  timeout=120) as r:
                    got["chunks"] = sum(1 for line in r.iter_lines() if line)
                got["ended"] = "complete"
            except httpx.HTTPError as e:
                got["ended"] = type(e).__name__

        reader = threading.Thread(target=stream)
        reader.start()
        time.sleep(2)  # the answer streams
        assert reader.is_alive(), f"the answer ended before the signal: {got}"
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        # uvicorn shuts down (the app's shutdown runs), then re-raises the signal it caught, as a process
        # stopped by SIGTERM should report
        assert proc.wait(timeout=30) in (0, -signal.SIGTERM)
        reader.join(timeout=30)
        assert time.monotonic() - t0 < 30
        assert got.get("ended") == "RemoteProtocolError", got  # cut short, not finished
    finally:
        if proc.poll() is None:
            proc.kill()
