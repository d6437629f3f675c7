"""Owns `SamplingParams`: one request's decoding settings, validated once when built."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from glm_serve.engine.stop import BlockedStrings

# Temperatures below this are treated as greedy: dividing logits by ~0 only amplifies rounding noise.
GREEDY_TEMPERATURE = 1e-5
MAX_LOGPROBS = 20
MAX_LOGIT_BIAS = 100.0  # OpenAI's range for logit_bias values: -100 bans a token, +100 all but forces it


@dataclass
class SamplingParams:
    """How to pick the tokens of one request. Built by the API layer, read by the engine and sampler."""

    n: int = 1  # completions per prompt
    temperature: float = 1.0  # 0 = greedy (argmax)
    top_p: float = 1.0  # nucleus mass in (0, 1]; 1 = off
    top_k: int = 0  # keep the k most likely tokens; 0 or -1 = off (stored as 0)
    min_p: float = 0.0  # drop tokens below min_p * p(most likely); 0 = off
    repetition_penalty: float = 1.0  # >1 discourages tokens seen in prompt or output; 1 = off
    presence_penalty: float = 0.0  # OpenAI semantics, on output tokens only
    frequency_penalty: float = 0.0  # OpenAI semantics, on output token counts
    seed: int | None = None  # per-request generator: same tokens whatever else is in the batch
    stop: list[str] = field(default_factory=list)  # stop strings, never emitted unless include_stop_str
    stop_token_ids: list[int] = field(default_factory=list)  # extra stop ids; the engine adds the checkpoint's
    # None = up to the context window; 0 = compute the prompt and sample nothing (with prompt_logprobs: scoring)
    max_tokens: int | None = 256
    min_tokens: int = 0  # stop ids are masked and stop strings ignored until this many tokens exist (vLLM)
    ignore_eos: bool = False  # keep generating past the checkpoint's stop ids
    logprobs: int | None = None  # None = off; k = sampled token's logprob plus the top-k alternatives
    # None = off; k = each prompt token's logprob given the tokens before it, plus the top-k alternatives
    # (RequestOutput.prompt_logprobs; the first prompt token has none). Raw log-softmax, like `logprobs`.
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True  # detokenizer drops special tokens from the text
    include_stop_str: bool = False  # keep the matched stop string at the end of the text
    # token id -> value added to its logit before anything else (OpenAI's logit_bias); None or {} = off. Greedy
    # rows take the argmax of the biased logits; reported logprobs stay the model's own (see engine/sampler.py).
    logit_bias: dict[int, float] | None = None
    # Strings the text must never contain (an operator's content filter): matched like stop strings, across
    # token boundaries and held back until they cannot match, but ASCII letters in either case (A-Z as a-z, every
    # other character exact); the text ends just before one, never including it (include_stop_str or not), with
    # finish_reason "content_filter" and stop_reason the string as given. Checked from the first token, min_tokens
    # or not. A list, or a BlockedStrings (compiled once, shared by many requests); None or empty = off.
    blocked_strings: BlockedStrings | list[str] | None = None

    def __post_init__(self) -> None:
        self.n = _int("n", self.n, lo=1)
        self.temperature = _float("temperature", self.temperature, lo=0.0)
        self.top_p = _float("top_p", self.top_p)
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        self.top_k = _int("top_k", self.top_k, lo=-1)
        if self.top_k == -1:
            self.top_k = 0  # one spelling of "off" downstream
        self.min_p = _float("min_p", self.min_p, lo=0.0, hi=1.0)
        self.repetition_penalty = _float("repetition_penalty", self.repetition_penalty)
        if self.repetition_penalty <= 0.0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        self.presence_penalty = _float("presence_penalty", self.presence_penalty, lo=-2.0, hi=2.0)
        self.frequency_penalty = _float("frequency_penalty", self.frequency_penalty, lo=-2.0, hi=2.0)
        if self.seed is not None:
            self.seed = _int("seed", self.seed)
        self.stop = _stop_strings(self.stop)
        self.stop_token_ids = _token_ids("stop_token_ids", self.stop_token_ids)
        if self.max_tokens is not None:
            self.max_tokens = _int("max_tokens", self.max_tokens, lo=0)
        self.min_tokens = _int("min_tokens", self.min_tokens, lo=0)
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens ({self.min_tokens}) must be <= max_tokens ({self.max_tokens})")
        if self.logprobs is not None:
            self.logprobs = _int("logprobs", self.logprobs, lo=0, hi=MAX_LOGPROBS)
        if self.prompt_logprobs is not None:
            self.prompt_logprobs = _int("prompt_logprobs", self.prompt_logprobs, lo=0, hi=MAX_LOGPROBS)
        self.logit_bias = _logit_bias(self.logit_bias)
        if self.blocked_strings is not None:
            self.blocked_strings = BlockedStrings(self.blocked_strings) or None  # (a BlockedStrings: as it is)
        for name in ("ignore_eos", "skip_special_tokens", "include_stop_str"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")

    @property
    def greedy(self) -> bool:
        """Temperature 0 (or below GREEDY_TEMPERATURE): the sampler takes the argmax."""
        return self.temperature < GREEDY_TEMPERATURE

    @property
    def uses_penalties(self) -> bool:
        """Whether the sampler must build token counts for this request."""
        return (self.repetition_penalty != 1.0 or self.presence_penalty != 0.0
                or self.frequency_penalty != 0.0)


def _int(name: str, value: object, lo: int | None = None, hi: int | None = None) -> int:
    # bool is an int subclass; `max_tokens=True` is a client bug, not 1.
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if lo is not None and value < lo:
        raise ValueError(f"{name} must be >= {lo}, got {value}")
    if hi is not None and value > hi:
        raise ValueError(f"{name} must be <= {hi}, got {value}")
    return int(value)


def _float(name: str, value: object, lo: float | None = None, hi: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if lo is not None and value < lo:
        raise ValueError(f"{name} must be >= {lo}, got {value}")
    if hi is not None and value > hi:
        raise ValueError(f"{name} must be <= {hi}, got {value}")
    return value


def _stop_strings(stop: object) -> list[str]:
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]  # OpenAI accepts a bare string
    if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) for s in stop):
        raise ValueError(f"stop must be a list of strings, got {stop!r}")
    if any(s == "" for s in stop):
        raise ValueError("stop must not contain empty strings")
    return list(dict.fromkeys(stop))  # drop duplicates, keep order


def _logit_bias(bias: object) -> dict[int, float] | None:
    """{token id: bias} with ids >= 0 and finite biases in [-100, 100]; None when empty. Whether the ids are in
    the vocabulary is checked where it is known (engine.check_prompt)."""
    if bias is None:
        return None
    if not isinstance(bias, dict):
        raise ValueError(f"logit_bias must map token ids to numbers, got {bias!r}")
    out = {}
    for token, value in bias.items():
        t = _int("logit_bias key", token, lo=0)
        out[t] = _float(f"logit_bias[{t}]", value, lo=-MAX_LOGIT_BIAS, hi=MAX_LOGIT_BIAS)
    return out or None


def _token_ids(name: str, ids: object) -> list[int]:
    if ids is None:
        return []
    if not isinstance(ids, (list, tuple)):
        raise ValueError(f"{name} must be a list of token ids, got {ids!r}")
    return [_int(f"{name}[{i}]", t, lo=0) for i, t in enumerate(ids)]
