"""Owns the device side of LLMEngine's step: queue a step on the device (runner prepare + execute, the sampling
batch, the sampler), and read it back at the step's one sync. Mixed into LLMEngine, like emit.OutputEmitter.

A batched step that fails (at launch or at the sync) is re-run one sequence at a time (`_sync`), so that only
the requests whose own sequence fails are failed; the others get their tokens from the re-run.

Reads the engine's runner, sampler, seq_owner, prompt-logprob recorder and request counters; calls back its
`_fail`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from glm_serve.engine.multimodal import image_embeddings
from glm_serve.engine.outputs import TokenLogprob
from glm_serve.engine.prompt_logprobs import PromptRows
from glm_serve.engine.runner import InflightTokens
from glm_serve.engine.sampler import HostCopy, SamplingBatch, SamplingRow
from glm_serve.engine.scheduler import SchedulerOutput
from glm_serve.engine.sequence import SeqStatus

log = logging.getLogger(__name__)

Sampled = tuple[dict[int, int], dict[int, TokenLogprob]]  # one step's tokens and logprobs, by seq id

_RETRY = object()  # _launch failed: _sync re-runs each sequence alone


@dataclass
class _Inflight:
    """A launched step whose tokens have not landed on the host yet (see step)."""

    out: SchedulerOutput
    launched: object  # (sampled seq ids, SamplerOutput | None, HostCopy | None, PromptRows | None) from _forward,
    # None or _RETRY

    def tokens(self) -> InflightTokens | None:
        if isinstance(self.launched, tuple) and self.launched[1] is not None:
            return InflightTokens(self.launched[0], self.launched[1].token_ids)
        return None


class DeviceStep:
    """LLMEngine's device side (see the module docstring)."""

    def _launch(self, out: SchedulerOutput):
        for seq in out.preempted:
            self.runner.release(seq.seq_id)
        if out.is_empty:
            return None
        try:
            return self._forward(out, self._inflight.tokens() if self._inflight is not None else None)
        except Exception:  # noqa: BLE001 (isolated in _sync: each sequence alone, fail only those that fail)
            log.exception("a batched step failed; re-running its %d sequences one by one", len(out.scheduled))
            return _RETRY

    def _sync(self, out: SchedulerOutput, launched) -> tuple[Sampled, bool]:
        if launched is None:
            return ({}, {}), False
        if launched is not _RETRY:
            try:
                return self._read(*launched), False
            except Exception:  # noqa: BLE001
                log.exception("a batched step failed; re-running its %d sequences one by one", len(out.scheduled))
        tokens: dict[int, int] = {}
        logprobs: dict[int, TokenLogprob] = {}
        for s in out.scheduled:
            if s.seq.status is not SeqStatus.RUNNING:
                continue  # finished, or preempted since: recomputed later, and its token sampled again then
            try:
                one_tokens, one_logprobs = self._read(*self._forward(SchedulerOutput(scheduled=[s])))
                tokens.update(one_tokens)
                logprobs.update(one_logprobs)
            except Exception as e:  # noqa: BLE001
                log.exception("request %s failed", s.seq.request_id)
                req, _ = self.seq_owner[s.seq.seq_id]
                req.error = f"{type(e).__name__}: {e}"
                self._fail(req)  # out of the scheduler now, so update() skips its sequences
        return (tokens, logprobs), True

    @torch.inference_mode()
    def _forward(self, out: SchedulerOutput, inflight: InflightTokens | None = None):
        """Queue the step on the device: -> (sampled seq ids, SamplerOutput with device tensors, its HostCopy,
        the step's PromptRows or None)."""
        batch = self.runner.prepare(out, inflight, self._prompt_lp.wanted)
        logits = self.runner.execute(batch, self._image_embeddings(out))  # [S, V]
        if not batch.sample_seq_ids:
            return [], None, None, batch.prompt_rows
        sb = self.build_sampling_batch(batch.sample_seq_ids, logits.shape[1])
        res = self.sampler(logits, sb)
        return batch.sample_seq_ids, res, HostCopy(res), batch.prompt_rows

    def _read(self, seq_ids: list[int], res, host: HostCopy | None, prompt: PromptRows | None = None) -> Sampled:
        if res is not None:
            res = host.wait()  # the one wait of the step: for this step's work only (see HostCopy)
        if prompt is not None:  # queued before the sampler: landed by now, unless the step sampled nothing
            self._prompt_lp.land(prompt)
        if res is None:
            return {}, {}
        ids = res.token_ids.tolist()
        logprobs = {}
        if res.logprobs is not None:
            lp, top_ids, top_lp = res.logprobs.tolist(), res.top_ids.tolist(), res.top_logprobs.tolist()
            for r, seq_id in enumerate(seq_ids):
                owner = self.seq_owner.get(seq_id)  # None: finished and reported since it was launched
                k = owner[0].params.logprobs if owner is not None else None
                if k is not None:
                    logprobs[seq_id] = TokenLogprob(ids[r], lp[r], list(zip(top_ids[r][:k], top_lp[r][:k])))
        return dict(zip(seq_ids, ids)), logprobs

    def _image_embeddings(self, out: SchedulerOutput) -> list[tuple[int, torch.Tensor]] | None:
        if self.model.vision is None:  # a text model: no step has image slots
            return None
        return image_embeddings(out, self.model.vision, lambda seq: self.seq_owner[seq.seq_id][0].mm)

    def build_sampling_batch(self, seq_ids: list[int], vocab: int) -> SamplingBatch:
        """The sampler's view of the rows to sample this step (with constraint masks filled on the host)."""
        owner = self.seq_owner
        if self._num_sampling_requests == 0:  # the common case: nothing but argmax
            return SamplingBatch(num_rows=len(seq_ids), vocab_size=vocab, all_greedy=True)
        # Without penalties, min_tokens or constraints (the requests that need host tokens) nothing in a row's
        # batch changes from step to step: the same sequences as last step, in the same order, are last step's
        # batch (its seeded generators are the same objects, their state moved on by the sampler).
        last = self._last_sampling
        reuse = self._num_host_token_requests == 0
        if reuse and last is not None and last[0] == seq_ids and last[1].vocab_size == vocab:
            return last[1]
        rows, bitmask = [], None
        for r, seq_id in enumerate(seq_ids):
            req, c = owner[seq_id]
            seq = c.seq
            rows.append(SamplingRow(req.params, seq.prompt_token_ids, seq.output_token_ids, c.stop_ids, c.generator))
            if c.constraint is not None:
                if bitmask is None:
                    bitmask = torch.full((len(seq_ids), (vocab + 31) // 32), -1, dtype=torch.int32)
                c.constraint.fill_bitmask(bitmask, r)
        batch = SamplingBatch.build(rows, vocab, self.device, bitmask)
        self._last_sampling = (seq_ids, batch) if reuse else None
        return batch
