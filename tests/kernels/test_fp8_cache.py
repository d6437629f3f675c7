"""The fp8 KV cache (--kv-cache-dtype fp8) in every kernel: store_kv quantizes each (token, KV head) row with its
own scale exactly as reference.quantize_fp8_ref does, and the decode and prefill kernels over an fp8 cache match
the float64 reference reading the same fp8 rows times their scales. Unused slots and their scales are NaN, so a
stray read shows."""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE, tolerance

from glm_serve.kernels import DecodePartials, paged_decode, paged_prefill, store_kv
from glm_serve.kernels.reference import (
    dequantize_fp8_ref,
    paged_attention_ref,
    paged_decode_ref,
    quantize_fp8_ref,
    store_kv_ref,
)

FP8 = torch.float8_e4m3fn


def _fp8(batch):
    """The batch's caches as fp8 rows and their scales (poisoned slots stay NaN in both)."""
    k, ks = quantize_fp8_ref(batch.k_cache.cpu())
    v, vs = quantize_fp8_ref(batch.v_cache.cpu())
    return k.to(DEVICE), v.to(DEVICE), ks.to(DEVICE), vs.to(DEVICE)


@pytest.mark.parametrize("tokens, kv_heads, head_dim, block_size, src_dtype", [
    (1, 2, 128, 16, torch.float32),
    (37, 2, 128, 16, torch.float16),
    (64, 4, 64, 1, torch.float32),
    (50, 3, 80, 32, torch.float16),  # head count and head_dim not powers of two: padded lanes must not count
])
def test_store_quantizes_like_the_reference(tokens, kv_heads, head_dim, block_size, src_dtype):
    gen = torch.Generator().manual_seed(tokens + head_dim)
    num_blocks = tokens // block_size + 4
    k = (torch.randn(tokens, kv_heads, head_dim, generator=gen) * 30).to(src_dtype)
    v = torch.randn(tokens, kv_heads, head_dim, generator=gen).to(src_dtype)
    k[0, 0] = 0  # an all-zero row: scale 1, zeros stored
    k[-1, -1, 3] = 5000  # an outlier far past e4m3's range: its row's scale takes it
    if tokens > 1:  # a row spanning 10 decades: e4m3 subnormals, and roundings that carry into the exponent
        k[-1, 0] = (torch.linspace(-1, 1, head_dim) ** 9 * 1e3).to(src_dtype)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:tokens]
    slots[1::5] = -1  # padding rows: neither values nor scales written
    shape = (num_blocks, block_size, kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=gen).to(FP8)
    v_cache = torch.randn(shape, generator=gen).to(FP8)
    k_scale, v_scale = torch.rand(shape[:3], generator=gen), torch.rand(shape[:3], generator=gen)
    want = [t.clone() for t in (k_cache, v_cache, k_scale, v_scale)]
    store_kv_ref(k, v, want[0], want[1], slots, want[2], want[3])

    got = [t.to(DEVICE) for t in (k_cache, v_cache, k_scale, v_scale)]
    store_kv(k.to(DEVICE), v.to(DEVICE), got[0], got[1], slots.to(DEVICE), got[2], got[3])
    for g, w in zip(got, want):
        if DEVICE == "cpu":  # the interpreter computes in numpy fp32 like the reference: the same values
            assert torch.equal(g.cpu().float(), w.float())  # (as floats: Triton 3.6's interpreter drops -0's sign)
        else:  # a GPU's division may round the last fp32 bit otherwise: one e4m3 step (1/8) apart at most
            torch.testing.assert_close(g.cpu().float(), w.float(), atol=1e-6, rtol=0.13)
    # Read back, every stored row is its input within e4m3's half step (1/16 relative), or 2^-10 of the row's
    # scale for the smallest values (subnormals).
    block_size = k_cache.shape[1]
    for t, slot in enumerate(slots.tolist()):
        if slot >= 0:
            at = (slot // block_size, slot % block_size)
            back = dequantize_fp8_ref(got[0][at].cpu(), got[2][at].cpu())
            bound = k[t].double().abs() / 16 + got[2][at].cpu().double()[:, None] / 1024 + 1e-6
            assert ((back - k[t].double()).abs() <= bound).all()


# (q_lens or None for decode, seq_lens, heads, kv_heads, head_dim, block_size, splits)
CASES = {
    "decode_gqa16": (None, [1, 63, 64, 300], 32, 2, 128, 16, 1),
    "decode_gqa16_splits3": (None, [1, 63, 64, 300], 32, 2, 128, 16, 3),
    "decode_padding_row_and_empty_splits": (None, [0, 20, 2], 16, 1, 64, 8, 16),
    "decode_head_dim_80": (None, [90, 7], 8, 2, 80, 16, 2),
    "prefill_chunks_after_prefix": ([7, 1, 33], [50, 1, 33], 32, 2, 128, 16, 1),
    "prefill_block1_mha": ([5, 12], [5, 40], 4, 4, 32, 1, 1),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", list(CASES))
def test_attention_over_fp8_cache_matches_reference(paged_batch, case, dtype):
    q_lens, seq_lens, heads, kv_heads, head_dim, block_size, splits = CASES[case]
    decode = q_lens is None
    batch = paged_batch(q_lens or [1] * len(seq_lens), seq_lens, heads=heads, kv_heads=kv_heads,
                        head_dim=head_dim, block_size=block_size, dtype=dtype, seed=len(case))
    k8, v8, ks, vs = _fp8(batch)
    scale = head_dim**-0.5
    out = torch.full_like(batch.q, float("nan"))
    if decode:
        partials = DecodePartials.empty(len(seq_lens), heads, head_dim, splits, DEVICE) if splits > 1 else None
        paged_decode(batch.q, k8, v8, batch.seq_lens, batch.block_tables, scale, splits, out=out,
                     partials=partials, block_n=16 if block_size < 16 else 64, k_scale=ks, v_scale=vs)
        ref = paged_decode_ref(batch.q.cpu(), k8.cpu(), v8.cpu(), batch.seq_lens.cpu(), batch.block_tables.cpu(),
                               scale, ks.cpu(), vs.cpu())
    else:
        paged_prefill(batch.q, k8, v8, batch.cu_seqlens_q, batch.seq_lens, batch.block_tables, batch.max_seqlen_q,
                      scale, out=out, k_scale=ks, v_scale=vs)
        ref = paged_attention_ref(batch.q.cpu(), k8.cpu(), v8.cpu(), batch.cu_seqlens_q.cpu(), batch.seq_lens.cpu(),
                                  batch.block_tables.cpu(), scale, ks.cpu(), vs.cpu())
    torch.testing.assert_close(out.cpu().float(), ref.float(), **tolerance(dtype))


def test_fp8_attention_is_close_to_full_precision(paged_batch):
    """What the format costs: over the same keys and values, attention from the fp8 cache is within a few
    percent of the float32 cache's."""
    batch = paged_batch([1] * 3, [40, 200, 513], heads=32, kv_heads=2, head_dim=128, block_size=16,
                        dtype=torch.float32, seed=5)
    k8, v8, ks, vs = _fp8(batch)
    full = paged_decode(batch.q, batch.k_cache, batch.v_cache, batch.seq_lens, batch.block_tables, 128**-0.5)
    fp8 = paged_decode(batch.q, k8, v8, batch.seq_lens, batch.block_tables, 128**-0.5, k_scale=ks, v_scale=vs)
    err = (fp8 - full).abs().max().item()
    assert 0 < err < 0.05 * full.abs().max().item()


def test_fp8_arguments_are_checked(paged_batch):
    batch = paged_batch([1, 1], [5, 9], heads=4, kv_heads=2, head_dim=32, block_size=8, dtype=torch.float32, seed=0)
    k8, v8, ks, vs = _fp8(batch)
    args = (batch.seq_lens, batch.block_tables, 1.0)
    with pytest.raises(ValueError, match="needs k_scale and v_scale"):
        paged_decode(batch.q, k8, v8, *args)
    with pytest.raises(ValueError, match="needs k_scale and v_scale"):
        paged_decode(batch.q, batch.k_cache, batch.v_cache, *args, k_scale=ks, v_scale=vs)
    with pytest.raises(ValueError, match="float32"):
        paged_decode(batch.q, k8, v8, *args, k_scale=ks[:, :4], v_scale=vs[:, :4])
    with pytest.raises(ValueError, match="float32"):
        paged_decode(batch.q, k8, v8, *args, k_scale=ks.half(), v_scale=vs.half())
    k = torch.zeros(2, 2, 32, device=DEVICE)
    with pytest.raises(ValueError, match="needs k_scale and v_scale"):
        store_kv(k, k, k8, v8, batch.slot_mapping)


def test_rows_too_small_to_scale_store_zeros_not_nan():
    """A float32 row whose max is below 448 * 2^-149 has max / 448 = 0 in fp32: its scale must still be nonzero
    (else 0 / 0 = NaN fills the row, and every later attention over the sequence). Both quantizers, the kernel and
    the torch backend's, store such a row as zeros with scale 1, like an all-zero row."""
    from glm_serve.model.attention import quantize_fp8  # noqa: PLC0415

    k = torch.randn(3, 2, 16)
    k[0, 1] = 0
    k[0, 1, :3] = torch.tensor([1e-44, -3e-45, 0.0])  # fp32 subnormals, below 448 times the smallest one
    k[1, 0] = -0.0
    cache = torch.zeros(1, 4, 2, 16, dtype=FP8, device=DEVICE)
    scales = torch.zeros(1, 4, 2, device=DEVICE)
    store_kv(k.to(DEVICE), k.to(DEVICE), cache, cache.clone(), torch.arange(3, device=DEVICE), scales,
             scales.clone())
    for q, s in ((cache[0, :3].cpu(), scales[0, :3].cpu()), quantize_fp8(k), quantize_fp8_ref(k)):
        back = dequantize_fp8_ref(q, s)
        assert not back.isnan().any()
        assert s[0, 1] == 1 and s[1, 0] == 1 and (back[0, 1] == 0).all() and (back[1, 0] == 0).all()
        assert ((back - k.double()).abs() <= k.double().abs() / 16 + s.double()[..., None] / 1024).all()


def test_nan_values_stay_nan():
    """A K or V value the model computed as NaN is stored as NaN (as a 16-bit cache and the torch backend store
    it), not replaced by a finite one that would hide the failure; the row's other values keep a finite scale."""
    from glm_serve.model.attention import quantize_fp8  # noqa: PLC0415

    k = torch.randn(2, 1, 16) * 3
    k[0, 0, 3] = float("nan")
    cache = torch.zeros(1, 2, 1, 16, dtype=FP8, device=DEVICE)
    scales = torch.zeros(1, 2, 1, device=DEVICE)
    store_kv(k.to(DEVICE), k.to(DEVICE), cache, cache.clone(), torch.arange(2, device=DEVICE), scales, scales.clone())
    for q, s in ((cache[0].cpu(), scales[0].cpu()), quantize_fp8(k), quantize_fp8_ref(k)):
        back = dequantize_fp8_ref(q, s)
        assert back[0, 0, 3].isnan() and not back[1].isnan().any()
    back = dequantize_fp8_ref(cache[0].cpu(), scales[0].cpu())
    assert torch.isfinite(scales).all() and not back[0, 0, torch.arange(16) != 3].isnan().any()
