"""TorchPagedAttention (glm_serve/model/attention.py) against the float64 reference, across key chunks: the
long-context path (online softmax over chunks of `key_chunk` keys) must give the same answer as the one-call
path, and its transient memory must not grow with the context."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from glm_serve.kernels.reference import paged_attention_ref, quantize_fp8_ref, store_kv_ref
from glm_serve.model.attention import AttnMetadata, LayerCache, TorchPagedAttention


def _batch(starts, n_new, *, heads, kv_heads, head_dim=16, block=4, dtype=torch.float32, seed=0, host=True):
    """A flat batch as the runner builds it: sequence b has starts[b] keys cached and n_new[b] new tokens, its
    blocks a random permutation of the cache; every slot outside a sequence holds junk (100: a stray read shows).
    -> q, k, v [T, *, D] of the new tokens, k_cache, v_cache, meta (with host lengths when `host`)."""
    gen = torch.Generator().manual_seed(seed)
    total = [s + n for s, n in zip(starts, n_new)]
    need = [-(-t // block) for t in total]
    perm = torch.randperm(sum(need) + 2, generator=gen)
    width = max(need)
    tables = torch.zeros(len(total), width, dtype=torch.int32)  # [B, width], padded with 0 (a real block)
    k_cache = torch.full((sum(need) + 2, block, kv_heads, head_dim), 100.0)
    v_cache = k_cache.clone()
    slots, used = [], 0
    for b, (s, t) in enumerate(zip(starts, total)):
        tables[b, :need[b]] = perm[used:used + need[b]].int()
        used += need[b]
        pos = torch.arange(t)
        rows = tables[b, pos // block].long() * block + pos % block  # [t] slot of each key
        k_cache.view(-1, kv_heads, head_dim)[rows[:s]] = torch.randn(s, kv_heads, head_dim, generator=gen)
        v_cache.view(-1, kv_heads, head_dim)[rows[:s]] = torch.randn(s, kv_heads, head_dim, generator=gen)
        slots.append(rows[s:])
    T = sum(n_new)
    q, k, v = (torch.randn(T, h, head_dim, generator=gen).to(dtype) for h in (heads, kv_heads, kv_heads))
    cu = np.concatenate([[0], np.cumsum(n_new)]).astype(np.int64)
    meta = AttnMetadata(
        cu_seqlens_q=torch.from_numpy(cu).int(), seq_lens=torch.tensor(total, dtype=torch.int32),
        slot_mapping=torch.cat(slots), block_tables=tables, max_seqlen_q=max(n_new), max_seqlen_k=max(total),
        token_to_seq=torch.repeat_interleave(torch.arange(len(n_new)), torch.tensor(n_new)),
        token_q_offset=torch.cat([torch.arange(n) for n in n_new]),
    )
    if host:  # decode and prefill rows then go in separate groups (a group each of them when mixed)
        meta.host_q_lens, meta.host_seq_lens, meta.host_cu_seqlens_q = np.array(n_new), np.array(total), cu
    return q, k, v, k_cache.to(dtype), v_cache.to(dtype), meta


def _run(monkeypatch, key_chunk, q, k, v, k_cache, v_cache, meta, **kw):
    """-> (output [T, H, D], how many SDPA calls it made: the one-chunk path's, 0 on the chunked path)."""
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def counting(*args, **kw):
        calls.append(args[0].shape)
        return sdpa(*args, **kw)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting)
    out = TorchPagedAttention(key_chunk, **kw).forward(q, k, v, LayerCache(k_cache, v_cache), meta,
                                                     q.shape[-1] ** -0.5)
    return out, len(calls)


# (starts, n_new, heads, kv_heads): cached keys and new tokens per sequence, block size 4
CASES = {
    "decode_gqa16": ([37, 5, 64, 15, 0], [1, 1, 1, 1, 1], 32, 2),
    "prefill_mha_odd": ([0, 21], [33, 7], 4, 4),
    "mixed_gqa8": ([25, 0, 9, 3, 40, 31], [1, 13, 1, 6, 1, 17], 32, 4),
    "block_and_chunk_edges": ([15, 16, 31, 32, 47], [1, 1, 1, 16, 1], 16, 2),  # totals 16, 17, 32, 48, 48
}


@pytest.mark.parametrize("rows", [None, 8], ids=["any_rows", "8_key_rows"])  # 8: chunks of 1-2 blocks in all
@pytest.mark.parametrize("host", [True, False], ids=["grouped", "one_group"])
@pytest.mark.parametrize("key_chunk", [1, 10, 16])  # 1 block (less than one asked), 2 blocks (10 rounds down), 4
@pytest.mark.parametrize("case", list(CASES))
def test_chunked_matches_reference(monkeypatch, case, key_chunk, host, rows):
    starts, n_new, heads, kv_heads = CASES[case]
    q, k, v, kc, vc, meta = _batch(starts, n_new, heads=heads, kv_heads=kv_heads, seed=len(case) + key_chunk,
                                   host=host)
    out, sdpa_calls = _run(monkeypatch, key_chunk, q, k, v, kc, vc, meta, **({"chunk_key_rows": rows} if rows else {}))
    assert sdpa_calls == 0  # every case spans several chunks: the chunked path ran, for every group
    want = paged_attention_ref(q, kc, vc, meta.cu_seqlens_q, meta.seq_lens, meta.block_tables, q.shape[-1] ** -0.5)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    one_call, sdpa_calls = _run(monkeypatch, 4096, q, k, v, kc.clone(), vc.clone(), meta)
    assert sdpa_calls == len(meta.cache["torch_groups"])  # short contexts: one SDPA call per group, as before
    torch.testing.assert_close(out, one_call, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 2e-3), (torch.bfloat16, 1e-2)])
def test_chunked_half_precision_is_rounded_float32(monkeypatch, dtype, tol):
    """Half-precision caches: scores and the softmax run in float32, so the only error is the output rounding."""
    q, k, v, kc, vc, meta = _batch([5, 0, 40], [1, 13, 9], heads=16, kv_heads=2, dtype=dtype, seed=3)
    out, _ = _run(monkeypatch, 8, q, k, v, kc, vc, meta)
    want = paged_attention_ref(q.double(), kc.double(), vc.double(), meta.cu_seqlens_q, meta.seq_lens,
                               meta.block_tables, q.shape[-1] ** -0.5)
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), want, atol=tol, rtol=tol)


def test_a_large_group_takes_shorter_chunks(monkeypatch):
    """chunk_key_rows bounds a chunk's keys over all its sequences: eight decodes with 32 key rows per chunk
    (8 blocks of 4) read one block of each while all eight have keys there, then longer chunks as they drop out."""
    starts = [60, 9, 33, 47, 20, 5, 70, 41]
    q, k, v, kc, vc, meta = _batch(starts, [1] * 8, heads=8, kv_heads=2, seed=13)
    out, _ = _run(monkeypatch, 16, q, k, v, kc, vc, meta, chunk_key_rows=32)
    plan = meta.cache["torch_groups"][0].plans[4, 8]
    assert all(c.active * c.blocks <= 8 or c.blocks == 1 for c in plan.chunks)
    assert [c.blocks for c in plan.chunks][:2] == [1, 1] and plan.chunks[-1].active == 1
    assert sum(c.blocks for c in plan.chunks) == meta.block_tables.shape[1]  # every block once, in order
    want = paged_attention_ref(q, kc, vc, meta.cu_seqlens_q, meta.seq_lens, meta.block_tables, q.shape[-1] ** -0.5)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)


def test_padding_rows_stay_finite_and_store_nothing(monkeypatch):
    """A CUDA-graph-style padding row (slot -1, no keys) beside real decodes: real rows exact, padding row finite
    (it sees key 0, so the chunk merge never divides by zero), nothing stored for it."""
    q, k, v, kc, vc, meta = _batch([37, 20], [1, 1], heads=8, kv_heads=2, seed=5, host=False)
    meta.slot_mapping = torch.cat([meta.slot_mapping, torch.tensor([-1])])
    meta.seq_lens = torch.cat([meta.seq_lens, torch.tensor([0], dtype=torch.int32)])
    meta.cu_seqlens_q = torch.arange(4, dtype=torch.int32)
    meta.block_tables = torch.cat([meta.block_tables, torch.zeros_like(meta.block_tables[:1])])
    meta.token_to_seq, meta.token_q_offset = torch.arange(3), torch.zeros(3, dtype=torch.int64)
    q, k, v = (torch.cat([x, torch.randn(1, *x.shape[1:])]) for x in (q, k, v))
    before = kc.clone()
    out, _ = _run(monkeypatch, 8, q, k, v, kc, vc, meta)
    assert torch.isfinite(out).all()
    want = paged_attention_ref(q[:2], kc, vc, meta.cu_seqlens_q[:3], meta.seq_lens[:2], meta.block_tables[:2],
                               q.shape[-1] ** -0.5)
    torch.testing.assert_close(out[:2], want, atol=1e-5, rtol=1e-5)
    assert (kc != before).any(-1).sum().item() == 2 * kc.shape[2]  # the two real tokens' rows only


class _LargestAllocation(TorchDispatchMode):
    """Records the largest tensor any op creates (outputs sharing storage with an input, views and in-place
    results, are not allocations)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {a.untyped_storage().data_ptr() for a in torch.utils._pytree.tree_leaves((args, kwargs))
                  if isinstance(a, torch.Tensor)}
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.largest = max(self.largest, t.untyped_storage().nbytes())
        return out


def _largest_allocation(key_chunk: int, context: int, n_new: int) -> int:
    q, k, v, kc, vc, meta = _batch([context - n_new, context - 1], [n_new, 1], heads=32, kv_heads=2, seed=1)
    with _LargestAllocation() as mode:
        TorchPagedAttention(key_chunk).forward(q, k, v, LayerCache(kc, vc), meta, 0.25)
    return mode.largest


def test_transient_memory_does_not_grow_with_context():
    """With 64-key chunks the largest temporary (the scores of one chunk: 32 heads x 48 queries x 64 keys in
    float32) is the same at 512 and 4096 keys of context; attending the whole context in one call (the old
    path) makes temporaries that grow with it (mask and gathered keys)."""
    n_new = 48
    chunked = [_largest_allocation(64, ctx, n_new) for ctx in (512, 4096)]
    assert chunked[0] == chunked[1] <= 32 * n_new * 64 * 4
    whole = [_largest_allocation(1 << 20, ctx, n_new) for ctx in (512, 4096)]
    assert whole[1] >= 8 * whole[0] > chunked[1]


class _ScoreCount(TorchDispatchMode):
    """Counts the elements of every batched matmul output (the chunked path's scores and P.V products)."""

    def __init__(self):
        super().__init__()
        self.elements = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.aten.bmm.default:
            self.elements += out.numel()
        return out


def test_short_contexts_skip_the_chunks_past_their_end(monkeypatch):
    """One 200-key decode beside seven short ones, 16-key chunks: chunk 0 takes all eight sequences, the other
    twelve chunks only the long one (longest-first order), and the chunks wholly before every new token need no
    mask; the answer is still exact. Padding every sequence to 200 keys would compute 8x the scores."""
    starts = [3, 9, 199, 0, 5, 12, 7, 1]  # the long one in the middle: the order is put back afterwards
    q, k, v, kc, vc, meta = _batch(starts, [1] * 8, heads=8, kv_heads=2, block=4, seed=11)
    with _ScoreCount() as count:
        out = TorchPagedAttention(16).forward(q, k, v, LayerCache(kc, vc), meta, 0.25)
    plan = meta.cache["torch_groups"][0].plans[4, 16384]  # 4 blocks per sequence, 65536 keys in all
    assert [c.active for c in plan.chunks] == [8] + [1] * 12
    assert [c.masked for c in plan.chunks] == [True] + [False] * 11 + [True]
    # per sequence and chunk: kvh (2) x query rows (4 heads per KV head) x (n scores + head_dim 16 outputs);
    # 200 keys = 12 chunks of 16 and one of 8
    assert count.elements == 2 * 4 * ((16 + 16) * (8 + 11) + (8 + 16) * 1)
    want = paged_attention_ref(q, kc, vc, meta.cu_seqlens_q, meta.seq_lens, meta.block_tables, 0.25)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("host", [True, False], ids=["grouped", "one_group"])
@pytest.mark.parametrize("case", ["decode_gqa16", "mixed_gqa8"])
def test_fp8_cache_chunked_and_one_call_paths(case, host):
    """Over an fp8 cache (--kv-cache-dtype fp8) both paths store what the reference quantizer stores and read it
    back as its rows times their scales: the chunked path (float32 per head) and the one-call path (the model's
    dtype) give the reference's answer."""
    starts, n_new, heads, kv_heads = CASES[case]
    q, k, v, kc, vc, meta = _batch(starts, n_new, heads=heads, kv_heads=kv_heads, seed=2, host=host)
    (k8, ks), (v8, vs) = quantize_fp8_ref(kc), quantize_fp8_ref(vc)
    want = [t.clone() for t in (k8, v8, ks, vs)]
    store_kv_ref(k, v, *want[:2], meta.slot_mapping, *want[2:])
    ref = paged_attention_ref(q, *want[:2], meta.cu_seqlens_q, meta.seq_lens, meta.block_tables, 0.25, *want[2:])
    for key_chunk in (4, 4096):  # one block per chunk; one call
        cache = LayerCache(*(t.clone() for t in (k8, v8, ks, vs)))
        meta.cache = None
        out = TorchPagedAttention(key_chunk).forward(q, k, v, cache, meta, 0.25)
        assert torch.equal(cache.k.view(torch.uint8), want[0].view(torch.uint8)) and torch.equal(cache.v_scale, want[3])
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
