"""Owns the batched sampler: per-step inputs (`SamplingBatch`), `Sampler` and its `SamplerOutput`.

One call handles every row sampled in a step. Stages run in this order, each skipped when no row uses it:

    raw logits ──log_softmax──> reported logprobs (the model's own distribution, see below)
        │
        ├─ token bitmask   constrained decoding: disallowed tokens -> -inf, before anything else
        ├─ logit bias      per-request additive bias on chosen token ids (OpenAI's logit_bias)
        ├─ penalties       repetition (prompt + output tokens), presence / frequency (output counts)
        ├─ min_tokens      the row's stop ids -> -inf while it has fewer than min_tokens outputs
        ├─────────────────> argmax = the token of greedy rows (temperature 0 is a value, not a mode)
        └─ temperature -> top-k -> top-p -> min-p -> exponential race = the token of sampled rows

Logprobs are the log-softmax of the RAW logits (before mask, bias, penalties and temperature): they describe what
the model predicted, are comparable across requests whatever their settings, and match what HF
`output_scores`-style tooling and vLLM's default report. A masked token can therefore show a finite logprob.

Sampling is the exponential race: argmax_i p_i / E_i with E_i ~ Exp(1) i.i.d. picks token i with
probability p_i / sum(p), needs no normalisation and no cumsum, and lets a seeded row draw its V numbers from
its own generator, so it gets the same tokens whatever else shares the step. Nothing here reads a device
value on the host: every branch is decided from Python-side facts gathered when the batch is built.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from glm_serve.sampling_params import SamplingParams

# Above this k a full sort is cheaper than torch.topk's partial selection.
_TOPK_MAX = 1024


def make_generator(seed: int, device: torch.device | str) -> torch.Generator:
    """The per-request generator for `params.seed`; the engine keeps it in the request's state across steps."""
    generator = torch.Generator(device=device)
    generator.manual_seed(seed % 2**64)  # torch takes uint64; wrap negative or huge API seeds
    return generator


@dataclass
class SamplingRow:
    """One sampled row of a step, filled by the engine from the request's params and state."""

    params: SamplingParams
    prompt_ids: Sequence[int] = ()  # prompt tokens, read only when the repetition penalty is on
    output_ids: Sequence[int] = ()  # tokens generated so far (counts for penalties, length for min_tokens)
    stop_token_ids: Sequence[int] = ()  # the row's effective stop ids (checkpoint's + params'), for min_tokens
    generator: torch.Generator | None = None  # from make_generator, required when params.seed is set


@dataclass
class SamplingBatch:
    """Everything the sampler needs for one step. Built by `SamplingBatch.build` (the engine, once per step).

    N = rows, V = vocab size, P = rows using penalties, M = blocked (row, stop id) pairs, B = biased (row, token
    id) pairs.
    """

    num_rows: int  # N
    vocab_size: int  # V, the logits' last dimension
    all_greedy: bool  # every row has temperature 0: tokens are the argmax of the processed logits
    greedy_mask: torch.Tensor | None = None  # [N] bool, True on greedy rows; only when greedy and sampled mix
    temperature: torch.Tensor | None = None  # [N] float32, 1.0 on greedy rows; None when all greedy
    top_k: torch.Tensor | None = None  # [N] int64 in [0, V], 0 = off; None when no sampled row uses it
    max_top_k: int = 0  # max of top_k (host copy, picks topk vs sort without a device read)
    top_p: torch.Tensor | None = None  # [N] float32 in (0, 1], 1.0 = off; None when no sampled row uses it
    min_p: torch.Tensor | None = None  # [N] float32 in [0, 1], 0 = off; None when no sampled row uses it
    penalty_rows: torch.Tensor | None = None  # [P] int64 row indices; None when no row uses penalties
    output_counts: torch.Tensor | None = None  # [P, V] float32 occurrences of each token in the output
    prompt_mask: torch.Tensor | None = None  # [P, V] bool token occurs in the prompt; None if no repetition
    repetition_penalty: torch.Tensor | None = None  # [P] float32, 1.0 = off; None when all rows are off
    presence_penalty: torch.Tensor | None = None  # [P] float32; None when all rows are 0
    frequency_penalty: torch.Tensor | None = None  # [P] float32; None when all rows are 0
    min_tokens_block: torch.Tensor | None = None  # [2, M] int64 (row, token id) pairs forced to -inf
    bias_index: torch.Tensor | None = None  # [2, B] int64 (row, token id) pairs of the rows' logit_bias
    bias_values: torch.Tensor | None = None  # [B] float32 what is added to those logits
    token_bitmask: torch.Tensor | None = None  # [N, ceil(V/32)] int32, bit j of word w allows token 32w+j
    generators: list[torch.Generator | None] = field(default_factory=list)  # [N], set on seeded sampled rows
    seeded_rows: list[int] = field(default_factory=list)  # sampled rows drawing from their own generator
    any_unseeded: bool = False  # some sampled row draws from the default generator
    num_logprobs: int | None = None  # max requested top-k alternatives; None = no row wants logprobs

    @classmethod
    def build(cls, rows: Sequence[SamplingRow], vocab_size: int, device: torch.device | str,
              token_bitmask: torch.Tensor | None = None) -> SamplingBatch:
        """Gather the rows' params and state into device tensors (host -> device copies, no device reads)."""
        device = torch.device(device)
        n = len(rows)
        if n == 0:
            raise ValueError("rows must not be empty")
        host_bitmask = token_bitmask
        if token_bitmask is not None:
            words = (vocab_size + 31) // 32
            if token_bitmask.dtype != torch.int32 or tuple(token_bitmask.shape) != (n, words):
                raise ValueError(f"token_bitmask must be int32 of shape ({n}, {words}), got "
                                 f"{token_bitmask.dtype} {tuple(token_bitmask.shape)}")
            token_bitmask = _to(token_bitmask, device)
        params = [row.params for row in rows]
        greedy = [p.greedy for p in params]
        sampled = [i for i in range(n) if not greedy[i]]
        batch = cls(num_rows=n, vocab_size=vocab_size, all_greedy=not sampled, token_bitmask=token_bitmask,
                    generators=[None] * n)
        if sampled:
            batch._build_sampled(params, greedy, sampled, rows, device)
        batch._build_penalties(rows, device)
        batch._build_bias(params, device)
        block = []
        for i, row in enumerate(rows):
            if len(row.output_ids) >= row.params.min_tokens:
                continue
            stops = [t for t in dict.fromkeys(row.stop_token_ids) if 0 <= t < vocab_size]
            # A constraint that allows nothing but a stop id (a complete grammar) wins over min_tokens:
            # blocking them would leave no token at all (an all -inf row samples garbage).
            if stops and (host_bitmask is None or _allows_more_than(host_bitmask[i], stops, vocab_size)):
                block += [(i, t) for t in stops]
        if block:
            batch.min_tokens_block = _to(torch.tensor(block, dtype=torch.int64).T.contiguous(), device)
        wanted = [p.logprobs for p in params if p.logprobs is not None]
        batch.num_logprobs = min(max(wanted), vocab_size) if wanted else None
        return batch

    def _build_sampled(self, params: list[SamplingParams], greedy: list[bool], sampled: list[int],
                       rows: Sequence[SamplingRow], device: torch.device) -> None:
        if len(sampled) < self.num_rows:
            self.greedy_mask = _to(torch.tensor(greedy, dtype=torch.bool), device)
        self.temperature = _to(torch.tensor([1.0 if g else p.temperature for g, p in zip(greedy, params)],
                                            dtype=torch.float32), device)
        # Greedy rows never reach these stages' results, so they are written as "off".
        top_k = [0 if greedy[i] else min(p.top_k, self.vocab_size) for i, p in enumerate(params)]
        if any(top_k):
            self.top_k = _to(torch.tensor(top_k, dtype=torch.int64), device)
            self.max_top_k = max(top_k)
        top_p = [1.0 if greedy[i] else p.top_p for i, p in enumerate(params)]
        if any(p < 1.0 for p in top_p):
            self.top_p = _to(torch.tensor(top_p, dtype=torch.float32), device)
        min_p = [0.0 if greedy[i] else p.min_p for i, p in enumerate(params)]
        if any(min_p):
            self.min_p = _to(torch.tensor(min_p, dtype=torch.float32), device)
        for i in sampled:
            if params[i].seed is None:
                self.any_unseeded = True
                continue
            generator = rows[i].generator
            if generator is None:
                raise ValueError(f"rows[{i}].generator is required when params.seed is set "
                                 "(make it once per request with make_generator)")
            if generator.device.type != device.type:
                raise ValueError(f"rows[{i}].generator is on {generator.device}, the batch on {device}")
            self.generators[i] = generator
            self.seeded_rows.append(i)

    def _build_bias(self, params: list[SamplingParams], device: torch.device) -> None:
        pairs = [(i, t, b) for i, p in enumerate(params) if p.logit_bias for t, b in p.logit_bias.items()]
        if not pairs:
            return
        bad = next((t for _, t, _ in pairs if not 0 <= t < self.vocab_size), None)
        if bad is not None:  # on CUDA an index past the logits is a device-side assert, fatal to the process
            raise ValueError(f"logit_bias token id {bad} is outside the logits [0, {self.vocab_size})")
        index = torch.tensor([(i, t) for i, t, _ in pairs], dtype=torch.int64).T.contiguous()  # [2, B]
        self.bias_index = _to(index, device)
        self.bias_values = _to(_floats([b for _, _, b in pairs]), device)

    def _build_penalties(self, rows: Sequence[SamplingRow], device: torch.device) -> None:
        chosen = [i for i, row in enumerate(rows) if row.params.uses_penalties]
        if not chosen:
            return
        params = [rows[i].params for i in chosen]
        self.penalty_rows = _to(torch.tensor(chosen, dtype=torch.int64), device)
        self.output_counts = _count_tokens([rows[i].output_ids for i in chosen], self.vocab_size, device)
        if any(p.repetition_penalty != 1.0 for p in params):
            self.repetition_penalty = _to(_floats([p.repetition_penalty for p in params]), device)
            self.prompt_mask = _count_tokens([rows[i].prompt_ids for i in chosen], self.vocab_size,
                                             device) > 0
        if any(p.presence_penalty != 0.0 for p in params):
            self.presence_penalty = _to(_floats([p.presence_penalty for p in params]), device)
        if any(p.frequency_penalty != 0.0 for p in params):
            self.frequency_penalty = _to(_floats([p.frequency_penalty for p in params]), device)


@dataclass
class SamplerOutput:
    """What the sampler hands back to the engine for one step."""

    token_ids: torch.Tensor  # [N] int64, the chosen tokens
    logprobs: torch.Tensor | None = None  # [N] float32 raw logprob of token_ids; None if no row asked
    top_ids: torch.Tensor | None = None  # [N, k] int64 most likely tokens, k = batch.num_logprobs (may be 0)
    top_logprobs: torch.Tensor | None = None  # [N, k] float32 their raw logprobs, descending


class HostCopy:
    """A SamplerOutput on its way to the host. On CUDA: non-blocking copies into pinned memory queued right
    behind the sampler, then an event, so `wait()` waits for this step's work only and not for a next step
    queued since (a plain `.tolist()` would wait for everything on the stream, and overlap scheduling with
    it). Elsewhere the tensors are already on the host."""

    def __init__(self, out: SamplerOutput) -> None:
        tensors = (out.token_ids, out.logprobs, out.top_ids, out.top_logprobs)
        self._event = None
        if out.token_ids.device.type != "cuda":
            self._host = tensors
            return
        self._host = tuple(None if t is None else
                           torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True)
                           for t in tensors)
        self._event = torch.cuda.Event()
        self._event.record()

    def wait(self) -> SamplerOutput:
        if self._event is not None:
            self._event.synchronize()
        return SamplerOutput(*self._host)


class Sampler:
    """Turns one step's logits into tokens. Stateless: per-request state lives in SamplingRow / generators."""

    @torch.no_grad()
    def __call__(self, logits: torch.Tensor, batch: SamplingBatch) -> SamplerOutput:
        """logits: [N, V] float32, consumed (modified in place). Returns the chosen tokens and logprobs."""
        _check_logits(logits, batch)
        logits = logits.float()  # no copy when already float32
        raw_logprobs = logits.log_softmax(-1) if batch.num_logprobs is not None else None  # [N, V]
        self.process(logits, batch)
        if batch.all_greedy:
            token_ids = logits.argmax(-1)
        else:
            greedy_ids = logits.argmax(-1) if batch.greedy_mask is not None else None
            token_ids = self._sample(logits, batch)
            if greedy_ids is not None:
                token_ids = torch.where(batch.greedy_mask, greedy_ids, token_ids)
        return _with_logprobs(token_ids, raw_logprobs, batch.num_logprobs)

    @torch.no_grad()
    def process(self, logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        """Bitmask, logit bias, penalties and min_tokens, in place on [N, V] float32 logits; the greedy token is
        the argmax.

        Runs nothing when no row uses these stages (the all-greedy step then costs one argmax).
        """
        _check_logits(logits, batch)
        if batch.token_bitmask is not None:
            logits.masked_fill_(~unpack_bitmask(batch.token_bitmask, batch.vocab_size), float("-inf"))
        if batch.bias_index is not None:  # (a masked token stays -inf: -inf + bias)
            logits.index_put_((batch.bias_index[0], batch.bias_index[1]), batch.bias_values, accumulate=True)
        if batch.penalty_rows is not None:
            _apply_penalties(logits, batch)
        if batch.min_tokens_block is not None:
            # A device-side -inf: `logits[r, c] = float("-inf")` makes it on the host and copies it with a
            # blocking copy on CUDA (the host would wait for the step).
            rows, ids = batch.min_tokens_block
            logits.index_put_((rows, ids), logits.new_full((), float("-inf")))
        return logits

    def _sample(self, logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        logits.div_(batch.temperature.unsqueeze(1))
        if batch.top_k is not None or batch.top_p is not None:
            _apply_top_k_top_p(logits, batch.top_k, batch.max_top_k, batch.top_p)
        probs = logits.softmax(-1)  # [N, V]
        if batch.min_p is not None:
            # The most likely token survives top-k / top-p, so the threshold is unaffected by renormalising.
            threshold = probs.amax(-1, keepdim=True) * batch.min_p.unsqueeze(1)
            probs.masked_fill_(probs < threshold, 0.0)
        noise = torch.empty_like(probs)  # [N, V] Exp(1) draws
        if batch.any_unseeded:
            noise.exponential_()  # one draw for all unseeded rows; seeded rows are overwritten below
        else:
            noise.fill_(1.0)  # greedy rows' results are discarded; keep them finite
        for i in batch.seeded_rows:
            noise[i].exponential_(generator=batch.generators[i])
        # exponential_ can return exactly 0 on some backends; 0/0 would be NaN and win the argmax.
        noise.clamp_(min=torch.finfo(noise.dtype).tiny)
        return probs.div_(noise).argmax(-1)


def _check_logits(logits: torch.Tensor, batch: SamplingBatch) -> None:
    if logits.dim() != 2 or tuple(logits.shape) != (batch.num_rows, batch.vocab_size):
        raise ValueError(f"logits must be [{batch.num_rows}, {batch.vocab_size}], got {tuple(logits.shape)}")
    if not logits.is_floating_point():
        raise ValueError(f"logits must be floating point, got {logits.dtype}")


def unpack_bitmask(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """xgrammar bitmask [N, ceil(V/32)] int32 -> allowed [N, V] bool (bit j of word w is token 32w+j)."""
    shifts = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    bits = (bitmask.unsqueeze(-1) >> shifts) & 1  # [N, W, 32]; arithmetic shift is fine: only bit 0 is read
    return bits.view(bitmask.shape[0], -1)[:, :vocab_size].bool()


def _allows_more_than(row_bitmask: torch.Tensor, ids: list[int], vocab_size: int) -> bool:
    """Whether one host bitmask row [ceil(V/32)] int32 allows some token outside `ids`: the row's words with
    the bits of `ids` (and those past the vocabulary) cleared, any left. O(V/32), no unpacking."""
    words = row_bitmask.cpu().to(torch.int64) & 0xFFFFFFFF  # [W] the 32 bits of each word, unsigned
    for t in ids:
        words[t // 32] &= ~(1 << (t % 32))
    if vocab_size % 32:
        words[-1] &= (1 << (vocab_size % 32)) - 1
    return bool(words.any())


def _apply_penalties(logits: torch.Tensor, batch: SamplingBatch) -> None:
    rows = batch.penalty_rows
    sub = logits.index_select(0, rows)  # [P, V]
    counts = batch.output_counts  # [P, V]
    if batch.repetition_penalty is not None:
        seen = batch.prompt_mask | (counts > 0)
        penalty = batch.repetition_penalty.unsqueeze(1)
        # Dividing a negative logit would raise it: the CTRL rule divides positives and multiplies negatives.
        sub = torch.where(seen, torch.where(sub > 0, sub / penalty, sub * penalty), sub)
    if batch.frequency_penalty is not None:
        sub = sub - batch.frequency_penalty.unsqueeze(1) * counts
    if batch.presence_penalty is not None:
        sub = sub - batch.presence_penalty.unsqueeze(1) * (counts > 0).float()
    logits.index_copy_(0, rows, sub)


def _apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor | None, max_top_k: int,
                       top_p: torch.Tensor | None) -> None:
    """Set to -inf, in place, what top-k then top-p drop. Ties with the k-th logit are kept."""
    neg_inf = float("-inf")
    if top_p is None and max_top_k <= _TOPK_MAX:
        values = logits.topk(max_top_k, dim=-1).values  # [N, max_k] descending
        kth = values.gather(1, (top_k - 1).clamp(min=0, max=max_top_k - 1).unsqueeze(1))  # [N, 1]
        kth.masked_fill_(top_k.unsqueeze(1) == 0, neg_inf)  # rows with top-k off keep everything
        logits.masked_fill_(logits < kth, neg_inf)
        return
    values, order = logits.sort(dim=-1, descending=True)  # [N, V]
    if top_k is not None:
        kth = values.gather(1, (top_k - 1).clamp(min=0).unsqueeze(1))  # [N, 1]
        kth.masked_fill_(top_k.unsqueeze(1) == 0, neg_inf)
        values.masked_fill_(values < kth, neg_inf)
    if top_p is not None:
        probs = values.softmax(-1)  # [N, V] renormalised over what top-k kept
        mass_before = probs.cumsum(-1) - probs  # exactly 0 for the first token, so it is always kept
        # Keep the shortest prefix reaching top_p; rows at 1.0 skip it (cumsum rounding could clip tails).
        drop = (mass_before >= top_p.unsqueeze(1)) & (top_p < 1.0).unsqueeze(1)
        values.masked_fill_(drop, neg_inf)
    logits.scatter_(1, order, values)


def _with_logprobs(token_ids: torch.Tensor, raw: torch.Tensor | None, k: int | None) -> SamplerOutput:
    if raw is None:
        return SamplerOutput(token_ids=token_ids)
    chosen = raw.gather(1, token_ids.unsqueeze(1)).squeeze(1)  # [N]
    top_logprobs, top_ids = raw.topk(k, dim=-1)  # [N, k], k may be 0
    return SamplerOutput(token_ids=token_ids, logprobs=chosen, top_ids=top_ids, top_logprobs=top_logprobs)


def _count_tokens(id_lists: list[Sequence[int]], vocab_size: int, device: torch.device) -> torch.Tensor:
    """[P, V] float32 occurrence counts: one flat scatter_add over row * V + id, built on the host."""
    counts = torch.zeros(len(id_lists), vocab_size, dtype=torch.float32, device=device)
    ids = [torch.as_tensor(x, dtype=torch.int64).reshape(-1).cpu() for x in id_lists]
    lengths = torch.tensor([len(x) for x in ids], dtype=torch.int64)
    flat = torch.cat(ids)  # [sum of lengths]
    if flat.numel() == 0:
        return counts
    if int(flat.min()) < 0 or int(flat.max()) >= vocab_size:  # host tensor: no device read
        raise ValueError(f"token ids must be in [0, {vocab_size}), got {int(flat.min())}..{int(flat.max())}")
    flat += torch.repeat_interleave(torch.arange(len(ids), dtype=torch.int64) * vocab_size, lengths)
    flat = _to(flat, device)
    counts.view(-1).scatter_add_(0, flat, torch.ones(flat.numel(), dtype=torch.float32, device=device))
    return counts


def _floats(values: list[float]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def _to(tensor: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    # Through pinned memory: a copy from pageable memory may make the host wait for the stream (the step
    # still running, with overlap scheduling). The caching host allocator keeps it alive until the copy ran.
    if torch.device(device).type == "cuda":
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)
