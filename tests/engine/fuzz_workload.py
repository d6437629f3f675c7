"""Random workloads and engine configurations for test_engine_fuzz.py: everything drawn from one seeded
random.Random, so a seed names one workload and one configuration exactly."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch

from glm_serve.sampling_params import SamplingParams

VOCAB = 2048  # the tiny checkpoint's vocabulary (tests/conftest.py tiny_hf)
PLAIN_IDS = 2000  # ids below this are ordinary tokens; the specials (stop ids among them) come after
MAX_PROMPT, MAX_NEW = 150, 40  # a request holds at most this many tokens: prompt + max_tokens


class SubsetConstraint:
    """A TokenConstraint allowing a fixed random subset of the vocabulary at every step (the same subset for the
    fuzzed and the reference run), terminated once it accepts its `end` token. accept() refuses a token outside
    the subset: a bitmask row applied to the wrong batch row shows up as a request error."""

    def __init__(self, allowed: list[int], end: int | None) -> None:
        self.allowed, self.end, self.done = frozenset(allowed), end, False
        words = torch.zeros((VOCAB + 31) // 32, dtype=torch.int64)
        for t in self.allowed:
            words[t // 32] |= 1 << (t % 32)
        self.row = words.to(torch.int32)  # two's complement wrap of bit 31, as xgrammar's layout has it

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        bitmask[row] = self.row

    def accept(self, token_id: int) -> None:
        if token_id not in self.allowed:
            raise ValueError(f"constraint got token {token_id} outside its subset")
        self.done = token_id == self.end

    def is_terminated(self) -> bool:
        return self.done


@dataclass
class FuzzRequest:
    rid: str
    prompt: list[int]
    params: SamplingParams
    arrive: int  # the engine step before which it is added
    abort: int | None = None  # the step before which it is aborted (if it has not finished by then)
    final_only: bool = False  # the LLM.generate mode: first tokens, then one final output
    subsets: list[tuple[list[int], int | None]] | None = None  # per choice: SubsetConstraint arguments
    comparable: bool = True  # greedy or seeded: the output must equal a run alone (unseeded: checked loosely)
    # (stop ids, stop strings) to take from the request's own output run without them (resolve_stops), so that
    # they end it for real, often in the middle
    stop_plan: tuple[int, int] = (0, 0)
    reuse_id: bool = False  # take the engine id of a request that has finished, if one has

    def constraints(self) -> list[SubsetConstraint] | None:
        """Fresh constraint objects (they are stateful), one per choice, or None."""
        return None if self.subsets is None else [SubsetConstraint(a, e) for a, e in self.subsets]


@dataclass
class FuzzCase:
    engine_kw: dict  # EngineConfig keyword arguments
    staged: bool  # the runner's StepUploader stages as on a GPU (engine/staging.py)
    faults: float  # the share of batched model calls that fail (each then re-runs its sequences one by one)
    requests: list[FuzzRequest] = field(default_factory=list)


def make_case(seed: int, hot_tokens: list[int], hot_texts: list[str]) -> FuzzCase:
    """One seed's configuration and workload. hot_tokens / hot_texts: tokens the tiny model emits often, and
    pieces of their text, so that stop ids and stop strings really end some choices."""
    rng = random.Random(seed)
    kw, staged = _engine_kw(rng), rng.random() < 0.5
    faults = rng.choice([0.0, 0.0, 0.0, 0.0, 0.1, 0.3])
    # Per seed, how common the features are that make the engine land every step before scheduling the next
    # (penalties, min_tokens, constraints: engine.py): none at all in some seeds, so overlap really overlaps.
    host_rate = rng.choice([0.0, 0.0, 0.1, 0.3])
    bs, window = kw["block_size"], kw["max_model_len"]
    window = min(window or kw["kv_cache_tokens"], kw["kv_cache_tokens"] // bs * bs)  # SchedulerConfig.max_seq_len
    # Only where the window is short: max_tokens None runs a request until it is full.
    unlimited = 0.1 if window <= MAX_PROMPT + MAX_NEW else 0.0
    return FuzzCase(kw, staged, faults, _requests(rng, hot_tokens, hot_texts, host_rate, unlimited))


def resolve_stops(case: FuzzCase, seed: int, probe: Callable[[FuzzRequest], object],
                  decode: Callable[[list[int]], str]) -> None:
    """Give each request with a stop_plan stop ids and stop strings taken from what probe(request) (a
    RequestOutput: the request run alone without stop conditions; None if it is refused) generated: a token id
    that occurs in it, a piece of its text, maybe across tokens. decode: token ids -> text."""
    for i, req in enumerate(case.requests):
        n_ids, n_strs = req.stop_plan
        if not (n_ids or n_strs):
            continue
        rng = random.Random(seed * 7919 + i)
        free = replace(req.params, stop=[], stop_token_ids=[], include_stop_str=False)
        out = probe(replace(req, params=free))
        if out is None:
            continue
        tokens = [t for c in out.outputs for t in c.token_ids]
        texts = [c.text for c in out.outputs if c.text]
        ids = [rng.choice(tokens) for _ in range(n_ids)] if tokens else []
        stops = []
        for _ in range(n_strs if texts else 0):
            text = rng.choice(texts)
            start = rng.randrange(len(text))
            piece = text[start:start + rng.choice([1, 2, 3, 6])]
            # Sometimes a string that only ever begins to match: the checker holds text back that a finish by a
            # stop id or by length must still release.
            stops.append(piece + "\x01never" if rng.random() < 0.3 else piece)
        first = out.outputs[0].token_ids if out.outputs else []
        new = [j for j in range(1, len(first)) if first[j] not in first[:j]]
        if n_ids and n_strs and new and rng.random() < 0.5:
            # A stop id right when the checker holds back the text's last character: the held text is output.
            j = rng.choice(new)
            before = decode(first[:j])
            if before:
                ids[0], stops[0] = first[j], before[-1] + "\x01never"
        req.params = replace(req.params, stop_token_ids=req.params.stop_token_ids + ids,
                             stop=req.params.stop + stops)


def _engine_kw(rng: random.Random) -> dict:
    # block_size must be a power of two (EngineConfig refuses others), so the "odd" sizes are 4 and 8 here.
    block_size = rng.choice([4, 8, 16, 16, 32])
    # Small caches force preemption. In a quarter of the seeds the window is tight: a cache smaller than a
    # request's prompt + max_tokens caps its context (SchedulerConfig.max_seq_len), or max_model_len does; the
    # reference then has that window as its max_model_len, and prompts that do not fit are refused.
    least = -(-(MAX_PROMPT + MAX_NEW) // block_size) * block_size
    kv, window = rng.choice([least, least, least + 64, 2 * least, 512, 16384]), None
    if rng.random() < 0.25:
        kv = max(block_size, rng.choice([64, 128, kv]))
        window = rng.choice([None, 24, 64, 100, 160])
        if window is not None:
            kv = max(kv, -(-window // block_size) * block_size)  # (EngineConfig refuses a window the cache lacks)
    max_num_seqs = rng.choice([2, 4, 8, 32, 256])
    # Small budgets chunk prompts; the budget must cover one token per sequence (EngineConfig refuses less).
    max_batch_tokens = max(max_num_seqs, rng.choice([7, 16, 33, 64, 256, 2048]))
    return dict(block_size=block_size, kv_cache_tokens=kv, max_model_len=window, max_num_seqs=max_num_seqs,
                max_batch_tokens=max_batch_tokens, enable_prefix_caching=rng.random() < 0.7,
                overlap_scheduling=rng.random() < 0.7, stream_interval=rng.choice([1, 1, 1, 2, 5]),
                dtype="float32", device="cpu")


def _requests(rng: random.Random, hot_tokens: list[int], hot_texts: list[str], host_rate: float,
              unlimited: float) -> list[FuzzRequest]:
    def tokens(k: int) -> list[int]:
        return [rng.randrange(PLAIN_IDS) for _ in range(k)]

    bases = [tokens(rng.randrange(20, 130)) for _ in range(rng.randrange(1, 4))]  # shared prefixes
    # Whole blocks (at every block size) of the same tokens behind different prefixes, or repeated in one prompt:
    # the prefix cache must tell them apart by what precedes them, not only by their own tokens.
    segments = [tokens(32) for _ in range(3)] + [[rng.randrange(PLAIN_IDS)] * 32]
    last_arrival = rng.choice([0, 5, 20, 40])
    reqs = []
    for i in range(rng.randrange(12, 25)):
        kind = rng.random()
        if kind < 0.35:  # a shared prefix and its own tail (maybe none: the same prompt twice)
            base = rng.choice(bases)
            prompt = base + tokens(rng.randrange(0, MAX_PROMPT - len(base) + 1))
        elif kind < 0.45 and reqs:  # exactly an earlier request's prompt
            prompt = list(rng.choice(reqs).prompt)
        elif kind < 0.6:  # segments in some order, maybe behind a short head, maybe with a tail
            head = tokens(rng.choice([0, 0, 16, rng.randrange(1, 20)]))
            prompt = head + [t for _ in range(rng.randrange(1, 5)) for t in rng.choice(segments)]
            prompt = (prompt + tokens(rng.randrange(0, 9)))[:MAX_PROMPT]
        else:
            prompt = tokens(rng.choice([1, 2, rng.randrange(1, 40), rng.randrange(1, MAX_PROMPT + 1)]))
        if rng.random() < 0.05:  # a special token inside the prompt
            prompt[rng.randrange(len(prompt))] = rng.randrange(PLAIN_IDS, VOCAB)
        params, comparable = _params(rng, hot_tokens, hot_texts, host_rate, unlimited)
        n = params.n
        subsets = None
        if rng.random() < host_rate / 2:  # constrained decoding, its own subset per choice, maybe terminating
            subsets = []
            for _ in range(n):
                allowed = rng.sample(range(VOCAB), rng.randrange(2, 600)) + rng.sample(hot_tokens, 3)
                subsets.append((allowed, rng.choice([None, rng.choice(allowed)])))
        arrive = rng.randrange(last_arrival + 1)
        abort = arrive + rng.choice([0, 1, 2, rng.randrange(30)]) if rng.random() < 0.15 else None
        plan = (rng.choice([0, 0, 0, 1, 2]), rng.choice([0, 0, 0, 1, 2]))
        reqs.append(FuzzRequest(f"f{i}", prompt, params, arrive, abort, rng.random() < 0.2, subsets, comparable,
                                plan, rng.random() < 0.2))
    return reqs


def _params(rng: random.Random, hot_tokens: list[int], hot_texts: list[str], host_rate: float,
            unlimited: float) -> tuple[SamplingParams, bool]:
    kw: dict = dict(n=rng.choice([1, 1, 1, 2, 3]), max_tokens=rng.randrange(1, MAX_NEW + 1))
    if rng.random() < 0.03:
        kw["max_tokens"] = 0  # scoring only (with prompt logprobs below)
    elif rng.random() < unlimited:
        kw["max_tokens"] = None
    mode = rng.random()
    comparable = True
    if mode < 0.4:
        kw["temperature"] = 0.0
    else:
        kw["temperature"] = rng.choice([0.3, 0.7, 1.0, 1.5])
        if rng.random() < 0.5:
            kw["top_p"] = rng.choice([0.5, 0.9, 0.99])
        if rng.random() < 0.4:
            kw["top_k"] = rng.choice([1, 5, 50, 1500])
        if rng.random() < 0.3:
            kw["min_p"] = rng.choice([0.01, 0.1, 0.3])
        if mode < 0.9:
            kw["seed"] = rng.randrange(-5, 2**40)  # (negative seeds wrap: make_generator)
        else:
            comparable = False  # the default generator: tokens depend on the batch by design
    if rng.random() < host_rate:
        kw["repetition_penalty"] = rng.choice([0.5, 1.2, 2.0, 5.0])
    if rng.random() < host_rate:
        kw["presence_penalty"] = rng.choice([-2.0, 0.5, 2.0])
    if rng.random() < host_rate:
        kw["frequency_penalty"] = rng.choice([-1.0, 0.5, 2.0])
    if rng.random() < 0.15:
        kw["stop"] = [_stop_string(rng, hot_texts) for _ in range(rng.randrange(1, 3))]
        kw["include_stop_str"] = rng.random() < 0.3
    if rng.random() < 0.15:
        kw["stop_token_ids"] = rng.sample(hot_tokens, rng.randrange(1, 3))
    if rng.random() < host_rate and kw["max_tokens"]:
        kw["min_tokens"] = rng.randrange(0, min(kw["max_tokens"], 30) + 1)
    if rng.random() < 0.12:  # on tokens the model likes, so that the bias changes what it picks
        kw["logit_bias"] = {t: rng.choice([-100.0, -3.0, 2.0, 8.0]) for t in rng.sample(hot_tokens, 2)}
    if rng.random() < 0.3:
        kw["logprobs"] = rng.choice([0, 1, 3, 20])
    if rng.random() < 0.12 or kw["max_tokens"] == 0:
        kw["prompt_logprobs"] = rng.choice([0, 2])
    kw["ignore_eos"] = rng.random() < 0.5
    kw["skip_special_tokens"] = rng.random() < 0.8
    return SamplingParams(**kw), comparable


def _stop_string(rng: random.Random, hot_texts: list[str]) -> str:
    text = rng.choice(hot_texts)
    start = rng.randrange(len(text))
    s = text[start:start + rng.choice([1, 1, 2, 3])]
    return s if rng.random() < 0.8 else s + rng.choice(hot_texts)[:2]  # sometimes across two tokens' text
