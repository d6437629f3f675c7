"""Attention over a paged KV cache: the batch descriptor the runner fills and the exact PyTorch backend.

The model's forward takes one flat batch of tokens from many sequences. Each sequence contributes its
*new* tokens (a prefill chunk, or one decode token); their keys and values are written into the paged cache
first, then every new query attends causally over the sequence's whole context, read back from the cache.

Paged cache layout, per layer (K and V alike):

    k_cache: [num_blocks, block_size, num_kv_heads, head_dim]

    block_tables[b] = [7, 2, 9, ...]          physical blocks of sequence b, in logical order
    token j of sequence b lives at  block_tables[b, j // block_size], offset j % block_size
    slot = physical_block * block_size + offset      (what slot_mapping holds for each new token)

    sequence b:   |<------------- seq_lens[b] keys ------------->|
                  |<-- context already cached -->|<- q_lens[b] ->|   new tokens: queries of this step
    query i of b (0-based among the new ones) sits at absolute position seq_lens[b] - q_lens[b] + i and
    sees keys 0 ..= that position.

With --kv-cache-dtype fp8 the cache holds each (token, KV head) row as float8_e4m3fn x / s, s = max|x| / 448 its
own scale (LayerCache): half the bytes of bf16 per token, so twice the context fits (GLM-4-9B-chat-1m's million
tokens in 41 GiB instead of 80), at an e4m3 rounding (1/16 relative at most) of every key and value.

Backends implement `AttentionBackend.forward`; the Triton one (glm_serve.kernels) plugs in the same way.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch


FP8_MAX = torch.finfo(torch.float8_e4m3fn).max  # 448.0, the largest finite e4m3 value


class LayerCache(NamedTuple):
    """One layer's paged KV cache, as the runner allocates it and every backend reads it."""

    k: torch.Tensor  # [num_blocks, block_size, num_kv_heads, head_dim] in the model's dtype, or float8_e4m3fn
    v: torch.Tensor  # [num_blocks, block_size, num_kv_heads, head_dim]
    k_scale: torch.Tensor | None = None  # [num_blocks, block_size, num_kv_heads] fp32: an fp8 cache's row scales
    v_scale: torch.Tensor | None = None  # [num_blocks, block_size, num_kv_heads] fp32

    @classmethod
    def allocate(cls, num_blocks: int, block_size: int, kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device, fp8: bool = False) -> LayerCache:
        shape = (num_blocks, block_size, kv_heads, head_dim)
        data = torch.float8_e4m3fn if fp8 else dtype
        k, v = torch.zeros(shape, dtype=data, device=device), torch.zeros(shape, dtype=data, device=device)
        if not fp8:
            return cls(k, v)
        return cls(k, v, torch.ones(shape[:3], device=device), torch.ones(shape[:3], device=device))


def quantize_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., D] -> (x / s as float8_e4m3fn [..., D], s [...] fp32 = max|x| / 448 per row, 1 for a zero row)."""
    xf = x.float()
    # Tested after the division: a row of fp32 subnormals below 448 * 2^-149 would get scale 0 (0 / 0 = NaN).
    scale = xf.abs().amax(-1) / FP8_MAX
    scale = torch.where(scale > 0, scale, 1.0)
    return (xf / scale.unsqueeze(-1)).clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale


def _rows(cache: torch.Tensor, scale: torch.Tensor | None, index: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """cache[index] in `dtype`; from an fp8 cache, times its rows' scales. Computed in `dtype` itself (each e4m3
    value is exact in bf16 and fp16), so the peak is the fp8 gather and its answer, not a float32 copy as well
    (256 decodes over 4096 keys: 1 GiB of K or V in float32)."""
    rows = cache[index].to(dtype)
    return rows if scale is None else rows.mul_(scale[index].unsqueeze(-1).to(dtype))


@dataclass
class AttnMetadata:
    """What one model step needs to know about the flat batch. Filled by the runner; read by backends."""

    cu_seqlens_q: torch.Tensor  # [B + 1] int32: new tokens of sequence b are flat rows cu[b]:cu[b+1]
    seq_lens: torch.Tensor  # [B] int32: keys each sequence attends to (cached context + its new tokens)
    slot_mapping: torch.Tensor  # [T] int64: cache slot for each new token's K/V; -1 = padding, not stored
    block_tables: torch.Tensor  # [B, max_blocks] int32: physical block ids, padded with 0 past the end
    max_seqlen_q: int  # host int: max of q_lens (grid sizing; bucketed for CUDA graphs)
    max_seqlen_k: int  # host int: max of seq_lens
    # [T] int64: which sequence each flat token belongs to (torch backend: pad/unpad without a loop)
    token_to_seq: torch.Tensor | None = None
    # [T] int64: index of each token among its sequence's new tokens
    token_q_offset: torch.Tensor | None = None
    # Host copies (numpy) the torch backend uses to group decode and prefill rows; None = one group.
    host_q_lens: object | None = None  # [B] int64 numpy: new tokens per sequence
    host_seq_lens: object | None = None  # [B] int64 numpy
    host_cu_seqlens_q: object | None = None  # [B + 1] int64 numpy
    # Extra per-step inputs the backend may precompute once per step and share across layers.
    cache: dict | None = None

    @property
    def num_seqs(self) -> int:
        return self.seq_lens.shape[0]


class AttentionBackend(abc.ABC):
    """Interface: store the new K/V in the cache, then attend. One instance per model, shared by layers."""

    name = "base"

    def check_supported(self, device: torch.device, dtype: torch.dtype) -> None:
        """Raise ValueError when this backend cannot compute correctly on `device` in `dtype`."""

    def check_fp8_cache(self, device: torch.device) -> None:
        """Raise ValueError when this backend cannot read an fp8 KV cache (--kv-cache-dtype fp8) on `device`."""

    def warm_up(self, cache: LayerCache, num_heads: int, max_seqlen_k: int, dtype: torch.dtype) -> list:
        """Compile ahead what the engine's short warm-up requests do not reach (engine/warm_up.py). -> what it
        launched (nothing, by default)."""
        return []

    @abc.abstractmethod
    def forward(
        self,
        q: torch.Tensor,  # [T, num_heads, head_dim]
        k: torch.Tensor,  # [T, num_kv_heads, head_dim]
        v: torch.Tensor,  # [T, num_kv_heads, head_dim]
        cache: LayerCache,  # this layer's paged K/V
        meta: AttnMetadata,
        scale: float,
    ) -> torch.Tensor:  # [T, num_heads, head_dim]
        """Write k/v at meta.slot_mapping, then return softmax(q.K^T * scale) V over each sequence's context."""


def store_kv(
    k: torch.Tensor,  # [T, num_kv_heads, head_dim]
    v: torch.Tensor,  # [T, num_kv_heads, head_dim]
    cache: LayerCache,
    slot_mapping: torch.Tensor,  # [T] int64, -1 = skip
) -> None:
    kv_heads, head_dim = cache.k.shape[2], cache.k.shape[3]
    if cache.k_scale is None:
        pairs = [(cache.k.view(-1, kv_heads, head_dim), k), (cache.v.view(-1, kv_heads, head_dim), v)]
    else:  # fp8 rows through uint8 views (index_copy_ has no fp8 kernel on the CPU), and their scales
        (k8, ks), (v8, vs) = quantize_fp8(k), quantize_fp8(v)
        pairs = [(cache.k.view(torch.uint8).view(-1, kv_heads, head_dim), k8.view(torch.uint8)),
                 (cache.v.view(torch.uint8).view(-1, kv_heads, head_dim), v8.view(torch.uint8)),
                 (cache.k_scale.view(-1, kv_heads), ks), (cache.v_scale.view(-1, kv_heads), vs)]
    valid = slot_mapping >= 0
    # Padding rows (CUDA-graph buckets) carry -1. Without host syncs, each padding row re-writes the first real
    # row (same slot, same values), so no two writes to one slot disagree: index_copy_ keeps one of duplicate
    # indices unpredictably, and a padding row re-writing slot 0's old contents could undo a real row's store.
    # When every row is padding, they all re-write slot 0 with what it holds.
    rows = torch.arange(slot_mapping.shape[0], device=slot_mapping.device)
    src = torch.where(valid, rows, valid.to(torch.uint8).argmax())  # [T] row whose K/V each row writes
    src_slots = slot_mapping[src]
    keep = src_slots >= 0
    slots = src_slots.clamp(min=0)
    for flat, new in pairs:
        here = keep.view(-1, *[1] * (flat.dim() - 1))
        flat.index_copy_(0, slots, torch.where(here, new[src].to(flat.dtype), flat.index_select(0, slots)))


# The torch backend's long-context path. A group whose padded context fits in KEY_CHUNK keys runs one SDPA call
# with an explicit mask (the fast common case); longer ones merge per-chunk softmaxes, so the transient memory is
# one chunk's, whatever the context: per KV head, float32 scores [b, group * max_q, n] (a 2048-token prefill
# chunk, 16 query heads per KV head, n = KEY_CHUNK: 512 MiB), and the chunk's gathered K and V
# [b, n, KVH, D], with b * n <= CHUNK_KEY_ROWS (256 sequences decoding: n = 256 keys).
KEY_CHUNK = 4096
CHUNK_KEY_ROWS = 16 * KEY_CHUNK


class TorchPagedAttention(AttentionBackend):
    """Exact attention in plain PyTorch: gather each sequence's keys through its block table, pad to
    [b, max_q] queries x [b, max_k] keys, mask, and call SDPA once per group (no per-sequence loop).
    Decode rows (one query) and prefill rows are separate groups, so a long prefill chunk in the step does not
    pad every decode to its length. GQA without repeating K/V: the `group` query heads that share a KV head are
    folded into the query rows. Contexts longer than `key_chunk` keys are attended chunk by chunk with an online
    softmax in float32 (`_attend_chunked`): memory bounded by the chunk, not the context.

    Never under CUDA-graph capture (the engine refuses --cuda-graphs with this backend): groups are built from
    host copies of the lengths and the chunk loop's trip count is a host int."""

    name = "torch"

    def __init__(self, key_chunk: int = KEY_CHUNK, chunk_key_rows: int = CHUNK_KEY_ROWS):
        if key_chunk < 1 or chunk_key_rows < 1:
            raise ValueError(f"key_chunk and chunk_key_rows must be >= 1, got {key_chunk}, {chunk_key_rows}")
        # Both rounded down to whole blocks (at least one) per call.
        self.key_chunk = key_chunk  # keys of one sequence per chunk; a longer context takes the chunked path
        self.chunk_key_rows = chunk_key_rows  # keys of all the group's sequences together per chunk

    def forward(self, q, k, v, cache: LayerCache, meta, scale):
        store_kv(k, v, cache, meta.slot_mapping)
        groups = _groups(meta, cache.k.shape[1], q.device)
        if len(groups) == 1:
            return self._attend(q, cache, groups[0], scale)
        out = torch.empty_like(q)
        for g in groups:
            out[g.tokens] = self._attend(q[g.tokens], cache, g, scale)
        return out

    def _attend(self, q, cache: LayerCache, g: _Group, scale: float) -> torch.Tensor:  # [t, H, D]
        block_size = cache.k.shape[1]
        chunk_blocks = max(1, self.key_chunk // block_size)
        if g.block_tables.shape[1] <= chunk_blocks:
            return _attend(q, cache, g, scale)
        return _attend_chunked(q, cache, g, scale, chunk_blocks, max(1, self.chunk_key_rows // block_size))


@dataclass
class _Group:
    """Sequences attended together by the torch backend (built once per step, shared by all layers)."""

    tokens: torch.Tensor | None  # [t] int64 flat rows of this group's tokens; None = the whole batch
    block_tables: torch.Tensor  # [b, nblk] int64
    token_to_seq: torch.Tensor  # [t] int64, local to the group
    q_off: torch.Tensor  # [t] int64
    start: torch.Tensor  # [b, 1, 1] int64: position of each sequence's first new token (seq_len - q_len)
    max_q: int
    max_k: int  # nblk * block_size
    host_lens: np.ndarray | None = None  # [b] int64 keys of each sequence, when the runner gave host copies
    host_start: np.ndarray | None = None  # [b] int64 the same as `start`, on the host
    mask: torch.Tensor | None = None  # [b, 1, max_q, max_k] bool, built on first use by the one-chunk path
    plans: dict = field(default_factory=dict)  # (chunk_blocks, budget_blocks) -> _ChunkPlan, on first use

    def plan(self, chunk_blocks: int, budget_blocks: int, block_size: int) -> _ChunkPlan:
        key = (chunk_blocks, budget_blocks)
        if key not in self.plans:
            self.plans[key] = _ChunkPlan.of(self, chunk_blocks, budget_blocks, block_size)
        return self.plans[key]


def _visible(start: torch.Tensor, max_q: int, k0: int, n: int) -> torch.Tensor:
    """[b, 1, max_q, n] bool from start [b, 1, 1]: query i of b sees key j (k0 <= j < k0 + n) iff
    j <= start + i. Padding rows see key 0 so that softmax stays finite; their outputs are dropped."""
    i = torch.arange(max_q, device=start.device).view(1, -1, 1)
    j = torch.arange(k0, k0 + n, device=start.device).view(1, 1, -1)
    return ((j <= start + i) | (j == 0)).unsqueeze(1)


class _Chunk(NamedTuple):
    first_block: int  # first block (column of the block table) of the chunk
    blocks: int  # blocks in it
    active: int  # sequences (a prefix of the plan's order) with keys in it
    masked: bool  # whether some query sees only part of it


@dataclass
class _ChunkPlan:
    """How the chunked path walks one group's keys, from the host lengths (built once per step).

    Sequences go longest first, so the ones with keys in a chunk are a prefix of the order and a chunk past a
    short context costs it nothing: a decode group with one 100K context and 50 short ones computes
    ~100K + 50 * short keys, not 51 * 100K. Chunk 0 takes every sequence (every row sees key 0). A chunk holds
    at most `chunk_blocks` blocks of each sequence and `budget_blocks` over its sequences (a large decode
    group's chunk is shorter). A chunk wholly before every sequence's first new token needs no mask.
    Without host lengths: every sequence in every chunk, every chunk masked."""

    order: torch.Tensor | None  # [b] int64 sequences by decreasing length; None = as they are
    inverse: torch.Tensor | None  # [b] int64 where each sequence went in `order`
    chunks: list[_Chunk]

    @classmethod
    def of(cls, g: _Group, chunk_blocks: int, budget_blocks: int, block_size: int) -> _ChunkPlan:
        B, nblk = g.block_tables.shape
        order = inverse = None
        if g.host_lens is None:
            lens, starts = np.full(B, nblk * block_size), np.full(B, -1)
        else:
            perm = np.argsort(-g.host_lens, kind="stable")
            lens, starts = g.host_lens[perm], g.host_start[perm]
            if (perm != np.arange(B)).any():
                dev = g.block_tables.device
                order, inverse = torch.from_numpy(perm).to(dev), torch.from_numpy(np.argsort(perm)).to(dev)
        chunks, b0 = [], 0
        while b0 < nblk:
            a = B if b0 == 0 else int((lens > b0 * block_size).sum())
            if a == 0:
                break
            nb = min(chunk_blocks, max(1, budget_blocks // a), nblk - b0)
            chunks.append(_Chunk(b0, nb, a, bool((b0 + nb) * block_size > starts[:a].min())))
            b0 += nb
        return cls(order, inverse, chunks)


def _fold_queries(q: torch.Tensor, g: _Group, kvh: int) -> torch.Tensor:
    """[t, H, D] flat queries -> [B, kvh, group * max_q, D] padded, GQA-folded: row r is (g = r // max_q,
    i = r % max_q), so the `group` heads sharing a KV head attend as extra rows, without repeating K/V."""
    T, H, D = q.shape
    B, group = g.block_tables.shape[0], H // kvh
    qp = q.new_zeros(B, g.max_q, H, D)
    qp[g.token_to_seq, g.q_off] = q  # [B, max_q, H, D]
    return qp.view(B, g.max_q, kvh, group, D).permute(0, 2, 3, 1, 4).reshape(B, kvh, group * g.max_q, D)


def _unfold(out: torch.Tensor, g: _Group) -> torch.Tensor:
    """[B, kvh, group * max_q, D] -> [t, H, D] rows of the group's tokens (inverse of _fold_queries)."""
    B, kvh, rows, D = out.shape
    group = rows // g.max_q
    out = out.view(B, kvh, group, g.max_q, D).permute(0, 3, 1, 2, 4).reshape(B, g.max_q, kvh * group, D)
    return out[g.token_to_seq, g.q_off]  # [t, H, D]


def _attend(q: torch.Tensor, cache: LayerCache, g: _Group, scale: float) -> torch.Tensor:
    """The whole context at once: one SDPA call with an explicit mask. -> [t, H, D]"""
    D = q.shape[2]
    B = g.block_tables.shape[0]
    kvh = cache.k.shape[2]
    group = q.shape[1] // kvh
    keys = _rows(cache.k, cache.k_scale, g.block_tables, q.dtype).reshape(B, g.max_k, kvh, D).permute(0, 2, 1, 3)
    vals = _rows(cache.v, cache.v_scale, g.block_tables, q.dtype).reshape(B, g.max_k, kvh, D).permute(0, 2, 1, 3)
    # (both [B, kvh, max_k, D])
    qp = _fold_queries(q, g, kvh)  # [B, kvh, group * max_q, D]
    if g.mask is None:
        g.mask = _visible(g.start, g.max_q, 0, g.max_k)
    mask = g.mask if group == 1 else g.mask.repeat(1, 1, group, 1)  # [B, 1, group * max_q, max_k]
    out = torch.nn.functional.scaled_dot_product_attention(
        qp, keys, vals, attn_mask=mask, scale=scale
    )  # [B, kvh, group * max_q, D]
    return _unfold(out, g)


def _attend_chunked(q: torch.Tensor, cache: LayerCache, g: _Group, scale: float, chunk_blocks: int,
                    budget_blocks: int) -> torch.Tensor:
    """The context in chunks (planned by _ChunkPlan), merged by an online softmax in float32: for each chunk c,
    m' = max(m, rowmax s_c), l' = l e^(m - m') + sum e^(s_c - m'), acc' = acc e^(m - m') + e^(s_c - m') V_c;
    the answer is acc / l. Chunk 0 holds key 0, which every row sees, so m is finite from the first chunk on
    (no -inf - -inf). Memory: one chunk's K/V and one KV head's scores, whatever the context. -> [t, H, D]

    Each chunk's K/V is gathered whole blocks at a time ([a, n, kvh, D], one copy), and each KV head multiplies
    a strided view of it (no transposing copy), upcast to float32 one head at a time. Sequences go in the
    plan's order (longest first) and are put back at the end."""
    D = q.shape[2]
    B = g.block_tables.shape[0]
    block_size, kvh = cache.k.shape[1], cache.k.shape[2]
    group = q.shape[1] // kvh
    plan = g.plan(chunk_blocks, budget_blocks, block_size)
    qf = _fold_queries(q, g, kvh).float() * scale  # [B, kvh, R, D], R = group * max_q
    tables, start = g.block_tables, g.start  # [B, nblk], [B, 1, 1]
    if plan.order is not None:
        qf, tables, start = qf[plan.order], tables[plan.order], start[plan.order]
    rows = qf.shape[2]
    m = qf.new_full((B, kvh, rows, 1), float("-inf"))  # running row max
    den = qf.new_zeros(B, kvh, rows, 1)  # running sum of e^(s - m)
    acc = qf.new_zeros(B, kvh, rows, D)  # running sum of e^(s - m) V
    for b0, nb, a, masked in plan.chunks:  # sequences 0..a-1 (plan order) have keys here; the rest sit it out
        chunk = tables[:a, b0:b0 + nb]  # [a, nb]
        n = nb * block_size
        keys = cache.k[chunk].view(a, n, kvh, D)  # [a, n, kvh, D] in the cache's dtype
        vals = cache.v[chunk].view(a, n, kvh, D)
        fp8 = cache.k_scale is not None
        if fp8:
            k_scales, v_scales = cache.k_scale[chunk].view(a, n, kvh, 1), cache.v_scale[chunk].view(a, n, kvh, 1)
        hidden = ~_visible(start[:a], g.max_q, b0 * block_size, n) if masked else None  # [a, 1, max_q, n]
        for h in range(kvh):  # 2 or 4 KV heads; float32 per head (a view when the cache is float32)
            k_h, v_h = keys[:, :, h].float(), vals[:, :, h].float()  # [a, n, D]
            if fp8:
                k_h, v_h = k_h * k_scales[:, :, h], v_h * v_scales[:, :, h]
            s = qf[:a, h] @ k_h.transpose(1, 2)  # [a, R, n]
            if hidden is not None:
                s.view(a, group, g.max_q, n).masked_fill_(hidden, float("-inf"))
            m_h = m[:a, h]  # [a, R, 1] views into the running state, updated in place
            m_new = torch.maximum(m_h, s.amax(-1, keepdim=True))
            s.sub_(m_new).exp_()  # e^(s - m'): hidden keys give 0
            alpha = (m_h - m_new).exp_()  # rescales what earlier chunks summed (0 before the first chunk)
            den[:a, h].mul_(alpha).add_(s.sum(-1, keepdim=True))
            acc[:a, h].mul_(alpha).add_(s @ v_h)
            m_h.copy_(m_new)
            del s, k_h, v_h  # freed before the next head allocates its own
        del keys, vals  # freed before the next chunk gathers its own: the peak is one chunk, not two
    out = acc.div_(den)  # [B, kvh, R, D]
    if plan.inverse is not None:
        out = out[plan.inverse]
    return _unfold(out.to(q.dtype), g)


def _groups(meta: AttnMetadata, block_size: int, device) -> list[_Group]:
    """Decode rows and prefill rows as two groups when the runner gave host copies of the lengths, else one."""
    if meta.cache is None:
        meta.cache = {}
    if "torch_groups" in meta.cache:
        return meta.cache["torch_groups"]
    q_lens = meta.host_q_lens
    if q_lens is None or q_lens.min() > 1 or q_lens.max() == 1:
        groups = [_make_group(None, meta.block_tables, meta.seq_lens, meta.cu_seqlens_q, meta.token_to_seq,
                              meta.token_q_offset, meta.max_seqlen_q, meta.max_seqlen_k, block_size)]
        if q_lens is not None:
            groups[0].host_lens = np.asarray(meta.host_seq_lens, dtype=np.int64)
            groups[0].host_start = groups[0].host_lens - q_lens
    else:
        groups = []
        for seqs in (np.flatnonzero(q_lens == 1), np.flatnonzero(q_lens > 1)):
            lens = q_lens[seqs]  # [b]
            first = meta.host_cu_seqlens_q[seqs]  # [b] flat row of each sequence's first new token
            local = np.repeat(np.arange(len(seqs)), lens)  # [t] group-local sequence of each token
            q_off = np.arange(lens.sum()) - np.repeat(np.cumsum(lens) - lens, lens)  # [t]
            cu = np.zeros(len(seqs) + 1, dtype=np.int64)
            np.cumsum(lens, out=cu[1:])
            sel = torch.from_numpy(seqs).to(device)
            g = _make_group(
                torch.from_numpy(first[local] + q_off).to(device), meta.block_tables[sel], meta.seq_lens[sel],
                torch.from_numpy(cu).to(device), torch.from_numpy(local).to(device),
                torch.from_numpy(q_off).to(device), int(lens.max()), int(meta.host_seq_lens[seqs].max()),
                block_size)
            g.host_lens = np.asarray(meta.host_seq_lens[seqs], dtype=np.int64)
            g.host_start = g.host_lens - lens
            groups.append(g)
    meta.cache["torch_groups"] = groups
    return groups


def _make_group(tokens, tables, seq_lens, cu, t2s, q_off, max_q, max_k, block_size) -> _Group:
    nblk = (max_k + block_size - 1) // block_size
    q_lens = (cu[1:] - cu[:-1]).long()  # [b]
    start = (seq_lens.long() - q_lens).view(-1, 1, 1)  # [b, 1, 1]
    return _Group(tokens, tables[:, :nblk].long(), t2s, q_off, start, max_q, nblk * block_size)


def make_backend(name: str) -> AttentionBackend:
    if name == "torch":
        return TorchPagedAttention()
    if name == "triton":
        try:
            from glm_serve.model.triton_backend import TritonPagedAttention  # noqa: PLC0415 (needs triton)
        except ImportError as e:  # a one-line error from the CLI, not a traceback (triton is an optional extra)
            raise ValueError(f"the triton attention backend needs triton ({e}): pip install 'glm-serve[triton]', "
                             "or use --attention-backend torch") from None
        return TritonPagedAttention()
    raise ValueError(f"unknown attention backend {name!r} (choose 'torch' or 'triton')")
