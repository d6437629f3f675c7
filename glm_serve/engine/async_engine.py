"""AsyncEngine: the engine loop on its own thread, requests as async iterators of incremental outputs.

EngineFrontend is the callers' side: requests go to the loop through a command queue (add, abort) and come back
through per-request asyncio queues. EngineLoop is the engine's side: it owns the LLMEngine and steps it. Here
the loop runs on a thread of the server's process (the model's kernels release the GIL, so the event loop keeps
serving HTTP while a step runs); engine/process.py runs the same loop in a process of its own.
An exception in one request ends that request alone; an exception in a step is logged, the step's requests
fail, and the loop goes on.
"""

from __future__ import annotations

import abc
import asyncio
import logging
import queue
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from glm_serve.engine.engine import LLMEngine
from glm_serve.engine.outputs import CompletionOutput, RequestOutput, TokenConstraint, merge_outputs
from glm_serve.sampling_params import SamplingParams

log = logging.getLogger(__name__)


class Interrupted(Exception):
    """Raised by AsyncEngine.generate where its caller waits, once the caller's `interrupt` event is set."""


class EngineStoppedError(RuntimeError):
    """The engine is gone (its process died): no request can run until the server is restarted."""


@dataclass
class AddRequest:
    """A request for the engine loop (picklable: with --engine-process it crosses to the engine's process)."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    constraints: list[TokenConstraint | None] | None
    image: object | None  # GLM-4V: a MultiModalPrompt from LLMEngine.prepare_image, or image bytes
    final_only: bool  # the caller wants the result: first tokens, then one final output (LLMEngine.add_request)


# The interpreter's switch interval while an AsyncEngine runs (CPython's default is 5 ms). Every PyTorch op of
# the engine thread releases the GIL and takes it back; while the event loop runs Python without a pause
# (hundreds of streams' chunks), taking it back waits until the loop is made to drop it, one switch interval
# per op: beside a busy Python thread a 3 ms CPU step took 634 ms at 5 ms and 53 ms at 0.5 ms
# (benchmarks/gil_convoy.py, benchmarks/results/gil_convoy_cpu_2026-12-02.json); with the busy thread
# pausing, as a loop does between steps, the interval made no difference. Only ever lowered, never raised.
# (With --engine-process the engine has a process and a GIL of its own: engine/process.py.)
SWITCH_INTERVAL_S = 0.0005

# (request id, RequestOutput or exception, final): what the engine loop hands to the callers after a step
Published = list[tuple[str, object, bool]]


class EngineFrontend(abc.ABC):
    """The caller side, on the event loop(s): requests in, per-request asyncio queues of outputs back. The engine
    loop runs behind `_submit` (a thread here: AsyncEngine; a process: engine/process.py) and hands its outputs
    to `_publish` from whatever thread receives them.

    Subclasses set `engine` (the LLMEngine, or its stand-in with the same config, tokenizer, validate(),
    prepare_image() and stats()) and `step_count`, and implement the abstract members below."""

    engine: object
    in_own_process = False  # the engine loop runs in a process of its own (ProcessEngine)

    def __init__(self) -> None:
        # request id -> (its queue, its caller's event loop, its n); registered by generate, dropped by the final
        # item. Written by the caller's thread and the publishing thread: single dict operations (GIL-atomic).
        self._sinks: dict[str, tuple[asyncio.Queue, asyncio.AbstractEventLoop, int]] = {}
        self.num_merged_outputs = 0  # outputs handed to a lagging caller inside another one (see generate)

    async def generate(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                       constraints: list[TokenConstraint | None] | None = None,
                       image=None, final_only: bool = False,
                       interrupt: asyncio.Event | None = None) -> AsyncIterator[RequestOutput]:
        """Yields RequestOutputs (deltas; several steps' worth at once when the caller lags) until the request
        finishes. Raises ValueError at once for a request that can never run, or whose id is in flight. Leaving
        the iterator early (client gone, cancel) aborts the request. final_only: only the first tokens' output
        and the final one, which holds all the rest (for callers that do not stream).
        image (GLM-4V): a MultiModalPrompt from `engine.prepare_image` (preferred: its CPU work then stays off
        the engine thread) or image bytes.
        interrupt: once this event is set, the caller stops waiting even when no output comes (a request still
        queued or in a long prefill): Interrupted is raised after the outputs already there, unless they finish
        the request, and the request is aborted. An event set before the call is not watched."""
        self.engine.validate(getattr(image, "ids", None) or prompt_ids, params)
        if request_id in self._sinks:  # another caller's request is in flight under this id: leave it alone
            raise ValueError(f"duplicate request id {request_id!r}")
        sink: asyncio.Queue = asyncio.Queue()
        self._sinks[request_id] = (sink, asyncio.get_running_loop(), params.n)
        self._submit(AddRequest(request_id, prompt_ids, params, constraints, image, final_only))
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
                    # Refused by the engine: nothing to abort. Interrupted: in flight, and the finally aborts it.
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
        self._submit_abort(request_id)

    @property
    def stopped_reason(self) -> str:
        """Why the engine no longer runs (meaningful once `alive` is False)."""
        return "the engine has stopped; restart the server"

    @abc.abstractmethod
    def _submit(self, add: AddRequest) -> None:
        """Hand a request (its sink already registered) to the engine loop."""

    @abc.abstractmethod
    def _submit_abort(self, request_id: str) -> None:
        """Ask the engine loop to abort a request (its final output then ends the sink)."""

    @abc.abstractmethod
    def shutdown(self) -> None:
        """Stop the engine loop."""

    @property
    @abc.abstractmethod
    def alive(self) -> bool:
        """The engine loop still runs."""

    @abc.abstractmethod
    def engine_cpu_seconds(self) -> float | None:
        """CPU seconds the engine loop has used (None once it has ended)."""

    def _publish(self, items: Published) -> None:
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


class EngineLoop:
    """The engine side: owns the LLMEngine, applies the callers' commands between steps, steps while there is
    work and publishes each step's outputs. An exception in one request ends that request alone; an exception
    in a step is logged, the step's requests fail, and the loop goes on. run() returns once `stop` is set."""

    def __init__(self, engine: LLMEngine, publish: Callable[[Published], None],
                 on_idle: Callable[[], None] | None = None):
        self.engine = engine
        # AddRequest | ("abort", request id) | ("fail", request id, exception: a request refused before it could be
        # added, engine/process.py) | ("wake", None)
        self.commands: queue.Queue = queue.Queue()
        self.stop = threading.Event()
        self._publish = publish
        self._on_idle = on_idle  # called when a wait for commands timed out (nothing to do for half a second)
        self.step_count = 0
        self.last_step_at = time.monotonic()

    def run(self) -> None:
        eng = self.engine
        while not self.stop.is_set():
            # Block when idle; otherwise drain whatever arrived since the last step and run one more.
            if not self._drain(block=not eng.has_unfinished()) and self._on_idle is not None:
                self._on_idle()
            if not eng.has_unfinished():
                continue
            try:
                outputs = eng.step()
            except Exception as e:  # noqa: BLE001 (a bug in one step must not kill the server)
                log.exception("engine step failed; failing the running requests")
                outputs = self._fail_all(f"{type(e).__name__}: {e}")
            self.step_count += 1
            self.last_step_at = time.monotonic()
            self._publish([(out.request_id, out, out.finished) for out in outputs])

    def _drain(self, block: bool) -> bool:
        """Apply the commands waiting (with block, wait up to 0.5 s for one). -> False when the wait timed out."""
        try:
            cmd = self.commands.get(timeout=0.5) if block else self.commands.get_nowait()
        except queue.Empty:
            return not block
        while True:
            self._apply(cmd)
            try:
                cmd = self.commands.get_nowait()
            except queue.Empty:
                return True

    def _apply(self, cmd) -> None:
        if isinstance(cmd, AddRequest):
            try:
                self.engine.add_request(cmd.request_id, cmd.prompt_ids, cmd.params, cmd.constraints, cmd.image,
                                        cmd.final_only)
            except Exception as e:  # noqa: BLE001 (reported to that caller only)
                err = e if isinstance(e, ValueError) else RuntimeError(str(e))
                self._publish([(cmd.request_id, err, True)])
        elif cmd[0] == "abort":
            out = self.engine.abort_request(cmd[1])
            if out is not None:
                self._publish([(cmd[1], out, True)])
        elif cmd[0] == "fail":
            self._publish([(cmd[1], cmd[2], True)])

    def _fail_all(self, message: str) -> list[RequestOutput]:
        outs = []
        for rid in list(self.engine.requests):
            req = self.engine.requests[rid]
            req.error = message
            self.engine._fail(req)
            outs.append(self.engine._collect(req, {}))
        return outs


class AsyncEngine(EngineFrontend):
    """The engine loop on a thread of this process (the default; see engine/process.py for a process)."""

    def __init__(self, engine: LLMEngine):
        super().__init__()
        if sys.getswitchinterval() > SWITCH_INTERVAL_S:
            sys.setswitchinterval(SWITCH_INTERVAL_S)
        self.engine = engine
        self._loop = EngineLoop(engine, self._publish)
        self._thread = threading.Thread(target=self._loop.run, name="glm-engine", daemon=True)
        self._thread.start()

    def _submit(self, add: AddRequest) -> None:
        self._loop.commands.put(add)

    def _submit_abort(self, request_id: str) -> None:
        self._loop.commands.put(("abort", request_id))

    def shutdown(self) -> None:
        self._loop.stop.set()
        self._loop.commands.put(("wake", None))
        self._thread.join(timeout=10)

    @property
    def step_count(self) -> int:
        return self._loop.step_count

    @property
    def last_step_at(self) -> float:
        return self._loop.last_step_at

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def engine_cpu_seconds(self) -> float | None:
        """CPU seconds the engine loop thread has used (None once it has ended: its id may be reused)."""
        ident = self._thread.ident
        if ident is None or not self._thread.is_alive():
            return None
        try:
            return time.clock_gettime(time.pthread_getcpuclockid(ident))
        except (OSError, AttributeError):  # the thread is gone, or no per-thread clocks (not Linux/macOS)
            return None


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
