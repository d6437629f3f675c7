"""Response shapes of both schemas: chat bodies, stream chunks, usage, logprobs, completions; pure functions.

Vendor: /work/shared/docs/api.md ("Chat response"). OpenAI: https://platform.openai.com/docs/api-reference/chat/object
and .../chat/streaming, .../completions/object.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from glm_serve.api.parser import Delta
from glm_serve.engine.outputs import TokenLogprob
from glm_serve.tokenizer import IncrementalDetokenizer

VENDOR = "vendor"


@dataclass
class ChoiceResult:
    """A finished chat choice."""

    index: int
    finish_reason: str
    content: str | None
    tool_calls: list[dict]
    logprobs: list[TokenLogprob] | None = None


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens,
                "prompt_tokens_details": {"cached_tokens": self.cached_tokens}}


# What JSON leaves raw but str.splitlines() ends a line at: NEL, LINE SEPARATOR, PARAGRAPH SEPARATOR. zai-sdk
# reads streams with httpx's iter_lines, which splits where str.splitlines does, so an event holding
# one would reach it in two pieces that do not parse. Written as JSON escapes, the event stays one line.
_SPLITLINES_ONLY = re.compile("[\x85\u2028\u2029]")


def _escape_line_break(m: re.Match) -> str:
    return f"\\u{ord(m.group()):04x}"


def one_line(text: str) -> str:
    """JSON text with NEL, LINE SEPARATOR and PARAGRAPH SEPARATOR written as escapes: one line for every reader."""
    return _SPLITLINES_ONLY.sub(_escape_line_break, text)


def sse(data: dict | str) -> str:
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return f"data: {one_line(text)}\n\n"


def token_text(tokenizer, token_id: int) -> tuple[str, list[int]]:
    raw = tokenizer.id_to_token_bytes(token_id)
    return raw.decode("utf-8", errors="replace"), list(raw)


def chat_logprobs(tokenizer, lps: list[TokenLogprob] | None) -> dict | None:
    if lps is None:
        return None
    content = []
    for lp in lps:
        text, raw = token_text(tokenizer, lp.token_id)
        top = []
        for tid, value in lp.top:
            t, b = token_text(tokenizer, tid)
            top.append({"token": t, "logprob": value, "bytes": b})
        content.append({"token": text, "logprob": lp.logprob, "bytes": raw, "top_logprobs": top})
    return {"content": content, "refusal": None}


def chat_body(flavor: str, response_id: str, request_id: str, created: int, model: str,
              choices: list[ChoiceResult], usage: Usage, tokenizer) -> dict:
    out = []
    for c in choices:
        message = {"role": "assistant", "content": c.content}
        if flavor == VENDOR:
            message["tool_calls"] = c.tool_calls or None
            out.append({"index": c.index, "finish_reason": c.finish_reason, "message": message})
        else:
            if c.tool_calls:
                message["tool_calls"] = c.tool_calls
            message["refusal"] = None
            out.append({"index": c.index, "message": message, "logprobs": chat_logprobs(tokenizer, c.logprobs),
                        "finish_reason": c.finish_reason})
    if flavor == VENDOR:
        return {"id": response_id, "request_id": request_id, "created": created, "model": model, "choices": out,
                "usage": usage.to_dict()}
    return {"id": response_id, "object": "chat.completion", "created": created, "model": model, "choices": out,
            "usage": usage.to_dict(), "system_fingerprint": None}


def delta_dict(flavor: str, deltas: list[Delta], first: bool) -> dict:
    """One choice's deltas of one step merged into a stream `delta` object."""
    delta: dict = {}
    if flavor == VENDOR or first:
        delta["role"] = "assistant"
    content = [d.content for d in deltas if d.content is not None]
    if content:
        delta["content"] = "".join(content)
    elif first and flavor != VENDOR:
        delta["content"] = ""
    call = None
    for d in deltas:
        if d.call_id is not None:
            call = {"index": 0, "id": d.call_id, "type": "function", "function": {"name": d.name, "arguments": ""}}
        if d.arguments is not None:
            if call is None:
                call = {"index": 0, "function": {"arguments": ""}}
            call["function"]["arguments"] += d.arguments
    if call is not None:
        delta["tool_calls"] = [call]
    return delta


def chat_chunk(flavor: str, response_id: str, created: int, model: str, index: int, delta: dict,
               finish_reason: str | None, logprobs: dict | None = None, usage: Usage | None = None,
               include_usage: bool = False) -> dict:
    choice = {"index": index, "delta": delta, "finish_reason": finish_reason}
    if flavor == VENDOR:
        chunk = {"id": response_id, "created": created, "model": model, "choices": [choice]}
        if usage is not None:
            chunk["usage"] = usage.to_dict()
        return chunk
    choice["logprobs"] = logprobs
    chunk = {"id": response_id, "object": "chat.completion.chunk", "created": created, "model": model,
             "system_fingerprint": None, "choices": [choice]}
    if include_usage:
        chunk["usage"] = None
    return chunk


def usage_chunk(response_id: str, created: int, model: str, usage: Usage, obj: str) -> dict:
    """OpenAI's last chunk with stream_options.include_usage: no choices, the usage."""
    return {"id": response_id, "object": obj, "created": created, "model": model, "system_fingerprint": None,
            "choices": [], "usage": usage.to_dict()}


def stream_error(flavor: str, message: str) -> dict:
    if flavor == VENDOR:
        return {"error": {"code": "500", "message": message}}
    return {"error": {"message": message, "type": "server_error", "param": None, "code": "500"}}


class TextOffsets:
    """Legacy completions `text_offset`s of one choice: where each token starts in the choice's text, advanced
    by the text the token makes (a skipped special token makes none), decoded as the engine decodes it. Not
    by the text emitted so far, which stop strings hold back for a while: offsets are the same whether the
    tokens come one per stream chunk or all in one body."""

    def __init__(self, tokenizer, prompt_ids, skip_special_tokens: bool, start: int = 0) -> None:
        self.detok = IncrementalDetokenizer(tokenizer, prompt_ids, skip_special_tokens)
        self.offset = start  # where the next token starts

    def take(self, token_id: int) -> int:
        """The token's offset; the next one's is past its text."""
        at = self.offset
        self.offset += len(self.detok.add(token_id))
        return at


def completion_logprobs(tokenizer, lps: list[TokenLogprob] | None, offsets: TextOffsets) -> dict | None:
    """OpenAI legacy completions logprobs of generated tokens (fed to `offsets` in order)."""
    if lps is None:
        return None
    tokens, token_lps, tops, starts = [], [], [], []
    for lp in lps:
        tokens.append(token_text(tokenizer, lp.token_id)[0])
        token_lps.append(lp.logprob)
        tops.append({token_text(tokenizer, t)[0]: v for t, v in lp.top})
        starts.append(offsets.take(lp.token_id))
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": starts}


def echo_logprobs(tokenizer, prompt_ids: list[int], entries: list[TokenLogprob | None]) -> dict:
    """The echoed prompt's part of OpenAI legacy completions logprobs (it starts the text, at offset 0): the
    first token has no logprob (null, null), the others theirs (RequestOutput.prompt_logprobs), in the same
    token strings and top-k shape as completion_logprobs gives generated tokens. Offsets follow the echoed
    text, tokenizer.decode(prompt_ids) (special tokens kept)."""
    tokens, token_lps, tops, starts = [], [], [], []
    offsets = TextOffsets(tokenizer, None, skip_special_tokens=False)
    for token_id, lp in zip(prompt_ids, entries):
        tokens.append(token_text(tokenizer, token_id)[0])
        token_lps.append(None if lp is None else lp.logprob)
        tops.append(None if lp is None else {token_text(tokenizer, t)[0]: v for t, v in lp.top})
        starts.append(offsets.take(token_id))
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": starts}


def completion_body(response_id: str, created: int, model: str, choices: list[dict], usage: Usage) -> dict:
    return {"id": response_id, "object": "text_completion", "created": created, "model": model,
            "choices": choices, "usage": usage.to_dict(), "system_fingerprint": None}


def completion_chunk(response_id: str, created: int, model: str, index: int, text: str,
                     finish_reason: str | None, logprobs: dict | None, include_usage: bool) -> dict:
    chunk = {"id": response_id, "object": "text_completion", "created": created, "model": model,
             "system_fingerprint": None,
             "choices": [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}]}
    if include_usage:
        chunk["usage"] = None
    return chunk
