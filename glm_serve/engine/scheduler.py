"""Owns the scheduler: which sequences compute how many tokens each step, under one token budget (pure Python).

There are no prefill/decode modes: every sequence's num_computed_tokens chases its num_tokens. Each step

    1. running sequences, oldest first: a decode gets its 1 token; an unfinished prompt (or a recompute after
       preemption) gets a chunk of what is left of the budget;
    2. then waiting sequences, first come first served, each taking its longest cached prefix for free and
       a chunk of what is left of the budget (a sibling with `wait_for` is skipped until that sibling's
       prompt is computed, so it can share those blocks).

When a running sequence needs a block and none is free, the newest running sequence is preempted (blocks
freed, back to the front of the waiting queue, recomputed later from its prompt and outputs). The engine
loop is `out = schedule(); sampled = run(out); update(out, sampled)`, then it finishes sequences that hit a
stop condition or `hit_length_limit`.

schedule() commits the step: it advances each scheduled sequence's num_computed_tokens and counts the token
it will sample as `num_inflight`. update(out, sampled) lands those tokens later. Between the two the engine
may schedule the next step (overlap scheduling): an in-flight token counts as a token to decode, a sequence
whose in-flight token is its last allowed one is left out (the engine finishes it when the token lands), and
a sequence preempted with a token in flight gets that token appended by update() all the same.

A sequence with max_tokens 0 (max_num_tokens == its prompt) computes its prompt and never samples: its chunks
have sample=False, and once computed it is left out until the engine, seeing its last chunk land, finishes it.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from glm_serve.engine.block_manager import BlockManager
from glm_serve.engine.sequence import Sequence, SeqStatus


@dataclass(kw_only=True)
class SchedulerConfig:
    """Scheduling limits, validated once. `num_blocks` comes from the KV-cache sizing at start-up."""

    max_num_seqs: int = 256  # most sequences in one step (and running at once)
    max_batch_tokens: int = 2048  # most new tokens in one step (all sequences together)
    max_model_len: int  # most tokens (prompt + output) one sequence may hold
    block_size: int = 16  # tokens per KV block
    num_blocks: int  # KV blocks in the cache
    enable_prefix_caching: bool = True  # False = --no-prefix-caching: no lookups, no registration

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_batch_tokens", "max_model_len", "block_size", "num_blocks"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"SchedulerConfig.{name} must be a positive int, got {value!r}")
        if self.max_model_len < 2:
            raise ValueError(
                f"SchedulerConfig.max_model_len must be >= 2 (a prompt plus one token), got {self.max_model_len}"
            )
        if self.max_batch_tokens < self.max_num_seqs:
            raise ValueError(
                f"SchedulerConfig.max_batch_tokens ({self.max_batch_tokens}) must be >= max_num_seqs "
                f"({self.max_num_seqs}): every running sequence needs at least one token per step"
            )

    @property
    def kv_capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def max_seq_len(self) -> int:
        """Most tokens one sequence can really hold: max_model_len, or less when the whole cache is smaller."""
        return min(self.max_model_len, self.kv_capacity_tokens)


@dataclass(slots=True)
class ScheduledSeq:
    """One sequence's share of a step. Filled by Scheduler.schedule; read by the runner and update()."""

    seq: Sequence
    start: int  # num_computed_tokens before this step: the new tokens sit at positions [start, start + n)
    num_new_tokens: int  # n: tokens whose K/V this step computes (and writes into seq.block_ids' slots)
    # True iff start + n == seq.num_tokens < seq.max_num_tokens: this step yields logits to sample the next
    # token (a max_tokens 0 sequence computes its prompt and samples nothing)
    sample: bool


@dataclass
class SchedulerOutput:
    """What one step runs. Filled by Scheduler.schedule; the runner builds its batch from `scheduled`."""

    scheduled: list[ScheduledSeq] = field(default_factory=list)  # batch order: running first, then admitted
    preempted: list[Sequence] = field(default_factory=list)  # lost their blocks this step (back to WAITING)
    # Finished by schedule() itself with reason "length" because they reached max_seq_len without the
    # engine finishing them (a safety net: the engine should check hit_length_limit after update()).
    finished: list[Sequence] = field(default_factory=list)
    num_batched_tokens: int = 0  # sum of num_new_tokens over `scheduled`
    num_cached_tokens: int = 0  # prompt tokens newly admitted sequences took from the prefix cache this step

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    """Queues, the per-step token budget, preemption and the step update. See the module docstring."""

    def __init__(self, config: SchedulerConfig, block_manager: BlockManager) -> None:
        bm = block_manager
        if (bm.num_blocks, bm.block_size, bm.enable_prefix_caching) != (
            config.num_blocks,
            config.block_size,
            config.enable_prefix_caching,
        ):
            raise ValueError(
                "Scheduler: block_manager (num_blocks, block_size, enable_prefix_caching) = "
                f"({bm.num_blocks}, {bm.block_size}, {bm.enable_prefix_caching}) does not match the config "
                f"({config.num_blocks}, {config.block_size}, {config.enable_prefix_caching})"
            )
        self.config = config
        self.block_manager = bm
        self.waiting: deque[Sequence] = deque()  # arrival order; preempted sequences go back to the front
        self.running: list[Sequence] = []  # admission order: oldest first, the newest is preempted first
        self._seqs: dict[int, Sequence] = {}  # seq_id -> every unfinished sequence
        self.num_preemptions = 0  # total, for metrics

    # ---- queues ------------------------------------------------------------------------------------------

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def has_unfinished(self) -> bool:
        return bool(self.running or self.waiting)

    def get(self, seq_id: int) -> Sequence | None:
        return self._seqs.get(seq_id)

    def add(self, seq: Sequence) -> None:
        """Queue a new sequence. ValueError if its prompt could never be scheduled (or it is not new)."""
        cfg = self.config
        n = seq.num_prompt_tokens
        max_tokens = getattr(seq.params, "max_tokens", None)
        generates = max_tokens != 0
        need = n + generates  # the prompt and one generated token (max_tokens 0: the prompt alone)
        plus = "with at least one generated token " if generates else ""
        if need > cfg.max_model_len:
            raise ValueError(f"prompt has {n} tokens; {plus}that exceeds max_model_len ({cfg.max_model_len})")
        if need > cfg.kv_capacity_tokens:
            raise ValueError(
                f"prompt has {n} tokens; {plus}it needs "
                f"{-(-need // cfg.block_size)} KV blocks but the cache has only {cfg.num_blocks} "
                f"({cfg.kv_capacity_tokens} tokens)"
            )
        if seq.seq_id in self._seqs:
            raise ValueError(f"seq_id {seq.seq_id} is already scheduled")
        if seq.status is not SeqStatus.WAITING or seq.block_ids or seq.num_computed_tokens:
            raise ValueError(f"seq {seq.seq_id} is not new (status {seq.status.name}, {len(seq.block_ids)} blocks)")
        seq.max_num_tokens = cfg.max_seq_len if max_tokens is None else min(cfg.max_seq_len, n + max_tokens)
        self._seqs[seq.seq_id] = seq
        self.waiting.append(seq)

    def hit_length_limit(self, seq: Sequence) -> bool:
        """True when seq may not grow further: its max_tokens are out, or it holds max_seq_len tokens.
        The engine checks stop tokens first, then this, and finishes the sequence with reason "length"."""
        return seq.num_tokens >= seq.max_num_tokens

    def finish(self, seq: Sequence, reason: str) -> None:
        """Take seq out of its queue, free its blocks, mark it FINISHED with `reason`. Idempotent."""
        if seq.status is SeqStatus.FINISHED:
            return
        if self._seqs.get(seq.seq_id) is not seq:
            raise ValueError(f"finish: seq {seq.seq_id} was never added to this scheduler")
        if seq.status is SeqStatus.RUNNING:
            self.running.remove(seq)
        else:
            self.waiting.remove(seq)
        self.block_manager.free(seq)
        seq.status = SeqStatus.FINISHED
        seq.num_inflight = 0  # a token still in flight is dropped (update() skips finished sequences)
        seq.finish_reason = reason
        seq.wait_for = None
        self._seqs.pop(seq.seq_id, None)

    def abort(self, seq_id: int) -> Sequence | None:
        """Finish an unfinished sequence with reason "abort"; returns it, or None if unknown or done."""
        seq = self._seqs.get(seq_id)
        if seq is not None:
            self.finish(seq, "abort")
        return seq

    # ---- the step ----------------------------------------------------------------------------------------

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        if seq is self.running[-1]:
            self.running.pop()
        else:
            self.running.remove(seq)
        self.block_manager.free(seq)
        seq.num_computed_tokens = 0
        seq.status = SeqStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)
        out.preempted.append(seq)

    def schedule(self) -> SchedulerOutput:
        """Pick this step's sequences and token counts, allocating their blocks (see the module docstring).
        An empty `scheduled` with has_unfinished() means everything waits on something outside the
        scheduler (it cannot happen from block shortage alone: add() rejects what could never fit)."""
        cfg, bm = self.config, self.block_manager
        out = SchedulerOutput()
        scheduled = out.scheduled
        budget = cfg.max_batch_tokens
        limit = cfg.max_seq_len
        bs = cfg.block_size
        running = self.running

        # 1. Running sequences, oldest first. Preemption pops victims from the tail, which this loop has not
        # reached yet, so iterating the list while it shrinks is safe.
        capped: list[Sequence] = []
        for seq in running:
            if budget == 0:
                break
            start = seq.num_computed_tokens
            total = len(seq.prompt_token_ids) + len(seq.output_token_ids)
            if seq.num_inflight:
                total += seq.num_inflight
                if total >= seq.max_num_tokens:
                    continue  # its in-flight token is its last: the engine finishes it when that lands
            if total >= limit and seq.max_num_tokens > seq.num_prompt_tokens:  # (max_tokens 0 never samples)
                # Its next sample would pass max_seq_len (prompts are shorter: add() checks), so it is done;
                # the engine should have finished it after update() through hit_length_limit.
                capped.append(seq)
                continue
            # A chunk of what is left. Only the newest running sequence can still have prompt left (it was
            # admitted when the budget ran out), so the decodes ahead of it always get their token.
            n = total - start
            if n == 0:  # max_tokens 0, its prompt computed: the engine finishes it once that step lands
                continue
            if n > budget:
                n = budget
            end = start + n
            # Most decode steps need no new block; test that inline (this loop runs for every sequence).
            if end > len(seq.block_ids) * bs:
                while not bm.can_allocate(seq, n):
                    victim = running[-1]
                    self._preempt(victim, out)
                    if victim is seq:
                        break
                if seq.status is not SeqStatus.RUNNING:
                    break  # seq preempted itself: it was the newest, nothing runs behind it
                bm.allocate(seq, n)
            # Commit at once: preemption only takes sequences this loop has not reached, never a scheduled one.
            seq.num_computed_tokens = end
            sample = end == total and total < seq.max_num_tokens  # (not a max_tokens 0 sequence)
            seq.num_inflight += sample  # the token this step samples
            scheduled.append(ScheduledSeq(seq, start, n, sample))
            budget -= n
        for seq in capped:
            self.finish(seq, "length")
            out.finished.append(seq)

        # 2. Waiting sequences, first come first served; none after a preemption (blocks are short).
        if not out.preempted:
            k = 0
            while k < len(self.waiting) and budget > 0 and len(running) < cfg.max_num_seqs:
                seq = self.waiting[k]
                if seq.num_inflight:  # preempted with a token in flight: back once update() landed it
                    k += 1
                    continue
                parent = seq.wait_for
                if parent is not None:
                    if (
                        bm.enable_prefix_caching
                        and self._seqs.get(parent.seq_id) is parent
                        and (parent.num_computed_tokens < parent.num_prompt_tokens
                             or parent.num_hashed_blocks < parent.num_prompt_tokens // cfg.block_size)
                    ):
                        # Its sibling's prompt is still being computed, or its blocks are not registered yet
                        # (update() registers them): share them once they are.
                        k += 1
                        continue
                    seq.wait_for = None  # sibling done, gone, or nothing to share: from now on a plain FCFS seq
                if seq.num_tokens >= limit and seq.max_num_tokens > seq.num_prompt_tokens:  # preempted at
                    # max_seq_len (see the running loop); a max_tokens 0 prompt that fills the window still runs
                    self.finish(seq, "length")
                    out.finished.append(seq)
                    continue
                hit = bm.match_prefix(seq)
                cached = len(hit) * cfg.block_size
                n = min(seq.num_tokens - cached, budget)
                if not bm.can_allocate(seq, n, hit):
                    break  # FCFS: later sequences do not overtake the head of the queue
                bm.allocate(seq, n, hit)
                del self.waiting[k]
                seq.status = SeqStatus.RUNNING
                running.append(seq)
                start = seq.num_computed_tokens
                sample = start + n == seq.num_tokens < seq.max_num_tokens  # max_tokens 0: never samples
                seq.num_computed_tokens = start + n  # commit (as above)
                seq.num_inflight += sample
                scheduled.append(ScheduledSeq(seq, start, n, sample))
                if seq.num_preemptions == 0:
                    out.num_cached_tokens += cached
                budget -= n

        out.num_batched_tokens = cfg.max_batch_tokens - budget
        return out

    def update(self, out: SchedulerOutput, sampled: dict[int, int]) -> None:
        """After the step ran: land each sampled token (sampled: seq_id -> token id) and register blocks that
        just became full in the prefix cache. Finished or aborted sequences are skipped; a sequence preempted
        since gets its token too (it is recomputed with it), unless the step lost it (then it is resampled)."""
        bm = self.block_manager
        caching, bs = bm.enable_prefix_caching, bm.block_size
        running, finished = SeqStatus.RUNNING, SeqStatus.FINISHED
        for s in out.scheduled:
            seq = s.seq
            if seq.status is finished:
                continue
            if s.sample:
                seq.num_inflight -= 1
                token = sampled.get(seq.seq_id)
                if token is not None:
                    seq.output_token_ids.append(token)
                elif seq.status is running:
                    raise ValueError(f"update: no sampled token for seq {seq.seq_id}, which sampled this step")
            end = s.start + s.num_new_tokens
            if caching and seq.status is running and end // bs > seq.num_hashed_blocks:
                # A block filled up. Only up to this step's end: a next step already scheduled may still fail.
                bm.cache_full_blocks(seq, end)

