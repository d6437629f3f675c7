"""GLM-4V through the engine: logprobs and greedy tokens with an image against a naive end-to-end reference
(the float64 tower reference of test_vision.py + HF GlmForCausalLM fed inputs_embeds and the GLM-4V
position ids), chunked prefill splitting the image, and prefix caching keyed on the image content."""

from __future__ import annotations

import base64
import io
from dataclasses import replace

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from test_vision import _reference  # the naive tower, written from the architecture description
from transformers import GlmConfig
from transformers import GlmForCausalLM as HFGlm

from glm_serve.chat import encode_chat
from glm_serve.engine.multimodal import ImageNotSupportedError
from glm_serve.image import decode_image, preprocess
from glm_serve.llm import LLM
from glm_serve.sampling_params import SamplingParams
from glm_serve.tiny_vision import make_tiny_vision
from glm_serve.vision_config import VisionConfig, expand_image_tokens
from glm_serve.weights import checkpoint_names

GREEDY = dict(temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny_v(tmp_path_factory):
    return make_tiny_vision(tmp_path_factory.mktemp("tiny_v"), seed=3)


@pytest.fixture(scope="module")
def vlm(tiny_v):
    return LLM(str(tiny_v), kv_cache_tokens=4096, max_batch_tokens=512)


def _png(seed: int, size=(70, 50)) -> bytes:
    g = torch.Generator().manual_seed(seed)
    arr = (torch.rand(size[1], size[0], 3, generator=g) * 255).to(torch.uint8).numpy()
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _messages(text: str, png: bytes):
    url = "data:image/png;base64," + base64.b64encode(png).decode()
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": text}]}]


def _reference_model(llm):
    """HF's GLM with our loaded LM weights (the LM loader is tested against HF separately)."""
    cfg = llm.engine.model_config
    hf_cfg = GlmConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                       num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                       num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, rms_norm_eps=cfg.rms_norm_eps,
                       max_position_embeddings=cfg.max_position, attention_bias=True, pad_token_id=0,
                       rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta,
                                        "partial_rotary_factor": cfg.rotary_dim / cfg.head_dim})
    hf = HFGlm(hf_cfg).float().eval()
    hf_layout = replace(cfg, layout="hf")
    sd = {}
    for name, t in llm.engine.model.state_dict().items():
        if name.startswith("vision."):
            continue
        for ck, rows in checkpoint_names(hf_layout, name):
            sd[ck] = t if rows is None else t[rows[0]:rows[1]]
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    assert not unexpected and all("rotary" in m for m in missing)
    return hf


def _vision_state(path):
    sd = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            sd.update({k: h.get_tensor(k) for k in h.keys() if k.startswith("transformer.vision.")})
    return sd


def test_image_chat_matches_naive_reference(tiny_v, vlm):
    tok = vlm.tokenizer
    png = _png(1)
    msgs = _messages("What is in this picture? Answer in detail please.", png)
    ids = encode_chat(tok, msgs, allow_images=True)
    vcfg = VisionConfig.from_dict(vlm.engine.model_config.vision)
    sp = tok.special_ids
    exp = expand_image_tokens(ids, sp["<|begin_of_image|>"], sp["<|end_of_image|>"], vcfg.num_image_vectors)
    pixels = preprocess(decode_image(png), vcfg.image_size)  # normalized floats: the reference takes them
    image_vecs = _reference(_vision_state(tiny_v), vcfg, pixels).float()  # [n + 2, hidden]

    hf = _reference_model(vlm)
    embeds = hf.model.embed_tokens(torch.tensor(exp.ids)).detach().clone()
    s, e = exp.image_span
    embeds[s:e] = image_vecs
    positions = list(exp.positions)
    want, want_lp = [], []
    with torch.no_grad():
        for _ in range(12):  # greedy, recomputing everything: slow and obviously right
            logits = hf(inputs_embeds=embeds[None], position_ids=torch.tensor([positions])).logits[0, -1]
            lp = torch.log_softmax(logits.double(), -1)
            nxt = int(logits.argmax())
            want.append(nxt)
            want_lp.append(lp)
            embeds = torch.cat([embeds, hf.model.embed_tokens(torch.tensor([nxt]))])
            positions.append(positions[-1] + 1)

    res = vlm.generate([msgs], SamplingParams(max_tokens=12, logprobs=5, **GREEDY), use_tqdm=False)[0]
    assert res.prompt_token_ids == ids
    assert res.usage["prompt_tokens"] == len(exp.ids)  # KV slots: the image counts n + 2
    assert res.token_ids == want
    for got, ref in zip(res.choices[0].logprobs, want_lp):
        assert abs(got.logprob - ref[got.token_id].item()) < 1e-4
        for tid, value in got.top:
            assert abs(value - ref[tid].item()) < 1e-4


def test_chunked_prefill_splits_the_image(tiny_v, vlm):
    msgs = _messages("Describe it.", _png(2))
    whole = vlm.generate([msgs], SamplingParams(max_tokens=10, **GREEDY), use_tqdm=False)[0].token_ids
    # A 4-token budget cuts the 6 image slots across several steps.
    chunky = LLM(str(tiny_v), kv_cache_tokens=1024, max_batch_tokens=4, max_num_seqs=4, enable_prefix_caching=False)
    assert chunky.generate([msgs], SamplingParams(max_tokens=10, **GREEDY), use_tqdm=False)[0].token_ids == whole


def test_the_engine_holds_images_as_bytes_of_rgb(vlm):
    # A decoded image waits in the queue (and crosses the engine-process pipe) as uint8 RGB, a quarter of float32's
    # bytes (3.8 MB at GLM-4V-9B's 1120 x 1120); the tower normalizes it on its device. The same image given as
    # normalized floats answers alike.
    png = _png(5)
    msgs = _messages("Describe it.", png)
    ids = encode_chat(vlm.tokenizer, msgs, allow_images=True)
    size = vlm.engine.vision_config.image_size
    mm = vlm.engine.prepare_image(ids, png)
    assert mm.pixels.dtype == torch.uint8 and tuple(mm.pixels.shape) == (3, size, size)
    floats = preprocess(decode_image(png), size)
    assert torch.equal(vlm.engine.model.vision(mm.pixels[None]), vlm.engine.model.vision(floats[None]))
    p = SamplingParams(max_tokens=10, **GREEDY)
    want = vlm.generate([msgs], p, use_tqdm=False)[0].token_ids
    eng = vlm.engine
    eng.add_request("as-floats", ids, p, image=floats)
    got = []
    while eng.has_unfinished():
        got += [t for o in eng.step() for c in o.outputs for t in c.token_ids]
    assert got == want


def test_prefix_cache_keys_include_the_image(vlm):
    text = "Tell me a long story about the scene in this image, with many details about the colours. " * 2
    a, b = _messages(text, _png(3)), _messages(text, _png(4))
    p = SamplingParams(max_tokens=10, **GREEDY)
    first = vlm.generate([a], p, use_tqdm=False)[0]
    again = vlm.generate([a], p, use_tqdm=False)[0]
    other = vlm.generate([b], p, use_tqdm=False)[0]
    assert again.usage["cached_tokens"] > 0 and again.token_ids == first.token_ids
    assert other.usage["cached_tokens"] == 0  # same text, different image: nothing shared
    assert other.token_ids != first.token_ids


def test_images_rejected_where_they_do_not_belong(tiny_hf, vlm):
    text_only = LLM(str(tiny_hf), kv_cache_tokens=1024)
    with pytest.raises(ImageNotSupportedError):
        text_only.generate([_messages("hi", _png(5))], SamplingParams(max_tokens=2), use_tqdm=False)
    with pytest.raises(ValueError, match="image"):
        vlm.generate([_messages("hi", b"not an image")], SamplingParams(max_tokens=2), use_tqdm=False)
    two = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": base64.b64encode(_png(6)).decode()}},
                                        {"type": "image_url", "image_url": {"url": base64.b64encode(_png(7)).decode()}},
                                        {"type": "text", "text": "compare"}]}]
    with pytest.raises(ValueError):
        vlm.generate([two], SamplingParams(max_tokens=2), use_tqdm=False)
