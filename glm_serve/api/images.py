"""GLM-4V images at the API edge: fetch or decode the conversation's image and prepare it for the engine
before anything is streamed, so every image problem is a clean 400 (code 1210) and never a broken stream."""

from __future__ import annotations

import asyncio

from glm_serve.api.context import ServingContext
from glm_serve.api.errors import APIError
from glm_serve.api.params import PreparedChat


async def attach_image(ctx: ServingContext, prep: PreparedChat) -> None:
    """Sets prep.mm from prep.image_url: bare base64 or data URLs always; http(s) only with
    --allow-image-urls (size and time limited). Decoding and preprocessing run off the event loop."""
    if prep.image_url is None or prep.mm is not None:
        return
    from glm_serve.image import parse_image_url_async  # noqa: PLC0415 (GLM-4V only)

    try:
        data = await parse_image_url_async(prep.image_url, allow_http=ctx.settings.allow_image_urls)
        prep.mm = await asyncio.to_thread(ctx.core.prepare_image, prep.prompt_ids, data)
    except ValueError as e:  # ImageError and placeholder mismatches
        raise APIError("1210", f"image_url: {e}", "messages") from None
