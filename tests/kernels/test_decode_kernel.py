"""decode.paged_decode (split-K + reduce) vs reference.paged_decode_ref, and the split-count heuristic."""

from __future__ import annotations

import pytest
import torch
from conftest import tolerance

from glm_serve.kernels import DecodePartials, choose_num_splits, paged_decode
from glm_serve.kernels.reference import paged_decode_ref

# (seq_lens, heads, kv_heads, head_dim, block_size, num_splits, block_n)
CASES = {
    "gqa16_splits1": ([1, 63, 64, 300], 32, 2, 128, 16, 1, 64),
    "gqa16_splits3": ([1, 63, 64, 300], 32, 2, 128, 16, 3, 64),
    "gqa8_block1_splits4": ([5, 77], 16, 2, 64, 1, 4, 16),
    "mha_block32_splits2": ([33, 256, 129], 4, 4, 32, 32, 2, 32),
    "padding_row_and_empty_splits": ([0, 20, 2], 16, 1, 64, 8, 16, 16),
    "long_context_splits8": ([3001], 32, 2, 128, 16, 8, 128),
    "head_dim_80": ([90, 7], 8, 2, 80, 16, 2, 32),
    "head_dim_8": ([1, 40], 4, 2, 8, 16, 2, 16),  # below the dots' minimum width: padded to 16, masked
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", list(CASES))
def test_decode_matches_reference(paged_batch, case, dtype):
    seq_lens, heads, kv_heads, head_dim, block_size, num_splits, block_n = CASES[case]
    batch = paged_batch(
        [1] * len(seq_lens), seq_lens, heads=heads, kv_heads=kv_heads, head_dim=head_dim, block_size=block_size,
        dtype=dtype, seed=len(case),
    )  # fmt: skip
    q = torch.randn(len(seq_lens), heads, head_dim, generator=torch.Generator().manual_seed(1)).to(batch.q)
    scale = head_dim**-0.5
    out = torch.full_like(q, float("nan"))
    partials = None
    if num_splits > 1:  # poisoned scratch too: every split must write its partial, even an empty one
        partials = DecodePartials.empty(len(seq_lens), heads, head_dim, num_splits, q.device)
        for t in (partials.m, partials.l, partials.acc):
            t.fill_(float("nan"))
    paged_decode(q, batch.k_cache, batch.v_cache, batch.seq_lens, batch.block_tables, scale, num_splits,
                 out=out, partials=partials, block_n=block_n)  # fmt: skip
    ref = paged_decode_ref(q.cpu(), batch.k_cache.cpu(), batch.v_cache.cpu(), batch.seq_lens.cpu(),
                           batch.block_tables.cpu(), scale)  # fmt: skip
    torch.testing.assert_close(out.cpu().float(), ref.float(), **tolerance(dtype))


def test_split_count_heuristic():
    # One long sequence on a 132-SM GPU: as many splits as allowed.
    assert choose_num_splits(1, 2, 128 * 1024, 132) == 64
    # A short context caps the splits (each split keeps >= 256 keys of the rounded-up context).
    assert choose_num_splits(1, 2, 1000, 132) == 4
    assert choose_num_splits(1, 2, 100, 132) == 1
    # A big batch fills the GPU alone.
    assert choose_num_splits(256, 2, 128 * 1024, 132) == 1
    for batch in (1, 3, 17, 64):
        for ctx in (1, 700, 5000, 1 << 20):
            n = choose_num_splits(batch, 4, ctx, 132)
            assert n >= 1 and n & (n - 1) == 0
    with pytest.raises(ValueError, match="batch"):
        choose_num_splits(0, 2, 10, 132)


def test_decode_rejects_bad_input(paged_batch):
    batch = paged_batch([1, 1], [5, 9], heads=4, kv_heads=2, head_dim=32, block_size=8, dtype=torch.float32, seed=0)
    args = (batch.k_cache, batch.v_cache, batch.seq_lens, batch.block_tables, 1.0)
    with pytest.raises(ValueError, match="num_splits"):
        paged_decode(batch.q, *args, num_splits=0)
    with pytest.raises(ValueError, match="seq_lens"):
        paged_decode(batch.q[:1], *args)
    wrong = DecodePartials.empty(2, 4, 32, 3, batch.q.device)
    with pytest.raises(ValueError, match="partials"):
        paged_decode(batch.q, *args, num_splits=2, partials=wrong)
