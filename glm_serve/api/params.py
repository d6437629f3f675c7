"""Requests -> what the engine runs: prompt ids, SamplingParams (one function for both schemas), and the
per-choice constraints for JSON output and forced tool calls. Every bad value becomes an APIError naming it."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from glm_serve.api.context import MAX_TOOLS, ServingContext
from glm_serve.api.errors import APIError, bad_param, chat_format_error, invalid_value
from glm_serve.api.guided import Guided, read_guided
from glm_serve.chat import ChatFormatError, encode_chat, image_urls
from glm_serve.engine.engine import PromptTooLongError, SamplingParamError
from glm_serve.sampling_params import MAX_LOGPROBS, SamplingParams

VENDOR, OPENAI = "vendor", "openai"


@dataclass
class PreparedChat:
    prompt_ids: list[int]
    params: SamplingParams
    constraints: list | None  # one TokenConstraint per choice, or None
    tool_names: frozenset[str]  # function names whose calls are parsed out of the answer; empty = never
    json_mode: bool  # response_format asked for JSON
    stream: bool
    include_usage: bool  # OpenAI stream_options.include_usage
    extra: dict = field(default_factory=dict)
    image_url: str | None = None  # GLM-4V: the conversation's image (bare base64, data URL or http(s) URL)
    mm: object | None = None  # GLM-4V: the engine's MultiModalPrompt, set by api.images.attach_image
    forced_call: bool = False  # tool_choice required or named: the grammar makes every answer a tool call
    raw: bool = False  # the prompt does not open an answer (continue_final_message, add_generation_prompt false):
    # the text is content as generated, no "\n" separator to drop and no tool call to parse
    whole_calls: bool = False  # vendor stream without tool_stream: a tool call goes out whole, in the choice's last
    # chunk, as the vendor's cloud sends it (code written for it parses the first tool_calls delta it gets)


def _in_range(name: str, value, lo: float, hi: float, lo_open: bool = False) -> None:
    if value is None:
        return
    if math.isnan(value) or value < lo or value > hi or (lo_open and value == lo):
        interval = f"{'(' if lo_open else '['}{lo}, {hi}]"
        raise bad_param(name, f"must be in {interval}, got {value}")


def sampling_params(req, flavor: str, ctx: ServingContext, default_max_tokens: int | None = None,
                    min_max_tokens: int = 1) -> SamplingParams:
    """The one translation of a request's decoding fields (either schema) into SamplingParams.
    min_max_tokens: 0 where a request may generate nothing (legacy completions that echo the prompt).

    Vendor: temperature in [0, 1] (0 = greedy), top_p in (0, 1], do_sample=false = greedy. OpenAI: temperature
    in [0, 2], top_p in [0, 1] (0 = greedy). Omitted temperature/top_p come from the checkpoint's
    generation_config.json; a checkpoint with do_sample=false decodes greedily unless the request samples."""
    d = ctx.defaults
    declared = getattr(type(req), "model_fields", None)

    def get(name: str):  # fields a schema does not declare read as None (unknown extras are ignored, not used)
        return getattr(req, name, None) if declared is None or name in declared else None

    temperature, top_p = get("temperature"), get("top_p")
    if flavor == VENDOR:
        if get("do_sample") is not False:  # do_sample=false: greedy, temperature and top_p ignored (api.md)
            _in_range("temperature", temperature, 0.0, 1.0)
            _in_range("top_p", top_p, 0.0, 1.0, lo_open=True)
    else:
        _in_range("temperature", temperature, 0.0, 2.0)
        _in_range("top_p", top_p, 0.0, 1.0)
    greedy = get("do_sample") is False or temperature == 0 or top_p == 0
    if temperature is None and top_p is None and get("do_sample") is None and not d.do_sample:
        greedy = True
    n = get("n")
    if n is not None and not 1 <= n <= ctx.max_n:
        raise bad_param("n", f"must be in [1, {ctx.max_n}], got {n}")
    max_tokens, max_name = get("max_completion_tokens"), "max_completion_tokens"  # OpenAI's newer name wins
    if max_tokens is None:
        max_tokens, max_name = get("max_tokens"), "max_tokens"
    if max_tokens is not None and not min_max_tokens <= max_tokens <= ctx.max_model_len:
        raise bad_param(max_name, f"must be in [{min_max_tokens}, {ctx.max_model_len}] (the context window), "
                                  f"got {max_tokens}")
    logprobs = get("logprobs")
    top = get("top_logprobs")
    if flavor == OPENAI and (isinstance(logprobs, bool) or top is not None):  # chat: a flag + a count
        if top is not None and not logprobs:
            raise APIError("1215", "top_logprobs needs logprobs: true", "top_logprobs")
        _in_range("top_logprobs", top, 0, MAX_LOGPROBS)
        logprobs = (top or 0) if logprobs else None
    else:
        _in_range("logprobs", logprobs, 0, MAX_LOGPROBS)
    logit_bias = _logit_bias(get("logit_bias"))
    top_k = get("top_k")
    kwargs = dict(
        n=n or 1,
        temperature=0.0 if greedy else (temperature if temperature is not None else
                                        (d.temperature if d.temperature is not None else 1.0)),
        top_p=1.0 if greedy else (top_p if top_p is not None else (d.top_p if d.top_p is not None else 1.0)),
        top_k=top_k if top_k is not None else (d.top_k if d.top_k is not None and not greedy else 0),
        min_p=get("min_p") or 0.0,
        repetition_penalty=get("repetition_penalty") if get("repetition_penalty") is not None else 1.0,
        presence_penalty=get("presence_penalty") or 0.0,
        frequency_penalty=get("frequency_penalty") or 0.0,
        seed=get("seed"),
        stop=get("stop"),
        stop_token_ids=get("stop_token_ids"),
        max_tokens=max_tokens if max_tokens is not None else default_max_tokens,
        min_tokens=get("min_tokens") or 0,
        ignore_eos=bool(get("ignore_eos")),
        logprobs=logprobs,
        skip_special_tokens=get("skip_special_tokens") is not False,
        include_stop_str=bool(get("include_stop_str_in_output")),
        logit_bias=logit_bias,
        # the operator's content filter: one compiled list for every request (None when off)
        blocked_strings=ctx.content_filter.terms if ctx.content_filter is not None else None,
    )
    try:
        return SamplingParams(**kwargs)
    except ValueError as e:  # SamplingParams names the field first: "top_k must be >= -1, got -5"
        message = str(e)
        raise bad_param(message.split(" ", 1)[0], message.split(" ", 1)[1] if " " in message else message) from None


def _logit_bias(bias: dict | None) -> dict[int, float] | None:
    """OpenAI's logit_bias, {"<token id>": bias in [-100, 100]} -> {token id: bias}. Whether the ids are in the
    vocabulary is the engine's check (check_prompt below)."""
    if not bias:
        return None
    out = {}
    for key, value in bias.items():
        if not (isinstance(key, str) and key.isascii() and key.isdigit()):
            raise bad_param("logit_bias", f"keys must be token ids (non-negative integers as strings), got {key!r}")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not -100 <= value <= 100:  # (NaN too)
            raise bad_param("logit_bias", f"values must be numbers in [-100, 100], got {value!r} for {key}")
        out[int(key)] = float(value)
    return out


def check_tools(tools) -> list[dict]:
    if len(tools) > MAX_TOOLS:
        raise invalid_value("tools", f"at most {MAX_TOOLS} tools, got {len(tools)}")
    for i, tool in enumerate(tools):
        kind = tool.get("type") if isinstance(tool, dict) else None
        if kind != "function":
            raise invalid_value(f"tools[{i}].type", f"only 'function' tools are served here, got {kind!r} "
                                "(web_search and retrieval are services of the vendor's cloud)")
    return tools


def _as_prompted(tools: list[dict]) -> list[dict]:
    """The tools as the prompt shows them: without `strict`, which tells the server how to hold a call, not the
    model what a function does (the chat template prints each function's whole dict; GLM-4 never saw the key)."""
    return [{**t, "function": {k: v for k, v in t["function"].items() if k != "strict"}}
            if isinstance(t.get("function"), dict) and "strict" in t["function"] else t for t in tools]


def _tool_choice(choice, tools: list[dict]) -> tuple[str, str | None]:
    """('auto' | 'none' | 'required' | 'named', function name for 'named')."""
    if choice is None:
        return ("auto" if tools else "none"), None
    names = [t["function"].get("name") for t in tools if isinstance(t.get("function"), dict)]
    if isinstance(choice, str):
        if choice not in ("auto", "none", "required"):
            raise invalid_value("tool_choice", f"must be auto, none, required or a function, got {choice!r}")
        if choice == "required" and not tools:
            raise invalid_value("tool_choice", "'required' needs a non-empty tools list")
        return choice, None
    fn = choice.get("function") if choice.get("type") == "function" else None
    name = fn.get("name") if isinstance(fn, dict) else None
    if not isinstance(name, str):
        raise invalid_value("tool_choice", "must be {\"type\": \"function\", \"function\": {\"name\": ...}}")
    if name not in names:
        raise invalid_value("tool_choice.function.name", f"{name!r} is not one of the request's tools")
    return "named", name


def response_format(fmt) -> tuple[str, dict | None]:
    if fmt is None:
        return "text", None
    kind = fmt.get("type")
    if kind in ("text", "json_object"):
        return kind, None
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise invalid_value("response_format.json_schema.schema", "must be a JSON schema object")
        return kind, schema
    raise invalid_value("response_format.type", f"must be text, json_object or json_schema, got {kind!r}")


def _constraints(ctx: ServingContext, n: int, fmt: str, schema, choice: str, name, tools, guided: Guided | None):
    if fmt != "text" and choice in ("required", "named"):
        raise APIError("1215", "response_format JSON and a forced tool_choice are mutually exclusive",
                       "response_format")
    if guided is not None and (fmt != "text" or choice in ("required", "named")):
        other = "response_format JSON" if fmt != "text" else "a forced tool_choice"
        raise APIError("1215", f"{guided.field} and {other} are mutually exclusive", guided.field)
    if guided is not None:  # the answer is content held to it (tool calls are not parsed out: see prepare_chat)
        return guided_constraints(ctx, guided, n, content=True)
    strict = choice == "auto" and any(t["function"].get("strict") is True for t in tools
                                      if isinstance(t.get("function"), dict))
    if fmt == "text" and ((choice == "auto" and not strict) or not tools):
        return None
    try:
        # Inside the try: without xgrammar (an optional extra) building the factory raises a ValueError naming the
        # fix, which the client gets as a 400 (a 500 would be retried three times by the SDKs, to no end).
        factory = ctx.constraint_factory()
        if fmt != "text" and choice == "auto" and tools:  # JSON content, or a call the model chooses to make
            make = lambda: factory.call_or_json(tools, schema)  # noqa: E731
        elif fmt == "json_object":
            make = factory.json_object
        elif fmt == "json_schema":
            make = lambda: factory.json_schema(schema)  # noqa: E731
        elif choice == "none":
            make = factory.content_only
        elif choice == "auto":  # with `strict` tools: the model may answer or call, a call holds to its schema
            make = lambda: factory.call_or_content(tools)  # noqa: E731
        else:
            make = lambda: factory.tool_call(tools, name=name)  # noqa: E731
        return [make() for _ in range(n)]
    except ValueError as e:
        where = "response_format" if fmt != "text" else ("tools" if choice != "none" else "tool_choice")
        if fmt != "text" and str(e).startswith("tools"):  # (call_or_json: a tool's schema, not the format's)
            where = "tools"
        raise invalid_value(where, str(e)) from None


def continuation(req, fmt: str = "text", choice: str = "none") -> tuple[bool, bool]:
    """(add_generation_prompt, continue_final_message) of a /v1 chat request (vLLM's fields; the vendor schema has
    neither). Without the generation prompt nothing opens an answer, so JSON mode and forced calls, whose grammars
    write one, cannot apply."""
    add = getattr(req, "add_generation_prompt", None)
    cont = bool(getattr(req, "continue_final_message", None))
    if cont and add:
        raise APIError("1215", "continue_final_message and add_generation_prompt cannot both be true",
                       "continue_final_message")
    add = not cont and add is not False
    if not add and (fmt != "text" or choice in ("required", "named")):
        what = "continue_final_message" if cont else "add_generation_prompt"
        other = "response_format JSON" if fmt != "text" else "a forced tool_choice"
        raise APIError("1215", f"{what} and {other} are mutually exclusive (use guided_json or guided_regex to hold "
                               "the text written on)", what)
    return add, cont


def guided_constraints(ctx: ServingContext, guided: Guided, n: int, content: bool) -> list:
    """One constraint per choice for vLLM's guided decoding (content: a chat answer; False: completion text)."""
    try:
        factory = ctx.constraint_factory()  # without xgrammar: a ValueError naming the extra (see _constraints)
        return [factory.guided(guided.kind, guided.spec, content=content) for _ in range(n)]
    except ValueError as e:
        raise invalid_value(guided.field, str(e)) from None


def _developer_as_system(messages):
    """OpenAI's `developer` role (newer clients send it where older ones sent `system`) as GLM-4's system turn."""
    if not isinstance(messages, list):
        return messages  # glm_serve.chat names what is wrong with it
    return [{**m, "role": "system"} if isinstance(m, dict) and m.get("role") == "developer" else m for m in messages]


def prepare_chat(req, flavor: str, ctx: ServingContext) -> PreparedChat:
    """Validate a chat request (either schema) and build everything the engine needs."""
    ctx.check_model(req.model)
    if flavor == OPENAI:
        req.messages = _developer_as_system(req.messages)
    tools = check_tools(req.tools) if req.tools else []
    choice, name = _tool_choice(req.tool_choice, tools)
    fmt, schema = response_format(req.response_format)
    params = sampling_params(req, flavor, ctx)
    image_url = check_images(ctx, req.messages)
    add_generation_prompt, continue_final = continuation(req, fmt, choice) if flavor == OPENAI else (True, False)
    try:
        ids = encode_chat(ctx.tokenizer, req.messages, tools=_as_prompted(tools) or None,
                          chat_template=ctx.tokenizer.chat_template,
                          allow_images=image_url is not None, add_generation_prompt=add_generation_prompt,
                          continue_final=continue_final)
    except ChatFormatError as e:
        raise chat_format_error(e) from None
    if ctx.content_filter is not None:  # (the vendor's sensitive_word_check cannot turn it off: README)
        ctx.content_filter.check_messages(req.messages)
    check_prompt(ctx, expanded_ids(ctx, ids) if image_url else ids, params, has_image=image_url is not None)
    guided = read_guided(req) if flavor == OPENAI else None
    raw = continue_final or not add_generation_prompt
    if raw:  # a guided grammar holds the text as generated (no answer separator to write); tool_choice has no say
        constraints = guided_constraints(ctx, guided, params.n, content=False) if guided is not None else None
    else:
        constraints = _constraints(ctx, params.n, fmt, schema, choice, name, tools, guided)
    if fmt != "text" or guided is not None or choice in ("required", "named"):
        # The grammar decides where the answer ends (on a checkpoint stop id, once the JSON is complete): a stop
        # string or an extra stop id met inside the JSON would cut it, and a cut call would still be reported
        # as finish_reason "tool_calls" with arguments that do not parse.
        params.stop, params.stop_token_ids = [], []
    parse = guided is None and choice != "none" and not raw  # (JSON mode beside tools: call_or_json)
    names = frozenset(t["function"]["name"] for t in tools) if parse else frozenset()
    options = (req.stream_options if "stream_options" in type(req).model_fields else None) or {}
    return PreparedChat(ids, params, constraints, names, fmt != "text", bool(req.stream),
                        bool(options.get("include_usage")), image_url=image_url,
                        forced_call=choice in ("required", "named"), raw=raw,
                        whole_calls=flavor == VENDOR and getattr(req, "tool_stream", None) is not True)


def chat_prompt_ids(ctx: ServingContext, messages, tools=None, add_generation_prompt: bool = True,
                    continue_final: bool = False) -> list[int]:
    """A conversation's prompt ids as the model gets them (a GLM-4V image as its slots, not 3 tokens), for the
    routes that count or show them; 400s for bad messages, tools or images."""
    try:
        image = check_images(ctx, messages)
        ids = encode_chat(ctx.tokenizer, messages, tools=_as_prompted(check_tools(tools)) if tools else None,
                          chat_template=ctx.tokenizer.chat_template, allow_images=image is not None,
                          add_generation_prompt=add_generation_prompt, continue_final=continue_final)
    except ChatFormatError as e:
        raise chat_format_error(e) from None
    return expanded_ids(ctx, ids) if image is not None else ids


def check_images(ctx: ServingContext, messages) -> str | None:
    """The one image URL of a GLM-4V conversation, or None; 400s for images this model cannot take."""
    urls = image_urls(messages)
    if not urls:
        return None
    if ctx.core.vision_config is None:
        raise APIError("1214", "this model is text-only: image_url parts need a GLM-4V checkpoint", "messages")
    if len(urls) > 1:
        raise APIError("1214", f"{len(urls)} images in one conversation: GLM-4V takes exactly one", "messages")
    if not isinstance(urls[0], str) or not urls[0]:
        raise APIError("1214", "image_url.url must be a non-empty string", "messages")
    return urls[0]


def expanded_ids(ctx: ServingContext, ids: list[int]) -> list[int]:
    """GLM-4V: the prompt with its image placeholder widened to the tower's slots (for length checks)."""
    from glm_serve.vision_config import expand_image_tokens  # noqa: PLC0415

    sp = ctx.tokenizer.special_ids
    try:
        return expand_image_tokens(ids, sp["<|begin_of_image|>"], sp["<|end_of_image|>"],
                                   ctx.core.vision_config.num_image_vectors).ids
    except ValueError as e:
        raise invalid_value("messages", str(e)) from None


def check_prompt(ctx: ServingContext, ids: list[int], params: SamplingParams, field: str = "messages",
                 has_image: bool = False) -> None:
    if not has_image and ctx.core.vision_config is not None:
        # GLM-4V: text that spells <|begin_of_image|> / <|end_of_image|> becomes those ids; the engine's own rule
        # refuses a placeholder without its image, which would come after admission: ask it now, for a 400.
        try:
            ctx.core.prepare_image(ids, None)
        except ValueError as e:
            raise invalid_value(field, f"holds image tokens but no image was sent ({e}); send the image as an "
                                       "image_url part") from None
    try:
        ctx.core.validate(ids, params)
    except PromptTooLongError as e:
        raise APIError("1261", str(e), field) from None
    except SamplingParamError as e:
        raise invalid_value(e.param, e.message) from None
    except ValueError as e:
        raise invalid_value("prompt", str(e)) from None
