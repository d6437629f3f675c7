"""The inner step shared by the paged attention kernels: fold one key tile into a running online softmax.

Both `prefill.py` and `decode.py` hold a tile of query rows `q` ([BLOCK_M, BLOCK_D]: the query heads that
share one KV head, possibly for several tokens) and walk a sequence's keys BLOCK_N at a time. Each key is
found through the block table, so the tile can start anywhere and any block size works (1, 8, 16, ...):

    key j  ->  physical block  table_row[j // BLOCK_SIZE],  offset  j % BLOCK_SIZE
    k_cache[block, offset, kv_head, :]          (K and V caches share their strides)

The state is (m, l, acc) per query row, in the log2 domain (scores are pre-multiplied by scale * log2(e) so
that exp2 replaces exp): m = running max score, l = running sum of exp2(score - m), acc = running sum of
exp2(score - m) * v, all fp32.

An fp8 cache (QUANT) holds each (token, KV head) row divided by its own scale (kv_store.py); the tile's rows
are multiplied back by their scales in fp32 as they are loaded, then rounded to q's dtype, so the dots and the
softmax are the same code as for a 16- or 32-bit cache.

Invariant the callers keep: the first tile a program folds has at least one visible key for every row
(key 0 for prefill, the split's first key for decode), so m is finite from then on and exp2(m_old - m_new)
never sees -inf - -inf.
"""

from __future__ import annotations

import torch
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
def _load_tile(ptrs, scale_ptrs, key_ok, offs_d, out_dtype: tl.constexpr, QUANT: tl.constexpr,
               MASK_KEYS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """[BLOCK_N, BLOCK_D] K or V rows in out_dtype; from an fp8 cache (QUANT) times each row's scale."""
    rows = _load_rows(ptrs, key_ok, offs_d, MASK_KEYS, HEAD_DIM, BLOCK_D)
    if QUANT:
        if MASK_KEYS:
            scales = tl.load(scale_ptrs, mask=key_ok, other=0.0)  # [BLOCK_N] fp32
        else:
            scales = tl.load(scale_ptrs)
        rows = (rows.to(tl.float32) * scales[:, None]).to(out_dtype)
    return rows


@triton.jit
def fold_key_tile(
    q,  # [BLOCK_M, BLOCK_D] query rows (the cache's dtype, or the compute dtype over an fp8 cache)
    m_i,  # [BLOCK_M] fp32 running max (log2 domain)
    l_i,  # [BLOCK_M] fp32 running sum
    acc,  # [BLOCK_M, BLOCK_D] fp32 running weighted sum of values
    k_cache_ptr,  # [num_blocks, block_size, KVH, D], already offset to this KV head
    v_cache_ptr,  # [num_blocks, block_size, KVH, D], already offset to this KV head
    k_scale_ptr,  # [num_blocks, block_size, KVH] fp32, already offset to this KV head (read when QUANT)
    v_scale_ptr,  # [num_blocks, block_size, KVH] fp32, already offset to this KV head (read when QUANT)
    table_row_ptr,  # [max_blocks] int32: this sequence's block table row
    start,  # first key of the tile
    key_end,  # keys >= key_end are out of range (only read when MASK_KEYS)
    row_pos,  # [BLOCK_M] absolute position of each row's token (only read when CAUSAL)
    stride_cb,
    stride_ct,
    stride_sb,  # scale strides: block, offset-in-block (K and V scales share them)
    stride_st,
    scale_log2e,
    QUANT: tl.constexpr,  # fp8 cache with per-row scales
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
    scale_rows = block.to(tl.int64) * stride_sb + (offs_n % BLOCK_SIZE) * stride_st  # [BLOCK_N] (QUANT only)

    # Out-of-range keys must load as 0, not merely be masked in the scores: a NaN left in an unwritten cache
    # slot would survive 0 * NaN in the P.V product.
    k = _load_tile(k_cache_ptr + ptrs, k_scale_ptr + scale_rows, key_ok, offs_d, q.dtype, QUANT, MASK_KEYS,
                   HEAD_DIM, BLOCK_D)  # [BLOCK_N, BLOCK_D]

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

    v = _load_tile(v_cache_ptr + ptrs, v_scale_ptr + scale_rows, key_ok, offs_d, q.dtype, QUANT, MASK_KEYS,
                   HEAD_DIM, BLOCK_D)  # [BLOCK_N, BLOCK_D]
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="tf32x3")
    return m_new, l_i, acc


def check_paged_cache(q, k_cache, v_cache, k_scale=None, v_scale=None) -> int:
    """Shared wrapper check: q [..., H, D] against K/V caches [num_blocks, block_size, KVH, D], in q's dtype or
    fp8 with scales [num_blocks, block_size, KVH] (check_scales); -> KVH."""
    num_heads, head_dim = q.shape[-2], q.shape[-1]
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape or k_cache.stride() != v_cache.stride():
        raise ValueError("k_cache and v_cache must be [num_blocks, block_size, KVH, D] with equal shapes and strides")
    quant = check_scales(k_cache, v_cache, k_scale, v_scale)
    if k_cache.shape[3] != head_dim or (k_cache.dtype != q.dtype and not quant):
        raise ValueError(f"cache {tuple(k_cache.shape)} {k_cache.dtype} does not match q {tuple(q.shape)} {q.dtype}")
    if k_cache.stride(-1) != 1:
        raise ValueError("the caches must be contiguous along head_dim")
    kv_heads = k_cache.shape[2]
    if num_heads % kv_heads:
        raise ValueError(f"num_heads {num_heads} is not a multiple of num_kv_heads {kv_heads}")
    return kv_heads


FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = torch.finfo(torch.float8_e4m3fn).max  # 448.0, the largest finite e4m3 value


def check_scales(k_cache, v_cache, k_scale, v_scale) -> bool:
    """An fp8 cache comes with both scale tensors, [num_blocks, block_size, KVH] fp32 with equal strides; any
    other cache with neither. -> whether the cache is fp8."""
    quant = k_cache.dtype == FP8_DTYPE
    if (k_scale is None) != (v_scale is None) or quant != (k_scale is not None):
        raise ValueError(f"a {FP8_DTYPE} cache needs k_scale and v_scale, and only such a cache takes them")
    if quant and (k_scale.shape != k_cache.shape[:3] or v_scale.shape != k_scale.shape
                  or k_scale.stride() != v_scale.stride() or k_scale.dtype != torch.float32
                  or v_scale.dtype != torch.float32):
        raise ValueError(f"k_scale and v_scale must be float32 {tuple(k_cache.shape[:3])} with equal strides, got "
                         f"{tuple(k_scale.shape)} {k_scale.dtype} and {tuple(v_scale.shape)} {v_scale.dtype}")
    return quant


def scale_args(k_cache, k_scale, v_scale) -> tuple:
    """(k_scale, v_scale, stride_sb, stride_st, stride_sh) for a kernel launch; the cache itself stands in for
    the scales where there are none (never read then)."""
    if k_scale is None:
        return k_cache, k_cache, 0, 0, 0
    return k_scale, v_scale, k_scale.stride(0), k_scale.stride(1), k_scale.stride(2)
