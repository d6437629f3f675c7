"""Triton paged prefill/extend attention: causal flash attention for a flat batch of variable-length query
chunks whose keys (cached prefix and the chunk itself) are all read from the paged KV cache.

Layout:

    q, out:        [T, H, D]          new tokens of sequence b are rows cu_seqlens_q[b] : cu_seqlens_q[b + 1]
    k/v_cache:     [num_blocks, block_size, KVH, D]   (this step's K/V were stored by kv_store beforehand)
    block_tables:  [B, max_blocks] int32;  seq_lens: [B] int32 keys per sequence (prefix + chunk)

    sequence b:  |<----------- seq_lens[b] keys ----------->|
                 |<--- ctx = cached prefix --->|<- q_len -->|     query t (0-based in the chunk) sits at
                                                                   position ctx + t and sees keys 0 ..= ctx + t

Tiling. A program owns one (query tile, sequence, KV head). Its BLOCK_M rows are BLOCK_T consecutive tokens
times the G = H / KVH query heads that share the KV head (row r = token r // BLOCK_G, head r % BLOCK_G):

    rows   t0h0 t0h1 .. t0h15 | t1h0 .. t1h15 | ... | t7h15        GLM-4: 8 tokens x 16 heads = 128 rows

so each K/V tile read through the block table serves the whole group (GQA without repeating K/V), and a chunk
of few tokens (a decode step riding in a mixed batch, a short chunked-prefill tail) still fills a tensor-core
tile. The keys are walked in two passes: tiles entirely before the tile's first position need no mask at all;
the remaining (diagonal) tiles apply the causal mask. Online softmax state is fp32 (see paged_tile.py).

The grid is (query tiles of the longest chunk, B, KVH); tiles past a shorter chunk's end return at once, and
tile indices are walked from the last so that the longest-running (most keys) programs start first.
Rows of `out` outside every sequence's range (padding tokens past cu_seqlens_q[B]) are not written.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .paged_tile import LOG2E, check_paged_cache, fold_key_tile, scale_args


# The block-table width follows the step's longest context: not specialised on, or each new kind of width
# (1, a multiple of 16, other) would compile another variant mid-serving.
@triton.jit(do_not_specialize=["stride_tb"])
def _prefill_kernel(
    q_ptr,  # [T, H, D]
    k_cache_ptr,  # [num_blocks, block_size, KVH, D]
    v_cache_ptr,  # [num_blocks, block_size, KVH, D]
    k_scale_ptr,  # [num_blocks, block_size, KVH] fp32 (an fp8 cache's row scales; read when QUANT)
    v_scale_ptr,  # [num_blocks, block_size, KVH] fp32
    block_tables_ptr,  # [B, max_blocks] int32
    cu_seqlens_q_ptr,  # [B + 1] int32
    seq_lens_ptr,  # [B] int32
    out_ptr,  # [T, H, D]
    scale_log2e,
    stride_qt,
    stride_qh,
    stride_cb,
    stride_ct,
    stride_ch,
    stride_sb,  # scale strides: block, offset-in-block, head
    stride_st,
    stride_sh,
    stride_tb,
    stride_ot,
    stride_oh,
    GROUP: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_M: tl.constexpr,  # BLOCK_T * BLOCK_G
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    QUANT: tl.constexpr,  # fp8 cache with per-row scales (paged_tile.py)
):
    tile = tl.num_programs(0) - 1 - tl.program_id(0)
    b = tl.program_id(1)
    kvh = tl.program_id(2)
    q_start = tl.load(cu_seqlens_q_ptr + b).to(tl.int32)
    q_len = tl.load(cu_seqlens_q_ptr + b + 1).to(tl.int32) - q_start
    t0 = tile * BLOCK_T
    if t0 >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + b).to(tl.int32)
    ctx = seq_len - q_len

    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    tok = t0 + offs_m // BLOCK_G  # [BLOCK_M] token index in the chunk
    g = offs_m % BLOCK_G
    row_ok = (tok < q_len) & (g < GROUP)
    d_ok = offs_d < HEAD_DIM
    row_pos = ctx + tok  # [BLOCK_M] absolute position; padding rows lie past the end and see every key
    q_rows = (q_start + tok).to(tl.int64) * stride_qt + (kvh * GROUP + g) * stride_qh  # [BLOCK_M]
    q = tl.load(q_ptr + q_rows[:, None] + offs_d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    table_row = block_tables_ptr + b.to(tl.int64) * stride_tb
    k_base = k_cache_ptr + kvh * stride_ch
    v_base = v_cache_ptr + kvh * stride_ch
    ks_base = k_scale_ptr + kvh * stride_sh
    vs_base = v_scale_ptr + kvh * stride_sh
    # Keys 0 ..= ctx + t0 are visible to every row of the tile; keys up to the tile's last position, capped
    # at the sequence's end, need the causal mask.
    key_end = tl.minimum(ctx + t0 + BLOCK_T, seq_len)
    full_end = (ctx + t0 + 1) // BLOCK_N * BLOCK_N
    for n in range(0, full_end, BLOCK_N):
        m_i, l_i, acc = fold_key_tile(
            q, m_i, l_i, acc, k_base, v_base, ks_base, vs_base, table_row, n, key_end, row_pos,
            stride_cb, stride_ct, stride_sb, stride_st, scale_log2e, QUANT, HEAD_DIM, BLOCK_D, BLOCK_N, BLOCK_SIZE, MASK_KEYS=False, CAUSAL=False,
        )  # fmt: skip
    for n in range(full_end, key_end, BLOCK_N):
        m_i, l_i, acc = fold_key_tile(
            q, m_i, l_i, acc, k_base, v_base, ks_base, vs_base, table_row, n, key_end, row_pos,
            stride_cb, stride_ct, stride_sb, stride_st, scale_log2e, QUANT, HEAD_DIM, BLOCK_D, BLOCK_N, BLOCK_SIZE, MASK_KEYS=True, CAUSAL=True,
        )  # fmt: skip

    o = acc / l_i[:, None]
    o_rows = (q_start + tok).to(tl.int64) * stride_ot + (kvh * GROUP + g) * stride_oh
    o_mask = row_ok[:, None] & d_ok[None, :]
    tl.store(out_ptr + o_rows[:, None] + offs_d[None, :], o.to(out_ptr.dtype.element_ty), mask=o_mask)


def paged_prefill(
    q: torch.Tensor,  # [T, H, D]
    k_cache: torch.Tensor,  # [num_blocks, block_size, KVH, D] in q's dtype, or fp8 with k_scale
    v_cache: torch.Tensor,  # [num_blocks, block_size, KVH, D]
    cu_seqlens_q: torch.Tensor,  # [B + 1] int32
    seq_lens: torch.Tensor,  # [B] int32
    block_tables: torch.Tensor,  # [B, max_blocks] int32
    max_seqlen_q: int,
    scale: float,
    out: torch.Tensor | None = None,  # [T, H, D]
    block_m: int | None = None,  # query rows per program; default 128 (fp32: 64)
    block_n: int | None = None,  # keys per inner step; default 64 (fp32: 32)
    num_warps: int | None = None,
    num_stages: int | None = None,
    k_scale: torch.Tensor | None = None,  # [num_blocks, block_size, KVH] fp32: an fp8 cache's row scales
    v_scale: torch.Tensor | None = None,  # [num_blocks, block_size, KVH] fp32
) -> torch.Tensor:  # [T, H, D]
    """Causal attention of every new token over its sequence's cached keys (prefix + chunk), read through the
    block tables. max_seqlen_q (host int, >= every chunk length) only sizes the grid: no device reads."""
    if q.dim() != 3:
        raise ValueError(f"q must be [T, H, D], got {tuple(q.shape)}")
    num_tokens, num_heads, head_dim = q.shape
    kv_heads = check_paged_cache(q, k_cache, v_cache, k_scale, v_scale)
    batch = seq_lens.shape[0]
    if cu_seqlens_q.shape != (batch + 1,) or block_tables.dim() != 2 or block_tables.shape[0] != batch:
        raise ValueError(f"cu_seqlens_q must be [{batch + 1}] and block_tables [{batch}, max_blocks]")
    if q.stride(-1) != 1 or block_tables.stride(-1) != 1:
        raise ValueError("q and block_tables must be contiguous along their last dim")
    if max_seqlen_q < 0:
        raise ValueError(f"max_seqlen_q must be >= 0, got {max_seqlen_q}")
    fp32 = q.element_size() == 4
    # fp32 tiles (3xTF32 dots) take twice the shared memory of 16-bit ones: at 128 x 64 x head_dim 128 one stage
    # needs 160 KiB, over the 99 KiB of an sm_86/sm_89 GPU (A10, L40S, RTX 4090), where it fails at launch.
    # 64 x 32 needs 72 KiB. fp32 is for checking accuracy, not speed, so one choice serves every GPU.
    block_m = block_m if block_m is not None else (64 if fp32 else 128)
    block_n = block_n if block_n is not None else (32 if fp32 else 64)
    for name, value in (("block_m", block_m), ("block_n", block_n)):
        if value < 16 or value & (value - 1):
            raise ValueError(f"{name} must be a power of two >= 16, got {value}")
    if out is None:
        out = q.new_empty(q.shape)
    elif out.shape != q.shape or out.stride(-1) != 1:
        raise ValueError(f"out must be {tuple(q.shape)} and contiguous along head_dim")
    if batch == 0 or num_tokens == 0 or max_seqlen_q == 0:
        return out

    group = num_heads // kv_heads
    block_g = triton.next_power_of_2(group)
    block_t = max(1, block_m // block_g)
    if num_warps is None:
        num_warps = 8 if block_t * block_g * head_dim >= 128 * 128 else 4
    if num_stages is None:
        num_stages = 1 if fp32 else 2  # (fp32: a second stage of K/V tiles would not fit an sm_86/sm_89 either)
    block_d = max(16, triton.next_power_of_2(head_dim))  # compiled tl.dot needs K >= 16 (head_dim 8: masked)
    grid = (triton.cdiv(max_seqlen_q, block_t), batch, kv_heads)
    scales = scale_args(k_cache, k_scale, v_scale)
    _prefill_kernel[grid](
        q, k_cache, v_cache, *scales[:2], block_tables, cu_seqlens_q, seq_lens, out, scale * LOG2E,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), *scales[2:],
        block_tables.stride(0), out.stride(0), out.stride(1),
        GROUP=group, BLOCK_G=block_g, BLOCK_T=block_t, BLOCK_M=block_t * block_g, HEAD_DIM=head_dim,
        BLOCK_D=block_d, BLOCK_N=block_n, BLOCK_SIZE=k_cache.shape[1], QUANT=k_scale is not None,
        num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
    return out
