"""Prompt logprobs where steps go wrong or requests end early: a batched step that fails (at launch or at its
sync) and is re-run one sequence at a time, an abort mid-prefill, n > 1 with max_tokens 0, and a small cache
that preempts recording sequences: values still match the float32 HF reference, each request's prompt logprobs
come before (or with) its first tokens, and nothing is left recorded."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import GlmForCausalLM as HFGlm

from glm_serve.llm import LLM
from glm_serve.sampling_params import SamplingParams

GREEDY = dict(temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def ref(tiny_hf):
    return HFGlm.from_pretrained(tiny_hf, dtype=torch.float32).eval()


def _prompts(lengths, seed):
    rng = random.Random(seed)
    return [[rng.randrange(0, 2000) for _ in range(n)] for n in lengths]


def _check(entries, ids, ref) -> None:
    with torch.inference_mode():
        want = ref(torch.tensor([ids])).logits[0, :-1].float().log_softmax(-1)  # [P - 1, V]
    assert entries is not None and len(entries) == len(ids) and entries[0] is None
    for i in range(1, len(ids)):
        assert entries[i].token_id == ids[i]
        assert entries[i].logprob == pytest.approx(want[i - 1, ids[i]].item(), abs=1e-4), f"position {i}"


def _nothing_left(engine) -> None:
    assert not engine.requests and not engine._prompt_lp._records and not engine._prompt_lp.wanted
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


@pytest.mark.parametrize("where", ["launch", "sync"])
def test_a_failed_batch_re_run_one_by_one_scores_every_prompt_token(tiny_hf, ref, where):
    """Batched steps holding prompt rows of several sequences fail; the one-by-one re-run plans and lands each
    sequence's rows again (the failed step's are dropped with it), beside a request that records nothing."""
    llm = LLM(str(tiny_hf), kv_cache_tokens=4096, max_batch_tokens=40, max_num_seqs=8)
    e = llm.engine
    failures = []
    real = e._forward if where == "launch" else e._read

    def several(ids) -> bool:
        return len(set(ids)) > 1 and len(failures) < 3

    def forward(out, inflight=None):
        if several(s.seq.seq_id for s in out.scheduled) and any(s.seq.seq_id in e._prompt_lp.wanted
                                                                   for s in out.scheduled):
            failures.append(out)
            raise RuntimeError("injected")
        return real(out, inflight)

    def read(seq_ids, res, host, prompt=None):
        if prompt is not None and several([*seq_ids, *prompt.seq_ids]):
            failures.append(prompt)
            raise RuntimeError("injected")
        return real(seq_ids, res, host, prompt)

    if where == "launch":
        e._forward = forward
    else:
        e._read = read
    prompts = _prompts([30, 25, 12, 50, 7], seed=3)
    params = [SamplingParams(max_tokens=4, prompt_logprobs=None if i == 2 else 1, n=2 if i == 1 else 1, **GREEDY)
              for i in range(len(prompts))]
    results = llm.generate(prompts, params, use_tqdm=False)
    assert failures  # (at most 3: later steps run batched)
    for i, (ids, r) in enumerate(zip(prompts, results)):
        assert all(c.error is None and len(c.token_ids) == 4 for c in r.choices)
        if i != 2:
            _check(r.prompt_logprobs, ids, ref)
    _nothing_left(e)


def test_an_abort_mid_prefill_forgets_the_record(tiny_hf):
    llm = LLM(str(tiny_hf), kv_cache_tokens=4096, max_batch_tokens=16, max_num_seqs=8)
    e = llm.engine
    e.add_request("a", _prompts([70], seed=2)[0], SamplingParams(max_tokens=3, prompt_logprobs=1, **GREEDY))
    e.step()
    e.step()  # two 16-token chunks in, one of them still in flight
    assert e._prompt_lp._records
    out = e.abort_request("a")
    assert out.finished and out.prompt_logprobs is None and out.outputs[0].finish_reason == "abort"
    while e._inflight is not None:
        assert e.step() == []
    _nothing_left(e)


@pytest.mark.parametrize("caching", [True, False])
def test_n_siblings_with_max_tokens_0(tiny_hf, ref, caching):
    """n = 3 and max_tokens 0, chunked: every choice ends "length" with no tokens, the one record serves all."""
    llm = LLM(str(tiny_hf), kv_cache_tokens=4096, max_batch_tokens=24, max_num_seqs=8,
              enable_prefix_caching=caching)
    prompts = _prompts([70, 5, 33], seed=1)
    results = llm.generate(prompts, SamplingParams(n=3, max_tokens=0, prompt_logprobs=1, **GREEDY), use_tqdm=False)
    for ids, r in zip(prompts, results):
        assert [(c.error, c.finish_reason, c.token_ids) for c in r.choices] == [(None, "length", [])] * 3
        _check(r.prompt_logprobs, ids, ref)
    _nothing_left(llm.engine)


@pytest.mark.parametrize("caching, interval", [(True, 1), (False, 3)])
def test_prompt_logprobs_come_first_under_preemption(tiny_hf, ref, caching, interval):
    """A cache too small for everyone (preemptions mid-prompt and after), n = 2 siblings, with and without
    prefix caching and stream_interval: each request's prompt logprobs go out once, in or before its first
    output with tokens (the API echoes them ahead of any choice's text)."""
    llm = LLM(str(tiny_hf), kv_cache_tokens=256, max_batch_tokens=32, max_num_seqs=8, block_size=16,
              enable_prefix_caching=caching, stream_interval=interval)
    e = llm.engine
    prompts = _prompts([60, 45, 70, 33, 52, 66], seed=5)
    for i, ids in enumerate(prompts):
        e.add_request(str(i), ids, SamplingParams(n=2 if i % 2 else 1, max_tokens=30, prompt_logprobs=1, **GREEDY))
    got = {}
    for _ in range(5000):
        if not e.has_unfinished():
            break
        for o in e.step():
            if o.prompt_logprobs is not None:
                assert o.request_id not in got
                got[o.request_id] = o.prompt_logprobs
            if o.finished or any(c.token_ids for c in o.outputs):
                assert o.request_id in got
    assert e.scheduler.num_preemptions > 0 and not e.has_unfinished()
    for i, ids in enumerate(prompts):
        _check(got[str(i)], ids, ref)
    _nothing_left(e)
