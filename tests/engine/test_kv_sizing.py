"""--max-model-len against the checkpoint's window and the KV cache: what the README's flag table says, refused
with one clear line at start (never silently capped, never a 0 read as "the default")."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from glm_serve.engine.config import EngineConfig
from glm_serve.engine.engine import LLMEngine


@pytest.fixture
def short_window(tiny_hf, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(tiny_hf, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["max_position_embeddings"] = 4096
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize("bad", [0, 1, -5])
def test_max_model_len_below_two_is_refused(bad):
    with pytest.raises(ValueError, match=r"--max-model-len\) must be >= 2"):
        EngineConfig(max_model_len=bad)


def test_max_model_len_beyond_the_checkpoint_is_refused_before_the_load(short_window, monkeypatch):
    def no_load(*a, **kw):
        raise AssertionError("weights loaded before the flags were checked")

    monkeypatch.setattr("glm_serve.loader.load_model", no_load)
    with pytest.raises(ValueError, match="8192 is beyond the checkpoint's context window of 4096"):
        LLMEngine(EngineConfig(model=str(short_window), max_model_len=8192))


def test_max_model_len_beyond_the_cache_is_refused(short_window, monkeypatch):
    with pytest.raises(ValueError, match=r"2048 is more than the KV cache holds \(1024 tokens"):
        EngineConfig(model=str(short_window), max_model_len=2048, kv_cache_tokens=1030)
    # Without --kv-cache-tokens the cache is sized after the load (on the CPU a fixed budget): checked there.
    monkeypatch.setattr("glm_serve.engine.config._CPU_KV_BYTES", 1600 * 1024)  # 1600 tokens of 1 KiB (tiny, fp32)
    with pytest.raises(ValueError, match=r"4096 is more than the KV cache holds \(1600 tokens"):
        LLMEngine(EngineConfig(model=str(short_window), max_model_len=4096))


def test_within_both_limits_it_is_the_context_window(short_window):
    assert LLMEngine(EngineConfig(model=str(short_window), max_model_len=1000, kv_cache_tokens=2048)).max_model_len \
        == 1000
    # Not given: the checkpoint's window, capped by the cache (README).
    assert LLMEngine(EngineConfig(model=str(short_window), kv_cache_tokens=1024)).max_model_len == 1024
    assert LLMEngine(EngineConfig(model=str(short_window), kv_cache_tokens=8192)).max_model_len == 4096


def test_a_kv_cache_beyond_memory_is_refused(tiny_hf, monkeypatch):
    # Before: 10**9 tokens of the tiny model (1 KiB each, 1 TB) reached torch.zeros: an allocator traceback on the
    # CPU (or the OOM killer, for a size the kernel overcommits), torch.OutOfMemoryError on a GPU.
    with pytest.raises(ValueError, match=r"--kv-cache-tokens 1000000000 needs 953\.7 GiB .* free on cpu"):
        LLMEngine(EngineConfig(model=str(tiny_hf), kv_cache_tokens=10**9))
    monkeypatch.setattr("glm_serve.engine.config._free_bytes", lambda device: 1 << 20)  # 1 MiB free
    with pytest.raises(ValueError, match="--kv-cache-tokens 2048 needs"):
        LLMEngine(EngineConfig(model=str(tiny_hf), kv_cache_tokens=2048))
    assert LLMEngine(EngineConfig(model=str(tiny_hf), kv_cache_tokens=1024)).kv_capacity_tokens == 1024  # 1 MiB


def _glm4_9b(vision: dict | None = None):
    from glm_serve.config import ModelConfig  # noqa: PLC0415

    return ModelConfig(model_type="chatglm", layout="chatglm", sandwich_norms=False, hidden_size=4096, num_layers=40,
                       num_heads=32, num_kv_heads=2, head_dim=128, intermediate_size=13696, vocab_size=151552,
                       rms_norm_eps=1.5625e-07, rope_theta=10000.0, rotary_dim=64, max_position=131072,
                       qkv_bias=True, vision=vision)


def test_the_activation_reserve_follows_the_step_limits():
    """The memory kept out of the KV cache on CUDA grows with --max-batch-tokens and --max-num-seqs (a fixed 2 GiB
    ran a 16K-token step at GLM-4-9B's sizes out of memory), and with GLM-4V's vision tower."""
    from glm_serve.engine.config import activation_reserve_bytes  # noqa: PLC0415

    mc = _glm4_9b()
    base = activation_reserve_bytes(mc, EngineConfig(), 2)
    assert 2.5 < base / 2**30 < 3.0  # the defaults (2048 tokens, 256 sequences) at bf16
    per_token = (4 * 13696 + 4 * 4096 + 32 * 128 + 2 * 2 * 128) * 2
    assert activation_reserve_bytes(mc, EngineConfig(max_batch_tokens=16384), 2) - base == 14336 * per_token
    assert activation_reserve_bytes(mc, EngineConfig(max_num_seqs=512, max_batch_tokens=2048), 2) - base \
        == 256 * 151552 * 40
    # Few sequences: a slice of prompt-logprob rows (bf16 logits, fp32, log-softmax) outweighs the sampler.
    few = activation_reserve_bytes(mc, EngineConfig(max_num_seqs=8), 2) - base
    assert few == 256 * 151552 * (2 + 8) - 256 * 151552 * 40
    vision = {"hidden_size": 1792, "image_size": 1120, "patch_size": 14, "intermediate_size": 15360}
    assert activation_reserve_bytes(_glm4_9b(vision), EngineConfig(), 2) - base == 6401 * (2 * 15360 + 6 * 1792) * 2


def test_the_cuda_kv_budget_leaves_the_reserve(monkeypatch):
    from glm_serve.engine.config import kv_cache_blocks  # noqa: PLC0415

    gib = 2**30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (100 * gib, 140 * gib))  # 40 GiB in use
    cuda = torch.device("cuda")
    blocks = kv_cache_blocks(EngineConfig(), 1 << 20, cuda, reserve=4 * gib)  # 1 MiB per token
    assert blocks == (int(140 * gib * 0.9) - 40 * gib - 4 * gib) // (1 << 20) // 16
    assert kv_cache_blocks(EngineConfig(), 1 << 20, cuda, reserve=10 * gib) == blocks - 6 * 1024 // 16
    with pytest.raises(ValueError, match="90.0 GiB kept for a step's activations.*--max-batch-tokens"):
        kv_cache_blocks(EngineConfig(), 1 << 20, cuda, reserve=90 * gib)


def test_a_cuda_kv_cache_tokens_leaves_the_reserve(monkeypatch):
    """--kv-cache-tokens on CUDA: a cache that fits in free memory but leaves less than the step's activation
    reserve is refused at start (a step would run out of memory mid-serving, or the warm-up with a traceback)."""
    from glm_serve.engine.config import kv_cache_blocks  # noqa: PLC0415

    gib = 2**30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (100 * gib, 140 * gib))
    cuda = torch.device("cuda")
    per_token = 1 << 20  # 1 MiB: 1024 tokens a GiB
    assert kv_cache_blocks(EngineConfig(kv_cache_tokens=96 * 1024), per_token, cuda, reserve=4 * gib) == 96 * 64
    with pytest.raises(ValueError, match="--kv-cache-tokens 98304 needs 96.0 GiB.*4.0 GiB kept for a step"):
        kv_cache_blocks(EngineConfig(kv_cache_tokens=96 * 1024), per_token, cuda, reserve=4 * gib + 1)


def _peak_step_bytes(ckpt, device: str, max_batch_tokens: int, max_num_seqs: int) -> tuple[int, int]:
    """(peak bytes the PyTorch allocator held beyond weights and KV cache while the engine ran a full
    max_batch_tokens prefill with prompt logprobs and then max_num_seqs sequences sampling with top-p, the
    estimate without its fixed margin). The peak is only measured on CUDA (0 elsewhere)."""
    from glm_serve.engine.config import _CUDA_MARGIN_BYTES, activation_reserve_bytes  # noqa: PLC0415
    from glm_serve.llm import LLM  # noqa: PLC0415
    from glm_serve.sampling_params import SamplingParams  # noqa: PLC0415

    llm = LLM(str(ckpt), device=device, kv_cache_tokens=2 * max_batch_tokens + 64 * max_num_seqs,
              max_batch_tokens=max_batch_tokens, max_num_seqs=max_num_seqs)
    eng = llm.engine
    estimate = activation_reserve_bytes(eng.model_config, eng.config, eng.dtype.itemsize) - _CUDA_MARGIN_BYTES
    cuda = device == "cuda"
    if cuda:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    long_prompt = [(11 * j) % 1500 + 3 for j in range(max_batch_tokens - 1)]
    eng.add_request("long", long_prompt, SamplingParams(max_tokens=1, prompt_logprobs=1, temperature=0.0))
    for i in range(max_num_seqs):
        eng.add_request(f"s{i}", [(7 * i + j) % 1500 + 3 for j in range(40)],
                        SamplingParams(max_tokens=3, temperature=1.0, top_p=0.9, seed=i, ignore_eos=True))
    while eng.has_unfinished():
        eng.step()
    if not cuda:
        return 0, estimate
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base, estimate


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_step_at_the_limits_stays_within_the_activation_reserve_on_gpu(tmp_path):
    """GLM-4-9B's widths and vocabulary (two layers: a step's activations do not pile up across layers in
    inference), bf16: a max_batch_tokens prefill that also scores its prompt, then 256 sequences sampling with
    top-p (a full sort of the vocabulary), stay within what activation_reserve_bytes keeps out of the KV cache,
    even before its fixed margin. If this fails, the KV cache sized from free memory can run a step out of
    memory: the estimate must grow."""
    from glm_serve.tiny import TinySpec, make_tiny  # noqa: PLC0415

    spec = TinySpec(preset="glm-4-9b")
    spec.layers = 2
    ckpt = make_tiny(tmp_path / "wide", spec, device="cuda")
    for max_batch_tokens in (2048, 8192):
        peak, estimate = _peak_step_bytes(ckpt, "cuda", max_batch_tokens, 256)
        print(f"max_batch_tokens {max_batch_tokens}: peak {peak / 2**30:.2f} GiB, estimate {estimate / 2**30:.2f} GiB")
        assert 0 < peak <= estimate, (max_batch_tokens, peak, estimate)
