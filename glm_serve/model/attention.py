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

Backends implement `AttentionBackend.forward`; the Triton one (glm_serve.kernels) plugs in the same way.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass

import numpy as np
import torch


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

    def warm_up(self, k_cache: torch.Tensor, v_cache: torch.Tensor, num_heads: int, max_seqlen_k: int) -> list:
        """Compile ahead what the engine's short warm-up requests do not reach (engine/warm_up.py). -> what it
        launched (nothing, by default)."""
        return []

    @abc.abstractmethod
    def forward(
        self,
        q: torch.Tensor,  # [T, num_heads, head_dim]
        k: torch.Tensor,  # [T, num_kv_heads, head_dim]
        v: torch.Tensor,  # [T, num_kv_heads, head_dim]
        k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
        v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
        meta: AttnMetadata,
        scale: float,
    ) -> torch.Tensor:  # [T, num_heads, head_dim]
        """Write k/v at meta.slot_mapping, then return softmax(q.K^T * scale) V over each sequence's context."""


def store_kv(
    k: torch.Tensor,  # [T, num_kv_heads, head_dim]
    v: torch.Tensor,  # [T, num_kv_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    slot_mapping: torch.Tensor,  # [T] int64, -1 = skip
) -> None:
    kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    flat_k = k_cache.view(-1, kv_heads, head_dim)
    flat_v = v_cache.view(-1, kv_heads, head_dim)
    valid = slot_mapping >= 0
    # Padding rows (CUDA-graph buckets) carry -1. Without host syncs, each padding row re-writes the first real
    # row (same slot, same values), so no two writes to one slot disagree: index_copy_ keeps one of duplicate
    # indices unpredictably, and a padding row re-writing slot 0's old contents could undo a real row's store.
    # When every row is padding, they all re-write slot 0 with what it holds.
    rows = torch.arange(slot_mapping.shape[0], device=slot_mapping.device)
    src = torch.where(valid, rows, valid.to(torch.uint8).argmax())  # [T] row whose K/V each row writes
    src_slots = slot_mapping[src]
    keep = (src_slots >= 0).view(-1, 1, 1)
    slots = src_slots.clamp(min=0)
    flat_k.index_copy_(0, slots, torch.where(keep, k[src].to(flat_k.dtype), flat_k.index_select(0, slots)))
    flat_v.index_copy_(0, slots, torch.where(keep, v[src].to(flat_v.dtype), flat_v.index_select(0, slots)))


# Keys per chunk of the torch backend's long-context path. A group whose padded context fits in one chunk runs one
# SDPA call with an explicit mask (the fast common case); longer ones merge per-chunk softmaxes, so the transient
# memory is that of one chunk: fp32 scores [b, H * max_q, KEY_CHUNK] plus the chunk's gathered K and V
# [b, KEY_CHUNK, KVH, D] (a 2048-token prefill chunk with 32 heads: 1 GiB of scores at any context length).
KEY_CHUNK = 4096


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

    def __init__(self, key_chunk: int = KEY_CHUNK):
        if key_chunk < 1:
            raise ValueError(f"key_chunk must be >= 1, got {key_chunk}")
        self.key_chunk = key_chunk  # rounded down to whole blocks (at least one) per call

    def forward(self, q, k, v, k_cache, v_cache, meta, scale):
        store_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        groups = _groups(meta, k_cache.shape[1], q.device)
        if len(groups) == 1:
            return self._attend(q, k_cache, v_cache, groups[0], scale)
        out = torch.empty_like(q)
        for g in groups:
            out[g.tokens] = self._attend(q[g.tokens], k_cache, v_cache, g, scale)
        return out

    def _attend(self, q, k_cache, v_cache, g: _Group, scale: float) -> torch.Tensor:  # [t, H, D]
        chunk_blocks = max(1, self.key_chunk // k_cache.shape[1])
        if g.block_tables.shape[1] <= chunk_blocks:
            return _attend(q, k_cache, v_cache, g, scale)
        return _attend_chunked(q, k_cache, v_cache, g, scale, chunk_blocks)


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
    mask: torch.Tensor | None = None  # [b, 1, max_q, max_k] bool, built on first use by the one-chunk path

    def visible(self, k0: int, n: int) -> torch.Tensor:
        """[b, 1, max_q, n] bool: query i of b sees key j (k0 <= j < k0 + n) iff j <= start + i. Padding rows
        see key 0 so that softmax stays finite; their outputs are dropped."""
        i = torch.arange(self.max_q, device=self.start.device).view(1, -1, 1)
        j = torch.arange(k0, k0 + n, device=self.start.device).view(1, 1, -1)
        return ((j <= self.start + i) | (j == 0)).unsqueeze(1)


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


def _attend(q: torch.Tensor, k_cache, v_cache, g: _Group, scale: float) -> torch.Tensor:
    """The whole context at once: one SDPA call with an explicit mask. -> [t, H, D]"""
    D = q.shape[2]
    B = g.block_tables.shape[0]
    kvh = k_cache.shape[2]
    group = q.shape[1] // kvh
    keys = k_cache[g.block_tables].reshape(B, g.max_k, kvh, D).permute(0, 2, 1, 3)  # [B, kvh, max_k, D]
    vals = v_cache[g.block_tables].reshape(B, g.max_k, kvh, D).permute(0, 2, 1, 3)  # [B, kvh, max_k, D]
    qp = _fold_queries(q, g, kvh)  # [B, kvh, group * max_q, D]
    if g.mask is None:
        g.mask = g.visible(0, g.max_k)
    mask = g.mask if group == 1 else g.mask.repeat(1, 1, group, 1)  # [B, 1, group * max_q, max_k]
    out = torch.nn.functional.scaled_dot_product_attention(
        qp, keys.to(q.dtype), vals.to(q.dtype), attn_mask=mask, scale=scale
    )  # [B, kvh, group * max_q, D]
    return _unfold(out, g)


def _attend_chunked(q: torch.Tensor, k_cache, v_cache, g: _Group, scale: float, chunk_blocks: int) -> torch.Tensor:
    """The context in chunks of `chunk_blocks` blocks, merged by an online softmax in float32: for each chunk c,
    m' = max(m, rowmax s_c), l' = l e^(m - m') + sum e^(s_c - m'), acc' = acc e^(m - m') + e^(s_c - m') V_c;
    the answer is acc / l. Chunk 0 holds key 0, which every row sees, so m is finite from the first chunk on
    (no -inf - -inf). Memory: one chunk's scores and K/V, whatever the context. -> [t, H, D]

    KV heads lead ([kvh, B, ...]) so that each chunk's K/V is gathered in one copy straight into a layout
    whose (kvh, B) batch flattens for bmm: [B, kvh, ...] would need a second, transposing copy per chunk."""
    D = q.shape[2]
    B, nblk = g.block_tables.shape
    block_size, kvh = k_cache.shape[1], k_cache.shape[2]
    group = q.shape[1] // kvh
    qf = (_fold_queries(q, g, kvh).transpose(0, 1).float() * scale).contiguous()  # [kvh, B, R, D], R = group*max_q
    rows = qf.shape[2]
    m = qf.new_full((kvh, B, rows, 1), float("-inf"))  # running row max
    den = qf.new_zeros(kvh, B, rows, 1)  # running sum of e^(s - m)
    acc = qf.new_zeros(kvh, B, rows, D)  # running sum of e^(s - m) V
    flat_k = k_cache.view(-1, kvh, D).transpose(0, 1)  # [kvh, num_slots, D] (a view)
    flat_v = v_cache.view(-1, kvh, D).transpose(0, 1)
    offsets = torch.arange(block_size, device=qf.device)  # [block_size]
    for b0 in range(0, nblk, chunk_blocks):
        tables = g.block_tables[:, b0:b0 + chunk_blocks]  # [B, nb]
        n = tables.shape[1] * block_size
        slots = (tables.unsqueeze(-1) * block_size + offsets).view(B, n)  # [B, n] cache slot of each key
        keys = flat_k[:, slots].float()  # [kvh, B, n, D]
        vals = flat_v[:, slots].float()  # [kvh, B, n, D]
        s = qf @ keys.transpose(2, 3)  # [kvh, B, R, n]
        hidden = ~g.visible(b0 * block_size, n).view(1, B, 1, g.max_q, n)
        s.view(kvh, B, group, g.max_q, n).masked_fill_(hidden, float("-inf"))
        m_new = torch.maximum(m, s.amax(-1, keepdim=True))
        s.sub_(m_new).exp_()  # e^(s - m'): hidden keys give 0
        alpha = (m - m_new).exp_()  # rescales what earlier chunks summed (0 before the first chunk)
        den.mul_(alpha).add_(s.sum(-1, keepdim=True))
        acc.mul_(alpha).add_(s @ vals)
        m = m_new
        del s, keys, vals  # freed before the next chunk allocates its own: the peak is one chunk, not two
    return _unfold((acc / den).to(q.dtype).transpose(0, 1), g)


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
            groups.append(_make_group(
                torch.from_numpy(first[local] + q_off).to(device), meta.block_tables[sel], meta.seq_lens[sel],
                torch.from_numpy(cu).to(device), torch.from_numpy(local).to(device),
                torch.from_numpy(q_off).to(device), int(lens.max()), int(meta.host_seq_lens[seqs].max()),
                block_size))
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
