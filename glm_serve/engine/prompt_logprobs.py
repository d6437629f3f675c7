"""Owns prompt logprobs: which flat rows of a step score prompt tokens (`plan`, runner side), their fp32
log-softmax in bounded slices (`compute`), and the engine's record of each sequence's prompt logprobs across
prefill chunks, preemption and recompute (`PromptLogprobRecorder`).

The logits at position i predict token i + 1, so a chunk computing positions [start, end) of a P-token prompt
scores prompt tokens start + 1 .. min(end, P - 1); the logits of position P - 1 predict the first generated
token and stay the sampler's:

    position        0      1      2     ...   P-2         P-1
    scores          p1     p2     p3    ...   p{P-1}      (first output token: the sampler's row)
    entries  [None, lp(p1), lp(p2), lp(p3), ..., lp(p{P-1})]   = RequestOutput.prompt_logprobs, aligned with the prompt

Only sequences in `PromptLogprobRecorder.wanted` get rows: the first choice of each request that asked, until
every entry is filled. A step with none of them is planned and run exactly as before (no rows, no copy).
The values come back to the host with their own event, read at the step's one sync (LLMEngine._read): they
change nothing the next step schedules, so they need no earlier sync and overlap scheduling stays on.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from glm_serve.engine.config import PROMPT_LOGPROB_ROWS
from glm_serve.engine.outputs import RequestState, TokenLogprob
from glm_serve.engine.sampler import HostCopy, SamplerOutput
from glm_serve.engine.sequence import Sequence

# Rows whose [rows, vocab] logits (and their fp32 log-softmax) exist at once. GLM-4's 151,552-entry vocab:
# 256 rows = 155 MB per fp32 tensor, ~390 MB transient at bf16, where a whole 2K-token chunk would need 3 GB.
# The CUDA activation reserve counts it (engine/config.py activation_reserve_bytes).
SLICE_ROWS = PROMPT_LOGPROB_ROWS


@dataclass
class PromptRows:
    """One step's rows that score prompt tokens. Filled by `plan` (ModelRunner.prepare), except `result`,
    filled by `compute` (ModelRunner.execute) and read by the engine at the step's sync."""

    seq_ids: list[int]  # [Q] the recording sequences in this step, batch order
    first: list[int]  # [Q] prompt index of the first token each one's rows score (>= 1)
    counts: list[int]  # [Q] its rows: they score prompt tokens first .. first + count - 1
    flat_rows: torch.Tensor  # [R] int64 flat batch rows whose hidden states score them, R = sum(counts); device
    targets: torch.Tensor  # [R] int64 the prompt tokens they score; device
    k: int  # top alternatives per row: the most any of the Q asked for (each keeps its own k when landed)
    result: HostCopy | None = None  # token_ids = targets [R], logprobs [R], top_ids / top_logprobs [R, k]


def plan(sched, cu: np.ndarray, wanted: dict[int, int], to) -> PromptRows | None:
    """The step's prompt rows. sched: SchedulerOutput.scheduled; cu: [B + 1] int64 flat row where each
    scheduled sequence starts; wanted: seq id -> k of the sequences recording; to: host array -> device
    tensor. None when no scheduled chunk scores a prompt token."""
    seq_ids, first, counts, rows, targets = [], [], [], [], []
    k = 0
    for b, s in enumerate(sched):
        want = wanted.get(s.seq.seq_id)
        if want is None:
            continue
        prompt = s.seq.prompt_token_ids
        lo, hi = s.start, min(s.start + s.num_new_tokens, len(prompt) - 1)  # positions [lo, hi) score a token
        if hi <= lo:
            continue  # a decode, or the chunk holding only the last prompt position
        seq_ids.append(s.seq.seq_id)
        first.append(lo + 1)
        counts.append(hi - lo)
        rows.append(np.arange(cu[b], cu[b] + hi - lo, dtype=np.int64))  # position start sits at flat row cu[b]
        targets.extend(prompt[lo + 1:hi + 1])
        k = max(k, want)
    if not seq_ids:
        return None
    return PromptRows(seq_ids, first, counts, to(np.concatenate(rows)), to(np.array(targets, dtype=np.int64)), k)


def compute(model, hidden: torch.Tensor, rows: PromptRows) -> None:
    """Queue the prompt rows' logprobs on the device and their copy to the host (into `rows.result`).
    hidden: [T, hidden_size], the step's final hidden states. At most SLICE_ROWS rows of logits at once."""
    R = rows.targets.shape[0]
    device = hidden.device
    chosen = torch.empty(R, dtype=torch.float32, device=device)  # [R]
    top_lp = torch.empty(R, rows.k, dtype=torch.float32, device=device)  # [R, k]
    top_ids = torch.empty(R, rows.k, dtype=torch.int64, device=device)  # [R, k]
    for a in range(0, R, SLICE_ROWS):
        b = min(R, a + SLICE_ROWS)
        # Raw log-softmax in float32, as the sampler reports generated tokens' logprobs.
        lp = model.compute_logits(hidden[rows.flat_rows[a:b]]).float().log_softmax(-1)  # [b - a, V]
        chosen[a:b] = lp.gather(1, rows.targets[a:b, None]).squeeze(1)
        if rows.k:
            top_lp[a:b], top_ids[a:b] = lp.topk(rows.k, dim=-1)
        del lp  # before the next slice's logits are made
    rows.result = HostCopy(SamplerOutput(rows.targets, chosen, top_ids, top_lp))


@dataclass(slots=True)
class _Record:
    req: RequestState  # gets the entries (RequestState.prompt_logprobs) once all are in
    seq: Sequence
    k: int
    entries: list[TokenLogprob | None]  # [P] entry i: prompt token i's logprob; entry 0 stays None
    filled: int = 1  # entries 1 .. filled - 1 are set (a prefix: chunks arrive in order, recompute re-fills)


@dataclass
class PromptLogprobRecorder:
    """Engine side: the sequences recording prompt logprobs and what they have so far."""

    wanted: dict[int, int] = field(default_factory=dict)  # seq id -> k while incomplete; the runner plans these
    _records: dict[int, _Record] = field(default_factory=dict)

    def add(self, req: RequestState, seq: Sequence, k: int) -> None:
        """Record seq's prompt logprobs (top-k alternatives) for req (at once for a 1-token prompt)."""
        P = len(seq.prompt_token_ids)
        if P == 1:
            req.prompt_logprobs = [None]
            return
        self.wanted[seq.seq_id] = k
        self._records[seq.seq_id] = _Record(req, seq, k, [None] * P)
        seq.max_prefix_hit = 0  # every position's logits are needed: no prefix-cache hit until they are scored

    def drop(self, seq_id: int) -> None:
        """The sequence is gone (finished, aborted, failed): forget what it recorded."""
        self.wanted.pop(seq_id, None)
        self._records.pop(seq_id, None)

    def land(self, rows: PromptRows) -> None:
        """Wait for one step's prompt rows (queued before, or with, the step's sampled tokens: no extra wait)
        and store them. A sequence whose prompt is now fully scored hands its entries to its request and is
        dropped. An entry is set once: a recompute after preemption adds nothing twice."""
        res = rows.result.wait()
        targets, lp = res.token_ids.tolist(), res.logprobs.tolist()
        top_ids, top_lp = res.top_ids.tolist(), res.top_logprobs.tolist()
        r = 0
        for seq_id, first, count in zip(rows.seq_ids, rows.first, rows.counts):
            rec = self._records.get(seq_id)
            if rec is not None:
                entries, k = rec.entries, rec.k
                for j in range(r, r + count):
                    i = first + j - r
                    if entries[i] is None:
                        entries[i] = TokenLogprob(targets[j], lp[j], list(zip(top_ids[j][:k], top_lp[j][:k])))
                while rec.filled < len(entries) and entries[rec.filled] is not None:
                    rec.filled += 1
                # Positions 0 .. filled - 2 are scored: a recompute may take cached blocks up to there.
                rec.seq.max_prefix_hit = rec.filled - 1
                if rec.filled == len(entries):
                    rec.seq.max_prefix_hit = None
                    rec.req.prompt_logprobs = entries  # sent with the request's next output (emit.py)
                    self.drop(seq_id)
            r += count
