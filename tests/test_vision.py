"""GLM-4V: the vision tower against a naive reference written from the architecture description, the weight
table, VisionConfig, the prompt/position expansion, and the tiny GLM-4V checkpoint (images: test_image.py)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors import safe_open

from glm_serve.config import CheckpointError, ModelConfig, load_config
from glm_serve.model.vision import VisionTower, VisionWeightLoader, is_vision_name, load_vision_weights
from glm_serve.tiny_vision import make_tiny_vision
from glm_serve.vision_config import VisionConfig, expand_image_tokens, span_in_chunk
from glm_serve.weights import map_name

# glm-4v-9b's published vision_config.
REAL_VISION = {"dropout_prob": 0.0, "hidden_act": "gelu", "in_channels": 3, "num_hidden_layers": 63,
               "hidden_size": 1792, "patch_size": 14, "num_heads": 16, "intermediate_size": 15360,
               "layer_norm_eps": 1e-06, "num_positions": 6401, "image_size": 1120, "scaling_factor": 8}


def _vcfg(image=56, patch=14, hidden=64, layers=2, heads=4, inter=96) -> VisionConfig:
    g = image // patch
    return VisionConfig.from_dict({"hidden_size": hidden, "num_hidden_layers": layers, "num_heads": heads,
                                   "intermediate_size": inter, "patch_size": patch, "image_size": image,
                                   "num_positions": g * g + 1, "layer_norm_eps": 1e-6, "scaling_factor": 8})


# ---------------------------------------------------------------- naive reference, from glm4.md's description

def _checkpoint_shapes(vc: VisionConfig, lm_hidden: int, lm_ffn: int) -> dict[str, tuple[int, ...]]:
    """The transformer.vision.* tensors of a GLM-4V checkpoint (names as the vendor's visual.py has them)."""
    H, P = vc.hidden_size, vc.patch_size
    s = {"patch_embedding.proj.weight": (H, 3, P, P), "patch_embedding.proj.bias": (H,),
         "patch_embedding.cls_embedding": (1, H), "patch_embedding.position_embedding.weight": (vc.num_positions, H),
         "conv.weight": (lm_hidden, H, 2, 2), "conv.bias": (lm_hidden,),
         "linear_proj.linear_proj.weight": (lm_hidden, lm_hidden),
         "linear_proj.norm1.weight": (lm_hidden,), "linear_proj.norm1.bias": (lm_hidden,),
         "linear_proj.gate_proj.weight": (lm_ffn, lm_hidden), "linear_proj.dense_h_to_4h.weight": (lm_ffn, lm_hidden),
         "linear_proj.dense_4h_to_h.weight": (lm_hidden, lm_ffn),
         "boi": (1, 1, lm_hidden), "eoi": (1, 1, lm_hidden)}
    for i in range(vc.num_layers):
        p = f"transformer.layers.{i}."
        s |= {p + "attention.query_key_value.weight": (3 * H, H), p + "attention.query_key_value.bias": (3 * H,),
              p + "attention.dense.weight": (H, H), p + "attention.dense.bias": (H,),
              p + "input_layernorm.weight": (H,), p + "input_layernorm.bias": (H,),
              p + "mlp.fc1.weight": (vc.intermediate_size, H), p + "mlp.fc1.bias": (vc.intermediate_size,),
              p + "mlp.fc2.weight": (H, vc.intermediate_size), p + "mlp.fc2.bias": (H,),
              p + "post_attention_layernorm.weight": (H,), p + "post_attention_layernorm.bias": (H,)}
    return {"transformer.vision." + k: v for k, v in s.items()}


def _random_checkpoint(vc, lm_hidden, lm_ffn, seed) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in _checkpoint_shapes(vc, lm_hidden, lm_ffn).items():
        if "norm" in name and name.endswith("weight"):
            t = 1 + 0.2 * torch.randn(shape, generator=g)
        elif name.endswith("bias") or "embedding" in name or name.endswith(("boi", "eoi")):
            t = 0.3 * torch.randn(shape, generator=g)
        else:
            t = torch.randn(shape, generator=g) / math.sqrt(math.prod(shape[1:]))
        if name.endswith(("dense_4h_to_h.weight", "boi", "eoi")):
            t = t * vc.scaling_factor  # outputs of order 1 after the division, so 1e-4 is a tight bound
        out[name] = t
    return out


def _ln(x, w, b, eps):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * w + b


def _gelu(x):
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def _reference(sd: dict, vc: VisionConfig, pixels: torch.Tensor) -> torch.Tensor:
    """One image [3, S, S] -> [n + 2, lm_hidden], in float64 with explicit loops and einsums."""
    w = {k[len("transformer.vision."):]: v.double() for k, v in sd.items()}
    x = pixels.double()
    P, G, nh, D = vc.patch_size, vc.grid, vc.num_heads, vc.head_dim
    tokens = [w["patch_embedding.cls_embedding"][0]]
    for r in range(G):  # patches in row-major order
        for c in range(G):
            patch = x[:, r * P:(r + 1) * P, c * P:(c + 1) * P]
            tokens.append(torch.einsum("ocij,cij->o", w["patch_embedding.proj.weight"], patch)
                          + w["patch_embedding.proj.bias"])
    h = torch.stack(tokens) + w["patch_embedding.position_embedding.weight"]  # [L, H]
    L = h.shape[0]
    for i in range(vc.num_layers):
        p = f"transformer.layers.{i}."
        qkv = h @ w[p + "attention.query_key_value.weight"].T + w[p + "attention.query_key_value.bias"]
        q, k, v = (qkv[:, j * vc.hidden_size:(j + 1) * vc.hidden_size].reshape(L, nh, D) for j in range(3))
        scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(D)
        probs = torch.exp(scores - scores.max(-1, keepdim=True).values)
        probs = probs / probs.sum(-1, keepdim=True)
        attn = torch.einsum("hqk,khd->qhd", probs, v).reshape(L, -1)
        attn = attn @ w[p + "attention.dense.weight"].T + w[p + "attention.dense.bias"]
        h = h + _ln(attn, w[p + "input_layernorm.weight"], w[p + "input_layernorm.bias"], vc.layer_norm_eps)
        m = _gelu(h @ w[p + "mlp.fc1.weight"].T + w[p + "mlp.fc1.bias"]) @ w[p + "mlp.fc2.weight"].T
        m = m + w[p + "mlp.fc2.bias"]
        h = h + _ln(m, w[p + "post_attention_layernorm.weight"], w[p + "post_attention_layernorm.bias"],
                    vc.layer_norm_eps)
    grid = h[1:].reshape(G, G, vc.hidden_size)
    vecs = []
    for r in range(G // 2):  # 2x2 stride-2 conv, one output vector per block, row-major
        for c in range(G // 2):
            block = grid[2 * r:2 * r + 2, 2 * c:2 * c + 2]  # [2, 2, H]
            vecs.append(torch.einsum("ocij,ijc->o", w["conv.weight"], block) + w["conv.bias"])
    y = torch.stack(vecs) @ w["linear_proj.linear_proj.weight"].T
    y = _gelu(_ln(y, w["linear_proj.norm1.weight"], w["linear_proj.norm1.bias"], 1e-5))
    gate, up = y @ w["linear_proj.gate_proj.weight"].T, y @ w["linear_proj.dense_h_to_4h.weight"].T
    y = (gate * torch.sigmoid(gate) * up) @ w["linear_proj.dense_4h_to_h.weight"].T
    return torch.cat([w["boi"][0], y, w["eoi"][0]]) / vc.scaling_factor


@pytest.mark.parametrize("shape", [dict(), dict(image=84, hidden=48, layers=3, heads=2, inter=80)])
def test_tower_matches_naive_reference(shape):
    vc = _vcfg(**shape)
    lm_hidden, lm_ffn = 40, 72
    sd = _random_checkpoint(vc, lm_hidden, lm_ffn, seed=3)
    tower = load_vision_weights(VisionTower(vc, lm_hidden, lm_ffn), list(sd.items()))
    pixels = torch.randn(2, 3, vc.image_size, vc.image_size)
    with torch.inference_mode():
        got = tower(pixels)
    assert got.shape == (2, vc.num_image_vectors + 2, lm_hidden) and got.dtype == torch.float32
    for b in range(2):
        want = _reference(sd, vc, pixels[b])
        assert (got[b].double() - want).abs().max().item() < 1e-4
    assert (got[0] - got[1]).abs().max() > 1e-2  # the two images really differ


@pytest.mark.gpu
def test_tower_real_widths_bf16_on_cuda():
    """The 9B tower's widths (1120 px, 6401 tokens, head_dim 112; 4 of its 63 layers) in bf16 on the GPU stay
    close to float32, and one image gives 1602 embeddings."""
    vc = VisionConfig.from_dict(REAL_VISION | {"num_hidden_layers": 4})
    sd = _random_checkpoint(vc, 4096, 13696, seed=1)
    t32 = load_vision_weights(VisionTower(vc, 4096, 13696), sd.items(), "cuda", torch.float32)
    t16 = load_vision_weights(VisionTower(vc, 4096, 13696), sd.items(), "cuda", torch.bfloat16)
    pixels = torch.randn(1, 3, 1120, 1120, device="cuda")
    with torch.inference_mode():
        y32, y16 = t32(pixels), t16(pixels).float()
    assert y16.shape == (1, 1602, 4096)
    assert ((y16 - y32).norm() / y32.norm()).item() < 0.03


def test_tower_rejects_wrong_pixel_shape():
    tower = VisionTower(_vcfg(), 32, 48)
    with pytest.raises(ValueError, match="pixels must be"):
        tower(torch.zeros(1, 3, 42, 42))


def test_real_dimensions_give_13_9b_parameters():
    vc = VisionConfig.from_dict(REAL_VISION)
    assert (vc.grid, vc.num_image_vectors, vc.num_embeddings, vc.head_dim) == (80, 1600, 1602, 112)
    from glm_serve.model.glm import GlmForCausalLM

    lm_cfg = ModelConfig(model_type="chatglm", layout="chatglm", sandwich_norms=False, hidden_size=4096,
                         num_layers=40, num_heads=32, num_kv_heads=2, head_dim=128, intermediate_size=13696,
                         vocab_size=151552, rms_norm_eps=1.5625e-07, rope_theta=10000.0, rotary_dim=64,
                         max_position=8192, qkv_bias=True)
    with torch.device("meta"):
        n_vis = sum(p.numel() for p in VisionTower(vc, 4096, 13696).parameters())
        n_lm = sum(p.numel() for p in GlmForCausalLM(lm_cfg).parameters())
    assert round(n_lm / 1e9, 2) == 9.40 and round((n_lm + n_vis) / 1e9, 1) == 13.9


# ---------------------------------------------------------------- weight loading errors

def _bad_load(mutate) -> str:
    vc = _vcfg()
    sd = _random_checkpoint(vc, 32, 48, seed=0)
    mutate(sd)
    with pytest.raises(CheckpointError) as e:
        load_vision_weights(VisionTower(vc, 32, 48), list(sd.items()))
    return str(e.value)


def test_load_errors_name_the_tensor():
    name = "transformer.vision.transformer.layers.1.mlp.fc1.bias"
    assert name in _bad_load(lambda sd: sd.pop(name))
    assert "transformer.vision.linear_proj.gate_proj.weight" in _bad_load(
        lambda sd: sd.pop("transformer.vision.linear_proj.gate_proj.weight"))
    msg = _bad_load(lambda sd: sd.__setitem__("transformer.vision.conv.weight", torch.zeros(32, 64, 3, 3)))
    assert "transformer.vision.conv.weight" in msg and "shape" in msg
    extra = "transformer.vision.transformer.layers.2.mlp.fc1.bias"  # one layer too many
    assert extra in _bad_load(lambda sd: sd.__setitem__(extra, torch.zeros(96)))
    odd = "transformer.vision.adapter_scale"
    assert odd in _bad_load(lambda sd: sd.__setitem__(odd, torch.zeros(1)))


# ---------------------------------------------------------------- VisionConfig

@pytest.mark.parametrize("change,field", [
    ({"num_positions": 6400}, "num_positions"),
    ({"hidden_act": "quick_gelu"}, "hidden_act"),
    ({"image_size": 1126}, "image_size"),  # not a multiple of 14
    ({"image_size": 1106, "num_positions": 6242}, "image_size"),  # 79x79 grid: odd
    ({"num_heads": 15}, "num_heads"),
    ({"hidden_size": "1792"}, "hidden_size"),
    ({"scaling_factor": 0}, "scaling_factor"),
])
def test_vision_config_errors_name_the_field(change, field):
    with pytest.raises(CheckpointError, match=f"vision_config.{field}"):
        VisionConfig.from_dict(REAL_VISION | change)


def test_vision_config_missing_key_and_round_trip():
    with pytest.raises(CheckpointError, match="patch_size"):
        VisionConfig.from_dict({k: v for k, v in REAL_VISION.items() if k != "patch_size"})
    assert VisionConfig.from_dict(REAL_VISION).to_dict() == {k: float(v) if k == "scaling_factor" else v
                                                            for k, v in REAL_VISION.items()}


# ---------------------------------------------------------------- prompt and positions

BOI, IMG, EOI = 900, 0, 901


def test_expand_gives_the_un_expanded_positions():
    ids = [7, 8, 9, BOI, IMG, EOI, 10, 11]
    exp = expand_image_tokens(ids, BOI, EOI, 4, image_id=IMG)
    assert exp.ids == [7, 8, 9, BOI, IMG, IMG, IMG, IMG, EOI, 10, 11]
    assert exp.positions == [0, 1, 2, 3, 4, 4, 4, 4, 5, 6, 7]
    assert exp.image_span == (3, 9) and exp.position_shift == 3
    assert all(p == i - exp.position_shift for i, p in enumerate(exp.positions) if i >= exp.image_span[1])
    # The real size: 1600 vectors -> 1602 slots, all patches at p + 1, text continues at p + 3.
    exp = expand_image_tokens([1, 2, BOI, IMG, EOI, 3], BOI, EOI, 1600)
    assert len(exp.ids) == 6 + 1599 and exp.image_span == (2, 1604)
    assert exp.positions[:3] == [0, 1, 2] and set(exp.positions[3:1603]) == {3} and exp.positions[1603:] == [4, 5]


def test_expand_without_image_and_bad_placeholders():
    exp = expand_image_tokens([1, 2, 3], BOI, EOI, 4)
    assert exp == ([1, 2, 3], [0, 1, 2], None) and exp.position_shift == 0
    for bad in ([BOI, IMG, EOI, BOI, IMG, EOI], [BOI, IMG, 5, EOI], [1, EOI], [BOI, IMG], [EOI, IMG, BOI]):
        with pytest.raises(ValueError):
            expand_image_tokens(bad, BOI, EOI, 4)
    with pytest.raises(ValueError, match="expected 0"):
        expand_image_tokens([BOI, 5, EOI], BOI, EOI, 4, image_id=IMG)


def test_chunks_may_split_the_image_span():
    exp = expand_image_tokens(list(range(1, 6)) + [BOI, IMG, EOI] + [6, 7], BOI, EOI, 9)
    rows = torch.arange(11)  # the tower's 11 output rows
    for chunk in (1, 3, 4, 7, 100):
        filled = torch.full((len(exp.ids),), -1)
        for a in range(0, len(exp.ids), chunk):
            b = min(a + chunk, len(exp.ids))
            part = filled[a:b]
            hit = span_in_chunk(exp.image_span, a, b)
            if hit:
                part[hit[1]] = rows[hit[0]]
        assert filled[5:16].tolist() == list(range(11)) and (filled[:5] == -1).all() and (filled[16:] == -1).all()


# ---------------------------------------------------------------- the tiny GLM-4V checkpoint

def test_tiny_checkpoint_maps_completely(tmp_path):
    out = make_tiny_vision(tmp_path / "tiny4v", seed=0)
    cfg = load_config(out)
    vc = VisionConfig.from_dict(cfg.vision)
    config = json.loads((out / "config.json").read_text())
    specials = {v["content"]: int(k)
                for k, v in json.loads((out / "tokenizer_config.json").read_text())["added_tokens_decoder"].items()}
    assert (config["boi_token_id"], config["eoi_token_id"]) == (specials["<|begin_of_image|>"],
                                                                specials["<|end_of_image|>"])
    assert config["model_type"] == "chatglm" and "rope_ratio" not in config and cfg.rope_theta == 10000.0
    assert (vc.image_size, vc.patch_size, vc.num_embeddings) == (56, 14, 6)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert files == sorted(p.name for p in out.glob("*.safetensors"))
    loader = VisionWeightLoader(VisionTower(vc, cfg.hidden_size, cfg.intermediate_size))
    lm_names = set()
    for f in files:
        with safe_open(str(out / f), "pt") as h:
            for name in h.keys():  # noqa: SIM118
                assert index["weight_map"][name] == f
                if is_vision_name(name):
                    loader.place(name, h.get_tensor(name))
                elif (target := map_name(cfg, name)) is not None:  # an LM tensor (KeyError if unknown)
                    lm_names.add(target.param)
    tower = loader.finish()  # raises on anything missing
    from glm_serve.model.glm import GlmForCausalLM

    with torch.device("meta"):
        assert lm_names == {n for n, _ in GlmForCausalLM(cfg).named_parameters()}
    with torch.inference_mode():
        y = tower(torch.randn(2, 3, 56, 56))
    assert y.shape == (2, 6, cfg.hidden_size) and torch.isfinite(y).all()
