"""GLM-4 chat format: API messages + tools -> GLM items -> prompt text -> ids, and the model's answer back into
content or a tool call.

GLM items are what the official template iterates over: dicts with `role` (system/user/assistant/observation),
`metadata` (a tool call's function name, else "") and `content` (a string); the first item carries `tools` when
the request has tools, and user items may carry `images` (the API's image_url parts, for GLM-4V).

    [gMASK]<sop><|system|>\n{system}<|user|>\n{q}<|assistant|>get_weather\n{"city": "Paris"}<|observation|>\n{result}
    <|assistant|>

The prompt renders with the checkpoint's own `chat_template` when given (a sandboxed jinja2 environment set up
exactly like transformers'), otherwise with `render_builtin`, which writes the same text in plain Python.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from functools import lru_cache
from pathlib import Path

GLM4_CHAT_TEMPLATE = (Path(__file__).with_name("templates") / "glm4_chat.jinja").read_text(encoding="utf-8")

# Fixed texts of the official template's tools block (render_builtin must reproduce it byte for byte).
TOOLS_PREAMBLE = ("你是一个名为 ChatGLM 的人工智能助手。你是基于智谱AI训练的语言模型 GLM-4 模型开发的，"
                  "你的任务是针对用户的问题和要求提供适当的答复和支持。\n\n# 可用工具")
FUNCTION_SUFFIX = "在调用上述函数时，请使用 Json 格式表示调用的参数。"
BUILTIN_TOOL_TEXTS = {
    "python": (
        "当你向 `python` 发送包含 Python 代码的消息时，该代码将会在一个有状态的 Jupyter notebook 环境中执行。\n"
        "`python` 返回代码执行的输出，或在执行 60 秒后返回超时。\n"
        "`/mnt/data` 将会持久化存储你的文件。在此会话中，`python` 无法访问互联网。不要使用 `python` 进行任何网络请求"
        "或者在线 API 调用，这些在线内容的访问将不会成功。"),
    "simple_browser": (
        "你可以使用 `simple_browser` 工具。该工具支持以下函数：\n"
        "`search(query: str, recency_days: int)`：使用搜索引擎进行查询并显示结果，可以使用 `recency_days` "
        "参数控制搜索内容的时效性。\n"
        "`mclick(ids: list[int])`：获取一系列指定 id 的页面内容。每次调用时，须选择3-10个页面。选择多个角度的页面，"
        "同时尽可能选择可信任的信息来源。考虑到部分页面是无法加载的，你也可以多打开一些可能有用的页面而不用担心内容过多。\n"
        "`open_url(url: str)`：打开指定的 URL。\n\n"
        "使用 `【{引用 id}†{引用文本}】` 来引用内容。\n\n"
        "操作步骤：1. 使用 `search` 来获得信息列表; 2. 使用 `mclick` 来获取指定 ID 页面的内容; "
        "3. 根据获得的内容进行回复。在回复中应当引用信息来源。\n"
        " 如果用户提供了 URL，也可以用 `open_url` 直接打开页面。\n"
        "如果初次搜索结果没有找到合适的信息，也可以再次使用 `search` 进行搜索。"),
    "cogview": (
        "如果用户的请求中包含了对图像的描述，你可以使用 `cogview` 来生成图像并展示给用户。你需要向 `cogview` "
        "发送图像描述，规则：\n"
        "- 发送给 `cogview` 的消息必须使用英语。用户的中文描述必须完全翻译为英语。\n"
        "- 应当尽可能详细地描述图像生成的需求，需求描述约 100 英文单词。\n"
        "- 保持用户原始描述的意图。不要虚构内容或者没见过的人物。\n"
        "- 如无特殊说明，所在地为中国，持有中国立场并遵循中国社会主义价值观。"),
}
TOOL_TYPES = ("function", *BUILTIN_TOOL_TEXTS)  # what the template can render; others are cloud services
# GLM-4V: an image sits in the user turn as these three tokens, replaced by the vision embeddings later.
IMAGE_PLACEHOLDER = "<|begin_of_image|><|endoftext|><|end_of_image|>"
ROLES = ("system", "user", "assistant", "tool")


class ChatFormatError(ValueError):
    """A request's messages or tools cannot be rendered. `field` names the bad value (API code 1214), or the
    required one that is missing (`missing`: 1213)."""

    def __init__(self, field: str, message: str, missing: bool = False):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.missing = missing


@dataclass
class ToolCall:
    name: str
    arguments: str  # JSON object text, as the model wrote it
    id: str = field(default_factory=lambda: "call_" + uuid.uuid4().hex[:24])

    def to_openai(self) -> dict:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass
class ParsedOutput:
    content: str | None  # None when the answer is a tool call
    tool_calls: list[ToolCall]


def _text_of(content, where: str, allow_images: bool, images_ok_here: bool) -> tuple[str, list]:
    """(text, image parts) of an API content value: a string, None, or a list of text/image_url parts."""
    if content is None:
        return "", []
    if isinstance(content, str):
        return content, []
    if not isinstance(content, list):
        raise ChatFormatError(where, f"must be a string, null or a list of parts, got {type(content).__name__}")
    texts, images = [], []
    for j, part in enumerate(content):
        here = f"{where}[{j}]"
        kind = part.get("type") if isinstance(part, Mapping) else None
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise ChatFormatError(f"{here}.text", "must be a string")
            texts.append(part["text"])
        elif kind == "image_url":
            url = part.get("image_url")
            url = url.get("url") if isinstance(url, Mapping) else url
            if not isinstance(url, str) or not url:
                raise ChatFormatError(f"{here}.image_url", "must be {\"url\": \"...\"} with a non-empty url")
            if not allow_images:
                raise ChatFormatError(here, "this model does not accept images")
            if not images_ok_here:
                raise ChatFormatError(here, "images are only allowed in user messages")
            images.append(dict(part))
        else:
            raise ChatFormatError(f"{here}.type", f"must be 'text' or 'image_url', got {kind!r}")
    # Several text parts join with a newline (vLLM's convention for OpenAI part lists).
    return "\n".join(texts), images


def _check_tools(tools) -> list[dict]:
    if not isinstance(tools, list):
        raise ChatFormatError("tools", f"must be a list, got {type(tools).__name__}")
    for i, tool in enumerate(tools):
        if not isinstance(tool, Mapping):
            raise ChatFormatError(f"tools[{i}]", "must be an object")
        if tool.get("type") not in TOOL_TYPES:
            raise ChatFormatError(f"tools[{i}].type", f"must be one of {', '.join(TOOL_TYPES)}, "
                                                      f"got {tool.get('type')!r}")
        if tool["type"] == "function":
            fn = tool.get("function")
            if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str) or not fn["name"]:
                raise ChatFormatError(f"tools[{i}].function.name", "must be a non-empty string")
            if any(c.isspace() for c in fn["name"]):  # a call is emitted as "name\n{args}": it could not be read back
                raise ChatFormatError(f"tools[{i}].function.name", f"must hold no whitespace, got {fn['name']!r}")
            if fn.get("parameters") is not None and not isinstance(fn["parameters"], Mapping):
                raise ChatFormatError(f"tools[{i}].function.parameters",
                                      f"must be a JSON Schema object, got {type(fn['parameters']).__name__}")
    return [dict(t) for t in tools]


def _call_item(call, where: str) -> dict:
    fn = call.get("function") if isinstance(call, Mapping) else None
    if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str) or not fn["name"]:
        raise ChatFormatError(f"{where}.function.name", "must be a non-empty string")
    args = fn.get("arguments")
    if args is None:
        args = "{}"
    elif isinstance(args, (Mapping, list)):  # the vendor SDKs sometimes send parsed arguments
        args = json.dumps(args, ensure_ascii=False)
    elif not isinstance(args, str):
        raise ChatFormatError(f"{where}.function.arguments", "must be a JSON string")
    return {"role": "assistant", "metadata": fn["name"], "content": args}


def to_glm_items(messages, tools=None, allow_images: bool = False) -> list[dict]:
    """Validate API messages/tools and turn them into GLM items.

    With tools, a tools-only system item goes first and the caller's own system message stays after it. An
    assistant message renders its text (if any), then one item per tool call (metadata = function name,
    content = arguments); tool results become `observation` items (tool_call_id is not part of the format)."""
    if not isinstance(messages, list) or not messages:
        raise ChatFormatError("messages", "must be a non-empty list")
    items: list[dict] = []
    if tools:
        items.append({"role": "system", "metadata": "", "content": "", "tools": _check_tools(tools)})
    elif tools is not None:
        _check_tools(tools)
    for i, msg in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(msg, Mapping):
            raise ChatFormatError(where, "must be an object")
        role = msg.get("role")
        if role not in ROLES:
            raise ChatFormatError(f"{where}.role", f"must be one of {', '.join(ROLES)}, got {role!r}")
        if role != "assistant" and msg.get("content") is None:  # only an assistant's tool-call turn may have none
            raise ChatFormatError(f"{where}.content", f"required for a {role} message", missing=True)
        text, images = _text_of(msg.get("content"), f"{where}.content", allow_images, role == "user")
        if role == "assistant":
            calls = msg.get("tool_calls") or []
            if not isinstance(calls, list):
                raise ChatFormatError(f"{where}.tool_calls", "must be a list")
            if text or not calls:
                items.append({"role": "assistant", "metadata": "", "content": text})
            items.extend(_call_item(c, f"{where}.tool_calls[{k}]") for k, c in enumerate(calls))
        else:
            item = {"role": "observation" if role == "tool" else role, "metadata": "", "content": text}
            if images:
                item["images"] = images
            items.append(item)
    return items


def render_builtin(items: list[dict], add_generation_prompt: bool = True) -> str:
    """The official template's output, written in Python (used when a checkpoint ships no template, and for
    GLM-4V image turns, which the text template cannot express)."""
    out = ["[gMASK]<sop>"]
    for item in items:
        if "tools" in item:
            out.append("<|system|>\n" + TOOLS_PREAMBLE)
            for tool in item["tools"]:
                kind = tool.get("type")
                if kind == "function":
                    fn = tool["function"]
                    out.append(f"\n## {fn['name']}\n\n{json.dumps(fn, ensure_ascii=False, indent=4)}\n"
                               + FUNCTION_SUFFIX)
                elif kind in BUILTIN_TOOL_TEXTS:
                    out.append(f"\n## {kind}\n\n{BUILTIN_TOOL_TEXTS[kind]}")
        images = item.get("images") or ()
        if item.get("content") or images:  # the template drops items with empty content
            out.append(f"<|{item['role']}|>{item.get('metadata', '')}\n" + IMAGE_PLACEHOLDER * len(images)
                       + item.get("content", ""))
    if add_generation_prompt:
        out.append("<|assistant|>")
    return "".join(out)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # transformers' filter: plain json.dumps, no HTML escaping, non-ASCII kept
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message):
    import jinja2  # noqa: PLC0415

    raise jinja2.exceptions.TemplateError(message)


@lru_cache(maxsize=8)
def _compile(template: str):
    import jinja2.ext  # noqa: PLC0415
    from jinja2.sandbox import ImmutableSandboxedEnvironment  # noqa: PLC0415

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


def render_template(items: list[dict], chat_template: str, tools=None, add_generation_prompt: bool = True) -> str:
    """Render GLM items with a checkpoint's jinja chat template, exactly as transformers' apply_chat_template."""
    import jinja2  # noqa: PLC0415

    # to_glm_items puts the tools on an item of their own (a system item with no content). GLM-4-9B-chat's
    # template renders the tools block from any item carrying `tools` and drops items without content; GLM-4-0414's
    # renders the tools from the `tools` variable and EVERY system item, so the tools-only item would add an
    # empty "<|system|>\n" turn. Carried by the next item instead, the tools render the same with the first
    # template and are not a turn at all with the second.
    if len(items) > 1 and "tools" in items[0] and items[0].get("role") == "system" and not items[0].get("content"):
        items = [{**items[1], "tools": items[0]["tools"]}, *items[2:]]
    try:
        return _compile(chat_template).render(messages=items, tools=tools, add_generation_prompt=add_generation_prompt)
    except jinja2.TemplateError as e:  # raise_exception() in a template reports a bad conversation
        raise ChatFormatError("messages", f"chat template rejected the conversation: {e}") from None


def render_prompt(messages, tools=None, chat_template: str | None = None, add_generation_prompt: bool = True,
                  allow_images: bool = False, continue_final: bool = False) -> str:
    """Prompt text for API messages: with `chat_template` when given (and the turn has no images), else built-in.

    continue_final (vLLM's continue_final_message): the last message is the start of the assistant's answer, and
    the prompt ends right after its text (`...<|assistant|>\nSure, here`), so the model writes on from there."""
    items = to_glm_items(messages, tools, allow_images)
    if continue_final:
        last = items[-1]
        if last["role"] != "assistant" or last.get("metadata") or not last.get("content"):
            raise ChatFormatError(f"messages[{len(messages) - 1}]", "continue_final_message needs the last message to "
                                  "be an assistant message with text content (and no tool_calls)")
        add_generation_prompt = False
    if chat_template and not any(item.get("images") for item in items):
        text = render_template(items, chat_template, tools or None, add_generation_prompt)
    else:
        text = render_builtin(items, add_generation_prompt)
    if continue_final:  # a template may close the turn after the text: cut there (GLM-4's add nothing)
        end = text.rfind(last["content"])
        if end < 0:
            raise ChatFormatError("messages", "the chat template did not render the final message's text as given")
        text = text[:end + len(last["content"])]
    return text


def encode_chat(tokenizer, messages, tools=None, chat_template: str | None = None, allow_images: bool = False,
                builtin: bool = False, add_generation_prompt: bool = True, continue_final: bool = False) -> list[int]:
    """Prompt ids. Renders with `chat_template`, else the tokenizer's own, else (or with builtin=True) the built-in
    renderer. Like transformers, special-token text in the rendered prompt becomes special ids. add_generation_prompt
    and continue_final: as vLLM's chat request fields (see render_prompt)."""
    template = None if builtin else (chat_template or tokenizer.chat_template)
    text = render_prompt(messages, tools, template, add_generation_prompt=add_generation_prompt,
                         allow_images=allow_images, continue_final=continue_final)
    return tokenizer.encode(text, allow_special=True)


def parse_assistant_output(text: str, tool_names=None) -> ParsedOutput:
    """Split a finished answer (the text after `<|assistant|>`) into content or a tool call.

    "\\n..." is content (that separator newline dropped). "name\\n{json object}" is a call; arguments stay the
    JSON text. Anything else (no newline, a name with spaces, arguments that are not a JSON object, a name not in
    `tool_names` when given) is content as written. GLM-4 emits one call per assistant turn (generation stops at
    <|observation|>), so at most one call is returned."""
    if text.startswith("\n"):
        return ParsedOutput(text[1:], [])
    name, sep, args = text.partition("\n")
    name, args = name.strip(), args.strip()
    if not sep or not name or any(c.isspace() for c in name) or (tool_names is not None and name not in tool_names):
        return ParsedOutput(text, [])
    try:
        parsed = json.loads(args)
    except ValueError:
        return ParsedOutput(text, [])
    if not isinstance(parsed, dict):
        return ParsedOutput(text, [])
    return ParsedOutput(None, [ToolCall(name, args)])


def image_urls(messages) -> list[str]:
    """The `image_url` urls of API messages, in order (GLM-4V takes one per conversation)."""
    urls = []
    for msg in messages or ():
        content = msg.get("content") if isinstance(msg, dict) else None
        if isinstance(content, list):
            for part in content:
                if isinstance(part, dict) and part.get("type") == "image_url":
                    url = part.get("image_url")
                    urls.append(url.get("url") if isinstance(url, dict) else url)
    return urls
