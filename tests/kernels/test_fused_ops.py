"""fused.add_rms_norm, silu_mul and rope_ vs their float64 references in reference.py: fresh random inputs of
many shapes (one row, odd row counts, widths that are not powers of two, GLM-4's own), outputs poisoned with
NaN so an element the kernel does not write fails. On a GPU the same tests run in bfloat16 too
(test_kernels_gpu.py)."""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE, tolerance

from glm_serve.kernels import add_rms_norm, rope_, silu_mul
from glm_serve.kernels.reference import add_rms_norm_ref, rope_ref, silu_mul_ref

DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])


def _close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    assert not got.isnan().any(), "an element was not written"
    torch.testing.assert_close(got.cpu().double(), want.double(), **tolerance(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows, width", [(1, 64), (7, 96), (33, 4096), (130, 128), (5, 4000)])
@pytest.mark.parametrize("with_residual", [False, True])
def test_add_rms_norm_matches_reference(dtype, rows, width, with_residual):
    gen = torch.Generator().manual_seed(rows * 31 + width + with_residual)
    x = (torch.randn(rows, width, generator=gen) * 3).to(dtype)
    res = (torch.randn(rows, width, generator=gen) * 3).to(dtype) if with_residual else None
    w = (1 + 0.1 * torch.randn(width, generator=gen)).to(dtype)
    want, want_sum = add_rms_norm_ref(x, w, 1e-5, res)
    out = torch.full((rows, width), float("nan"), dtype=dtype, device=DEVICE)
    got, got_sum = add_rms_norm(x.to(DEVICE), w.to(DEVICE), 1e-5, None if res is None else res.to(DEVICE), out=out)
    assert got is out
    _close(got, want, dtype)
    # The sum is rounded once to the dtype, exactly as `x + residual` in PyTorch: the next layer reads it.
    assert torch.equal(got_sum.cpu(), want_sum if res is None else x + res)


def test_add_rms_norm_reads_strided_rows():
    x = torch.randn(6, 256)[:, :128]  # rows 256 apart, as a slice of a wider buffer
    w = torch.rand(128) + 0.5
    got, _ = add_rms_norm(x.to(DEVICE), w.to(DEVICE), 1e-6)
    _close(got, add_rms_norm_ref(x, w, 1e-6)[0], torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows, ffn", [(1, 64), (9, 100), (40, 1024), (3, 13696)])  # 13696: GLM-4-9B's
def test_silu_mul_matches_reference(dtype, rows, ffn):
    gen = torch.Generator().manual_seed(rows + ffn)
    gate_up = (torch.randn(rows, 2 * ffn, generator=gen) * 4).to(dtype)
    out = torch.full((rows, ffn), float("nan"), dtype=dtype, device=DEVICE)
    got = silu_mul(gate_up.to(DEVICE), out=out)
    assert got is out
    _close(got, silu_mul_ref(gate_up), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "tokens, heads, kv_heads, head_dim, rotary_dim",
    [
        (1, 32, 2, 128, 64),  # GLM-4-9B: half the head rotates
        (7, 4, 4, 32, 16),
        (19, 16, 1, 64, 64),  # the whole head rotates (GQA 16)
        (5, 6, 2, 80, 40),  # head count and dims not powers of two
        (33, 2, 2, 32, 0),  # nothing rotates
    ],
)
def test_rope_matches_reference_in_place(dtype, tokens, heads, kv_heads, head_dim, rotary_dim):
    gen = torch.Generator().manual_seed(tokens * 13 + heads + rotary_dim)
    # q and k are strided views into one fused [T, (H + 2 KVH) * D] projection, as in the model
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, generator=gen).to(dtype)
    q = qkv[:, : heads * head_dim].view(tokens, heads, head_dim)
    k = qkv[:, heads * head_dim : (heads + kv_heads) * head_dim].view(tokens, kv_heads, head_dim)
    angles = torch.rand(tokens, rotary_dim // 2, generator=gen) * 1000  # large positions
    cos, sin = angles.cos(), angles.sin()
    want_q, want_k = rope_ref(q, cos, sin), rope_ref(k, cos, sin)
    want_v = qkv[:, (heads + kv_heads) * head_dim :].clone()

    dev = qkv.to(DEVICE)
    q_dev = dev[:, : heads * head_dim].view(tokens, heads, head_dim)
    k_dev = dev[:, heads * head_dim : (heads + kv_heads) * head_dim].view(tokens, kv_heads, head_dim)
    rope_(q_dev, k_dev, cos.to(DEVICE), sin.to(DEVICE))
    _close(q_dev, want_q, dtype)
    _close(k_dev, want_k, dtype)
    assert torch.equal(dev[:, (heads + kv_heads) * head_dim :].cpu(), want_v)  # v untouched
    # Dims past rotary_dim pass through bit for bit
    assert torch.equal(q_dev[..., rotary_dim:].cpu(), q[..., rotary_dim:])


def test_fused_ops_reject_bad_shapes():
    with pytest.raises(ValueError, match="weight"):
        add_rms_norm(torch.zeros(2, 8), torch.zeros(4), 1e-5)
    with pytest.raises(ValueError, match="residual"):
        add_rms_norm(torch.zeros(2, 8), torch.zeros(8), 1e-5, torch.zeros(3, 8))
    with pytest.raises(ValueError, match="residual"):  # the sum is stored in x's dtype: a mix would round twice
        add_rms_norm(torch.zeros(2, 8), torch.zeros(8), 1e-5, torch.zeros(2, 8, dtype=torch.float16))
    with pytest.raises(ValueError, match="weight"):
        add_rms_norm(torch.zeros(2, 8), torch.zeros(8, 2)[:, 0], 1e-5)
    with pytest.raises(ValueError, match="2F"):
        silu_mul(torch.zeros(2, 7))
    with pytest.raises(ValueError, match="rotary_dim"):
        rope_(torch.zeros(2, 4, 8), torch.zeros(2, 2, 8), torch.zeros(2, 5), torch.zeros(2, 5))
    with pytest.raises(ValueError, match="float32"):
        rope_(torch.zeros(2, 4, 8), torch.zeros(2, 2, 8), torch.zeros(2, 2, dtype=torch.float16),
              torch.zeros(2, 2, dtype=torch.float16))


# ---------------------------------------------------------------- the fused ops inside the model


@pytest.mark.parametrize("method", ["nf4", "int8"])
def test_fused_ops_over_quantized_linears_give_the_plain_forward(tiny_hf, method):
    """--quantization swaps the decoder's linears for bitsandbytes ones: the fused path calls those same modules
    (qkv, o, gate_up, down) between its kernels, so its hidden states are the plain path's (float32)."""
    pytest.importorskip("bitsandbytes")
    from glm_serve.loader import load_model  # noqa: PLC0415
    from glm_serve.model.simple import allocate_cache, single_seq_meta  # noqa: PLC0415
    from glm_serve.model.triton_backend import TritonPagedAttention  # noqa: PLC0415

    model = load_model(tiny_hf, device=DEVICE, quantization=method)
    model.set_backend(TritonPagedAttention())
    ids = torch.randint(0, model.config.vocab_size, (23,), generator=torch.Generator().manual_seed(3)).to(DEVICE)
    got = {}
    for fused in (False, True):
        model.use_fused_ops(fused)
        caches, num_blocks = allocate_cache(model, 32, 16, torch.float32, DEVICE)
        with torch.inference_mode():
            got[fused] = model(ids, torch.arange(23, device=DEVICE), single_seq_meta(0, 23, 16, num_blocks, DEVICE),
                               caches)
    torch.testing.assert_close(got[True], got[False], atol=2e-5, rtol=2e-5)


def test_fused_ops_serve_an_image_prompt_as_the_plain_model_does(tmp_path):
    """GLM-4V: the image's rows enter the decoder as inputs_embeds (the embeddings with the tower's vectors
    written in), in chunks of 8 tokens that split the image span; the fused path starts its residual stream from
    them: the tokens are the torch backend's plain model's, with and without an image."""
    import base64  # noqa: PLC0415
    import io  # noqa: PLC0415

    from PIL import Image  # noqa: PLC0415

    from glm_serve.llm import LLM  # noqa: PLC0415
    from glm_serve.sampling_params import SamplingParams  # noqa: PLC0415
    from glm_serve.tiny_vision import make_tiny_vision  # noqa: PLC0415

    ckpt = make_tiny_vision(tmp_path / "tiny4v", seed=5)
    pixels = (torch.rand(40, 64, 3, generator=torch.Generator().manual_seed(1)) * 255).to(torch.uint8).numpy()
    png = io.BytesIO()
    Image.fromarray(pixels).save(png, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(png.getvalue()).decode()
    image_chat = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                               {"type": "text", "text": "What is in the picture?"}]}]
    prompts = [image_chat, [{"role": "user", "content": "hi there"}]]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    kw = dict(kv_cache_tokens=512, max_batch_tokens=8, max_num_seqs=4)
    want = LLM(str(ckpt), attention_backend="torch", **kw).generate(prompts, params, use_tqdm=False)
    fused = LLM(str(ckpt), attention_backend="triton", **kw)
    assert fused.engine.model.fused_ops and fused.engine.model.vision is not None
    got = fused.generate(prompts, params, use_tqdm=False)
    assert [r.token_ids for r in got] == [r.token_ids for r in want]
    assert len(got[0].prompt_token_ids) > 8  # the image prompt really spanned several chunks
