"""AsyncEngine under a caller that falls behind: the outputs waiting for it arrive merged, and they add up to
exactly what the synchronous engine produces."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from glm_serve.engine.async_engine import AsyncEngine, Interrupted, merge_final, merge_waiting
from glm_serve.engine.outputs import CompletionOutput, RequestOutput, TokenLogprob
from glm_serve.llm import LLM
from glm_serve.sampling_params import SamplingParams


@pytest.fixture(scope="module")
def llm(tiny_hf):
    return LLM(str(tiny_hf), kv_cache_tokens=4096, max_batch_tokens=256)


def test_a_lagging_caller_gets_the_waiting_outputs_merged(llm):
    prompt = [5, 77, 1203, 9, 31, 400, 12]
    params = SamplingParams(n=2, temperature=0.9, seed=11, max_tokens=24, logprobs=2, ignore_eos=True)
    want = llm.generate([prompt], params, use_tqdm=False)[0].choices

    async def run():
        aeng = AsyncEngine(llm.engine)
        try:
            stream = aeng.generate("lag", prompt, params)
            first = await stream.__anext__()
            deadline = time.monotonic() + 60
            while "lag" in llm.engine.requests and time.monotonic() < deadline:
                time.sleep(0.01)  # blocks the event loop: the engine thread runs the request to its end
            rest = [o async for o in stream]
            return [first, *rest], aeng.num_merged_outputs
        finally:
            aeng.shutdown()

    outs, merged = asyncio.run(run())
    assert merged > 0 and len(outs) < 1 + 24  # the steps that waited came as fewer outputs
    assert outs[-1].finished and outs[-1].completion_tokens == 2 * 24
    got = merge_final(outs)
    assert [c.token_ids for c in got] == [c.token_ids for c in want]
    assert [c.text for c in got] == [c.text for c in want]
    assert [[lp.token_id for lp in c.logprobs] for c in got] == [c.token_ids for c in want]
    assert [c.finish_reason for c in got] == ["length", "length"]


def _out(index: int, tokens: list[int], text: str, finished=False, reason=None) -> RequestOutput:
    lps = [TokenLogprob(t, -1.0, []) for t in tokens]
    return RequestOutput("r", [CompletionOutput(index, text, tokens, lps, reason)], finished, 3, len(tokens), 0)


def test_merge_waiting_stops_at_an_exception_and_at_the_final_output():
    async def run():
        sink: asyncio.Queue = asyncio.Queue()
        for item in (_out(1, [8], "b"), _out(0, [9, 10], "cd"), RuntimeError("late"), _out(0, [11], "e", True)):
            sink.put_nowait(item)
        merged, n, held = merge_waiting(_out(0, [7], "a"), sink)
        behind = sink.qsize()
        sink = asyncio.Queue()
        for item in (_out(0, [2], "y", True, "stop"), _out(0, [3], "never")):
            sink.put_nowait(item)
        last, m, none = merge_waiting(_out(0, [1], "x"), sink)
        return merged, n, held, behind, last, m, none, sink.qsize()

    merged, n, held, behind, last, m, none, left = asyncio.run(run())
    assert n == 2 and isinstance(held, RuntimeError)  # the exception is handed back, not swallowed
    assert behind == 1  # what came after the exception stays queued
    assert [(o.index, o.token_ids, o.text) for o in merged.outputs] == [(0, [7, 9, 10], "acd"), (1, [8], "b")]
    assert [lp.token_id for lp in merged.outputs[0].logprobs] == [7, 9, 10]
    assert (m, none, left) == (1, None, 1)  # nothing past a finished output is taken
    assert last.finished and last.outputs[0].text == "xy" and last.outputs[0].finish_reason == "stop"


def test_a_duplicate_request_id_is_refused_without_touching_the_request_in_flight(llm):
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    want = llm.generate([[3, 1, 4, 1, 5]], params, use_tqdm=False)[0].token_ids

    async def run():
        aeng = AsyncEngine(llm.engine)
        try:
            first = aeng.generate("dup", [3, 1, 4, 1, 5], params)
            outs = [await first.__anext__()]  # "dup" is running in the engine now
            with pytest.raises(ValueError, match="duplicate request id"):
                async for _ in aeng.generate("dup", [9, 9], params):
                    pass
            outs += [o async for o in first]  # still streams to its end (it used to hang here, aborted)
            return outs
        finally:
            aeng.shutdown()

    outs = asyncio.run(asyncio.wait_for(run(), 60))
    got = merge_final(outs)[0]
    assert got.finish_reason == "length" and got.token_ids == want
    assert not llm.engine.requests


def test_leaving_the_stream_early_aborts_the_request(llm):
    """A caller that stops reading (client gone, cancelled task) aborts its request: the engine finishes it
    with reason "abort" and lets go of its blocks, instead of generating to the length limit for nobody."""
    params = SamplingParams(temperature=0.0, max_tokens=2000, ignore_eos=True)

    async def run():
        aeng = AsyncEngine(llm.engine)
        try:
            stream = aeng.generate("gone", [2, 7, 1, 8, 2, 8], params)
            await stream.__anext__()
            seq = llm.engine.requests["gone"].choices[0].seq
            await stream.aclose()  # as a cancelled request handler does
            deadline = time.monotonic() + 30
            while "gone" in llm.engine.requests and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            return seq
        finally:
            aeng.shutdown()

    seq = asyncio.run(asyncio.wait_for(run(), 60))
    assert seq.finish_reason == "abort" and seq.num_tokens < seq.max_num_tokens
    bm = llm.engine.block_manager
    assert not llm.engine.requests and bm.num_free_blocks == bm.num_blocks


def test_an_interrupt_wakes_a_caller_that_no_output_would_wake_and_aborts_its_request(llm):
    """A caller waiting on a request that yields nothing yet (queued, in a long prefill; here the engine is held
    before its first step) stops waiting once its `interrupt` event is set: Interrupted, and the request aborted."""
    params = SamplingParams(temperature=0.0, max_tokens=2000, ignore_eos=True)
    core = llm.engine
    gate = threading.Event()
    real_step = type(core).step

    def held_step():
        gate.wait(timeout=30)
        return real_step(core)

    async def run():
        aeng = AsyncEngine(core)
        core.step = held_step
        try:
            stop = asyncio.Event()
            stream = aeng.generate("waits", [2, 7, 1, 8, 2, 8], params, interrupt=stop)

            async def interrupt_once_in_the_engine():
                # (not after a fixed 0.2 s: a loaded machine's engine thread may not have taken the request yet)
                deadline = time.monotonic() + 30
                while "waits" not in core.requests and time.monotonic() < deadline:
                    await asyncio.sleep(0.01)
                stop.set()

            interrupter = asyncio.ensure_future(interrupt_once_in_the_engine())
            with pytest.raises(Interrupted):
                await asyncio.wait_for(stream.__anext__(), 40)  # without the interrupt: a timeout here
            await interrupter
            assert "waits" in core.requests  # still in flight: the engine made no step
        finally:
            del core.step
            gate.set()
        try:
            deadline = time.monotonic() + 30
            while "waits" in core.requests and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
        finally:
            aeng.shutdown()

    asyncio.run(asyncio.wait_for(run(), 60))
    bm = core.block_manager
    assert not core.requests and bm.num_free_blocks == bm.num_blocks


def test_the_engine_thread_lowers_the_switch_interval_and_never_raises_it(llm):
    # Beside an event loop that runs Python without a pause, each PyTorch op of the engine thread waited up to a
    # whole switch interval (5 ms by default) for the GIL (benchmarks/gil_convoy.py).
    import sys

    from glm_serve.engine import async_engine

    old = sys.getswitchinterval()
    try:
        sys.setswitchinterval(0.005)
        AsyncEngine(llm.engine).shutdown()
        assert sys.getswitchinterval() == pytest.approx(async_engine.SWITCH_INTERVAL_S)
        sys.setswitchinterval(0.0001)  # someone wants it lower still: left alone
        AsyncEngine(llm.engine).shutdown()
        assert sys.getswitchinterval() == pytest.approx(0.0001)
    finally:
        sys.setswitchinterval(old)
