"""The engine with --kv-cache-dtype fp8: the cache really is e4m3 with row scales, holds about twice (here, against
float32, four times) the tokens in the same memory, stays close to the full-precision cache, and keeps every
engine guarantee: batch invariance, preemption and recompute, prefix sharing, the same tokens from the Triton
kernels as from the torch backend."""

from __future__ import annotations

import pytest
import torch

from glm_serve.engine.config import EngineConfig
from glm_serve.llm import LLM
from glm_serve.sampling_params import SamplingParams

from .workloads import random_prompts, sharing_workload

GREEDY = dict(temperature=0.0, ignore_eos=True)


def test_fp8_cache_layout_and_capacity(tiny_hf):
    full = LLM(str(tiny_hf), max_num_seqs=8)  # the CPU's default 1 GiB cache budget
    fp8 = LLM(str(tiny_hf), max_num_seqs=8, kv_cache_dtype="fp8")
    cache = fp8.engine.runner.kv_caches[0]
    assert cache.k.dtype == cache.v.dtype == torch.float8_e4m3fn
    assert cache.k_scale.shape == cache.k.shape[:3] and cache.k_scale.dtype == torch.float32
    assert full.engine.runner.kv_caches[0].k_scale is None
    mc = fp8.engine.model_config
    per_token = {"fp8": mc.num_layers * 2 * mc.num_kv_heads * (mc.head_dim + 4),  # a byte a value, 4 per scale
                 "full": mc.num_layers * 2 * mc.num_kv_heads * mc.head_dim * 4}  # float32 on the CPU
    assert mc.kv_bytes_per_token(4, fp8=True) == per_token["fp8"]
    ratio = fp8.engine.kv_capacity_tokens / full.engine.kv_capacity_tokens
    assert ratio == pytest.approx(per_token["full"] / per_token["fp8"], rel=0.01)


def test_fp8_cache_stays_close_to_the_full_precision_one(tiny_hf):
    """Prompt logprobs of the same prompts from both caches: different (the cache really is fp8), and close."""
    prompts = random_prompts(3, seed=4, lo=40, hi=80)
    params = SamplingParams(max_tokens=1, prompt_logprobs=0, **GREEDY)
    got = {}
    for dtype in ("auto", "fp8"):
        llm = LLM(str(tiny_hf), kv_cache_tokens=4096, kv_cache_dtype=dtype)
        got[dtype] = [lp.logprob for r in llm.generate(prompts, params, use_tqdm=False)
                      for lp in r.prompt_logprobs[1:]]
    diff = [abs(a - b) for a, b in zip(got["auto"], got["fp8"])]
    assert max(diff) > 0
    assert max(diff) < 0.05 * max(abs(x) for x in got["auto"])


def test_fp8_cache_batch_invariance_preemption_and_sharing(tiny_hf):
    """A cache so small that requests are preempted and recomputed, n = 2 siblings and shared prefixes: each
    choice gets the tokens its prompt gets alone on a roomy fp8 cache (quantization is per token row, so what a
    token's K/V is does not depend on its batch)."""
    prompts, params = sharing_workload(1, other_seed=50, other_lens=(20, 60), max_tokens=(20, 50), **GREEDY)
    small = LLM(str(tiny_hf), kv_cache_tokens=256, max_batch_tokens=96, max_num_seqs=8, kv_cache_dtype="fp8")
    roomy = LLM(str(tiny_hf), kv_cache_tokens=4096, kv_cache_dtype="fp8")
    got = small.generate(prompts, params, use_tqdm=False)
    assert small.engine.scheduler.num_preemptions > 0 and small.engine.block_manager.hit_rate > 0
    for p, sp, r in zip(prompts, params, got):
        alone = roomy.generate([p], SamplingParams(max_tokens=sp.max_tokens, **GREEDY), use_tqdm=False)[0]
        assert all(c.error is None and c.token_ids == alone.token_ids for c in r.choices)
    bm = small.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks and not small.engine.requests


def test_triton_kernels_serve_the_torch_backends_fp8_tokens(tiny_hf):
    """Chunked prefill, decode and a prefix hit through the engine with the Triton kernels (interpreted on the
    CPU) over the fp8 cache: the torch backend's tokens, and logprobs within float32 noise."""
    pytest.importorskip("triton")
    prompts = random_prompts(4, seed=12, lo=20, hi=70)
    prompts.append(prompts[0][:40] + [5, 6, 7])  # shares full blocks with prompts[0]
    params = SamplingParams(max_tokens=10, logprobs=0, **GREEDY)
    runs = {}
    for backend in ("torch", "triton"):
        llm = LLM(str(tiny_hf), kv_cache_tokens=2048, max_batch_tokens=64, max_num_seqs=8, kv_cache_dtype="fp8",
                  attention_backend=backend)
        runs[backend] = llm.generate(prompts, params, use_tqdm=False)
    assert [r.token_ids for r in runs["triton"]] == [r.token_ids for r in runs["torch"]]
    assert [lp.logprob for r in runs["triton"] for lp in r.choices[0].logprobs] == pytest.approx(
        [lp.logprob for r in runs["torch"] for lp in r.choices[0].logprobs], abs=1e-4)


def test_kv_cache_dtype_is_checked():
    with pytest.raises(ValueError, match="kv-cache-dtype"):
        EngineConfig(kv_cache_dtype="int4")


def test_fp8_cache_on_the_padded_graph_path_and_in_the_warm_up(tiny_hf, monkeypatch):
    """--cuda-graphs' padded static-buffer decode (run eagerly on the CPU) over the fp8 cache: padding rows store
    no values and no scales, so the tokens are the plain fp8 engine's. And the triton backend's warm-up launches
    every decode split count over an fp8 cache (on a GPU it compiles those variants before the first request)."""
    pytest.importorskip("triton")
    prompts = random_prompts(5, seed=13, lo=3, hi=40)
    params = [SamplingParams(max_tokens=n, **GREEDY) for n in (3, 9, 14, 6, 11)]
    kw = dict(kv_cache_tokens=2048, max_num_seqs=8, max_batch_tokens=64, attention_backend="triton",
              kv_cache_dtype="fp8")
    plain = LLM(str(tiny_hf), **kw)
    graphs = LLM(str(tiny_hf), cuda_graphs=True, **kw)
    want = [r.token_ids for r in plain.generate(prompts, params, use_tqdm=False)]
    assert [r.token_ids for r in graphs.generate(prompts, params, use_tqdm=False)] == want

    backend, eng = plain.engine.model.backend, plain.engine
    monkeypatch.setattr(backend, "_sm_count", lambda device: 132)
    cache = eng.runner.kv_caches[0]
    before = cache.k.view(torch.uint8).clone(), cache.k_scale.clone()
    splits = backend.warm_up(cache, eng.model_config.num_heads, 4096, eng.dtype)
    assert splits and torch.equal(cache.k.view(torch.uint8), before[0]) and torch.equal(cache.k_scale, before[1])
