"""Our GLM-4 (`glm`/`chatglm`) and GLM-4-0414 (`glm4`) decoder: a plain transcription of the architecture.

The forward takes one flat batch of tokens from many sequences (what the continuous-batching engine builds)
and a paged KV cache; logits are computed separately, only for the rows the engine samples.
Parameter names are ours; the loader maps both checkpoint layouts onto them (glm_serve/loader.py).

With `use_fused_ops(True)` (the engine's default beside the triton attention backend) the same layers run
their small element-wise ops as Triton kernels (glm_serve/kernels/fused.py): each residual add fused with the
norm after it, RoPE on q and k in one launch in place, silu(gate) * up in one. The plain path stays the
transcription the tests hold against HF transformers.
"""

from __future__ import annotations

import torch
from torch import nn

from glm_serve.config import ModelConfig
from glm_serve.model.attention import AttentionBackend, AttnMetadata, LayerCache, TorchPagedAttention

_kernels = None  # glm_serve.kernels, set by GlmForCausalLM.use_fused_ops(True)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, dim]
        # The remote code multiplies by the weight in fp32 and rounds once; that is the more accurate order.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * self.weight.float()).to(x.dtype)


class Rotary:
    """Partial, interleaved (GPT-J style) RoPE: the first `rotary_dim` dims rotate as adjacent pairs
    (x[2i], x[2i+1]) with theta_i = base^(-2i/rotary_dim); the remaining dims pass through."""

    def __init__(self, rotary_dim: int, base: float):
        self.rotary_dim = rotary_dim
        # Same float32 arithmetic as the reference implementation, so float32 logits match bit-for-bit-ish.
        # Explicit CPU device: the model may be built under `torch.device("meta")` by the loader.
        steps = torch.arange(0, rotary_dim, 2, dtype=torch.int64, device="cpu").float()
        self.inv_freq = 1.0 / (base ** (steps / rotary_dim))  # [rotary_dim // 2]

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [T] -> cos, sin [T, 1, rotary_dim // 2] in float32 (computed once per step)."""
        if self.inv_freq.device != positions.device:
            self.inv_freq = self.inv_freq.to(positions.device)
        inv = self.inv_freq
        freqs = positions.float()[:, None] * inv[None, :]
        return freqs.cos()[:, None, :], freqs.sin()[:, None, :]

    def apply(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [T, heads, head_dim] -> same shape, rotated."""
        r = self.rotary_dim
        rot = x[..., :r].float().unflatten(-1, (r // 2, 2))  # [T, heads, r/2, 2]
        x0, x1 = rot[..., 0], rot[..., 1]
        out = torch.stack((x0 * cos - x1 * sin, x1 * cos + x0 * sin), dim=-1).flatten(-2).to(x.dtype)
        return torch.cat((out, x[..., r:]), dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, rotary: Rotary, backend: AttentionBackend):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_size, self.kv_size = cfg.q_size, cfg.kv_size
        # Fused rows [q: heads*D | k: kv*D | v: kv*D], head-major inside each part (the remote-code layout).
        self.qkv_proj = nn.Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(self.q_size, cfg.hidden_size, bias=False)
        self.rotary = rotary
        self.backend = backend
        self.scale = self.head_dim**-0.5

    def _qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q [T, H, D], k and v [T, KVH, D]: views of one fused projection [T, q_size + 2 * kv_size]."""
        T = x.shape[0]
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        return (q.view(T, self.num_heads, self.head_dim), k.view(T, self.num_kv_heads, self.head_dim),
                v.view(T, self.num_kv_heads, self.head_dim))

    def forward(self, x, cos, sin, cache: LayerCache, meta: AttnMetadata):
        T = x.shape[0]
        q, k, v = self._qkv(x)
        q = self.rotary.apply(q, cos, sin)  # [T, H, D]
        k = self.rotary.apply(k, cos, sin)  # [T, KVH, D]
        out = self.backend.forward(q, k, v, cache, meta, self.scale)  # [T, H, D]
        return self.o_proj(out.reshape(T, self.q_size))

    def forward_fused(self, x, cos, sin, cache: LayerCache, meta: AttnMetadata):  # cos, sin: [T, rotary_dim / 2]
        T = x.shape[0]
        q, k, v = self._qkv(x)
        _kernels.rope_(q, k, cos, sin)  # in place, on the projection's views
        out = self.backend.forward(q, k, v, cache, meta, self.scale)  # [T, H, D]
        return self.o_proj(out.reshape(T, self.q_size))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.intermediate = cfg.intermediate_size
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)  # rows [gate | up]
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        gate, up = self.gate_up_proj(x).split(self.intermediate, dim=-1)
        return self.down_proj(nn.functional.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, rotary: Rotary, backend: AttentionBackend):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, rotary, backend)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)
        self.sandwich = cfg.sandwich_norms
        if self.sandwich:  # GLM-4-0414 normalises each sublayer's output before the residual add
            self.post_self_attn_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
            self.post_mlp_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, cache: LayerCache, meta):
        h = self.self_attn(self.input_layernorm(x), cos, sin, cache, meta)
        if self.sandwich:
            h = self.post_self_attn_layernorm(h)
        x = x + h
        h = self.mlp(self.post_attention_layernorm(x))
        if self.sandwich:
            h = self.post_mlp_layernorm(h)
        return x + h

    def forward_fused(self, h, residual, cos, sin, cache: LayerCache, meta):
        """forward with the fused kernels. h: the previous layer's output before its residual add (the embeddings
        for the first layer, residual None); -> (this layer's, the residual stream): the add happens in the next
        norm, as `x + h` rounded to the dtype, the same value the plain path adds."""
        add_rms_norm, silu_mul = _kernels.add_rms_norm, _kernels.silu_mul
        norm = self.input_layernorm
        x, residual = add_rms_norm(h, norm.weight, norm.eps, residual)
        h = self.self_attn.forward_fused(x, cos, sin, cache, meta)
        if self.sandwich:
            h = add_rms_norm(h, self.post_self_attn_layernorm.weight, self.post_self_attn_layernorm.eps)[0]
        norm = self.post_attention_layernorm
        x, residual = add_rms_norm(h, norm.weight, norm.eps, residual)
        h = self.mlp.down_proj(silu_mul(self.mlp.gate_up_proj(x)))
        if self.sandwich:
            h = add_rms_norm(h, self.post_mlp_layernorm.weight, self.post_mlp_layernorm.eps)[0]
        return h, residual


class GlmForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig, backend: AttentionBackend | None = None):
        super().__init__()
        self.config = cfg
        self.backend = backend or TorchPagedAttention()
        self.rotary = Rotary(cfg.rotary_dim, cfg.rope_theta)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, self.rotary, self.backend) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.vision = None  # GLM-4V: the VisionTower, attached by the loader (glm_serve/model/vision.py)
        self.fused_ops = False  # see the module docstring

    def use_fused_ops(self, on: bool) -> None:
        global _kernels  # noqa: PLW0603 (imported once here, not per layer and step: triton is optional)
        if on:
            import glm_serve.kernels as kernels  # noqa: PLC0415 (fails here, not mid-step, without triton)

            _kernels = kernels
        self.fused_ops = on

    def set_backend(self, backend: AttentionBackend) -> None:
        self.backend = backend
        for layer in self.layers:
            layer.self_attn.backend = backend

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:  # [T] -> [T, hidden]
        return self.embed_tokens(input_ids)

    def forward(
        self,
        input_ids: torch.Tensor,  # [T] int64, flat over all sequences in the step
        positions: torch.Tensor,  # [T] int64
        meta: AttnMetadata,
        kv_caches: list[LayerCache],  # per layer: K, V [num_blocks, block, KVH, D] (+ scales when fp8)
        inputs_embeds: torch.Tensor | None = None,  # [T, hidden]: replaces embed(input_ids) (GLM-4V images)
    ) -> torch.Tensor:  # [T, hidden], after the final norm
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
        cos, sin = self.rotary.cos_sin(positions)
        if self.fused_ops:
            return self._forward_fused(x, cos.squeeze(1), sin.squeeze(1), meta, kv_caches)
        for layer, cache in zip(self.layers, kv_caches):
            x = layer(x, cos, sin, cache, meta)
        return self.norm(x)

    def _forward_fused(self, h, cos, sin, meta, kv_caches) -> torch.Tensor:  # cos, sin: [T, rotary_dim / 2]
        residual = None
        for layer, cache in zip(self.layers, kv_caches):
            h, residual = layer.forward_fused(h, residual, cos, sin, cache, meta)
        return _kernels.add_rms_norm(h, self.norm.weight, self.norm.eps, residual)[0]  # the last add, the final norm

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:  # [S, hidden] -> [S, vocab] float32
        return self.lm_head(hidden).float()
