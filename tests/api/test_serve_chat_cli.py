"""`glm-serve serve` (flags -> configs; a real process: start-up log, keys, no key in the log) and
`glm-serve chat` (multi-turn loop against a server and in-process, greedy answers equal to the API's)."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time

import httpx
import pytest
import torch

from glm_serve.api.serve import api_keys, engine_config
from glm_serve.chat_cli import chat_loop, local_backend, server_backend
from glm_serve.cli import build_parser

from .conftest import _free_port, static_http


def test_serve_flags_map_to_configs(monkeypatch):
    args = build_parser().parse_args([
        "serve", "--model", "/m", "--block-size", "32", "--kv-cache-tokens", "4096", "--max-num-seqs", "8",
        "--max-batch-tokens", "64", "--no-prefix-caching", "--attention-backend", "torch", "--max-model-len", "1024",
        "--quantization", "none", "--rope-theta", "5e6", "--served-model-name", "a", "--served-model-name", "b",
        "--api-key", "k1", "--max-queue", "3", "--max-concurrency-per-key", "2", "--kv-cache-dtype", "fp8"])
    cfg = engine_config(args)
    assert cfg.kv_cache_dtype == "fp8" and engine_config(build_parser().parse_args(["serve"])).kv_cache_dtype == "auto"
    assert (cfg.model, cfg.block_size, cfg.kv_cache_tokens, cfg.max_num_seqs, cfg.max_batch_tokens) == \
        ("/m", 32, 4096, 8, 64)
    assert (cfg.enable_prefix_caching, cfg.attention_backend, cfg.max_model_len, cfg.quantization, cfg.rope_theta) \
        == (False, "torch", 1024, None, 5e6)
    assert args.served_model_name == ["a", "b"] and (args.max_queue, args.max_concurrency_per_key) == (3, 2)
    monkeypatch.setenv("GLM_SERVE_API_KEYS", "k2, k1 ,k3")
    assert api_keys(args.api_key) == ["k1", "k2", "k3"]


def test_serve_process(tiny_hf, tmp_path):
    port, key = _free_port(), "procid.proc-secret-proc-secret-proc-secret"
    env = {**os.environ, "GLM_SERVE_API_KEYS": key}
    proc = subprocess.Popen([sys.executable, "-m", "glm_serve.cli", "serve", "--model", str(tiny_hf), "--port",
                             str(port), "--kv-cache-tokens", "2048", "--served-model-name", "glm-4-flash",
                             "--kv-cache-dtype", "fp8",
                             "--data-dir", str(tmp_path / "data")],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        deadline, ok = time.monotonic() + 90, False
        while time.monotonic() < deadline and proc.poll() is None and not ok:
            try:
                ok = httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200
            except httpx.HTTPError:
                time.sleep(0.2)
        assert ok, "server did not come up"
        url = f"http://127.0.0.1:{port}/api/paas/v4/chat/completions"
        body = {"model": "glm-4-flash", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
        assert httpx.post(url, json=body).status_code == 401
        assert httpx.post(url, json=body, headers={"Authorization": f"Bearer {key}"}).status_code == 200
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
    assert "KV cache: 2048 tokens (16-token blocks, fp8)" in out and f"http://127.0.0.1:{port}" in out and "1 key(s)" in out
    assert key not in out and key.split(".")[1] not in out
    # Ctrl-C is the way to stop it: a clean stop, no traceback (uvicorn re-raises the signal it caught)
    assert "Application shutdown complete" in out and "Traceback" not in out and proc.returncode == 0, out[-2000:]


def _scripted(lines):
    it = iter(lines)

    def read(prompt):
        try:
            return next(it)
        except StopIteration:
            raise EOFError from None

    return read


def test_chat_loop_against_server_keeps_history(server):
    sent = []
    backend = server_backend(server.url, None, None, 0.0, 12)

    def send(messages):
        sent.append([dict(m) for m in messages])
        return backend(messages)

    out = []
    history = chat_loop(send, _scripted(["hello", "and then?", "/reset", "fresh"]), out.append, system="Be brief.")
    assert [len(m) for m in sent] == [2, 4, 2]  # system + user; + answer + user; reset keeps the system
    assert sent[1][2]["role"] == "assistant" and history[-1]["role"] == "assistant"
    direct = httpx.post(server.openai_base + "/chat/completions", json={
        "model": "glm-4-tiny", "messages": sent[0], "temperature": 0, "max_tokens": 12}).json()
    assert sent[1][2]["content"] == direct["choices"][0]["message"]["content"]
    assert "(conversation cleared)" in "".join(out)


def test_chat_in_process_equals_server(server, tiny_hf):
    args = argparse.Namespace(model=str(tiny_hf), device="cpu", dtype="auto", quantization=None, rope_theta=None,
                              temperature=0.0, max_tokens=12, kv_cache_tokens=1024,
                              kv_cache_dtype="auto")
    out = []
    history = chat_loop(local_backend(args), _scripted(["你好"]), out.append)
    direct = httpx.post(server.openai_base + "/chat/completions", json={
        "model": "glm-4-tiny", "messages": history[:1], "temperature": 0, "max_tokens": 12}).json()
    assert history[1]["content"] == direct["choices"][0]["message"]["content"]


def test_chat_ctrl_c_at_the_prompt_quits_quietly():
    def read(prompt):
        raise KeyboardInterrupt

    out = []
    assert chat_loop(lambda m: iter(["x"]), read, out.append) == []
    assert out == ["\n"]


def test_chat_server_gone_is_an_error_line_not_a_traceback():
    url = f"http://127.0.0.1:{_free_port()}"
    with pytest.raises(ValueError, match="cannot reach"):
        server_backend(url, None, None, 0.0, 4)  # at start: one line from main, exit 2
    send = server_backend(url, "m", None, 0.0, 4)  # mid-conversation: the turn fails, the chat goes on
    read = _scripted(["hello", "again"])
    out = []

    assert chat_loop(send, read, out.append) == []
    assert "".join(out).count("[error] cannot reach") == 2


def test_chat_in_process_too_long_turn_keeps_the_chat(tiny_hf):
    args = argparse.Namespace(model=str(tiny_hf), device="cpu", dtype="auto", quantization=None, rope_theta=None,
                              temperature=0.0, max_tokens=4, kv_cache_tokens=128,
                              kv_cache_dtype="auto")
    read = _scripted(["word " * 300, "hi"])
    out = []

    history = chat_loop(local_backend(args), read, out.append)
    assert "[error]" in "".join(out) and "context window" in "".join(out)
    assert [m["role"] for m in history] == ["user", "assistant"] and history[0]["content"] == "hi"


def test_chat_in_process_takes_the_kv_cache_flags(tiny_hf, monkeypatch):
    """`glm-serve chat --model` builds its own engine: --kv-cache-dtype reaches it like --kv-cache-tokens."""
    import glm_serve.engine.engine as engine_module  # noqa: PLC0415

    engines, real = [], engine_module.LLMEngine
    monkeypatch.setattr(engine_module, "LLMEngine", lambda config: engines.append(real(config)) or engines[-1])
    args = build_parser().parse_args(["chat", "--model", str(tiny_hf), "--device", "cpu", "--kv-cache-tokens",
                                      "256", "--kv-cache-dtype", "fp8", "--max-tokens", "3", "--temperature", "0"])
    out = []
    chat_loop(local_backend(args), _scripted(["hi"]), out.append)
    assert out and "[error]" not in "".join(out)
    assert engines[0].runner.kv_caches[0].k.dtype == torch.float8_e4m3fn and engines[0].kv_capacity_tokens == 256
    assert build_parser().parse_args(["chat"]).kv_cache_dtype == "auto"


def test_chat_unknown_command_is_said_not_sent():
    read = _scripted(["/help", "/usr/bin holds programs"])
    sent = []

    def send(messages):
        sent.append(messages[-1]["content"])
        return iter(["ok"])

    out = []
    history = chat_loop(send, read, out.append)
    assert "unknown command /help" in "".join(out)
    assert sent == ["/usr/bin holds programs"] and len(history) == 2  # a line with more words is a message


def test_chat_in_process_interrupted_answer_leaves_the_engine(server, tiny_hf):
    """Ctrl-C mid-answer drops the answer's generator: its request must leave the engine (abort), or the next
    turn's step loop also runs it and mixes its text into the new answer."""
    args = argparse.Namespace(model=str(tiny_hf), device="cpu", dtype="auto", quantization=None, rope_theta=None,
                              temperature=0.0, max_tokens=12, kv_cache_tokens=1024,
                              kv_cache_dtype="auto")
    send = local_backend(args)
    first = send([{"role": "user", "content": "hello"}])
    next(first)
    first.close()  # what chat_loop's KeyboardInterrupt does to the generator it was reading
    messages = [{"role": "user", "content": "你好"}]
    answer = "".join(send(messages))
    direct = httpx.post(server.openai_base + "/chat/completions", json={
        "model": "glm-4-tiny", "messages": messages, "temperature": 0, "max_tokens": 12}).json()
    assert answer == direct["choices"][0]["message"]["content"]


@pytest.mark.parametrize("body", [b'{"object": "list", "data": []}', b"<html>a web page</html>", b'{"models": 1}'])
def test_chat_against_a_url_that_lists_no_model_says_so(body):
    # Before: an IndexError / KeyError traceback, or "Expecting value: line 1 column 1 (char 0)" for a web page.
    with static_http(body) as url, pytest.raises(ValueError, match="lists no model.*--served-model"):
        server_backend(url, None, None, None, 8)
