"""Owns reading an OpenAI Responses request (POST /v1/responses) as the chat request it amounts to: a stored
conversation it continues (`previous_response_id`, looked up by the route) then its input items -> chat messages,
flat function tools -> chat tools, `text.format` -> `response_format`, `max_output_tokens` ->
`max_completion_tokens`; its input as OpenAI lists input items (ids given); and naming, in an error the chat path
raises, the Responses field the bad value came from. What needs state this server does not keep (`conversation`,
`background`, `prompt`, `item_reference`) is refused here with a 400 that says so.

Spec: https://platform.openai.com/docs/api-reference/responses/create ; the chat side is params.prepare_chat.
"""

from __future__ import annotations

import logging
import re
import uuid
from dataclasses import dataclass

from glm_serve.api.errors import APIError, bad_param, invalid_value
from glm_serve.api.schemas import OpenAIChatRequest, ResponsesRequest

log = logging.getLogger(__name__)

ROLES = ("user", "system", "developer", "assistant")  # developer: a system turn (as on /v1/chat/completions)
LOGPROBS_INCLUDE = "message.output_text.logprobs"
PREVIOUS = "previous_response_id"  # the origin of the chat messages a stored conversation brings
# Stored responses are served (response_store.py); OpenAI's Conversations API and stored prompts are not.
_NO_CONVERSATIONS = "conversations (OpenAI's Conversations API) are not served here: continue a conversation " \
                    "with previous_response_id, or send it whole in `input`"


@dataclass
class ChatView:
    """A Responses request read as a chat request, and where each chat message came from (for error names)."""

    chat: OpenAIChatRequest  # what prepare_chat validates and runs
    # [chat message index] -> "instructions", "previous_response_id" (the stored conversation continued), or
    # "input[i]" (or "input" for a string input)
    origins: list[str]
    # [chat message index] -> "instructions" | "previous" | "message" | "function_call" | "function_call_output"
    kinds: list[str]

    def input_messages(self) -> list[dict]:
        """The chat messages this request's input adds to the conversation a follow-up continues: neither the
        instructions (OpenAI applies them to one response only) nor the stored conversation it continues."""
        return [m for m, kind in zip(self.chat.messages, self.kinds) if kind not in ("instructions", "previous")]

    def rename(self, err: APIError) -> APIError:
        """The same error with a chat field name (messages[3].content, response_format, ...) replaced by the
        Responses field it came from, in `param` and at the head of the message."""
        if err.param is None:
            return err
        param = self._field(err.param)
        message = param + err.message[len(err.param):] if err.message.startswith(err.param) else err.message
        # a chat message named inside the text ("content blocked: messages[2] holds ..."): the item it came from
        message = _CHAT_MESSAGE.sub(lambda m: self._field(m.group()), message)
        if (param, message) == (err.param, err.message):
            return err
        return APIError(err.code, message, param, err.status, err.headers, err.openai_code)

    def _field(self, name: str) -> str:
        m = re.fullmatch(r"messages\[(\d+)\](.*)", name)
        if m:
            k, tail = int(m.group(1)), m.group(2)
            if k >= len(self.origins):
                return "input"
            kind = self.kinds[k]
            if kind in ("instructions", "previous"):  # (a stored message is named by the id it came with)
                tail = ""
            elif kind == "function_call":
                tail = re.sub(r"^\.tool_calls\[0\]\.function", "", tail)
            elif kind == "function_call_output":
                tail = re.sub(r"^\.content", ".output", tail)
            return self.origins[k] + tail
        for pattern, repl in _RENAMES:
            renamed, hits = re.subn(pattern, repl, name)
            if hits:
                return renamed
        return name


_CHAT_MESSAGE = re.compile(r"\bmessages\[\d+\](?:\.\w+|\[\d+\])*")  # messages[3], messages[3].content[0].text

# chat field -> Responses field, first match wins
_RENAMES = (
    (r"^messages$", "input"),
    (r"^response_format\.json_schema(\.|$)", r"text.format\1"),
    (r"^response_format", "text.format"),
    (r"^max_completion_tokens$", "max_output_tokens"),
    (r"^tools\[(\d+)\]\.function(\.|$)", r"tools[\1]\2"),
    (r"^tool_choice\.function\.", "tool_choice."),
    (r"^logprobs$", "top_logprobs"),
)


def check_request(req: ResponsesRequest) -> None:
    """Refuse what only the Responses schema has and this server does not serve (before any stored conversation is
    looked up: `conversation` beside `previous_response_id` is refused for itself, as OpenAI refuses the pair)."""
    if req.conversation is not None:
        raise invalid_value("conversation", _NO_CONVERSATIONS)
    if req.background:
        raise invalid_value("background", "is not supported: every response is answered within its request (a "
                                          "stored one can be fetched again by its id)")
    if req.prompt is not None:
        raise invalid_value("prompt", "reusable prompts live in OpenAI's cloud; send their text as instructions")
    if req.truncation not in (None, "disabled", "auto"):
        raise invalid_value("truncation", f"must be 'disabled' or 'auto', got {req.truncation!r}")
    if req.reasoning is not None:
        log.info("responses: ignoring reasoning %s (GLM-4 has no reasoning mode)", req.reasoning)


def read_responses_request(req: ResponsesRequest, previous: list[dict] | None = None) -> ChatView:
    """Build the chat request (after check_request); 400s name the Responses field. previous: the chat messages of
    the stored conversation this request continues (previous_response_id), which go after the instructions (this
    request's own: the previous response's are not carried over) and before the input."""
    messages, origins, kinds = [], [], []
    if req.instructions is not None:
        messages.append({"role": "system", "content": req.instructions})
        origins.append("instructions")
        kinds.append("instructions")
    for message in previous or ():
        messages.append(message)
        origins.append(PREVIOUS)
        kinds.append("previous")
    if isinstance(req.input, str):
        messages.append({"role": "user", "content": req.input})
        origins.append("input")
        kinds.append("message")
    else:
        if not req.input:
            raise invalid_value("input", "must be a string or a non-empty list of items")
        for i, item in enumerate(req.input):
            converted = _item(item, f"input[{i}]")
            if converted is not None:
                messages.append(converted[1])
                origins.append(f"input[{i}]")
                kinds.append(converted[0])
    if not messages:
        raise invalid_value("input", "holds no message")
    include = [x for x in req.include or () if isinstance(x, str)]
    if set(include) - {LOGPROBS_INCLUDE}:
        log.info("responses: ignoring include %s", sorted(set(include) - {LOGPROBS_INCLUDE}))
    want_logprobs = LOGPROBS_INCLUDE in include or req.top_logprobs is not None
    chat = OpenAIChatRequest.model_validate({
        "model": req.model,
        "messages": messages,
        "tools": _tools(req.tools) if req.tools else None,
        "tool_choice": _tool_choice(req.tool_choice),
        "response_format": _format(req.text),
        "max_completion_tokens": req.max_output_tokens,
        "temperature": req.temperature,
        "top_p": req.top_p,
        "logprobs": True if want_logprobs else None,
        "top_logprobs": req.top_logprobs,
        "parallel_tool_calls": req.parallel_tool_calls,
        "stream": req.stream,
    })
    return ChatView(chat, origins, kinds)


def _item(item, where: str) -> tuple[str, dict] | None:
    """One input item -> (kind, chat message); None for an item that renders as nothing here."""
    if not isinstance(item, dict):
        raise bad_param(where, f"must be an object (an input item), got {type(item).__name__}")
    kind = item.get("type", "message" if "role" in item else None)
    if kind == "message":
        return "message", _message(item, where)
    if kind == "function_call":
        for key in ("call_id", "name", "arguments"):
            if not isinstance(item.get(key), str):
                raise bad_param(f"{where}.{key}", "must be a string")
        call = {"id": item["call_id"], "type": "function",
                "function": {"name": item["name"], "arguments": item["arguments"]}}
        return "function_call", {"role": "assistant", "content": None, "tool_calls": [call]}
    if kind == "function_call_output":
        if not isinstance(item.get("call_id"), str):
            raise bad_param(f"{where}.call_id", "must be a string")
        output = item.get("output")
        if isinstance(output, list):
            output = [_part(p, f"{where}.output[{j}]") for j, p in enumerate(output)]
        elif not isinstance(output, str):
            raise bad_param(f"{where}.output", "must be a string or a list of content parts")
        return "function_call_output", {"role": "tool", "tool_call_id": item["call_id"], "content": output}
    if kind == "reasoning":  # from another provider's earlier output: GLM-4 has none to replay
        log.info("responses: dropping a reasoning input item")
        return None
    if kind == "item_reference":
        raise invalid_value(f"{where}.type", "item_reference is not served: send the item itself, or continue the "
                                             "stored conversation it belongs to with previous_response_id")
    raise invalid_value(f"{where}.type", f"must be message, function_call or function_call_output (other items "
                                         f"belong to OpenAI's built-in tools), got {kind!r}")


def output_messages(output: list[dict]) -> list[dict]:
    """A response's output items as the chat messages a follow-up continues with: exactly what sending them back as
    input items renders as (so a chained request and the same conversation sent whole are one prompt)."""
    return [converted[1] for item in output if (converted := _item(item, "output")) is not None]


# id prefixes of listed input items by type (OpenAI's: msg_ for messages, fc_ for function calls)
_ID_PREFIX = {"message": "msg", "function_call": "fc", "function_call_output": "fco"}


def listed_items(req: ResponsesRequest, taken: set[str]) -> list[dict]:
    """This request's input (read_responses_request checked it) as OpenAI's input_items lists it: every item with an
    id (the one it was sent with, unless that is in `taken` or repeated: ids page the list), a message's content as
    typed parts (a string is one input_text part, output_text for an assistant), and a status."""
    sent = [{"type": "message", "role": "user", "content": req.input}] if isinstance(req.input, str) else req.input
    out = []
    for item in sent:
        kind = item.get("type", "message")
        if kind == "message":
            content = item["content"]
            if isinstance(content, str):
                content = [{"type": "output_text" if item["role"] == "assistant" else "input_text", "text": content}]
            # with the fields OpenAI fills in when a part leaves them out (the SDK's item models require them)
            content = [{"annotations": [], **p} if p["type"] == "output_text" else
                       {"detail": "auto", **p} if p["type"] == "input_image" else p for p in content]
            listed = {"type": "message", "role": item["role"], "content": content, "status": "completed"}
        elif kind == "function_call":
            listed = {"type": kind, **{k: item[k] for k in ("call_id", "name", "arguments")}, "status": "completed"}
        elif kind == "function_call_output":
            listed = {"type": kind, "call_id": item["call_id"], "output": item["output"], "status": "completed"}
        else:  # a reasoning item (dropped from the prompt): listed as it was sent, but for its id (given below)
            listed = {k: v for k, v in item.items() if k != "id"}
        item_id = item.get("id")
        if not isinstance(item_id, str) or not item_id or item_id in taken:
            item_id = f"{_ID_PREFIX.get(kind, 'item')}_{uuid.uuid4().hex}"
        taken.add(item_id)
        out.append({"id": item_id, **listed})
    return out


def _message(item: dict, where: str) -> dict:
    role = item.get("role")
    if role not in ROLES:
        raise invalid_value(f"{where}.role", f"must be one of {', '.join(ROLES)}, got {role!r}")
    content = item.get("content")
    if isinstance(content, list):
        content = [_part(p, f"{where}.content[{j}]") for j, p in enumerate(content)]
    elif not isinstance(content, str):
        raise bad_param(f"{where}.content", "must be a string or a list of content parts")
    return {"role": role, "content": content}


def _part(part, where: str) -> dict:
    """A Responses content part -> a chat content part (text or image_url); chat checks where images may go."""
    kind = part.get("type") if isinstance(part, dict) else None
    if kind in ("input_text", "output_text", "refusal"):
        key = "refusal" if kind == "refusal" else "text"
        if not isinstance(part.get(key), str):
            raise bad_param(f"{where}.{key}", "must be a string")
        return {"type": "text", "text": part[key]}
    if kind == "input_image":
        url = part.get("image_url")
        if not isinstance(url, str) or not url:
            raise invalid_value(f"{where}.image_url", "must be a URL or a data URL (file_id needs a stored file; "
                                                      "this server takes images inline)")
        return {"type": "image_url", "image_url": {"url": url}}
    raise invalid_value(f"{where}.type", f"must be input_text, input_image or output_text, got {kind!r}")


def _tools(tools: list) -> list[dict]:
    """Flat function tools -> chat tools ({"type": "function", "function": {...}}), `strict` included: with it, a
    call the model chooses under tool_choice auto holds to the schema too, as on chat (forced calls always do).
    The SDK's FunctionToolParam always sends `strict`, so OpenAI's default for a missing one (true) is not
    guessed at here: absent, the arguments are held only when a call is forced."""
    out = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict):
            raise bad_param(f"tools[{i}]", "must be an object")
        kind = tool.get("type")
        if kind != "function":
            raise invalid_value(f"tools[{i}].type", f"only 'function' tools are served here, got {kind!r} (web "
                                                    "search, file search, computer use, MCP and the other built-in "
                                                    "tools are services of OpenAI's cloud)")
        out.append({"type": "function", "function": {k: tool[k] for k in ("name", "description", "parameters",
                                                                           "strict") if tool.get(k) is not None}})
    return out


def _tool_choice(choice):
    if choice is None or isinstance(choice, str):
        return choice  # auto | none | required: prepare_chat checks the word
    if choice.get("type") == "function":
        return {"type": "function", "function": {"name": choice.get("name")}}
    raise invalid_value("tool_choice", f"must be auto, none, required or {{\"type\": \"function\", \"name\": ...}}, "
                                       f"got type {choice.get('type')!r}")


def _format(text: dict | None) -> dict | None:
    """`text.format` -> chat's response_format (text | json_object | json_schema); verbosity is ignored."""
    fmt = (text or {}).get("format")
    if fmt is None:
        return None
    if not isinstance(fmt, dict):
        raise bad_param("text.format", "must be an object")
    kind = fmt.get("type")
    if kind in ("text", "json_object"):
        return {"type": kind}
    if kind == "json_schema":
        if not isinstance(fmt.get("schema"), dict):
            raise invalid_value("text.format.schema", "must be a JSON schema object")
        return {"type": "json_schema",
                "json_schema": {"name": fmt.get("name"), "schema": fmt["schema"], "strict": fmt.get("strict")}}
    raise invalid_value("text.format.type", f"must be text, json_object or json_schema, got {kind!r}")


def fit_input(ctx, view: ChatView) -> ChatView:
    """`truncation: "auto"`: the view with as few of its oldest units dropped as make the prompt fit the context
    window (instructions and the last unit always stay), as OpenAI drops items rather than failing. A unit is an
    input item (its messages) or one message of the stored conversation a previous_response_id brought, which is
    older than every input item: truncation applies to the whole chained conversation. The prompt is counted as the
    chat path renders it; the fewest units to drop is found by bisection (a handful of renders for a long history).
    The messages kept keep their origins, so errors still name the items as sent. A view that fits, or that no
    dropping can fit, comes back as it was, and the chat path answers it (with its 1261 for the latter)."""
    from glm_serve.api.params import _developer_as_system, chat_prompt_ids  # noqa: PLC0415

    # each chat message's unit, numbered oldest first (None: the instructions, always kept); an input item's
    # messages share its origin, a stored message is a unit of its own
    keys = [None if o == "instructions" else (o, m) if o == PREVIOUS else o for m, o in enumerate(view.origins)]
    number = {key: n for n, key in enumerate(dict.fromkeys(k for k in keys if k is not None))}
    unit_of = [None if k is None else number[k] for k in keys]
    units = len(number)
    if units < 2:
        return view

    def keep(k: int) -> list[int]:  # the messages left once the k oldest units are dropped
        return [m for m, u in enumerate(unit_of) if u is None or u >= k]

    def fits(k: int) -> bool:
        messages = [view.chat.messages[m] for m in keep(k)]
        try:
            ids = chat_prompt_ids(ctx, _developer_as_system(messages), view.chat.tools)
        except APIError:  # a bad item: the chat path names it, on the request as sent
            return True
        return len(ids) < ctx.max_model_len  # (room for the first generated token, as the chat path asks)

    if fits(0) or not fits(units - 1):
        return view
    lo, hi = 1, units - 1  # fits(hi); find the smallest k that fits
    while lo < hi:
        mid = (lo + hi) // 2
        if fits(mid):
            hi = mid
        else:
            lo = mid + 1
    log.info("responses: truncation auto dropped the %d oldest of %d input units to fit the context window", lo,
             units)
    kept = keep(lo)
    chat = view.chat.model_copy(update={"messages": [view.chat.messages[m] for m in kept]})
    return ChatView(chat, [view.origins[m] for m in kept], [view.kinds[m] for m in kept])
