"""TritonPagedAttention vs the exact TorchPagedAttention on the same metadata: outputs and the stored cache."""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE, tolerance

from glm_serve.model.attention import AttnMetadata, LayerCache, TorchPagedAttention, make_backend
from glm_serve.model.triton_backend import TritonPagedAttention


def _metadata(batch) -> AttnMetadata:
    device = batch.q.device
    q_lens = torch.tensor(batch.q_lens, device=device)
    return AttnMetadata(
        cu_seqlens_q=batch.cu_seqlens_q,
        seq_lens=batch.seq_lens,
        slot_mapping=batch.slot_mapping,
        block_tables=batch.block_tables,
        max_seqlen_q=batch.max_seqlen_q,
        max_seqlen_k=batch.max_seqlen_k,
        token_to_seq=torch.repeat_interleave(torch.arange(len(batch.q_lens), device=device), q_lens),
        token_q_offset=torch.cat([torch.arange(n, device=device) for n in batch.q_lens]),
    )


def _run_both(batch, backend, kv_heads, head_dim, seed, layers=2):
    """Run `layers` layers (each its own cache copy and K/V, one shared metadata, as in a model step) through
    both backends; return [(triton_out, torch_out, triton_caches, torch_caches)] per layer."""
    gen = torch.Generator().manual_seed(seed)
    tokens, dtype, device = batch.q.shape[0], batch.q.dtype, batch.q.device
    meta_triton, meta_torch = _metadata(batch), _metadata(batch)
    results = []
    for _ in range(layers):
        q = (torch.randn(batch.q.shape, generator=gen)).to(dtype).to(device)
        k = torch.randn(tokens, kv_heads, head_dim, generator=gen).to(dtype).to(device)
        v = torch.randn(tokens, kv_heads, head_dim, generator=gen).to(dtype).to(device)
        kc_a, vc_a = batch.k_cache.clone(), batch.v_cache.clone()
        kc_b, vc_b = batch.k_cache.clone(), batch.v_cache.clone()
        got = backend.forward(q, k, v, LayerCache(kc_a, vc_a), meta_triton, head_dim**-0.5)
        want = TorchPagedAttention().forward(q, k, v, LayerCache(kc_b, vc_b), meta_torch, head_dim**-0.5)
        results.append((got, want, (kc_a, vc_a), (kc_b, vc_b)))
    return results, meta_triton


# (q_lens, seq_lens, heads, kv_heads, head_dim, block_size, decode_splits)
CASES = {
    "mixed_prefill_prefix_decode": ([1, 12, 5, 1], [40, 12, 70, 17], 16, 2, 64, 16, None),
    "chunked_prefill_mha": ([33, 7], [33, 100], 4, 4, 32, 8, None),
    "decode_one_split": ([1, 1, 1, 1], [1, 33, 90, 16], 8, 1, 32, 8, None),
    "decode_four_splits_gqa16": ([1, 1, 1], [300, 5, 64], 32, 2, 64, 16, 4),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", list(CASES))
def test_backend_matches_torch(paged_batch, case, dtype):
    q_lens, seq_lens, heads, kv_heads, head_dim, block_size, splits = CASES[case]
    # Junk instead of NaN outside the sequences: the torch backend reads whole blocks and masks afterwards.
    batch = paged_batch(q_lens, seq_lens, heads=heads, kv_heads=kv_heads, head_dim=head_dim, block_size=block_size,
                        dtype=dtype, seed=len(case), poison=100.0)  # fmt: skip
    backend = TritonPagedAttention(decode_splits=splits)
    results, meta = _run_both(batch, backend, kv_heads, head_dim, seed=len(case) + 1)
    for got, want, (kc_a, vc_a), (kc_b, vc_b) in results:
        assert torch.equal(kc_a, kc_b) and torch.equal(vc_a, vc_b)  # the new K/V landed in the same slots
        torch.testing.assert_close(got.float(), want.float(), **tolerance(dtype))
    is_decode = max(q_lens) == 1
    assert any(key[0] == "triton_decode" for key in (meta.cache or {})) == is_decode


def test_make_backend_builds_triton():
    backend = make_backend("triton")
    assert isinstance(backend, TritonPagedAttention) and backend.name == "triton"
    with pytest.raises(ValueError, match="decode_splits"):
        TritonPagedAttention(decode_splits=0)


def test_tiny_model_generates_the_same_tokens(tiny_hf):
    """End to end through the model (strided q/k/v views from the fused projection, prefill then decode
    steps): greedy generation with the Triton backend equals the torch backend's, token for token."""
    from glm_serve.loader import load_model  # noqa: PLC0415 (only this test needs the loader)
    from glm_serve.model.simple import generate_simple  # noqa: PLC0415

    model = load_model(tiny_hf, device=DEVICE)
    prompt = torch.randint(0, model.config.vocab_size, (37,), generator=torch.Generator().manual_seed(5)).tolist()
    want = generate_simple(model, prompt, max_tokens=6)
    model.set_backend(TritonPagedAttention())
    assert generate_simple(model, prompt, max_tokens=6) == want
    model.use_fused_ops(True)  # norms, RoPE and silu * up as our kernels too
    assert generate_simple(model, prompt, max_tokens=6) == want


@pytest.mark.parametrize("fixture", ["tiny_hf", "tiny_chatglm", "tiny_glm4"])  # glm4: sandwich norms
def test_fused_ops_give_the_plain_forward_hidden_states(request, fixture):
    """The fused path's hidden states (prefill of a 29-token chunk over a 40-token cached prefix, then a
    decode row) against the plain path's, both over the triton attention backend, in float32."""
    from glm_serve.loader import load_model  # noqa: PLC0415
    from glm_serve.model.simple import allocate_cache, single_seq_meta  # noqa: PLC0415

    model = load_model(request.getfixturevalue(fixture), device=DEVICE)
    model.set_backend(TritonPagedAttention())
    gen = torch.Generator().manual_seed(11)
    ids = torch.randint(0, model.config.vocab_size, (70,), generator=gen).to(DEVICE)
    got = {}
    for fused in (False, True):
        model.use_fused_ops(fused)
        caches, num_blocks = allocate_cache(model, 80, 16, torch.float32, DEVICE)
        outs = []
        with torch.inference_mode():
            for start, n in ((0, 40), (40, 29), (69, 1)):
                meta = single_seq_meta(start, n, 16, num_blocks, DEVICE)
                pos = torch.arange(start, start + n, device=DEVICE)
                outs.append(model(ids[start : start + n], pos, meta, caches))
        got[fused] = torch.cat(outs)
    assert got[True].shape == (70, model.config.hidden_size)
    torch.testing.assert_close(got[True], got[False], atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("num_sms, max_len, expected", [(132, 131072, [2, 4, 8, 16, 32, 64]),
                                                        (132, 2048, [2, 4, 8]), (1, 131072, [])])
def test_warm_up_launches_every_decode_split_count_a_step_can_choose(monkeypatch, num_sms, max_len, expected):
    """NUM_SPLITS is compile-time: the warm-up launches each count choose_num_splits can return here, so no
    first long-context decode compiles mid-serving; the launches leave the cache untouched."""
    from glm_serve.kernels import choose_num_splits
    from glm_serve.model import triton_backend

    backend = TritonPagedAttention()
    monkeypatch.setattr(backend, "_sm_count", lambda device: num_sms)
    launched = []
    real = triton_backend.paged_decode

    def spy(q, k_cache, v_cache, seq_lens, tables, scale, num_splits, **kw):
        out = real(q, k_cache, v_cache, seq_lens, tables, scale, num_splits, **kw)
        assert torch.equal(out, torch.zeros_like(out))  # an empty context attends to nothing
        launched.append(num_splits)
        return out

    monkeypatch.setattr(triton_backend, "paged_decode", spy)
    k_cache = torch.randn(4, 16, 2, 32, device=DEVICE)
    v_cache, before = torch.randn_like(k_cache), k_cache.clone()
    assert backend.warm_up(LayerCache(k_cache, v_cache), num_heads=8, max_seqlen_k=max_len,
                          dtype=k_cache.dtype) == expected == launched
    reachable = {choose_num_splits(b, 2, ctx, num_sms) for b in range(1, 257) for ctx in range(1, max_len + 1, 97)}
    assert reachable - {1} == set(expected)  # every count a step can pick, and only those
    assert torch.equal(k_cache, before)
