"""Triton kernel that writes one step's new K and V rows into the paged KV cache by slot mapping.

Layout:

    k, v:             [T, num_kv_heads, head_dim]      rows of this step (any row/head strides, dim contiguous)
    k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim]
    slot_mapping:     [T] int64; slot = block * block_size + offset, -1 = padding row, not stored

Tiling: one program moves BLOCK_T whole tokens (all KV heads and dims, a [BLOCK_T, heads, dim] tile). A
token's K row is only num_kv_heads * head_dim elements (256 for GLM-4), too little work for a program of its
own, and few programs also keep the Triton interpreter (CPU tests) fast. The slot is split into (block,
offset) instead of being used as a flat row index so that a cache whose block stride is not
block_size * row stride (a view into a larger per-layer buffer) is still addressed correctly.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


# The token count changes every step: specialising on it (== 1, multiple of 16) would compile new variants
# mid-serving, long after the warm-up.
@triton.jit(do_not_specialize=["num_tokens"])
def _store_kv_kernel(
    k_ptr,  # [T, KVH, D]
    v_ptr,  # [T, KVH, D]
    k_cache_ptr,  # [num_blocks, block_size, KVH, D]
    v_cache_ptr,  # [num_blocks, block_size, KVH, D]
    slot_ptr,  # [T] int64, -1 = skip
    num_tokens,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_cb,  # cache strides (K and V caches share them): block, offset-in-block, head
    stride_ct,
    stride_ch,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)  # [BLOCK_T]
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    slot = tl.load(slot_ptr + offs_t, mask=offs_t < num_tokens, other=-1).to(tl.int64)  # [BLOCK_T]
    # Clamp before dividing so padding rows (-1) compute a harmless address; the mask drops them.
    safe = tl.maximum(slot, 0)
    dst_row = (safe // BLOCK_SIZE) * stride_cb + (safe % BLOCK_SIZE) * stride_ct  # [BLOCK_T] int64
    dst = dst_row[:, None, None] + offs_h[None, :, None] * stride_ch + offs_d[None, None, :]
    src_t = offs_t.to(tl.int64)[:, None, None]
    mask = (slot >= 0)[:, None, None] & (offs_h < NUM_KV_HEADS)[None, :, None] & (offs_d < HEAD_DIM)[None, None, :]

    k = tl.load(k_ptr + src_t * stride_kt + offs_h[None, :, None] * stride_kh + offs_d[None, None, :], mask=mask)
    tl.store(k_cache_ptr + dst, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    v = tl.load(v_ptr + src_t * stride_vt + offs_h[None, :, None] * stride_vh + offs_d[None, None, :], mask=mask)
    tl.store(v_cache_ptr + dst, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def store_kv(
    k: torch.Tensor,  # [T, num_kv_heads, head_dim]
    v: torch.Tensor,  # [T, num_kv_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    slot_mapping: torch.Tensor,  # [T] int64, -1 = skip
) -> None:
    """Write k[t], v[t] into the cache at slot_mapping[t] (rows with slot -1 are skipped). No host sync."""
    if k.dim() != 3 or k.shape != v.shape:
        raise ValueError(f"k and v must both be [T, num_kv_heads, head_dim], got {tuple(k.shape)} and {tuple(v.shape)}")
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape or k_cache.stride() != v_cache.stride():
        raise ValueError(
            f"k_cache and v_cache must be [num_blocks, block_size, num_kv_heads, head_dim] with equal shapes and "
            f"strides, got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}"
        )
    num_tokens, kv_heads, head_dim = k.shape
    if k_cache.shape[2:] != (kv_heads, head_dim):
        raise ValueError(f"k is {tuple(k.shape)} but the cache holds [.., .., {k_cache.shape[2]}, {k_cache.shape[3]}]")
    if slot_mapping.shape != (num_tokens,):
        raise ValueError(f"slot_mapping must be [{num_tokens}], got {tuple(slot_mapping.shape)}")
    if k.stride(-1) != 1 or v.stride(-1) != 1 or k_cache.stride(-1) != 1:
        raise ValueError("k, v and the caches must be contiguous along head_dim")
    if num_tokens == 0:
        return
    block_h = triton.next_power_of_2(kv_heads)
    block_d = triton.next_power_of_2(head_dim)
    # About 4K elements per program: enough to keep a GPU's memory pipes busy. Fixed per model (not per T)
    # so that varying batch sizes reuse one compiled kernel.
    block_t = max(1, 4096 // (block_h * block_d))
    grid = (triton.cdiv(num_tokens, block_t),)
    _store_kv_kernel[grid](
        k, v, k_cache, v_cache, slot_mapping, num_tokens,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        NUM_KV_HEADS=kv_heads, HEAD_DIM=head_dim, BLOCK_SIZE=k_cache.shape[1],
        BLOCK_T=block_t, BLOCK_H=block_h, BLOCK_D=block_d,
    )  # fmt: skip
