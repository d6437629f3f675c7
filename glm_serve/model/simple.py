"""A one-sequence generation loop over the paged model: the reference path for tests and `generate` before
the engine is involved. One contiguous block table, prefill once, then one token per step."""

from __future__ import annotations

import torch

from glm_serve.model.attention import AttnMetadata, LayerCache
from glm_serve.model.glm import GlmForCausalLM


def single_seq_meta(start: int, n_new: int, block_size: int, num_blocks: int, device) -> AttnMetadata:
    """Metadata for one sequence whose tokens [start, start + n_new) are new, stored contiguously."""
    i32 = dict(dtype=torch.int32, device=device)
    return AttnMetadata(
        cu_seqlens_q=torch.tensor([0, n_new], **i32),
        seq_lens=torch.tensor([start + n_new], **i32),
        slot_mapping=torch.arange(start, start + n_new, dtype=torch.int64, device=device),
        block_tables=torch.arange(num_blocks, **i32).view(1, -1),
        max_seqlen_q=n_new,
        max_seqlen_k=start + n_new,
        token_to_seq=torch.zeros(n_new, dtype=torch.int64, device=device),
        token_q_offset=torch.arange(n_new, dtype=torch.int64, device=device),
    )


def allocate_cache(model: GlmForCausalLM, num_tokens: int, block_size: int, dtype, device, fp8: bool = False):
    """Per layer, a LayerCache of num_tokens (rounded up to blocks); -> (caches, num_blocks)."""
    cfg = model.config
    num_blocks = (num_tokens + block_size - 1) // block_size
    return [LayerCache.allocate(num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim, dtype, device, fp8)
            for _ in range(cfg.num_layers)], num_blocks


@torch.inference_mode()
def generate_simple(
    model: GlmForCausalLM,
    prompt_ids: list[int],
    max_tokens: int,
    stop_ids: set[int] | frozenset = frozenset(),
    temperature: float = 0.0,
    seed: int | None = None,
    block_size: int = 16,
    on_token=None,  # called with each new token id (streaming)
) -> list[int]:
    device = model.embed_tokens.weight.device
    dtype = next(p for p in model.parameters() if p.is_floating_point()).dtype
    max_len = min(len(prompt_ids) + max_tokens, model.config.max_position)
    caches, num_blocks = allocate_cache(model, max_len, block_size, dtype, device)
    gen = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    tokens = list(prompt_ids)
    new_ids = torch.tensor(tokens, dtype=torch.int64, device=device)
    start, out = 0, []
    while len(out) < max_tokens and len(tokens) < max_len:
        n = new_ids.shape[0]
        meta = single_seq_meta(start, n, block_size, num_blocks, device)
        positions = torch.arange(start, start + n, device=device)
        hidden = model(new_ids, positions, meta, caches)
        logits = model.compute_logits(hidden[-1:])[0]  # [V]
        if temperature <= 0:
            nxt = int(logits.argmax())
        else:
            probs = torch.softmax(logits / temperature, dim=-1)
            nxt = int(torch.multinomial(probs, 1, generator=gen))
        start += n
        tokens.append(nxt)
        out.append(nxt)
        if on_token is not None:
            on_token(nxt)
        if nxt in stop_ids:
            break
        new_ids = torch.tensor([nxt], dtype=torch.int64, device=device)
    return out
