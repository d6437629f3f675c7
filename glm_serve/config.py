"""ModelConfig: one normalised description of a GLM-4 checkpoint, read from either config.json layout.

Remote-code checkpoints (`model_type: chatglm`, THUDM/glm-4-9b-chat...) and HF-native ones (`glm`, `glm4`)
name the same numbers differently; everything below the loader sees only this object.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field, replace
from pathlib import Path

log = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = ("chatglm", "glm", "glm4")


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be loaded: the message names the file, field or tensor at fault."""


@dataclass(frozen=True)
class ModelConfig:
    model_type: str  # as written in config.json: chatglm | glm | glm4
    layout: str  # "chatglm" (transformer.* names, fused qkv) or "hf" (model.* names, split q/k/v)
    sandwich_norms: bool  # GLM-4-0414: post_self_attn_layernorm + post_mlp_layernorm in every layer
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int  # rows of the embedding / lm_head (padded; may exceed the tokenizer's size)
    rms_norm_eps: float
    rope_theta: float
    rotary_dim: int  # leading head dims that rotate (interleaved pairs); the rest pass through
    max_position: int
    qkv_bias: bool
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    torch_dtype: str | None = None  # dtype the checkpoint is stored in (informational)
    # lm_head shares the embedding when the checkpoint has no lm_head tensor (as transformers does); no GLM-4
    # release ties, but fine-tunes saved with the flag do
    tie_word_embeddings: bool = False
    vision: dict | None = field(default=None, compare=False)  # GLM-4V vision_config, when present

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def kv_bytes_per_token(self, dtype_bytes: int, fp8: bool = False) -> int:
        """K and V of one token over all layers; fp8 (--kv-cache-dtype fp8): a byte per value and a 4-byte
        scale per KV head (model/attention.py LayerCache)."""
        if fp8:
            return self.num_layers * 2 * (self.kv_size + 4 * self.num_kv_heads)
        return self.num_layers * 2 * self.kv_size * dtype_bytes

    @staticmethod
    def from_dict(cfg: dict, rope_theta_override: float | None = None) -> "ModelConfig":
        mt = cfg.get("model_type")
        if mt not in SUPPORTED_MODEL_TYPES:
            raise CheckpointError(
                f"config.json: unsupported model_type {mt!r} (glm-serve loads {', '.join(SUPPORTED_MODEL_TYPES)})"
            )
        qc = cfg.get("quantization_config")
        if qc:  # its tensors (qweight, scales, absmax...) would only fail later as "unexpected tensor"
            method = qc.get("quant_method", "?") if isinstance(qc, dict) else "?"
            raise CheckpointError(f"config.json: a pre-quantized checkpoint (quantization_config, {method}); glm-serve "
                                  "loads float weights and quantizes them itself: use the original checkpoint with "
                                  "--quantization nf4 or int8")
        get = _Getter(cfg)
        if mt == "chatglm":
            head_dim = get.int("kv_channels")
            num_heads = get.int("num_attention_heads")
            # Remote code: RoPE base = 10000 * rope_ratio; rotates half of each head (kv_channels // 2 dims).
            theta = 10000.0 * float(cfg.get("rope_ratio") or 1.0)
            c = ModelConfig(
                model_type=mt,
                layout="chatglm",
                sandwich_norms=False,
                hidden_size=get.int("hidden_size"),
                num_layers=get.int("num_layers"),
                num_heads=num_heads,
                num_kv_heads=get.int("multi_query_group_num") if cfg.get("multi_query_attention", True) else num_heads,
                head_dim=head_dim,
                intermediate_size=get.int("ffn_hidden_size"),
                vocab_size=get.int("padded_vocab_size"),
                rms_norm_eps=float(cfg.get("layernorm_epsilon", 1e-5)),
                rope_theta=theta,
                rotary_dim=head_dim // 2,
                max_position=get.int("seq_length"),
                qkv_bias=bool(cfg.get("add_qkv_bias", True)),
                eos_token_ids=_ids(cfg.get("eos_token_id")),
                pad_token_id=cfg.get("pad_token_id"),
                torch_dtype=cfg.get("torch_dtype"),
                vision=cfg.get("vision_config"),
            )
            if cfg.get("add_bias_linear"):
                raise CheckpointError("config.json: add_bias_linear=true is not a GLM-4 checkpoint (no such release)")
        else:
            num_heads = get.int("num_attention_heads")
            hidden = get.int("hidden_size")
            head_dim = int(cfg.get("head_dim") or hidden // num_heads)
            rope = cfg.get("rope_parameters") or {}
            # GLM-4-0414's model card has users add {"type": "yarn", ...}: the older spelling of rope_type.
            scaling = cfg.get("rope_scaling") or {}
            if not isinstance(rope, dict) or not isinstance(scaling, dict):
                raise CheckpointError("config.json: rope_parameters and rope_scaling must be objects")
            rope_type = (rope.get("rope_type") or rope.get("type") or scaling.get("rope_type") or scaling.get("type")
                         or "default")
            if rope_type != "default":
                raise CheckpointError(f"config.json: rope_type {rope_type!r} is not supported (only 'default')")
            theta = float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0)))
            factor = float(rope.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 0.5)))
            c = ModelConfig(
                model_type=mt,
                layout="hf",
                sandwich_norms=mt == "glm4",
                hidden_size=hidden,
                num_layers=get.int("num_hidden_layers"),
                num_heads=num_heads,
                num_kv_heads=int(cfg.get("num_key_value_heads") or num_heads),
                head_dim=head_dim,
                intermediate_size=get.int("intermediate_size"),
                vocab_size=get.int("vocab_size"),
                rms_norm_eps=float(cfg.get("rms_norm_eps", 1.5625e-07)),  # GlmConfig/Glm4Config default
                rope_theta=theta,
                rotary_dim=int(head_dim * factor),
                max_position=get.int("max_position_embeddings"),
                qkv_bias=bool(cfg.get("attention_bias", True)),
                eos_token_ids=_ids(cfg.get("eos_token_id")),
                pad_token_id=cfg.get("pad_token_id"),
                torch_dtype=cfg.get("torch_dtype") or cfg.get("dtype"),
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            )
            if mt == "glm" and c.max_position >= 131072 and c.rope_theta == 10000.0 and rope_theta_override is None:
                log.warning(
                    "config.json: a 128K-context GLM-4 HF checkpoint with rope_theta 10000 (the published -hf "
                    "files say so; the remote-code twin uses 10000*500). Pass --rope-theta to override."
                )
        if rope_theta_override is not None:
            c = replace(c, rope_theta=float(rope_theta_override))
        c.validate()
        return c

    def validate(self) -> None:
        for name in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim", "intermediate_size",
                     "vocab_size", "max_position"):
            if getattr(self, name) <= 0:
                raise CheckpointError(f"config.json: {name} must be positive, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise CheckpointError(
                f"config.json: {self.num_heads} attention heads are not a multiple of {self.num_kv_heads} KV heads"
            )
        if not math.isfinite(self.rms_norm_eps) or self.rms_norm_eps <= 0:  # <= 0 or NaN: NaN logits, silently
            raise CheckpointError(f"config.json: the RMSNorm epsilon must be > 0, got {self.rms_norm_eps}")
        if not math.isfinite(self.rope_theta) or self.rope_theta <= 0:  # a RoPE base <= 0 makes NaN logits
            raise CheckpointError(f"config.json: the RoPE base (rope_theta) must be > 0, got {self.rope_theta}")
        if self.rotary_dim % 2 or not 0 < self.rotary_dim <= self.head_dim:
            raise CheckpointError(f"config.json: rotary dims {self.rotary_dim} invalid for head_dim {self.head_dim}")


def load_config(model_dir: str | Path, rope_theta_override: float | None = None) -> ModelConfig:
    if rope_theta_override is not None and not (math.isfinite(rope_theta_override) and rope_theta_override > 0):
        raise ValueError(f"--rope-theta must be > 0, got {rope_theta_override}")
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{model_dir}: no config.json (not a checkpoint folder)")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    except OSError as e:  # e.g. a mounted model folder the server's user may not read
        raise CheckpointError(f"{path}: cannot read it ({e.strerror or e})") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(cfg).__name__}")
    try:
        return ModelConfig.from_dict(cfg, rope_theta_override)
    except CheckpointError:
        raise
    except (TypeError, ValueError) as e:  # a field of the wrong type, e.g. "rms_norm_eps": null
        raise CheckpointError(f"{path}: a field has a value of the wrong type ({e})") from None


class _Getter:
    def __init__(self, cfg: dict):
        self.cfg = cfg

    def int(self, key: str) -> int:
        if key not in self.cfg:
            raise CheckpointError(f"config.json: missing field {key!r} for model_type {self.cfg.get('model_type')!r}")
        v = self.cfg[key]
        if not isinstance(v, int) or isinstance(v, bool):
            raise CheckpointError(f"config.json: field {key!r} must be an integer, got {v!r}")
        return v


def _ids(v) -> tuple[int, ...]:
    if v is None:
        return ()
    return tuple(v) if isinstance(v, list) else (int(v),)

