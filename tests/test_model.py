"""Our GLM-4 model against the independent reference (HF transformers GlmForCausalLM / Glm4ForCausalLM, float32)."""

from __future__ import annotations

import pytest
import torch
from transformers import Glm4ForCausalLM as HFGlm4
from transformers import GlmForCausalLM as HFGlm

from glm_serve.loader import load_model
from glm_serve.model.attention import AttnMetadata, LayerCache
from glm_serve.model.simple import allocate_cache, generate_simple, single_seq_meta
from glm_serve.tokenizer import load_tokenizer


def _hf(path, cls=HFGlm):
    return cls.from_pretrained(path, dtype=torch.float32).eval()


def _flat_batch_meta(starts: list[int], n_new: list[int], block_size: int, tables: list[list[int]]) -> AttnMetadata:
    """Metadata for several sequences, each with `starts[b]` tokens already cached and `n_new[b]` new ones."""
    B = len(starts)
    width = max(len(t) for t in tables)
    slots, seq_idx, q_off = [], [], []
    for b in range(B):
        for j in range(starts[b], starts[b] + n_new[b]):
            slots.append(tables[b][j // block_size] * block_size + j % block_size)
            seq_idx.append(b)
            q_off.append(j - starts[b])
    cu = [0]
    for n in n_new:
        cu.append(cu[-1] + n)
    return AttnMetadata(
        cu_seqlens_q=torch.tensor(cu, dtype=torch.int32),
        seq_lens=torch.tensor([s + n for s, n in zip(starts, n_new)], dtype=torch.int32),
        slot_mapping=torch.tensor(slots, dtype=torch.int64),
        block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32),
        max_seqlen_q=max(n_new),
        max_seqlen_k=max(s + n for s, n in zip(starts, n_new)),
        token_to_seq=torch.tensor(seq_idx, dtype=torch.int64),
        token_q_offset=torch.tensor(q_off, dtype=torch.int64),
    )


@pytest.mark.parametrize("fixture,cls", [("tiny_hf", HFGlm), ("tiny_glm4", HFGlm4)])
def test_logits_match_reference_single_sequence(request, fixture, cls):
    path = request.getfixturevalue(fixture)
    ours, ref = load_model(path), _hf(path, cls)
    for length in (1, 7, 33, 64):
        ids = torch.randint(0, ours.config.vocab_size, (length,))
        caches, nb = allocate_cache(ours, length, 16, torch.float32, "cpu")
        with torch.inference_mode():
            got = ours.compute_logits(ours(ids, torch.arange(length), single_seq_meta(0, length, 16, nb, "cpu"), caches))
            want = ref(ids[None]).logits[0]
        assert (got - want).abs().max().item() < 1e-4, f"length {length}"


def test_logits_match_reference_flat_batch_with_cached_prefix(tiny_hf):
    """Many sequences in one flat batch, each with part of its context already in a shuffled paged cache."""
    ours, ref = load_model(tiny_hf), _hf(tiny_hf)
    gen = torch.Generator().manual_seed(123)
    block = 8
    for trial in range(3):
        B = 4 + trial
        total = [int(x) for x in torch.randint(1, 40, (B,), generator=gen)]
        starts = [int(torch.randint(0, t, (1,), generator=gen)) for t in total]
        seqs = [torch.randint(0, ours.config.vocab_size, (t,), generator=gen) for t in total]
        nblocks = [(t + block - 1) // block for t in total]
        perm = torch.randperm(sum(nblocks), generator=gen).tolist()  # physical blocks scattered on purpose
        tables, k = [], 0
        for n in nblocks:
            tables.append(perm[k:k + n])
            k += n
        shape = (sum(nblocks), block, ours.config.num_kv_heads, ours.config.head_dim)
        caches = [LayerCache(torch.zeros(shape), torch.zeros(shape)) for _ in range(ours.config.num_layers)]
        with torch.inference_mode():
            # Step 1: each sequence's prefix (those with start > 0); step 2: the rest, all together.
            pre = [b for b in range(B) if starts[b] > 0]
            if pre:
                meta = _flat_batch_meta([0] * len(pre), [starts[b] for b in pre], block, [tables[b] for b in pre])
                ids = torch.cat([seqs[b][:starts[b]] for b in pre])
                pos = torch.cat([torch.arange(starts[b]) for b in pre])
                ours(ids, pos, meta, caches)
            n_new = [t - s for t, s in zip(total, starts)]
            meta = _flat_batch_meta(starts, n_new, block, tables)
            ids = torch.cat([seqs[b][starts[b]:] for b in range(B)])
            pos = torch.cat([torch.arange(starts[b], total[b]) for b in range(B)])
            got = ours.compute_logits(ours(ids, pos, meta, caches))
            for b in range(B):
                want = ref(seqs[b][None]).logits[0, starts[b]:]
                rows = got[meta.cu_seqlens_q[b]:meta.cu_seqlens_q[b + 1]]
                assert (rows - want).abs().max().item() < 1e-4, f"trial {trial} seq {b}"


PROMPTS = ["你好，请介绍一下你自己。", "Write a haiku about GPUs.", "1 + 1 =", "def fib(n):"]


def test_greedy_tokens_match_reference(tiny_hf):
    ours, ref, tok = load_model(tiny_hf), _hf(tiny_hf), load_tokenizer(tiny_hf)
    for prompt in PROMPTS:
        ids = tok.encode(prompt)
        got = generate_simple(ours, ids, max_tokens=32)
        want = ref.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False, eos_token_id=None,
                            pad_token_id=0)[0, len(ids):].tolist()
        assert got == want, prompt


def test_torch_backend_key_chunks_match_reference(tiny_hf):
    """The torch backend's long-context path end to end: with 16-key chunks a 70-token prompt spans five chunks
    (online softmax merge), in prefill and in every decode step after it."""
    from glm_serve.model.attention import TorchPagedAttention

    ours, ref, tok = load_model(tiny_hf), _hf(tiny_hf), load_tokenizer(tiny_hf)
    ours.set_backend(TorchPagedAttention(key_chunk=16))
    ids = (tok.encode(" ".join(PROMPTS)) * 4)[:70]
    caches, nb = allocate_cache(ours, len(ids), 4, torch.float32, "cpu")
    with torch.inference_mode():
        got = ours.compute_logits(ours(torch.tensor(ids), torch.arange(len(ids)),
                                       single_seq_meta(0, len(ids), 4, nb, "cpu"), caches))
        want = ref(torch.tensor([ids])).logits[0]
    assert (got - want).abs().max().item() < 1e-4
    tokens = generate_simple(ours, ids, max_tokens=16, block_size=4)
    assert tokens == ref.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False, eos_token_id=None,
                                  pad_token_id=0)[0, len(ids):].tolist()


def test_chatglm_layout_equals_hf_layout(tiny_hf, tiny_chatglm):
    a, b = load_model(tiny_hf), load_model(tiny_chatglm)
    assert a.config.rope_theta == b.config.rope_theta  # 10000 * rope_ratio on both sides
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    tok_a, tok_b = load_tokenizer(tiny_hf), load_tokenizer(tiny_chatglm)
    for prompt in PROMPTS:
        ids = tok_a.encode(prompt)
        assert ids == tok_b.encode(prompt)
        assert generate_simple(a, ids, 32) == generate_simple(b, ids, 32)


def test_glm4_greedy_matches_reference(tiny_glm4):
    ours, ref = load_model(tiny_glm4), _hf(tiny_glm4, HFGlm4)
    ids = torch.randint(0, 1000, (21,)).tolist()
    want = ref.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False, eos_token_id=None,
                        pad_token_id=0)[0, len(ids):].tolist()
    assert generate_simple(ours, ids, 32) == want


def test_torch_backend_groups_decode_and_prefill_rows_exactly():
    """With host lengths the torch backend attends decode rows and prefill rows as two groups; the result must
    equal the single padded group (no host lengths)."""
    import numpy as np

    from glm_serve.model.attention import TorchPagedAttention

    gen = torch.Generator().manual_seed(7)
    block, kvh, H, D = 4, 2, 8, 16
    starts, n_new = [5, 0, 9, 3, 12], [1, 13, 1, 6, 1]  # decodes and prefill chunks mixed
    total = [s + n for s, n in zip(starts, n_new)]
    nblocks = [(t + block - 1) // block for t in total]
    perm = torch.randperm(sum(nblocks), generator=gen).tolist()
    tables, k = [], 0
    for n in nblocks:
        tables.append(perm[k:k + n])
        k += n
    kc = torch.randn(sum(nblocks), block, kvh, D, generator=gen)
    vc = torch.randn(sum(nblocks), block, kvh, D, generator=gen)
    T = sum(n_new)
    q, kk, vv = (torch.randn(T, h, D, generator=gen) for h in (H, kvh, kvh))
    outs = []
    for host in (False, True):
        meta = _flat_batch_meta(starts, n_new, block, tables)
        if host:
            meta.host_q_lens = np.array(n_new)
            meta.host_seq_lens = np.array(total)
            meta.host_cu_seqlens_q = np.concatenate([[0], np.cumsum(n_new)])
        outs.append(TorchPagedAttention().forward(q, kk, vv, LayerCache(kc.clone(), vc.clone()), meta, D**-0.5))
        assert len(meta.cache["torch_groups"]) == (2 if host else 1)
    assert torch.allclose(outs[0], outs[1], atol=1e-6)


def test_torch_store_kv_padding_rows_never_undo_a_real_store():
    """slot_mapping -1 (a CUDA-graph padding row) stores nothing, even beside a real token stored in slot 0: the
    padding row used to re-write slot 0's old contents in the same index_copy_, and could win."""
    from glm_serve.model.attention import store_kv

    kc = torch.zeros(2, 4, 1, 2)
    vc = torch.zeros_like(kc)
    k = torch.tensor([[[1.0, 2.0]], [[9.0, 9.0]], [[3.0, 4.0]], [[8.0, 8.0]]])
    store_kv(k, -k, LayerCache(kc, vc), torch.tensor([0, -1, 5, -1]))
    assert kc[0, 0, 0].tolist() == [1.0, 2.0] and vc[0, 0, 0].tolist() == [-1.0, -2.0]
    assert kc[1, 1, 0].tolist() == [3.0, 4.0]
    assert (kc != 0).any(-1).flatten().nonzero().flatten().tolist() == [0, 5]  # nothing else written
    store_kv(k, k, LayerCache(kc, vc), torch.full((4,), -1))  # padding only: the cache is unchanged
    assert kc[0, 0, 0].tolist() == [1.0, 2.0] and (kc != 0).any(-1).sum().item() == 2


def test_tied_embeddings_without_lm_head_match_reference(tiny_hf, tmp_path):
    """tie_word_embeddings with no lm_head tensor in the files: transformers uses the embedding as lm_head."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    path = tmp_path / "tied"
    shutil.copytree(tiny_hf, path)
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, "tie_word_embeddings": True}))
    index = json.loads((path / "model.safetensors.index.json").read_text())
    shard = path / index["weight_map"].pop("lm_head.weight")
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    save_file({k: v for k, v in load_file(shard).items() if k != "lm_head.weight"}, shard, metadata={"format": "pt"})
    ours, ref = load_model(path), _hf(path)
    ids = torch.randint(0, ours.config.vocab_size, (9,))
    caches, nb = allocate_cache(ours, 9, 16, torch.float32, "cpu")
    with torch.inference_mode():
        got = ours.compute_logits(ours(ids, torch.arange(9), single_seq_meta(0, 9, 16, nb, "cpu"), caches))
        want = ref(ids[None]).logits[0]
    assert (got - want).abs().max().item() < 1e-4
