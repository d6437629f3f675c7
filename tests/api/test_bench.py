"""`glm-serve bench` against a real server: exact prompt and output lengths, latency figures from the stream,
and failed requests counted and reported (with the server's own error), never fatal."""

from __future__ import annotations

import json

import pytest

from glm_serve.cli import main
from .conftest import KEY_A, static_http, wait_idle


def _bench(tmp_path, url, tiny_hf, *extra):
    out = tmp_path / "bench.json"
    rc = main(["bench", "--url", url, "--model", str(tiny_hf), "--num-prompts", "7", "--concurrency", "3",
               "--input-len", "24", "--output-len", "6", "--range-ratio", "0.5", "--out", str(out), *extra])
    return rc, json.loads(out.read_text())


def test_bench_measures_a_running_server(tmp_path, server, tiny_hf):
    rc, record = _bench(tmp_path, server.url, tiny_hf, "--request-rate", "50")
    s = record["summary"]
    assert rc == 0 and s["completed"] == 7 and s["failed"] == 0 and not s["errors"]
    lengths = set()
    for r in record["requests"]:
        assert 12 <= r["prompt_tokens"] == r["server_prompt_tokens"] <= 36  # exact prompts, as the server saw them
        assert 3 <= r["output_tokens"] <= 9  # the request's own length, checked by the bench against usage
        assert 0 < r["ttft"] < r["latency"] and len(r["itl"]) <= r["output_tokens"] - 1
        lengths.add(r["prompt_tokens"])
    assert len(lengths) > 1  # --range-ratio really varies them
    assert s["output_tokens_per_s"] > 0 and s["ttft_ms"]["median"] > 0 and s["tpot_ms"]["p99"] > 0
    assert s["e2e_latency_ms"]["mean"] >= s["ttft_ms"]["mean"]
    assert record["served_model"] and record["settings"]["request_rate"] == "50.0"
    assert "api_key" not in record["settings"]
    # The server's own counters around the run: where its host CPU went, and its steps (at most 3 requests ran
    # at once, so no step made more than 3 tokens)
    cost = s["server"]
    for key in ("engine_thread", "event_loop_thread", "process"):
        assert cost[f"{key}_cpu_us_per_output_token"] > 0, cost
    assert cost["engine_steps"] > 0 and 0 < cost["output_tokens_per_step"] <= 3 and cost["engine"] == "thread", cost
    wait_idle(server.engine)


def test_bench_server_costs_need_the_servers_counters():
    from glm_serve.bench import server_costs

    assert server_costs({}, {}, 100) == {}  # another server: no such counters
    got = server_costs({"engine_thread": 1.0, "steps": 10}, {"engine_thread": 1.5, "steps": 60}, 250)
    assert got == {"engine_thread_cpu_us_per_output_token": 2000.0, "engine_steps": 50, "output_tokens_per_step": 5}
    assert server_costs({"engine_in_own_process": 1.0}, {"engine_in_own_process": 1.0}, 10) == {"engine": "process"}
    assert server_costs({}, {"engine_in_own_process": 0.0}, 10) == {"engine": "thread"}


def test_bench_reports_failures_with_the_servers_error(tmp_path, make_server, tiny_hf):
    locked = make_server(api_keys=[KEY_A])
    rc, record = _bench(tmp_path, locked.url, tiny_hf, "--served-model", "glm-4-tiny")  # no key: 401s
    s = record["summary"]
    assert rc == 1 and s["completed"] == 0 and s["failed"] == 7
    assert s["errors"] and all(e.startswith("HTTP 401") for e in s["errors"])
    rc, record = _bench(tmp_path, locked.url, tiny_hf, "--api-key", KEY_A)
    assert rc == 0 and record["summary"]["completed"] == 7


@pytest.mark.parametrize("served", [[], ["--served-model", "glm-4-tiny"]])
def test_bench_without_a_server_says_so(tmp_path, tiny_hf, capsys, served):
    # Before, with --served-model: no check up front, a results file of failed requests and exit 1.
    from .conftest import _free_port

    rc = main(["bench", "--url", f"http://127.0.0.1:{_free_port()}", "--model", str(tiny_hf),
               "--out", str(tmp_path / "x.json"), *served])
    assert rc == 2 and "cannot reach" in capsys.readouterr().err and not (tmp_path / "x.json").exists()


@pytest.mark.parametrize("body", [b'{"object": "list", "data": []}', b"<html>a web page</html>", b'{"models": 1}'])
def test_bench_against_a_url_that_lists_no_model_says_so(tmp_path, tiny_hf, capsys, body):
    # Before: an IndexError / KeyError traceback, or "Expecting value: line 1 column 1 (char 0)" for a web page.
    with static_http(body) as url:
        rc = main(["bench", "--url", url, "--model", str(tiny_hf), "--out", str(tmp_path / "x.json")])
    err = capsys.readouterr().err
    assert rc == 2 and "lists no model" in err and "--served-model" in err and "Traceback" not in err, err


def _sharegpt(tmp_path):
    convs = [
        {"conversations": [{"from": "human", "value": "Explain how a paged KV cache works, briefly please."},
                           {"from": "gpt", "value": "It stores keys and values in fixed-size blocks of tokens."}]},
        {"conversations": [{"from": "system", "value": "be nice"},
                           {"from": "human", "value": "写一首关于春天的短诗，要有花和雨。"},
                           {"from": "gpt", "value": "春雨轻轻落，花开满山坡，风吹柳枝摇。"}]},
        {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "ok"}]},  # too short
        {"conversations": [{"from": "gpt", "value": "an answer with no question before it"}]},  # unusable
        {"conversations": [{"from": "human", "value": "Summarise: " + "tokens and blocks " * 1200},  # too long
                           {"from": "gpt", "value": "A summary of the long text about tokens and blocks."}]},
        {"conversations": [{"from": "human", "value": "What does continuous batching change for latency?"},
                           {"from": "gpt", "value": "Requests join and leave the running batch at every step."}]},
    ]
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps(convs, ensure_ascii=False))
    return path, convs


def test_bench_on_a_sharegpt_dataset(tmp_path, server, tiny_hf):
    # Prompts are the conversations' first questions in the chat format, each asking for its own answer's length;
    # too short, unusable and (for the server's context window, 2048) too long entries are skipped and counted.
    from glm_serve.chat import encode_chat
    from glm_serve.tokenizer import load_tokenizer

    path, convs = _sharegpt(tmp_path)
    rc, record = _bench(tmp_path, server.url, tiny_hf, "--dataset", str(path), "--num-prompts", "10")
    tok = load_tokenizer(tiny_hf)
    usable = [c["conversations"] for k, c in enumerate(convs) if k in (0, 1, 5)]
    want = sorted((len(encode_chat(tok, [{"role": "user", "content": t[-2]["value"]}])),
                   len(tok.encode(t[-1]["value"], allow_special=False))) for t in usable)
    got = sorted((r["prompt_tokens"], r["output_tokens"]) for r in record["requests"])
    assert rc == 0 and got == want and record["summary"]["failed"] == 0
    assert all(r["server_prompt_tokens"] == r["prompt_tokens"] for r in record["requests"])
    sample = record["settings"]["dataset_sample"]
    assert sample["skipped"] == {"too_short": 1, "unusable": 1, "too_long": 1} and sample["entries_read"] == 6
    assert sample["server_max_model_len"] == 2048
    wait_idle(server.engine)


def test_bench_on_a_jsonl_dataset_and_bad_files(tmp_path, server, tiny_hf, capsys):
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in [
        {"prompt": "Tell me about GLM-4 and its tokenizer.", "output_len": 5},
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Why page a cache?"}]},
    ]) + "\n")
    rc, record = _bench(tmp_path, server.url, tiny_hf, "--dataset", str(path), "--num-prompts", "2",
                        "--output-len", "4")
    assert rc == 0 and sorted(r["output_tokens"] for r in record["requests"]) == [4, 5]
    for text, says in [("[1, 2", "not valid JSON"), ('{"prompt": 3}\n', "line 1"), ("[]", "no usable entry"),
                       ('{"prompt": "x", "output_len": 0}\n', "output_len")]:
        bad = tmp_path / "bad.json"
        bad.write_text(text)
        rc = main(["bench", "--url", server.url, "--model", str(tiny_hf), "--dataset", str(bad),
                   "--out", str(tmp_path / "x.json")])
        err = capsys.readouterr().err
        assert rc == 2 and says in err, err
    wait_idle(server.engine)
