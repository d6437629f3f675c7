"""prefill.paged_prefill vs reference.paged_attention_ref on random paged batches of many shapes."""

from __future__ import annotations

import pytest
import torch
from conftest import tolerance

from glm_serve.kernels import paged_prefill
from glm_serve.kernels.reference import paged_attention_ref

# (q_lens, seq_lens, heads, kv_heads, head_dim, block_size, block_m, block_n)
CASES = {
    "no_prefix_odd_lengths_mha": ([1, 17, 33], [1, 17, 33], 4, 4, 64, 16, 128, 64),
    "prefix_hits_gqa8": ([5, 64, 3], [45, 80, 103], 16, 2, 128, 8, 128, 64),
    "block_size_1_gqa16": ([7, 20], [30, 20], 16, 1, 32, 1, 128, 16),
    "long_prefix_block32": ([9], [700], 32, 2, 128, 32, 128, 64),
    "mixed_decode_rows": ([1, 1, 24], [50, 129, 24], 16, 1, 64, 16, 128, 32),
    "block_boundaries": ([64, 16, 48], [128, 64, 112], 8, 8, 32, 16, 64, 16),
    "one_token_per_tile": ([13, 2], [13, 40], 16, 1, 32, 8, 16, 16),
    "head_dim_80_gqa4": ([11, 6], [11, 70], 8, 2, 80, 16, 64, 32),
    # prefix of block_n - 2 keys: the first query row's position is one short of a key-tile boundary
    "diagonal_at_tile_edge": ([20, 9], [82, 39], 16, 2, 64, 16, 128, 64),
    # head_dim below the dots' minimum width of 16: padded to 16 and masked
    "head_dim_8": ([5, 9], [5, 30], 4, 2, 8, 16, 16, 16),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", list(CASES))
def test_prefill_matches_reference(paged_batch, case, dtype):
    q_lens, seq_lens, heads, kv_heads, head_dim, block_size, block_m, block_n = CASES[case]
    batch = paged_batch(
        q_lens, seq_lens, heads=heads, kv_heads=kv_heads, head_dim=head_dim, block_size=block_size,
        dtype=dtype, seed=len(case),
    )  # fmt: skip
    scale = head_dim**-0.5
    out = torch.full_like(batch.q, float("nan"))  # every element must be written
    paged_prefill(
        batch.q, batch.k_cache, batch.v_cache, batch.cu_seqlens_q, batch.seq_lens, batch.block_tables,
        batch.max_seqlen_q, scale, out=out, block_m=block_m, block_n=block_n,
    )  # fmt: skip
    ref = paged_attention_ref(
        batch.q.cpu(), batch.k_cache.cpu(), batch.v_cache.cpu(), batch.cu_seqlens_q.cpu(), batch.seq_lens.cpu(),
        batch.block_tables.cpu(), scale,
    )  # fmt: skip
    torch.testing.assert_close(out.cpu().float(), ref.float(), **tolerance(dtype))


def test_prefill_peaked_softmax_and_strided_q(paged_batch):
    """Large scores (softmax close to one-hot) and q as a strided view of a fused projection."""
    batch = paged_batch([19, 40], [83, 40], heads=16, kv_heads=2, head_dim=64, block_size=16,
                        dtype=torch.float32, seed=3, q_scale=6.0)  # fmt: skip
    fused = torch.cat([batch.q, torch.zeros_like(batch.q[:, :4])], dim=1)  # [T, H + 4, D]
    q = fused[:, :16]
    assert not q.is_contiguous()
    out = paged_prefill(q, batch.k_cache, batch.v_cache, batch.cu_seqlens_q, batch.seq_lens, batch.block_tables,
                        batch.max_seqlen_q, 1.0)  # fmt: skip
    ref = paged_attention_ref(q.cpu(), batch.k_cache.cpu(), batch.v_cache.cpu(), batch.cu_seqlens_q.cpu(),
                              batch.seq_lens.cpu(), batch.block_tables.cpu(), 1.0)  # fmt: skip
    torch.testing.assert_close(out.cpu(), ref, **tolerance(torch.float32))


def test_prefill_rejects_bad_input(paged_batch):
    batch = paged_batch([3], [3], heads=4, kv_heads=2, head_dim=32, block_size=8, dtype=torch.float32, seed=0)
    args = (batch.k_cache, batch.v_cache, batch.cu_seqlens_q, batch.seq_lens, batch.block_tables, 3, 1.0)
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        paged_prefill(torch.zeros(3, 3, 32, device=batch.q.device), *args)
    with pytest.raises(ValueError, match="does not match q"):
        paged_prefill(batch.q.half(), *args)
    with pytest.raises(ValueError, match="block_n"):
        paged_prefill(batch.q, *args, block_n=24)
