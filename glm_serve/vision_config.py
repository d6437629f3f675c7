"""GLM-4V facts without torch: the validated `vision_config` (VisionConfig) and the prompt/position rule that
expands the 3-token image placeholder into the tower's embeddings (expand_image_tokens).

The engine and API import this to size prompts and build positions; only the model needs glm_serve.model.vision.

Prompt rule (the vendor's modeling_chatglm.py), with n = num_image_vectors (1600 for GLM-4V-9B):

    prompt ids  ... t  BOI  IMG  EOI  u ...          (IMG is <|endoftext|>)
    index       ... p-1 p   p+1  p+2  p+3
    expanded    ... t  BOI  IMG x n  EOI  u ...      n + 2 slots, all filled from the tower's output rows
    positions   ... p-1 p   p+1 (all n)  p+2  p+3    positions keep the UN-expanded index

so after the image, expanded index i has position i - (n - 1).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from glm_serve.config import CheckpointError

# OpenAI CLIP normalisation, which the EVA2-CLIP tower was trained with.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# The activations the published tower uses; "gelu" is the exact (erf) GELU.
_ACTS = ("gelu",)


@dataclass(frozen=True)
class VisionConfig:
    """GLM-4V `vision_config`, under the real key names (see `from_dict`). GLM-4V-9B values in comments."""

    hidden_size: int  # 1792
    num_layers: int  # 63 ("num_hidden_layers")
    num_heads: int  # 16
    intermediate_size: int  # 15360
    patch_size: int  # 14
    image_size: int  # 1120
    num_positions: int  # 6401 = (1120 / 14)^2 + 1 (CLS)
    in_channels: int = 3
    layer_norm_eps: float = 1e-6
    hidden_act: str = "gelu"
    scaling_factor: float = 8.0  # the tower's output is divided by this
    dropout_prob: float = 0.0  # training only

    @property
    def grid(self) -> int:  # patches per side before the 2x2 conv: 80
        return self.image_size // self.patch_size

    @property
    def num_image_vectors(self) -> int:  # after the 2x2 stride-2 conv: 40 * 40 = 1600
        return (self.grid // 2) ** 2

    @property
    def num_embeddings(self) -> int:  # what replaces the 3 placeholder tokens: boi + vectors + eoi = 1602
        return self.num_image_vectors + 2

    @property
    def head_dim(self) -> int:  # 112
        return self.hidden_size // self.num_heads

    @staticmethod
    def from_dict(d: dict) -> "VisionConfig":
        """Parse config.json's `vision_config`; every bad value raises CheckpointError naming the field."""
        if not isinstance(d, dict):
            raise CheckpointError(f"config.json: vision_config must be an object, got {type(d).__name__}")

        def integer(key: str, default: int | None = None) -> int:
            if key not in d:
                if default is None:
                    raise CheckpointError(f"config.json: vision_config is missing {key!r}")
                return default
            v = d[key]
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise CheckpointError(f"config.json: vision_config.{key} must be a positive integer, got {v!r}")
            return v

        def number(key: str, default: float) -> float:
            v = d.get(key, default)
            if not isinstance(v, (int, float)) or isinstance(v, bool):
                raise CheckpointError(f"config.json: vision_config.{key} must be a number, got {v!r}")
            return float(v)

        cfg = VisionConfig(
            hidden_size=integer("hidden_size"),
            num_layers=integer("num_hidden_layers"),
            num_heads=integer("num_heads"),
            intermediate_size=integer("intermediate_size"),
            patch_size=integer("patch_size"),
            image_size=integer("image_size"),
            num_positions=integer("num_positions"),
            in_channels=integer("in_channels", 3),
            layer_norm_eps=number("layer_norm_eps", 1e-6),
            hidden_act=d.get("hidden_act", "gelu"),
            scaling_factor=number("scaling_factor", 8.0),
            dropout_prob=number("dropout_prob", 0.0),
        )
        cfg.validate()
        return cfg

    def to_dict(self) -> dict:
        """The real `vision_config` keys, in the order glm-4v-9b's config.json lists them."""
        return {
            "dropout_prob": self.dropout_prob,
            "hidden_act": self.hidden_act,
            "in_channels": self.in_channels,
            "num_hidden_layers": self.num_layers,
            "hidden_size": self.hidden_size,
            "patch_size": self.patch_size,
            "num_heads": self.num_heads,
            "intermediate_size": self.intermediate_size,
            "layer_norm_eps": self.layer_norm_eps,
            "num_positions": self.num_positions,
            "image_size": self.image_size,
            "scaling_factor": self.scaling_factor,
        }

    def validate(self) -> None:
        def bad(field: str, why: str):
            return CheckpointError(f"config.json: vision_config.{field} {why}")

        if self.hidden_act not in _ACTS:
            raise bad("hidden_act", f"must be one of {', '.join(_ACTS)}, got {self.hidden_act!r}")
        if self.hidden_size % self.num_heads:
            raise bad("num_heads", f"({self.num_heads}) must divide hidden_size ({self.hidden_size})")
        if self.image_size % self.patch_size:
            raise bad("image_size", f"({self.image_size}) must be a multiple of patch_size ({self.patch_size})")
        if self.grid % 2:
            raise bad("image_size", f"gives an odd {self.grid}x{self.grid} patch grid; the 2x2 conv needs it even")
        if self.num_positions != self.grid**2 + 1:
            raise bad("num_positions", f"must be (image_size / patch_size)^2 + 1 = {self.grid ** 2 + 1} "
                                       f"(one per patch plus CLS), got {self.num_positions}")
        if not self.scaling_factor > 0:
            raise bad("scaling_factor", f"must be positive, got {self.scaling_factor}")
        if not self.layer_norm_eps > 0:
            raise bad("layer_norm_eps", f"must be positive, got {self.layer_norm_eps}")


class ExpandedPrompt(NamedTuple):
    ids: list[int]  # [len(prompt) + n - 1]: placeholder widened to boi, n copies of the image token, eoi
    positions: list[int]  # same length: the un-expanded index of each slot (see the module docstring)
    image_span: tuple[int, int] | None  # [start, end) of the n + 2 slots filled by the tower's rows; None: no image

    @property
    def position_shift(self) -> int:
        """Expanded index minus position for every slot after the image (decode tokens included)."""
        if self.image_span is None:
            return 0
        return (self.image_span[1] - self.image_span[0]) - 3


def expand_image_tokens(prompt_ids: list[int], boi_id: int, eoi_id: int, num_image_vectors: int,
                        image_id: int | None = None) -> ExpandedPrompt:
    """Widen `boi IMG eoi` to n + 2 slots and give every slot its un-expanded position.

    At most one image per prompt (GLM-4V was trained so); a boi/eoi that is not part of exactly one
    `boi IMG eoi` triple raises ValueError. When `image_id` is given, the middle token must be it."""
    if num_image_vectors < 1:
        raise ValueError(f"num_image_vectors must be >= 1, got {num_image_vectors}")
    ids = list(prompt_ids)
    bois = [i for i, t in enumerate(ids) if t == boi_id]
    eois = [i for i, t in enumerate(ids) if t == eoi_id]
    if not bois and not eois:
        return ExpandedPrompt(ids, list(range(len(ids))), None)
    if len(bois) > 1 or len(eois) > 1:
        raise ValueError(f"prompt has {len(bois)} begin-of-image and {len(eois)} end-of-image tokens; "
                         "GLM-4V takes exactly one image per conversation")
    if len(bois) != 1 or len(eois) != 1 or eois[0] != bois[0] + 2:
        raise ValueError("prompt's image placeholder must be <|begin_of_image|><|endoftext|><|end_of_image|>")
    p = bois[0]
    mid = ids[p + 1]
    if image_id is not None and mid != image_id:
        raise ValueError(f"prompt's image placeholder has token {mid} between begin/end of image, "
                         f"expected {image_id} (<|endoftext|>)")
    n = num_image_vectors
    expanded = ids[:p + 1] + [mid] * n + ids[p + 2:]
    positions = list(range(p + 1)) + [p + 1] * n + list(range(p + 2, len(ids)))
    return ExpandedPrompt(expanded, positions, (p, p + n + 2))


def span_in_chunk(image_span: tuple[int, int] | None, chunk_start: int,
                  chunk_end: int) -> tuple[slice, slice] | None:
    """For a prefill chunk covering expanded indices [chunk_start, chunk_end): (rows of the tower's output,
    rows of the chunk) to copy, or None when the chunk holds no image slot. Chunks may split the image."""
    if image_span is None:
        return None
    lo, hi = max(image_span[0], chunk_start), min(image_span[1], chunk_end)
    if lo >= hi:
        return None
    return slice(lo - image_span[0], hi - image_span[0]), slice(lo - chunk_start, hi - chunk_start)
