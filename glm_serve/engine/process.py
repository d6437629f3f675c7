"""ProcessEngine: the engine loop in a process of its own (`glm-serve serve --engine-process`).

In one process the engine loop (AsyncEngine's thread) and the HTTP event loop share one GIL. Every PyTorch op
of a step releases it and has to take it back, so at hundreds of streams the event loop's per-chunk work holds
back the engine's next launches, and the two loops' CPU time adds up instead of overlapping
(benchmarks/gil_convoy.py). Here the engine has an interpreter of its own:

    server process                                        engine process (spawned)
    EngineFrontend.generate ── sender thread ══ pipe ══> reader thread ── EngineLoop.commands
    per-request queues <── receiver thread (decode) <══ pipe ══ EngineLoop publish (encode)

The server process keeps the HTTP work, chat templates and validation (RemoteCore: the engine's facts and a
tokenizer of its own); the engine process owns the model, the scheduler, detokenization and stop strings.
Messages are pickled. Outputs cross as plain tuples: pickling 256 RequestOutput dataclasses per step takes about
1 ms on this VM, the same outputs as tuples about 0.1 ms (making them about 0.1 ms more). Constraints cross as their
serialized grammar (constraints.GrammarConstraint); a GLM-4V prompt as its prepared MultiModalPrompt (pixels
included); a content filter's blocked-strings list once, then by reference (engine/shared_lists.py).

The engine process ignores SIGINT and SIGTERM (Ctrl-C reaches the whole process group, and so does a supervisor's
stop: systemd's default KillMode=control-group): the server decides when it stops (after its graceful shutdown),
and it exits by itself when the server process is gone (its command pipe closes). If it dies, every request in
flight and every later one fails with EngineStoppedError, and /health says so.
"""

from __future__ import annotations

import atexit
import logging
import multiprocessing
import multiprocessing.connection
import os
import pickle
import queue
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.reduction import ForkingPickler

import torch

from glm_serve.config import ModelConfig
from glm_serve.engine.async_engine import AddRequest, EngineFrontend, EngineLoop, EngineStoppedError, Published
from glm_serve.engine.config import EngineConfig
from glm_serve.engine.engine import check_prompt
from glm_serve.engine.multimodal import MultiModalPrompt, prepare_image
from glm_serve.engine.outputs import CompletionOutput, RequestOutput, TokenLogprob
from glm_serve.engine.shared_lists import ListSender, receive
from glm_serve.sampling_params import SamplingParams

log = logging.getLogger(__name__)

START_TIMEOUT_S = 3600.0  # loading 9B weights from a slow disk, CUDA warm-up: generous, but not forever


@dataclass
class EngineFacts:
    """What the server process needs to know of the engine built in the other one (sent once, at start)."""

    config: EngineConfig
    model_path: str
    model_config: ModelConfig
    max_model_len: int
    kv_capacity_tokens: int
    vocab_limit: int
    vision_config: object | None  # GLM-4V: the VisionConfig; None for a text model
    device: torch.device
    dtype: torch.dtype
    load_seconds: float
    warm_up_seconds: float
    stats: dict  # LLMEngine.stats() once built (then each message from the engine brings them)


class RemoteCore:
    """The server process's stand-in for the LLMEngine in the engine process: what the API layer reads of an
    engine (config, tokenizer, validate, prepare_image, stats and the start-up figures)."""

    def __init__(self, facts: EngineFacts):
        from pathlib import Path  # noqa: PLC0415

        from glm_serve.tokenizer import load_tokenizer  # noqa: PLC0415

        self.facts = facts
        self.config = facts.config
        self.model_path = Path(facts.model_path)
        self.model_config = facts.model_config
        self.max_model_len = facts.max_model_len
        self.kv_capacity_tokens = facts.kv_capacity_tokens
        self.vision_config = facts.vision_config
        self.device, self.dtype = facts.device, facts.dtype
        self.load_seconds, self.warm_up_seconds = facts.load_seconds, facts.warm_up_seconds
        # templates and validation stay in the server process
        self.tokenizer = load_tokenizer(self.model_path, chat_template=self.config.chat_template)
        self.latest_stats: dict = facts.stats  # LLMEngine.stats() as of the engine's last message

    def validate(self, prompt_ids: list[int], params: SamplingParams) -> None:
        check_prompt(prompt_ids, params, self.facts.vocab_limit, self.max_model_len)

    def prepare_image(self, prompt_ids: list[int], image) -> MultiModalPrompt:
        return prepare_image(self.vision_config, self.tokenizer.special_ids, prompt_ids, image)

    def stats(self) -> dict:
        return self.latest_stats


class ProcessEngine(EngineFrontend):
    """AsyncEngine's interface with the engine loop in a spawned process (see the module docstring). Building it
    starts the process and waits until the engine there is built; its errors (a bad checkpoint, too little
    memory) are raised here."""

    in_own_process = True

    def __init__(self, config: EngineConfig, engine_factory: Callable[[EngineConfig], object] | None = None):
        """engine_factory: builds the engine in the engine process from `config` (default: LLMEngine); a picklable
        top-level callable (benchmarks/engine_overhead.py swaps the model's forward for fixed logits there)."""
        super().__init__()
        mp = multiprocessing.get_context("spawn")  # CUDA cannot be forked; and a clean interpreter either way
        cmd_recv, self._cmd_send = mp.Pipe(duplex=False)
        self._res_recv, res_send = mp.Pipe(duplex=False)
        # Not a daemon: a daemon process may not start processes of its own (torch.compile's workers do). It ends
        # when told to, when this process's end closes its command pipe, or at the latest by the atexit below.
        self._proc = mp.Process(target=_engine_process, args=(config, cmd_recv, res_send, engine_factory),
                                name="glm-engine")
        self._proc.start()
        atexit.register(self._kill)  # runs before multiprocessing's own exit hook, which would wait for it
        cmd_recv.close()
        res_send.close()
        self.step_count = 0
        self.last_step_at = time.monotonic()
        self._cpu_seconds: float | None = None
        self._closing = False
        self._dead: str | None = None  # why the engine process is gone, once it is
        try:
            facts = self._wait_ready()
            self.engine = RemoteCore(facts)
        except BaseException:
            self._kill()
            self._close()
            raise
        self._outbox: queue.Queue = queue.Queue()
        self._lists = ListSender()  # the sender thread's
        self._sender = threading.Thread(target=self._send_loop, name="glm-engine-send", daemon=True)
        self._receiver = threading.Thread(target=self._receive_loop, name="glm-engine-recv", daemon=True)
        self._sender.start()
        self._receiver.start()

    def _wait_ready(self) -> EngineFacts:
        if not self._res_recv.poll(START_TIMEOUT_S):
            raise RuntimeError(f"the engine process did not start within {START_TIMEOUT_S:.0f} s")
        try:
            kind, payload = self._res_recv.recv()
        except EOFError:
            self._proc.join(timeout=5)
            raise RuntimeError(f"the engine process exited while starting (exit code {self._proc.exitcode}); "
                               "its log is above") from None
        if kind == "failed":
            raise payload  # the engine's own exception: the CLI reports a ValueError as a one-line error
        return payload

    # ---- caller side ---------------------------------------------------------------------------------------

    def _submit(self, add: AddRequest) -> None:
        if self._dead is not None:
            self._publish([(add.request_id, EngineStoppedError(self._dead), True)])
            return
        self._outbox.put(add)

    def _submit_abort(self, request_id: str) -> None:
        self._outbox.put(("abort", request_id))

    def shutdown(self) -> None:
        """Stop the engine process (requests still in it end) and the threads that talk to it."""
        self._closing = True
        self._outbox.put(("stop", None))
        self._outbox.put(None)
        self._sender.join(timeout=10)
        self._proc.join(timeout=10)
        self._kill()
        self._receiver.join(timeout=5)
        self._close()

    def _close(self) -> None:
        """Let go of the pipes and the exit hook (a process that builds several engines, tests, keeps none)."""
        atexit.unregister(self._kill)
        for conn in (self._cmd_send, self._res_recv):
            conn.close()

    def _kill(self) -> None:
        if self._proc.is_alive():  # SIGKILL: it ignores SIGTERM (see _engine_process)
            self._proc.kill()
            self._proc.join()

    @property
    def alive(self) -> bool:
        return self._dead is None and self._proc.is_alive()

    @property
    def stopped_reason(self) -> str:
        return self._dead or super().stopped_reason

    @property
    def pid(self) -> int | None:
        return self._proc.pid

    def engine_cpu_seconds(self) -> float | None:
        """CPU seconds of the engine process, as of its last message (None once it is gone)."""
        return self._cpu_seconds if self.alive else None

    # ---- the threads that talk to the engine process ------------------------------------------------------

    def _send_loop(self) -> None:
        """Pickles and writes commands (off the event loop: an image is megabytes)."""
        while True:
            cmd = self._outbox.get()
            if cmd is None:
                return
            try:
                if isinstance(cmd, AddRequest):
                    cmd = self._lists.outgoing(cmd, self._cmd_send.send)  # a content filter's list: sent once
                    # Its id first, then the request pickled on its own: one that does not unpickle in the engine
                    # process (a grammar that does not rebuild there, an image's shared memory) is refused there by
                    # id, instead of being dropped with its caller waiting forever.
                    payload = ForkingPickler.dumps(cmd)  # (a pickling error: raised before anything is written)
                    self._cmd_send.send(("add", cmd.request_id))
                    self._cmd_send.send_bytes(payload)
                else:
                    self._cmd_send.send(cmd)
            except (BrokenPipeError, OSError):
                return  # the engine process is gone: the receiver reports it
            except Exception as e:  # noqa: BLE001 (an unpicklable request fails alone)
                if isinstance(cmd, AddRequest):
                    log.exception("request %s could not be sent to the engine process", cmd.request_id)
                    self._publish([(cmd.request_id, RuntimeError(f"{type(e).__name__}: {e}"), True)])

    def _receive_loop(self) -> None:
        while True:
            try:
                kind, steps, stats, cpu, items = self._res_recv.recv()
                self._cpu_seconds = cpu
                self.engine.latest_stats = stats
                if steps != self.step_count:
                    self.step_count, self.last_step_at = steps, time.monotonic()
                if items:
                    self._publish([(rid, decode_output(item) if ok else item, final)
                                   for rid, ok, item, final in items])
            except (EOFError, OSError):
                break
            except Exception:  # noqa: BLE001 (a message we cannot read: outputs may be lost, so the engine is done)
                # Going on would leave requests waiting for outputs that never come; ending here fails them all
                # and stops the server (serve.py), instead of this thread dying while `alive` stays True.
                log.exception("a message from the engine process could not be read; stopping the engine")
                if not self._closing:
                    self._kill()
                break
        self._proc.join(timeout=5)
        code = self._proc.exitcode  # (None while another thread is still reaping it)
        self._dead = ("the engine process has stopped" + (f" (exit code {code})" if code is not None else "")
                      + "; restart the server" if not self._closing else "the engine has been shut down")
        if not self._closing:
            log.error("%s: failing the requests in flight", self._dead)
        self._fail_sinks(self._dead)

    def _fail_sinks(self, message: str) -> None:
        # As an exception, not as failed choices: the API answers it as it answers a request sent after the
        # engine stopped (503 with this message; in-band in a stream already started), and a batch line that
        # failed of it stays pending for the next start.
        self._publish([(rid, EngineStoppedError(message), True) for rid in list(self._sinks)])


# ---- the engine process ---------------------------------------------------------------------------------------


def _engine_process(config: EngineConfig, commands: Connection, results: Connection,
                    engine_factory: Callable[[EngineConfig], object] | None = None) -> None:
    """The engine process's main: build the engine, report its facts, then run its loop until told to stop or
    until the server process is gone."""
    # Ctrl-C reaches the whole group, and a supervisor's SIGTERM may (systemd's default KillMode=control-group): dying
    # of it would fail every answer in flight at once, where the server gives them --shutdown-timeout and stops us
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s [engine]: %(message)s")
    from glm_serve.engine.engine import LLMEngine  # noqa: PLC0415

    threading.Thread(target=_exit_if_the_server_dies_first, name="glm-engine-start-watch", daemon=True).start()
    try:
        _leave_a_core_to_the_server(config)  # (it resolves --device: one that is not there is a ValueError)
        engine = (engine_factory or LLMEngine)(config)
    except BaseException as e:  # noqa: BLE001 (reported to the server process, which raises it)
        results.send(("failed", _sendable(e)))
        return
    from glm_serve.constraints import use_vocabulary  # noqa: PLC0415 (xgrammar itself only with a first grammar)

    use_vocabulary(engine.tokenizer, engine.model_config.vocab_size)  # grammars arrive serialized: rebuilt here
    results.send(("ready", EngineFacts(
        config, str(engine.model_path), engine.model_config, engine.max_model_len, engine.kv_capacity_tokens,
        engine.vocab_limit, engine.vision_config, engine.device, engine.dtype, engine.load_seconds,
        engine.warm_up_seconds, engine.stats())))
    _started.set()
    sender = _ResultSender(engine, results)
    loop = EngineLoop(engine, sender.publish, on_idle=sender.heartbeat)
    sender.loop = loop
    reader = threading.Thread(target=_read_commands, args=(commands, loop), name="glm-engine-commands",
                              daemon=True)
    reader.start()
    loop.run()
    results.close()


def _exit_if_the_server_dies_first() -> None:
    """While the engine is built (minutes for 9B weights) nothing reads the command pipe, so a server killed then
    (SIGTERM before uvicorn's handlers are in, SIGKILL) would leave this process loading onto the device for
    nobody, holding its memory against the next server. The parent's sentinel (readable once it is gone) ends it.
    A server gone after the start closes the command pipe, and the loop stops by itself."""
    parent = multiprocessing.parent_process()
    if parent is None:
        return
    multiprocessing.connection.wait([parent.sentinel])
    if not _started.is_set():
        os._exit(1)


_started = threading.Event()  # the engine process: its engine is built and its facts sent


def _leave_a_core_to_the_server(config: EngineConfig) -> None:
    """A model computing on the CPU: one torch compute thread fewer than the cores, unless OMP_NUM_THREADS says.
    The server process needs a core for the HTTP side, and torch's compute threads spin while they wait for
    each other, so sharing every core with it cost throughput: on 2 cores, 256 streams ran at 4.7K tokens/s
    with 2 compute threads and 7.1K with 1 (benchmarks/results/serve_bench_engine_process_cpu_2026-12-03.json).
    A GPU model's compute is on the device: nothing to change."""
    if config.resolved_device().type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, torch.get_num_threads() - 1))


def _read_commands(commands: Connection, loop: EngineLoop) -> None:
    """Unpickles the server's commands into the loop's queue (an image or a grammar unpickles here, not on the
    loop). A closed pipe means the server process is gone: stop."""
    while True:
        try:
            cmd = commands.recv()
            payload = commands.recv_bytes() if cmd[0] == "add" else None  # ("add", request id), then the request
        except (EOFError, OSError):
            cmd = ("stop", None)
        except Exception as e:  # noqa: BLE001 (a command that does not unpickle: nothing to answer it with)
            log.exception("a command from the server could not be read: %s", e)
            continue
        if cmd[0] == "blocked":  # a list later requests refer to (engine/shared_lists.py)
            try:
                receive(cmd[1], cmd[2])
            except Exception as e:  # noqa: BLE001 (cannot happen for a list that compiled in the server)
                log.exception("a blocked-strings list from the server could not be compiled: %s", e)
            continue
        if cmd[0] == "stop":
            loop.stop.set()
            loop.commands.put(("wake", None))
            return
        if cmd[0] == "add":
            try:
                cmd = pickle.loads(payload)
            except Exception as e:  # noqa: BLE001 (that request fails alone; its caller must hear of it)
                log.exception("request %s could not be read from the server", cmd[1])
                err = RuntimeError(f"the request could not be read in the engine process: {type(e).__name__}: {e}")
                cmd = ("fail", cmd[1], err)  # published by the loop: the results pipe is written by it alone
        loop.commands.put(cmd)


class _ResultSender:
    """The engine process's side of the results pipe: every message carries the step count, the engine's stats
    and the process's CPU seconds, so the server's /metrics stays current without asking."""

    def __init__(self, engine, results: Connection):
        self.engine = engine
        self.results = results
        self.loop: EngineLoop | None = None

    def publish(self, items: Published) -> None:
        encoded = [(rid, True, encode_output(item), final) if isinstance(item, RequestOutput)
                   else (rid, False, _sendable(item), final) for rid, item, final in items]
        self._send(encoded)

    def heartbeat(self) -> None:
        self._send([])

    def _send(self, items: list) -> None:
        try:
            self.results.send(("step", self.loop.step_count, self.engine.stats(), time.process_time(), items))
        except (BrokenPipeError, OSError):  # the server process is gone
            self.loop.stop.set()


def _sendable(e: BaseException) -> BaseException:
    """e itself when it pickles (ValueError subclasses keep their API error codes), else a RuntimeError."""
    try:
        pickle.loads(pickle.dumps(e))
        return e
    except Exception:  # noqa: BLE001
        return RuntimeError(f"{type(e).__name__}: {e}")


# ---- outputs as tuples ----------------------------------------------------------------------------------------


def _encode_lp(lp: TokenLogprob | None):
    return None if lp is None else (lp.token_id, lp.logprob, lp.top)


def _decode_lp(t) -> TokenLogprob | None:
    return None if t is None else TokenLogprob(t[0], t[1], t[2])


def encode_output(out: RequestOutput) -> tuple:
    """A RequestOutput as nested tuples of plain values (see the module docstring for why)."""
    choices = [(o.index, o.text, o.token_ids, None if o.logprobs is None else [_encode_lp(lp) for lp in o.logprobs],
                o.finish_reason, o.stop_reason, o.error) for o in out.outputs]
    plp = None if out.prompt_logprobs is None else [_encode_lp(lp) for lp in out.prompt_logprobs]
    return (out.request_id, choices, out.finished, out.prompt_tokens, out.completion_tokens, out.cached_tokens, plp)


def decode_output(t: tuple) -> RequestOutput:
    rid, choices, finished, prompt_tokens, completion_tokens, cached_tokens, plp = t
    outs = [CompletionOutput(i, text, ids, None if lps is None else [_decode_lp(lp) for lp in lps], reason, stop,
                             error) for i, text, ids, lps, reason, stop, error in choices]
    return RequestOutput(rid, outs, finished, prompt_tokens, completion_tokens, cached_tokens,
                         None if plp is None else [_decode_lp(lp) for lp in plp])
