"""logit_bias (OpenAI's per-request additive bias on token ids): the sampler against a plain reference, the
engine's batch invariance and vocabulary check, and logprobs that stay the model's own."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from glm_serve.engine.engine import SamplingParamError
from glm_serve.engine.sampler import Sampler, SamplingBatch, SamplingRow, make_generator
from glm_serve.llm import LLM
from glm_serve.model.simple import generate_simple
from glm_serve.sampling_params import SamplingParams

GREEDY = dict(temperature=0.0, ignore_eos=True)


def _bias(gen: np.random.Generator, vocab: int) -> dict[int, float] | None:
    k = int(gen.integers(0, 6))
    ids = gen.choice(vocab, size=min(k, vocab), replace=False)
    return {int(t): float(gen.uniform(-100, 100)) for t in ids} or None


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("vocab", [7, 300, 5000])
def test_bias_is_added_to_the_raw_logits_of_its_own_row(seed, vocab):
    """process() = logits + each row's bias (rows without one untouched); greedy rows take that argmax; a frequency
    penalty applies to the biased logit (bias first, as OpenAI adds it to the model's logits)."""
    gen = np.random.default_rng(seed * 1000 + vocab)
    params = [SamplingParams(temperature=float(gen.choice([0.0, 0.7])), logit_bias=_bias(gen, vocab))
              for _ in range(int(gen.integers(1, 7)))]
    params.append(SamplingParams(temperature=0.0, frequency_penalty=1.5, logit_bias={vocab - 1: 3.0}))
    rows = [SamplingRow(p, output_ids=[vocab - 1, vocab - 1] if p.uses_penalties else []) for p in params]
    logits = torch.randn(len(rows), vocab) * 4
    want = logits.clone().double()
    for i, p in enumerate(params):
        for t, b in (p.logit_bias or {}).items():
            want[i, t] += b
    want[-1, vocab - 1] -= 1.5 * 2  # two occurrences, after the bias
    batch = SamplingBatch.build(rows, vocab, "cpu")
    got = Sampler().process(logits.clone(), batch)
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-4)
    out = Sampler()(logits.clone(), batch)
    greedy = [i for i, p in enumerate(params) if p.greedy]
    assert out.token_ids[greedy].tolist() == want[greedy].argmax(-1).tolist()


def test_plus_100_picks_the_token_and_minus_100_bans_it_in_sampled_rows():
    vocab = 1000
    logits = torch.randn(64, vocab)
    logits[:, 3] = 20.0  # the model's favourite by far
    forced = [SamplingRow(SamplingParams(temperature=1.0, logit_bias={17: 100.0}, seed=s),
                          generator=make_generator(s, "cpu")) for s in range(32)]
    banned = [SamplingRow(SamplingParams(temperature=1.0, logit_bias={3: -100.0}, seed=s),
                          generator=make_generator(s, "cpu")) for s in range(32)]
    tokens = Sampler()(logits, SamplingBatch.build(forced + banned, vocab, "cpu")).token_ids
    assert tokens[:32].tolist() == [17] * 32 and 3 not in tokens[32:].tolist()


def test_bias_validation():
    assert SamplingParams(logit_bias={}).logit_bias is None
    assert SamplingParams(logit_bias={5: 1}).logit_bias == {5: 1.0}
    for bad, field in [({"5": 1}, "logit_bias key"), ({-1: 1}, "logit_bias key"), ({5: 100.5}, r"logit_bias\[5\]"),
                       ({5: float("nan")}, r"logit_bias\[5\]"), ({5: "x"}, r"logit_bias\[5\]"), ([5], "logit_bias")]:
        with pytest.raises(ValueError, match=field):
            SamplingParams(logit_bias=bad)
    with pytest.raises(ValueError, match="outside the logits"):  # the sampler's own guard (a CUDA assert otherwise)
        SamplingBatch.build([SamplingRow(SamplingParams(logit_bias={10: 1.0}))], 10, "cpu")


@pytest.fixture(scope="module")
def llm(tiny_hf):
    return LLM(str(tiny_hf), kv_cache_tokens=8192, max_batch_tokens=256)


def test_biased_requests_beside_plain_ones_each_get_their_solo_tokens(llm):
    """A batch of greedy requests, some biased: the plain ones get exactly the reference model's tokens, the
    biased ones exactly what they get alone, and a +100 bias makes every token that id."""
    rng = random.Random(5)
    prompts = [[rng.randrange(0, 2000) for _ in range(rng.randrange(3, 40))] for _ in range(12)]
    biases = [None, {1234: 100.0}, None, {77: 5.0, 91: -3.0}, None, {5: -100.0, 6: 2.5}] * 2
    params = [SamplingParams(max_tokens=8, logit_bias=b, **GREEDY) for b in biases]
    together = llm.generate(prompts, params, use_tqdm=False)
    for p, sp, r in zip(prompts, params, together):
        if sp.logit_bias is None:
            assert r.token_ids == generate_simple(llm.engine.model, p, 8)
        else:
            assert r.token_ids == llm.generate([p], sp, use_tqdm=False)[0].token_ids
    assert together[1].token_ids == [1234] * 8
    # Seeded sampling with a bias: the same tokens whatever else is in the step.
    seeded = SamplingParams(max_tokens=8, temperature=0.9, seed=11, logit_bias={40: 4.0, 41: 4.0}, ignore_eos=True)
    alone = llm.generate([prompts[0]], seeded, use_tqdm=False)[0].token_ids
    mixed = llm.generate(prompts[:6] + [prompts[0]], params[:6] + [seeded], use_tqdm=False)[-1].token_ids
    assert mixed == alone
    bm = llm.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks and not llm.engine.requests


def test_logprobs_stay_the_models_own(llm):
    """The biased request reports the raw distribution: its top alternatives are the unbiased request's."""
    prompt = [11, 22, 33, 44]
    plain = llm.generate([prompt], SamplingParams(max_tokens=1, logprobs=3, **GREEDY), use_tqdm=False)[0]
    biased = llm.generate([prompt], SamplingParams(max_tokens=1, logprobs=3, logit_bias={999: 100.0}, **GREEDY),
                          use_tqdm=False)[0]
    assert biased.token_ids == [999] != plain.token_ids
    want, got = plain.choices[0].logprobs[0].top, biased.choices[0].logprobs[0].top
    assert [t for t, _ in got] == [t for t, _ in want]
    assert [lp for _, lp in got] == pytest.approx([lp for _, lp in want], abs=1e-5)


def test_ids_outside_the_vocabulary_are_refused_up_front(llm):
    vocab = llm.engine.vocab_limit
    with pytest.raises(SamplingParamError, match=f"token id {vocab} is outside") as e:
        llm.engine.add_request("r", [1, 2, 3], SamplingParams(logit_bias={vocab: 1.0}))
    assert e.value.param == "logit_bias" and not llm.engine.requests
    # The last id is in: a padded row past the tokenizer's own ids, sampled and detokenized (as "") all the same.
    llm.engine.add_request("ok", [1, 2, 3], SamplingParams(logit_bias={vocab - 1: 100.0}, max_tokens=2, **GREEDY))
    tokens = []
    while llm.engine.has_unfinished():
        tokens += [t for out in llm.engine.step() for o in out.outputs for t in o.token_ids]
    assert tokens == [vocab - 1] * 2
