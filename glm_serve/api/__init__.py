"""The HTTP API: the vendor's v4 chat schema under /api/paas/v4 and OpenAI's under /v1 (see app.create_app).
Imports are lazy so `glm-serve --help` does not load FastAPI."""

from __future__ import annotations

__all__ = ["ServerSettings", "create_app"]


def __getattr__(name: str):
    if name == "create_app":
        from glm_serve.api.app import create_app  # noqa: PLC0415

        return create_app
    if name == "ServerSettings":
        from glm_serve.api.context import ServerSettings  # noqa: PLC0415

        return ServerSettings
    raise AttributeError(name)
