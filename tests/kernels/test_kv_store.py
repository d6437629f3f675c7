"""kv_store.store_kv vs reference.store_kv_ref: exact copies into a paged cache, padding slots skipped."""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE

from glm_serve.kernels import store_kv
from glm_serve.kernels.reference import store_kv_ref


@pytest.mark.parametrize(
    "tokens, kv_heads, head_dim, block_size, src_dtype, cache_dtype",
    [
        (1, 2, 128, 16, torch.float32, torch.float32),
        (37, 2, 128, 16, torch.float16, torch.float16),
        (64, 4, 64, 1, torch.float32, torch.float32),
        (29, 1, 32, 8, torch.float32, torch.float16),  # converts on store
        (50, 3, 80, 32, torch.float16, torch.float16),  # head count and head_dim not powers of two
    ],
)
def test_store_matches_reference(tokens, kv_heads, head_dim, block_size, src_dtype, cache_dtype):
    gen = torch.Generator().manual_seed(tokens * 7 + head_dim)
    num_blocks = tokens // block_size + 4
    heads = 4  # k and v are strided views into a fused [T, (heads + 2 * kv_heads) * D] projection
    fused = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, generator=gen).to(src_dtype)
    k = fused[:, heads * head_dim : (heads + kv_heads) * head_dim].view(tokens, kv_heads, head_dim)
    v = fused[:, (heads + kv_heads) * head_dim :].view(tokens, kv_heads, head_dim)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:tokens]
    slots[torch.rand(tokens, generator=gen) < 0.2] = -1  # padding rows of a CUDA-graph bucket
    k_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=gen).to(cache_dtype)
    v_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=gen).to(cache_dtype)
    want_k, want_v = k_cache.clone(), v_cache.clone()
    store_kv_ref(k, v, want_k, want_v, slots)

    got_k, got_v = k_cache.to(DEVICE), v_cache.to(DEVICE)
    store_kv(k.to(DEVICE), v.to(DEVICE), got_k, got_v, slots.to(DEVICE))
    assert torch.equal(got_k.cpu(), want_k)
    assert torch.equal(got_v.cpu(), want_v)


def test_store_rejects_bad_shapes():
    k = torch.zeros(3, 2, 16)
    cache = torch.zeros(4, 8, 2, 16)
    with pytest.raises(ValueError, match="slot_mapping"):
        store_kv(k, k, cache, cache, torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="cache holds"):
        store_kv(k, k, torch.zeros(4, 8, 1, 16), torch.zeros(4, 8, 1, 16), torch.zeros(3, dtype=torch.long))
