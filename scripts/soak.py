"""Soak a running glm-serve with the mixed traffic users send, and report what a user would see as wrong.

Not run by CI: a tool for a server you started yourself. For preemption, give it a small KV cache, e.g.

    glm-serve make-tiny /tmp/tiny
    glm-serve serve --model /tmp/tiny --served-model-name m --port 18000 --kv-cache-tokens 384 \\
        --max-num-seqs 8 --api-key k1.s1 --api-key k2.s2 --max-concurrency-per-key 12 --data-dir /tmp/soak-data
    python scripts/soak.py --url http://127.0.0.1:18000 --model m --key k1.s1 --key k2.s2 --per-key 12 \\
        --pid $(pgrep -f 'glm-serve serve' | head -1) --rounds 3 --round-s 60 --json

Each round runs --concurrency workers for --round-s seconds, each picking at random: vendor and OpenAI chat
(JSON and SSE; n, stop, seeds, logprobs, max_tokens small and large), /v1/completions (several prompts, echo,
logprobs), tools with every tool_choice (auto with strict tools too), JSON mode and vLLM's guided_choice / guided_regex on chat and completions,
some with a logit_bias (--json: needs xgrammar), async tasks polled to the end,
streams the client leaves mid-way, requests the client abandons, invalid requests (expecting their 4xx), and
greedy or seeded requests whose text must equal what they gave alone before the load (streamed or not); plus one
batch job (/files + /batches, the vendor's or OpenAI's) alongside, which must answer every line exactly once, and
a /health pinger.
After each round: /metrics running/waiting/KV gauges back to 0 and no 5xx counted; with --per-key N, N
concurrent requests per key all admitted (no leaked slot); the server's RSS (--pid) printed.
Every request has a deadline (--request-timeout): a hung one is a problem. Exit status 1 if any problem.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import time
from collections import Counter

import httpx

WORDS = "alpha beta the quick brown fox over lazy dog 你好 世界 hello world lorem ipsum data model token".split()
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}},
         {"type": "function", "function": {"name": "add", "description": "sum", "parameters": {
             "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
             "required": ["a", "b"]}}}]
FINISH = ("stop", "length", "tool_calls", "model_context_window_exceeded")
VENDOR, OPENAI, COMPLETIONS = "/api/paas/v4/chat/completions", "/v1/chat/completions", "/v1/completions"
GAUGES = ("glm_serve_num_requests_running", "glm_serve_num_requests_waiting", "glm_serve_kv_cache_usage_ratio")


async def sse_lines(r):
    """Lines as SSE defines them (CR, LF or CRLF end one); httpx's aiter_lines also splits at U+2028 and the like,
    so this reader sees what the server sent, and flags those characters itself."""
    buf = b""
    async for chunk in r.aiter_bytes():
        *lines, buf = re.split(rb"\r\n|\r|\n", buf + chunk)
        for line in lines:
            yield line.decode()
    if buf:
        yield buf.decode()


def rss_mib(pid: int | None) -> int | None:
    if pid is None:
        return None
    with open(f"/proc/{pid}/status") as f:
        return int(re.search(r"VmRSS:\s*(\d+)", f.read()).group(1)) // 1024


class Soak:
    def __init__(self, args):
        self.args, self.rng = args, random.Random(args.seed)
        self.stats: Counter = Counter()
        self.problems: list[str] = []
        self.refs: dict[str, list[str]] = {}  # a request (JSON) -> its choices' texts when sent alone

    def fail(self, what: str) -> None:
        self.problems.append(what)
        print("PROBLEM:", what[:1000], flush=True)

    def hdr(self, key=None) -> dict:
        return {"Authorization": f"Bearer {key or self.rng.choice(self.args.key)}"}

    def text(self, lo: int, hi: int) -> str:
        return " ".join(self.rng.choice(WORDS) for _ in range(self.rng.randint(lo, hi)))

    def messages(self, hi: int = 60) -> list[dict]:
        system = [{"role": "system", "content": self.text(2, 10)}] if self.rng.random() < 0.3 else []
        return [*system, {"role": "user", "content": self.text(1, hi)}]

    def expect(self, name: str, r, ok=(200,)) -> bool:
        self.stats[f"{name}:{r.status_code}"] += 1
        if r.status_code not in ok:
            self.fail(f"{name}: HTTP {r.status_code} {r.text[:300]}")
            return False
        return True

    def sampling(self, body: dict, openai: bool) -> dict:
        rng = self.rng
        body["max_tokens"] = rng.choice([1, 2, 5, 16, 40, 100, 200])
        if rng.random() < 0.5:
            body["temperature"] = rng.choice([0, 0.5, 1.3] if openai else [0.1, 0.5, 0.95])
        if rng.random() < 0.3:
            body["seed"] = rng.randint(0, 100)
        if rng.random() < 0.3:
            body["stop"] = rng.sample(WORDS, 2)
        if openai and rng.random() < 0.4:
            body["n"] = rng.randint(1, 2)
        return body

    # ---- scenarios ------------------------------------------------------------------------------------------

    async def read_stream(self, c, name: str, url: str, body: dict, n: int, cut_after: int | None = None):
        """Read an SSE answer: well-formed events, every choice finished, [DONE] last. cut_after: leave then."""
        finished, done, events = set(), False, 0
        async with c.stream("POST", url, json=body, headers=self.hdr()) as r:
            if r.status_code != 200:
                await r.aread()
                self.expect(name, r)
                return
            self.stats[f"{name}:200"] += 1
            async for line in sse_lines(r):
                if any(ch in line for ch in "\x85\u2028\u2029"):
                    self.fail(f"{name}: a raw U+0085/U+2028/U+2029 in an event (splits it for zai-sdk)")
                if not line:
                    continue
                if not line.startswith("data: "):
                    return self.fail(f"{name}: not an SSE data line: {line[:100]!r}")
                if line == "data: [DONE]":
                    done = True
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    self.fail(f"{name}: stream error {event}")
                events += 1
                for ch in event.get("choices", []):
                    if ch.get("finish_reason"):
                        if ch["finish_reason"] not in FINISH:
                            self.fail(f"{name}: finish_reason {ch['finish_reason']}")
                        finished.add(ch["index"])
                if cut_after is not None and events >= cut_after:
                    self.stats[f"{name}:left"] += 1
                    return  # the server must abort the request and free its blocks
        if not done or len(finished) != n:
            self.fail(f"{name}: stream ended with [DONE]={done}, choices finished {sorted(finished)} of {n}")

    async def chat(self, c, url: str, stream: bool):
        openai = url == OPENAI
        body = self.sampling({"model": self.args.model, "messages": self.messages(), "stream": stream}, openai)
        if openai and self.rng.random() < 0.4:
            body.update(logprobs=True, top_logprobs=self.rng.randint(0, 5))
        if openai and stream and self.rng.random() < 0.5:
            body["stream_options"] = {"include_usage": True}
        n, name = body.get("n", 1), f"{'openai' if openai else 'vendor'}_chat{'_stream' if stream else ''}"
        if stream:
            return await self.read_stream(c, name, url, body, n)
        r = await c.post(url, json=body, headers=self.hdr())
        if not self.expect(name, r):
            return
        d = r.json()
        u, reasons = d["usage"], [ch["finish_reason"] for ch in d["choices"]]
        if len(reasons) != n or not set(reasons) <= set(FINISH):
            self.fail(f"{name}: finish reasons {reasons} for n={n}")
        if u["completion_tokens"] > n * body["max_tokens"]:
            self.fail(f"{name}: usage {u} beyond max_tokens {body['max_tokens']} x {n}")
        if body.get("logprobs"):  # one logprob per generated token: they add up to the usage
            counts = [len((ch.get("logprobs") or {}).get("content") or []) for ch in d["choices"]]
            if sum(counts) != u["completion_tokens"] and not body.get("stop"):
                self.fail(f"{name}: {counts} logprobs but usage {u}")

    async def completions(self, c, stream: bool):
        rng = self.rng
        prompt = self.text(1, 80) if rng.random() < 0.7 else [self.text(1, 20) for _ in range(rng.randint(1, 3))]
        body = self.sampling({"model": self.args.model, "prompt": prompt, "stream": stream}, True)
        if rng.random() < 0.3:
            body["logprobs"] = rng.randint(0, 3)
        elif rng.random() < 0.3:
            body["echo"] = True
        n = body.get("n", 1) * (len(prompt) if isinstance(prompt, list) else 1)
        name = f"completions{'_stream' if stream else ''}"
        if stream:
            return await self.read_stream(c, name, COMPLETIONS, body, n)
        r = await c.post(COMPLETIONS, json=body, headers=self.hdr())
        if self.expect(name, r) and len(r.json()["choices"]) != n:
            self.fail(f"{name}: {len(r.json()['choices'])} choices, want {n}")

    async def tools(self, c):
        rng = self.rng
        choice = rng.choice(["auto", "none", "required", {"type": "function", "function": {"name": "add"}}])
        url, stream = rng.choice([VENDOR, OPENAI]), rng.random() < 0.5
        # auto with strict functions (needs xgrammar, as --json): calls the model chooses hold to their schemas
        strict = self.args.json and choice == "auto" and url == OPENAI and rng.random() < 0.5
        tools = [{**t, "function": {**t["function"], "strict": True}} for t in TOOLS] if strict else TOOLS
        body = {"model": self.args.model, "messages": self.messages(hi=8), "tools": tools, "tool_choice": choice,
                "max_tokens": rng.choice([30, 80, 150]), "stream": stream}
        name = f"tools{'_strict' if strict else ''}{'_stream' if stream else ''}"
        if stream:
            return await self.read_stream(c, name, url, body, 1)
        r = await c.post(url, json=body, headers=self.hdr())
        if not self.expect(name, r):
            return
        ch = r.json()["choices"][0]
        if ch["finish_reason"] == "tool_calls":
            for call in ch["message"]["tool_calls"]:
                args = json.loads(call["function"]["arguments"])  # a finished call parses
                schema = next(t["function"]["parameters"] for t in TOOLS if t["function"]["name"] ==
                              call["function"]["name"])
                if (strict or choice != "auto") and not set(schema["required"]) <= set(args):
                    self.fail(f"{name}: a held call lacks a required argument: {call}")
        elif choice not in ("auto", "none") and ch["finish_reason"] not in ("length", "model_context_window_exceeded"):
            self.fail(f"{name}: a forced call finished {ch['finish_reason']}: {ch['message']}")

    async def json_mode(self, c):
        body = {"model": self.args.model, "messages": self.messages(), "response_format": {"type": "json_object"},
                "max_tokens": self.rng.choice([20, 60, 120]), "n": self.rng.randint(1, 2)}
        r = await c.post(OPENAI, json=body, headers=self.hdr())
        if self.expect("json_mode", r):
            for ch in r.json()["choices"]:
                if ch["finish_reason"] == "stop":
                    json.loads(ch["message"]["content"])  # finished JSON-mode content parses

    async def guided(self, c):
        """vLLM's guided decoding on chat or completions, sometimes beside a logit_bias: a finished answer is one of
        the choices, or matches the regex whole."""
        rng = self.rng
        options = rng.sample(WORDS, 3)
        spec = rng.choice([{"guided_choice": options}, {"guided_regex": "[a-z]{2,6}( [0-9]{1,3})?"}])
        chat = rng.random() < 0.5
        body = {"model": self.args.model, "max_tokens": rng.choice([8, 40]), "temperature": 1.0,
                "n": rng.randint(1, 2), **spec}
        body.update({"messages": self.messages()} if chat else {"prompt": self.text(1, 20)})
        if rng.random() < 0.3:
            body["logit_bias"] = {str(rng.randrange(100, 2000)): rng.uniform(-5, 5)}
        r = await c.post(OPENAI if chat else COMPLETIONS, json=body, headers=self.hdr())
        if not self.expect("guided", r):
            return
        for ch in r.json()["choices"]:
            text = ch["message"]["content"] if chat else ch["text"]
            held = text in options if "guided_choice" in spec else re.fullmatch(spec["guided_regex"], text)
            if ch["finish_reason"] == "stop" and not held:
                self.fail(f"guided: {spec} answered {text!r}")

    async def async_task(self, c):
        body = self.sampling({"model": self.args.model, "messages": self.messages()}, False)
        hdr = self.hdr(self.rng.choice(self.args.key))  # a task's result is its key's: another key's poll gets 404
        r = await c.post("/api/paas/v4/async/chat/completions", json=body, headers=hdr)
        if not self.expect("async", r):
            return
        while True:  # the caller's deadline (request_timeout) catches a task that never ends
            await asyncio.sleep(0.3)
            p = await c.get(f"/api/paas/v4/async-result/{r.json()['id']}", headers=hdr)
            if not self.expect("async_poll", p) or p.json()["task_status"] == "SUCCESS":
                return
            if p.json()["task_status"] == "FAIL":
                return self.fail(f"async: FAIL {p.json()}")

    async def leave_stream(self, c):
        url = self.rng.choice([VENDOR, OPENAI, COMPLETIONS])
        body = {"model": self.args.model, "stream": True, "max_tokens": 200}
        if url == COMPLETIONS:
            body["prompt"] = self.text(5, 50)
        else:
            body["messages"] = self.messages()
        await self.read_stream(c, "leave_stream", url, body, 1, cut_after=self.rng.randint(1, 5))

    async def abandon(self, c):
        body = {"model": self.args.model, "messages": self.messages(), "max_tokens": 200, "n": self.rng.randint(1, 3)}
        try:
            await c.post(OPENAI, json=body, headers=self.hdr(), timeout=self.rng.uniform(0.05, 0.8))
        except httpx.TimeoutException:
            self.stats["abandoned"] += 1

    async def invalid(self, c):
        m, hi = self.args.model, [{"role": "user", "content": "x"}]
        url, body, want = self.rng.choice([
            (VENDOR, {"model": m, "messages": hi, "temperature": 3}, 400),
            (OPENAI, {"model": m, "messages": hi, "n": 0}, 400),
            (OPENAI, {"model": "no-such-model", "messages": hi}, 400),
            (OPENAI, {"model": m, "messages": []}, 400),
            (OPENAI, {"model": m, "messages": hi, "max_tokens": -1}, 400),
            (COMPLETIONS, {"model": m, "prompt": [99999999]}, 400),
            (VENDOR, {"model": m, "messages": hi, "tools": [{"type": "web_search"}]}, 400),
            (OPENAI, {"model": m, "messages": hi, "stream": True, "temperature": -1}, 400)])
        r = await c.post(url, json=body, headers=self.hdr())
        if self.expect("invalid", r, ok=(want,)) and "error" not in r.json():
            self.fail(f"invalid: no error body: {r.text[:200]}")
        self.expect("bad_json", await c.post(OPENAI, content=b"{not json", headers=self.hdr()), ok=(400,))
        self.expect("bad_key", await c.post(OPENAI, json={"model": m, "messages": hi},
                                            headers={"Authorization": "Bearer wrong.key"}), ok=(401,))

    # ---- greedy and seeded answers: the same under load as alone ---------------------------------------------

    def ref_specs(self) -> list[tuple[str, dict]]:
        m, out = self.args.model, []
        for i in range(16):
            msgs = [{"role": "user", "content": self.text(40, 90) if i % 3 == 0 else self.text(3, 20)}]
            out.append([
                (COMPLETIONS, {"model": m, "prompt": msgs[0]["content"], "max_tokens": 120, "temperature": 0}),
                (VENDOR, {"model": m, "messages": msgs, "do_sample": False, "max_tokens": 150}),
                (OPENAI, {"model": m, "messages": msgs, "temperature": 0.9, "seed": i, "n": 2, "max_tokens": 100}),
                (OPENAI, {"model": m, "messages": msgs, "temperature": 0, "max_tokens": 100, "logprobs": True}),
                (OPENAI, {"model": m, "messages": msgs, "temperature": 0, "max_tokens": 120, "stop": ["e", "的"],
                          "repetition_penalty": 1.3}),
                (OPENAI, {"model": m, "messages": msgs, "temperature": 0, "max_tokens": 80,
                          **({"response_format": {"type": "json_object"}} if self.args.json else {})}),
                (COMPLETIONS, {"model": m, "prompt": [self.text(2, 30), self.text(2, 30)], "n": 2,
                               "max_tokens": 90, "temperature": 1.0, "seed": i, "min_tokens": 5}),
                (VENDOR, {"model": m, "messages": msgs, "temperature": 0.8, "seed": i, "max_tokens": 140}),
            ][i % 8])
        return out

    async def texts(self, c, url: str, body: dict) -> list[str] | None:
        if not body.get("stream"):
            r = await c.post(url, json=body, headers=self.hdr())
            if not self.expect("same_as_alone", r):
                return None
            return [ch["text"] if url == COMPLETIONS else ch["message"]["content"] or "" for ch in r.json()["choices"]]
        got: dict[int, str] = {}
        async with c.stream("POST", url, json=body, headers=self.hdr()) as r:
            if not self.expect("same_as_alone_stream", r):
                await r.aread()
                return None
            async for line in sse_lines(r):
                if line.startswith("data: {"):
                    for ch in json.loads(line[6:]).get("choices", []):
                        piece = ch["text"] if url == COMPLETIONS else (ch.get("delta") or {}).get("content")
                        got[ch["index"]] = got.get(ch["index"], "") + (piece or "")
        return [got[i] for i in sorted(got)]

    async def same_as_alone(self, c):
        key = self.rng.choice(list(self.refs))
        url, body = json.loads(key)
        stream = self.rng.random() < 0.5
        got = await self.texts(c, url, {**body, "stream": stream})
        if got is not None and got != self.refs[key]:
            self.fail(f"same_as_alone ({'stream' if stream else 'sync'}): {body} alone {self.refs[key]!r} "
                      f"under load {got!r}")
        elif got is not None:
            self.stats["same_as_alone:same"] += 1

    # ---- batch, idle checks, driver ----------------------------------------------------------------------------

    async def batch(self, c, lines: int):
        """One batch job, every call with one key (files and batches belong to the key that made them: another
        key's calls get 404), through the vendor's routes or OpenAI's (/v1, lines in OpenAI's format)."""
        hdr = self.hdr(self.rng.choice(self.args.key))
        base, url = self.rng.choice([("/api/paas/v4", "/v4/chat/completions"), ("/v1", "/v1/chat/completions")])
        rows = [json.dumps({"custom_id": f"r{i}", "method": "POST", "url": url,
                            "body": {"model": self.args.model, "messages": self.messages(),
                                     "max_tokens": self.rng.choice([5, 30, 80])}}) for i in range(lines)]
        f = await c.post(f"{base}/files", files={"file": ("in.jsonl", "\n".join(rows).encode())},
                         data={"purpose": "batch"}, headers=hdr)
        if not self.expect("batch_file", f):
            return
        b = await c.post(f"{base}/batches", json={"input_file_id": f.json()["id"], "completion_window": "24h",
                                                  "endpoint": url}, headers=hdr)
        if not self.expect("batch", b):
            return
        bid, deadline = b.json()["id"], time.monotonic() + self.args.batch_timeout
        while True:
            r = await c.get(f"{base}/batches/{bid}", headers=hdr)
            if not self.expect("batch_get", r):
                return
            if (b := r.json())["status"] in ("completed", "failed", "expired", "cancelled"):
                break
            if time.monotonic() > deadline:
                return self.fail(f"batch {bid}: still {b['status']} after {self.args.batch_timeout} s")
            await asyncio.sleep(1)
        ids = []
        for fid in (b.get("output_file_id"), b.get("error_file_id")):
            if fid:
                body = (await c.get(f"{base}/files/{fid}/content", headers=hdr)).content
                ids += [json.loads(line)["custom_id"] for line in body.split(b"\n") if line.strip()]
        if b["status"] != "completed" or sorted(ids) != sorted(f"r{i}" for i in range(lines)):
            self.fail(f"batch {bid}: {b['status']}, {len(ids)} answers for {lines} lines: {b}")

    async def idle_checks(self, c, label: str) -> None:
        for _ in range(50):  # streams whose client left take a moment to be aborted
            text = (await c.get("/metrics", headers=self.hdr())).text
            g = {name: float(v) for name, v in re.findall(r"^(glm_serve_\w+) (\S+)$", text, re.M)}
            if all(g.get(k) == 0 for k in GAUGES):
                break
            await asyncio.sleep(0.2)
        errors = [line for line in text.splitlines() if 'status="5' in line and not line.startswith("#")]
        print(f"[{label}] " + " ".join(f"{k[10:]}={g.get(k)}" for k in GAUGES) +
              f" preemptions={g.get('glm_serve_num_preemptions_total')} 5xx={errors}", flush=True)
        for k in GAUGES:
            if g.get(k) != 0:
                self.fail(f"[{label}] {k} = {g.get(k)} after the load stopped")
        if errors:
            self.fail(f"[{label}] 5xx counted: {errors}")
        for key in self.args.key if self.args.per_key else []:  # a leaked admission slot shows as a 429 here
            body = {"model": self.args.model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 30}
            rs = await asyncio.gather(*[c.post(OPENAI, json=body, headers=self.hdr(key))
                                        for _ in range(self.args.per_key)])
            if any(r.status_code != 200 for r in rs):
                self.fail(f"[{label}] {self.args.per_key} requests at once with one key: "
                          f"{Counter(r.status_code for r in rs)}")

    async def one(self, c):
        jobs = {"vendor": lambda: self.chat(c, VENDOR, False), "vendor_stream": lambda: self.chat(c, VENDOR, True),
                "openai": lambda: self.chat(c, OPENAI, False), "openai_stream": lambda: self.chat(c, OPENAI, True),
                "completions": lambda: self.completions(c, False),
                "completions_stream": lambda: self.completions(c, True), "tools": lambda: self.tools(c),
                "json": lambda: self.json_mode(c) if self.args.json else self.chat(c, OPENAI, False),
                "async": lambda: self.async_task(c), "leave_stream": lambda: self.leave_stream(c),
                "abandon": lambda: self.abandon(c), "invalid": lambda: self.invalid(c),
                "same_as_alone": lambda: self.same_as_alone(c),
                "guided": lambda: self.guided(c) if self.args.json else self.completions(c, False)}
        kind = self.rng.choices(list(jobs), weights=[8, 8, 8, 8, 6, 6, 5, 3, 3, 6, 4, 4, 8, 3])[0]
        try:
            await asyncio.wait_for(jobs[kind](), self.args.request_timeout)
        except asyncio.TimeoutError:
            self.fail(f"{kind}: no answer within {self.args.request_timeout} s")
        except (httpx.HTTPError, ValueError, KeyError, TypeError) as e:
            self.fail(f"{kind}: {type(e).__name__}: {e}")

    async def health(self, c, until: float) -> None:
        while time.monotonic() < until:
            t = time.monotonic()
            if (await c.get("/health", timeout=10)).status_code != 200:
                self.fail("health: not 200 under load")
            self.stats["health_worst_ms"] = max(self.stats["health_worst_ms"], int(1000 * (time.monotonic() - t)))
            await asyncio.sleep(0.5)

    async def workers(self, c, until: float) -> None:
        while time.monotonic() < until:
            await self.one(c)
    async def run(self) -> int:
        limits = httpx.Limits(max_connections=200, max_keepalive_connections=50)
        async with httpx.AsyncClient(base_url=self.args.url, timeout=self.args.request_timeout, limits=limits) as c:
            for url, body in self.ref_specs():  # alone, before the load
                self.refs[json.dumps([url, body])] = await self.texts(c, url, body)
            await self.idle_checks(c, "alone")
            for rnd in range(self.args.rounds):
                until = time.monotonic() + self.args.round_s
                work = [self.workers(c, until) for _ in range(self.args.concurrency)] + [self.health(c, until)]
                if self.args.batch_lines:
                    work.append(self.batch(c, self.args.batch_lines))
                await asyncio.gather(*work)
                await self.idle_checks(c, f"round {rnd}")
                print(f"[round {rnd}] rss={rss_mib(self.args.pid)} MiB problems={len(self.problems)} "
                      f"{dict(sorted(self.stats.items()))}", flush=True)
        print(f"{len(self.problems)} problems")
        return 1 if self.problems else 0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for flag, kind, default, what in (
            ("--url", str, "http://127.0.0.1:8000", None), ("--model", str, "demo", "a model name the server serves"),
            ("--per-key", int, 0, "the server's --max-concurrency-per-key (0: no check)"),
            ("--pid", int, None, "the server's pid, to print its RSS after each round"),
            ("--rounds", int, 3, None), ("--round-s", float, 60, None), ("--concurrency", int, 12, None),
            ("--request-timeout", float, 120, None), ("--batch-timeout", float, 300, None), ("--seed", int, 0, None),
            ("--batch-lines", int, 20, "lines of the batch job each round runs (0: none)")):
        p.add_argument(flag, type=kind, default=default, help=what)
    p.add_argument("--key", action="append", default=None, help="api key (repeat for several)")
    p.add_argument("--json", action="store_true", help="also JSON mode (the server needs xgrammar)")
    args = p.parse_args()
    args.key = args.key or ["none"]
    raise SystemExit(asyncio.run(Soak(args).run()))


if __name__ == "__main__":
    main()
