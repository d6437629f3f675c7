"""Overlap scheduling (step N+1 scheduled and launched before step N's tokens reach the host) changes nothing a
user sees: the same tokens, text, finish reasons, logprobs and usage as the engine that lands every step first,
through stop ids hit while the next step is already running, preemption of sequences with a token in flight,
requests that force synchronous steps, and failures of a batched step."""

from __future__ import annotations

import logging
import random

import pytest

from glm_serve.llm import LLM
from glm_serve.model.simple import generate_simple
from glm_serve.sampling_params import SamplingParams

GREEDY = dict(temperature=0.0, ignore_eos=True)


def _prompts(k, seed, lo=3, hi=60):
    rng = random.Random(seed)
    return [[rng.randrange(0, 2000) for _ in range(rng.randrange(lo, hi))] for _ in range(k)]


def _view(results):
    """Everything a client sees of each result, logprob values aside (see _logprobs)."""
    return [[(c.token_ids, c.text, c.finish_reason, c.error,
              [(lp.token_id, [t for t, _ in lp.top]) for lp in c.logprobs or []])
             for c in r.choices] + [r.usage] for r in results]


def _logprobs(results):
    """[every logprob value, in order]: batches differ between the modes (and recomputes after preemption
    run as prefill chunks), so float32 values may differ in the last bits."""
    return [v for r in results for c in r.choices for lp in c.logprobs or []
            for v in [lp.logprob] + [x for _, x in lp.top]]


def _workload(tiny_hf):
    prompts = _prompts(10, seed=21)
    probe = LLM(str(tiny_hf), kv_cache_tokens=4096, overlap_scheduling=False)
    solo = [generate_simple(probe.engine.model, p, 30) for p in prompts]
    params = [SamplingParams(max_tokens=30, **GREEDY) for _ in prompts]
    # Stop ids that really occur mid-output: those sequences finish at step N with step N+1 already launched.
    for i in (0, 3, 6):
        params[i] = SamplingParams(max_tokens=30, temperature=0.0, stop_token_ids=[solo[i][7]])
    text = probe.tokenizer.decode(solo[1])
    params[1] = SamplingParams(max_tokens=30, stop=[text[10:13]], **GREEDY)  # a stop string
    params[2] = SamplingParams(max_tokens=25, temperature=0.9, top_p=0.8, seed=7, logprobs=3, ignore_eos=True)
    params[4] = SamplingParams(max_tokens=20, temperature=1.0, seed=3, n=2, ignore_eos=True)
    params[5] = SamplingParams(max_tokens=1, **GREEDY)  # done at its prefill's sample: never decodes
    # Penalties need every token on the host before the next sample: steps run synchronously while it lives.
    params[7] = SamplingParams(max_tokens=6, temperature=0.0, repetition_penalty=1.3, ignore_eos=True)
    params[8] = SamplingParams(max_tokens=30, logprobs=2, **GREEDY)
    return prompts, params, solo


@pytest.mark.parametrize("cache_tokens", [4096, 256])  # 256: preemption, sequences preempted mid-flight
def test_overlap_gives_what_synchronous_steps_give(tiny_hf, cache_tokens):
    prompts, params, solo = _workload(tiny_hf)
    kw = dict(kv_cache_tokens=cache_tokens, max_batch_tokens=256, block_size=16)
    sync = LLM(str(tiny_hf), overlap_scheduling=False, **kw)
    over = LLM(str(tiny_hf), **kw)
    want = sync.generate(prompts, params, use_tqdm=False)
    got = over.generate(prompts, params, use_tqdm=False)
    assert _view(got) == _view(want)
    assert _logprobs(got) == pytest.approx(_logprobs(want), abs=1e-4) and len(_logprobs(got)) > 100
    for i in (0, 9):  # plain greedy rows also equal the naive reference (with a stop id: its prefix)
        toks = got[i].token_ids
        assert toks == solo[i][:len(toks)] and (i == 0) == (len(toks) < 30)
    assert over.engine.runner.num_fed_tokens > 50  # decode inputs really came from the step in flight
    assert sync.engine.runner.num_fed_tokens == 0
    if cache_tokens == 256:
        assert over.engine.scheduler.num_preemptions > 0
    for eng in (sync.engine, over.engine):
        assert eng.block_manager.ref_counts == [0] * eng.block_manager.num_blocks
        assert not eng.requests and not eng.seq_owner
        assert eng._num_host_token_requests == eng._num_sampling_requests == 0


def test_overlap_abort_in_flight_frees_everything(tiny_hf):
    llm = LLM(str(tiny_hf), kv_cache_tokens=2048, max_batch_tokens=256)
    eng = llm.engine
    prompts = _prompts(40, seed=22, lo=1, hi=30)
    rng = random.Random(3)
    live = set()
    for i, p in enumerate(prompts):
        eng.add_request(f"r{i}", p, SamplingParams(max_tokens=rng.randrange(1, 12), **GREEDY))
        live.add(f"r{i}")
    finals = {}
    steps = 0
    while eng.has_unfinished():
        for out in eng.step():
            if out.finished:
                finals[out.request_id] = out
                live.discard(out.request_id)
        steps += 1
        if steps % 2 == 0 and live:  # aborted between launch and landing: its token is in flight
            victim = rng.choice(sorted(live))
            finals[victim] = eng.abort_request(victim)
            live.discard(victim)
    assert set(finals) == {f"r{i}" for i in range(40)}
    eng.step()  # lands whatever was still in flight for finished sequences
    bm = eng.block_manager
    assert bm.num_free_blocks == bm.num_blocks
    assert not eng.runner.row_of and eng._inflight is None
    assert eng.runner.num_fed_tokens > 0


def test_steady_decode_batch_is_right(tiny_hf, monkeypatch):
    """The runner's steady-decode path (same sequences as the step in flight, inputs taken as they are, table
    rows cached) builds the batch the scheduler's output defines, step after step, through new blocks every 4
    tokens, sequences finishing and leaving, and preemption. Checked against each sequence's own blocks."""
    llm = LLM(str(tiny_hf), kv_cache_tokens=192, max_batch_tokens=256, block_size=4)
    runner = llm.engine.runner
    steady = runner._steady_decode
    calls = {"steady": 0, "general": 0}

    def checked(out, inflight=None):
        batch = steady(out, inflight)
        calls["general" if batch is None else "steady"] += 1
        if batch is not None:  # (an assertion failing here would only make the engine re-run the step alone)
            calls["checked"] = calls.get("checked", 0) + 1
            m, B = batch.meta, len(out.scheduled)
            starts = [s.start for s in out.scheduled]
            assert [s.num_new_tokens for s in out.scheduled] == [1] * B
            assert batch.input_ids.tolist() == inflight.token_ids.tolist()
            assert batch.sample_seq_ids == inflight.seq_ids == [s.seq.seq_id for s in out.scheduled]
            assert batch.positions.tolist() == starts and m.token_q_offset.tolist() == [0] * B
            assert m.seq_lens.tolist() == [x + 1 for x in starts] == m.host_seq_lens.tolist()
            assert m.cu_seqlens_q.tolist() == list(range(B + 1)) == m.host_cu_seqlens_q.tolist()
            assert batch.logits_indices.tolist() == list(range(B)) == m.token_to_seq.tolist()
            assert m.max_seqlen_q == 1 and m.max_seqlen_k == max(starts) + 1
            tables = m.block_tables.tolist()
            for b, s in enumerate(out.scheduled):
                blocks = s.seq.block_ids[: s.start // 4 + 1]
                assert tables[b][: len(blocks)] == blocks
                assert m.slot_mapping[b].item() == blocks[-1] * 4 + s.start % 4
            calls["passed"] = calls.get("passed", 0) + 1
        return batch

    monkeypatch.setattr(runner, "_steady_decode", checked)
    rng = random.Random(5)
    prompts = _prompts(12, seed=24, lo=2, hi=20)
    params = [SamplingParams(max_tokens=rng.randrange(5, 60), **GREEDY) for _ in prompts]
    got = llm.generate(prompts, params, use_tqdm=False)
    assert [len(r.token_ids) for r in got] == [p.max_tokens for p in params]
    assert calls["steady"] > 20 and calls["general"] > 0
    assert calls["passed"] == calls["checked"] == calls["steady"]
    assert llm.engine.scheduler.num_preemptions > 0


def test_sequences_leaving_a_decode_batch_need_no_rerun(tiny_hf, caplog):
    """Sequences reaching max_tokens one after another leave the decode batch while the step in flight still
    holds their tokens: the next step gathers the others' input tokens from it. No batched step may fail and be
    re-run alone (which would hide a wrong gather from the token checks)."""
    prompts = _prompts(6, seed=25)
    params = [SamplingParams(max_tokens=m, **GREEDY) for m in (3, 5, 8, 11, 14, 17)]
    llm = LLM(str(tiny_hf), kv_cache_tokens=2048, max_batch_tokens=256)
    with caplog.at_level(logging.ERROR, logger="glm_serve.engine.engine"):
        got = llm.generate(prompts, params, use_tqdm=False)
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
    assert [r.token_ids for r in got] == [generate_simple(llm.engine.model, p, m.max_tokens)
                                         for p, m in zip(prompts, params)]
    assert llm.engine.runner.num_fed_tokens > 0


@pytest.mark.parametrize("where", ["launch", "read"])
def test_a_failed_batched_step_is_rerun_alone_with_the_same_tokens(tiny_hf, where, monkeypatch):
    """A batch that fails as a whole (at launch, or when its tokens are read with the next step already
    queued on top of them) is re-run sequence by sequence; nothing changes in the output."""
    prompts = _prompts(6, seed=23)
    params = SamplingParams(max_tokens=12, **GREEDY)
    llm = LLM(str(tiny_hf), kv_cache_tokens=2048, max_batch_tokens=256)
    want = [r.token_ids for r in LLM(str(tiny_hf), kv_cache_tokens=2048, overlap_scheduling=False)
            .generate(prompts, params, use_tqdm=False)]
    eng = llm.engine
    calls = {"n": 0}
    target = eng.runner if where == "launch" else eng
    name = "execute" if where == "launch" else "_read"
    real = getattr(target, name)

    def flaky(*args, **kw):
        batched = (len(args[0]) if where == "read" else args[0].meta.num_seqs) > 1
        calls["n"] += batched
        if batched and calls["n"] in (3, 6):  # the per-sequence re-runs (one sequence each) pass
            raise RuntimeError("injected device failure")
        return real(*args, **kw)

    monkeypatch.setattr(target, name, flaky)
    got = llm.generate(prompts, params, use_tqdm=False)
    assert [r.token_ids for r in got] == want
    assert all(r.choices[0].error is None for r in got)
    assert calls["n"] > 6 and eng.runner.num_fed_tokens > 0


@pytest.mark.gpu
def test_landing_a_step_does_not_wait_for_the_next_one_on_gpu():
    """HostCopy.wait() returns once its own step is done, while work queued after it is still running; a plain
    .tolist() would wait for the whole stream and serialize overlap scheduling."""
    import torch  # noqa: PLC0415

    from glm_serve.engine.sampler import HostCopy, SamplerOutput  # noqa: PLC0415

    tokens = torch.arange(10, device="cuda") * 3
    copy = HostCopy(SamplerOutput(tokens))
    torch.cuda._sleep(2_000_000_000)  # about a second of spinning, queued behind the copy: "step N+1"
    later = torch.cuda.Event()
    later.record()
    got = copy.wait()
    assert got.token_ids.tolist() == [3 * i for i in range(10)]
    assert not later.query()  # step N+1 is still running: landing step N did not wait for it
    torch.cuda.synchronize()


@pytest.mark.gpu
def test_overlap_gives_what_synchronous_steps_give_on_gpu(tiny_hf):
    """On CUDA (float32): the device-side gather of in-flight tokens, the pinned non-blocking token copies and
    their events change nothing either, with and without CUDA graphs."""
    prompts, params, _ = _workload(tiny_hf)
    kw = dict(kv_cache_tokens=4096, max_batch_tokens=256, device="cuda", dtype="float32")
    want = LLM(str(tiny_hf), overlap_scheduling=False, **kw).generate(prompts, params, use_tqdm=False)
    for extra in ({}, {"attention_backend": "triton", "cuda_graphs": True}):
        over = LLM(str(tiny_hf), **kw, **extra)
        got = over.generate(prompts, params, use_tqdm=False)
        assert _view(got) == _view(want)
        assert _logprobs(got) == pytest.approx(_logprobs(want), abs=1e-3)
        assert over.engine.runner.num_fed_tokens > 50
