"""The Triton attention backend: stores K/V and attends over the paged cache with glm_serve.kernels.

Same contract as `TorchPagedAttention` (see attention.py). A step where every sequence brings exactly one new
token runs the split-K decode kernel; any other step (prefill, chunked prefill, prefix hits, decode tokens
mixed with prefill chunks) runs the causal prefill kernel, which reads prefix and chunk alike from the cache.
"""

from __future__ import annotations

import torch

from glm_serve.kernels import DecodePartials, choose_num_splits, paged_decode, paged_prefill, store_kv
from glm_serve.model.attention import AttentionBackend, AttnMetadata, LayerCache


class TritonPagedAttention(AttentionBackend):
    """Paged attention with our Triton kernels. `decode_splits` fixes the number of context splits of the
    decode kernel (a CUDA-graph runner may want one value per captured graph); None chooses it per step from
    the batch size, meta.max_seqlen_k (rounded up to a power of two) and the GPU's SM count."""

    name = "triton"

    def __init__(self, decode_splits: int | None = None):
        if decode_splits is not None and decode_splits < 1:
            raise ValueError(f"decode_splits must be >= 1 or None, got {decode_splits}")
        self.decode_splits = decode_splits
        self._num_sms: dict[int, int] = {}  # CUDA device index -> SM count

    def check_supported(self, device: torch.device, dtype: torch.dtype) -> None:
        """Off CUDA the kernels only run in Triton's interpreter (TRITON_INTERPRET=1 before they are imported),
        which computes bfloat16 dots and adds wrongly without raising (docs/gpu.md): refuse both cases up front
        rather than fail every request ('0 active drivers') or generate garbage."""
        if device.type == "cuda":
            return
        from triton.runtime.interpreter import InterpretedFunction  # noqa: PLC0415

        from glm_serve.kernels import decode  # noqa: PLC0415

        if not isinstance(decode._decode_split_kernel, InterpretedFunction):
            raise ValueError(f"the triton attention backend needs a CUDA device; on {device.type} it runs only in "
                             "Triton's interpreter (TRITON_INTERPRET=1, slow, for tests): use --attention-backend torch")
        if dtype == torch.bfloat16:
            raise ValueError("the Triton interpreter computes bfloat16 wrongly: on the CPU use the triton attention "
                             "backend with float32 or float16, or --attention-backend torch")

    def check_fp8_cache(self, device: torch.device) -> None:
        """Triton converts to and from e4m3 (its fp8e4nv) only on sm_89 and later (Ada, Hopper)."""
        if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
            major, minor = torch.cuda.get_device_capability(device)
            raise ValueError(f"--kv-cache-dtype fp8 with the triton attention backend needs an sm_89 or newer GPU "
                             f"(Ada, Hopper); this one is sm_{major}{minor}: use --attention-backend torch, or leave "
                             "the cache in the model's dtype")

    def forward(self, q, k, v, cache: LayerCache, meta: AttnMetadata, scale: float) -> torch.Tensor:
        scales = dict(k_scale=cache.k_scale, v_scale=cache.v_scale)
        store_kv(k, v, cache.k, cache.v, meta.slot_mapping, **scales)
        if meta.max_seqlen_q == 1 and q.shape[0] == meta.num_seqs:
            num_splits, partials = self._decode_plan(q, cache.k, meta)
            return paged_decode(
                q, cache.k, cache.v, meta.seq_lens, meta.block_tables, scale, num_splits, partials=partials, **scales
            )  # [B, H, D]
        return paged_prefill(
            q, cache.k, cache.v, meta.cu_seqlens_q, meta.seq_lens, meta.block_tables, meta.max_seqlen_q, scale,
            **scales,
        )  # [T, H, D]

    def warm_up(self, cache: LayerCache, num_heads: int, max_seqlen_k: int, dtype: torch.dtype) -> list[int]:
        """Launch the decode kernel once per split count a step can choose here (2, 4, ... up to batch 1 at
        max_seqlen_k), over one empty sequence: NUM_SPLITS is a compile-time constant, so each count compiles its
        own kernel and reduce on first use (seconds), which the first long-context decode would otherwise wait
        for; the warm-up requests are short and reach 1 only. dtype: the queries' (the model's). -> the split counts
        launched."""
        if self.decode_splits is not None:
            return []  # fixed: the warm-up requests ran it
        k_cache, device = cache.k, cache.k.device
        top = choose_num_splits(1, k_cache.shape[2], max_seqlen_k, self._sm_count(device))
        q = torch.zeros(1, num_heads, k_cache.shape[3], dtype=dtype, device=device)  # [1, H, D]
        seq_lens = torch.zeros(1, dtype=torch.int32, device=device)  # an empty context: writes zeros
        tables = torch.zeros(1, 1, dtype=torch.int32, device=device)
        splits = [1 << i for i in range(1, top.bit_length())]
        for s in splits:
            paged_decode(q, k_cache, cache.v, seq_lens, tables, 1.0, s, k_scale=cache.k_scale, v_scale=cache.v_scale)
        return splits

    def _decode_plan(self, q, k_cache, meta: AttnMetadata) -> tuple[int, DecodePartials | None]:
        """Split count and partials scratch, computed once per step and shared by all layers through
        meta.cache (layers run one after another on one stream, so one scratch buffer serves them all)."""
        if meta.cache is None:
            meta.cache = {}
        batch, num_heads, head_dim = q.shape
        key = ("triton_decode", batch, num_heads, head_dim)
        if key not in meta.cache:
            splits = self.decode_splits
            if splits is None:
                splits = choose_num_splits(batch, k_cache.shape[2], meta.max_seqlen_k, self._sm_count(q.device))
            partials = DecodePartials.empty(batch, num_heads, head_dim, splits, q.device) if splits > 1 else None
            meta.cache[key] = (splits, partials)
        return meta.cache[key]

    def _sm_count(self, device: torch.device) -> int:
        if device.type != "cuda":
            return 1  # Triton interpreter on the CPU: one program at a time, splitting only adds work
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index not in self._num_sms:
            self._num_sms[index] = torch.cuda.get_device_properties(index).multi_processor_count
        return self._num_sms[index]
