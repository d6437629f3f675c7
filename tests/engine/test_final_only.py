"""Held outputs. final_only requests (LLM.generate, non-streaming API calls): the engine sends the first tokens'
output and then one final output holding the rest. With a stream_interval above 1, streamed requests get an
output every that many tokens. Either way the outputs add up to exactly what a plain stream gets."""

from __future__ import annotations

import asyncio

import pytest

from glm_serve.engine.async_engine import AsyncEngine, merge_final
from glm_serve.engine.outputs import merge_outputs
from glm_serve.llm import LLM
from glm_serve.sampling_params import SamplingParams

from .test_engine import ForcedText, _all_blocks_free, _prompts

GREEDY = dict(temperature=0.0, ignore_eos=True)


def _llm(tiny_hf, **kw):
    return LLM(str(tiny_hf), kv_cache_tokens=4096, max_batch_tokens=128, max_num_seqs=16, **kw)  # long: chunks


@pytest.fixture(scope="module")
def llm(tiny_hf):
    return _llm(tiny_hf)


def _workload(llm):
    """(request id, prompt, params, abort at this step or None): n=1 and n=2, seeds, logprobs, a stop string
    met mid-answer, a one-token answer, a long prompt prefilled in chunks, and two aborted midway."""
    prompts = _prompts(8, seed=21, lo=3, hi=300)
    probe = llm.generate([prompts[0]], SamplingParams(max_tokens=30, **GREEDY), use_tqdm=False)[0].choices[0]
    stop = probe.text[len(probe.text) // 2:][:3]  # from the greedy answer itself: it is met
    assert stop
    return [
        ("stop", prompts[0], SamplingParams(max_tokens=30, stop=[stop], **GREEDY), None),
        ("n2", prompts[1], SamplingParams(n=2, temperature=0.8, seed=3, max_tokens=17, logprobs=2, ignore_eos=True),
         None),
        ("one", prompts[2], SamplingParams(max_tokens=1, **GREEDY), None),
        ("long", prompts[3], SamplingParams(max_tokens=9, **GREEDY), None),
        ("ab", prompts[4], SamplingParams(max_tokens=40, **GREEDY), 16),
        ("ab2", prompts[5], SamplingParams(n=2, temperature=1.0, seed=5, max_tokens=40, ignore_eos=True), 19),
        ("lp", prompts[6], SamplingParams(max_tokens=12, logprobs=0, **GREEDY), None),
        # a stop token id met mid-answer (not text: the held text is released), and sampled answers that end on
        # the checkpoint's own stop tokens or at max_tokens, whichever comes first
        ("stop_id", prompts[0], SamplingParams(max_tokens=30, temperature=0.0, stop_token_ids=[probe.token_ids[9]]),
         None),
        *((f"eos{k}", prompts[7], SamplingParams(n=2, temperature=1.5, seed=k, max_tokens=120), None)
          for k in range(2)),
    ]


def _run(tiny_hf, work, final_only: bool, **kw) -> dict[str, list]:
    """The workload on a fresh engine (the same steps, the same batches, whatever ran before)."""
    eng, outs = _llm(tiny_hf, **kw).engine, {}
    for rid, prompt, params, _ in work:
        eng.add_request(rid, prompt, params, final_only=final_only)
        outs[rid] = []
    step = 0
    while eng.has_unfinished():
        step += 1
        for rid, _, _, abort_at in work:
            if abort_at == step:
                out = eng.abort_request(rid)
                if out is not None:
                    outs[rid].append(out)
        for out in eng.step():
            outs[out.request_id].append(out)
    _all_blocks_free(eng)
    return outs


def _summary(out):
    return (out.finished, out.prompt_tokens, out.completion_tokens, out.cached_tokens,
            [(o.index, o.text, o.token_ids, None if o.logprobs is None else [(lp.token_id, lp.logprob, lp.top)
                                                                             for lp in o.logprobs],
              o.finish_reason, o.stop_reason, o.error) for o in out.outputs])


def test_final_only_adds_up_to_the_stream(llm, tiny_hf):
    work = _workload(llm)
    streamed, held = _run(tiny_hf, work, final_only=False), _run(tiny_hf, work, final_only=True)
    for rid, outs in held.items():
        assert outs[-1].finished and all(not o.finished for o in outs[:-1])
        assert len(outs) == (1 if rid == "one" else 2) <= len(streamed[rid])
        assert outs[0].outputs and outs[0].outputs[0].token_ids  # the first output carries tokens (TTFT)
        assert _summary(merge_outputs(outs)) == _summary(merge_outputs(streamed[rid]))
    reasons = {rid: [o.finish_reason for o in merge_outputs(outs).outputs] for rid, outs in held.items()}
    assert reasons["stop"] == ["stop"] and reasons["one"] == ["length"] and reasons["ab"] == ["abort"]
    assert reasons["ab2"] == ["abort", "abort"] and reasons["n2"] == ["length", "length"]
    assert merge_outputs(held["ab"]).completion_tokens >= 5  # the abort came mid-answer, with what was held
    assert reasons["stop_id"] == ["stop"] and len(merge_outputs(held["stop_id"]).outputs[0].token_ids) <= 10
    assert "stop" in {r for k in range(2) for r in reasons[f"eos{k}"]}  # some ended on a checkpoint stop token


def test_stream_interval_sends_every_k_tokens_and_adds_up_to_the_stream(llm, tiny_hf):
    work = _workload(llm)
    streamed, chunked = _run(tiny_hf, work, final_only=False), _run(tiny_hf, work, False, stream_interval=4)
    for rid, outs in chunked.items():
        assert _summary(merge_outputs(outs)) == _summary(merge_outputs(streamed[rid]))
        assert outs[-1].finished and all(not o.finished for o in outs[:-1])
        sizes = [max((len(o.token_ids) for o in out.outputs), default=0) for out in outs]
        assert sizes[0] == 1  # the first token goes alone (time to first token)
        # then every 4 tokens per choice, save a finish (or an abort) that flushes early
        assert all(size <= 4 for size in sizes) and all(size == 4 for size in sizes[1:-1] if rid != "n2")
        total = max(len(o.token_ids) for o in merge_outputs(outs).outputs)
        assert len(outs) <= 2 + total // 4 and (total < 9 or len(outs) < len(streamed[rid]))


def test_final_only_failure_reports_what_was_held(llm):
    """A constraint that fails after a few tokens fails its request alone; its final output holds the tokens
    made before the failure and the error."""

    class FailsLater(ForcedText):
        def accept(self, token_id):
            if self.pos == 4:
                raise RuntimeError("boom at 4")
            super().accept(token_id)

    async def run():
        aeng = AsyncEngine(llm.engine)
        try:
            bad = [o async for o in aeng.generate("bad", [1, 2, 3], SamplingParams(max_tokens=20),
                                                  [FailsLater(list(range(100, 120)), 2048)], final_only=True)]
            good = [o async for o in aeng.generate("good", [4, 5, 6], SamplingParams(max_tokens=8, **GREEDY),
                                                   final_only=True)]
            return bad, good
        finally:
            aeng.shutdown()

    bad, good = asyncio.run(run())
    assert len(bad) == 2 and bad[-1].finished
    got = merge_final(bad)[0]
    assert got.finish_reason == "error" and "boom at 4" in got.error
    assert got.token_ids == list(range(100, 104))  # the four accepted tokens, held, then reported with the error
    assert len(good) == 2 and merge_final(good)[0].token_ids == llm.generate(
        [[4, 5, 6]], SamplingParams(max_tokens=8, **GREEDY), use_tqdm=False)[0].token_ids
    _all_blocks_free(llm.engine)
