"""A randomized differential test of LLMEngine. Per seed, a random engine configuration (block size 4 to 32, a KV
cache small enough to preempt or even to cap the context window, a token budget small enough to chunk prompts,
max_num_seqs, prefix caching, overlap scheduling, the GPU's staged uploads, stream_interval, injected failures of
batched steps) serves a random workload (shared prefixes and repeated blocks, n, greedy / seeded / unseeded
sampling with top-p, top-k, min-p, penalties, stop strings and ids taken from the request's own output,
min_tokens, max_tokens 0 or None, logprobs, prompt logprobs, constraints, final_only, ids reused) with requests
arriving between steps and some aborted. Checked:

  * every finished greedy or seeded request gives, streamed, exactly what it gives alone, merged from
    final_only outputs, on an engine with a big cache and none of the scheduling features above (tokens, text,
    finish and stop reasons, logprobs and prompt logprobs to 1e-4, usage); an aborted one streamed a prefix of it;
  * beside that differential check, which cannot see a bug both runs share: texts against a one-shot decode
    and the stop rules, stop ids only where they end a choice, plain greedy tokens against the naive loop
    (fuzz_oracles.py); unseeded requests are only checked that way and for their lengths;
  * no request fails; outputs are well formed (one final output and nothing after it, logprobs per token and
    prompt logprobs once when asked for); too long prompts and live ids are refused without side effects;
  * after every step the block manager's accounting holds (BlockManager.check_invariants) and table rows and
    owners belong to live requests; at the end every block is free and nothing is left in the engine.

GLM_SERVE_FUZZ_SEEDS runs other seeds: "N" for seeds 0 .. N-1, "A:B" for seeds A .. B-1, e.g.

    GLM_SERVE_FUZZ_SEEDS=0:200 pytest -q tests/engine/test_engine_fuzz.py     (about 2 s a seed on one core)
"""

from __future__ import annotations

import os
import random
from collections import Counter, defaultdict
from collections.abc import Callable

import pytest
import torch

from glm_serve.engine.outputs import CompletionOutput, RequestOutput, merge_outputs
from glm_serve.engine.staging import StepUploader
from glm_serve.llm import LLM
from glm_serve.sampling_params import SamplingParams

from .fuzz_oracles import check_greedy, check_stop_ids, check_text, plain_greedy
from .fuzz_workload import MAX_NEW, MAX_PROMPT, PLAIN_IDS, FuzzCase, FuzzRequest, make_case, resolve_stops

DEFAULT_SEEDS = list(range(20))  # about 25 s on a 2-core VM
LOGPROB_TOL = 1e-4  # float32 values of one row differ in the last bits between batch shapes (see test_overlap)


def _seeds() -> list[int]:
    spec = os.environ.get("GLM_SERVE_FUZZ_SEEDS")
    if not spec:
        return DEFAULT_SEEDS
    lo, _, hi = spec.partition(":")
    return list(range(int(lo), int(hi))) if hi else list(range(int(lo)))


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One intra-op thread: this tiny model's matmuls gain nothing from more, and on a busy machine torch's
    threads wait on each other (a step took 30 times longer with 2 threads on a loaded 2-core VM)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def references(tiny_hf) -> Callable[[int | None], LLM]:
    """window -> the engine each request runs alone on: a cache far bigger than any request, whole prompts in
    one chunk, no prefix caching (nothing carries from one request to the next), no overlap, and the fuzzed
    engine's context window (None: one no request reaches)."""
    made: dict[int | None, LLM] = {}

    def get(window: int | None) -> LLM:
        if window not in made:
            made[window] = LLM(str(tiny_hf), kv_cache_tokens=16384, max_batch_tokens=2048, max_model_len=window,
                               enable_prefix_caching=False, overlap_scheduling=False)
        return made[window]

    return get


@pytest.fixture(scope="module")
def hot(references) -> tuple[list[int], list[str]]:
    """Tokens the tiny model emits often, and their texts: stop ids and stop strings drawn from these end
    choices for real."""
    reference = references(None)
    prompts = [[(37 * i + 11 * j) % PLAIN_IDS for j in range(5 + 17 * i)] for i in range(6)]
    got = reference.generate(prompts, SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True),
                             use_tqdm=False)
    counts = Counter(t for r in got for t in r.token_ids)
    tokens = [t for t, _ in counts.most_common(40)]
    texts = reference.tokenizer.token_texts(True)
    return tokens, [texts[t] for t in tokens if t < len(texts) and texts[t]]  # ids past the tokenizer's: no text


def _fits(req: FuzzRequest, window: int) -> bool:
    """Whether the engine takes the prompt (check_prompt): room for it and, unless max_tokens is 0, one token."""
    return len(req.prompt) + (req.params.max_tokens != 0) <= window


def _run_alone(ref: LLM, req: FuzzRequest) -> RequestOutput | None:
    """The request alone on `ref`, merged as LLM.generate merges it; None when its prompt does not fit."""
    eng = ref.engine
    if not _fits(req, eng.max_model_len):
        return None
    eng.add_request("alone", req.prompt, req.params, req.constraints(), final_only=True)
    outs = []
    while eng.has_unfinished():
        outs += eng.step()
    assert not eng.requests and not eng.seq_owner
    return merge_outputs(outs)


def _live_sequences(eng) -> list:
    return [c.seq for r in eng.requests.values() for c in r.choices if not c.seq.is_finished]


def _check_engine_state(eng) -> None:
    """Between steps: block accounting, and every table row and owner entry belongs to a live request."""
    seqs = _live_sequences(eng)
    eng.block_manager.check_invariants(seqs)
    owned = {c.seq.seq_id for r in eng.requests.values() for c in r.choices}
    assert set(eng.seq_owner) == owned
    held = {s.seq_id for s in seqs if s.block_ids}
    assert set(eng.runner.row_of) <= held, "a table row outlived its sequence's blocks"
    assert sum(r.needs_host_tokens for r in eng.requests.values()) == eng._num_host_token_requests
    assert sum(not r.plain_greedy for r in eng.requests.values()) == eng._num_sampling_requests


def _drive(case: FuzzCase, llm: LLM) -> tuple[dict[str, list[RequestOutput]], set[str]]:
    """Run the workload, adding and aborting requests between steps. -> (outputs per request, the aborted).
    A request may take the id of one that has finished (ids are the client's: only live ones must differ), and
    adding a live request's id again is refused without touching it."""
    eng = llm.engine
    arrivals, aborts = defaultdict(list), defaultdict(list)
    for r in case.requests:
        arrivals[r.arrive].append(r)
        if r.abort is not None:
            aborts[r.abort].append(r)
    last = max(arrivals)
    outs: dict[str, list[RequestOutput]] = defaultdict(list)
    done, aborted = set(), set()
    engine_id: dict[str, str] = {}  # fuzz request -> its id in the engine
    owner: dict[str, str] = {}  # engine id -> the live fuzz request holding it

    def finish(rid: str) -> None:
        done.add(rid)
        owner.pop(engine_id[rid], None)

    step = 0
    while step <= last or eng.has_unfinished():
        for r in arrivals.get(step, ()):
            free_ids = sorted(engine_id[d] for d in done if engine_id[d] not in owner)
            eid = engine_id[r.rid] = free_ids[0] if r.reuse_id and free_ids else r.rid
            if owner:  # a live id again: refused, and the live request goes on as before
                with pytest.raises(ValueError, match="duplicate"):
                    eng.add_request(min(owner), r.prompt, r.params, r.constraints())
            if _fits(r, eng.max_model_len):
                eng.add_request(eid, r.prompt, r.params, r.constraints(), final_only=r.final_only)
                owner[eid] = r.rid
                continue
            with pytest.raises(ValueError, match="context window"):
                eng.add_request(eid, r.prompt, r.params, r.constraints(), final_only=r.final_only)
            assert eid not in eng.requests  # a refused request leaves nothing behind
            done.add(r.rid)
        for r in aborts.get(step, ()):
            eid = engine_id[r.rid]
            if r.rid in done:
                if eid not in owner:  # (else its id names another request by now)
                    assert eng.abort_request(eid) is None, f"{r.rid}: aborting a finished request gave an output"
                continue
            out = eng.abort_request(eid)
            assert out is not None and out.finished, f"{r.rid}: abort gave no final output"
            outs[r.rid].append(out)
            finish(r.rid)
            aborted.add(r.rid)
        for out in eng.step():
            rid = owner.get(out.request_id)
            assert rid is not None, f"{out.request_id}: an output after its final one"
            outs[rid].append(out)
            if out.finished:
                finish(rid)
        _check_engine_state(eng)
        step += 1
        assert step < 5000, "the engine stopped making progress"
    assert done == {r.rid for r in case.requests} and not owner
    return outs, aborted


def _check_empty(eng) -> None:
    bm = eng.block_manager
    assert bm.ref_counts == [0] * bm.num_blocks
    assert bm.num_free_blocks == bm.num_blocks
    bm.check_invariants([])
    assert not eng.requests and not eng.seq_owner and not eng.runner.row_of
    assert not eng.scheduler.has_unfinished() and not eng.scheduler._seqs
    assert eng._num_host_token_requests == eng._num_sampling_requests == 0
    assert not eng._prompt_lp.wanted and not eng._prompt_lp._records
    assert eng.step() == [] and eng._inflight is None and eng._pending is None


def _check_stream(req: FuzzRequest, outs: list[RequestOutput], aborted: bool) -> None:
    """Well-formed outputs: only the last is final, each choice finishes once and says nothing after it,
    logprobs come one per token exactly when asked for."""
    assert all(not o.finished for o in outs[:-1]) and outs[-1].finished
    finished: set[int] = set()
    want_lp = req.params.logprobs
    for o in outs:
        for c in o.outputs:
            assert 0 <= c.index < req.params.n and c.index not in finished, f"{req.rid}: output after finish"
            if c.finish_reason is not None:
                finished.add(c.index)
            if want_lp is None:
                assert c.logprobs is None
            else:
                assert c.logprobs is not None and len(c.logprobs) == len(c.token_ids)
                assert all(len(lp.top) == want_lp for lp in c.logprobs)
                assert [lp.token_id for lp in c.logprobs] == c.token_ids
            assert c.error is None, f"{req.rid}: {c.error}"
    assert finished == set(range(req.params.n))
    sent = sum(o.prompt_logprobs is not None for o in outs)  # once, only when asked for (aborted: maybe not)
    asked = req.params.prompt_logprobs is not None
    assert sent == asked or (aborted and sent < asked), f"{req.rid}: prompt logprobs sent {sent} times"


def _same_choice(rid: str, got: CompletionOutput, want: CompletionOutput) -> None:
    where = f"{rid} choice {got.index}"
    assert got.token_ids == want.token_ids, where
    assert got.text == want.text, where
    assert (got.finish_reason, got.stop_reason) == (want.finish_reason, want.stop_reason), where
    _same_logprobs(where, got.logprobs, want.logprobs)


def _same_logprobs(where: str, got, want) -> None:
    assert (got is None) == (want is None), where
    for a, b in zip(got or (), want or (), strict=True):
        if a is None or b is None:  # (prompt logprobs: the first prompt token has none)
            assert a is b, where
            continue
        assert a.token_id == b.token_id, where
        assert a.logprob == pytest.approx(b.logprob, abs=LOGPROB_TOL), where
        assert [v for _, v in a.top] == pytest.approx([v for _, v in b.top], abs=LOGPROB_TOL), where


def _check_against_alone(req: FuzzRequest, got: RequestOutput, want: RequestOutput, was_aborted: bool) -> None:
    assert len(want.outputs) == req.params.n and all(c.error is None for c in want.outputs)
    assert got.prompt_tokens == want.prompt_tokens
    wanted = {c.index: c for c in want.outputs}
    for c in got.outputs:
        w = wanted[c.index]
        if was_aborted and c.finish_reason == "abort":  # what it streamed before the abort: a prefix
            assert c.token_ids == w.token_ids[:len(c.token_ids)], f"{req.rid} choice {c.index}"
            assert w.text.startswith(c.text), f"{req.rid} choice {c.index}"
            continue
        _same_choice(req.rid, c, w)
    if not was_aborted:
        assert got.completion_tokens == want.completion_tokens, req.rid
        _same_logprobs(req.rid, got.prompt_logprobs, want.prompt_logprobs)


def _check_loosely(req: FuzzRequest, got: RequestOutput, window: int) -> None:
    """Unseeded sampling: no reference, but the lengths and reasons must be possible ones."""
    most = window - got.prompt_tokens
    if req.params.max_tokens is not None:
        most = min(most, req.params.max_tokens)
    for c in got.outputs:
        assert len(c.token_ids) <= most, req.rid
        if c.finish_reason == "length":  # max_tokens, or the context window is full
            assert len(c.token_ids) == most, req.rid
        assert c.finish_reason in ("stop", "length", "abort"), req.rid


def _inject_faults(llm: LLM, rng: random.Random, share: float) -> None:
    """Fail that share of the batched model calls, as a device error would: the engine re-runs the step's
    sequences one by one (device_step.py), and nothing may change in the output. Only before the sampler ran:
    a failure after it would have moved seeded generators on, and the re-run rightly draws other tokens."""
    runner = llm.engine.runner
    real = runner.execute

    def flaky(batch, *args, **kw):
        if batch.meta.num_seqs > 1 and rng.random() < share:
            raise RuntimeError("injected device failure")
        return real(batch, *args, **kw)

    runner.execute = flaky


def run_case(seed: int, tiny_hf, references: Callable[[int | None], LLM], hot
             ) -> tuple[FuzzCase, dict[str, list[RequestOutput]]]:
    """Run one seed's case and check it (see the module docstring). -> (the case, its outputs per request)."""
    case = make_case(seed, *hot)
    llm = LLM(str(tiny_hf), **case.engine_kw)
    window = llm.engine.max_model_len  # max_model_len, or less: the whole cache (SchedulerConfig.max_seq_len)
    reference = references(window if window < MAX_PROMPT + MAX_NEW else None)
    resolve_stops(case, seed, lambda req: _run_alone(reference, req), llm.tokenizer.decode)
    if case.staged:  # the GPU's path: every step's arrays packed into one staged upload (engine/staging.py)
        llm.engine.runner.uploader = StepUploader(llm.engine.device, staged=True)
    if case.faults:
        _inject_faults(llm, random.Random(seed), case.faults)
    outs, aborted = _drive(case, llm)
    _check_empty(llm.engine)
    for req in case.requests:
        if not _fits(req, window):
            continue  # refused when added (checked in _drive)
        stream = outs[req.rid]
        _check_stream(req, stream, req.rid in aborted)
        got = merge_outputs(stream)
        check_text(llm.tokenizer, req.rid, req.prompt, req.params, got.outputs)
        if req.subsets is None:
            check_stop_ids(llm.tokenizer, req.rid, req.params, got.outputs)
        if req.comparable and plain_greedy(req.params, req.subsets is not None):
            check_greedy(llm.engine.model, req.rid, req.prompt, got.outputs)
        if req.comparable:
            _check_against_alone(req, got, _run_alone(reference, req), req.rid in aborted)
        else:
            _check_loosely(req, got, window)
    return case, outs


@pytest.mark.parametrize("seed", _seeds())
def test_engine_fuzz(seed, tiny_hf, references, hot):
    run_case(seed, tiny_hf, references, hot)
