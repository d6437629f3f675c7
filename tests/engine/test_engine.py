"""The engine end to end on a tiny float32 checkpoint: batch invariance, preemption, prefix caching, block
accounting after many requests, seeds, stop strings, streaming text, constraints, failure isolation."""

from __future__ import annotations

import asyncio
import random
import time

import pytest
import torch

from glm_serve.engine.async_engine import AsyncEngine, merge_final
from glm_serve.engine.sampler import SamplingBatch
from glm_serve.engine.sequence import Sequence
from glm_serve.llm import LLM
from glm_serve.model.simple import generate_simple
from glm_serve.sampling_params import SamplingParams

from .workloads import random_prompts as _prompts
from .workloads import sharing_workload

GREEDY = dict(temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(tiny_hf):
    return LLM(str(tiny_hf), kv_cache_tokens=16384, max_batch_tokens=512)


def _solo(llm, ids, n):
    return generate_simple(llm.engine.model, ids, n)


def _all_blocks_free(engine):
    bm = engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks
    assert not engine.requests and not engine.seq_owner
    assert not engine.runner.row_of


def test_batch_invariance_32_mixed(llm):
    prompts = _prompts(32, seed=1)
    lens = [random.Random(i).randrange(1, 24) for i in range(32)]
    params = [SamplingParams(max_tokens=n, **GREEDY) for n in lens]
    results = llm.generate(prompts, params, use_tqdm=False)
    for p, n, r in zip(prompts, lens, results):
        assert r.token_ids == _solo(llm, p, n)
        assert r.choices[0].finish_reason == "length"
    _all_blocks_free(llm.engine)


def test_preemption_loses_nothing(tiny_hf):
    small = LLM(str(tiny_hf), kv_cache_tokens=256, max_batch_tokens=256, block_size=16)
    prompts = _prompts(8, seed=2, lo=20, hi=60)
    results = small.generate(prompts, SamplingParams(max_tokens=60, **GREEDY), use_tqdm=False)
    assert small.engine.scheduler.num_preemptions > 0  # the cache really was too small
    for p, r in zip(prompts, results):
        assert r.choices[0].error is None
        assert r.token_ids == _solo(small, p, 60)
    _all_blocks_free(small.engine)


def test_prefix_cache_hits_and_same_output(llm):
    bm = llm.engine.block_manager
    prompt = _prompts(1, seed=3, lo=100, hi=101)[0]
    first = llm.generate([prompt], SamplingParams(max_tokens=12, **GREEDY), use_tqdm=False)[0]
    hits_before = bm.num_hit_tokens
    second = llm.generate([prompt], SamplingParams(max_tokens=12, **GREEDY), use_tqdm=False)[0]
    assert second.usage["cached_tokens"] >= 96  # 6 full blocks of 16 out of 100 prompt tokens
    assert second.token_ids == first.token_ids
    assert bm.num_hit_tokens - hits_before == second.usage["cached_tokens"]


def test_n_siblings_share_the_prompt_through_the_prefix_cache(llm):
    """With n > 1 the prompt is computed once: the other choices wait for it and take its full blocks from the
    prefix cache (each of them a hit of every full block but the one holding the last prompt token)."""
    bm = llm.engine.block_manager
    prompt = _prompts(1, seed=331, lo=100, hi=101)[0]
    hits_before = bm.num_hit_tokens
    got = llm.generate([prompt], SamplingParams(max_tokens=4, n=3, **GREEDY), use_tqdm=False)[0]
    assert bm.num_hit_tokens - hits_before == 2 * (99 // bm.block_size * bm.block_size)
    assert got.choices[0].token_ids == got.choices[1].token_ids == got.choices[2].token_ids


def test_no_prefix_caching_flag(tiny_hf):
    plain = LLM(str(tiny_hf), kv_cache_tokens=4096, enable_prefix_caching=False)
    prompt = _prompts(1, seed=4, lo=70, hi=71)[0]
    a = plain.generate([prompt], SamplingParams(max_tokens=5, **GREEDY), use_tqdm=False)[0]
    b = plain.generate([prompt], SamplingParams(max_tokens=5, **GREEDY), use_tqdm=False)[0]
    assert b.usage["cached_tokens"] == 0 and a.token_ids == b.token_ids


def test_thousand_requests_with_aborts_free_every_block(llm):
    eng = llm.engine
    rng = random.Random(5)
    prompts = _prompts(1000, seed=5, lo=1, hi=40)
    live = set()
    for i, p in enumerate(prompts):
        eng.add_request(f"r{i}", p, SamplingParams(max_tokens=rng.randrange(1, 8), **GREEDY))
        live.add(f"r{i}")
    steps = 0
    while eng.has_unfinished():
        for out in eng.step():
            if out.finished:
                live.discard(out.request_id)
        steps += 1
        if steps % 3 == 0 and live:
            victim = rng.choice(sorted(live))
            out = eng.abort_request(victim)
            assert out is not None and out.finished
            live.discard(victim)
    _all_blocks_free(eng)


def test_seed_reproduces_whatever_the_batch(llm):
    p = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=16, seed=1234, ignore_eos=True)
    prompt = _prompts(1, seed=6)[0]
    alone = llm.generate([prompt], p, use_tqdm=False)[0].token_ids
    noisy = [SamplingParams(temperature=1.0, max_tokens=16, ignore_eos=True)] * 5
    mixed = llm.generate(_prompts(5, seed=7) + [prompt], noisy + [p], use_tqdm=False)[-1].token_ids
    assert alone == mixed
    other = llm.generate([prompt], SamplingParams(temperature=1.0, top_p=0.9, max_tokens=16, seed=99,
                                                  ignore_eos=True), use_tqdm=False)[0].token_ids
    assert other != alone


def test_steady_sampled_steps_reuse_their_sampling_batch(llm, monkeypatch):
    """Sampled rows without penalties, min_tokens or constraints: a step of the same sequences as the last one
    reuses its sampling batch instead of rebuilding it row by row; seeded outputs stay those of each request
    alone. A request with penalties in the batch makes every step build its own again."""
    builds = []
    build = SamplingBatch.build
    monkeypatch.setattr(SamplingBatch, "build",
                        classmethod(lambda cls, *a, **kw: builds.append(1) or build(*a, **kw)))
    eng = llm.engine
    prompts = _prompts(4, seed=12, lo=5, hi=30)
    params = [SamplingParams(temperature=0.9, top_p=0.8, top_k=50, max_tokens=24, seed=s, ignore_eos=True)
              for s in range(4)]
    alone = [llm.generate([p], sp, use_tqdm=False)[0].token_ids for p, sp in zip(prompts, params)]

    def run(extra):
        builds.clear()
        for i, (p, sp) in enumerate(zip(prompts + [prompts[0]] * len(extra), params + extra)):
            eng.add_request(f"reuse{i}", p, sp)
        tokens, steps = {}, 0
        while eng.has_unfinished():
            steps += 1
            for out in eng.step():
                tokens.setdefault(out.request_id, []).extend(out.outputs[0].token_ids)
        return [tokens[f"reuse{i}"] for i in range(len(params + extra))], steps

    got, steps = run([])
    assert got == alone
    assert len(builds) <= 3 < steps  # the first steps (admission), then the steady ones reuse
    penalised = SamplingParams(temperature=0.9, max_tokens=24, seed=7, presence_penalty=1.5, ignore_eos=True)
    got, steps = run([penalised])
    assert got[:4] == alone
    assert got[4] == llm.generate([prompts[0]], penalised, use_tqdm=False)[0].token_ids
    assert len(builds) >= 24  # a build for every step that samples


def test_stop_string_split_across_tokens(llm):
    tok = llm.tokenizer
    prompt = _prompts(1, seed=8)[0]
    full = llm.generate([prompt], SamplingParams(max_tokens=30, **GREEDY), use_tqdm=False)[0]
    # Pick a stop string that starts inside one token and ends inside a later one.
    pieces = [tok.decode([t]) for t in full.token_ids]
    text = "".join(pieces)
    assert text == full.text
    k = next(i for i in range(3, len(pieces) - 2) if len(pieces[i]) >= 2 and pieces[i + 1])
    start = len("".join(pieces[:k])) + 1
    stop = text[start:start + len(pieces[k]) - 1 + 1 + len(pieces[k + 1])]
    got = llm.generate([prompt], SamplingParams(max_tokens=30, stop=[stop], **GREEDY), use_tqdm=False)[0]
    assert got.choices[0].finish_reason == "stop"
    assert got.text == text[: text.index(stop)]
    assert stop not in got.text
    # min_tokens (vLLM's rule): a stop string that ends before the min_tokens-th token is ignored; the first one
    # that ends at or after it stops generation.
    m = k + 4
    got = llm.generate([prompt], SamplingParams(max_tokens=30, stop=[stop], min_tokens=m, **GREEDY),
                       use_tqdm=False)[0]
    unchecked = len("".join(pieces[:m - 1]))
    later = text.find(stop, max(0, unchecked - len(stop) + 1))
    if later < 0:
        assert got.choices[0].finish_reason == "length" and got.token_ids == full.token_ids
    else:
        assert got.choices[0].finish_reason == "stop" and got.text == text[:later] and len(got.token_ids) >= m


def test_stop_token_releases_text_held_for_a_stop_string(llm):
    """A stop id ends generation while the stop-string checker holds back the text's tail (it could still
    begin a stop string): that text is part of the output, not lost with the finish."""
    tok = llm.tokenizer
    prompt = _prompts(1, seed=8)[0]
    full = llm.generate([prompt], SamplingParams(max_tokens=30, **GREEDY), use_tqdm=False)[0]
    pieces = [tok.decode([t]) for t in full.token_ids]
    # A stop id at its first occurrence, after a token whose text ends with a character to hold back.
    j = next(i for i in range(2, len(pieces)) if full.token_ids[i] not in full.token_ids[:i] and pieces[i - 1])
    held = pieces[j - 1][-1]
    got = llm.generate([prompt], SamplingParams(max_tokens=30, stop=[held + "\x01never"],
                                                stop_token_ids=[full.token_ids[j]], **GREEDY), use_tqdm=False)[0]
    assert got.choices[0].finish_reason == "stop" and got.token_ids == full.token_ids[: j + 1]
    assert got.text == "".join(pieces[:j]) and got.text.endswith(held)


class ForcedText:
    """A TokenConstraint that allows exactly the next token of a fixed sequence (tests the mask hook)."""

    def __init__(self, ids, vocab_size):
        self.ids, self.pos, self.vocab = ids, 0, vocab_size

    def fill_bitmask(self, bitmask, row):
        bitmask[row].zero_()
        t = self.ids[self.pos]
        bitmask[row, t // 32] = torch.tensor(1 << (t % 32), dtype=torch.int64).to(torch.int32)

    def accept(self, token_id):
        if token_id != self.ids[self.pos]:
            raise ValueError(f"constraint expected {self.ids[self.pos]}, got {token_id}")
        self.pos += 1

    def is_terminated(self):
        return self.pos == len(self.ids)


def _collect_stream(engine, request_id, prompt, params, constraints=None):
    async def run():
        aeng = AsyncEngine(engine)
        try:
            return [o async for o in aeng.generate(request_id, prompt, params, constraints)]
        finally:
            aeng.shutdown()

    return asyncio.run(run())


def test_chinese_streams_cleanly_through_a_constraint(llm):
    text = "你好，世界！今天天气很好。🙂 GLM-4 流式输出"
    ids = llm.tokenizer.encode(text, allow_special=False)
    params = SamplingParams(temperature=1.0, max_tokens=100)
    outs = _collect_stream(llm.engine, "zh", [1, 2, 3], params, [ForcedText(ids, 2048)])
    deltas = [o.text for out in outs for o in out.outputs]
    assert "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas)
    assert outs[-1].finished and outs[-1].outputs[0].finish_reason == "stop"
    assert len([d for d in deltas if d]) > 5  # it really streamed


def test_async_concurrent_abort_and_failure_isolation(llm):
    engine = llm.engine
    prompts = _prompts(6, seed=9)

    class Exploding(ForcedText):
        def accept(self, token_id):
            raise RuntimeError("boom")

    async def run():
        aeng = AsyncEngine(engine)

        async def whole(i):
            outs = [o async for o in aeng.generate(f"a{i}", prompts[i], SamplingParams(max_tokens=20, **GREEDY))]
            return merge_final(outs)[0]

        async def aborted():
            n = 0
            async for _ in aeng.generate("ab", prompts[4], SamplingParams(max_tokens=200, **GREEDY)):
                n += 1
                if n == 3:
                    break  # leaving the iterator aborts the request
            return n

        async def failing():
            outs = [o async for o in aeng.generate("bad", prompts[5], SamplingParams(max_tokens=20, **GREEDY),
                                                   [Exploding([1], 2048)])]
            return merge_final(outs)[0]

        try:
            res = await asyncio.gather(*(whole(i) for i in range(4)), aborted(), failing())
            deadline = time.monotonic() + 30  # the abort is applied by the loop thread (it had 1 s: a loaded
            while engine.requests and time.monotonic() < deadline:  # machine could take longer)
                await asyncio.sleep(0.02)
            return res
        finally:
            aeng.shutdown()

    res = asyncio.run(run())
    for i in range(4):
        assert res[i].token_ids == _solo(llm, prompts[i], 20)
    assert res[4] == 3
    assert res[5].finish_reason == "error" and "boom" in res[5].error
    _all_blocks_free(engine)


def test_prompt_too_long_rejected_up_front(tiny_hf):
    small = LLM(str(tiny_hf), kv_cache_tokens=256, max_model_len=128)
    with pytest.raises(ValueError, match="context window"):
        small.engine.add_request("x", list(range(200)), SamplingParams())
    with pytest.raises(ValueError, match="vocabulary"):
        small.engine.add_request("y", [10**7], SamplingParams())


def test_triton_backend_serves_the_torch_backends_tokens(tiny_hf):
    """Greedy requests through the whole engine with the Triton kernels (interpreted on the CPU) equal the
    torch backend's: chunked prefill (small token budget), decode, and a prefix-cache hit."""
    pytest.importorskip("triton")
    prompts = _prompts(5, seed=11, lo=20, hi=70)
    prompts.append(prompts[0][:40] + [5, 6, 7])  # shares full blocks with prompts[0]
    params = SamplingParams(max_tokens=12, **GREEDY)
    want = LLM(str(tiny_hf), kv_cache_tokens=2048, max_batch_tokens=64, max_num_seqs=8, attention_backend="torch")
    got = LLM(str(tiny_hf), kv_cache_tokens=2048, max_batch_tokens=64, max_num_seqs=8, attention_backend="triton")
    assert type(got.engine.model.backend).__name__ == "TritonPagedAttention"
    assert got.engine.model.fused_ops and not want.engine.model.fused_ops  # the small ops as kernels too
    a = [r.token_ids for r in want.generate(prompts, params, use_tqdm=False)]
    b = [r.token_ids for r in got.generate(prompts, params, use_tqdm=False)]
    assert a == b
    eager = LLM(str(tiny_hf), kv_cache_tokens=2048, max_batch_tokens=64, max_num_seqs=8, attention_backend="triton",
                fused_ops=False)  # --no-fused-ops
    assert not eager.engine.model.fused_ops
    assert [r.token_ids for r in eager.generate(prompts, params, use_tqdm=False)] == a


def test_triton_backend_under_preemption_and_sharing(tiny_hf):
    """The Triton kernels on a cache so small that requests are preempted and recomputed, with block size 4,
    n = 2 siblings sharing their prompt's blocks and prompts sharing a prefix: every choice gets the tokens the
    torch backend gives on a roomy cache."""
    pytest.importorskip("triton")
    prompts, params = sharing_workload(0, other_seed=100, other_lens=(1, 90), max_tokens=(1, 40), **GREEDY)
    want = LLM(str(tiny_hf), kv_cache_tokens=4096, max_num_seqs=8, max_batch_tokens=48, attention_backend="torch")
    got = LLM(str(tiny_hf), kv_cache_tokens=256, block_size=4, max_num_seqs=8, max_batch_tokens=48,
              attention_backend="triton")
    a = [[c.token_ids for c in r.choices] for r in want.generate(prompts, params, use_tqdm=False)]
    b = [[c.token_ids for c in r.choices] for r in got.generate(prompts, params, use_tqdm=False)]
    assert got.engine.scheduler.num_preemptions > 0 and got.engine.block_manager.hit_rate > 0
    assert a == b


def test_padded_decode_graph_path_gives_the_same_tokens(tiny_hf):
    """--cuda-graphs on the CPU runs the padded static-buffer decode path eagerly (capture itself needs a GPU):
    batch sizes between buckets, padding rows and stale block-table columns must not change any token."""
    pytest.importorskip("triton")
    prompts = _prompts(5, seed=13, lo=3, hi=40)
    lens = [3, 9, 14, 6, 11]  # sequences finish at different steps: the batch walks down through buckets
    params = [SamplingParams(max_tokens=n, logprobs=0, **GREEDY) for n in lens]
    plain = LLM(str(tiny_hf), kv_cache_tokens=2048, max_num_seqs=8, max_batch_tokens=64,
                attention_backend="triton")
    graphs = LLM(str(tiny_hf), kv_cache_tokens=2048, max_num_seqs=8, max_batch_tokens=64,
                 attention_backend="triton", cuda_graphs=True)
    used = []
    run = graphs.engine.runner.graphs.run

    static = graphs.engine.runner.graphs
    padding = []  # (stored slots, attended lengths) of each padded step's padding rows

    def spy(*args):
        out = run(*args)
        if out is not None:
            b = args[2].num_seqs
            used.append(b)
            size = static.bucket(b)
            padding.append((static.slot_mapping[b:size].tolist(), static.seq_lens[b:size].tolist()))
        return out

    graphs.engine.runner.graphs.run = spy
    want = plain.generate(prompts, params, use_tqdm=False)
    got = graphs.generate(prompts, params, use_tqdm=False)
    assert [r.token_ids for r in got] == [r.token_ids for r in want]
    # Logprobs too: greedy tokens of a tiny random model can survive a corrupted K/V slot (a padding row
    # writing into a slot a live sequence used in the step before), its distribution cannot.
    assert [lp.logprob for r in got for lp in r.choices[0].logprobs] == pytest.approx(
        [lp.logprob for r in want for lp in r.choices[0].logprobs], abs=1e-3)
    assert {3, 5} & set(used)  # decode steps between buckets (3 -> 4, 5 -> 8) really took the padded path
    # Padding rows store nothing and attend to nothing (the docstring's table), whatever the last step left.
    assert all(set(slots) <= {-1} and set(lens) <= {0} for slots, lens in padding)
    with pytest.raises(ValueError, match="triton"):
        LLM(str(tiny_hf), kv_cache_tokens=1024, attention_backend="torch", cuda_graphs=True)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without CUDA")
def test_triton_backend_off_cuda_refuses_what_the_interpreter_cannot_run(tiny_hf, monkeypatch):
    """Off CUDA the Triton kernels run only in the interpreter, which computes bfloat16 wrongly without raising
    (docs/gpu.md): the engine refuses bf16 there, and refuses outright when the kernels are not interpreted
    (they used to fail every request with '0 active drivers'), before loading anything."""
    with pytest.raises(ValueError, match="bfloat16"):
        LLM(str(tiny_hf), kv_cache_tokens=1024, dtype="bfloat16", attention_backend="triton")
    from glm_serve.kernels import decode

    monkeypatch.setattr(decode, "_decode_split_kernel", object())  # as compiled without TRITON_INTERPRET=1
    with pytest.raises(ValueError, match="CUDA device"):
        LLM(str(tiny_hf), kv_cache_tokens=1024, attention_backend="triton")
    LLM(str(tiny_hf), kv_cache_tokens=1024, dtype="bfloat16", attention_backend="torch")  # torch: fine


@pytest.mark.gpu
def test_cuda_graph_decode_gives_the_same_tokens_on_gpu(tiny_hf):
    """On a GPU: decode steps captured as CUDA graphs and replayed give the eager triton backend's tokens."""
    prompts = _prompts(12, seed=14, lo=3, hi=200)
    params = [SamplingParams(max_tokens=n, **GREEDY) for n in range(20, 32)]
    kw = dict(kv_cache_tokens=8192, max_num_seqs=16, device="cuda", dtype="float32", attention_backend="triton")
    want = [r.token_ids for r in LLM(str(tiny_hf), **kw).generate(prompts, params, use_tqdm=False)]
    graphs = LLM(str(tiny_hf), cuda_graphs=True, **kw)
    assert graphs.engine.runner.graphs.graphs  # really captured
    assert [r.token_ids for r in graphs.generate(prompts, params, use_tqdm=False)] == want


def test_async_engine_wakes_the_event_loop_once_per_step(llm, monkeypatch):
    """A step's outputs for many streams reach the event loop in one call_soon_threadsafe (each call writes to
    the loop's wake-up pipe), in order, and merge to what the synchronous engine gives."""
    prompts = _prompts(12, seed=31)
    params = SamplingParams(max_tokens=9, **GREEDY)
    want = [r.choices[0].token_ids for r in llm.generate(prompts, params, use_tqdm=False)]

    async def run():
        loop = asyncio.get_running_loop()
        calls = {"n": 0}
        real = loop.call_soon_threadsafe

        def counted(*args):
            calls["n"] += 1
            return real(*args)

        monkeypatch.setattr(loop, "call_soon_threadsafe", counted)
        aeng = AsyncEngine(llm.engine)
        try:
            steps0 = aeng.step_count

            async def whole(i):
                return merge_final([o async for o in aeng.generate(f"w{i}", prompts[i], params)])[0]

            res = await asyncio.gather(*(whole(i) for i in range(len(prompts))))
            return res, calls["n"], aeng.step_count - steps0
        finally:
            aeng.shutdown()

    res, wakeups, steps = asyncio.run(run())
    assert [r.token_ids for r in res] == want
    assert all(r.finish_reason == "length" for r in res)
    assert 0 < wakeups <= steps < 12 * 9  # one per step at most, never one per output


def test_a_bad_prompt_in_generate_leaves_the_engine_empty(llm):
    long = list(range(llm.engine.max_model_len))  # no room for one generated token
    with pytest.raises(ValueError):
        llm.generate([[1, 2, 3], long], SamplingParams(max_tokens=4, **GREEDY), use_tqdm=False)
    _all_blocks_free(llm.engine)  # the good prompt queued before the bad one was dropped with the call
    res = llm.generate([[4, 5, 6]], SamplingParams(max_tokens=4, **GREEDY), use_tqdm=False)  # used to KeyError
    assert res[0].token_ids == _solo(llm, [4, 5, 6], 4)


def test_constraints_must_match_n_and_a_refusal_leaves_nothing_behind(llm):
    eng = llm.engine
    with pytest.raises(ValueError, match="constraints"):
        eng.add_request("short", [1, 2, 3], SamplingParams(n=2, **GREEDY), constraints=[None])
    assert "short" not in eng.requests and not eng.seq_owner  # used to leak the first choice's seq_owner entry


def test_warm_up_leaves_nothing_behind_and_fails_loudly(tiny_hf, monkeypatch):
    """The start-up warm-up (run on CUDA) runs real steps, then leaves no request, no cached block and no
    counted hit; a kernel that fails in it stops the start-up with its cause."""
    eng = LLM(str(tiny_hf), kv_cache_tokens=1024).engine
    seconds = eng.warm_up()
    assert seconds > 0
    _all_blocks_free(eng)
    bm = eng.block_manager
    assert bm.num_cached_blocks == 0 and bm.num_query_tokens == 0 and bm.hit_rate == 0.0
    prompt = [1, 2, 3, 4, 5]
    assert LLM(str(tiny_hf), kv_cache_tokens=1024).generate([prompt], SamplingParams(max_tokens=6, **GREEDY),
                                                            use_tqdm=False)[0].token_ids \
        == _greedy_tokens(eng, prompt, 6)

    def broken(*args, **kw):
        raise RuntimeError("Failed to find C compiler")

    tiny = LLM(str(tiny_hf), kv_cache_tokens=16, block_size=16, max_batch_tokens=16, max_num_seqs=2).engine
    assert tiny.max_model_len == 16 and tiny.warm_up() > 0  # a cache smaller than the usual warm-up prompt
    _all_blocks_free(tiny)
    assert tiny.scheduler.num_preemptions == 0 and tiny.block_manager.num_query_tokens == 0

    monkeypatch.setattr(eng.runner, "execute", broken)
    with pytest.raises(RuntimeError, match="warm-up.*Failed to find C compiler.*attention-backend torch"):
        eng.warm_up()


def _greedy_tokens(eng, prompt, n):
    eng.add_request("after-warm-up", prompt, SamplingParams(max_tokens=n, **GREEDY))
    tokens = []
    while eng.has_unfinished():
        for out in eng.step():
            tokens += out.outputs[0].token_ids
    return tokens


def test_runner_rewrites_a_table_row_whose_blocks_were_taken_back(llm):
    """A sequence that keeps its table row while its block list was replaced by a shorter one (its blocks
    taken back and new ones given) gets the row rewritten, not the stale first entries kept."""
    runner = llm.engine.runner
    seq = Sequence(10**6, "row-test", [1, 2, 3], None, block_ids=[5, 6, 7])
    try:
        row = runner._row(seq)
        assert runner.block_table_host[row, :3].tolist() == [5, 6, 7]
        seq.block_ids = [9]
        assert runner._row(seq) == row and runner.block_table_host[row, :1].tolist() == [9]
        assert runner.row_len[row] == 1
        runner._upload_tables()  # the device mirror follows the rewrite too
        assert runner.block_table_dev[row, :1].tolist() == [9]
    finally:
        runner.release(seq.seq_id)


def test_the_device_block_table_mirrors_the_host_one_under_preemption(tiny_hf):
    """The device copy of the block tables gets only the entries written since the last step (not the batch's
    whole table), through admission, growth, preemption with recompute, release and row reuse: after every step
    each live row's known blocks are the same on both sides, and the tokens stay the reference's."""
    llm = LLM(str(tiny_hf), kv_cache_tokens=256, max_num_seqs=8, max_batch_tokens=64)
    eng, runner = llm.engine, llm.engine.runner
    prompts = [[(13 * i + j) % 1500 + 3 for j in range(20 + 7 * i)] for i in range(8)]
    for i, p in enumerate(prompts):
        eng.add_request(f"m{i}", p, SamplingParams(max_tokens=40, **GREEDY))
    tokens: dict[str, list[int]] = {f"m{i}": [] for i in range(len(prompts))}
    while eng.has_unfinished():
        for out in eng.step():
            tokens[out.request_id] += out.outputs[0].token_ids
        for row in runner.row_of.values():
            n = runner.row_len[row]
            assert runner.block_table_dev[row, :n].tolist() == runner.block_table_host[row, :n].tolist()
    assert eng.scheduler.num_preemptions > 0
    for i, p in enumerate(prompts):
        assert tokens[f"m{i}"] == generate_simple(eng.model, p, 40), i


def test_each_request_gets_its_own_number_of_top_logprobs(llm):
    """Requests asking for different top-k alternatives share a step (the sampler computes the largest k):
    each gets exactly its own k alternatives with every token."""
    prompts = _prompts(3, seed=41)
    params = [SamplingParams(max_tokens=4, logprobs=k, **GREEDY) for k in (0, 2, 5)]
    got = llm.generate(prompts, params, use_tqdm=False)
    for r, k in zip(got, (0, 2, 5)):
        lps = r.choices[0].logprobs
        assert [lp.token_id for lp in lps] == r.token_ids and all(len(lp.top) == k for lp in lps)
        assert all(lp.top[0][0] == lp.token_id for lp in lps if k)  # greedy: the top alternative is the token
