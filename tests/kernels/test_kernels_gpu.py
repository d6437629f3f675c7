"""bf16 checks at GLM-4 shapes on a real GPU (the interpreter computes bf16 wrongly), plus CUDA-graph capture
of the decode launch. Marked `gpu`: skipped where no CUDA device exists."""

from __future__ import annotations

import pytest
import torch
from conftest import tolerance

from glm_serve.kernels import DecodePartials, choose_num_splits, paged_decode, paged_prefill
from glm_serve.kernels.reference import paged_attention_ref, paged_decode_ref
from glm_serve.model.attention import AttnMetadata, LayerCache
from glm_serve.model.triton_backend import TritonPagedAttention

pytestmark = pytest.mark.gpu
GLM = {"heads": 32, "kv_heads": 2, "head_dim": 128, "block_size": 16, "dtype": torch.bfloat16}
SCALE = 128**-0.5


def _ref(batch, q=None):
    q = batch.q if q is None else q
    return paged_attention_ref(q, batch.k_cache, batch.v_cache, batch.cu_seqlens_q, batch.seq_lens,
                               batch.block_tables, SCALE)  # fmt: skip


def test_prefill_bf16_glm_shapes(paged_batch):
    batch = paged_batch([1, 300, 700, 17], [50, 300, 2900, 17], seed=11, **GLM)
    out = torch.full_like(batch.q, float("nan"))
    paged_prefill(batch.q, batch.k_cache, batch.v_cache, batch.cu_seqlens_q, batch.seq_lens, batch.block_tables,
                  batch.max_seqlen_q, SCALE, out=out)  # fmt: skip
    torch.testing.assert_close(out.float(), _ref(batch).float(), **tolerance(torch.bfloat16))


@pytest.mark.parametrize("splits", [1, None])
def test_decode_bf16_glm_shapes(paged_batch, splits):
    seq_lens = [1, 17, 4096, 20000, 333, 64, 9000, 2]
    batch = paged_batch([1] * 8, seq_lens, seed=12, **GLM)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    splits = splits or choose_num_splits(8, 2, max(seq_lens), sms)
    out = torch.full_like(batch.q, float("nan"))
    paged_decode(batch.q, batch.k_cache, batch.v_cache, batch.seq_lens, batch.block_tables, SCALE, splits, out=out)
    want = paged_decode_ref(batch.q, batch.k_cache, batch.v_cache, batch.seq_lens, batch.block_tables, SCALE)
    torch.testing.assert_close(out.float(), want.float(), **tolerance(torch.bfloat16))


def test_fp8_cache_bf16_glm_shapes(paged_batch):
    """The fp8 cache on the hardware: store_kv's e4m3 rounding (the GPU's own conversion), then decode and prefill
    over it in bf16 against the reference reading the same fp8 rows and scales."""
    from glm_serve.kernels import store_kv  # noqa: PLC0415
    from glm_serve.kernels.reference import quantize_fp8_ref  # noqa: PLC0415

    seq_lens = [1, 17, 4096, 20000, 333]
    batch = paged_batch([1, 1, 1, 700, 33], seq_lens, seed=15, **GLM)
    k8, ks = quantize_fp8_ref(batch.k_cache)
    v8, vs = quantize_fp8_ref(batch.v_cache)
    new_k = torch.randn(len(batch.slot_mapping), 2, 128, device="cuda", dtype=torch.bfloat16)
    store_kv(new_k, -new_k, k8, v8, batch.slot_mapping, ks, vs)  # the kernel's quantization, on the GPU
    want_k, want_ks = quantize_fp8_ref(new_k)
    flat = batch.slot_mapping
    torch.testing.assert_close(ks.view(-1, 2)[flat], want_ks, rtol=1e-6, atol=0)
    same = (k8.view(-1, 2, 128)[flat].float() == want_k.float()).float().mean().item()
    assert same > 0.999  # the GPU's division may round a rare quotient's last bit the other way
    dec = batch.q[torch.tensor([0, 1, 2])]  # the three decode rows
    dec_batch = dict(seq_lens=batch.seq_lens[:3], block_tables=batch.block_tables[:3])
    out = paged_decode(dec, k8, v8, dec_batch["seq_lens"], dec_batch["block_tables"], SCALE, 8, k_scale=ks,
                       v_scale=vs)
    want = paged_decode_ref(dec, k8, v8, dec_batch["seq_lens"], dec_batch["block_tables"], SCALE, ks, vs)
    torch.testing.assert_close(out.float(), want.float(), **tolerance(torch.bfloat16))
    out = paged_prefill(batch.q, k8, v8, batch.cu_seqlens_q, batch.seq_lens, batch.block_tables, batch.max_seqlen_q,
                        SCALE, k_scale=ks, v_scale=vs)
    want = paged_attention_ref(batch.q, k8, v8, batch.cu_seqlens_q, batch.seq_lens, batch.block_tables, SCALE, ks, vs)
    torch.testing.assert_close(out.float(), want.float(), **tolerance(torch.bfloat16))


def test_decode_cuda_graph_replay_follows_new_lengths(paged_batch):
    """Capture once, then change seq_lens and q in place: the replay must attend over the new lengths."""
    batch = paged_batch([1] * 4, [1000, 5000, 17, 20000], seed=13, **GLM)
    splits = choose_num_splits(4, 2, 32768, torch.cuda.get_device_properties(0).multi_processor_count)
    partials = DecodePartials.empty(4, 32, 128, splits, "cuda")
    q, seq_lens, out = batch.q.clone(), batch.seq_lens.clone(), torch.empty_like(batch.q)
    args = (q, batch.k_cache, batch.v_cache, seq_lens, batch.block_tables, SCALE, splits)
    paged_decode(*args, out=out, partials=partials)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        paged_decode(*args, out=out, partials=partials)
    seq_lens.copy_(torch.tensor([999, 10, 17, 12345], dtype=torch.int32))
    q.copy_(torch.randn_like(q))
    graph.replay()
    torch.cuda.synchronize()
    want = paged_decode_ref(q, batch.k_cache, batch.v_cache, seq_lens, batch.block_tables, SCALE)
    torch.testing.assert_close(out.float(), want.float(), **tolerance(torch.bfloat16))


@pytest.mark.parametrize("q_lens, seq_lens", [([1, 1, 1], [77, 4000, 1]), ([1, 64, 5], [300, 64, 1029])])
def test_backend_bf16(paged_batch, q_lens, seq_lens):
    batch = paged_batch(q_lens, seq_lens, seed=14, **GLM)
    meta_args = dict(cu_seqlens_q=batch.cu_seqlens_q, seq_lens=batch.seq_lens, slot_mapping=batch.slot_mapping,
                     block_tables=batch.block_tables, max_seqlen_q=batch.max_seqlen_q,
                     max_seqlen_k=batch.max_seqlen_k)  # fmt: skip
    k = torch.randn(batch.q.shape[0], 2, 128, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    got = TritonPagedAttention().forward(batch.q, k, v, LayerCache(batch.k_cache, batch.v_cache),
                                         AttnMetadata(**meta_args), SCALE)
    # The reference reads the cache after the store, so it sees the same new K/V.
    torch.testing.assert_close(got.float(), _ref(batch).float(), **tolerance(torch.bfloat16))
