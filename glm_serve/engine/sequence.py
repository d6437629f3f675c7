"""Owns `Sequence`: one generation stream's tokens, progress and KV blocks (pure Python, no torch).

A request asking for n choices becomes n sequences. The scheduler moves a sequence WAITING -> RUNNING ->
FINISHED (and back to WAITING when preempted); the block manager fills its `block_ids`; the engine appends
nothing itself, `Scheduler.update` appends the sampled tokens.

    prompt_token_ids        output_token_ids
    |p0 p1 ... p{P-1}|      |o0 o1 ... o{k-1}|          num_tokens = P + k
    |<----- num_computed_tokens ----->|                 tokens whose K/V are already in the cache
                                      |<- to compute ->|  the scheduler's work for this sequence

With overlap scheduling a sampled token exists on the device one step before it lands in output_token_ids
(`num_inflight`); the scheduler already counts it, so the next step can compute its K/V.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any


class SeqStatus(enum.Enum):
    WAITING = "waiting"  # queued: no blocks (new, or preempted and waiting for recompute)
    RUNNING = "running"  # holds blocks; scheduled every step while it has tokens to compute
    FINISHED = "finished"  # done (stop, length or abort); blocks returned


@dataclass(eq=False, slots=True)
class Sequence:
    """One generation stream. Identity semantics (eq=False): two sequences are never "equal"."""

    seq_id: int  # engine-unique, given by the engine
    request_id: str  # the API request this stream belongs to (several with n > 1)
    prompt_token_ids: list[int] = field(repr=False)  # [num_prompt_tokens]; GLM-4V: image placeholders expanded
    params: Any  # SamplingParams; only `params.max_tokens` (int | None) is read here
    output_token_ids: list[int] = field(default_factory=list, repr=False)  # [num_output_tokens], by update()
    num_computed_tokens: int = 0  # tokens whose K/V are in the cache (scheduler / block manager)
    block_ids: list[int] = field(default_factory=list, repr=False)  # KV blocks in logical order (block manager)
    status: SeqStatus = SeqStatus.WAITING  # scheduler
    # Prompt tokens served from the prefix cache on the first schedule (usage and metrics); block manager.
    num_cached_tokens: int = 0
    # Mixed into every prefix-cache key so equal token ids with different content do not share K/V
    # (GLM-4V: hash of the image pixels, whose placeholder token ids are all the same). Engine.
    extra_hash: int | None = None
    # n > 1: this sibling stays WAITING until `wait_for`'s prompt is fully computed, so its own prompt blocks
    # come from the prefix cache instead of being recomputed. Engine sets it; the scheduler clears it.
    wait_for: Sequence | None = field(default=None, repr=False)
    # GLM-4V: the [start, end) slots of prompt_token_ids that hold the image's boi, vectors and eoi. Positions
    # follow the UN-expanded prompt: slot start -> start, the vectors -> start + 1, then index - (end - start - 3).
    # The runner computes positions and scatters the image embeddings from this. Engine.
    mm_span: tuple[int, int] | None = None
    # Tokens sampled by a step the device may still be running, not yet in output_token_ids (overlap scheduling:
    # step N+1 is scheduled before step N's tokens reach the host). The scheduler counts them as tokens; the
    # runner feeds them to the model from the device. 0, 1, or briefly 2. Scheduler.
    num_inflight: int = 0
    # The most tokens it may hold: prompt + max_tokens, capped by the scheduler's max_seq_len. Scheduler.add.
    max_num_tokens: int = 0
    num_preemptions: int = 0  # times this sequence lost its blocks and went back to WAITING (scheduler)
    # Most leading tokens a prefix-cache hit may cover; None = no limit. A sequence recording prompt logprobs
    # needs the logits of every prompt position it has not scored yet, so a hit must stop there. Engine.
    max_prefix_hit: int | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort" | ..., set by Scheduler.finish
    # Prefix-cache bookkeeping, owned by the block manager: how many leading blocks have known cache keys,
    # and the cache node id of the last of them (the parent of the next block's key).
    num_hashed_blocks: int = 0
    prefix_node: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.prompt_token_ids, list) or not self.prompt_token_ids:
            raise ValueError(f"seq {self.seq_id}: prompt_token_ids must be a non-empty list of token ids")

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        """Prompt + output tokens: the count that num_computed_tokens chases."""
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        """A new list, prompt then output (O(num_tokens): for reference code, not the hot path)."""
        return self.prompt_token_ids + self.output_token_ids

    @property
    def last_token_id(self) -> int:
        return self.output_token_ids[-1] if self.output_token_ids else self.prompt_token_ids[-1]

    @property
    def is_finished(self) -> bool:
        return self.status is SeqStatus.FINISHED

    def token_at(self, i: int) -> int:
        """Token at absolute position i (0 <= i < num_tokens)."""
        p = len(self.prompt_token_ids)
        return self.prompt_token_ids[i] if i < p else self.output_token_ids[i - p]

    def token_slice(self, start: int, end: int) -> list[int]:
        """Tokens at positions [start, end) without building the whole prompt + output list."""
        p = len(self.prompt_token_ids)
        if end <= p:
            return self.prompt_token_ids[start:end]
        if start >= p:
            return self.output_token_ids[start - p : end - p]
        return self.prompt_token_ids[start:] + self.output_token_ids[: end - p]
