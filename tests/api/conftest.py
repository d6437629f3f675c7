"""Real servers for the API tests: uvicorn on a free loopback port in a background thread, over one shared
AsyncEngine built on the tiny checkpoint (the slow part, done once per session)."""

from __future__ import annotations

import http.server
import socket
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass

import pytest
import uvicorn

from glm_serve.api import ServerSettings, create_app
from glm_serve.engine.async_engine import AsyncEngine
from glm_serve.engine.config import EngineConfig
from glm_serve.engine.engine import LLMEngine

# Two keys in the vendor's `id.secret` format (fake: made up for the tests).
KEY_A = "testida.secret-aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"
KEY_B = "testidb.secret-bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb"
MODEL = "glm-4-tiny"
ALIASES = [MODEL, "glm-4-plus", "glm-4-flash"]


@dataclass
class Server:
    url: str  # http://127.0.0.1:PORT
    app: object
    engine: AsyncEngine

    @property
    def vendor_base(self) -> str:
        return self.url + "/api/paas/v4/"

    @property
    def openai_base(self) -> str:
        return self.url + "/v1"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(engine: AsyncEngine, settings: ServerSettings, **uvicorn_options):
    """uvicorn_options: more uvicorn.Config arguments (ssl_certfile and ssl_keyfile: the URL is https)."""
    app = create_app(engine, settings)
    # The listening socket is bound here and handed to uvicorn: a port picked free and bound later by uvicorn
    # could be taken in between (by any socket of this busy process, or another one's).
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on", **uvicorn_options)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    scheme = "https" if uvicorn_options.get("ssl_certfile") else "http"
    return Server(f"{scheme}://127.0.0.1:{port}", app, engine), server, thread


@pytest.fixture(scope="session")
def engine(tiny_hf):
    eng = AsyncEngine(LLMEngine(EngineConfig(model=str(tiny_hf), kv_cache_tokens=8192, max_batch_tokens=512,
                                             max_num_seqs=32, max_model_len=2048)))
    yield eng
    eng.shutdown()


@pytest.fixture(scope="session")
def make_server(engine):
    """Start a server with the given settings (stopped at the end of the session)."""
    running = []

    def make(**kw) -> Server:
        kw.setdefault("served_model_names", ALIASES)
        srv, server, thread = start_server(engine, ServerSettings(**kw))
        running.append((server, thread))
        return srv

    yield make
    for server, thread in running:
        server.should_exit = True
    for server, thread in running:
        thread.join(timeout=10)


@pytest.fixture(scope="session")
def server(make_server) -> Server:
    """An open server (no keys, no limits)."""
    return make_server()


class held_grammar_compiles:
    """Make every JSON-mode grammar compile wait in whichever thread compiles it (as a real compile of a new schema
    does for up to seconds, with the GIL released) until the test lets it go: `next_compile()` waits for a compile
    to begin and returns the Event that ends it. While it is held the test can show that the server answers others
    (a compile on the event loop would hold every request until it ends: the test's request would time out). No
    wall-clock bound on how fast the server answers, so a loaded machine cannot fail it.
    .threads: the names of the threads that compiled."""

    HOLD_S = 60.0  # a compile nobody lets go of ends by itself (a failed test must not hang the server for good)

    def __init__(self, ctx, monkeypatch):
        import queue

        real = ctx.constraint_factory()
        self.threads: list[str] = []
        self._waiting: queue.Queue = queue.Queue()
        threads, waiting, hold = self.threads, self._waiting, self.HOLD_S

        class Held:
            def json_object(self):
                threads.append(threading.current_thread().name)
                go = threading.Event()
                waiting.put(go)
                go.wait(timeout=hold)
                return real.json_object()

        monkeypatch.setattr(ctx, "constraint_factory", lambda: Held())

    def next_compile(self, timeout: float = 60.0) -> threading.Event:
        """Wait for a compile to begin; -> the Event that lets it finish (set it)."""
        return self._waiting.get(timeout=timeout)

    def poll(self) -> threading.Event | None:
        """A compile that has begun and is held, if any."""
        import queue

        try:
            return self._waiting.get_nowait()
        except queue.Empty:
            return None


def wait_idle(engine: AsyncEngine, timeout: float = 10.0) -> None:
    """Wait until the engine holds no request and every KV block is free."""
    core = engine.engine
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        bm = core.block_manager
        if not core.requests and bm.num_free_blocks == bm.num_blocks:
            return
        time.sleep(0.02)
    raise AssertionError(f"engine not idle: {len(core.requests)} requests, "
                         f"{core.block_manager.num_free_blocks}/{core.block_manager.num_blocks} blocks free")


def engine_answer(engine: AsyncEngine, messages, max_tokens: int, tools=None, constraint=None, **params):
    """The engine's own greedy answer for a conversation, straight from the AsyncEngine (no HTTP): (raw text,
    token ids, prompt ids)."""
    import asyncio
    import uuid

    from glm_serve.chat import encode_chat
    from glm_serve.engine.async_engine import merge_final
    from glm_serve.sampling_params import SamplingParams

    tok = engine.engine.tokenizer
    ids = encode_chat(tok, messages, tools=tools, chat_template=tok.chat_template)
    sp = SamplingParams(temperature=0.0, max_tokens=max_tokens, **params)

    async def run():
        return [o async for o in engine.generate(uuid.uuid4().hex, ids, sp, [constraint] if constraint else None)]

    final = merge_final(asyncio.run(run()))[0]
    return final.text, final.token_ids, ids


class frozen_engine:
    """Hold the engine loop before its next step (requests stay in flight, nothing is generated) until exit.
    Lets a test keep a request open for as long as it needs, whatever the machine's speed."""

    def __init__(self, engine: AsyncEngine):
        self.core, self.gate = engine.engine, threading.Event()

    def __enter__(self):
        real = type(self.core).step
        gate = self.gate

        def step():
            gate.wait(timeout=60)
            return real(self.core)

        self.core.step = step
        return self

    def __exit__(self, *exc):
        del self.core.step
        self.gate.set()


@contextmanager
def static_http(body: bytes):
    """A plain HTTP server on loopback answering every GET with 200 and `body` (a web page, or JSON that is not an
    API's): a --url pointing at something that is not our server. Yields its base URL."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}"
    finally:
        srv.shutdown()
        srv.server_close()
