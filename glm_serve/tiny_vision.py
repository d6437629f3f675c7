"""make-tiny --vision: a random-weight GLM-4V checkpoint in the real glm-4v-9b on-disk layout.

The language model and tokenizer come from glm_serve.tiny (remote-code layout); this adds what GLM-4V has on
top: `vision_config`, `boi_token_id` / `eoi_token_id` in config.json, and the `transformer.vision.*` tensors in
their own shards beside the LM's, all listed in model.safetensors.index.json like the published 15-shard files.
The default tower is tiny (56x56 images, 14-pixel patches: a 4x4 grid, 2x2 = 4 image vectors, so the placeholder
expands to 6 embeddings); `preset="glm-4v-9b"` writes the real dimensions (1120, 1602 embeddings) in bf16.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from glm_serve.tiny import TinySpec, fresh_checkpoint_dir, write_tiny
from glm_serve.vision_config import VisionConfig

BOI, EOI = "<|begin_of_image|>", "<|end_of_image|>"


@dataclass
class TinyVisionSpec:
    seed: int = 0
    image_size: int = 56
    patch_size: int = 14
    hidden: int = 64
    layers: int = 2
    heads: int = 4
    intermediate: int = 128
    scaling_factor: float = 8.0
    vision_shards: int = 1
    preset: str | None = None  # "glm-4v-9b": the real tower and LM dimensions, bf16
    lm: TinySpec | None = field(default=None)  # the language model; default: tiny chatglm layout, 8K context

    def __post_init__(self):
        if self.preset == "glm-4v-9b":
            self.image_size, self.patch_size, self.hidden, self.layers = 1120, 14, 1792, 63
            self.heads, self.intermediate, self.vision_shards = 16, 15360, 2
        elif self.preset is not None:
            raise ValueError(f"unknown vision preset {self.preset!r} (known: glm-4v-9b)")
        if self.lm is None:
            # glm-4v-9b: remote-code layout, seq_length 8192, RoPE base 10000 (its config has no rope_ratio).
            self.lm = TinySpec(layout="chatglm", seed=self.seed, rope_ratio=1.0, max_position=8192,
                               preset="glm-4-9b" if self.preset else None, shards=4 if self.preset else 1)
        if self.lm.layout != "chatglm" or self.lm.arch != "glm":
            raise ValueError("GLM-4V checkpoints exist only in the chatglm (remote-code) layout with arch glm")
        if self.vision_shards < 1:
            raise ValueError("vision_shards must be >= 1")
        self.vision_config().validate()

    def vision_config(self) -> VisionConfig:
        grid = self.image_size // self.patch_size
        return VisionConfig(hidden_size=self.hidden, num_layers=self.layers, num_heads=self.heads,
                            intermediate_size=self.intermediate, patch_size=self.patch_size,
                            image_size=self.image_size, num_positions=grid * grid + 1,
                            scaling_factor=self.scaling_factor)


def make_tiny_vision(out_dir: str | Path, seed: int = 0, spec: TinyVisionSpec | None = None,
                     device: str = "cpu") -> Path:
    """Write a complete GLM-4V checkpoint (config, generation config, tokenizer, LM + vision weights)."""
    spec = spec or TinyVisionSpec(seed=seed)
    with fresh_checkpoint_dir(out_dir) as tmp:  # all or nothing, as make_tiny
        _write_vision(tmp, spec, device)
    return Path(out_dir)


def _write_vision(out: Path, spec: TinyVisionSpec, device: str) -> None:
    write_tiny(out, spec.lm, device)
    vcfg = spec.vision_config()
    config = json.loads((out / "config.json").read_text())
    specials = _special_ids(out)
    config.pop("rope_ratio", None)
    config.update({
        "_name_or_path": "glm-serve/tiny-glm-4v" if spec.preset is None else "glm-serve/glm-4v-9b-shaped",
        "boi_token_id": specials[BOI],
        "eoi_token_id": specials[EOI],
        "vision_config": vcfg.to_dict(),
    })
    config["auto_map"]["AutoModelForSeq2SeqLM"] = "modeling_chatglm.ChatGLMForConditionalGeneration"
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    tensors = vision_tensors(vcfg, config["hidden_size"], config["ffn_hidden_size"], spec.seed,
                             getattr(torch, spec.lm.dtype), device)
    _add_shards(out, tensors, spec.vision_shards)


def vision_tensors(vcfg: VisionConfig, lm_hidden: int, lm_ffn: int, seed: int, dtype: torch.dtype,
                   device: str = "cpu") -> list[tuple[str, torch.Tensor]]:
    """Random `transformer.vision.*` tensors under their checkpoint names, drawn in our parameter order."""
    from glm_serve.model.vision import VisionTower, vision_checkpoint_names  # noqa: PLC0415 (torch model)

    with torch.device("meta"):
        shapes = [(n, tuple(p.shape)) for n, p in VisionTower(vcfg, lm_hidden, lm_ffn).named_parameters()]
    gen = torch.Generator(device=device).manual_seed(seed + 1_000_003)  # apart from the LM's stream
    out = []
    for name, shape in shapes:
        t = _random(name, shape, vcfg, gen, device).to(dtype)
        for ck_name, rows in vision_checkpoint_names(name, lm_ffn):
            part = t if rows is None else t[rows[0]:rows[1]]
            out.append((ck_name, part.contiguous().cpu()))
    return out


def _random(name: str, shape, vcfg: VisionConfig, gen: torch.Generator, device: str) -> torch.Tensor:
    def randn(scale: float) -> torch.Tensor:
        return scale * torch.randn(shape, generator=gen, device=device)

    if name.endswith("norm.weight"):
        return 1.0 + randn(0.1)
    if name.endswith("bias"):
        return randn(0.1)
    if name in ("boi", "eoi", "adapter.down_proj.weight"):
        # The tower's output is divided by scaling_factor; pre-scale so image embeddings come out about as
        # large as token embeddings and visibly steer the tiny LM (different images -> different answers).
        fan_in = 1 if name in ("boi", "eoi") else shape[1]
        return randn(vcfg.scaling_factor / math.sqrt(fan_in))
    if name in ("patch_embed.cls_embedding", "patch_embed.pos_embed"):
        return randn(0.5)
    fan_in = math.prod(shape[1:])  # linears [out, in]; convs [out, in, k, k]
    return randn(1.0 / math.sqrt(fan_in))


def _special_ids(out: Path) -> dict[str, int]:
    decoder = json.loads((out / "tokenizer_config.json").read_text())["added_tokens_decoder"]
    return {v["content"]: int(k) for k, v in decoder.items()}


def _add_shards(out: Path, tensors: list[tuple[str, torch.Tensor]], vision_shards: int) -> None:
    """Renumber the LM's shard files to leave room, write the vision shards after them, rewrite the index."""
    index_path = out / "model.safetensors.index.json"
    if index_path.is_file():
        index = json.loads(index_path.read_text())
        weight_map: dict[str, str] = index["weight_map"]
        total_size = int(index["metadata"]["total_size"])
    else:  # one file, no index yet
        with safe_open(str(out / "model.safetensors"), framework="pt") as f:
            weight_map = {n: "model.safetensors" for n in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
            total_size = sum(f.get_tensor(n).nbytes for n in weight_map)
    lm_files = sorted(set(weight_map.values()))
    total = len(lm_files) + vision_shards
    renamed = {}
    for k, old in enumerate(lm_files):
        renamed[old] = f"model-{k + 1:05d}-of-{total:05d}.safetensors"
        (out / old).rename(out / renamed[old])
    weight_map = {n: renamed[f] for n, f in weight_map.items()}
    size = sum(t.nbytes for _, t in tensors)
    groups: list[dict[str, torch.Tensor]] = [{} for _ in range(vision_shards)]
    acc = 0
    for name, t in tensors:
        groups[min(int(acc // (size / vision_shards)), vision_shards - 1)][name] = t
        acc += t.nbytes
    for j, group in enumerate(groups):
        fname = f"model-{len(lm_files) + j + 1:05d}-of-{total:05d}.safetensors"
        save_file(group, str(out / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in group})
    index = {"metadata": {"total_size": total_size + size}, "weight_map": dict(sorted(weight_map.items()))}
    index_path.write_text(json.dumps(index, indent=2) + "\n")
