"""Checkpoint tensor names: one table per layout mapping checkpoint names onto our parameters (and slices).

Data, not code paths: `make-tiny` writes with these tables and the loader reads with them, so the two layouts
of one checkpoint can never drift apart.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from glm_serve.config import ModelConfig

# Rows of our fused qkv_proj that each HF tensor fills, as (part, index): q = 0, k = 1, v = 2.
_QKV = {"q_proj": 0, "k_proj": 1, "v_proj": 2}


@dataclass(frozen=True)
class Target:
    param: str  # our parameter name, e.g. "layers.3.self_attn.qkv_proj.weight"
    rows: tuple[int, int] | None = None  # slice of dim 0 this tensor fills (split q/k/v); None = whole


# Layout -> list of (checkpoint-name regex, our name template, qkv part or None). `{i}` is the layer index.
TABLES: dict[str, list[tuple[str, str, str | None]]] = {
    "hf": [
        (r"model\.embed_tokens\.weight", "embed_tokens.weight", None),
        (r"model\.layers\.(\d+)\.input_layernorm\.weight", "layers.{i}.input_layernorm.weight", None),
        (r"model\.layers\.(\d+)\.self_attn\.(q_proj|k_proj|v_proj)\.(weight|bias)", "layers.{i}.self_attn.qkv_proj.{p}", "qkv"),
        (r"model\.layers\.(\d+)\.self_attn\.o_proj\.weight", "layers.{i}.self_attn.o_proj.weight", None),
        (r"model\.layers\.(\d+)\.post_attention_layernorm\.weight", "layers.{i}.post_attention_layernorm.weight", None),
        (r"model\.layers\.(\d+)\.post_self_attn_layernorm\.weight", "layers.{i}.post_self_attn_layernorm.weight", None),
        (r"model\.layers\.(\d+)\.post_mlp_layernorm\.weight", "layers.{i}.post_mlp_layernorm.weight", None),
        (r"model\.layers\.(\d+)\.mlp\.gate_up_proj\.weight", "layers.{i}.mlp.gate_up_proj.weight", None),
        (r"model\.layers\.(\d+)\.mlp\.down_proj\.weight", "layers.{i}.mlp.down_proj.weight", None),
        (r"model\.norm\.weight", "norm.weight", None),
        (r"lm_head\.weight", "lm_head.weight", None),
    ],
    "chatglm": [
        (r"transformer\.embedding\.word_embeddings\.weight", "embed_tokens.weight", None),
        (r"transformer\.encoder\.layers\.(\d+)\.input_layernorm\.weight", "layers.{i}.input_layernorm.weight", None),
        (r"transformer\.encoder\.layers\.(\d+)\.self_attention\.query_key_value\.(weight|bias)", "layers.{i}.self_attn.qkv_proj.{p}", None),
        (r"transformer\.encoder\.layers\.(\d+)\.self_attention\.dense\.weight", "layers.{i}.self_attn.o_proj.weight", None),
        (r"transformer\.encoder\.layers\.(\d+)\.post_attention_layernorm\.weight", "layers.{i}.post_attention_layernorm.weight", None),
        (r"transformer\.encoder\.layers\.(\d+)\.mlp\.dense_h_to_4h\.weight", "layers.{i}.mlp.gate_up_proj.weight", None),
        (r"transformer\.encoder\.layers\.(\d+)\.mlp\.dense_4h_to_h\.weight", "layers.{i}.mlp.down_proj.weight", None),
        (r"transformer\.encoder\.final_layernorm\.weight", "norm.weight", None),
        (r"transformer\.output_layer\.weight", "lm_head.weight", None),
    ],
}

# Tensors that exist in real checkpoints but carry nothing we use.
IGNORED = {
    # Built with base 10000 regardless of rope_ratio: wrong for the chat models, so we compute our own.
    "chatglm": [r"transformer\.rotary_pos_emb\.inv_freq"],
    "hf": [r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq", r"model\.rotary_emb\.inv_freq"],
}

_COMPILED = {k: [(re.compile(rx), tpl, kind) for rx, tpl, kind in v] for k, v in TABLES.items()}
_IGNORED = {k: [re.compile(rx) for rx in v] for k, v in IGNORED.items()}


def map_name(cfg: ModelConfig, name: str) -> Target | None:
    """Checkpoint tensor name -> our target, or None when it is to be ignored. Raises KeyError if unknown."""
    for rx in _IGNORED[cfg.layout]:
        if rx.fullmatch(name):
            return None
    for rx, tpl, kind in _COMPILED[cfg.layout]:
        m = rx.fullmatch(name)
        if not m:
            continue
        groups = m.groups()
        i = groups[0] if groups else ""
        if kind == "qkv":
            part, p = _QKV[groups[1]], groups[2]
            return Target(tpl.format(i=i, p=p), qkv_rows(cfg, part))
        p = groups[1] if len(groups) > 1 else ""
        return Target(tpl.format(i=i, p=p))
    raise KeyError(name)


def qkv_rows(cfg: ModelConfig, part: int) -> tuple[int, int]:
    bounds = [0, cfg.q_size, cfg.q_size + cfg.kv_size, cfg.q_size + 2 * cfg.kv_size]
    return bounds[part], bounds[part + 1]


def checkpoint_names(cfg: ModelConfig, our_name: str) -> list[tuple[str, tuple[int, int] | None]]:
    """Inverse of map_name for writing checkpoints: our parameter -> [(checkpoint name, rows or None)]."""
    m = re.fullmatch(r"layers\.(\d+)\.(.+)", our_name)
    i, rest = (m.group(1), m.group(2)) if m else ("", our_name)
    if cfg.layout == "hf":
        if rest.startswith("self_attn.qkv_proj."):
            p = rest.rsplit(".", 1)[1]
            return [(f"model.layers.{i}.self_attn.{n}.{p}", qkv_rows(cfg, k)) for n, k in _QKV.items()]
        if our_name == "lm_head.weight":
            return [("lm_head.weight", None)]
        if m:
            return [(f"model.layers.{i}.{rest}", None)]
        return [(f"model.{our_name}", None)]
    names = {
        "embed_tokens.weight": "transformer.embedding.word_embeddings.weight",
        "norm.weight": "transformer.encoder.final_layernorm.weight",
        "lm_head.weight": "transformer.output_layer.weight",
        "input_layernorm.weight": "input_layernorm.weight",
        "post_attention_layernorm.weight": "post_attention_layernorm.weight",
        "self_attn.qkv_proj.weight": "self_attention.query_key_value.weight",
        "self_attn.qkv_proj.bias": "self_attention.query_key_value.bias",
        "self_attn.o_proj.weight": "self_attention.dense.weight",
        "mlp.gate_up_proj.weight": "mlp.dense_h_to_4h.weight",
        "mlp.down_proj.weight": "mlp.dense_4h_to_h.weight",
    }
    if rest not in names:
        raise KeyError(f"{our_name} has no chatglm-layout name")
    return [(f"transformer.encoder.layers.{i}.{names[rest]}" if m else names[rest], None)]
