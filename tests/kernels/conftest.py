"""Kernel-test setup: the Triton interpreter on CPU-only machines, the device and tolerances, and a builder
of random paged batches (physical blocks shuffled, unused cache slots poisoned)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import pytest
import torch

# Must happen before any @triton.jit kernel is defined (glm_serve.kernels is imported by the test modules,
# after this file): without a GPU the kernels run in Triton's interpreter on CPU tensors.
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# Max abs/rel error vs the float64 reference. fp32: the interpreter is exact up to fp32 rounding; a GPU runs
# the fp32 dots as 3xTF32, within a few fp32 ulps. fp16/bf16: outputs are rounded to the dtype and P is cast
# to it for the P.V product (bf16 has 8 mantissa bits, fp16 11).
_TOLERANCE = {
    (torch.float32, "cpu"): 1e-4,
    (torch.float32, "cuda"): 2e-4,
    (torch.float16, "cpu"): 5e-3,
    (torch.float16, "cuda"): 5e-3,
    (torch.bfloat16, "cuda"): 3e-2,
}


def tolerance(dtype: torch.dtype) -> dict:
    tol = _TOLERANCE[(dtype, DEVICE)]
    return {"atol": tol, "rtol": tol}


@dataclass
class PagedBatch:
    """A random batch laid out exactly as the runner would: sequence b's keys fill its blocks in order."""

    q: torch.Tensor  # [T, H, D] queries of the new tokens
    k_cache: torch.Tensor  # [num_blocks, block_size, KVH, D]: every sequence's seq_len keys, NaN (or junk) elsewhere
    v_cache: torch.Tensor  # [num_blocks, block_size, KVH, D]
    cu_seqlens_q: torch.Tensor  # [B + 1] int32
    seq_lens: torch.Tensor  # [B] int32
    block_tables: torch.Tensor  # [B, max_blocks] int32, padded with 0
    slot_mapping: torch.Tensor  # [T] int64: cache slot of each new token
    q_lens: list[int]
    max_seqlen_q: int
    max_seqlen_k: int


def make_paged_batch(
    q_lens: list[int],
    seq_lens: list[int],
    *,
    heads: int,
    kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype,
    seed: int,
    poison: float = float("nan"),
    q_scale: float = 1.0,
) -> PagedBatch:
    """Blocks are a random permutation (tables are not contiguous), two spare blocks exist, and every cache
    slot outside a sequence's keys holds `poison`: NaN makes any stray read show up in the output."""
    gen = torch.Generator().manual_seed(seed)
    need = [-(-s // block_size) for s in seq_lens]
    num_blocks = sum(need) + 2
    perm = torch.randperm(num_blocks, generator=gen)
    tables = torch.zeros(len(seq_lens), max(need, default=0) + 1, dtype=torch.int32)
    k_cache = torch.full((num_blocks, block_size, kv_heads, head_dim), poison, dtype=dtype)
    v_cache = torch.full_like(k_cache, poison)
    slots, used = [], 0
    for b, (q_len, seq_len) in enumerate(zip(q_lens, seq_lens)):
        blocks = perm[used : used + need[b]]
        used += need[b]
        tables[b, : need[b]] = blocks.int()
        pos = torch.arange(seq_len)
        rows = blocks[pos // block_size] * block_size + pos % block_size  # [seq_len] slots
        flat_k, flat_v = k_cache.view(-1, kv_heads, head_dim), v_cache.view(-1, kv_heads, head_dim)
        flat_k[rows] = torch.randn(seq_len, kv_heads, head_dim, generator=gen).to(dtype)
        flat_v[rows] = torch.randn(seq_len, kv_heads, head_dim, generator=gen).to(dtype)
        slots.append(rows[seq_len - q_len :])
    cu = torch.tensor([0] + q_lens, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    total = int(cu[-1])
    q = (torch.randn(total, heads, head_dim, generator=gen) * q_scale).to(dtype)
    return PagedBatch(
        q=q.to(DEVICE),
        k_cache=k_cache.to(DEVICE),
        v_cache=v_cache.to(DEVICE),
        cu_seqlens_q=cu.to(DEVICE),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE),
        block_tables=tables.to(DEVICE),
        slot_mapping=torch.cat(slots).long().to(DEVICE) if slots else torch.zeros(0, dtype=torch.long, device=DEVICE),
        q_lens=list(q_lens),
        max_seqlen_q=max(q_lens, default=0),
        max_seqlen_k=max(seq_lens, default=0),
    )


@pytest.fixture
def paged_batch():
    """Factory fixture: paged_batch(q_lens, seq_lens, heads=.., kv_heads=.., ...) -> PagedBatch."""
    return make_paged_batch
