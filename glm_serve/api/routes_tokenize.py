"""vLLM's token routes, which tools written for vLLM call to count and inspect tokens: POST /tokenize (a prompt,
as /v1/completions encodes it, or messages, as /v1/chat/completions renders them) and POST /detokenize. The ids
are what the model gets from those endpoints; errors answer in OpenAI's shape, as vLLM's do."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from glm_serve.api.common import read_request
from glm_serve.api.errors import APIError, invalid_value
from glm_serve.api.params import chat_prompt_ids, continuation
from glm_serve.api.schemas import _Request

PATHS = ("/tokenize", "/detokenize")
router = APIRouter()


class TokenizeRequest(_Request):
    model: str | None = None
    prompt: str | None = None  # either this ...
    messages: list[Any] | None = None  # ... or a conversation
    tools: list[Any] | None = None
    add_generation_prompt: bool | None = None
    continue_final_message: bool | None = None
    add_special_tokens: bool | None = None  # accepted: the ids are what the endpoints send the model, either way
    return_token_strs: bool | None = None


class DetokenizeRequest(_Request):
    model: str | None = None
    tokens: list[int]


async def _read(request: Request, model_cls, route: str):
    """(ctx, the validated request) after the key check; a model, when named, must be one served."""
    ctx, _, req = await read_request(request, model_cls, route)
    if req.model is not None:
        ctx.check_model(req.model)
    return ctx, req


@router.post("/tokenize")
async def tokenize(request: Request):
    ctx, req = await _read(request, TokenizeRequest, "tokenize")
    if (req.prompt is None) == (req.messages is None):
        raise APIError("1215", "send either prompt or messages", "prompt")
    tok = ctx.tokenizer
    if req.prompt is not None:
        ids = tok.encode(req.prompt, allow_special=True)  # as /v1/completions encodes a prompt string
    else:  # as chat renders them (continue_final_message and add_generation_prompt as there)
        ids = chat_prompt_ids(ctx, req.messages, req.tools, *continuation(req))
    strs = [tok.decode([i]) for i in ids] if req.return_token_strs else None
    return JSONResponse({"count": len(ids), "max_model_len": ctx.max_model_len, "tokens": ids, "token_strs": strs})


@router.post("/detokenize")
async def detokenize(request: Request):
    ctx, req = await _read(request, DetokenizeRequest, "detokenize")
    limit = ctx.tokenizer.vocab_size
    bad = next((t for t in req.tokens if not 0 <= t < limit), None)
    if bad is not None:
        raise invalid_value("tokens", f"token id {bad} is outside the tokenizer's [0, {limit})")
    return JSONResponse({"prompt": ctx.tokenizer.decode(req.tokens)})
