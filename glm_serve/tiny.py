"""make-tiny: write a random-weight GLM-4 checkpoint in exactly the real on-disk format of either layout.

Tests, CI and the demo server run on these (real weights never reach our machines); `--preset glm-4-9b`
writes the real dimensions for GPU benchmarks. The weights come from one seeded generator in a fixed order
under our own names, then go out under the layout's names (glm_serve/weights.py), so the same seed gives
the same model in both layouts.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from glm_serve.config import ModelConfig
from glm_serve.tokenizer import STOP_TOKENS
from glm_serve.weights import checkpoint_names


@dataclass
class TinySpec:
    layout: str = "hf"  # hf | chatglm
    arch: str = "glm"  # glm (GLM-4) | glm4 (GLM-4-0414, sandwich norms; hf layout only)
    layers: int = 2
    hidden: int = 128
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 32
    ffn: int = 256
    shards: int = 1
    seed: int = 0
    rope_ratio: float = 500.0  # chatglm: base = 10000 * ratio; hf: rope_theta = 10000 * ratio
    max_position: int = 131072
    preset: str | None = None  # "glm-4-9b": real dimensions, bf16
    dtype: str = "float32"

    def __post_init__(self):
        if self.layout not in ("hf", "chatglm"):
            raise ValueError(f"--layout must be hf or chatglm, got {self.layout!r}")
        if self.arch not in ("glm", "glm4"):
            raise ValueError(f"--arch must be glm or glm4, got {self.arch!r}")
        if self.arch == "glm4" and self.layout != "hf":
            raise ValueError("--arch glm4 (GLM-4-0414) exists only in the hf layout")
        if self.preset == "glm-4-9b":
            self.layers, self.hidden, self.heads, self.head_dim, self.ffn = 40, 4096, 32, 128, 13696
            self.dtype = "bfloat16"
        elif self.preset is not None:
            raise ValueError(f"unknown preset {self.preset!r} (known: glm-4-9b)")
        for name in ("layers", "hidden", "heads", "kv_heads", "head_dim", "ffn"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if not math.isfinite(self.rope_ratio) or self.rope_ratio <= 0:
            raise ValueError(f"--rope-ratio must be > 0, got {self.rope_ratio}")
        if self.heads % self.kv_heads:
            raise ValueError(f"--kv-heads {self.kv_heads} must divide the {self.heads} attention heads")
        if self.shards < 1:
            raise ValueError("--shards must be >= 1")


@contextlib.contextmanager
def fresh_checkpoint_dir(out_dir: str | Path) -> Iterator[Path]:
    """A temporary folder beside `out_dir`, renamed to it once the block completes: `out_dir` never holds half a
    checkpoint (an interrupted run leaves nothing there, so a rerun, or a script that tests for config.json,
    starts over), and never a mix of an older checkpoint's files with ours (stale shards and index beside a new
    model.safetensors would load the old weights). ValueError when `out_dir` exists and is not an empty folder, or
    cannot be made there."""
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out} already exists and is not an empty folder: make-tiny writes a new checkpoint "
                         "(choose a new folder, or remove this one first)")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.make-tiny-", dir=out.parent))
    except OSError as e:  # a parent that is a file, a read-only or missing mount: a path, not a traceback
        raise ValueError(f"cannot create {out} ({e.strerror or e})") from None
    try:
        yield tmp
        # mkdtemp's folder is 0700 and safetensors writes 0600: give the checkpoint the modes a plain mkdir and
        # open would (umask applied), so a server running as another user (a container) can read it.
        umask = os.umask(0)
        os.umask(umask)
        for f in tmp.rglob("*"):
            f.chmod((0o777 if f.is_dir() else 0o666) & ~umask)
        tmp.chmod(0o777 & ~umask)
        os.replace(tmp, out)  # onto a missing or empty folder: atomic on POSIX
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def make_tiny(out_dir: str | Path, spec: TinySpec, device: str = "cpu") -> Path:
    """Write the checkpoint into `out_dir`, a new or empty folder (see fresh_checkpoint_dir)."""
    with fresh_checkpoint_dir(out_dir) as tmp:
        write_tiny(tmp, spec, device)
    return Path(out_dir)


def write_tiny(out: Path, spec: TinySpec, device: str = "cpu") -> Path:
    """Write the checkpoint's files into the folder `out` (no atomicity: make_tiny is the public entry)."""
    from glm_serve.tiny_tokenizer import write_tokenizer_files  # noqa: PLC0415 (heavy; only when writing)

    tok = write_tokenizer_files(out, spec.layout, max_position=spec.max_position)
    # The real vocab is padded (151343 tokens -> 151552 rows); pad ours to a multiple of 64 the same way.
    vocab = 151552 if spec.preset else int(math.ceil(tok.vocab_size / 64) * 64)
    stop_ids = [tok.special_ids[t] for t in STOP_TOKENS]
    config = _config_json(spec, vocab, stop_ids)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    gen = {"eos_token_id": stop_ids, "pad_token_id": stop_ids[0], "do_sample": True, "temperature": 0.8,
           "top_p": 0.8, "max_length": spec.max_position}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    cfg = ModelConfig.from_dict(config)
    _write_weights(out, cfg, spec, device)
    return out


def _config_json(spec: TinySpec, vocab: int, stop_ids: list[int]) -> dict:
    dtype = spec.dtype
    if spec.layout == "chatglm":
        return {
            "_name_or_path": "glm-serve/tiny-glm-4-chat",
            "model_type": "chatglm",
            "architectures": ["ChatGLMModel"],
            "auto_map": {
                "AutoConfig": "configuration_chatglm.ChatGLMConfig",
                "AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration",
                "AutoModelForCausalLM": "modeling_chatglm.ChatGLMForConditionalGeneration",
            },
            "add_bias_linear": False,
            "add_qkv_bias": True,
            "apply_query_key_layer_scaling": True,
            "apply_residual_connection_post_layernorm": False,
            "attention_dropout": 0.0,
            "attention_softmax_in_fp32": True,
            "bias_dropout_fusion": True,
            "ffn_hidden_size": spec.ffn,
            "fp32_residual_connection": False,
            "hidden_dropout": 0.0,
            "hidden_size": spec.hidden,
            "kv_channels": spec.head_dim,
            "layernorm_epsilon": 1.5625e-07,
            "multi_query_attention": True,
            "multi_query_group_num": spec.kv_heads,
            "num_attention_heads": spec.heads,
            "num_hidden_layers": spec.layers,
            "num_layers": spec.layers,
            "rope_ratio": spec.rope_ratio,
            "original_rope": True,
            "padded_vocab_size": vocab,
            "post_layer_norm": True,
            "rmsnorm": True,
            "seq_length": spec.max_position,
            "use_cache": True,
            "torch_dtype": dtype,
            "tie_word_embeddings": False,
            "eos_token_id": stop_ids,
            "pad_token_id": stop_ids[0],
        }
    return {
        "architectures": ["Glm4ForCausalLM" if spec.arch == "glm4" else "GlmForCausalLM"],
        "attention_bias": True,
        "attention_dropout": 0.0,
        "eos_token_id": stop_ids,
        "head_dim": spec.head_dim,
        "hidden_act": "silu",
        "hidden_size": spec.hidden,
        "initializer_range": 0.02,
        "intermediate_size": spec.ffn,
        "max_position_embeddings": spec.max_position,
        "model_type": "glm4" if spec.arch == "glm4" else "glm",
        "num_attention_heads": spec.heads,
        "num_hidden_layers": spec.layers,
        "num_key_value_heads": spec.kv_heads,
        "pad_token_id": stop_ids[0],
        "partial_rotary_factor": 0.5,
        "rms_norm_eps": 1.5625e-07,
        "rope_theta": 10000.0 * spec.rope_ratio,
        "tie_word_embeddings": False,
        "torch_dtype": dtype,
        "use_cache": True,
        "vocab_size": vocab,
    }


def _our_shapes(cfg: ModelConfig) -> list[tuple[str, tuple[int, ...]]]:
    """Our parameter names and shapes in a fixed order (the generator draws in this order)."""
    h, qkv = cfg.hidden_size, cfg.q_size + 2 * cfg.kv_size
    out = [("embed_tokens.weight", (cfg.vocab_size, h))]
    for i in range(cfg.num_layers):
        p = f"layers.{i}."
        out += [
            (p + "input_layernorm.weight", (h,)),
            (p + "self_attn.qkv_proj.weight", (qkv, h)),
            (p + "self_attn.qkv_proj.bias", (qkv,)),
            (p + "self_attn.o_proj.weight", (h, cfg.q_size)),
            (p + "post_attention_layernorm.weight", (h,)),
            (p + "mlp.gate_up_proj.weight", (2 * cfg.intermediate_size, h)),
            (p + "mlp.down_proj.weight", (h, cfg.intermediate_size)),
        ]
        if cfg.sandwich_norms:
            out += [(p + "post_self_attn_layernorm.weight", (h,)), (p + "post_mlp_layernorm.weight", (h,))]
    out += [("norm.weight", (h,)), ("lm_head.weight", (cfg.vocab_size, h))]
    return out


def _random(name: str, shape, gen: torch.Generator, device: str) -> torch.Tensor:
    # Scales chosen so a tiny random model still has well-separated logits (greedy comparisons are stable).
    if name.endswith("norm.weight"):
        return 1.0 + 0.1 * torch.randn(shape, generator=gen, device=device)
    if name.endswith("bias"):
        return 0.1 * torch.randn(shape, generator=gen, device=device)
    if name == "embed_tokens.weight":
        return torch.randn(shape, generator=gen, device=device)
    return torch.randn(shape, generator=gen, device=device) / math.sqrt(shape[1])


def _write_weights(out: Path, cfg: ModelConfig, spec: TinySpec, device: str) -> None:
    gen = torch.Generator(device=device).manual_seed(spec.seed)
    dtype = getattr(torch, spec.dtype)
    tensors: list[tuple[str, torch.Tensor]] = []
    for name, shape in _our_shapes(cfg):
        t = _random(name, shape, gen, device).to(dtype)
        for ck_name, rows in checkpoint_names(cfg, name):
            part = t if rows is None else t[rows[0]:rows[1]]
            tensors.append((ck_name, part.contiguous().cpu()))
    if spec.layout == "chatglm":  # the real files carry this stale buffer; the loader must ignore it
        inv = 1.0 / (10000 ** (torch.arange(0, cfg.rotary_dim, 2).float() / cfg.rotary_dim))
        tensors.append(("transformer.rotary_pos_emb.inv_freq", inv.to(dtype)))
    _save_sharded(out, tensors, spec.shards)


def _save_sharded(out: Path, tensors: list[tuple[str, torch.Tensor]], shards: int) -> None:
    total = sum(t.numel() * t.element_size() for _, t in tensors)
    if shards == 1:
        save_file(dict(tensors), str(out / "model.safetensors"), metadata={"format": "pt"})
        return
    per = total / shards
    groups: list[list[tuple[str, torch.Tensor]]] = [[] for _ in range(shards)]
    acc = 0
    for name, t in tensors:
        idx = min(int(acc // per), shards - 1)
        groups[idx].append((name, t))
        acc += t.numel() * t.element_size()
    weight_map = {}
    for k, group in enumerate(groups):
        fname = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        save_file(dict(group), str(out / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n, _ in group})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
