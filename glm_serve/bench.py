"""`glm-serve bench`: load a running server (ours, or any OpenAI-compatible one) with streamed completions and
measure what its users feel: time to first token, time per output token, inter-token latency, end-to-end
latency, request and token throughput. Writes every figure with its settings to a results JSON.

Prompts are exact token counts: random windows of a long text encoded with the checkpoint's tokenizer
(`--model`, the same folder the server loaded), sent as token ids to /v1/completions with ignore_eos, so
every request produces exactly --output-len tokens unless the server fails it.

    glm-serve bench --url http://127.0.0.1:8000 --model /models/glm-4-9b-chat \\
        --num-prompts 200 --concurrency 32 --input-len 1024 --output-len 256

With --dataset FILE the prompts are real conversations instead (ShareGPT JSON or JSONL: glm_serve/bench_data.py),
rendered with the chat template, each asking for its own answer's length.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import os
import random
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from glm_serve.sse_lines import aiter_sse_lines

log = logging.getLogger(__name__)

_WORDS = ("the model reads each token once and writes one more; a server keeps many such streams in one "
          "batch, so the device stays busy while people wait for the next word of their answer. "
          "今天天气很好，我们一起去公园散步吧。数据 中心 推理 服务 延迟 吞吐").split()


def add_bench_parser(sub) -> None:
    b = sub.add_parser("bench", help="measure a running server: TTFT, TPOT, inter-token latency, throughput")
    b.add_argument("--model", default="demo", help="the checkpoint folder the server loaded (for its tokenizer)")
    b.add_argument("--url", default="http://127.0.0.1:8000", help="the server's base URL")
    b.add_argument("--api-key", default=os.environ.get("GLM_SERVE_API_KEY"),
                   help="sent as a Bearer token (default: $GLM_SERVE_API_KEY, as glm-serve chat)")
    b.add_argument("--served-model", default=None, help="model name to request (default: the server's first)")
    b.add_argument("--num-prompts", type=int, default=100)
    b.add_argument("--concurrency", type=int, default=16, help="most requests in flight at once")
    b.add_argument("--request-rate", type=float, default=float("inf"),
                   help="new requests per second, Poisson arrivals (default: all at once, up to --concurrency)")
    b.add_argument("--input-len", type=int, default=256, help="prompt tokens per request")
    b.add_argument("--output-len", type=int, default=128, help="generated tokens per request (ignore_eos)")
    b.add_argument("--range-ratio", type=float, default=0.0,
                   help="draw each length uniformly from [len * (1 - r), len * (1 + r)]")
    b.add_argument("--dataset", default=None, metavar="FILE",
                   help="real prompts instead of synthetic ones: a ShareGPT JSON file (each conversation's first "
                        "question, asking for its answer's length) or JSONL ({\"prompt\"} or {\"messages\"}, "
                        "optional \"output_len\"); --input-len and --range-ratio then do not apply, --output-len "
                        "only where a line gives no length")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--timeout", type=float, default=600.0, help="seconds one request may take")
    b.add_argument("--out", default=None, help="results JSON (default: glm-serve-bench-<time>.json here)")
    b.set_defaults(fn=cmd_bench)


@dataclass
class RequestResult:
    prompt_tokens: int  # sent
    output_tokens: int = 0  # as the server's usage reports them
    server_prompt_tokens: int = 0  # as the server's usage reports them
    ttft: float | None = None  # seconds to the first chunk with text
    latency: float = 0.0  # seconds to the end of the stream
    itl: list[float] = field(default_factory=list)  # seconds between chunks with text
    error: str | None = None


def make_prompts(tokenizer, n: int, input_len: int, output_len: int, ratio: float, seed: int
                 ) -> list[tuple[list[int], int]]:
    """[(prompt token ids, output length)] with exact prompt lengths: windows of one long encoded text."""
    if not 0 <= ratio < 1:
        raise ValueError("--range-ratio must be in [0, 1)")
    rng = random.Random(seed)
    longest = int(input_len * (1 + ratio)) + 1
    text_ids: list[int] = []
    while len(text_ids) < 2 * longest:
        text_ids += tokenizer.encode(" ".join(rng.choice(_WORDS) for _ in range(512)), allow_special=False)
    out = []
    for _ in range(n):
        k = max(1, rng.randint(int(input_len * (1 - ratio)), int(input_len * (1 + ratio))))
        start = rng.randrange(len(text_ids) - k)
        m = max(1, rng.randint(int(output_len * (1 - ratio)), int(output_len * (1 + ratio))))
        out.append((text_ids[start:start + k], m))
    return out


async def _one(client, url: str, model: str, prompt: list[int], max_tokens: int) -> RequestResult:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    res = RequestResult(prompt_tokens=len(prompt))
    t0 = last = time.perf_counter()
    try:
        async with client.stream("POST", url + "/v1/completions", json=body) as r:
            if r.status_code != 200:
                res.error = f"HTTP {r.status_code}: {(await r.aread()).decode(errors='replace')[:300]}"
                return res
            async for line in aiter_sse_lines(r.aiter_bytes()):
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    res.error = str(event["error"])[:300]
                    return res
                if event.get("usage"):
                    res.output_tokens = event["usage"].get("completion_tokens", 0)
                    res.server_prompt_tokens = event["usage"].get("prompt_tokens", 0)
                if any(c.get("text") for c in event.get("choices") or []):
                    now = time.perf_counter()
                    if res.ttft is None:
                        res.ttft = now - t0
                    else:
                        res.itl.append(now - last)
                    last = now
    except Exception as e:  # noqa: BLE001 (a failed request is a result: counted, reported, never fatal)
        res.error = f"{type(e).__name__}: {e}"
    res.latency = time.perf_counter() - t0
    if res.error is None and res.output_tokens != max_tokens:
        res.error = f"asked for {max_tokens} tokens, got {res.output_tokens}"
    return res


async def run_bench(url: str, model: str, prompts: list[tuple[list[int], int]], concurrency: int,
                    request_rate: float, api_key: str | None, timeout: float, seed: int
                    ) -> tuple[list[RequestResult], float]:
    """Send every prompt; -> (results in prompt order, wall seconds)."""
    import httpx  # noqa: PLC0415

    rng = random.Random(seed + 1)
    sem = asyncio.Semaphore(concurrency)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(headers=headers, timeout=timeout, limits=limits) as client:

        async def gated(prompt, m):
            async with sem:
                return await _one(client, url, model, prompt, m)

        t0 = time.perf_counter()
        tasks = []
        for prompt, m in prompts:
            tasks.append(asyncio.create_task(gated(prompt, m)))
            if request_rate != float("inf"):
                await asyncio.sleep(rng.expovariate(request_rate))
        results = await asyncio.gather(*tasks)
        return list(results), time.perf_counter() - t0


def summarize(results: list[RequestResult], wall: float) -> dict:
    ok = [r for r in results if r.error is None]
    out_tokens = sum(r.output_tokens for r in ok)

    def ms(values: list[float]) -> dict:
        if not values:
            return {}
        v = sorted(values)
        return {"mean": statistics.fmean(v) * 1e3, "median": statistics.median(v) * 1e3,
                "p99": v[min(len(v) - 1, int(0.99 * len(v)))] * 1e3}

    return {
        "completed": len(ok), "failed": len(results) - len(ok), "duration_s": wall,
        "request_throughput": len(ok) / wall, "output_tokens_per_s": out_tokens / wall,
        "total_tokens_per_s": (out_tokens + sum(r.prompt_tokens for r in ok)) / wall,
        "ttft_ms": ms([r.ttft for r in ok if r.ttft is not None]),
        # time per output token after the first, per request
        "tpot_ms": ms([(r.latency - r.ttft) / (r.output_tokens - 1) for r in ok
                       if r.ttft is not None and r.output_tokens > 1]),
        "itl_ms": ms([x for r in ok for x in r.itl]),
        "e2e_latency_ms": ms([r.latency for r in ok]),
        "errors": sorted({r.error for r in results if r.error is not None})[:10],
    }


def cmd_bench(args) -> int:
    import httpx  # noqa: PLC0415

    from glm_serve.cli import resolve_model_arg  # noqa: PLC0415
    from glm_serve.tokenizer import load_tokenizer  # noqa: PLC0415

    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per request would bury the results
    for name in ("num_prompts", "concurrency", "input_len", "output_len"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
    if not args.request_rate > 0:  # 0 would divide by zero between arrivals, < 0 would mean "all at once"
        raise ValueError(f"--request-rate must be > 0 (leave it out for all at once), got {args.request_rate}")
    if not args.timeout > 0:
        raise ValueError(f"--timeout must be > 0, got {args.timeout}")
    # Where the results go is checked before the run, not after it: a long benchmark must not be lost to a typo.
    out = Path(args.out or f"glm-serve-bench-{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}.json")
    if out.is_dir() or not out.parent.resolve().is_dir() or not os.access(out.parent.resolve(), os.W_OK):
        raise ValueError(f"--out {out}: cannot write a file there (is the folder there and writable?)")
    url = args.url.rstrip("/")
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    # (also: the server is there, before the run)
    model, max_model_len = _first_model(httpx, url, headers, args.served_model)
    tokenizer = load_tokenizer(resolve_model_arg(args.model))
    dataset = None
    if args.dataset:
        from glm_serve.bench_data import load_dataset  # noqa: PLC0415

        dataset = load_dataset(args.dataset, tokenizer, args.num_prompts, args.seed, args.output_len, max_model_len)
        prompts = dataset.prompts
        if len(prompts) < args.num_prompts:
            log.warning("--dataset %s: %d usable prompts, fewer than --num-prompts %d", args.dataset, len(prompts),
                        args.num_prompts)
    else:
        prompts = make_prompts(tokenizer, args.num_prompts, args.input_len, args.output_len, args.range_ratio,
                               args.seed)
    before = server_counters(httpx, url, headers)
    results, wall = asyncio.run(run_bench(url, model, prompts, args.concurrency, args.request_rate, args.api_key,
                                          args.timeout, args.seed))
    summary = summarize(results, wall)
    summary["server"] = server_costs(before, server_counters(httpx, url, headers),
                                     sum(r.output_tokens for r in results if r.error is None))
    settings = {k: v for k, v in vars(args).items() if k not in ("fn", "api_key")}
    settings["request_rate"] = str(args.request_rate)  # inf is not JSON
    if dataset is not None:
        settings["dataset_sample"] = {"prompts": len(prompts), "entries_read": dataset.entries_read,
                                      "skipped": dataset.skipped, "server_max_model_len": max_model_len,
                                      "mean_prompt_tokens": statistics.fmean(len(p) for p, _ in prompts),
                                      "mean_output_tokens": statistics.fmean(m for _, m in prompts)}
    record = {"benchmark": "glm-serve bench", "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "served_model": model, "settings": settings, "summary": summary,
              "requests": [asdict(r) for r in results]}
    out.write_text(json.dumps(record, indent=1, ensure_ascii=False) + "\n")
    _print(summary, out)
    return 0 if summary["completed"] else 1


# Counters read off the server's /metrics around the run (ours; another server's are simply absent).
_COUNTERS = {'glm_serve_thread_cpu_seconds_total{thread="engine"}': "engine_thread",
             'glm_serve_thread_cpu_seconds_total{thread="event_loop"}': "event_loop_thread",
             "process_cpu_seconds_total": "process", "glm_serve_engine_steps_total": "steps",
             "glm_serve_engine_in_own_process": "engine_in_own_process"}


def server_counters(httpx, url: str, headers: dict) -> dict[str, float]:
    """The counters of _COUNTERS the server's /metrics has now; {} when it has none (or no /metrics)."""
    try:
        r = httpx.get(url + "/metrics", headers=headers, timeout=30)
    except httpx.HTTPError:
        return {}
    if r.status_code != 200:
        return {}
    got = {}
    for line in r.text.splitlines():
        name, _, value = line.rpartition(" ")
        if name in _COUNTERS:
            try:
                got[_COUNTERS[name]] = float(value)
            except ValueError:
                pass
    return got


def server_costs(before: dict, after: dict, output_tokens: int) -> dict:
    """Where the server's host time went during the run: CPU microseconds per output token of its engine
    thread, its event-loop thread and the whole process, and the engine's steps (tokens per step = the mean
    decode batch). Empty for a server without these counters."""
    costs: dict = {}
    for key in ("engine_thread", "event_loop_thread", "process"):
        if key in before and key in after and output_tokens:
            costs[f"{key}_cpu_us_per_output_token"] = (after[key] - before[key]) / output_tokens * 1e6
    if "steps" in before and "steps" in after:
        steps = after["steps"] - before["steps"]
        costs["engine_steps"] = steps
        if steps:
            costs["output_tokens_per_step"] = output_tokens / steps
    if "engine_in_own_process" in after:  # then engine_thread is the engine's whole process, process the server's
        costs["engine"] = "process" if after["engine_in_own_process"] else "thread"
    return costs


def _first_model(httpx, url: str, headers: dict, served_model: str | None = None) -> tuple[str, int | None]:
    """(served_model, or the first model the server lists; that model's context window where the listing gives
    it, as ours and vLLM's do). A server that cannot be reached is an error before the run either way, rather than
    a results file of failed requests (one that answers, even with an error, is measured: the results say how
    its requests failed)."""
    try:
        r = httpx.get(url + "/v1/models", headers=headers, timeout=30)
    except httpx.HTTPError as e:
        raise ValueError(f"cannot reach {url}: {type(e).__name__}: {e}") from None
    if served_model:
        return served_model, _context_window(r, served_model)
    if r.status_code != 200:  # (a web server's HTML error page on one line)
        raise ValueError(f"{url}/v1/models answered HTTP {r.status_code}: {' '.join(r.text[:300].split())}")
    try:
        name = r.json()["data"][0]["id"]
    except (ValueError, LookupError, TypeError):  # a web page, or an API with no model loaded (yet)
        raise ValueError(f"{url}/v1/models lists no model (an OpenAI-compatible server there?); name the model "
                         "with --served-model") from None
    return name, _context_window(r, name)


def _context_window(r, name: str) -> int | None:
    try:
        entry = next(m for m in r.json()["data"] if m.get("id") == name)
    except (ValueError, LookupError, TypeError, AttributeError, StopIteration):
        return None
    n = entry.get("max_model_len")
    return n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else None


def _print(s: dict, out: Path) -> None:
    print(f"completed {s['completed']}, failed {s['failed']} in {s['duration_s']:.2f} s")
    print(f"  requests/s {s['request_throughput']:.2f}   output tokens/s {s['output_tokens_per_s']:.1f}   "
          f"total tokens/s {s['total_tokens_per_s']:.1f}")
    for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_latency_ms"):
        if s[key]:
            print(f"  {key:15s} mean {s[key]['mean']:9.2f}   median {s[key]['median']:9.2f}   p99 {s[key]['p99']:9.2f}")
    cpu = {k.removesuffix("_cpu_us_per_output_token"): v for k, v in s.get("server", {}).items()
           if k.endswith("_cpu_us_per_output_token")}
    if cpu and s["server"].get("engine") == "process":  # name what was measured: the engine's whole process
        cpu = {("engine_process" if k == "engine_thread" else "server_process" if k == "process" else k): v
               for k, v in cpu.items()}
    if cpu:
        print("  server CPU us per output token: " + "   ".join(f"{k} {v:.1f}" for k, v in cpu.items())
              + (f"   ({s['server']['output_tokens_per_step']:.1f} tokens per engine step)"
                 if "output_tokens_per_step" in s["server"] else ""))
    for e in s["errors"]:
        print(f"  error: {e}")
    print(f"wrote {out}")
