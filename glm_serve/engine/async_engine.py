"""AsyncEngine: the engine loop on its own thread, requests as async iterators of incremental outputs.

The loop thread owns the LLMEngine; callers on the event loop talk to it through a command queue (add, abort)
and get their outputs through per-request asyncio queues. The model's kernels release the GIL, so the event
loop keeps serving HTTP while a step runs. An exception in one request ends that request alone; an exception
in the loop itself is logged, the step's requests fail, and the loop goes on.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import sys
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from glm_serve.engine.engine import LLMEngine
from glm_serve.engine.outputs import CompletionOutput, RequestOutput, TokenConstraint, merge_outputs
from glm_serve.sampling_params import SamplingParams

log = logging.getLogger(__name__)


class Interrupted(Exception):
    """Raised by AsyncEngine.generate where its caller waits, once the caller's `interrupt` event is set."""


@dataclass
class _Add:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    constraints: list[TokenConstraint | None] | None
    image: object | None  # GLM-4V: a MultiModalPrompt from LLMEngine.prepare_image, or image bytes
    sink: asyncio.Queue
    loop: asyncio.AbstractEventLoop
    final_only: bool  # the caller wants the result: first tokens, then one final output (LLMEngine.add_request)


# The interpreter's switch interval while an AsyncEngine runs (CPython's default is 5 ms). Every PyTorch op of
# the engine thread releases the GIL and takes it back; while the event loop runs Python without a pause
# (hundreds of streams' chunks), taking it back waits until the loop is made to drop it, one switch interval
# per op: beside a busy Python thread a 3 ms CPU step took 634 ms at 5 ms and 53 ms at 0.5 ms
# (benchmarks/gil_convoy.py, benchmarks/results/gil_convoy_cpu_2026-12-02.json); with the busy thread
# pausing, as a loop does between steps, the interval made no difference. Only ever lowered, never raised.
SWITCH_INTERVAL_S = 0.0005


class AsyncEngine:
    def __init__(self, engine: LLMEngine):
        if sys.getswitchinterval() > SWITCH_INTERVAL_S:
            sys.setswitchinterval(SWITCH_INTERVAL_S)
        self.engine = engine
        self._commands: queue.Queue = queue.Queue()
        self._sinks: dict[str, tuple[asyncio.Queue, asyncio.AbstractEventLoop]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="glm-engine", daemon=True)
        self.step_count = 0
        self.num_merged_outputs = 0  # outputs handed to a lagging caller inside another one (see generate)
        self.last_step_at = time.monotonic()
        self._thread.start()

    # ---- caller side (event loop) -------------------------------------------------------------------------

    async def generate(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                       constraints: list[TokenConstraint | None] | None = None,
                       image=None, final_only: bool = False,
                       interrupt: asyncio.Event | None = None) -> AsyncIterator[RequestOutput]:
        """Yields RequestOutputs (deltas; several steps' worth at once when the caller lags) until the request
        finishes. Raises ValueError at once for a request that can never run. Leaving the iterator early
        (client gone, cancel) aborts the request. final_only: only the first tokens' output and the final
        one, which holds all the rest (for callers that do not stream).
        image (GLM-4V): a MultiModalPrompt from `engine.prepare_image` (preferred: its CPU work then stays off
        the engine thread) or image bytes.
        interrupt: once this event is set, the caller stops waiting even when no output comes (a request still
        queued or in a long prefill): Interrupted is raised after the outputs already there, unless they finish
        the request, and the request is aborted. An event set before the call is not watched."""
        self.engine.validate(getattr(image, "ids", None) or prompt_ids, params)
        sink: asyncio.Queue = asyncio.Queue()
        self._commands.put(_Add(request_id, prompt_ids, params, constraints, image, sink,
                                asyncio.get_running_loop(), final_only))
        watch = None  # one task per request (not per output): the outputs' path stays a plain queue read
        if interrupt is not None and not interrupt.is_set():
            watch = asyncio.ensure_future(interrupt.wait())
            watch.add_done_callback(lambda w: w.cancelled() or sink.put_nowait(Interrupted()))
        finished = False
        held = None  # an exception met while merging: raised after the outputs ahead of it are yielded
        try:
            while True:
                if held is not None:
                    item, held = held, None
                else:
                    item = await sink.get()
                if isinstance(item, BaseException):
                    # Refused by the engine: nothing of ours to abort (the id may be another caller's, in flight).
                    # Interrupted: ours is in flight, and the finally aborts it.
                    finished = not isinstance(item, Interrupted)
                    raise item
                if not item.finished and not sink.empty():
                    item, merged, held = merge_waiting(item, sink)
                    self.num_merged_outputs += merged
                yield item
                if item.finished:
                    finished = True
                    return
        finally:
            if watch is not None:
                watch.cancel()
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        self._commands.put(("abort", request_id))

    def shutdown(self) -> None:
        self._stop.set()
        self._commands.put(("wake", None))
        self._thread.join(timeout=10)

    @property
    def thread_id(self) -> int | None:
        """The engine loop thread's id (threading.get_ident() there), for its CPU clock."""
        return self._thread.ident

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    # ---- loop side (engine thread) ------------------------------------------------------------------------

    def _loop(self) -> None:
        eng = self.engine
        while not self._stop.is_set():
            # Block when idle; otherwise drain whatever arrived since the last step and run one more.
            self._drain(block=not eng.has_unfinished())
            if not eng.has_unfinished():
                continue
            try:
                outputs = eng.step()
            except Exception as e:  # noqa: BLE001 (a bug in one step must not kill the server)
                log.exception("engine step failed; failing the running requests")
                outputs = self._fail_all(f"{type(e).__name__}: {e}")
            self.step_count += 1
            self.last_step_at = time.monotonic()
            self._send_step(outputs)

    def _drain(self, block: bool) -> None:
        try:
            cmd = self._commands.get(timeout=0.5) if block else self._commands.get_nowait()
        except queue.Empty:
            return
        while True:
            self._apply(cmd)
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return

    def _apply(self, cmd) -> None:
        if isinstance(cmd, _Add):
            if cmd.request_id in self._sinks or cmd.request_id in self.engine.requests:
                # Another caller's request is in flight under this id: refuse this one without touching its sink.
                err = ValueError(f"duplicate request id {cmd.request_id!r}")
                try:
                    cmd.loop.call_soon_threadsafe(_deliver, [(cmd.sink, err)])
                except RuntimeError:  # that loop is closed: nobody is listening any more
                    pass
                return
            self._sinks[cmd.request_id] = (cmd.sink, cmd.loop)
            try:
                self.engine.add_request(cmd.request_id, cmd.prompt_ids, cmd.params, cmd.constraints, cmd.image,
                                        cmd.final_only)
            except Exception as e:  # noqa: BLE001 (reported to that caller only)
                self._send(cmd.request_id, e if isinstance(e, ValueError) else RuntimeError(str(e)), final=True)
        elif cmd[0] == "abort":
            out = self.engine.abort_request(cmd[1])
            if out is not None:
                self._send(cmd[1], out, final=True)

    def _fail_all(self, message: str) -> list[RequestOutput]:
        outs = []
        for rid in list(self.engine.requests):
            req = self.engine.requests[rid]
            req.error = message
            self.engine._fail(req)
            outs.append(self.engine._collect(req, {}))
        return outs

    def _send_step(self, outputs: list[RequestOutput]) -> None:
        self._send_all([(out.request_id, out, out.finished) for out in outputs])

    def _send(self, request_id: str, item, final: bool) -> None:
        self._send_all([(request_id, item, final)])

    def _send_all(self, items: list[tuple[str, object, bool]]) -> None:
        """(request id, output or exception, final) to the callers, in one wake-up of each event loop that waits
        for some: call_soon_threadsafe writes to the loop's wake-up pipe, a system call that once per output
        would cost more than the step. A final item ends the request's sink."""
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        sinks = self._sinks
        for request_id, item, final in items:
            entry = sinks.pop(request_id, None) if final else sinks.get(request_id)
            if entry is not None:
                by_loop.setdefault(entry[1], []).append((entry[0], item))
        for loop, batch in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, batch)
            except RuntimeError:  # that loop is closed: nobody is listening any more
                pass


def _deliver(items: list[tuple[asyncio.Queue, object]]) -> None:
    """On the event loop: hand each output (or exception) to its request's queue."""
    for sink, out in items:
        sink.put_nowait(out)


def merge_waiting(item: RequestOutput, sink: asyncio.Queue) -> tuple[RequestOutput, int, BaseException | None]:
    """A caller that fell behind the engine (a busy event loop, a slow client) gets `item` and every output
    waiting behind it as one delta, so its per-output work (parsing, JSON, SSE) shrinks under load instead of
    piling up. -> (the merged output, how many were merged into the first, an exception met behind them)."""
    batch, held = [item], None
    while not batch[-1].finished and not sink.empty():
        nxt = sink.get_nowait()
        if isinstance(nxt, BaseException):
            held = nxt  # raised once the outputs ahead of it are out
            break
        batch.append(nxt)
    return (merge_outputs(batch) if len(batch) > 1 else item), len(batch) - 1, held


def merge_final(outputs: list[RequestOutput]) -> list[CompletionOutput]:
    """Concatenate a request's deltas into one CompletionOutput per choice (non-streaming callers)."""
    return merge_outputs(outputs).outputs
