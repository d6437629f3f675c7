"""The inner step shared by the paged attention kernels: fold one key tile into a running online softmax.

Both `prefill.py` and `decode.py` hold a tile of query rows `q` ([BLOCK_M, BLOCK_D]: the query heads that
share one KV head, possibly for several tokens) and walk a sequence's keys BLOCK_N at a time. Each key is
found through the block table, so the tile can start anywhere and any block size works (1, 8, 16, ...):

    key j  ->  physical block  table_row[j // BLOCK_SIZE],  offset  j % BLOCK_SIZE
    k_cache[block, offset, kv_head, :]          (K and V caches share their strides)

The state is (m, l, acc) per query row, in the log2 domain (scores are pre-multiplied by scale * log2(e) so
that exp2 replaces exp): m = running max score, l = running sum of exp2(score - m), acc = running sum of
exp2(score - m) * v, all fp32.

Invariant the callers keep: the first tile a program folds has at least one visible key for every row
(key 0 for prefill, the split's first key for decode), so m is finite from then on and exp2(m_old - m_new)
never sees -inf - -inf.
"""

from __future__ import annotations

import triton
import triton.language as tl

LOG2E = 1.4426950408889634  # callers pass scale * LOG2E: scores in the log2 domain (see above)


@triton.jit
def _load_rows(ptrs, key_ok, offs_d, MASK_KEYS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """[BLOCK_N, BLOCK_D] cache rows; masked only where needed, so full tiles are plain vector loads."""
    if MASK_KEYS and HEAD_DIM == BLOCK_D:
        rows = tl.load(ptrs, mask=key_ok[:, None], other=0.0)
    elif MASK_KEYS:
        rows = tl.load(ptrs, mask=key_ok[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0)
    elif HEAD_DIM == BLOCK_D:
        rows = tl.load(ptrs)
    else:
        rows = tl.load(ptrs, mask=(offs_d < HEAD_DIM)[None, :], other=0.0)
    return rows


@triton.jit
def fold_key_tile(
    q,  # [BLOCK_M, BLOCK_D] query rows (cache dtype)
    m_i,  # [BLOCK_M] fp32 running max (log2 domain)
    l_i,  # [BLOCK_M] fp32 running sum
    acc,  # [BLOCK_M, BLOCK_D] fp32 running weighted sum of values
    k_cache_ptr,  # [num_blocks, block_size, KVH, D], already offset to this KV head
    v_cache_ptr,  # [num_blocks, block_size, KVH, D], already offset to this KV head
    table_row_ptr,  # [max_blocks] int32: this sequence's block table row
    start,  # first key of the tile
    key_end,  # keys >= key_end are out of range (only read when MASK_KEYS)
    row_pos,  # [BLOCK_M] absolute position of each row's token (only read when CAUSAL)
    stride_cb,
    stride_ct,
    scale_log2e,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    MASK_KEYS: tl.constexpr,  # tile may run past key_end
    CAUSAL: tl.constexpr,  # tile may hold keys after some row's own position
):
    offs_n = start + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    offs_d = tl.arange(0, BLOCK_D)
    key_ok = offs_n < key_end  # only used when MASK_KEYS
    if MASK_KEYS:
        block = tl.load(table_row_ptr + offs_n // BLOCK_SIZE, mask=key_ok, other=0)
    else:
        block = tl.load(table_row_ptr + offs_n // BLOCK_SIZE)
    rows = block.to(tl.int64) * stride_cb + (offs_n % BLOCK_SIZE) * stride_ct  # [BLOCK_N] int64
    ptrs = rows[:, None] + offs_d[None, :]  # [BLOCK_N, BLOCK_D]

    # Out-of-range keys must load as 0, not merely be masked in the scores: a NaN left in an unwritten cache
    # slot would survive 0 * NaN in the P.V product.
    k = _load_rows(k_cache_ptr + ptrs, key_ok, offs_d, MASK_KEYS, HEAD_DIM, BLOCK_D)  # [BLOCK_N, BLOCK_D]

    # input_precision only affects fp32 operands: a fp32 cache asks for fp32 accuracy (3xTF32 tensor-core
    # products, not the default TF32's 10-bit mantissa); fp16/bf16 dots are unchanged.
    s = tl.dot(q, tl.trans(k), input_precision="tf32x3") * scale_log2e  # [BLOCK_M, BLOCK_N] fp32
    if MASK_KEYS:
        s = tl.where(key_ok[None, :], s, float("-inf"))
    if CAUSAL:
        s = tl.where(offs_n[None, :] <= row_pos[:, None], s, float("-inf"))

    m_new = tl.maximum(m_i, tl.max(s, 1))  # [BLOCK_M]
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])  # [BLOCK_M, BLOCK_N]
    l_i = l_i * alpha + tl.sum(p, 1)

    v = _load_rows(v_cache_ptr + ptrs, key_ok, offs_d, MASK_KEYS, HEAD_DIM, BLOCK_D)  # [BLOCK_N, BLOCK_D]
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="tf32x3")
    return m_new, l_i, acc


def check_paged_cache(q, k_cache, v_cache) -> int:
    """Shared wrapper check: q [..., H, D] against K/V caches [num_blocks, block_size, KVH, D]; -> KVH."""
    num_heads, head_dim = q.shape[-2], q.shape[-1]
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape or k_cache.stride() != v_cache.stride():
        raise ValueError("k_cache and v_cache must be [num_blocks, block_size, KVH, D] with equal shapes and strides")
    if k_cache.shape[3] != head_dim or k_cache.dtype != q.dtype:
        raise ValueError(f"cache {tuple(k_cache.shape)} {k_cache.dtype} does not match q {tuple(q.shape)} {q.dtype}")
    if k_cache.stride(-1) != 1:
        raise ValueError("the caches must be contiguous along head_dim")
    kv_heads = k_cache.shape[2]
    if num_heads % kv_heads:
        raise ValueError(f"num_heads {num_heads} is not a multiple of num_kv_heads {kv_heads}")
    return kv_heads
