"""Runs INSIDE the side virtualenv that holds the vendor's older SDK (`zhipuai` 2.x pins PyJWT<2.9, which
zai-sdk cannot live with, so it cannot be imported by the test process): drives a real server with
`zhipuai.ZhipuAI` and prints what it saw as one JSON object, which tests/api/test_zhipuai_sdk.py checks.

    python zhipuai_client.py '{"base_url": ..., "api_key": ..., "jwt": false, "batch_file": ...}'
"""

from __future__ import annotations

import json
import sys
import time

import zhipuai
from zhipuai import ZhipuAI

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8}},
                   "required": ["city"], "additionalProperties": False}}}


def _error(call) -> dict:
    """The SDK exception a call raises: its class and HTTP status and the body's error code."""
    try:
        call()
    except zhipuai.APIStatusError as e:
        body = e.response.json()
        return {"class": type(e).__name__, "status": e.status_code, "code": body["error"]["code"]}
    return {"class": None}


def _poll(fetch, done, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while True:
        got = fetch()
        if done(got) or time.monotonic() > deadline:
            return got
        time.sleep(0.05)


def main(cfg: dict) -> dict:
    client = ZhipuAI(api_key=cfg["api_key"], base_url=cfg["base_url"], max_retries=0,
                     disable_token_cache=not cfg["jwt"])
    chat = client.chat.completions
    msgs = [{"role": "user", "content": "你好, tell me a story"}]
    seen: dict = {"version": zhipuai.__version__}

    r = chat.create(model="glm-4-plus", messages=msgs, do_sample=False, max_tokens=20)
    seen["sync"] = {"content": r.choices[0].message.content, "role": r.choices[0].message.role,
                    "finish_reason": r.choices[0].finish_reason, "model": r.model,
                    "usage": [r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens]}
    if cfg.get("only_sync"):
        return seen

    # The SDK turns temperature 0 into do_sample=false with temperature 0.01.
    seen["temperature_zero"] = chat.create(model="glm-4-plus", messages=msgs, temperature=0,
                                           max_tokens=20).choices[0].message.content

    chunks = list(chat.create(model="glm-4-plus", messages=msgs, do_sample=False, max_tokens=20, stream=True))
    seen["stream"] = {"content": "".join(c.choices[0].delta.content or "" for c in chunks),
                      "finish_reason": chunks[-1].choices[0].finish_reason,
                      "usage_on": [i for i, c in enumerate(chunks) if c.usage is not None], "chunks": len(chunks),
                      "completion_tokens": chunks[-1].usage.completion_tokens}

    t = chat.create(model="glm-4-plus", messages=[{"role": "user", "content": "weather in Paris?"}],
                    tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "get_weather"}},
                    do_sample=False, max_tokens=60)
    call = t.choices[0].message.tool_calls[0]
    seen["tool"] = {"finish_reason": t.choices[0].finish_reason, "content": t.choices[0].message.content,
                    "id": call.id, "type": call.type, "name": call.function.name,
                    "arguments": call.function.arguments}

    task = client.chat.asyncCompletions.create(model="glm-4-plus", messages=msgs, do_sample=False, max_tokens=20)
    res = _poll(lambda: client.chat.asyncCompletions.retrieve_completion_result(id=task.id),
                lambda got: got.task_status != "PROCESSING")
    seen["async"] = {"created_status": task.task_status, "status": res.task_status,
                     "content": res.choices[0].message.content if res.choices else None}

    seen["unknown_model"] = _error(lambda: chat.create(model="no-such-model", messages=msgs))
    seen["bad_temperature"] = _error(lambda: chat.create(model="glm-4-plus", messages=msgs, extra_body={"temperature": "hot"}))

    with open(cfg["batch_file"], "rb") as f:
        up = client.files.create(file=f, purpose="batch")
    batch = client.batches.create(input_file_id=up.id, endpoint="/v4/chat/completions", completion_window="24h")
    done = _poll(lambda: client.batches.retrieve(batch.id),
                 lambda b: b.status in ("completed", "failed", "expired", "cancelled"))
    lines = client.files.content(done.output_file_id).content.decode().splitlines()
    seen["batch"] = {"status": done.status, "counts": [done.request_counts.total, done.request_counts.completed,
                                                       done.request_counts.failed],
                     "output": [json.loads(line) for line in lines],
                     "listed": [b.id for b in client.batches.list(limit=100).data].count(batch.id)}
    return seen


if __name__ == "__main__":
    print(json.dumps(main(json.loads(sys.argv[1])), ensure_ascii=False))
