"""--chat-template FILE (serve, batch) and LLM(chat_template=...): a fine-tune's own template replaces the
checkpoint's for every route that renders chats, in the thread engine and with --engine-process; a template that
cannot serve is a start-up error."""

from __future__ import annotations

import httpx
import pytest

from glm_serve.api import ServerSettings
from glm_serve.cli import main
from glm_serve.engine.async_engine import AsyncEngine
from glm_serve.engine.config import EngineConfig
from glm_serve.engine.engine import LLMEngine
from glm_serve.llm import LLM
from glm_serve.sampling_params import SamplingParams

from .conftest import _free_port, start_server

# GLM-4's layout with a marker the checkpoint's template never writes: "[ft]" before every turn's content
TEMPLATE = ("[gMASK]<sop>{% for m in messages %}<|{{ m.role }}|>\n[ft]{{ m.content }}{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello there"}]
EXPECTED = "[gMASK]<sop><|system|>\n[ft]Be brief.<|user|>\n[ft]hello there<|assistant|>"


@pytest.fixture(scope="module")
def template_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("tpl") / "chat.jinja"
    path.write_text(TEMPLATE)
    return path


def test_served_chats_render_with_the_given_template(tiny_hf, template_file):
    engine = AsyncEngine(LLMEngine(EngineConfig(model=str(tiny_hf), kv_cache_tokens=2048,
                                                chat_template=str(template_file))))
    srv, server, thread = start_server(engine, ServerSettings(served_model_names=["m"]))
    try:
        want = engine.engine.tokenizer.encode(EXPECTED, allow_special=True)
        r = httpx.post(srv.url + "/tokenize", json={"model": "m", "messages": MESSAGES}).json()
        assert r["tokens"] == want
        body = {"model": "m", "messages": MESSAGES, "max_tokens": 4, "temperature": 0}
        chat = httpx.post(srv.url + "/v1/chat/completions", json=body).json()
        assert chat["usage"]["prompt_tokens"] == len(want)
        # the chat's answer is the completion of exactly those ids
        text = httpx.post(srv.url + "/v1/completions", json={"model": "m", "prompt": want, "max_tokens": 4,
                                                                "temperature": 0}).json()["choices"][0]["text"]
        assert chat["choices"][0]["message"]["content"] == text.removeprefix("\n")
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        engine.shutdown()


def test_llm_takes_a_template_too(tiny_hf, template_file):
    llm = LLM(str(tiny_hf), kv_cache_tokens=2048, chat_template=str(template_file))
    ids = llm.tokenizer.encode(EXPECTED, allow_special=True)
    params = SamplingParams(temperature=0, max_tokens=5)
    assert llm.generate([MESSAGES], params)[0].token_ids == llm.generate([ids], params)[0].token_ids
    plain = LLM(str(tiny_hf), kv_cache_tokens=2048).tokenizer
    assert plain.chat_template != TEMPLATE  # (the checkpoint's own is another)


@pytest.mark.parametrize("content, says", [(None, "does not exist"), ("", "is empty"),
                                           ("{% for m in messages %}{{ m.content }", "not a valid jinja")])
def test_a_bad_template_stops_the_start(tiny_hf, tmp_path, capsys, content, says):
    path = tmp_path / "t.jinja"
    if content is not None:
        path.write_text(content)
    rc = main(["serve", "--model", str(tiny_hf), "--data-dir", str(tmp_path / "d"), "--chat-template", str(path),
               "--port", str(_free_port())])
    err = capsys.readouterr().err
    assert rc == 2 and "--chat-template" in err and says in err, err


def test_engine_process_renders_with_it(tiny_hf, template_file):
    # With --engine-process the server process renders chats (RemoteCore's tokenizer): it takes the template too
    from glm_serve.engine.process import ProcessEngine  # noqa: PLC0415

    engine = ProcessEngine(EngineConfig(model=str(tiny_hf), kv_cache_tokens=2048, chat_template=str(template_file)))
    try:
        assert engine.engine.tokenizer.chat_template == TEMPLATE
        srv, server, thread = start_server(engine, ServerSettings(served_model_names=["m"]))
        try:
            want = engine.engine.tokenizer.encode(EXPECTED, allow_special=True)
            chat = httpx.post(srv.url + "/v1/chat/completions", json={"model": "m", "messages": MESSAGES,
                                                                      "max_tokens": 2}).json()
            assert chat["usage"]["prompt_tokens"] == len(want)
        finally:
            server.should_exit = True
            thread.join(timeout=10)
    finally:
        engine.shutdown()
