"""Triton paged decode attention: one new query token per sequence over a paged KV cache (flash-decoding).

Layout:

    q, out:        [B, H, D]          row b is sequence b's single new token (any row/head strides)
    k/v_cache:     [num_blocks, block_size, KVH, D]
    block_tables:  [B, max_blocks] int32;  seq_lens: [B] int32 (keys per sequence, 0 = padding row)

Tiling. One program owns one (sequence, KV head, split): all G = H / KVH query heads that share the KV head
form one [G, D] tile (padded to >= 16 rows for the tensor cores), so each K/V tile is read once for the whole
group and the score is a [G, D] x [D, BLOCK_N] dot (GLM-4: 16 x 128 x 64). Decode is bound by reading K/V, so
the only goal is to keep every SM streaming: when B * KVH programs cannot fill the GPU, each sequence's
context is cut into NUM_SPLITS ranges whose partial softmax states are merged by a second kernel.

    sequence b, seq_len keys, NUM_SPLITS = 4, split length = cdiv(tiles, 4) * BLOCK_N:

    keys    |  split 0  |  split 1  |  split 2  |split 3|           split s covers [s*len, min((s+1)*len, seq_len))
    partial  (m0,l0,a0)  (m1,l1,a1)  (m2,l2,a2)  (m3,l3,a3)         per query head h of the group

    part_m, part_l: [B, H, NUM_SPLITS] fp32    max (log2 domain) and sum of exp2(score - max)
    part_acc:       [B, H, NUM_SPLITS, D] fp32  sum of exp2(score - max) * v   (unnormalised)

    reduce:  M = max_s m_s;  w_s = exp2(m_s - M);  out = (sum_s w_s * a_s) / (sum_s w_s * l_s)

A split that starts past its sequence's end (short sequences, padding rows with seq_len 0) writes the
neutral partial (m = -inf, l = 0, acc = 0), which the reduce weights by 0. The split length is computed on
the device from seq_lens, so the grid depends only on (B, KVH, NUM_SPLITS): host ints that a CUDA graph
captures once per (batch bucket, context bucket). With NUM_SPLITS == 1 the first kernel normalises and writes
`out` itself and no reduce runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .paged_tile import LOG2E, check_paged_cache, fold_key_tile, scale_args

# A split shorter than this spends more time on its prologue and on the reduce than on reading K/V.
_MIN_SPLIT_KEYS = 256
_MAX_SPLITS = 64


# The block-table width follows the step's longest context: not specialised on (see prefill.py).
@triton.jit(do_not_specialize=["stride_tb"])
def _decode_split_kernel(
    q_ptr,  # [B, H, D]
    k_cache_ptr,  # [num_blocks, block_size, KVH, D]
    v_cache_ptr,  # [num_blocks, block_size, KVH, D]
    k_scale_ptr,  # [num_blocks, block_size, KVH] fp32 (an fp8 cache's row scales; read when QUANT)
    v_scale_ptr,  # [num_blocks, block_size, KVH] fp32
    block_tables_ptr,  # [B, max_blocks] int32
    seq_lens_ptr,  # [B] int32
    out_ptr,  # [B, H, D]                 written only when NUM_SPLITS == 1
    part_m_ptr,  # [B, H, NUM_SPLITS] fp32    written only when NUM_SPLITS > 1
    part_l_ptr,  # [B, H, NUM_SPLITS] fp32
    part_acc_ptr,  # [B, H, NUM_SPLITS, D] fp32
    scale_log2e,
    stride_qb,
    stride_qh,
    stride_cb,
    stride_ct,
    stride_ch,
    stride_sb,  # scale strides: block, offset-in-block, head
    stride_st,
    stride_sh,
    stride_tb,
    stride_ob,
    stride_oh,
    NUM_SPLITS: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_G: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    QUANT: tl.constexpr,  # fp8 cache with per-row scales (paged_tile.py)
):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + b).to(tl.int32)

    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    heads = kvh * GROUP + offs_g  # [BLOCK_G] query heads of this KV head
    g_ok = offs_g < GROUP
    d_ok = offs_d < HEAD_DIM
    q = tl.load(
        q_ptr + b.to(tl.int64) * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
        mask=g_ok[:, None] & d_ok[None, :],
        other=0.0,
    )  # [BLOCK_G, BLOCK_D]

    # Whole tiles per split, so only the sequence's last tile needs key masking.
    split_len = tl.cdiv(tl.cdiv(seq_len, BLOCK_N), NUM_SPLITS) * BLOCK_N
    start = split * split_len
    end = tl.minimum(start + split_len, seq_len)
    end_full = start + tl.maximum(end - start, 0) // BLOCK_N * BLOCK_N

    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    table_row = block_tables_ptr + b.to(tl.int64) * stride_tb
    k_base = k_cache_ptr + kvh * stride_ch
    v_base = v_cache_ptr + kvh * stride_ch
    ks_base = k_scale_ptr + kvh * stride_sh
    vs_base = v_scale_ptr + kvh * stride_sh
    for n in range(start, end_full, BLOCK_N):
        m_i, l_i, acc = fold_key_tile(
            q, m_i, l_i, acc, k_base, v_base, ks_base, vs_base, table_row, n, end, offs_g,
            stride_cb, stride_ct, stride_sb, stride_st, scale_log2e, QUANT, HEAD_DIM, BLOCK_D, BLOCK_N, BLOCK_SIZE, MASK_KEYS=False, CAUSAL=False,
        )  # fmt: skip
    for n in range(end_full, end, BLOCK_N):  # at most one ragged tail tile
        m_i, l_i, acc = fold_key_tile(
            q, m_i, l_i, acc, k_base, v_base, ks_base, vs_base, table_row, n, end, offs_g,
            stride_cb, stride_ct, stride_sb, stride_st, scale_log2e, QUANT, HEAD_DIM, BLOCK_D, BLOCK_N, BLOCK_SIZE, MASK_KEYS=True, CAUSAL=False,
        )  # fmt: skip

    mask = g_ok[:, None] & d_ok[None, :]
    if NUM_SPLITS == 1:
        # Padding rows (seq_len 0) have l = 0 and acc = 0: divide by 1 to write zeros instead of NaN.
        o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        o_ptrs = out_ptr + b.to(tl.int64) * stride_ob + heads[:, None] * stride_oh + offs_d[None, :]
        tl.store(o_ptrs, o.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        row = (b.to(tl.int64) * (GROUP * tl.num_programs(1)) + heads) * NUM_SPLITS + split  # [BLOCK_G]
        tl.store(part_m_ptr + row, m_i, mask=g_ok)
        tl.store(part_l_ptr + row, l_i, mask=g_ok)
        tl.store(part_acc_ptr + row[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=mask)


@triton.jit
def _decode_reduce_kernel(
    part_m_ptr,  # [B, H, NUM_SPLITS] fp32
    part_l_ptr,  # [B, H, NUM_SPLITS] fp32
    part_acc_ptr,  # [B, H, NUM_SPLITS, D] fp32
    out_ptr,  # [B, H, D]
    stride_ob,
    stride_oh,
    NUM_SPLITS: tl.constexpr,
    BLOCK_S: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    row = b.to(tl.int64) * tl.num_programs(1) + h  # (b, h) in [B, H]
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_ok = offs_s < NUM_SPLITS
    m = tl.load(part_m_ptr + row * NUM_SPLITS + offs_s, mask=s_ok, other=float("-inf"))  # [BLOCK_S]
    l = tl.load(part_l_ptr + row * NUM_SPLITS + offs_s, mask=s_ok, other=0.0)
    m_max = tl.max(m, 0)
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)  # every split empty (seq_len 0): avoid -inf - -inf
    w = tl.where(l > 0, tl.exp2(m - m_max), 0.0)  # [BLOCK_S] empty splits (l == 0, m == -inf) weigh 0
    denom = tl.sum(w * l, 0)
    acc_ptrs = part_acc_ptr + (row * NUM_SPLITS + offs_s)[:, None] * HEAD_DIM + offs_d[None, :]
    acc = tl.load(acc_ptrs, mask=s_ok[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0)  # [BLOCK_S, BLOCK_D]
    o = tl.sum(w[:, None] * acc, 0) / tl.where(denom > 0, denom, 1.0)  # [BLOCK_D]
    tl.store(
        out_ptr + b.to(tl.int64) * stride_ob + h * stride_oh + offs_d,
        o.to(out_ptr.dtype.element_ty),
        mask=offs_d < HEAD_DIM,
    )


@dataclass
class DecodePartials:
    """Scratch for the split partials; one per (batch size, heads, splits), reusable by every layer of a step."""

    m: torch.Tensor  # [B, H, num_splits] fp32
    l: torch.Tensor  # [B, H, num_splits] fp32
    acc: torch.Tensor  # [B, H, num_splits, D] fp32

    @classmethod
    def empty(cls, batch: int, num_heads: int, head_dim: int, num_splits: int, device) -> DecodePartials:
        return cls(
            m=torch.empty(batch, num_heads, num_splits, dtype=torch.float32, device=device),
            l=torch.empty(batch, num_heads, num_splits, dtype=torch.float32, device=device),
            acc=torch.empty(batch, num_heads, num_splits, head_dim, dtype=torch.float32, device=device),
        )


def choose_num_splits(batch: int, num_kv_heads: int, max_seqlen_k: int, num_sms: int) -> int:
    """Splits per sequence so that batch * num_kv_heads * splits programs cover about two waves of the GPU,
    without cutting the context (rounded up to a power of two, a stable bucket) into ranges shorter than
    _MIN_SPLIT_KEYS. Host ints only, so the result can key a captured CUDA graph. Returns a power of two."""
    if batch < 1 or num_kv_heads < 1 or num_sms < 1:
        raise ValueError(f"batch, num_kv_heads and num_sms must be >= 1, got {batch}, {num_kv_heads}, {num_sms}")
    context = triton.next_power_of_2(max(1, max_seqlen_k))
    wanted = triton.cdiv(2 * num_sms, batch * num_kv_heads)
    cap = min(_MAX_SPLITS, max(1, context // _MIN_SPLIT_KEYS))
    return min(triton.next_power_of_2(wanted), triton.next_power_of_2(cap + 1) // 2)


def paged_decode(
    q: torch.Tensor,  # [B, H, D]
    k_cache: torch.Tensor,  # [num_blocks, block_size, KVH, D] in q's dtype, or fp8 with k_scale
    v_cache: torch.Tensor,  # [num_blocks, block_size, KVH, D]
    seq_lens: torch.Tensor,  # [B] int32
    block_tables: torch.Tensor,  # [B, max_blocks] int32
    scale: float,
    num_splits: int = 1,
    out: torch.Tensor | None = None,  # [B, H, D]
    partials: DecodePartials | None = None,
    block_n: int = 64,
    num_warps: int = 4,
    num_stages: int = 2,
    k_scale: torch.Tensor | None = None,  # [num_blocks, block_size, KVH] fp32: an fp8 cache's row scales
    v_scale: torch.Tensor | None = None,  # [num_blocks, block_size, KVH] fp32
) -> torch.Tensor:  # [B, H, D]
    """softmax(q . K^T * scale) V for each sequence's one query over its seq_lens[b] cached keys.

    Launch only depends on shapes and host ints (no device reads), so it can be captured in a CUDA graph."""
    if q.dim() != 3:
        raise ValueError(f"q must be [B, H, D], got {tuple(q.shape)}")
    batch, num_heads, head_dim = q.shape
    kv_heads = check_paged_cache(q, k_cache, v_cache, k_scale, v_scale)
    if seq_lens.shape != (batch,) or block_tables.dim() != 2 or block_tables.shape[0] != batch:
        raise ValueError(f"seq_lens must be [{batch}] and block_tables [{batch}, max_blocks]")
    if q.stride(-1) != 1 or block_tables.stride(-1) != 1:
        raise ValueError("q and block_tables must be contiguous along their last dim")
    if num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    if block_n < 16 or block_n & (block_n - 1):
        raise ValueError(f"block_n must be a power of two >= 16, got {block_n}")
    if out is None:
        out = q.new_empty(q.shape)
    elif out.shape != q.shape or out.stride(-1) != 1:
        raise ValueError(f"out must be {tuple(q.shape)} and contiguous along head_dim")
    if batch == 0:
        return out
    if num_splits > 1:
        if partials is None:
            partials = DecodePartials.empty(batch, num_heads, head_dim, num_splits, q.device)
        m, l, acc = partials.m, partials.l, partials.acc
        want = (batch, num_heads, num_splits)
        if any(t.shape[:3] != want or not t.is_contiguous() for t in (m, l, acc)) or acc.shape[3:] != (head_dim,):
            raise ValueError(f"partials must be contiguous and sized for {want + (head_dim,)}, got {tuple(acc.shape)}")
    else:
        m = l = acc = out  # unused by the kernel when NUM_SPLITS == 1

    group = num_heads // kv_heads
    block_d = max(16, triton.next_power_of_2(head_dim))  # compiled tl.dot needs K >= 16 (head_dim 8: masked)
    scales = scale_args(k_cache, k_scale, v_scale)
    _decode_split_kernel[(batch, kv_heads, num_splits)](
        q, k_cache, v_cache, *scales[:2], block_tables, seq_lens, out, m, l, acc, scale * LOG2E,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), *scales[2:],
        block_tables.stride(0), out.stride(0), out.stride(1),
        NUM_SPLITS=num_splits, GROUP=group, BLOCK_G=max(16, triton.next_power_of_2(group)),
        HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_N=block_n, BLOCK_SIZE=k_cache.shape[1], QUANT=k_scale is not None,
        num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
    if num_splits > 1:
        _decode_reduce_kernel[(batch, num_heads)](
            m, l, acc, out, out.stride(0), out.stride(1),
            NUM_SPLITS=num_splits, BLOCK_S=triton.next_power_of_2(num_splits), HEAD_DIM=head_dim, BLOCK_D=block_d,
            num_warps=4,
        )  # fmt: skip
    return out
