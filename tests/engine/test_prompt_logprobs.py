"""Prompt logprobs (SamplingParams.prompt_logprobs) against the float32 HF transformers reference: odd prompt
lengths, chunked prefill, prefix caching, preemption and recompute, max_tokens 0, n > 1, mixed batches whose
ordinary requests keep their greedy tokens, and a runner that does no extra work when nobody asks."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import GlmForCausalLM as HFGlm

from glm_serve.engine import prompt_logprobs as plp
from glm_serve.engine.outputs import RequestState, TokenLogprob
from glm_serve.engine.prompt_logprobs import PromptLogprobRecorder, PromptRows
from glm_serve.engine.sampler import HostCopy, SamplerOutput
from glm_serve.engine.scheduler import Scheduler
from glm_serve.engine.sequence import Sequence
from glm_serve.llm import LLM
from glm_serve.model.simple import generate_simple
from glm_serve.sampling_params import SamplingParams

GREEDY = dict(temperature=0.0, ignore_eos=True)
TOL = 1e-4  # float32 engine vs float32 reference: only summation order differs


@pytest.fixture(scope="module")
def ref(tiny_hf):
    return HFGlm.from_pretrained(tiny_hf, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def chunked(tiny_hf):
    """Prefill in chunks of at most 24 tokens: a 70-token prompt takes 3 steps."""
    return LLM(str(tiny_hf), kv_cache_tokens=4096, max_batch_tokens=24, max_num_seqs=8)


def _prompts(lengths, seed):
    rng = random.Random(seed)
    return [[rng.randrange(0, 2000) for _ in range(n)] for n in lengths]


def _reference(ref, ids: list[int]) -> torch.Tensor:
    """[len(ids) - 1, V] float32: row i - 1 is the log-distribution of token i given ids[:i]."""
    with torch.inference_mode():
        return ref(torch.tensor([ids])).logits[0, :-1].float().log_softmax(-1)


def _check(entries: list[TokenLogprob | None], ids: list[int], want: torch.Tensor, k: int) -> float:
    """Entries aligned with the prompt, each against the reference (value, and top-k values and ids)."""
    assert entries is not None and len(entries) == len(ids) and entries[0] is None
    for i in range(1, len(ids)):
        e, row = entries[i], want[i - 1]
        assert e.token_id == ids[i]
        assert e.logprob == pytest.approx(row[ids[i]].item(), abs=TOL), f"position {i}"
        assert len(e.top) == k
        top_values, _ = row.topk(k)
        assert [v for _, v in e.top] == pytest.approx(top_values.tolist(), abs=TOL)
        assert [v for _, v in e.top] == pytest.approx([row[t].item() for t, _ in e.top], abs=TOL)  # ids agree
    return sum(e.logprob for e in entries[1:])


def test_match_reference_odd_lengths_chunked(chunked, ref):
    prompts = _prompts([1, 2, 7, 23, 24, 25, 33, 70], seed=1)
    results = chunked.generate(prompts, SamplingParams(max_tokens=3, prompt_logprobs=3, **GREEDY), use_tqdm=False)
    for ids, r in zip(prompts, results):
        assert r.choices[0].error is None
        _check(r.prompt_logprobs, ids, _reference(ref, ids), 3)
        assert r.token_ids == generate_simple(chunked.engine.model, ids, 3)


def test_k0_max_tokens0_and_overlap_off(tiny_hf, ref):
    """prompt_logprobs=0: the token's logprob only. max_tokens 0: the prompt is computed, nothing sampled,
    finish "length" (with and without overlap scheduling, chunked, a plain max_tokens 0 request beside)."""
    prompts = _prompts([5, 40, 61], seed=2)
    for overlap in (True, False):
        llm = LLM(str(tiny_hf), kv_cache_tokens=4096, max_batch_tokens=16, max_num_seqs=4,
                  overlap_scheduling=overlap)
        params = [SamplingParams(max_tokens=0, prompt_logprobs=0, **GREEDY)] * 3 + [SamplingParams(max_tokens=0)]
        results = llm.generate(prompts + [prompts[1]], params, use_tqdm=False)
        for ids, r in zip(prompts, results):
            assert r.token_ids == [] and r.choices[0].finish_reason == "length" and r.choices[0].error is None
            assert r.usage["completion_tokens"] == 0
            _check(r.prompt_logprobs, ids, _reference(ref, ids), 0)
        assert results[3].token_ids == [] and results[3].prompt_logprobs is None
        bm = llm.engine.block_manager
        assert bm.num_free_blocks == bm.num_blocks and not llm.engine.requests
        assert not llm.engine._prompt_lp.wanted and not llm.engine._prompt_lp._records


def test_prefix_cache_second_identical_prompt_still_full(tiny_hf, ref):
    """A request that wants prompt logprobs takes no prefix-cache hit (it needs every position's logits) but
    registers its blocks: a later ordinary request with the same prompt hits them."""
    llm = LLM(str(tiny_hf), kv_cache_tokens=4096, max_batch_tokens=64, max_num_seqs=8)
    ids = _prompts([100], seed=3)[0]
    want = _reference(ref, ids)
    sp = SamplingParams(max_tokens=2, prompt_logprobs=1, **GREEDY)
    first = llm.generate([ids], sp, use_tqdm=False)[0]
    second = llm.generate([ids], sp, use_tqdm=False)[0]
    assert second.usage["cached_tokens"] == 0
    assert _check(first.prompt_logprobs, ids, want, 1) == pytest.approx(_check(second.prompt_logprobs, ids, want, 1))
    plain = llm.generate([ids], SamplingParams(max_tokens=2, **GREEDY), use_tqdm=False)[0]
    assert plain.usage["cached_tokens"] == 96 and plain.token_ids == first.token_ids


def test_mixed_batch_keeps_greedy_tokens_and_n_siblings(chunked, ref):
    """Ordinary requests batched with prompt-logprob ones (and n = 3 siblings sharing one record) keep the
    tokens they get alone; the sampled tokens' own logprobs are unaffected."""
    prompts = _prompts([9, 50, 17, 31, 64, 3], seed=4)
    params = [SamplingParams(max_tokens=6, prompt_logprobs=2 if i % 2 else None, logprobs=1 if i == 2 else None,
                             n=3 if i == 3 else 1, **GREEDY) for i in range(len(prompts))]
    results = chunked.generate(prompts, params, use_tqdm=False)
    for i, (ids, r) in enumerate(zip(prompts, results)):
        solo = generate_simple(chunked.engine.model, ids, 6)
        assert [c.token_ids for c in r.choices] == [solo] * params[i].n
        if i % 2:
            _check(r.prompt_logprobs, ids, _reference(ref, ids), 2)
        else:
            assert r.prompt_logprobs is None
    assert len(results[2].choices[0].logprobs) == 6


def test_preemption_and_recompute_lose_and_repeat_nothing(tiny_hf, ref, monkeypatch):
    """A cache too small for everyone: sequences are preempted mid-prompt and after, and recomputed. Each
    position is recorded once (a recompute's rows are ignored where already set) and none is missing."""
    llm = LLM(str(tiny_hf), kv_cache_tokens=256, max_batch_tokens=32, max_num_seqs=8, block_size=16)
    stored, mid_prompt = [], []
    land, preempt = PromptLogprobRecorder.land, Scheduler._preempt

    def spy(self, rows):
        stored.append(sum(rows.counts))
        return land(self, rows)

    def spy_preempt(self, seq, out):
        if seq.max_prefix_hit is not None:  # a recorder whose prompt is not fully scored yet
            mid_prompt.append(seq.seq_id)
        return preempt(self, seq, out)

    monkeypatch.setattr(PromptLogprobRecorder, "land", spy)
    monkeypatch.setattr(Scheduler, "_preempt", spy_preempt)
    prompts = _prompts([60, 45, 70, 33, 52, 66], seed=5)
    results = llm.generate(prompts, SamplingParams(max_tokens=40, prompt_logprobs=1, **GREEDY), use_tqdm=False)
    assert llm.engine.scheduler.num_preemptions > 0
    for ids, r in zip(prompts, results):
        assert r.choices[0].error is None
        _check(r.prompt_logprobs, ids, _reference(ref, ids), 1)
        assert r.token_ids == generate_simple(llm.engine.model, ids, 40)
    assert mid_prompt  # preempted while recording, so positions were computed again
    assert sum(stored) > sum(len(p) - 1 for p in prompts)  # ... and those repeats were stored once
    bm = llm.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks and not llm.engine._prompt_lp._records


def test_recorder_limits_prefix_hits_to_what_it_scored():
    """After a partial record (a preemption mid-prompt), a recompute may take cached blocks only up to the
    positions already scored; duplicates of scored positions change nothing; complete -> no limit, dropped."""
    seq = Sequence(7, "r", list(range(100, 140)), SamplingParams())
    req = RequestState("r", SamplingParams(prompt_logprobs=1), 40)
    rec = PromptLogprobRecorder()
    rec.add(req, seq, 1)
    assert seq.max_prefix_hit == 0 and rec.wanted == {7: 1}

    def rows(first: int, count: int, value: float) -> PromptRows:
        targets = torch.tensor(seq.prompt_token_ids[first:first + count])
        lp = torch.full((count,), value)
        res = SamplerOutput(targets, lp, targets[:, None], lp[:, None])
        return PromptRows([7], [first], [count], torch.arange(count), targets, 1, HostCopy(res))

    rec.land(rows(1, 20, -1.0))
    assert seq.max_prefix_hit == 20 and req.prompt_logprobs is None  # tokens 1..20 scored: positions 0..19
    rec.land(rows(1, 25, -2.0))
    assert seq.max_prefix_hit == 25  # a recompute: tokens 1..20 keep their first values
    rec.land(rows(26, 14, -3.0))
    assert seq.max_prefix_hit is None and not rec.wanted and not rec._records
    entries = req.prompt_logprobs
    assert entries[0] is None and [e.logprob for e in entries[1:]] == [-1.0] * 20 + [-2.0] * 5 + [-3.0] * 14
    assert [e.token_id for e in entries[1:]] == seq.prompt_token_ids[1:]
    one = RequestState("s", SamplingParams(prompt_logprobs=2), 1)
    rec.add(one, Sequence(8, "s", [5], SamplingParams()), 2)
    assert one.prompt_logprobs == [None] and not rec._records  # one token: nothing to score


def test_slices_bound_the_logits(chunked, ref, monkeypatch):
    """The prompt rows' logits are made SLICE_ROWS rows at a time, whatever the chunk's length."""
    monkeypatch.setattr(plp, "SLICE_ROWS", 8)
    model = chunked.engine.model
    sizes = []
    real = type(model).compute_logits

    def spy(self, hidden):
        sizes.append(hidden.shape[0])
        return real(self, hidden)

    monkeypatch.setattr(type(model), "compute_logits", spy)
    ids = _prompts([50], seed=6)[0]
    r = chunked.generate([ids], SamplingParams(max_tokens=1, prompt_logprobs=2, **GREEDY), use_tqdm=False)[0]
    _check(r.prompt_logprobs, ids, _reference(ref, ids), 2)
    assert max(sizes) == 8 and sum(sizes) == 49 + 1  # 49 prompt rows in slices of <= 8, one sampled row


def test_ordinary_steps_unchanged(chunked, monkeypatch):
    """No request wants prompt logprobs: no prompt rows planned, logits only for the sampled rows."""
    engine = chunked.engine
    model = engine.model
    batches, sizes = [], []
    prepare, real = engine.runner.prepare, type(model).compute_logits

    def spy_prepare(*a, **k):
        batch = prepare(*a, **k)
        batches.append(batch)
        return batch

    def spy_logits(self, hidden):
        sizes.append(hidden.shape[0])
        return real(self, hidden)

    monkeypatch.setattr(engine.runner, "prepare", spy_prepare)
    monkeypatch.setattr(type(model), "compute_logits", spy_logits)
    chunked.generate(_prompts([40, 7, 30], seed=7), SamplingParams(max_tokens=4, **GREEDY), use_tqdm=False)
    assert batches and all(b.prompt_rows is None for b in batches)
    assert sizes == [len(b.sample_seq_ids) for b in batches]


@pytest.mark.parametrize("value", [-1, 21, 1.5, True])
def test_params_validation(value):
    """Bounded like `logprobs` (0..MAX_LOGPROBS); max_tokens 0 is a value now (score, sample nothing)."""
    with pytest.raises(ValueError, match="prompt_logprobs"):
        SamplingParams(prompt_logprobs=value)
    assert SamplingParams(prompt_logprobs=20).prompt_logprobs == 20
    assert SamplingParams(max_tokens=0).max_tokens == 0


def test_one_token_chunks_beside_decodes_skip_the_decode_graph(tiny_hf, ref):
    """Seven decoding sequences and a budget of 8 tokens: the recorder's prompt comes one token a step, so
    every step looks decode-only. The (padded, CPU-eager) decode-graph path computes no prompt rows: such a
    step must run eagerly, and the prompt logprobs come out whole."""
    pytest.importorskip("triton")
    llm = LLM(str(tiny_hf), kv_cache_tokens=2048, max_num_seqs=8, max_batch_tokens=8, attention_backend="triton",
              cuda_graphs=True)
    ordinary = _prompts([1] * 7, seed=8)
    ids = _prompts([12], seed=9)[0]
    params = [SamplingParams(max_tokens=16, **GREEDY)] * 7 + [SamplingParams(max_tokens=2, prompt_logprobs=1,
                                                                             **GREEDY)]
    used = []
    run = llm.engine.runner.graphs.run

    def spy(*args):
        out = run(*args)
        used.append(out is not None)
        return out

    llm.engine.runner.graphs.run = spy
    results = llm.generate(ordinary + [ids], params, use_tqdm=False)
    assert all(r.choices[0].error is None for r in results)
    _check(results[-1].prompt_logprobs, ids, _reference(ref, ids), 1)
    assert any(used)  # the graph path did run, for the steps without prompt rows


def test_a_prompt_filling_the_window_is_scored_with_max_tokens_0(tiny_hf, ref):
    """max_tokens 0 needs no room for a generated token: a prompt of exactly max_model_len tokens is scored
    (chunked, beside a request that decodes), where one that also generates is refused as too long."""
    llm = LLM(str(tiny_hf), kv_cache_tokens=1024, max_model_len=48, max_batch_tokens=16, max_num_seqs=4)
    ids, other = _prompts([48, 9], seed=5)
    results = llm.generate([ids, other], [SamplingParams(max_tokens=0, prompt_logprobs=1, **GREEDY),
                                          SamplingParams(max_tokens=30, **GREEDY)], use_tqdm=False)
    assert results[0].choices[0].finish_reason == "length" and results[0].token_ids == []
    _check(results[0].prompt_logprobs, ids, _reference(ref, ids), 1)
    assert results[1].token_ids == generate_simple(llm.engine.model, other, 30)
    with pytest.raises(ValueError, match="context window of 48"):
        llm.generate([ids], SamplingParams(max_tokens=1, **GREEDY), use_tqdm=False)
