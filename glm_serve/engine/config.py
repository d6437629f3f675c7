"""EngineConfig: every engine setting in one place, validated once; KV-cache sizing is derived here."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from glm_serve.config import ModelConfig

log = logging.getLogger(__name__)

# Without --kv-cache-tokens the CPU gets a cache of this many bytes (it shares RAM with everything else).
_CPU_KV_BYTES = 1 << 30


@dataclass
class EngineConfig:
    model: str = "demo"  # folder, hub id, or "demo"
    device: str | None = None  # cpu | cuda; None = cuda when available
    dtype: str = "auto"  # auto (bf16 on cuda, fp16 before sm_80; fp32 on cpu) | float32 | bfloat16 | float16
    quantization: str | None = None  # None | nf4 | int8
    rope_theta: float | None = None  # override the checkpoint's RoPE base
    block_size: int = 16
    kv_cache_tokens: int | None = None  # KV capacity in tokens; None = from memory
    # auto: the model's dtype | fp8: float8_e4m3fn with a scale per (token, KV head) row, half bf16's bytes
    kv_cache_dtype: str = "auto"
    gpu_memory_utilization: float = 0.9  # CUDA: share of total memory the process may use
    max_model_len: int | None = None  # None = the checkpoint's context, capped by the cache
    max_num_seqs: int = 256
    max_batch_tokens: int = 2048
    chat_template: str | None = None  # a jinja template file replacing the checkpoint's (--chat-template)
    enable_prefix_caching: bool = True
    attention_backend: str = "auto"  # auto (triton on cuda, torch on cpu) | torch | triton
    seed: int = 0  # default generator (unseeded requests)
    # Decode steps as CUDA graphs (triton backend). Not yet measured or verified on a GPU, so off by default;
    # on the CPU it runs the same padded static-buffer path eagerly (what the CPU tests check).
    cuda_graphs: bool = False
    # With the triton attention backend, a layer's small ops (norms with their residual adds, RoPE, silu * up) as
    # fused Triton kernels (glm_serve/kernels/fused.py) instead of several eager PyTorch launches each.
    fused_ops: bool = True
    # Schedule and prepare step N+1 while the device runs step N (glm_serve/engine/engine.py).
    overlap_scheduling: bool = True
    # Streamed requests get an output every this many tokens per choice (and at the end); above 1, fewer
    # outputs (less host work per token under heavy load) for burstier streams. The first token always goes alone.
    stream_interval: int = 1

    def __post_init__(self):
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size (--block-size) must be a power of two, got {self.block_size}")
        if self.kv_cache_tokens is not None and self.kv_cache_tokens < self.block_size:
            raise ValueError(f"kv_cache_tokens (--kv-cache-tokens) must be >= block_size ({self.block_size}), "
                             f"got {self.kv_cache_tokens}")
        if self.max_model_len is not None and self.max_model_len < 2:  # 0 is no "default": say so before the load
            raise ValueError(f"max_model_len (--max-model-len) must be >= 2 (a prompt and one generated token), "
                             f"got {self.max_model_len}")
        if self.max_model_len is not None and self.kv_cache_tokens is not None and \
                self.max_model_len > self.kv_cache_tokens // self.block_size * self.block_size:
            raise ValueError(f"max_model_len (--max-model-len) {self.max_model_len} is more than the KV cache holds "
                             f"({self.kv_cache_tokens // self.block_size * self.block_size} tokens of "
                             f"--kv-cache-tokens {self.kv_cache_tokens} in {self.block_size}-token blocks)")
        if not 0.05 <= self.gpu_memory_utilization <= 1.0:
            raise ValueError("gpu_memory_utilization (--gpu-memory-utilization) must be in [0.05, 1], "
                             f"got {self.gpu_memory_utilization}")
        if self.max_num_seqs < 1 or self.max_batch_tokens < self.max_num_seqs:
            raise ValueError("max_batch_tokens (--max-batch-tokens) must be >= max_num_seqs (--max-num-seqs) >= 1")
        if self.stream_interval < 1:
            raise ValueError(f"stream_interval (--stream-interval) must be >= 1, got {self.stream_interval}")
        if self.kv_cache_dtype not in ("auto", "fp8"):
            raise ValueError(f"kv_cache_dtype (--kv-cache-dtype) must be auto or fp8, got {self.kv_cache_dtype!r}")
        if self.attention_backend not in ("auto", "torch", "triton"):
            raise ValueError("attention_backend (--attention-backend) must be auto, torch or triton, "
                             f"got {self.attention_backend!r}")

    def resolved_device(self) -> torch.device:
        return resolve_device(self.device)

    def resolved_backend(self, device: torch.device) -> str:
        if self.attention_backend != "auto":
            return self.attention_backend
        return "triton" if device.type == "cuda" else "torch"


def resolve_device(name: str | None) -> torch.device:
    """--device: None = cuda when available; a CUDA device that is not there is a ValueError, not torch's
    AssertionError or 'invalid device ordinal' at the first allocation."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--device cuda asked for, but no CUDA device is available")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                             f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return dev


# CUDA memory beside weights, KV cache and a step's tensors: allocator fragmentation, cuBLAS workspaces, CUDA
# graph pools, attention scratch (decode split partials).
_CUDA_MARGIN_BYTES = 1 << 30
# Prompt-logprob rows whose full-vocab logits exist at once (engine/prompt_logprobs.py computes a chunk's rows
# in slices of this many): GLM-4's 151,552-entry vocab makes a 2K-token chunk's fp32 logits 1.2 GB otherwise.
PROMPT_LOGPROB_ROWS = 256
# What the sampler holds at once per [rows, vocab] element at its peak (engine/sampler.py, top-p with logprobs):
# the model's logits (up to 4) and their fp32 copy (4), the raw log-softmax kept for logprobs (4), the full
# sort's values (4) and int64 order (8), their softmax (4), its cumsum and the mass before each (4 + 4), the drop
# mask (1): 37, rounded up.
_SAMPLER_BYTES_PER_LOGIT = 40


def activation_reserve_bytes(mc: ModelConfig, cfg: EngineConfig, dtype_bytes: int) -> int:
    """What one step may allocate at its peak on top of weights and KV cache, from the step's limits, so that
    a bigger --max-batch-tokens or --max-num-seqs shrinks the KV cache instead of running out of memory mid-step:

      max_batch_tokens x the MLP's peak (gate_up, 2F; silu(gate), F; its product with up, F) + the residual
      stream and attention in/out
    + max_num_seqs x vocab x _SAMPLER_BYTES_PER_LOGIT: the sampler's worst case (top-p with logprobs); or,
      where more, a slice of prompt-logprob rows (PROMPT_LOGPROB_ROWS x vocab: logits in the model's dtype, in
      fp32 and their log-softmax), made after the step's activations
    + one image through the vision tower (GLM-4V): its patches' MLP and residual activations
    + a fixed margin."""
    per_token = (4 * mc.intermediate_size + 4 * mc.hidden_size + mc.q_size + 2 * mc.kv_size) * dtype_bytes
    step = cfg.max_batch_tokens * per_token
    per_vocab_entry = max(cfg.max_num_seqs * _SAMPLER_BYTES_PER_LOGIT, PROMPT_LOGPROB_ROWS * (dtype_bytes + 8))
    sampler = per_vocab_entry * mc.vocab_size
    vision = 0
    if mc.vision:
        v = mc.vision
        patches = (v.get("image_size", 1120) // v.get("patch_size", 14)) ** 2 + 1
        vision = patches * (2 * v.get("intermediate_size", 15360) + 6 * v.get("hidden_size", 1792)) * dtype_bytes
    return step + sampler + vision + _CUDA_MARGIN_BYTES


def kv_cache_blocks(cfg: EngineConfig, bytes_per_token: int, device: torch.device, reserve: int = 2 << 30) -> int:
    """Blocks of KV cache: --kv-cache-tokens when given; on CUDA what fits in gpu_memory_utilization of the
    device after the weights, minus `reserve` (activation_reserve_bytes); on the CPU a fixed budget."""
    if cfg.kv_cache_tokens is not None:
        tokens = cfg.kv_cache_tokens
        need, free = tokens // cfg.block_size * cfg.block_size * bytes_per_token, _free_bytes(device)
        # On CUDA the step's activations come from the same memory, after the cache: keep their reserve free too.
        kept = reserve if device.type == "cuda" else 0
        if free is not None and need > free - kept:  # else an allocator traceback or, on the CPU, the OOM killer
            also = f" ({kept / 2**30:.1f} GiB kept for a step's activations)" if kept else ""
            raise ValueError(f"--kv-cache-tokens {tokens} needs {need / 2**30:.1f} GiB of KV cache but only "
                             f"{free / 2**30:.1f} GiB is free on {device.type} after the weights{also}: lower it")
    elif device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        used = total - free
        budget = int(total * cfg.gpu_memory_utilization) - used - reserve
        if budget <= 0:
            raise ValueError(f"no memory left for the KV cache: {used / 2**30:.1f} GiB in use of "
                             f"{total / 2**30:.1f} GiB and {reserve / 2**30:.1f} GiB kept for a step's "
                             "activations; raise --gpu-memory-utilization, lower --max-batch-tokens or "
                             "--max-num-seqs, or quantize")
        log.info("KV cache: %.1f GiB (%.1f GiB kept for a step's activations)", budget / 2**30, reserve / 2**30)
        tokens = budget // bytes_per_token
    else:
        tokens = _CPU_KV_BYTES // bytes_per_token
    blocks = tokens // cfg.block_size
    if blocks < 1:
        raise ValueError("the KV cache would hold less than one block")
    return blocks


def _free_bytes(device: torch.device) -> int | None:
    """Memory the KV cache may take now: the device's free memory, or the host's MemAvailable (None if unknown)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None
