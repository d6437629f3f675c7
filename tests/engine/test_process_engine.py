"""ProcessEngine (`glm-serve serve --engine-process`): the engine loop in a spawned process gives exactly what the
in-process engine gives (tokens, text, logprobs, finish reasons, constraints), refuses bad requests the same way,
frees everything an aborted request held, and fails loudly, not silently, when its process dies."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from close_enough import assert_same  # tests/ is on sys.path

from glm_serve.chat import encode_chat
from glm_serve.engine.async_engine import AsyncEngine, EngineStoppedError, merge_final
from glm_serve.engine.config import EngineConfig
from glm_serve.engine.engine import PromptTooLongError
from glm_serve.engine.outputs import CompletionOutput, RequestOutput, TokenLogprob
from glm_serve.engine.process import ProcessEngine, decode_output, encode_output
from glm_serve.llm import LLM
from glm_serve.sampling_params import SamplingParams

CONFIG = dict(kv_cache_tokens=4096, max_batch_tokens=256, max_num_seqs=16)

REQUESTS = [  # (prompt, params): greedy of mixed lengths, seeded sampling with n and logprobs, stop strings
    ([5, 77, 1203, 9, 31, 400, 12], SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)),
    (list(range(100, 161)), SamplingParams(temperature=0.0, max_tokens=7, ignore_eos=True, logprobs=3)),
    ([42] * 5, SamplingParams(n=2, temperature=0.9, seed=7, max_tokens=16, logprobs=2, ignore_eos=True)),
    ([9, 8, 7, 6], SamplingParams(temperature=0.8, top_k=20, seed=3, max_tokens=24, stop=["e"], ignore_eos=True)),
    ([300, 301, 302], SamplingParams(temperature=0.0, max_tokens=5, prompt_logprobs=2, ignore_eos=True)),
]


@pytest.fixture(scope="module")
def llm(tiny_hf):
    return LLM(str(tiny_hf), **CONFIG)


@pytest.fixture(scope="module")
def proc(tiny_hf):
    eng = ProcessEngine(EngineConfig(model=str(tiny_hf), **CONFIG))
    yield eng
    eng.shutdown()


async def _collect(front, rid, prompt, params, constraints=None) -> list[RequestOutput]:
    return [o async for o in front.generate(rid, prompt, params, constraints)]


def _run_all(front, requests, constraints=None) -> list[list[RequestOutput]]:
    async def run():
        return await asyncio.gather(*(_collect(front, f"r{i}", p, sp, constraints[i] if constraints else None)
                                      for i, (p, sp) in enumerate(requests)))
    return asyncio.run(run())


def _summary(outputs: list[RequestOutput]):
    merged = merge_final(outputs)
    last = outputs[-1]
    plp = next((o.prompt_logprobs for o in outputs if o.prompt_logprobs is not None), None)
    return ([(c.index, c.text, c.token_ids, c.logprobs, c.finish_reason, c.stop_reason) for c in merged],
            last.finished, last.prompt_tokens, last.completion_tokens, plp)


def test_concurrent_requests_match_the_in_process_engine(llm, proc):
    want = _run_in_thread_engine(llm, REQUESTS)
    got = _run_all(proc, REQUESTS)
    for w, g in zip(want, got):
        assert_same(_summary(g), _summary(w))
    assert proc.step_count > 0 and proc.alive


def test_blocked_strings_cross_to_the_engine_process(llm, proc):
    # A BlockedStrings crosses the pipe as its terms and is compiled once there: the same cut, the same finish
    reqs = [([9, 8, 7, 6], SamplingParams(temperature=0.8, top_k=20, seed=3, max_tokens=24, ignore_eos=True,
                                          blocked_strings=["E"]))]
    want, got = _run_in_thread_engine(llm, reqs), _run_all(proc, reqs)
    assert_same(_summary(got[0]), _summary(want[0]))
    assert (merge_final(got[0])[0].finish_reason, merge_final(got[0])[0].stop_reason) == ("content_filter", "E")


class _CountingPipe:
    """The server's end of the command pipe, counting what goes through it."""

    def __init__(self, conn):
        self.conn, self.sent, self.sizes = conn, [], []

    def send(self, obj):
        self.sent.append(obj)
        self.conn.send(obj)

    def send_bytes(self, data):
        self.sizes.append(len(data))
        self.conn.send_bytes(data)

    def close(self):
        self.conn.close()


def test_a_shared_blocked_list_crosses_once(llm, proc, monkeypatch):
    # A server's content filter: one BlockedStrings on every request. 5,000 terms cross the pipe once; each request
    # then carries a reference to them (small), and cuts where the in-process engine cuts.
    from glm_serve.engine.stop import BlockedStrings

    shared = BlockedStrings([f"term{k:04d}-never-said" for k in range(5000)] + ["E"])
    reqs = [([9, 8, 7, 6], SamplingParams(temperature=0.8, top_k=20, seed=s, max_tokens=24, ignore_eos=True,
                                          blocked_strings=shared)) for s in (3, 4, 5)]
    pipe = _CountingPipe(proc._cmd_send)
    monkeypatch.setattr(proc, "_cmd_send", pipe)
    want, got = _run_in_thread_engine(llm, reqs), _run_all(proc, reqs)
    for w, g in zip(want, got):
        assert_same(_summary(g), _summary(w))
    assert any(merge_final(g)[0].finish_reason == "content_filter" for g in got)
    lists = [m for m in pipe.sent if m[0] == "blocked"]
    assert len(lists) == 1 and len(lists[0][2]) == 5001
    assert len(pipe.sizes) == 3 and max(pipe.sizes) < 2000, pipe.sizes  # the terms alone pickle to ~100 KB
    assert reqs[0][1].blocked_strings is shared  # the caller's params are left as they were
    _run_all(proc, reqs[:1])
    assert len([m for m in pipe.sent if m[0] == "blocked"]) == 1  # and stay sent


def _run_in_thread_engine(llm, requests, constraints=None):
    front = AsyncEngine(llm.engine)
    try:
        return _run_all(front, requests, constraints)
    finally:
        front.shutdown()


def test_outputs_cross_as_tuples_unchanged():
    lp = TokenLogprob(5, -0.25, [(5, -0.25), (9, -1.5)])
    out = RequestOutput("x", [CompletionOutput(1, "a\u00e9", [5, 6], [lp, lp], "stop", "</s>", None),
                              CompletionOutput(0, "", [], None, "error", None, "boom")],
                        True, 12, 3, 8, [None, lp])
    assert decode_output(encode_output(out)) == out
    bare = RequestOutput("y", [CompletionOutput(0, "t", [1])], False)
    assert decode_output(encode_output(bare)) == bare


def test_bad_requests_are_refused_in_the_server_process(proc):
    ok = SamplingParams(max_tokens=2)
    with pytest.raises(ValueError, match="empty"):
        _run_all(proc, [([], ok)])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        _run_all(proc, [([10**7], ok)])
    with pytest.raises(PromptTooLongError):
        _run_all(proc, [([3] * (proc.engine.max_model_len + 1), ok)])

    async def duplicate():
        first = proc.generate("dup", [1, 2, 3], SamplingParams(max_tokens=50, ignore_eos=True))
        await first.__anext__()
        with pytest.raises(ValueError, match="duplicate request id"):
            await _collect(proc, "dup", [4, 5], ok)
        rest = [o async for o in first]  # the first request was left alone
        return rest[-1]

    last = asyncio.run(duplicate())
    assert last.finished and last.completion_tokens == 50


def test_an_aborted_request_frees_everything(proc):
    async def run():
        stream = proc.generate("abort-me", list(range(1, 200)), SamplingParams(max_tokens=500, ignore_eos=True))
        await stream.__anext__()
        await stream.aclose()  # leaving early aborts it in the engine process

    asyncio.run(run())
    _wait_idle(proc)


def _wait_idle(proc, timeout=15.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        s = proc.engine.stats()
        if s["num_running"] == 0 and s["num_waiting"] == 0 and s["kv_cache_usage"] == 0.0:
            return
        time.sleep(0.05)
    raise AssertionError(f"engine process not idle: {proc.engine.stats()}")


class _Unreadable:
    """Pickles in the server process, fails to unpickle in the engine process (as a grammar that does not rebuild
    there, or an image whose shared memory cannot be mapped would)."""

    def __reduce__(self):
        return int, ("not a number",)


def test_a_request_that_cannot_be_read_in_the_engine_process_fails_alone(proc):
    async def run():
        bad = _collect(proc, "unreadable", [1, 2, 3], SamplingParams(max_tokens=3), [_Unreadable()])
        with pytest.raises(RuntimeError, match="could not be read in the engine process"):
            await asyncio.wait_for(bad, 30)  # not a request left waiting forever
        # its id is free again, and the engine serves on
        return await asyncio.wait_for(_collect(proc, "unreadable", [1, 2, 3], SamplingParams(max_tokens=3)), 30)

    outs = asyncio.run(run())
    assert outs[-1].finished and outs[-1].completion_tokens == 3
    assert "unreadable" not in proc._sinks


def test_constraints_cross_the_process(llm, proc):
    pytest.importorskip("xgrammar")
    from glm_serve.constrain import ConstraintFactory

    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 6},
                                               "age": {"type": "integer"}}, "required": ["name", "age"]}
    prompt = encode_chat(llm.tokenizer, [{"role": "user", "content": "A person as JSON."}])
    requests = [(prompt, SamplingParams(temperature=1.0, seed=s, max_tokens=120)) for s in range(4)]
    factory = ConstraintFactory(proc.engine.tokenizer, proc.engine.model_config.vocab_size)

    def constraints():
        return [[factory.json_schema(schema)] for _ in requests]

    want = _run_in_thread_engine(llm, requests, constraints())
    got = _run_all(proc, requests, constraints())
    for w, g in zip(want, got):
        assert_same(_summary(g), _summary(w))
    finished = [merge_final(g)[0] for g in got]
    assert any(c.finish_reason == "stop" for c in finished)
    for c in finished:
        if c.finish_reason == "stop":
            assert set(json.loads(c.text[1:])) >= {"name", "age"}


def test_a_dead_engine_process_fails_its_requests_and_later_ones(tiny_hf):
    eng = ProcessEngine(EngineConfig(model=str(tiny_hf), **CONFIG))
    try:
        async def run():
            stream = eng.generate("victim", [1, 2, 3], SamplingParams(n=2, max_tokens=10_000, ignore_eos=True))
            await stream.__anext__()
            os.kill(eng.pid, signal.SIGKILL)
            with pytest.raises(EngineStoppedError, match="engine process has stopped"):
                async for _ in stream:
                    pass
            with pytest.raises(EngineStoppedError, match="engine process has stopped"):
                await _collect(eng, "after", [4, 5], SamplingParams(max_tokens=2))

        asyncio.run(run())
        assert not eng.alive and eng.engine_cpu_seconds() is None
    finally:
        eng.shutdown()


def test_a_start_failure_is_raised_in_the_server_process(tmp_path):
    with pytest.raises(ValueError, match="not-a-checkpoint"):
        ProcessEngine(EngineConfig(model=str(tmp_path / "not-a-checkpoint")))


def test_a_device_that_is_not_there_is_the_engine_s_own_error(tiny_hf):
    """As in the thread mode (LLMEngine raises it): a ValueError naming the flag, which the CLI reports in one line,
    not the engine process dying with a traceback."""
    with pytest.raises(ValueError, match="--device cuda"):
        ProcessEngine(EngineConfig(model=str(tiny_hf), device="cuda:99", **CONFIG))


def test_the_engine_process_ends_with_the_server_process(tiny_hf, tmp_path):
    """A server killed without its shutdown (SIGKILL, os._exit) leaves no engine process holding the device."""
    script = tmp_path / "server.py"
    script.write_text(textwrap.dedent(f"""
        import os, sys
        from glm_serve.engine.config import EngineConfig
        from glm_serve.engine.process import ProcessEngine
        if __name__ == "__main__":
            eng = ProcessEngine(EngineConfig(model={str(tiny_hf)!r}, kv_cache_tokens=1024))
            print(eng.pid, flush=True)
            os._exit(0)  # no shutdown, no atexit
    """))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert out.returncode == 0, out.stderr
    pid = int(out.stdout.split()[0])
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and _running(pid):
        time.sleep(0.1)
    assert not _running(pid), "the engine process outlived its server"


def test_the_engine_process_ends_with_a_server_killed_while_it_starts(tmp_path):
    """A server killed while the engine process still loads (SIGTERM before uvicorn's handlers are in, SIGKILL)
    leaves no engine process loading weights onto the device for nobody."""
    script = tmp_path / "server.py"
    script.write_text(textwrap.dedent("""
        import multiprocessing, os, threading, time
        from glm_serve.engine.config import EngineConfig
        from glm_serve.engine.process import ProcessEngine

        class SlowStart(EngineConfig):  # (the engine process imports this module as __mp_main__)
            def resolved_device(self):
                time.sleep(120)  # a slow disk
                return super().resolved_device()

        def die_while_it_starts():
            while not multiprocessing.active_children():
                time.sleep(0.05)
            print(multiprocessing.active_children()[0].pid, flush=True)
            time.sleep(3)  # well into its start
            os._exit(0)  # no shutdown, no atexit: as SIGKILL

        if __name__ == "__main__":
            threading.Thread(target=die_while_it_starts, daemon=True).start()
            ProcessEngine(SlowStart(model="demo", kv_cache_tokens=1024))
    """))
    # stdout read line by line, stderr not at all: the engine process holds them too, and outlives its server
    server = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                              text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    pid = int(server.stdout.readline())
    try:
        assert server.wait(timeout=60) == 0
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and _running(pid):
            time.sleep(0.1)
        assert not _running(pid), "the engine process outlived its server"
    finally:
        server.stdout.close()
        if _running(pid):
            os.kill(pid, signal.SIGKILL)


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"  # a zombie has exited (its parent is gone)
    except FileNotFoundError:
        return False


def test_a_glm4v_image_prompt_crosses_the_process(tmp_path):
    """The image is prepared in the server process (PIL, resize) and its pixels travel to the engine process."""
    from test_vision_engine import _messages, _png  # tests/ is on sys.path (rootdir-relative modules)

    from glm_serve.tiny_vision import make_tiny_vision

    ckpt = make_tiny_vision(tmp_path / "tiny_v", seed=3)
    png = _png(1)
    messages = _messages("what is this?", png)
    config = dict(kv_cache_tokens=4096, max_batch_tokens=512)
    vlm = LLM(str(ckpt), **config)
    ids = encode_chat(vlm.tokenizer, messages, allow_images=True)
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=1)

    def run(front):
        mm = front.engine.prepare_image(ids, png)
        assert mm.pixels is not None

        async def go():
            return [o async for o in front.generate("img", ids, params, image=mm)]
        return asyncio.run(go())

    front = AsyncEngine(vlm.engine)
    try:
        want = run(front)
    finally:
        front.shutdown()
    proc = ProcessEngine(EngineConfig(model=str(ckpt), **config))
    try:
        got = run(proc)
    finally:
        proc.shutdown()
    assert_same(_summary(got), _summary(want))
    assert got[-1].prompt_tokens > len(ids)  # the image's slots were expanded and computed


def test_a_cpu_engine_process_leaves_a_core_to_the_server(monkeypatch):
    import torch

    from glm_serve.engine.process import _leave_a_core_to_the_server

    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        torch.set_num_threads(3)
        _leave_a_core_to_the_server(EngineConfig(model="demo", device="cpu"))
        assert torch.get_num_threads() == 2
        torch.set_num_threads(1)
        _leave_a_core_to_the_server(EngineConfig(model="demo", device="cpu"))
        assert torch.get_num_threads() == 1  # never none
        monkeypatch.setenv("OMP_NUM_THREADS", "3")
        torch.set_num_threads(3)
        _leave_a_core_to_the_server(EngineConfig(model="demo", device="cpu"))
        assert torch.get_num_threads() == 3  # the user's choice stands
    finally:
        torch.set_num_threads(before)


def test_an_unreadable_message_from_the_engine_fails_everything_instead_of_hanging(tiny_hf, monkeypatch):
    """The receiver thread ending on an unexpected error used to leave `alive` True and every request waiting."""
    import glm_serve.engine.process as process_mod

    eng = ProcessEngine(EngineConfig(model=str(tiny_hf), **CONFIG))
    try:
        def broken(t):
            raise KeyError("a message this version cannot read")

        monkeypatch.setattr(process_mod, "decode_output", broken)

        async def run():
            return [o async for o in eng.generate("x", [1, 2, 3], SamplingParams(max_tokens=5))]

        with pytest.raises(EngineStoppedError):
            asyncio.run(asyncio.wait_for(run(), 60))
        assert not eng.alive and not eng._proc.is_alive()  # the engine process was stopped too
    finally:
        eng.shutdown()
