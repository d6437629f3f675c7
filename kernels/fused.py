"""Triton kernels for the small element-wise ops of a GLM-4 decoder layer, each one launch instead of several.

A decode step is launch-bound and memory-bound outside the matmuls: in eager PyTorch, RMSNorm alone is seven
kernels that each read and write the whole [T, hidden] activation, RoPE about ten per projection. Fused:

    add_rms_norm   (x + residual) rounded to the dtype, then RMSNorm in fp32 rounded once   [T, N]
    silu_mul       silu(gate) * up of the fused gate_up projection, in fp32 rounded once    [T, 2F] -> [T, F]
    rope_          interleaved partial RoPE on q and k in place (pairs x[2i], x[2i+1])      [T, heads, D]

Numerics follow the PyTorch model (glm_serve/model/glm.py): the residual sum is rounded to the activation
dtype before the norm reads it (as `x + h` is), the norm computes in fp32 and multiplies by the fp32 weight
before its one rounding, and RoPE rotates in fp32. silu_mul rounds once where eager rounds twice. References:
reference.py (float64).

Rows are tiled several to a program when they are short (tiny test models), one per program at GLM-4's sizes.
Token counts are not specialised on (they change every step; a new variant would compile mid-serving).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_TILE = 4096  # elements per program: enough to keep a GPU's memory pipes busy, few programs in the interpreter


@triton.jit(do_not_specialize=["num_rows"])
def _add_rms_norm_kernel(
    x_ptr,  # [T, N]
    res_ptr,  # [T, N] (HAS_RESIDUAL)
    w_ptr,  # [N]
    out_ptr,  # [T, N]
    sum_ptr,  # [T, N] x + residual (HAS_RESIDUAL)
    num_rows,
    stride_x,
    stride_r,
    stride_o,
    stride_s,
    eps,
    N: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
):
    rows = (tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)).to(tl.int64)  # [BLOCK_ROWS]
    cols = tl.arange(0, BLOCK_N)
    mask = (rows < num_rows)[:, None] & (cols < N)[None, :]
    x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + rows[:, None] * stride_r + cols[None, :], mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(sum_ptr.dtype.element_ty)  # rounded, as `x + h` is
        tl.store(sum_ptr + rows[:, None] * stride_s + cols[None, :], x, mask=mask)
    xf = x.to(tl.float32)
    inv = tl.rsqrt(tl.sum(xf * xf, axis=1) / N + eps)  # [BLOCK_ROWS]
    w = tl.load(w_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)
    y = xf * inv[:, None] * w[None, :]
    tl.store(out_ptr + rows[:, None] * stride_o + cols[None, :], y.to(out_ptr.dtype.element_ty), mask=mask)


def add_rms_norm(
    x: torch.Tensor,  # [T, N]
    weight: torch.Tensor,  # [N]
    eps: float,
    residual: torch.Tensor | None = None,  # [T, N]
    out: torch.Tensor | None = None,  # [T, N]: where the norm goes (tests pass a poisoned one)
) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (RMSNorm(s) * weight, s) with s = x + residual rounded to x's dtype (s = x without a residual)."""
    if x.dim() != 2 or x.stride(-1) != 1:
        raise ValueError(f"x must be [T, N] and contiguous along N, got {tuple(x.shape)}")
    num_rows, n = x.shape
    if weight.shape != (n,) or weight.stride(-1) != 1:
        raise ValueError(f"weight must be [{n}] and contiguous, got {tuple(weight.shape)}")
    if residual is not None and (residual.shape != x.shape or residual.stride(-1) != 1 or residual.dtype != x.dtype):
        raise ValueError(f"residual must be {tuple(x.shape)} in {x.dtype}, contiguous along N, got "
                         f"{tuple(residual.shape)} in {residual.dtype}")
    if out is None:
        out = torch.empty_like(x)
    elif out.shape != x.shape or out.stride(-1) != 1:
        raise ValueError(f"out must be {tuple(x.shape)} and contiguous along N")
    total = torch.empty_like(x) if residual is not None else x
    if num_rows == 0:
        return out, total
    block_n = triton.next_power_of_2(n)
    block_rows = max(1, _TILE // block_n)
    _add_rms_norm_kernel[(triton.cdiv(num_rows, block_rows),)](
        x, residual if residual is not None else x, weight, out, total, num_rows,
        x.stride(0), residual.stride(0) if residual is not None else 0, out.stride(0), total.stride(0), eps,
        N=n, BLOCK_ROWS=block_rows, BLOCK_N=block_n, HAS_RESIDUAL=residual is not None,
    )  # fmt: skip
    return out, total


@triton.jit(do_not_specialize=["num_rows"])
def _silu_mul_kernel(
    gu_ptr,  # [T, 2F]: gate columns, then up columns
    out_ptr,  # [T, F]
    num_rows,
    stride_gu,
    stride_o,
    F: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_F: tl.constexpr,
):
    rows = (tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    mask = (rows < num_rows)[:, None] & (cols < F)[None, :]
    src = gu_ptr + rows[:, None] * stride_gu + cols[None, :]
    gate = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(src + F, mask=mask, other=0.0).to(tl.float32)
    y = gate / (1.0 + tl.exp(-gate)) * up
    tl.store(out_ptr + rows[:, None] * stride_o + cols[None, :], y.to(out_ptr.dtype.element_ty), mask=mask)


def silu_mul(
    gate_up: torch.Tensor,  # [T, 2F]
    out: torch.Tensor | None = None,  # [T, F]
) -> torch.Tensor:  # [T, F]
    """silu(gate_up[:, :F]) * gate_up[:, F:], computed in fp32 and rounded once."""
    if gate_up.dim() != 2 or gate_up.shape[1] % 2 or gate_up.stride(-1) != 1:
        raise ValueError(f"gate_up must be [T, 2F] and contiguous along its columns, got {tuple(gate_up.shape)}")
    num_rows, f = gate_up.shape[0], gate_up.shape[1] // 2
    if out is None:
        out = gate_up.new_empty(num_rows, f)
    elif out.shape != (num_rows, f) or out.stride(-1) != 1:
        raise ValueError(f"out must be [{num_rows}, {f}] and contiguous along its columns")
    if num_rows == 0:
        return out
    block_f = min(1024, triton.next_power_of_2(f))
    block_rows = max(1, _TILE // block_f)
    grid = (triton.cdiv(num_rows, block_rows), triton.cdiv(f, block_f))
    _silu_mul_kernel[grid](gate_up, out, num_rows, gate_up.stride(0), out.stride(0),
                           F=f, BLOCK_ROWS=block_rows, BLOCK_F=block_f)
    return out


@triton.jit
def _rotate(x_ptr, tok, stride_t, stride_h, cos, sin, tmask, HEADS: tl.constexpr, BLOCK_H: tl.constexpr,
            HALF: tl.constexpr, BLOCK_R: tl.constexpr):
    """Rotate the first 2 * HALF dims of every head of the tokens `tok` [BLOCK_T] in place."""
    heads = tl.arange(0, BLOCK_H)
    pairs = tl.arange(0, BLOCK_R)
    mask = tmask[:, None, None] & (heads < HEADS)[None, :, None] & (pairs < HALF)[None, None, :]
    even = x_ptr + tok[:, None, None] * stride_t + heads[None, :, None] * stride_h + 2 * pairs[None, None, :]
    x0 = tl.load(even, mask=mask, other=0.0)
    x1 = tl.load(even + 1, mask=mask, other=0.0)
    c, s = cos[:, None, :], sin[:, None, :]
    a, b = x0.to(tl.float32), x1.to(tl.float32)
    tl.store(even, (a * c - b * s).to(x0.dtype), mask=mask)
    tl.store(even + 1, (b * c + a * s).to(x0.dtype), mask=mask)


@triton.jit(do_not_specialize=["num_tokens"])
def _rope_kernel(
    q_ptr,  # [T, HQ, D]
    k_ptr,  # [T, HK, D]
    cos_ptr,  # [T, HALF] fp32
    sin_ptr,  # [T, HALF] fp32
    num_tokens,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_ct,
    stride_st,
    Q_HEADS: tl.constexpr,
    K_HEADS: tl.constexpr,
    HALF: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_HQ: tl.constexpr,
    BLOCK_HK: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    tok = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)  # [BLOCK_T]
    tmask = tok < num_tokens
    pairs = tl.arange(0, BLOCK_R)
    cmask = tmask[:, None] & (pairs < HALF)[None, :]
    cos = tl.load(cos_ptr + tok[:, None] * stride_ct + pairs[None, :], mask=cmask, other=0.0)  # [BLOCK_T, BLOCK_R]
    sin = tl.load(sin_ptr + tok[:, None] * stride_st + pairs[None, :], mask=cmask, other=0.0)
    _rotate(q_ptr, tok, stride_qt, stride_qh, cos, sin, tmask, Q_HEADS, BLOCK_HQ, HALF, BLOCK_R)
    _rotate(k_ptr, tok, stride_kt, stride_kh, cos, sin, tmask, K_HEADS, BLOCK_HK, HALF, BLOCK_R)


def rope_(
    q: torch.Tensor,  # [T, HQ, D] (any token/head strides: views into the fused qkv projection)
    k: torch.Tensor,  # [T, HK, D]
    cos: torch.Tensor,  # [T, rotary_dim / 2] fp32
    sin: torch.Tensor,  # [T, rotary_dim / 2] fp32
) -> None:
    """Interleaved (GPT-J style) partial RoPE in place: for i < rotary_dim / 2, the pair (x[2i], x[2i+1])
    becomes (x0 cos_i - x1 sin_i, x1 cos_i + x0 sin_i), in fp32; dims from rotary_dim on are left as they are."""
    if q.dim() != 3 or k.dim() != 3 or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        raise ValueError(f"q and k must be [T, heads, D] with one T and D, got {tuple(q.shape)} and {tuple(k.shape)}")
    num_tokens, q_heads, head_dim = q.shape
    half = cos.shape[-1]
    if cos.shape != (num_tokens, half) or sin.shape != cos.shape or 2 * half > head_dim:
        raise ValueError(f"cos and sin must be [{num_tokens}, rotary_dim / 2] with rotary_dim <= {head_dim}, got "
                         f"{tuple(cos.shape)} and {tuple(sin.shape)}")
    if q.stride(-1) != 1 or k.stride(-1) != 1 or cos.stride(-1) != 1 or sin.stride(-1) != 1:
        raise ValueError("q, k, cos and sin must be contiguous along their last dim")
    if cos.dtype != torch.float32 or sin.dtype != torch.float32:
        raise ValueError("cos and sin must be float32 (the rotation is computed in fp32)")
    if num_tokens == 0 or half == 0:
        return
    block_hq, block_hk = triton.next_power_of_2(q_heads), triton.next_power_of_2(k.shape[1])
    block_r = triton.next_power_of_2(half)
    block_t = max(1, _TILE // (block_hq * block_r))
    _rope_kernel[(triton.cdiv(num_tokens, block_t),)](
        q, k, cos, sin, num_tokens, q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos.stride(0), sin.stride(0),
        Q_HEADS=q_heads, K_HEADS=k.shape[1], HALF=half, BLOCK_T=block_t, BLOCK_HQ=block_hq, BLOCK_HK=block_hk,
        BLOCK_R=block_r,
    )  # fmt: skip
