"""ServerSettings (the server's own flags) and ServingContext: what every route needs (engine, tokenizer,
model names, generation defaults, keys, admission, metrics, the constraint factory, the content filter), built once
per app."""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from glm_serve.api.auth import Admission, KeyStore
from glm_serve.api.content_filter import ContentFilter
from glm_serve.api.errors import APIError
from glm_serve.api.metrics import Metrics
from glm_serve.engine.async_engine import EngineFrontend

log = logging.getLogger(__name__)

MAX_N = 128  # choices per request; OpenAI's own ceiling
MAX_TOOLS = 128  # the vendor's limit


@dataclass
class ServerSettings:
    served_model_names: list[str] = field(default_factory=list)  # empty = derived from the model argument
    api_keys: list[str] = field(default_factory=list)  # empty = no authentication
    max_concurrency_per_key: int | None = None  # in-flight requests per key (429 / 1302)
    max_requests_per_minute_per_key: int | None = None  # admitted requests per key and minute (429 / 1303)
    max_queue: int | None = None  # requests waiting beyond the engine's max_num_seqs (429 / 1305)
    max_body_bytes: int = 32 << 20  # request bodies above this are refused with 413
    task_ttl_s: float = 3600.0  # how long finished async-task results are kept
    max_tasks: int = 10000  # async-task records kept at most (oldest finished ones dropped first)
    data_dir: Path | None = None  # batch files and state (glm_serve/batch); None = a temporary folder
    batch_concurrency: int = 32  # batch sequences in flight at most, a line counting its n (glm_serve/batch/worker.py)
    allow_image_urls: bool = False  # GLM-4V: fetch http(s) image URLs (size/time limited); base64 always works
    allowed_origins: list[str] = field(default_factory=list)  # CORS: browser pages (origins) that may call us; "*" any
    log_stats_interval_s: float = 0.0  # a throughput/queue/cache line in the log this often (api/stats_log.py); 0 = off
    # The content filter's terms (--blocked-words, read by api/content_filter.read_blocked_words); empty = off
    blocked_words: list[str] = field(default_factory=list)

    def __post_init__(self):
        if any(not name.strip() for name in self.served_model_names):  # a server only an empty name reaches
            raise ValueError(f"served model names (--served-model-name) must not be blank, got "
                             f"{self.served_model_names!r}")
        if self.max_body_bytes < 1024:
            raise ValueError(f"max_body_bytes must be >= 1024, got {self.max_body_bytes}")
        if self.max_queue is not None and self.max_queue < 0:
            raise ValueError(f"max_queue (--max-queue) must be >= 0, got {self.max_queue}")
        if not self.log_stats_interval_s >= 0:  # (NaN too)
            raise ValueError(f"log_stats_interval_s (--log-stats-interval) must be >= 0, got "
                             f"{self.log_stats_interval_s}")
        for origin in self.allowed_origins:
            # An origin is scheme://host[:port], exactly as a browser sends it: a path or a trailing slash would
            # never match, and the operator would see every browser call refused without knowing why.
            if origin != "*" and not _is_origin(origin):
                raise ValueError(f"--allowed-origin {origin!r} is not an origin: write scheme://host[:port] "
                                 "(no path, no trailing slash), or * for any")
        if self.batch_concurrency < 1:
            raise ValueError(f"batch_concurrency (--batch-concurrency) must be >= 1, got {self.batch_concurrency}")
        if any(not isinstance(w, str) or not w.strip() for w in self.blocked_words):
            raise ValueError("blocked_words (--blocked-words) must be non-blank strings")


def _is_origin(origin: str) -> bool:
    from urllib.parse import urlsplit  # noqa: PLC0415

    try:
        u = urlsplit(origin)
        u.port  # noqa: B018 (raises ValueError for a port that is not a number)
    except ValueError:
        return False
    return (u.scheme in ("http", "https") and bool(u.hostname) and not u.path and not u.query and not u.fragment
            and not u.username and f"{u.scheme}://{u.netloc}" == origin)


@dataclass
class GenerationDefaults:
    """The checkpoint's generation_config.json sampling defaults, used when a request omits a value."""

    do_sample: bool = True
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None

    @classmethod
    def from_checkpoint(cls, model_dir: Path) -> GenerationDefaults:
        path = Path(model_dir) / "generation_config.json"
        if not path.is_file():
            return cls()
        try:
            cfg = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            log.warning("ignoring unreadable %s: %s", path, e)
            return cls()

        def num(key, kind):
            v = cfg.get(key)
            return kind(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None

        return cls(do_sample=cfg.get("do_sample", True) is not False, temperature=num("temperature", float),
                   top_p=num("top_p", float), top_k=num("top_k", int))


def default_model_names(model_arg: str, model_path: Path) -> list[str]:
    names = [model_arg, Path(model_path).name]
    if "/" in model_arg:  # a hub id: also answer to its bare name
        names.append(model_arg.rsplit("/", 1)[1])
    return list(dict.fromkeys(n for n in names if n))


class ServingContext:
    def __init__(self, engine: EngineFrontend, settings: ServerSettings):
        core = engine.engine
        self.engine = engine
        self.core = core  # the LLMEngine (or, with --engine-process, its RemoteCore): config, tokenizer, validate(), stats()
        self.tokenizer = core.tokenizer
        self.settings = settings
        self.model_names = list(settings.served_model_names) or default_model_names(core.config.model,
                                                                                    core.model_path)
        self.max_model_len: int = core.max_model_len
        self.max_n = min(MAX_N, core.config.max_num_seqs)
        self.defaults = GenerationDefaults.from_checkpoint(core.model_path)
        self.keys = KeyStore(settings.api_keys)
        in_flight = None if settings.max_queue is None else core.config.max_num_seqs + settings.max_queue
        self.admission = Admission(settings.max_concurrency_per_key, in_flight,
                                   settings.max_requests_per_minute_per_key)
        self.metrics = Metrics(core, engine)
        # None when off: then nothing is checked and SamplingParams carry no blocked strings
        self.content_filter = ContentFilter(settings.blocked_words, self.metrics.content_filtered.labels(
            stage="input").inc) if settings.blocked_words else None
        self.created = int(time.time())
        self.active_request_ids: set[tuple[str | None, str]] = set()  # (key id, client request_id) in flight: 1231
        self._factory = None
        self._factory_lock = threading.Lock()
        # Chat preparation (templates, tokenizing, grammars: a new schema compiles for up to seconds) runs here,
        # off the event loop, in a pool of its own: slow schemas queue behind each other, not in front of the
        # default pool's file reads and image decoding.
        self._prepare_pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="glm-prepare")
        # Set when the server's shutdown grace is about to run out: answers still running end now, in the API's
        # own format (an error body, an in-band stream error), before the server cancels them (begin_shutdown).
        self.closing = asyncio.Event()

    def begin_shutdown(self, grace_s: float | None) -> None:
        """The server stopped accepting requests and gives those in flight `grace_s` seconds (None: no limit).
        Shortly before that runs out, `closing` is set (on the running event loop)."""
        if grace_s is not None:
            at = max(0.0, grace_s - min(1.0, grace_s / 10))  # leave time to send the error answers
            asyncio.get_running_loop().call_later(at, self.closing.set)

    def shutting_down_error(self) -> APIError:
        return APIError("500", "the server is shutting down; send the request again", status=503)

    def check_model(self, name: str, status: int | None = None) -> str:
        if name not in self.model_names:
            raise APIError("1211", f"model {name!r} does not exist; this server serves "
                                   f"{', '.join(repr(n) for n in self.model_names)}", "model", status=status)
        return name

    def constraint_factory(self):
        """The xgrammar constraint factory, built on first use (compiling the vocabulary takes a moment)."""
        with self._factory_lock:
            if self._factory is None:
                from glm_serve.constrain import ConstraintFactory  # noqa: PLC0415

                self._factory = ConstraintFactory(self.tokenizer, self.core.model_config.vocab_size)
            return self._factory

    async def off_loop(self, fn, *args):
        """fn(*args) in the preparation pool (see __init__), awaited from the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self._prepare_pool, functools.partial(fn, *args))

    @staticmethod
    def new_id(prefix: str) -> str:
        return f"{prefix}-{uuid.uuid4().hex}"
