"""Slow, obviously-correct PyTorch references for every kernel in this package (the tests compare against them).

They loop over tokens and sequences in Python and compute attention in float64 from an explicit gather of
each sequence's keys, sharing no code or tiling with the kernels.
"""

from __future__ import annotations

import torch


FP8_MAX = torch.finfo(torch.float8_e4m3fn).max  # 448.0, the largest finite e4m3 value


def quantize_fp8_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., D] -> (x / s as float8_e4m3fn [..., D], s [...] fp32), s = max|x| / 448 per row (1 where the row
    is all zeros): the fp8 cache's format (kv_store.py)."""
    xf = x.float()
    scale = xf.abs().amax(-1) / FP8_MAX
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # (zero rows, and rows of tiny subnormals)
    return (xf / scale[..., None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale


def dequantize_fp8_ref(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """[..., D] fp8 rows times their [...] scales, in float64."""
    return x.double() * scale.double()[..., None]


def store_kv_ref(
    k: torch.Tensor,  # [T, num_kv_heads, head_dim]
    v: torch.Tensor,  # [T, num_kv_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    slot_mapping: torch.Tensor,  # [T] int64, -1 = skip
    k_scale: torch.Tensor | None = None,  # [num_blocks, block_size, num_kv_heads] fp32: with an fp8 cache
    v_scale: torch.Tensor | None = None,
) -> None:
    """Reference for kv_store.store_kv: one token at a time."""
    block_size = k_cache.shape[1]
    for t, slot in enumerate(slot_mapping.tolist()):
        if slot < 0:
            continue
        at = (slot // block_size, slot % block_size)
        if k_scale is None:
            k_cache[at] = k[t].to(k_cache.dtype)
            v_cache[at] = v[t].to(v_cache.dtype)
        else:
            (k_cache[at], k_scale[at]), (v_cache[at], v_scale[at]) = quantize_fp8_ref(k[t]), quantize_fp8_ref(v[t])


def gather_keys_ref(
    cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    block_table: torch.Tensor,  # [max_blocks] physical block ids of one sequence
    seq_len: int,
) -> torch.Tensor:  # [seq_len, num_kv_heads, head_dim]
    """The first seq_len cached rows of one sequence, token by token through its block table."""
    block_size = cache.shape[1]
    table = block_table.tolist()
    rows = [cache[table[j // block_size], j % block_size] for j in range(seq_len)]
    if not rows:
        return cache.new_zeros(0, cache.shape[2], cache.shape[3])
    return torch.stack(rows)


def paged_attention_ref(
    q: torch.Tensor,  # [T, H, D]
    k_cache: torch.Tensor,  # [num_blocks, block_size, KVH, D]
    v_cache: torch.Tensor,  # [num_blocks, block_size, KVH, D]
    cu_seqlens_q: torch.Tensor,  # [B + 1]
    seq_lens: torch.Tensor,  # [B]
    block_tables: torch.Tensor,  # [B, max_blocks]
    scale: float,
    k_scale: torch.Tensor | None = None,  # [num_blocks, block_size, KVH]: an fp8 cache's row scales
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:  # [T, H, D] in q's dtype; rows outside every sequence are 0
    """Reference for prefill.paged_prefill (and decode.paged_decode, where every chunk has one token): query t
    of sequence b sits at position seq_len - q_len + t and attends to keys 0 ..= that position. Sequences with
    no keys give zeros. An fp8 cache is read as its rows times their scales."""
    if k_scale is not None:
        k_cache, v_cache = dequantize_fp8_ref(k_cache, k_scale), dequantize_fp8_ref(v_cache, v_scale)
    num_heads = q.shape[1]
    group = num_heads // k_cache.shape[2]
    out = torch.zeros(q.shape, dtype=torch.float64, device=q.device)
    cu = cu_seqlens_q.tolist()
    for b, seq_len in enumerate(seq_lens.tolist()):
        q_len = cu[b + 1] - cu[b]
        if q_len == 0 or seq_len == 0:
            continue
        keys = gather_keys_ref(k_cache, block_tables[b], seq_len).double()  # [S, KVH, D]
        vals = gather_keys_ref(v_cache, block_tables[b], seq_len).double()
        keys = keys.repeat_interleave(group, dim=1).transpose(0, 1)  # [H, S, D]: head h reads KV head h // group
        vals = vals.repeat_interleave(group, dim=1).transpose(0, 1)
        qb = q[cu[b] : cu[b + 1]].double().transpose(0, 1)  # [H, q_len, D]
        scores = qb @ keys.transpose(1, 2) * scale  # [H, q_len, S]
        pos = torch.arange(seq_len - q_len, seq_len, device=q.device).view(-1, 1)
        visible = torch.arange(seq_len, device=q.device).view(1, -1) <= pos  # [q_len, S]
        scores = scores.masked_fill(~visible, float("-inf"))
        out[cu[b] : cu[b + 1]] = (scores.softmax(-1) @ vals).transpose(0, 1)
    return out.to(q.dtype)


def paged_decode_ref(
    q: torch.Tensor,  # [B, H, D]
    k_cache: torch.Tensor,  # [num_blocks, block_size, KVH, D]
    v_cache: torch.Tensor,  # [num_blocks, block_size, KVH, D]
    seq_lens: torch.Tensor,  # [B]
    block_tables: torch.Tensor,  # [B, max_blocks]
    scale: float,
    k_scale: torch.Tensor | None = None,  # [num_blocks, block_size, KVH]: an fp8 cache's row scales
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:  # [B, H, D]
    """Reference for decode.paged_decode: each sequence's one query sees all its seq_lens[b] keys."""
    cu = torch.arange(q.shape[0] + 1)
    return paged_attention_ref(q, k_cache, v_cache, cu, seq_lens, block_tables, scale, k_scale, v_scale)


def add_rms_norm_ref(
    x: torch.Tensor,  # [T, N]
    weight: torch.Tensor,  # [N]
    eps: float,
    residual: torch.Tensor | None = None,  # [T, N]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference for fused.add_rms_norm: s = x + residual rounded to x's dtype; RMSNorm(s) * weight in float64,
    rounded to x's dtype once."""
    s = x if residual is None else (x.double() + residual.double()).to(x.dtype)
    sd = s.double()
    y = sd / torch.sqrt(sd.pow(2).mean(-1, keepdim=True) + eps) * weight.double()
    return y.to(x.dtype), s


def silu_mul_ref(gate_up: torch.Tensor) -> torch.Tensor:  # [T, 2F] -> [T, F]
    """Reference for fused.silu_mul: silu(gate) * up in float64, rounded once."""
    gate, up = gate_up.double().chunk(2, dim=-1)
    return (gate * torch.sigmoid(gate) * up).to(gate_up.dtype)


def rope_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Reference for fused.rope_ (one of q, k): x [T, heads, D], cos/sin [T, R/2]; pair i of each head is
    (x[2i], x[2i+1]) for i < R/2, rotated by angle i in float64, one token and pair at a time; the rest of the
    dims are copied. Returns a new tensor in x's dtype."""
    out = x.double().clone()
    for t in range(x.shape[0]):
        for i in range(cos.shape[1]):
            c, s = float(cos[t, i]), float(sin[t, i])
            x0, x1 = out[t, :, 2 * i].clone(), out[t, :, 2 * i + 1].clone()
            out[t, :, 2 * i], out[t, :, 2 * i + 1] = x0 * c - x1 * s, x1 * c + x0 * s
    return out.to(x.dtype)
