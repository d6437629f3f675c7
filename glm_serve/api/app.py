"""The FastAPI app factory: routes (vendor v4, OpenAI /v1 with the Responses API, /health, /metrics), error
handlers, request counting. It takes an already-built AsyncEngine, so the slow model load happens before uvicorn
starts and tests can share one engine across servers. The app never shuts the engine down; its owner does."""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response

from glm_serve.api.common import authenticate, ctx_of
from glm_serve.api.context import ServerSettings, ServingContext
from glm_serve.api.errors import install_handlers
from glm_serve.api.response_store import KEEP_STEP_S, ResponseStore
from glm_serve.api.routes_openai import router as openai_router
from glm_serve.api.routes_responses import router as responses_router
from glm_serve.api.routes_tokenize import router as tokenize_router
from glm_serve.api.routes_vendor import rerun_task
from glm_serve.api.routes_vendor import router as vendor_router
from glm_serve.api.stats_log import log_stats
from glm_serve.api.task_log import TaskLog
from glm_serve.api.tasks import TaskStore
from glm_serve.engine.async_engine import EngineFrontend

log = logging.getLogger(__name__)


def _route_label(scope) -> str:
    """The matched route's template (`/api/paas/v4/batches/{batch_id}`), set in the scope by the router: one label
    per route, never per id. A path no route matches is "other", so a scanner cannot blow up the cardinality."""
    path = getattr(scope.get("route"), "path", None)
    return path if isinstance(path, str) else "other"


class _CountRequests:
    """ASGI middleware: counts every answered request by route template and HTTP status (streams count as they
    start)."""

    def __init__(self, app, metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def counted_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                self.metrics.request_done(_route_label(scope), message["status"])
            await send(message)

        try:
            await self.app(scope, receive, counted_send)
        except Exception:
            if not started:  # the outer error middleware answers 500 for it
                self.metrics.request_done(_route_label(scope), 500)
            raise


def create_app(engine: EngineFrontend, settings: ServerSettings | None = None) -> FastAPI:
    ctx = ServingContext(engine, settings or ServerSettings())
    from glm_serve.batch.routes import BatchService  # noqa: PLC0415 (it imports glm_serve.api modules)

    batches = BatchService(ctx)
    # Async tasks are on record in the same data dir as the batches (its lock covers both).
    task_log = TaskLog(batches.data_dir / "tasks.sqlite3")
    tasks = TaskStore(ctx.settings.task_ttl_s, ctx.settings.max_tasks, task_log)
    # Stored responses of /v1/responses too (expired ones are purged as the store opens)
    responses = ResponseStore(batches.data_dir / "responses.sqlite3", keep_step_s=KEEP_STEP_S)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        rerun = tasks.recover(lambda task, body: rerun_task(ctx, task, body))
        if rerun:
            log.info("running again %d async task(s) that were in flight when the server last stopped", rerun)
        await batches.start()
        interval = ctx.settings.log_stats_interval_s
        stats = asyncio.ensure_future(log_stats(ctx, interval)) if interval > 0 else None
        yield
        if stats is not None:
            stats.cancel()
        await tasks.stop()  # their engine requests abort (the engine itself belongs to the caller); on record as
        # running, they run again at the next start
        responses.close()  # (before the batch store, which may remove a temporary data dir)
        await batches.stop()  # lines in flight stay pending for the next start (it may remove a temporary data dir)

    # No /docs, /redoc or /openapi.json: FastAPI serves them without our key check (with keys, every route but
    # /health must need one), the schema is empty (routes read raw bodies) and the docs page loads from a CDN.
    app = FastAPI(title="glm-serve", description="GLM-4 inference server: the vendor's v4 API and OpenAI's /v1",
                  lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.ctx = ctx
    app.state.tasks = tasks
    app.state.responses = responses
    install_handlers(app)
    app.include_router(vendor_router)
    app.include_router(openai_router)
    app.include_router(responses_router)
    app.include_router(tokenize_router)
    batches.mount(app)

    @app.get("/health")
    async def health():
        if not engine.alive:
            return JSONResponse({"status": "engine stopped"}, status_code=503)
        return {"status": "ok", "models": ctx.model_names}

    @app.get("/metrics")
    async def metrics(request: Request):
        authenticate(request)
        return Response(ctx_of(request).metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    app.add_middleware(_CountRequests, metrics=ctx.metrics)
    if ctx.settings.allowed_origins:
        # Outermost, so that error answers (401, 400, 429) carry the CORS headers too: without them a browser
        # page sees an opaque network failure instead of the API's error body. Preflights are answered here,
        # before the key check: a browser sends them without the Authorization header.
        app.add_middleware(CORSMiddleware, allow_origins=ctx.settings.allowed_origins,
                           allow_methods=["GET", "POST", "DELETE"], allow_headers=["*"],
                           expose_headers=["Retry-After", "x-should-retry"], max_age=600)
    return app
