"""LLMEngine: the synchronous core. Requests in (token ids + SamplingParams), incremental outputs out.

    out = schedule()                 # step N+1: tokens step N sampled, still on the device, count already
    launched = launch(out)           # queued behind step N (a GPU runs the two back to back)
    land_inflight()                  # wait for step N's tokens; decide stop ids, length, constraints
    outputs = emit(pending)          # detokenize step N, match stop strings, report, while the device runs N+1

This is overlap scheduling: everything the host does per step runs while the device computes. A token that
step N+1 decodes but that step N sampled is gathered on the device (runner.InflightTokens). When a live
request needs its previous token on the host to sample the next (penalties, min_tokens, a constraint) or
when --no-overlap-scheduling is set, the step lands the previous step's tokens first and then schedules:
only the text work overlaps then. A sequence that finishes on a stop token at step N has been scheduled in
step N+1 already; that token is dropped. A stop *string* is seen when the text is made, one step later again.
Prompt logprobs (engine/prompt_logprobs.py) change nothing a next step schedules: they are read at the step's
one sync, like its tokens, and keep overlap scheduling on.

The device side of the step (launch, sync, the batched step's one-by-one re-run) is device_step.DeviceStep;
the output side (text, stop strings, outputs) is emit.OutputEmitter. Not thread-safe: the async engine drives
it from its own thread.
"""

from __future__ import annotations

import atexit
import gc
import itertools
import logging
import time

import torch

from glm_serve.config import ModelConfig
from glm_serve.engine.block_manager import BlockManager
from glm_serve.engine.config import EngineConfig, activation_reserve_bytes, kv_cache_blocks
from glm_serve.engine.device_step import _RETRY, DeviceStep, _Inflight
from glm_serve.engine.emit import OutputEmitter, Pending
from glm_serve.engine.multimodal import MultiModalPrompt, prepare_image
from glm_serve.engine.outputs import (
    ChoiceState,
    RequestOutput,
    RequestState,
    TokenConstraint,
    TokenLogprob,
    make_choice,
)
from glm_serve.engine.prompt_logprobs import PromptLogprobRecorder
from glm_serve.engine.runner import ModelRunner
from glm_serve.engine.sampler import Sampler, SamplingBatch, make_generator
from glm_serve.engine.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from glm_serve.engine.sequence import SeqStatus, Sequence
from glm_serve.sampling_params import SamplingParams

log = logging.getLogger(__name__)

class LLMEngine(OutputEmitter, DeviceStep):
    def __init__(self, config: EngineConfig):
        from glm_serve.cli import resolve_model_arg  # noqa: PLC0415 (demo checkpoint lives with the CLI)
        from glm_serve.config import load_config  # noqa: PLC0415
        from glm_serve.loader import load_model, parse_dtype  # noqa: PLC0415
        from glm_serve.model.attention import make_backend  # noqa: PLC0415
        from glm_serve.tokenizer import load_tokenizer  # noqa: PLC0415

        self.config = config
        self.device = config.resolved_device()
        self.dtype = parse_dtype(config.dtype, self.device)
        self.model_path = resolve_model_arg(config.model)
        window = load_config(self.model_path, config.rope_theta).max_position  # checked before the slow load
        if config.max_model_len is not None and config.max_model_len > window:
            raise ValueError(f"max_model_len (--max-model-len) {config.max_model_len} is beyond the checkpoint's "
                             f"context window of {window} tokens")
        self.tokenizer = load_tokenizer(self.model_path, chat_template=config.chat_template)
        backend = make_backend(config.resolved_backend(self.device))
        backend.check_supported(self.device, self.dtype)
        t0 = time.monotonic()
        self.model = load_model(self.model_path, self.device, self.dtype, config.quantization, backend,
                                config.rope_theta)
        self.model_config: ModelConfig = self.model.config
        self.model.use_fused_ops(config.fused_ops and backend.name == "triton")
        self.load_seconds = time.monotonic() - t0
        kv_dtype, fp8_cache = self.dtype, config.kv_cache_dtype == "fp8"
        if fp8_cache:
            backend.check_fp8_cache(self.device)
        bytes_per_token = self.model_config.kv_bytes_per_token(torch.finfo(kv_dtype).bits // 8, fp8_cache)
        reserve = activation_reserve_bytes(self.model_config, config, torch.finfo(self.dtype).bits // 8)
        num_blocks = kv_cache_blocks(config, bytes_per_token, self.device, reserve)
        if config.max_model_len is not None and config.max_model_len > num_blocks * config.block_size:
            raise ValueError(f"max_model_len (--max-model-len) {config.max_model_len} is more than the KV cache "
                             f"holds ({num_blocks * config.block_size} tokens): lower it, or give the cache more "
                             "room (--kv-cache-tokens, --gpu-memory-utilization, --quantization)")
        max_len = config.max_model_len or self.model_config.max_position  # without it: capped by the cache below
        self.sched_config = SchedulerConfig(
            max_num_seqs=config.max_num_seqs, max_batch_tokens=config.max_batch_tokens, max_model_len=max_len,
            block_size=config.block_size, num_blocks=num_blocks, enable_prefix_caching=config.enable_prefix_caching)
        self.max_model_len = self.sched_config.max_seq_len
        self.block_manager = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.sched_config, self.block_manager)
        self.runner = ModelRunner(self.model, num_blocks, config.block_size, config.max_num_seqs,
                                  self.max_model_len, self.device, kv_dtype, fp8_cache)
        if config.cuda_graphs:
            self._enable_graphs(config)
        self.sampler = Sampler()
        torch.manual_seed(config.seed)
        self.requests: dict[str, RequestState] = {}
        self.seq_owner: dict[int, tuple[RequestState, ChoiceState]] = {}  # seq_id -> (request, its choice)
        self._ids = itertools.count()
        self._inflight: _Inflight | None = None  # the last step launched, its tokens not yet landed
        self._pending: Pending | None = None  # the last step landed, its text not yet emitted
        self._num_host_token_requests = 0  # live requests that sample from their previous token on the host
        self._num_sampling_requests = 0  # live requests that need more than an argmax (not plain_greedy)
        self._last_sampling: tuple[list[int], SamplingBatch] | None = None  # (seq ids, batch): build_sampling_batch
        self._prompt_lp = PromptLogprobRecorder()  # sequences recording prompt logprobs (prompt_logprobs.py)
        self.stop_ids = list(self.tokenizer.stop_token_ids)
        self.vocab_limit = self.model_config.vocab_size
        for skip in (True, False):  # the detokenizer's per-token tables, built now rather than on a first request
            self.tokenizer.token_texts(skip)
        self.warm_up_seconds = self.warm_up() if self.device.type == "cuda" else 0.0
        _tune_gc()

    def warm_up(self) -> float:
        """Run short requests through the real step path before serving (see engine/warm_up.py). -> seconds."""
        from glm_serve.engine.warm_up import warm_up  # noqa: PLC0415

        return warm_up(self)

    def _enable_graphs(self, config: EngineConfig) -> None:
        from glm_serve.engine.cuda_graphs import DecodeGraphs  # noqa: PLC0415

        if self.model.backend.name != "triton":
            raise ValueError("--cuda-graphs needs the triton attention backend (--attention-backend triton)")
        eager = self.device.type != "cuda"
        graphs = DecodeGraphs(self.runner, config.max_num_seqs, self.max_model_len, eager=eager)
        graphs.capture()
        self.runner.graphs = graphs

    # ---- requests ----------------------------------------------------------------------------------------

    @property
    def kv_capacity_tokens(self) -> int:
        return self.sched_config.kv_capacity_tokens

    def validate(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """Raise ValueError for a request that can never run (thread-safe: reads config only)."""
        check_prompt(prompt_ids, params, self.vocab_limit, self.max_model_len)

    @property
    def vision_config(self):
        """GLM-4V: the vision tower's VisionConfig (image size, slots per image); None for a text model."""
        return self.model.vision.config if self.model.vision is not None else None

    def prepare_image(self, prompt_ids: list[int], image: bytes | torch.Tensor | None) -> MultiModalPrompt:
        """GLM-4V: expand the prompt's image placeholder and preprocess the image (thread-safe)."""
        return prepare_image(self.vision_config, self.tokenizer.special_ids, prompt_ids, image)

    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                    constraints: list[TokenConstraint | None] | None = None,
                    image: bytes | torch.Tensor | MultiModalPrompt | None = None, final_only: bool = False) -> None:
        """Queue a request. `image` (GLM-4V): encoded image bytes or [3, S, S] pixels (uint8 RGB, or normalized
        floats), the prompt holding the `<|begin_of_image|><|endoftext|><|end_of_image|>` placeholder; or an
        already prepared prompt.
        final_only: after the output with the first tokens, one output when the request finishes, with all
        since (merged, the outputs are the same as a stream's): for callers that want the result only."""
        if request_id in self.requests:
            raise ValueError(f"duplicate request id {request_id!r}")
        if constraints is not None and len(constraints) != params.n:
            raise ValueError(f"{len(constraints)} constraints for n={params.n} choices (one per choice, or None)")
        mm = image if isinstance(image, MultiModalPrompt) else self.prepare_image(prompt_ids, image)
        prompt_ids = mm.ids
        self.validate(prompt_ids, params)
        req = RequestState(request_id, params, len(prompt_ids), final_only=final_only,
                           holds=final_only or self.config.stream_interval > 1)
        req.mm = mm if mm.pixels is not None else None
        # Rows of this request need nothing but an argmax: no temperature, penalties, min_tokens, logprobs, masks.
        req.plain_greedy = (params.greedy and not params.uses_penalties and params.min_tokens == 0
                            and params.logprobs is None and not params.logit_bias and not any(constraints or ()))
        # Penalties count, min_tokens blocks and constraints follow every token on the host: no overlap.
        req.needs_host_tokens = params.uses_penalties or params.min_tokens > 0 or any(constraints or ())
        first: Sequence | None = None
        for i in range(params.n):
            seq = Sequence(next(self._ids), request_id, list(prompt_ids), params, wait_for=first,
                           extra_hash=mm.hash, mm_span=mm.span)
            first = first or seq
            gen = make_generator(params.seed + i, self.device) if params.seed is not None else None
            constraint = constraints[i] if constraints else None
            c = make_choice(i, seq, self.tokenizer, params, self.stop_ids, gen, constraint)
            req.choices.append(c)
            self.seq_owner[seq.seq_id] = (req, c)
        for c in req.choices:
            self.scheduler.add(c.seq)
        if params.prompt_logprobs is not None:  # the first choice records them for all (siblings share its blocks)
            self._prompt_lp.add(req, first, params.prompt_logprobs)
        self.requests[request_id] = req
        self._num_host_token_requests += req.needs_host_tokens
        self._num_sampling_requests += not req.plain_greedy

    def abort_request(self, request_id: str) -> RequestOutput | None:
        req = self.requests.get(request_id)
        if req is None:
            return None
        for c in req.choices:
            if c.finish_reason is None:
                self._finish(c, "abort")
        return self._collect(req, {})

    def has_unfinished(self) -> bool:
        return bool(self.requests)  # a request leaves only once its final output was emitted

    # ---- the step ----------------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        if not self._may_overlap():
            self._land_inflight()  # the next schedule needs the previous step's tokens on the host
        out = self.scheduler.schedule()  # step N+1; tokens of step N still on the device count already
        launched = self._launch(out)  # queued behind step N: a GPU runs the two back to back
        if self._land_inflight() and launched is not None:
            launched = _RETRY  # step N was re-run piecewise: what step N+1 read from it is void
        self._inflight = _Inflight(out, launched) if launched is not None or out.finished else None
        outputs = self._emit(self._pending)  # text of step N, while the device runs step N+1
        self._pending = None
        return outputs

    def _may_overlap(self) -> bool:
        inf = self._inflight
        return (self.config.overlap_scheduling and inf is not None and inf.launched is not _RETRY
                and self._num_host_token_requests == 0)

    def _land_inflight(self) -> bool:
        """Wait for the step in flight and settle its tokens (text waits for _emit). True when it failed as a
        batch and was re-run sequence by sequence."""
        inf, self._inflight = self._inflight, None
        if inf is None:
            return False
        sampled, retried = self._sync(inf.out, inf.launched)
        pending = self._settle(inf.out, *sampled)
        if self._pending is None:
            self._pending = pending
        elif pending is not None:
            self._pending.tokens += pending.tokens
            self._pending.touched += pending.touched
        return retried

    def _settle(self, out: SchedulerOutput, sampled: dict[int, int], logprobs: dict[int, TokenLogprob]
                ) -> Pending | None:
        """Right after the sync: append the sampled tokens and decide everything that changes what the next
        step schedules or masks (constraints, stop ids, length). Text waits for _emit."""
        self.scheduler.update(out, sampled)
        owner = self.seq_owner
        pending = Pending()
        for seq in out.finished:  # finished by the scheduler itself (length safety net)
            req, c = owner[seq.seq_id]
            self._finish(c, "length")
            pending.touched.append(req)
        finished = SeqStatus.FINISHED
        tokens = pending.tokens
        for s in out.scheduled:
            seq = s.seq
            entry = owner.get(seq.seq_id)
            if entry is None:
                continue
            req, c = entry
            if req.error is not None:
                pending.touched.append(req)
                continue
            token = sampled.get(seq.seq_id)
            if token is None or seq.status is finished:  # (a sequence preempted since still takes its token)
                # max_tokens 0: done once the step computing its last prompt token has landed (not when a later
                # step that may still run has been scheduled: its prompt logprobs would not be in yet)
                if (not s.sample and seq.status is SeqStatus.RUNNING
                        and s.start + s.num_new_tokens >= seq.max_num_tokens):
                    self._finish(c, "length")
                    pending.touched.append(req)
                continue
            # Only a constraint, a stop id or the length can end a choice here (the common case needs no call).
            if (c.constraint is not None or token in c.stop_ids
                    or len(seq.prompt_token_ids) + len(seq.output_token_ids) >= seq.max_num_tokens):
                try:
                    self._advance(c, token)
                except Exception as e:  # noqa: BLE001 (one request's failure must not touch the others)
                    log.exception("request %s failed while processing its output", req.request_id)
                    req.error = f"{type(e).__name__}: {e}"
                    self._fail(req)
                    pending.touched.append(req)
                    continue
            tokens.append((req, c, token, logprobs.get(seq.seq_id) if logprobs else None))
        return pending if pending.tokens or pending.touched else None

    def _forget(self, req: RequestState) -> None:
        req.forgotten = True
        if self.requests.pop(req.request_id, None) is req:
            self._num_host_token_requests -= req.needs_host_tokens
            self._num_sampling_requests -= not req.plain_greedy
        for c in req.choices:
            self.seq_owner.pop(c.seq.seq_id, None)
        if req.params.prompt_logprobs is not None:
            self._prompt_lp.drop(req.choices[0].seq.seq_id)

    def _advance(self, c, token: int) -> None:
        """One sampled token for one choice, before the next step is scheduled: constraint, stop ids, length.
        _settle calls it only when one of these three can apply: a new finish condition belongs in both."""
        seq = c.seq
        terminated = False
        if c.constraint is not None:
            c.constraint.accept(token)
            terminated = c.constraint.is_terminated()
        # A grammar ends on a stop id even before min_tokens (the sampler lets it: nothing else fits then).
        if token in c.stop_ids and (len(seq.output_token_ids) >= seq.params.min_tokens or terminated):
            self._finish(c, "stop", stop_reason=token)
            c.stop_token = True
        elif terminated:
            # A grammar ends on a checkpoint stop id even where ignore_eos left those out of c.stop_ids: that id is
            # the end, not text (rendered with skip_special_tokens=False it would trail the JSON).
            on_stop_id = token in self.stop_ids
            self._finish(c, "stop", stop_reason=token if on_stop_id else None)
            c.stop_token = on_stop_id
        elif seq.num_tokens >= seq.max_num_tokens:  # max_tokens, or the context window is full (hit_length_limit)
            self._finish(c, "length")

    def _finish(self, c, reason: str, stop_reason=None) -> None:
        if c.finish_reason is not None:
            return
        c.finish_reason, c.stop_reason = reason, stop_reason
        if c.seq.status is not SeqStatus.FINISHED:
            self.scheduler.finish(c.seq, reason)
        self.runner.release(c.seq.seq_id)

    def _fail(self, req: RequestState) -> None:
        for c in req.choices:
            self._finish(c, "error")

    # ---- introspection (metrics, health) ---------------------------------------------------------------

    def stats(self) -> dict:
        bm = self.block_manager
        return {
            "num_running": self.scheduler.num_running,
            "num_waiting": self.scheduler.num_waiting,
            "kv_cache_usage": bm.usage,
            "prefix_cache_hit_rate": bm.hit_rate,
            "prefix_cache_queries": bm.num_query_tokens,  # running totals, in prompt tokens
            "prefix_cache_hits": bm.num_hit_tokens,
            "num_preemptions": self.scheduler.num_preemptions,
            "kv_capacity_tokens": self.kv_capacity_tokens,
        }


def check_prompt(prompt_ids: list[int], params: SamplingParams, vocab_limit: int, max_model_len: int) -> None:
    """ValueError (PromptTooLongError) for a prompt that can never run: empty, ids outside the vocabulary, or no
    room left in the context window for the first generated token; SamplingParamError for logit_bias ids outside
    the vocabulary (on CUDA such an index would be a device-side assert, fatal to the whole process)."""
    if not prompt_ids:
        raise ValueError("the prompt is empty")
    bad = next((t for t in prompt_ids if not 0 <= t < vocab_limit), None)
    if bad is not None:
        raise ValueError(f"token id {bad} is outside the vocabulary [0, {vocab_limit})")
    bad = next((t for t in params.logit_bias or () if t >= vocab_limit), None)
    if bad is not None:
        raise SamplingParamError("logit_bias", f"token id {bad} is outside the vocabulary [0, {vocab_limit})")
    generates = params.max_tokens != 0  # max_tokens 0 (prompt logprobs): the prompt may fill the window
    if len(prompt_ids) + generates > max_model_len:
        raise PromptTooLongError(
            f"the prompt has {len(prompt_ids)} tokens; {'with at least one generated token ' * generates}"
            f"that exceeds the context window of {max_model_len} tokens")


def _tune_gc() -> None:
    """What exists once an engine is built (model, tokenizer tables, the torch and API modules) lives as long as
    it: freeze it out of the cyclic GC, whose full collections would otherwise walk it all in the middle of a
    step. And a step makes a few objects per sequence (outputs, deltas) that die within a step or two: collect
    the young generation every 20,000 allocations rather than 700, so that most are gone by then."""
    gc.collect()
    gc.freeze()
    atexit.register(gc.unfreeze)  # so that exit still frees it (native bindings report what is never freed)
    gen0, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(max(gen0, 20_000), gen1, gen2)


class PromptTooLongError(ValueError):
    """The prompt does not fit the context window (API code 1261)."""


class SamplingParamError(ValueError):
    """A sampling parameter that this engine cannot take (its vocabulary, not the value's own range)."""

    def __init__(self, param: str, message: str):
        super().__init__(f"{param}: {message}")
        self.param, self.message = param, message
