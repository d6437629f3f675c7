"""Request models of the public APIs: the vendor's v4 chat schema and OpenAI's chat/completions schemas.

Fields follow the order of the specs (vendor: /work/shared/docs/api.md "Chat request", mirroring
https://docs.bigmodel.cn/api-reference ; OpenAI: https://platform.openai.com/docs/api-reference/chat/create ).
Types are strict (a string is not a number, `true` is not 1) and every optional field accepts null, because the
SDKs send nulls. Unknown fields are kept in `model_extra`, logged by name and ignored. Messages and tools are
checked by glm_serve.chat, which names the bad field precisely; values (ranges, combinations) are checked where
the request becomes SamplingParams (glm_serve.api.params).
"""

from __future__ import annotations

import logging
from typing import Any

from pydantic import BaseModel, ConfigDict

log = logging.getLogger(__name__)


class _Request(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    def log_unknown(self, route: str) -> None:
        if self.model_extra:
            log.info("%s: ignoring unknown fields %s", route, sorted(self.model_extra))


class VendorChatRequest(_Request):
    """POST /api/paas/v4/chat/completions (and /async/chat/completions)."""

    model: str
    messages: list[Any]
    request_id: str | None = None
    user_id: str | None = None
    do_sample: bool | None = None  # false = greedy, temperature/top_p ignored
    stream: bool | None = None
    temperature: float | None = None  # [0, 1]; 0 = greedy
    top_p: float | None = None  # (0, 1]
    max_tokens: int | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    tools: list[Any] | None = None
    tool_choice: str | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None  # {"type": "text" | "json_object"}
    thinking: dict[str, Any] | None = None  # accepted and ignored: GLM-4 has no thinking mode
    meta: dict[str, Any] | None = None  # accepted and ignored (character-role metadata)
    extra: dict[str, Any] | None = None  # accepted and ignored (CodeGeeX extras)
    # accepted and ignored: --blocked-words is the operator's filter, on for every request (DISABLE included)
    sensitive_word_check: dict[str, Any] | None = None
    watermark_enabled: bool | None = None  # accepted and ignored
    tool_stream: bool | None = None  # true: a streamed tool call comes in pieces; else whole, in the last chunk
    n: int | None = None  # not in the vendor spec; honoured when sent


class _VllmExtensions(BaseModel):
    """Sampling extensions in vLLM's spelling, honoured on the /v1 routes when sent."""

    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int | None = None
    ignore_eos: bool | None = None
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool | None = None
    include_stop_str_in_output: bool | None = None
    # guided decoding (glm_serve.api.guided reads and checks them; Any so that its 400s name what is wrong)
    guided_json: Any = None  # a JSON schema, as an object or as JSON text
    guided_regex: Any = None
    guided_choice: Any = None
    guided_grammar: Any = None  # refused with a 400 (not served here)
    structured_outputs: Any = None  # vLLM's newer spelling: {"json" | "regex" | "choice" | "json_object": ...}
    guided_decoding_backend: Any = None  # accepted and ignored: how vLLM builds the grammar, not what it allows
    guided_whitespace_pattern: Any = None  # accepted and ignored (JSON whitespace here: up to 32 characters a run)


class OpenAIChatRequest(_Request, _VllmExtensions):
    """POST /v1/chat/completions."""

    messages: list[Any]
    model: str
    audio: dict[str, Any] | None = None  # accepted and ignored
    frequency_penalty: float | None = None
    logit_bias: dict[str, Any] | None = None  # {"<token id>": -100..100}, checked in params._logit_bias
    logprobs: bool | None = None
    max_completion_tokens: int | None = None
    max_tokens: int | None = None
    metadata: dict[str, Any] | None = None  # accepted and ignored
    modalities: list[Any] | None = None  # accepted and ignored
    n: int | None = None
    parallel_tool_calls: bool | None = None  # accepted: GLM-4 emits one call per turn
    prediction: dict[str, Any] | None = None  # accepted and ignored
    presence_penalty: float | None = None
    reasoning_effort: str | None = None  # accepted and ignored
    response_format: dict[str, Any] | None = None  # text | json_object | json_schema
    seed: int | None = None
    service_tier: str | None = None  # accepted and ignored
    stop: str | list[str] | None = None
    store: bool | None = None  # accepted and ignored
    stream: bool | None = None
    stream_options: dict[str, Any] | None = None  # {"include_usage": bool}
    temperature: float | None = None  # [0, 2]; 0 = greedy
    tool_choice: str | dict[str, Any] | None = None
    tools: list[Any] | None = None
    top_logprobs: int | None = None
    top_p: float | None = None
    user: str | None = None
    # vLLM's chat extras: answer on from the last (assistant) message's text, or leave <|assistant|> out
    add_generation_prompt: bool | None = None  # default true
    continue_final_message: bool | None = None  # default false; needs add_generation_prompt false (or unset)


class OpenAICompletionRequest(_Request, _VllmExtensions):
    """POST /v1/completions (https://platform.openai.com/docs/api-reference/completions/create)."""

    model: str
    prompt: str | list[str] | list[int] | list[list[int]]
    best_of: int | None = None  # only best_of == n (or null) is accepted
    echo: bool | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, Any] | None = None  # {"<token id>": -100..100}, checked in params._logit_bias
    logprobs: int | None = None
    max_tokens: int | None = None  # OpenAI's default is 16
    n: int | None = None
    presence_penalty: float | None = None
    # not OpenAI's, but sent by clients written for servers that constrain completions (vLLM): json_object and
    # json_schema hold the completion's text to JSON, as guided_json does
    response_format: dict[str, Any] | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool | None = None
    stream_options: dict[str, Any] | None = None
    suffix: str | None = None  # only null is accepted (GLM-4 has no fill-in-the-middle format)
    temperature: float | None = None
    top_p: float | None = None
    user: str | None = None


class TokenizerRequest(_Request):
    """POST /api/paas/v4/tokenizer."""

    model: str
    messages: list[Any]
    tools: list[Any] | None = None
    request_id: str | None = None


class ResponsesRequest(_Request):
    """POST /v1/responses (https://platform.openai.com/docs/api-reference/responses/create). Read as the chat request
    it amounts to by glm_serve.api.responses_request, which checks items, tools and formats."""

    background: bool | None = None  # true is refused: every response is answered within its request
    conversation: Any = None  # refused when set: OpenAI's Conversations API is not served
    include: list[Any] | None = None  # "message.output_text.logprobs" honoured; the rest accepted and ignored
    input: str | list[Any]  # a string (one user message) or a list of items
    instructions: str | None = None  # a system message before the input
    max_output_tokens: int | None = None
    max_tool_calls: int | None = None  # accepted: GLM-4 makes at most one call per turn
    metadata: dict[str, Any] | None = None  # echoed
    model: str
    parallel_tool_calls: bool | None = None  # accepted and echoed: GLM-4 makes one call per turn
    previous_response_id: str | None = None  # a stored response whose conversation this request continues
    prompt: Any = None  # refused when set: prompt templates are server-side state
    prompt_cache_key: str | None = None  # accepted and ignored (the prefix cache needs no key)
    reasoning: dict[str, Any] | None = None  # accepted and ignored: GLM-4 has no reasoning mode
    safety_identifier: str | None = None  # accepted and ignored
    service_tier: str | None = None  # accepted and ignored
    store: bool | None = None  # default true: the finished response is kept 30 days (api/response_store.py)
    stream: bool | None = None
    stream_options: dict[str, Any] | None = None  # accepted and ignored (include_obfuscation)
    temperature: float | None = None  # [0, 2]; 0 = greedy
    text: dict[str, Any] | None = None  # {"format": {"type": text | json_object | json_schema}, "verbosity"}
    tool_choice: str | dict[str, Any] | None = None  # auto | none | required | {"type": "function", "name"}
    tools: list[Any] | None = None  # flat function tools: {"type": "function", "name", "description", ...}
    top_logprobs: int | None = None  # [0, 20]
    top_p: float | None = None
    truncation: str | None = None  # "disabled" (a 400 when the input does not fit) | "auto" (oldest items dropped)
    user: str | None = None
