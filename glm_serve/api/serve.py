"""`glm-serve serve`: its flags, building the engine (slow, before uvicorn starts), the start-up log, and
running uvicorn. Heavy imports happen inside cmd_serve so `glm-serve --help` stays fast."""

from __future__ import annotations

import logging
import os

log = logging.getLogger("glm_serve.serve")

KEYS_ENV = "GLM_SERVE_API_KEYS"  # comma-separated keys, added to --api-key


def add_serve_parser(sub, add_model_args) -> None:
    s = sub.add_parser("serve", help="serve a checkpoint over HTTP (the vendor's v4 API and OpenAI's /v1)",
                       description="Serve a GLM-4 checkpoint: /api/paas/v4 (vendor SDKs), /v1 (openai SDK), "
                                   "/health, /metrics.")
    add_model_args(s)
    s.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    s.add_argument("--port", type=int, default=8000, help="default %(default)s")
    s.add_argument("--served-model-name", action="append", default=None, metavar="NAME",
                   help="a model name clients may ask for; repeat for aliases (e.g. glm-4-plus, glm-4-flash). "
                        "Default: the --model argument and its folder name")
    s.add_argument("--api-key", action="append", default=None, metavar="KEY",
                   help=f"require this key (raw, or the SDKs' JWT made from an id.secret key); repeatable; also "
                        f"${KEYS_ENV} (comma-separated). Default: no authentication")
    s.add_argument("--max-concurrency-per-key", type=int, default=None,
                   help="in-flight requests per api key before 429 / code 1302 (default: unlimited; counts per "
                        "key, so it needs --api-key)")
    s.add_argument("--max-requests-per-minute-per-key", type=int, default=None, metavar="N",
                   help="requests per api key and minute before 429 / code 1303 with Retry-After (a key may use "
                        "its minute in one burst; default: unlimited; needs --api-key)")
    s.add_argument("--max-queue", type=int, default=None,
                   help="requests allowed to wait beyond --max-num-seqs before 429 / code 1305 (default: unlimited)")
    s.add_argument("--max-body-mb", type=float, default=32.0, help="largest request body accepted, in MiB (413 above; default %(default)g)")
    s.add_argument("--allowed-origin", action="append", default=None, metavar="ORIGIN",
                   help="let browser pages from this origin (scheme://host[:port], or * for any) call the API "
                        "(CORS); repeatable. Default: none (same-origin only)")
    s.add_argument("--ssl-certfile", default=None, metavar="FILE",
                   help="serve HTTPS with this PEM certificate (chain); needs --ssl-keyfile")
    s.add_argument("--ssl-keyfile", default=None, metavar="FILE",
                   help="the certificate's PEM private key (unencrypted)")
    add_blocked_words_arg(s)
    s.add_argument("--allow-image-urls", action="store_true",
                   help="GLM-4V: fetch http(s) image URLs (20 MiB, 10 s limits); base64 and data URLs always work")
    s.add_argument("--data-dir", default=None, metavar="DIR",
                   help="where uploaded files, batch state and batch outputs live (default: "
                        "$XDG_DATA_HOME/glm-serve, else ~/.local/share/glm-serve)")
    s.add_argument("--batch-concurrency", type=int, default=32,
                   help="batch sequences in flight at most (a line asking for n choices counts n; capped at half "
                        "of --max-num-seqs; a quarter of it while interactive requests are in flight; default %(default)s)")
    s.add_argument("--shutdown-timeout", type=float, default=30.0, metavar="SECONDS",
                   help="on SIGTERM or Ctrl-C, requests in flight get this long to finish; those still running "
                        "then end in the API's format (HTTP 503 with an error body; in a stream an error event and "
                        "[DONE]). Batch jobs and async tasks resume at the next start (default %(default)g)")
    s.add_argument("--engine-process", action="store_true",
                   help="run the engine (model, scheduler, outputs) in a process of its own instead of a thread of "
                        "the server's: the HTTP work and the engine's launches then no longer share one GIL "
                        "(for hundreds of concurrent streams)")
    add_engine_args(s)
    s.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    s.add_argument("--log-stats-interval", type=float, default=10.0, metavar="SECONDS",
                   help="log a line of throughput, running/waiting requests and cache use this often while there "
                        "is work (0: never; default %(default)g)")
    s.set_defaults(fn=cmd_serve)


def add_blocked_words_arg(p) -> None:
    """The content filter's flag (serve and batch)."""
    p.add_argument("--blocked-words", default=None, metavar="FILE",
                   help="content filter: a UTF-8 file of terms, one a line (blank lines and # comments skipped). A "
                        "request whose input holds one gets 400 / code 1301; an answer ends just before one, with "
                        "finish_reason sensitive (/v1: content_filter). ASCII letters match in either case. "
                        "Default: no filter")


def blocked_words(path: str | None) -> list[str]:
    """The terms of --blocked-words (none without it); ValueError for a file that is missing, unreadable or empty."""
    if path is None:
        return []
    from glm_serve.api.content_filter import read_blocked_words  # noqa: PLC0415

    return read_blocked_words(path)


def add_engine_args(p) -> None:
    """Engine flags shared by `serve` and `batch` (read by engine_config)."""
    p.add_argument("--max-model-len", type=int, default=None, help="context window (default: the checkpoint's, "
                                                                   "capped by the KV cache)")
    p.add_argument("--block-size", type=int, default=16, help="KV-cache block size in tokens (a power of two; "
                                                                   "default %(default)s)")
    p.add_argument("--kv-cache-tokens", type=int, default=None, help="KV-cache capacity in tokens (default: "
                                                                     "from --gpu-memory-utilization)")
    p.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp8"],
                   help="auto (the default): the model's dtype; fp8: e4m3 values with a scale per token and KV head, "
                        "half of bf16's bytes per token (twice the context in the same memory), each key and value "
                        "rounded to e4m3 (1/16 relative at most)")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                   help="CUDA without --kv-cache-tokens: the share of the GPU's memory for weights, KV cache and a "
                        "step's peak (default %(default)s)")
    p.add_argument("--max-num-seqs", type=int, default=256, help="sequences in the running batch at most (default "
                                                                                 "%(default)s)")
    p.add_argument("--max-batch-tokens", type=int, default=2048, help="tokens per engine step at most (default "
                                                                                   "%(default)s)")
    p.add_argument("--no-prefix-caching", action="store_true", help="disable the prefix cache")
    p.add_argument("--chat-template", default=None, metavar="FILE",
                   help="a jinja chat template replacing the checkpoint's (a fine-tune's own; checked at start)")
    p.add_argument("--attention-backend", default="auto", choices=["auto", "torch", "triton"],
                   help="auto (the default): triton on CUDA, torch on the CPU")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="capture decode steps as CUDA graphs (triton backend; experimental: not yet verified on a GPU)")
    p.add_argument("--no-fused-ops", action="store_true",
                   help="with the triton backend, run a layer's norms, RoPE and silu * up as eager PyTorch ops "
                        "instead of our fused Triton kernels")
    p.add_argument("--no-overlap-scheduling", action="store_true",
                   help="schedule each step only after the previous one's tokens reached the host")
    p.add_argument("--seed", type=int, default=0, help="seed of the default generator (unseeded "
                                                                                     "requests; default %(default)s)")
    p.add_argument("--stream-interval", type=int, default=1,
                   help="a streamed request gets an output every N tokens per choice (the first token alone, the "
                        "end at once): above 1, less host work per token under heavy load, burstier streams (default "
                        "%(default)s)")


def api_keys(args_keys: list[str] | None) -> list[str]:
    """The keys of --api-key and $GLM_SERVE_API_KEYS. A key asked for but empty (`--api-key "$KEY"` or
    `GLM_SERVE_API_KEYS=$KEY` with KEY unset) is refused: dropped, it would start a server with no
    authentication at all, open to anyone who can reach it."""
    if any(not k.strip() for k in args_keys or []):
        raise ValueError("--api-key is empty (an unset variable?); leave the flag out to serve without keys")
    keys = [k.strip() for k in args_keys or []]
    env = os.environ.get(KEYS_ENV)
    if env is not None:
        if not env.strip(", \t\n"):
            raise ValueError(f"${KEYS_ENV} is set but holds no key (an unset variable?); unset it to serve "
                             "without keys")
        keys += [k.strip() for k in env.split(",") if k.strip()]
    return list(dict.fromkeys(keys))


def data_dir(arg: str | None):
    from pathlib import Path  # noqa: PLC0415

    from glm_serve.batch.store import default_data_dir  # noqa: PLC0415

    return Path(arg).expanduser() if arg else default_data_dir()


def engine_config(args):
    from glm_serve.engine.config import EngineConfig  # noqa: PLC0415

    return EngineConfig(
        model=args.model, device=args.device, dtype=args.dtype,
        quantization=None if args.quantization in (None, "none") else args.quantization,
        rope_theta=args.rope_theta, block_size=args.block_size, kv_cache_tokens=args.kv_cache_tokens,
        kv_cache_dtype=args.kv_cache_dtype,
        gpu_memory_utilization=args.gpu_memory_utilization, max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs, max_batch_tokens=args.max_batch_tokens,
        enable_prefix_caching=not args.no_prefix_caching, attention_backend=args.attention_backend, seed=args.seed,
        cuda_graphs=args.cuda_graphs, fused_ops=not args.no_fused_ops,
        overlap_scheduling=not args.no_overlap_scheduling,
        stream_interval=args.stream_interval, chat_template=args.chat_template)


def cmd_serve(args) -> int:
    import uvicorn  # noqa: PLC0415

    from glm_serve.api.app import create_app  # noqa: PLC0415
    from glm_serve.api.auth import KeyStore  # noqa: PLC0415
    from glm_serve.api.context import ServerSettings  # noqa: PLC0415
    from glm_serve.batch.store import check_data_dir_free  # noqa: PLC0415
    from glm_serve.engine.async_engine import AsyncEngine  # noqa: PLC0415
    from glm_serve.engine.engine import LLMEngine  # noqa: PLC0415
    from glm_serve.engine.process import ProcessEngine  # noqa: PLC0415

    if not 0 < args.port < 65536:
        raise ValueError(f"--port must be in 1..65535, got {args.port}")
    if args.shutdown_timeout < 0:
        raise ValueError(f"--shutdown-timeout must be >= 0, got {args.shutdown_timeout}")
    if args.max_body_mb <= 0:
        raise ValueError(f"--max-body-mb must be > 0, got {args.max_body_mb}")
    # Checked here, not only by Admission inside create_app: that runs after the model has loaded (minutes for 9B).
    for flag, v in (("--max-concurrency-per-key", args.max_concurrency_per_key),
                    ("--max-requests-per-minute-per-key", args.max_requests_per_minute_per_key)):
        if v is not None and v < 1:
            raise ValueError(f"{flag} must be >= 1, got {v}")
    settings = ServerSettings(served_model_names=args.served_model_name or [], api_keys=api_keys(args.api_key),
                              max_concurrency_per_key=args.max_concurrency_per_key, max_queue=args.max_queue,
                              max_requests_per_minute_per_key=args.max_requests_per_minute_per_key,
                              max_body_bytes=max(1024, int(args.max_body_mb * (1 << 20))),
                              allow_image_urls=args.allow_image_urls, data_dir=data_dir(args.data_dir),
                              batch_concurrency=args.batch_concurrency, log_stats_interval_s=args.log_stats_interval,
                              allowed_origins=args.allowed_origin or [],
                              blocked_words=blocked_words(args.blocked_words))  # (read before the slow model load)
    check_tls(args.ssl_certfile, args.ssl_keyfile)  # before the slow model load, as the flags above
    for flag, v in (("--max-concurrency-per-key", settings.max_concurrency_per_key),
                    ("--max-requests-per-minute-per-key", settings.max_requests_per_minute_per_key)):
        if v is not None and not settings.api_keys:
            log.warning("%s limits each api key, and no key is set: it has no effect (--max-queue bounds what "
                        "the server holds at once)", flag)
    KeyStore(settings.api_keys)  # bad keys (two with one id) are refused before the slow model load too
    check_data_dir_free(settings.data_dir)  # one server per data dir: say so before the slow model load
    check_bindable(args.host, args.port)  # uvicorn binds only after the load: a port in use failed minutes in
    config = engine_config(args)
    if args.model == "demo":
        log.warning("serving the DEMO model: a tiny checkpoint with RANDOM weights, so its text is noise. "
                    "Serve real weights with --model /path/to/glm-4-9b-chat-hf (or a hub id such as "
                    "THUDM/glm-4-9b-chat)")
    # The slow part: load weights, size the KV cache (with --engine-process, in the engine's own process)
    if args.engine_process:
        engine = ProcessEngine(config)
        core = engine.engine  # RemoteCore: the engine's facts, and a tokenizer of this process's own
    else:
        core = LLMEngine(config)
        engine = AsyncEngine(core)
    try:
        app = create_app(engine, settings)
        ctx = app.state.ctx
        mc = core.model_config
        log.info("loaded %s (%s, %d layers, hidden %d, %d KV heads) on %s as %s%s in %.1fs%s", core.model_path,
                 mc.model_type, mc.num_layers, mc.hidden_size, mc.num_kv_heads, core.device,
                 str(core.dtype).removeprefix("torch."), f", {config.quantization}" if config.quantization else "",
                 core.load_seconds, f" (engine process {engine.pid})" if args.engine_process else "")
        log.info("KV cache: %d tokens (%d-token blocks%s); context window %d tokens; up to %d sequences per batch",
                 core.kv_capacity_tokens, config.block_size, ", fp8" if config.kv_cache_dtype == "fp8" else "",
                 core.max_model_len, config.max_num_seqs)
        if core.warm_up_seconds:
            log.info("warm-up (kernels compiled, first steps run) in %.1fs", core.warm_up_seconds)
        log.info("model names: %s", ", ".join(ctx.model_names))
        if settings.blocked_words:  # (the terms themselves stay out of the log)
            log.info("content filter on: %d blocked terms from %s", len(settings.blocked_words), args.blocked_words)
        log.info("files and batches in %s (batch sequences in flight: %d at most)", settings.data_dir,
                 app.state.batches.worker.concurrency)
        if settings.api_keys:
            log.info("authentication on: %d key(s)", len(settings.api_keys))  # never the keys themselves
        elif args.host not in ("127.0.0.1", "localhost", "::1"):
            log.warning("listening on %s with NO api key: anyone who can reach it may use it (--api-key)",
                        args.host)
        if settings.allowed_origins:
            log.info("browser pages may call the API from: %s", ", ".join(settings.allowed_origins))
        host = f"[{args.host}]" if ":" in args.host else args.host
        base = f"{'https' if args.ssl_certfile else 'http'}://{host}:{args.port}"
        log.info("serving on %s  (vendor SDK base_url: %s/api/paas/v4/ ; openai base_url: %s/v1)", base, base, base)
        # Without a bound, uvicorn waits on every open connection: one 128K-token answer could hold a restart
        # for many minutes, until a supervisor's SIGKILL skips the app's shutdown (batch worker, async tasks).
        server = _server_class()(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                                                timeout_graceful_shutdown=args.shutdown_timeout,
                                                ssl_certfile=args.ssl_certfile, ssl_keyfile=args.ssl_keyfile))
        try:
            server.run()
        except KeyboardInterrupt:  # uvicorn re-raises the SIGINT it caught once its graceful shutdown is done:
            pass  # the stop asked for has happened, a traceback would only alarm
    finally:
        engine.shutdown()
    return 1 if server.engine_stopped else 0


def check_tls(certfile: str | None, keyfile: str | None) -> None:
    """ValueError unless the TLS flags are both absent or name a certificate and its key that load together:
    uvicorn reads them only after the model load, and would fail minutes in (or, for an encrypted key, stop to
    ask for its passphrase on a terminal a service does not have)."""
    if certfile is None and keyfile is None:
        return
    if certfile is None or keyfile is None:
        raise ValueError("--ssl-certfile and --ssl-keyfile go together: give both to serve HTTPS")
    import ssl  # noqa: PLC0415

    def no_passphrase():
        raise ValueError("is encrypted: serve with an unencrypted key (openssl pkey -in KEY -out PLAIN)")

    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(certfile, keyfile, password=no_passphrase)
    except FileNotFoundError as e:
        raise ValueError(f"TLS: no such file: {e.filename}") from None
    except (ssl.SSLError, OSError, ValueError) as e:
        raise ValueError(f"TLS: --ssl-certfile {certfile} with --ssl-keyfile {keyfile}: {e}") from None


def check_bindable(host: str, port: int) -> None:
    """ValueError unless (host, port) can be bound now, as uvicorn will bind it (SO_REUSEADDR, so a port left in
    TIME_WAIT by a previous run passes; one another process listens on does not)."""
    import socket  # noqa: PLC0415

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
    except OSError as e:  # EADDRINUSE, EADDRNOTAVAIL (not this machine's address), gaierror (no such host)
        raise ValueError(f"cannot listen on {host}:{port} ({e.strerror or e}): another server there? "
                         "(--host, --port)") from None


def _server_class():
    import uvicorn  # noqa: PLC0415

    class Server(uvicorn.Server):
        """uvicorn's server, telling the app when its shutdown starts (ServingContext.begin_shutdown), so that
        answers still running when the grace period ends finish in the API's format rather than being cut off
        or answered with uvicorn's plain-text 500."""

        engine_stopped = False  # the server stopped because its engine did (the exit code says so)

        async def shutdown(self, sockets=None) -> None:
            self.config.app.state.ctx.begin_shutdown(self.config.timeout_graceful_shutdown)
            await super().shutdown(sockets)

        async def on_tick(self, counter: int) -> bool:
            # Once a second: an engine that has stopped (its process died) fails every request; stop serving with
            # an error exit, so that a supervisor (systemd, a container's restart policy) starts a fresh server.
            # Answers in flight have failed already; batch lines stay pending for that next start.
            if counter % 10 == 0 and not self.engine_stopped and not self.config.app.state.ctx.engine.alive:
                self.engine_stopped = True
                log.error("%s: stopping the server", self.config.app.state.ctx.engine.stopped_reason)
                self.should_exit = True
            return await super().on_tick(counter)

    return Server
