"""GLM-4V-9B's vision tower (EVA2-CLIP ViT, 2x2 conv downsample, GLU adapter, boi/eoi, scaling) and the table
that maps its `transformer.vision.*` checkpoint tensors onto our parameters.

    pixels [B, 3, S, S]
      -> patch conv (k = s = patch) + CLS + learned positions      [B, 1 + G*G, Hv]      G = S / patch
      -> L x { x = x + LN(attn(x)); x = x + LN(mlp(x)) }            (norm on each sublayer's OUTPUT)
      -> drop CLS, G x G grid -> conv 2x2 stride 2                  [B, (G/2)^2, Hlm]
      -> GLU adapter: linear_proj, LayerNorm, GELU, silu(gate) * up, down
      -> [boi, vectors, eoi] / scaling_factor                       [B, (G/2)^2 + 2, Hlm]

Attention is full and bidirectional; every ViT linear has a bias, the adapter's linears have none.
"""

from __future__ import annotations

import re
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from glm_serve.config import CheckpointError
from glm_serve.vision_config import VisionConfig
from glm_serve.weights import Target

VISION_PREFIX = "transformer.vision."

# The vendor builds the adapter's norm as nn.LayerNorm(hidden) without an eps: torch's default.
ADAPTER_LN_EPS = 1e-5


class PatchEmbed(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.proj = nn.Conv2d(cfg.in_channels, cfg.hidden_size, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.cls_embedding = nn.Parameter(torch.zeros(1, cfg.hidden_size))  # [1, Hv]
        self.pos_embed = nn.Parameter(torch.zeros(cfg.num_positions, cfg.hidden_size))  # [1 + G*G, Hv]

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:  # [B, 3, S, S] -> [B, 1 + G*G, Hv]
        x = self.proj(pixels).flatten(2).transpose(1, 2)  # [B, G*G, Hv], row-major over the grid
        cls = self.cls_embedding.expand(x.shape[0], 1, -1)
        return torch.cat((cls, x), dim=1) + self.pos_embed


class ViTAttention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        # Fused rows [q | k | v], each head-major: the checkpoint's query_key_value layout.
        self.qkv_proj = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size)
        self.o_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, L, Hv]
        B, L, _ = x.shape
        qkv = self.qkv_proj(x).view(B, L, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each [B, heads, L, D]
        out = F.scaled_dot_product_attention(q, k, v)  # scale 1/sqrt(D), no mask
        return self.o_proj(out.transpose(1, 2).reshape(B, L, -1))


class ViTMLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))  # exact (erf) GELU


class ViTLayer(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.attn = ViTAttention(cfg)
        self.attn_out_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = ViTMLP(cfg)
        self.mlp_out_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn_out_norm(self.attn(x))
        return x + self.mlp_out_norm(self.mlp(x))


class GLUAdapter(nn.Module):
    """Projects the downsampled image vectors into the LM's embedding space (the vendor's `GLU`)."""

    def __init__(self, lm_hidden: int, lm_ffn: int):
        super().__init__()
        self.ffn = lm_ffn
        self.linear_proj = nn.Linear(lm_hidden, lm_hidden, bias=False)
        self.norm = nn.LayerNorm(lm_hidden, eps=ADAPTER_LN_EPS)
        self.gate_up_proj = nn.Linear(lm_hidden, 2 * lm_ffn, bias=False)  # rows [gate | up]: one matmul
        self.down_proj = nn.Linear(lm_ffn, lm_hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, N, Hlm]
        x = F.gelu(self.norm(self.linear_proj(x)))
        gate, up = self.gate_up_proj(x).split(self.ffn, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class VisionTower(nn.Module):
    def __init__(self, vision_cfg: VisionConfig, lm_hidden: int, lm_ffn: int):
        super().__init__()
        self.config = vision_cfg
        self.patch_embed = PatchEmbed(vision_cfg)
        self.layers = nn.ModuleList(ViTLayer(vision_cfg) for _ in range(vision_cfg.num_layers))
        self.downsample = nn.Conv2d(vision_cfg.hidden_size, lm_hidden, kernel_size=2, stride=2)
        self.adapter = GLUAdapter(lm_hidden, lm_ffn)
        self.boi = nn.Parameter(torch.zeros(1, 1, lm_hidden))  # [1, 1, Hlm]
        self.eoi = nn.Parameter(torch.zeros(1, 1, lm_hidden))  # [1, 1, Hlm]

    @property
    def num_embeddings(self) -> int:
        return self.config.num_embeddings

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:  # [B, 3, S, S] -> [B, (G/2)^2 + 2, Hlm]
        """pixels: normalized (image.preprocess), or uint8 RGB (image.resize_rgb)."""
        c = self.config
        if pixels.dim() != 4 or tuple(pixels.shape[1:]) != (c.in_channels, c.image_size, c.image_size):
            raise ValueError(f"pixels must be [batch, {c.in_channels}, {c.image_size}, {c.image_size}], "
                             f"got {list(pixels.shape)}")
        if pixels.dtype == torch.uint8:  # RGB as the engine holds it: normalized here, on the tower's device
            from glm_serve.image import normalize  # noqa: PLC0415 (PIL)

            pixels = normalize(pixels.to(self.boi.device))
        x = self.patch_embed(pixels.to(device=self.boi.device, dtype=self.boi.dtype))
        for layer in self.layers:
            x = layer(x)
        B, G = x.shape[0], c.grid
        grid = x[:, 1:].transpose(1, 2).reshape(B, c.hidden_size, G, G)  # [B, Hv, G, G]
        x = self.downsample(grid).flatten(2).transpose(1, 2)  # [B, (G/2)^2, Hlm]
        x = self.adapter(x)
        x = torch.cat((self.boi.expand(B, 1, -1), x, self.eoi.expand(B, 1, -1)), dim=1)
        return x / c.scaling_factor


# Checkpoint name (after VISION_PREFIX) -> our parameter. `{i}` is the layer index, `{p}` weight|bias.
# The adapter's gate_proj / dense_h_to_4h fill the two halves of our gate_up_proj ("gate" / "up" rows).
VISION_TABLE: list[tuple[str, str, str | None]] = [
    ("patch_embedding.proj.{p}", "patch_embed.proj.{p}", None),
    ("patch_embedding.cls_embedding", "patch_embed.cls_embedding", None),
    ("patch_embedding.position_embedding.weight", "patch_embed.pos_embed", None),
    ("transformer.layers.{i}.attention.query_key_value.{p}", "layers.{i}.attn.qkv_proj.{p}", None),
    ("transformer.layers.{i}.attention.dense.{p}", "layers.{i}.attn.o_proj.{p}", None),
    ("transformer.layers.{i}.input_layernorm.{p}", "layers.{i}.attn_out_norm.{p}", None),
    ("transformer.layers.{i}.mlp.fc1.{p}", "layers.{i}.mlp.fc1.{p}", None),
    ("transformer.layers.{i}.mlp.fc2.{p}", "layers.{i}.mlp.fc2.{p}", None),
    ("transformer.layers.{i}.post_attention_layernorm.{p}", "layers.{i}.mlp_out_norm.{p}", None),
    ("conv.{p}", "downsample.{p}", None),
    ("linear_proj.linear_proj.weight", "adapter.linear_proj.weight", None),
    ("linear_proj.norm1.{p}", "adapter.norm.{p}", None),
    ("linear_proj.gate_proj.weight", "adapter.gate_up_proj.weight", "gate"),
    ("linear_proj.dense_h_to_4h.weight", "adapter.gate_up_proj.weight", "up"),
    ("linear_proj.dense_4h_to_h.weight", "adapter.down_proj.weight", None),
    ("boi", "boi", None),
    ("eoi", "eoi", None),
]


def _pattern(template: str) -> re.Pattern:
    rx = re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{p\}", r"(?P<p>weight|bias)")
    return re.compile(rx)


_CK = [(_pattern(ck), ours, half) for ck, ours, half in VISION_TABLE]  # checkpoint name -> ours
_OURS = [(_pattern(ours), ck, half) for ck, ours, half in VISION_TABLE]  # ours -> checkpoint names


def _rows(half: str | None, lm_ffn: int) -> tuple[int, int] | None:
    return None if half is None else ((0, lm_ffn) if half == "gate" else (lm_ffn, 2 * lm_ffn))


def is_vision_name(name: str) -> bool:
    return name.startswith(VISION_PREFIX)


def map_vision_name(name: str, lm_ffn: int) -> Target:
    """`transformer.vision.*` checkpoint name -> our VisionTower parameter (and rows). KeyError if unknown."""
    if is_vision_name(name):
        for rx, ours, half in _CK:
            m = rx.fullmatch(name[len(VISION_PREFIX):])
            if m:
                return Target(ours.format(**m.groupdict()), _rows(half, lm_ffn))
    raise KeyError(name)


def vision_checkpoint_names(our_name: str, lm_ffn: int) -> list[tuple[str, tuple[int, int] | None]]:
    """Inverse of map_vision_name, for writing checkpoints: our parameter -> [(checkpoint name, rows)]."""
    out = []
    for rx, ck, half in _OURS:
        m = rx.fullmatch(our_name)
        if m:
            out.append((VISION_PREFIX + ck.format(**m.groupdict()), _rows(half, lm_ffn)))
    if not out:
        raise KeyError(f"{our_name} has no checkpoint name")
    return out


class VisionWeightLoader:
    """Streams `transformer.vision.*` tensors into a VisionTower (built on the meta device or not).

    The constructor gives every parameter fresh uninitialised storage on `device`/`dtype`; `place` copies one
    checkpoint tensor in; `finish` raises if anything was never filled. Errors name the checkpoint tensor."""

    def __init__(self, tower: VisionTower, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        self.tower = tower
        self.lm_ffn = tower.adapter.ffn
        self.params: dict[str, torch.Tensor] = {}
        for mod_name, mod in tower.named_modules():
            for pname, p in list(mod.named_parameters(recurse=False)):
                t = nn.Parameter(torch.empty(p.shape, device=device, dtype=dtype), requires_grad=False)
                setattr(mod, pname, t)
                self.params[f"{mod_name}.{pname}" if mod_name else pname] = t
        self.filled: dict[str, int] = {}  # our name -> rows filled

    def place(self, name: str, tensor: torch.Tensor) -> None:
        try:
            target = map_vision_name(name, self.lm_ffn)
        except KeyError:
            raise CheckpointError(f"unexpected vision tensor {name}") from None
        param = self.params.get(target.param)
        if param is None:  # e.g. a layer index beyond num_hidden_layers
            raise CheckpointError(f"unexpected vision tensor {name} (no {target.param} in this vision_config)")
        lo, hi = target.rows or (0, param.shape[0])
        want = (hi - lo, *param.shape[1:])
        if tuple(tensor.shape) != want:
            raise CheckpointError(f"vision tensor {name} has shape {list(tensor.shape)}, expected {list(want)}")
        if not tensor.dtype.is_floating_point:  # copy_ would cast it silently, as the LM loader refuses too
            raise CheckpointError(f"vision tensor {name} is stored as {str(tensor.dtype).removeprefix('torch.')}; "
                                  "glm-serve loads float weights")
        param[lo:hi].copy_(tensor)
        self.filled[target.param] = self.filled.get(target.param, 0) + (hi - lo)

    def finish(self) -> VisionTower:
        missing = [n for n, p in self.params.items() if self.filled.get(n, 0) != p.shape[0]]
        if missing:
            names = [ck for n in missing for ck, _ in vision_checkpoint_names(n, self.lm_ffn)]
            raise CheckpointError(f"missing vision tensor(s) {', '.join(names[:8])}"
                                  + (f" and {len(names) - 8} more" if len(names) > 8 else ""))
        self.tower.eval()
        return self.tower


def load_vision_weights(tower: VisionTower, tensors: Iterable[tuple[str, torch.Tensor]],
                        device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> VisionTower:
    """Fill `tower` from (checkpoint name, tensor) pairs, all of them `transformer.vision.*`."""
    loader = VisionWeightLoader(tower, device, dtype)
    for name, tensor in tensors:
        loader.place(name, tensor)
    return loader.finish()
