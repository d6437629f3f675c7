"""Triton kernel that writes one step's new K and V rows into the paged KV cache by slot mapping.

Layout:

    k, v:             [T, num_kv_heads, head_dim]      rows of this step (any row/head strides, dim contiguous)
    k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim]
    slot_mapping:     [T] int64; slot = block * block_size + offset, -1 = padding row, not stored
    k_scale, v_scale: [num_blocks, block_size, num_kv_heads] fp32, with an fp8 cache only

An fp8 cache (torch.float8_e4m3fn, --kv-cache-dtype fp8) stores each (token, KV head) row x as x / s with its
own scale s = max|x| / 448 (448: the largest finite e4m3 value), so no row can overflow whatever its range (no
calibration, which random-weight checkpoints could not give anyway), at 4 bytes of scale per 128 values. The
attention kernels multiply the rows back as they load them (paged_tile.py).

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

from .paged_tile import FP8_MAX, check_scales, scale_args

_FP8_MAX = tl.constexpr(FP8_MAX)  # (a jit function reads module globals only as constexprs)


# The token count changes every step: specialising on it (== 1, multiple of 16) would compile new variants
# mid-serving, long after the warm-up.
@triton.jit(do_not_specialize=["num_tokens"])
def _store_kv_kernel(
    k_ptr,  # [T, KVH, D]
    v_ptr,  # [T, KVH, D]
    k_cache_ptr,  # [num_blocks, block_size, KVH, D]
    v_cache_ptr,  # [num_blocks, block_size, KVH, D]
    k_scale_ptr,  # [num_blocks, block_size, KVH] fp32 (QUANT only)
    v_scale_ptr,
    slot_ptr,  # [T] int64, -1 = skip
    num_tokens,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_cb,  # cache strides (K and V caches share them): block, offset-in-block, head
    stride_ct,
    stride_ch,
    stride_sb,  # scale strides (K and V scales share them): block, offset-in-block, head
    stride_st,
    stride_sh,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
    QUANT: tl.constexpr,  # the cache is fp8: store x / scale and the scale of each (token, head) row
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

    # (masked lanes load 0: they must not raise a row's max below)
    k = tl.load(k_ptr + src_t * stride_kt + offs_h[None, :, None] * stride_kh + offs_d[None, None, :], mask=mask,
                other=0.0)
    v = tl.load(v_ptr + src_t * stride_vt + offs_h[None, :, None] * stride_vh + offs_d[None, None, :], mask=mask,
                other=0.0)
    if QUANT:
        row_mask = (slot >= 0)[:, None] & (offs_h < NUM_KV_HEADS)[None, :]  # [BLOCK_T, BLOCK_H]
        scale_dst = (safe // BLOCK_SIZE) * stride_sb + (safe % BLOCK_SIZE) * stride_st  # [BLOCK_T] int64
        scale_dst = scale_dst[:, None] + offs_h[None, :] * stride_sh  # [BLOCK_T, BLOCK_H]
        k_q = _quantize_rows(k, k_scale_ptr + scale_dst, row_mask)
        v_q = _quantize_rows(v, v_scale_ptr + scale_dst, row_mask)
        tl.store(k_cache_ptr + dst, _to_fp8(k_q, k_cache_ptr.dtype.element_ty), mask=mask)
        tl.store(v_cache_ptr + dst, _to_fp8(v_q, v_cache_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(k_cache_ptr + dst, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
        tl.store(v_cache_ptr + dst, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _quantize_rows(x, scale_ptrs, row_mask):
    """x [BLOCK_T, BLOCK_H, BLOCK_D] -> x / s in fp32, within +-FP8_MAX, with s = max|x| / FP8_MAX per (token,
    head) row stored at scale_ptrs [BLOCK_T, BLOCK_H] (1 for an all-zero row, or one too small to scale)."""
    x = x.to(tl.float32)
    scale = tl.max(tl.abs(x), axis=2) / _FP8_MAX  # [BLOCK_T, BLOCK_H]
    # (tested after the division: a row of fp32 subnormals below 448 * 2^-149 gets scale 0, and 0 / 0 = NaN)
    scale = tl.where(scale > 0, scale, 1.0)
    tl.store(scale_ptrs, scale, mask=row_mask)
    # The clamp keeps a rounding of the division from passing FP8_MAX (e4m3fn has no infinity to saturate to).
    # It passes NaN on (a value the model computed as NaN stays NaN, as in a 16-bit cache and the torch backend):
    # by default min/max return the other operand, which stored -448 * scale, a finite value, in its place.
    q = tl.maximum(x / scale[:, :, None], -_FP8_MAX, propagate_nan=tl.PropagateNan.ALL)
    return _round_to_e4m3(tl.minimum(q, _FP8_MAX, propagate_nan=tl.PropagateNan.ALL))


@triton.jit
def _to_fp8(x, dtype: tl.constexpr):
    """x (fp32 e4m3 values or NaN) -> dtype (e4m3fn); a NaN as e4m3fn's NaN (0x7F), set by its bits: a GPU's
    conversion keeps NaN, but Triton's interpreter (CPU tests) turns it into 384."""
    nan = tl.full(x.shape, 0x7F, tl.int8).to(dtype, bitcast=True)
    return tl.where(x != x, nan, x.to(dtype))


@triton.jit
def _round_to_e4m3(x):
    """x (fp32, |x| <= 448) rounded to the nearest e4m3 value, ties to even, still in fp32: the conversion that
    follows is then exact. The hardware's conversion rounds the same way; Triton's interpreter (CPU tests) does
    not (a rounding that carries into the exponent loses the carry, and subnormals are truncated), so rounding
    here keeps both on the same values. Adding C = 1.5 * 2^(e + 20), e = x's exponent (at least -6, e4m3's
    smallest normal one), leaves a sum whose last fp32 bit weighs 2^(e - 3), e4m3's step between 2^e and
    2^(e + 1): the add rounds |x| to that step, and subtracting C again is exact. (On |x|, so that what rounds to
    zero keeps x's sign, as a conversion does.)"""
    bits = x.to(tl.int32, bitcast=True)
    e = tl.maximum(((bits >> 23) & 0xFF) - 127, -6)
    c = (((e + 147) << 23) | 0x400000).to(tl.float32, bitcast=True)
    r = (tl.abs(x) + c) - c
    return tl.where(bits < 0, -r, r)  # (the sign bit: -0.0 stays -0.0)


def store_kv(
    k: torch.Tensor,  # [T, num_kv_heads, head_dim]
    v: torch.Tensor,  # [T, num_kv_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    slot_mapping: torch.Tensor,  # [T] int64, -1 = skip
    k_scale: torch.Tensor | None = None,  # [num_blocks, block_size, num_kv_heads] fp32: with an fp8 cache
    v_scale: torch.Tensor | None = None,  # [num_blocks, block_size, num_kv_heads] fp32
) -> None:
    """Write k[t], v[t] into the cache at slot_mapping[t] (rows with slot -1 are skipped). No host sync. An fp8
    cache gets each row divided by its scale, and the scale (see the module docstring)."""
    if k.dim() != 3 or k.shape != v.shape:
        raise ValueError(f"k and v must both be [T, num_kv_heads, head_dim], got {tuple(k.shape)} and {tuple(v.shape)}")
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape or k_cache.stride() != v_cache.stride():
        raise ValueError(
            f"k_cache and v_cache must be [num_blocks, block_size, num_kv_heads, head_dim] with equal shapes and "
            f"strides, got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}"
        )
    quant = check_scales(k_cache, v_cache, k_scale, v_scale)
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
    scales = scale_args(k_cache, k_scale, v_scale)
    _store_kv_kernel[grid](
        k, v, k_cache, v_cache, *scales[:2], slot_mapping, num_tokens,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), *scales[2:],
        NUM_KV_HEADS=kv_heads, HEAD_DIM=head_dim, BLOCK_SIZE=k_cache.shape[1],
        BLOCK_T=block_t, BLOCK_H=block_h, BLOCK_D=block_d, QUANT=quant,
    )  # fmt: skip
