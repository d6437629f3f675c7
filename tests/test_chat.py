"""Chat format tests: our prompts and ids against transformers' apply_chat_template on the official template,
the built-in renderer against the template, validation errors, and the tool-call parser."""

import json
import random
import shutil

import pytest

from glm_serve.chat import (
    GLM4_CHAT_TEMPLATE,
    IMAGE_PLACEHOLDER,
    ChatFormatError,
    encode_chat,
    parse_assistant_output,
    render_builtin,
    render_prompt,
    to_glm_items,
)
from glm_serve.tiny_tokenizer import write_tokenizer_files
from glm_serve.tokenizer import load_tokenizer

SEED = random.randrange(2**32)  # fresh conversations each run; printed in failures

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "查询指定城市的天气 (weather of a city)",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "城市名称"},
                                                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                   "required": ["city"]}}}
STOCK = {"type": "function", "function": {
    "name": "get_stock_price", "description": "Price of a stock",
    "parameters": {"type": "object", "properties": {"symbol": {"type": "string"}}}}}
NO_PARAMS = {"type": "function", "function": {"name": "now"}}
TOOL_POOL = [WEATHER, STOCK, NO_PARAMS, {"type": "python"}, {"type": "simple_browser"}, {"type": "cogview"}]
TEXTS = ["你好", "What's the weather in Paris?", "北京今天天气怎么样？", "Tell me a joke 😀", "", "line one\nline two",
         "  spaced  ", "code:\n```python\nprint('hi')\n```", "数字 123 和 emoji 🎉🚀", "<|user|> typed by a user"]

CONVERSATIONS = [
    ([{"role": "user", "content": "你好"}], None),
    ([{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"},
      {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Again?"}], None),
    ([{"role": "system", "content": "Use tools."}, {"role": "user", "content": "北京天气?"},
      {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
          "name": "get_weather", "arguments": "{\"city\": \"北京\"}"}}]},
      {"role": "tool", "tool_call_id": "call_1", "content": "{\"temperature\": 25, \"weather\": \"晴\"}"},
      {"role": "assistant", "content": "北京今天晴，25度。"}, {"role": "user", "content": "上海呢?"}],
     [WEATHER, STOCK]),
    ([{"role": "user", "content": [{"type": "text", "text": "part one"}, {"type": "text", "text": "第二部分"}]}],
     [{"type": "python"}, {"type": "simple_browser"}, {"type": "cogview"}]),
    ([{"role": "user", "content": "two calls"},
      {"role": "assistant", "content": "Checking both.", "tool_calls": [
          {"id": "a", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "巴黎"}}},
          {"id": "b", "type": "function",
           "function": {"name": "get_stock_price", "arguments": "{\"symbol\": \"X\"}"}}]},
      {"role": "tool", "tool_call_id": "a", "content": "sunny"},
      {"role": "tool", "tool_call_id": "b", "content": "42"}],
     [WEATHER, STOCK, NO_PARAMS]),
]


def random_conversation(rng: random.Random):
    tools = rng.sample(TOOL_POOL, rng.randint(1, len(TOOL_POOL))) if rng.random() < 0.6 else None
    msgs = [{"role": "system", "content": rng.choice(TEXTS)}] if rng.random() < 0.5 else []
    for _ in range(rng.randint(1, 4)):
        text = rng.choice(TEXTS)
        msgs.append({"role": "user", "content": text if rng.random() < 0.7 else
                     [{"type": "text", "text": t} for t in rng.sample(TEXTS, rng.randint(1, 3))]})
        if tools and rng.random() < 0.5:
            args = {"city": rng.choice(["北京", "Paris", "东京 Tokyo"]), "n": rng.randint(0, 99)}
            call = {"id": f"call_{rng.randrange(1000)}", "type": "function",
                    "function": {"name": "get_weather", "arguments": json.dumps(args, ensure_ascii=rng.random() < 0.5)}}
            msgs.append({"role": "assistant", "content": rng.choice([None, "", "Let me check."]), "tool_calls": [call]})
            msgs.append({"role": "tool", "tool_call_id": call["id"], "content": rng.choice(TEXTS[:4] + ['{"t": 20}'])})
        msgs.append({"role": "assistant", "content": rng.choice(TEXTS)})
    return msgs[:-1] if rng.random() < 0.8 else msgs, tools


@pytest.fixture(scope="module")
def tok_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    for layout in ("hf", "chatglm"):
        write_tokenizer_files(root / layout, layout)
    return root


@pytest.fixture(scope="module")
def oracle(tok_dirs):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tok_dirs / "hf"))


def oracle_ids(oracle, items, tools) -> list[int]:
    out = oracle.apply_chat_template(items, tools=tools, add_generation_prompt=True, tokenize=True)
    out = out["input_ids"] if hasattr(out, "keys") else out  # transformers 5 returns a BatchEncoding by default
    return list(out[0] if out and isinstance(out[0], list) else out)


def all_conversations():
    rng = random.Random(SEED)
    return CONVERSATIONS + [random_conversation(rng) for _ in range(60)]


def test_ids_match_transformers_apply_chat_template(tok_dirs, oracle):
    toks = [load_tokenizer(tok_dirs / "hf"), load_tokenizer(tok_dirs / "chatglm")]
    for msgs, tools in all_conversations():
        items = to_glm_items(msgs, tools)
        want = oracle_ids(oracle, items, tools)
        for tok in toks:
            assert encode_chat(tok, msgs, tools) == want, (SEED, tok.source, msgs, tools)
            assert encode_chat(tok, msgs, tools, builtin=True) == want, (SEED, msgs, tools)
        text = oracle.apply_chat_template(items, tools=tools, add_generation_prompt=True, tokenize=False)
        assert render_prompt(msgs, tools, GLM4_CHAT_TEMPLATE) == text, (SEED, msgs, tools)


def test_builtin_renderer_equals_template(oracle):
    for msgs, tools in all_conversations():
        for gen in (True, False):
            want = render_prompt(msgs, tools, GLM4_CHAT_TEMPLATE, add_generation_prompt=gen)
            assert render_prompt(msgs, tools, add_generation_prompt=gen) == want, (SEED, msgs, tools)
    # items as the vendor writes them by hand render the same way too
    items = [{"role": "system", "content": "", "tools": TOOL_POOL}, {"role": "user", "content": "q"},
             {"role": "assistant", "metadata": "now", "content": "{}"}, {"role": "observation", "content": "ok"}]
    assert render_builtin(items) == oracle.apply_chat_template(items, add_generation_prompt=True, tokenize=False)


def test_glm_items_layout():
    msgs, tools = CONVERSATIONS[2]
    items = to_glm_items(msgs, tools)
    assert items[0] == {"role": "system", "metadata": "", "content": "", "tools": tools}
    assert items[1] == {"role": "system", "metadata": "", "content": "Use tools."}  # caller's system kept, after
    assert items[3] == {"role": "assistant", "metadata": "get_weather", "content": "{\"city\": \"北京\"}"}
    assert items[4]["role"] == "observation"
    text = render_prompt(msgs, tools)
    assert text.startswith("[gMASK]<sop><|system|>\n你是一个名为 ChatGLM 的人工智能助手。")
    assert "# 可用工具\n## get_weather\n\n{\n    \"name\": \"get_weather\"" in text
    assert "<|assistant|>get_weather\n{\"city\": \"北京\"}<|observation|>\n{\"temperature\"" in text
    assert text.endswith("<|user|>\n上海呢?<|assistant|>")
    assert render_prompt([{"role": "user", "content": "hi"}]) == "[gMASK]<sop><|user|>\nhi<|assistant|>"
    parts = [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    assert to_glm_items([{"role": "user", "content": parts}])[0]["content"] == "a\nb"
    dict_args = to_glm_items(CONVERSATIONS[4][0])[2]
    assert dict_args == {"role": "assistant", "metadata": "get_weather", "content": "{\"city\": \"巴黎\"}"}


def test_images_are_kept_and_rejected_when_not_supported(tok_dirs):
    tok = load_tokenizer(tok_dirs / "hf")
    msgs = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                                         {"type": "text", "text": "这是什么？"}]}]
    with pytest.raises(ChatFormatError) as e:
        encode_chat(tok, msgs)
    assert e.value.field == "messages[0].content[0]" and "image" in str(e.value)
    items = to_glm_items(msgs, allow_images=True)
    assert items[0]["images"] == [msgs[0]["content"][0]] and items[0]["content"] == "这是什么？"
    ids = encode_chat(tok, msgs, allow_images=True)
    s = tok.special_ids
    image_ids = [s["<|begin_of_image|>"], s["<|endoftext|>"], s["<|end_of_image|>"]]
    assert ids[:4] == [s["[gMASK]"], s["<sop>"], s["<|user|>"], *tok.encode("\n")]
    assert ids[4:7] == image_ids and ids[-1] == s["<|assistant|>"]
    assert tok.decode(ids) == f"[gMASK]<sop><|user|>\n{IMAGE_PLACEHOLDER}这是什么？<|assistant|>"


@pytest.mark.parametrize("messages, tools, field", [
    ([], None, "messages"),
    ("hi", None, "messages"),
    (["hi"], None, "messages[0]"),
    ([{"role": "robot", "content": "x"}], None, "messages[0].role"),
    ([{"role": "user", "content": 5}], None, "messages[0].content"),
    ([{"role": "user", "content": [{"type": "audio", "data": "x"}]}], None, "messages[0].content[0].type"),
    ([{"role": "user", "content": [{"type": "text", "text": 3}]}], None, "messages[0].content[0].text"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}], None,
     "messages[0].content[0].image_url"),
    ([{"role": "assistant", "tool_calls": [{"function": {"arguments": "{}"}}]}], None,
     "messages[0].tool_calls[0].function.name"),
    ([{"role": "assistant", "tool_calls": "get_weather"}], None, "messages[0].tool_calls"),
    ([{"role": "user", "content": "x"}], [{"type": "web_search", "web_search": {}}], "tools[0].type"),
    ([{"role": "user", "content": "x"}], [{"type": "function", "function": {"description": "d"}}],
     "tools[0].function.name"),
    ([{"role": "user", "content": "x"}], {"type": "function"}, "tools"),
    ([{"role": "user"}], None, "messages[0].content"),
    ([{"role": "system", "content": None}, {"role": "user", "content": "x"}], None, "messages[0].content"),
    ([{"role": "user", "content": "x"}], [{"type": "function", "function": {"name": "get\nweather"}}],
     "tools[0].function.name"),
    ([{"role": "user", "content": "x"}], [{"type": "function", "function": {"name": "f", "parameters": "x"}}],
     "tools[0].function.parameters"),
])
def test_validation_errors_name_the_field(messages, tools, field):
    with pytest.raises(ChatFormatError) as e:
        render_prompt(messages, tools)
    assert isinstance(e.value, ValueError) and e.value.field == field and str(e.value).startswith(field)


def test_tool_call_without_arguments_renders_an_empty_object():
    # The vendor SDKs may leave out arguments of a call that takes none; the prompt must still hold JSON.
    call = {"id": "c1", "type": "function", "function": {"name": "ping"}}
    items = to_glm_items([{"role": "user", "content": "hi"},
                          {"role": "assistant", "content": None, "tool_calls": [call]}])
    assert items[-1] == {"role": "assistant", "metadata": "ping", "content": "{}"}


def test_tool_message_without_a_call_is_allowed():
    text = render_prompt([{"role": "user", "content": "q"}, {"role": "tool", "content": "result"}])
    assert text.endswith("<|observation|>\nresult<|assistant|>")


def test_template_raise_exception_becomes_chat_format_error():
    template = "{% if messages|length > 1 %}{{ raise_exception('only one message') }}{% endif %}x"
    assert render_prompt([{"role": "user", "content": "a"}], chat_template=template) == "x"
    with pytest.raises(ChatFormatError, match="only one message"):
        render_prompt([{"role": "user", "content": "a"}] * 2, chat_template=template)


def test_parse_assistant_output():
    out = parse_assistant_output("\nHello!\nBye")
    assert out.content == "Hello!\nBye" and out.tool_calls == []
    out = parse_assistant_output('get_weather\n{"city": "北京"}')
    assert out.content is None
    assert [(c.name, c.arguments) for c in out.tool_calls] == [("get_weather", '{"city": "北京"}')]
    assert out.tool_calls[0].to_openai()["type"] == "function" and out.tool_calls[0].id.startswith("call_")
    for text in ('get_weather\n{"city": ', "Sure thing\n{}", "no newline", 'f\n[1, 2]', "", "\n"):
        out = parse_assistant_output(text)
        assert out.tool_calls == [] and out.content == (text[1:] if text.startswith("\n") else text)
    assert parse_assistant_output('other\n{"a": 1}', tool_names={"get_weather"}).tool_calls == []


def test_tool_call_round_trip(tok_dirs):
    tok = load_tokenizer(tok_dirs / "chatglm")
    rng = random.Random(SEED + 1)
    for _ in range(20):
        name = rng.choice(["get_weather", "get_stock_price", "now"])
        args = json.dumps({"city": rng.choice(["北京", "Paris 🌧️"]), "days": rng.randint(1, 9)},
                          ensure_ascii=rng.random() < 0.5)
        msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c", "type": "function", "function": {"name": name, "arguments": args}}]}]
        prompt = render_prompt(msgs, [WEATHER, STOCK, NO_PARAMS], add_generation_prompt=False)
        generated = prompt.rsplit("<|assistant|>", 1)[1]  # what the model wrote after <|assistant|>
        ids = tok.encode(generated)  # through ids and back, as the engine sees it
        parsed = parse_assistant_output(tok.decode(ids), tool_names={"get_weather", "get_stock_price", "now"})
        assert parsed.content is None and [(c.name, c.arguments) for c in parsed.tool_calls] == [(name, args)], SEED


# GLM-4-9B-0414's chat template (its tokenizer_config.json; the GLM-Z1 template is the same plus </think>):
# tools come from the `tools` variable, and every system item renders, empty or not.
GLM4_0414_TEMPLATE = """[gMASK]<sop>
{%- if tools -%}
<|system|>
# 可用工具
{% for tool in tools %}
    {%- set function = tool.function if tool.get("function") else tool %}

## {{ function.name }}

{{ function | tojson(indent=4, ensure_ascii=False) }}
在调用上述函数时，请使用 Json 格式表示调用的参数。
{%- endfor %}
{%- endif -%}

{%- for msg in messages %}
    {%- if msg.role == 'system' %}
<|system|>
{{ msg.content }}
    {%- endif %}
{%- endfor %}

{%- for message in messages if message.role != 'system' %}
    {%- set role = message['role'] %}
    {%- set content = message['content'] %}
    {%- set meta = message.get("metadata", "") %}

    {%- if role == 'user' %}
<|user|>
{{ content }}
    {%- elif role == 'assistant' and not meta %}
<|assistant|>
{{ content }}
    {%- elif role == 'assistant' and meta %}
<|assistant|>{{ meta }}
{{ content }}
    {%- elif role == 'observation' %}
<|observation|>
{{ content }}
    {%- endif %}
{%- endfor %}
{% if add_generation_prompt %}<|assistant|>{% endif %}"""


def test_glm4_0414_template_gets_no_empty_system_turn(tok_dirs, tmp_path):
    """Our tools-only item must not become an empty <|system|> turn under a template that renders every system
    item; the oracle is transformers rendering the conversation's own items with `tools=`."""
    from transformers import AutoTokenizer

    d = tmp_path / "glm4_0414"
    shutil.copytree(tok_dirs / "hf", d)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg["chat_template"] = GLM4_0414_TEMPLATE
    (d / "tokenizer_config.json").write_text(json.dumps(cfg, ensure_ascii=False))
    tok, oracle = load_tokenizer(d), AutoTokenizer.from_pretrained(str(d))
    for msgs, tools in all_conversations():
        tools = [t for t in tools if t["type"] == "function"] if tools else None
        items = [item for item in to_glm_items(msgs, tools) if "tools" not in item]
        assert encode_chat(tok, msgs, tools) == oracle_ids(oracle, items, tools), (SEED, msgs, tools)
    text = render_prompt([{"role": "user", "content": "q"}], [WEATHER], GLM4_0414_TEMPLATE)
    assert "<|system|>\n<|user|>" not in text and text.endswith("调用的参数。<|user|>\nq<|assistant|>")


@pytest.mark.parametrize("builtin", [False, True])
def test_continued_answers_and_no_generation_prompt_match_transformers(tok_dirs, oracle, builtin):
    """vLLM's continue_final_message (the prompt ends inside the assistant's answer, right after its given start)
    and add_generation_prompt false, against apply_chat_template's own continue_final_message."""
    tok = load_tokenizer(tok_dirs / "hf")
    for msgs, tools in all_conversations()[:20]:
        start = {"role": "assistant", "content": "Sure, here is 你好"}
        items = to_glm_items(msgs + [start], tools)
        want = oracle.apply_chat_template(items, tools=tools, continue_final_message=True, tokenize=False)
        assert want.endswith("<|assistant|>\nSure, here is 你好")
        got = encode_chat(tok, msgs + [start], tools, builtin=builtin, continue_final=True)
        assert got == tok.encode(want, allow_special=True), (SEED, msgs, tools)
        want = oracle.apply_chat_template(to_glm_items(msgs, tools), tools=tools, add_generation_prompt=False,
                                          tokenize=False)
        assert encode_chat(tok, msgs, tools, builtin=builtin, add_generation_prompt=False) == \
            tok.encode(want, allow_special=True)
    for bad in ([{"role": "user", "content": "q"}], [{"role": "user", "content": "q"}, {"role": "assistant",
                 "content": None, "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": "{}"}}]}]):
        with pytest.raises(ChatFormatError, match="continue_final_message"):
            encode_chat(tok, bad, builtin=builtin, continue_final=True)
