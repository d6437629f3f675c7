"""GLM-4V through the API with the real zai-sdk client: base64 and data-URL images, streaming, image-keyed
prefix caching, and every misuse answered with a 400 while the server keeps serving."""

from __future__ import annotations

import base64
import io

import httpx
import openai
import pytest
import torch
from PIL import Image
from zai import ZhipuAiClient

from glm_serve.api import ServerSettings
from glm_serve.engine.async_engine import AsyncEngine
from glm_serve.engine.config import EngineConfig
from glm_serve.engine.engine import LLMEngine
from glm_serve.llm import LLM
from glm_serve.sampling_params import SamplingParams
from glm_serve.tiny_vision import make_tiny_vision

from .conftest import start_server

MODEL = "glm-4v-tiny"


def _png(seed: int) -> bytes:
    g = torch.Generator().manual_seed(seed)
    arr = (torch.rand(40, 64, 3, generator=g) * 255).to(torch.uint8).numpy()
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _msgs(url: str, text: str = "What is in the picture?"):
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": text}]}]


@pytest.fixture(scope="module")
def tiny_v(tmp_path_factory):
    return make_tiny_vision(tmp_path_factory.mktemp("tiny_v_api"), seed=5)


@pytest.fixture(scope="module")
def vserver(tiny_v):
    engine = AsyncEngine(LLMEngine(EngineConfig(model=str(tiny_v), kv_cache_tokens=4096, max_batch_tokens=256,
                                                max_num_seqs=16)))
    srv, server, thread = start_server(engine, ServerSettings(served_model_names=[MODEL]))
    yield srv
    server.should_exit = True
    thread.join(timeout=10)
    engine.shutdown()


@pytest.fixture(scope="module")
def client(vserver):
    return ZhipuAiClient(api_key="unused.key", base_url=vserver.vendor_base)


def _ask(client, url, text="What is in the picture?", **kw):
    r = client.chat.completions.create(model=MODEL, messages=_msgs(url, text), do_sample=False, max_tokens=12, **kw)
    return r


def test_image_chat_base64_and_data_url_match_the_engine(client, tiny_v):
    png = _png(1)
    b64 = base64.b64encode(png).decode()
    bare = _ask(client, b64)
    data = _ask(client, "data:image/png;base64," + b64)
    assert bare.choices[0].message.content == data.choices[0].message.content
    ref = LLM(str(tiny_v), kv_cache_tokens=2048).generate(
        [_msgs("data:image/png;base64," + b64)], SamplingParams(temperature=0, max_tokens=12), use_tqdm=False)[0]
    assert bare.usage.prompt_tokens == ref.usage["prompt_tokens"] == len(ref.prompt_token_ids) - 3 + 6  # n + 2 slots
    assert bare.usage.completion_tokens == len(ref.token_ids)
    assert (bare.choices[0].message.content or "") == (ref.choices[0].content or "")


def test_image_chat_streams(client):
    b64 = base64.b64encode(_png(2)).decode()
    whole = _ask(client, b64).choices[0].message.content or ""
    chunks = client.chat.completions.create(model=MODEL, messages=_msgs(b64), do_sample=False, max_tokens=12,
                                            stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole


def test_responses_input_image_is_chat_image_url(vserver):
    """/v1/responses: an input_image part (a data URL) is chat's image_url part: the same prompt slots, the same
    greedy answer."""
    c = openai.OpenAI(api_key="unused", base_url=vserver.openai_base, max_retries=0)
    url = "data:image/png;base64," + base64.b64encode(_png(3)).decode()
    r = c.responses.create(model=MODEL, temperature=0, max_output_tokens=8, input=[{"role": "user", "content": [
        {"type": "input_image", "image_url": url}, {"type": "input_text", "text": "What is in the picture?"}]}])
    chat = c.chat.completions.create(model=MODEL, messages=_msgs(url), temperature=0, max_tokens=8)
    assert r.output_text == chat.choices[0].message.content
    assert r.usage.input_tokens == chat.usage.prompt_tokens > 20  # the image's slots, not 3 placeholder ids


def test_same_text_different_images_differ_with_prefix_caching(client, vserver):
    text = "Describe this picture in great detail, covering every colour and every shape you can see. " * 2
    a = base64.b64encode(_png(3)).decode()
    b = base64.b64encode(_png(4)).decode()
    first = _ask(client, a, text)
    again = _ask(client, a, text)
    other = _ask(client, b, text)
    assert vserver.engine.engine.config.enable_prefix_caching
    assert again.choices[0].message.content == first.choices[0].message.content
    assert other.choices[0].message.content != first.choices[0].message.content


def _post(srv, messages, model=MODEL) -> httpx.Response:
    return httpx.post(srv.vendor_base + "chat/completions", json={"model": model, "messages": messages, "do_sample": False,
                                                                   "max_tokens": 4}, timeout=30)


@pytest.mark.parametrize("url,needle", [
    ("bm90IGFuIGltYWdl", "image"),  # base64 of "not an image"
    ("data:image/png;base64,!!!!", "base64"),
    ("http://127.0.0.1:9/x.png", "allow-image-urls"),
    ("ftp://example/x.png", "image"),
])
def test_bad_images_are_400_1210_and_the_server_keeps_serving(vserver, client, url, needle):
    r = _post(vserver, _msgs(url))
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["code"] in ("1210", "1214") and needle.lower() in err["message"].lower()
    assert _ask(client, base64.b64encode(_png(9)).decode()).choices[0].finish_reason in ("stop", "length")


def test_two_images_and_images_outside_user_messages_are_refused(vserver):
    b64 = base64.b64encode(_png(5)).decode()
    two = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": b64}},
                                        {"type": "image_url", "image_url": {"url": b64}},
                                        {"type": "text", "text": "compare"}]}]
    r = _post(vserver, two)
    assert r.status_code == 400 and r.json()["error"]["code"] == "1214"
    sys_img = [{"role": "system", "content": [{"type": "image_url", "image_url": {"url": b64}}]},
               {"role": "user", "content": "hi"}]
    r = _post(vserver, sys_img)
    assert r.status_code == 400 and r.json()["error"]["code"] == "1214"


def test_image_to_a_text_only_model_is_refused(server):
    b64 = base64.b64encode(_png(6)).decode()
    r = _post(server, _msgs(b64), model="glm-4-tiny")
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "1214" and "text-only" in r.json()["error"]["message"]
    assert _post(server, [{"role": "user", "content": "hi"}], model="glm-4-tiny").status_code == 200


def test_tokenizer_counts_the_image_slots(vserver):
    b64 = base64.b64encode(_png(7)).decode()
    with_img = httpx.post(vserver.vendor_base + "tokenizer", json={"model": MODEL, "messages": _msgs(b64, "x")},
                          timeout=30).json()
    plain = httpx.post(vserver.vendor_base + "tokenizer",
                       json={"model": MODEL, "messages": [{"role": "user", "content": "x"}]}, timeout=30).json()
    assert with_img["usage"]["prompt_tokens"] == plain["usage"]["prompt_tokens"] + 6  # boi + 4 vectors + eoi


def test_http_image_urls_with_allow_image_urls(tiny_v, vserver):
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    png = _png(8)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(png)))
            self.end_headers()
            self.wfile.write(png)

        def log_message(self, *args):
            pass

    images = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=images.serve_forever, daemon=True).start()
    srv, server, thread = start_server(vserver.engine, ServerSettings(served_model_names=[MODEL],
                                                                       allow_image_urls=True))
    try:
        url = f"http://127.0.0.1:{images.server_address[1]}/cat.png"
        r = _post(srv, _msgs(url))
        assert r.status_code == 200, r.text
        same = _post(srv, _msgs(base64.b64encode(png).decode()))
        assert r.json()["choices"][0]["message"] == same.json()["choices"][0]["message"]
    finally:
        images.shutdown()
        server.should_exit = True
        thread.join(timeout=10)


def test_image_token_text_without_an_image_is_a_400_not_a_500(vserver, client):
    # Special-token text in a message becomes the special ids; without an image the engine would refuse the
    # placeholder after the request was admitted (a 500, or an error chunk in a stream).
    for text in ("<|begin_of_image|><|endoftext|><|end_of_image|>hi", "a <|end_of_image|> b", "<|begin_of_image|>"):
        msgs = [{"role": "user", "content": text}]
        for stream in (False, True):
            r = httpx.post(vserver.vendor_base + "chat/completions",
                           json={"model": MODEL, "messages": msgs, "max_tokens": 4, "stream": stream}, timeout=30)
            assert r.status_code == 400, r.text
            assert r.json()["error"]["code"] == "1214" and "no image" in r.json()["error"]["message"]
        r = httpx.post(vserver.url + "/v1/chat/completions", json={"model": MODEL, "messages": msgs, "max_tokens": 4},
                       timeout=30)
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error", r.text
        r = httpx.post(vserver.url + "/v1/completions", json={"model": MODEL, "prompt": text, "max_tokens": 4},
                       timeout=30)
        assert r.status_code == 400 and r.json()["error"]["param"] == "prompt", r.text
    assert _ask(client, base64.b64encode(_png(9)).decode()).choices[0].finish_reason in ("stop", "length")


def test_image_chat_that_fills_the_context_window_says_so(tiny_v):
    # The check must count the image's n + 2 KV slots, not its 3 placeholder ids.
    engine = AsyncEngine(LLMEngine(EngineConfig(model=str(tiny_v), kv_cache_tokens=1024, max_model_len=40)))
    srv, server, thread = start_server(engine, ServerSettings(served_model_names=[MODEL]))
    try:
        body = {"model": MODEL, "messages": _msgs(base64.b64encode(_png(1)).decode(), "Describe it."),
                "do_sample": False, "max_tokens": 40}
        j = httpx.post(srv.vendor_base + "chat/completions", json=body, timeout=60).json()
        assert j["usage"]["total_tokens"] == 40, j  # ran into the context window
        assert j["choices"][0]["finish_reason"] == "model_context_window_exceeded"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        engine.shutdown()
