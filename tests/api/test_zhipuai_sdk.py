"""The vendor's older SDK (`zhipuai` 2.x, `ZhipuAI`) against a real server: sync, stream, tool call, async
task, error classes, files + batches, and its own JWT (PyJWT 2.8, header without `typ`) on a keyed server.

zhipuai pins PyJWT<2.9 and zai-sdk needs >=2.9, so the two cannot share a virtualenv: scripts/test.sh builds
a small side one (.venv-zhipuai, or $GLM_SERVE_ZHIPUAI_PYTHON) and tests/api/zhipuai_client.py runs there
as a subprocess, printing what the SDK returned; the answers are checked here against the engine's own."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from .conftest import KEY_A, engine_answer, wait_idle

ROOT = Path(__file__).resolve().parents[2]
CLIENT = Path(__file__).with_name("zhipuai_client.py")


def _side_python() -> str | None:
    path = os.environ.get("GLM_SERVE_ZHIPUAI_PYTHON") or str(ROOT / ".venv-zhipuai" / "bin" / "python")
    return path if Path(path).is_file() else None


pytestmark = pytest.mark.skipif(
    _side_python() is None,
    reason="no side virtualenv with the zhipuai SDK (scripts/test.sh makes .venv-zhipuai; it cannot share .venv)")


def _run_client(**cfg) -> dict:
    done = subprocess.run([_side_python(), str(CLIENT), json.dumps(cfg)], capture_output=True, text=True,
                          timeout=240, cwd="/")  # not the repo root: the side venv must not import our tests
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout)


MSGS = [{"role": "user", "content": "你好, tell me a story"}]


def test_zhipuai_sdk_end_to_end(make_server, tmp_path):
    srv = make_server(data_dir=tmp_path / "data", batch_concurrency=4)
    lines = [{"custom_id": f"c{i}", "method": "POST", "url": "/v4/chat/completions",
              "body": {"model": "glm-4-plus", "messages": MSGS, "do_sample": False, "max_tokens": 20}}
             for i in range(3)]
    batch_file = tmp_path / "in.jsonl"
    batch_file.write_text("".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines))

    seen = _run_client(base_url=srv.vendor_base, api_key="anyid.anysecret", jwt=False, batch_file=str(batch_file))
    assert seen["version"].lstrip("v").startswith("2.")
    text, token_ids, prompt_ids = engine_answer(srv.engine, MSGS, 20)
    answer = text.removeprefix("\n")
    sync = seen["sync"]
    assert (sync["content"], sync["role"], sync["model"]) == (answer, "assistant", "glm-4-plus")
    assert sync["usage"] == [len(prompt_ids), len(token_ids), len(prompt_ids) + len(token_ids)]
    assert seen["temperature_zero"] == answer
    stream = seen["stream"]
    assert stream["content"] == answer and stream["finish_reason"] == sync["finish_reason"]
    assert stream["usage_on"] == [stream["chunks"] - 1] and stream["completion_tokens"] == len(token_ids)

    tool = seen["tool"]
    assert (tool["finish_reason"], tool["content"], tool["type"], tool["name"]) == (
        "tool_calls", None, "function", "get_weather")
    assert tool["id"].startswith("call_") and isinstance(json.loads(tool["arguments"])["city"], str)

    assert seen["async"] == {"created_status": "PROCESSING", "status": "SUCCESS", "content": answer}
    assert seen["unknown_model"] == {"class": "APIRequestFailedError", "status": 400, "code": "1211"}
    assert seen["bad_temperature"] == {"class": "APIRequestFailedError", "status": 400, "code": "1210"}

    batch = seen["batch"]
    assert batch["status"] == "completed" and batch["counts"] == [3, 3, 0] and batch["listed"] == 1
    assert sorted(o["custom_id"] for o in batch["output"]) == ["c0", "c1", "c2"]
    for o in batch["output"]:
        assert o["response"]["status_code"] == 200 and o["error"] is None
        assert o["response"]["body"]["choices"][0]["message"]["content"] == answer
    wait_idle(srv.engine)


def test_zhipuai_sdk_jwt_on_a_keyed_server(make_server):
    """zhipuai signs its own JWT (header {"alg", "sign_type"}, no "typ"; `exp` in milliseconds) with PyJWT 2.8."""
    srv = make_server(api_keys=[KEY_A])
    seen = _run_client(base_url=srv.vendor_base, api_key=KEY_A, jwt=True, only_sync=True)
    assert seen["sync"]["finish_reason"] in ("stop", "length") and seen["sync"]["usage"][1] > 0
    key_id = KEY_A.split(".")[0]
    done = subprocess.run([_side_python(), "-c", (
        "import zhipuai, sys\n"
        f"c = zhipuai.ZhipuAI(api_key='{key_id}.wrong-secret', base_url='{srv.vendor_base}', max_retries=0, "
        "disable_token_cache=False)\n"
        "try:\n"
        "    c.chat.completions.create(model='glm-4-plus', messages=[{'role': 'user', 'content': 'hi'}])\n"
        "except zhipuai.APIStatusError as e:\n"
        "    print(type(e).__name__, e.status_code, e.response.json()['error']['code'])\n")],
        capture_output=True, text=True, timeout=60, cwd="/")
    assert done.stdout.split() == ["APIAuthenticationError", "401", "1004"], done.stderr[-2000:]
