"""Decode steps as CUDA graphs: one graph per padded batch size, replayed with the step's inputs copied into
static buffers. At small batch a 9B decode step is ~600 kernel launches; a replay costs one.

    static buffers (size N = largest bucket)      a step with B = 5 decoding sequences, bucket 8
    input_ids  [N]            <- ids[:5], 0 for rows 5..7
    positions  [N]            <- positions[:5], 0
    slot_mapping [N]          <- slots[:5], -1 (padding rows store nothing)
    seq_lens   [N]            <- seq_lens[:5], 0 (padding rows attend to nothing: the kernel writes zeros)
    block_tables [N, W]       <- block_tables[:5, :w] (columns past a row's length are never read)
    logits     [8, V]         -> rows 0..4 go to the sampler

Only the Triton backend can be captured: its decode kernel reads seq_lens and block tables on the device at
every replay, with a grid fixed by (bucket, KV heads, splits); the torch backend builds masks on the host side.
`eager=True` runs the very same padded static-buffer forward without capturing, which is how the CPU tests
check the padding and copy logic (a GPU run then checks capture and replay).
"""

from __future__ import annotations

import logging

import torch

from glm_serve.model.attention import AttnMetadata

log = logging.getLogger(__name__)

BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256)


class DecodeGraphs:
    def __init__(self, runner, max_batch: int, max_model_len: int, eager: bool = False):
        self.runner, self.eager = runner, eager
        self.sizes = [s for s in BUCKETS if s <= max_batch] or [max_batch]
        if self.sizes[-1] < max_batch:
            self.sizes.append(max_batch)
        n, w, dev = self.sizes[-1], runner.max_blocks_per_seq, runner.device
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=dev)  # [N]
        self.positions = torch.zeros(n, dtype=torch.int64, device=dev)  # [N]
        self.slot_mapping = torch.full((n,), -1, dtype=torch.int64, device=dev)  # [N]
        self.seq_lens = torch.zeros(n, dtype=torch.int32, device=dev)  # [N]
        self.block_tables = torch.zeros(n, w, dtype=torch.int32, device=dev)  # [N, W]
        self.cu_seqlens_q = torch.arange(n + 1, dtype=torch.int32, device=dev)  # [N + 1]: one token each
        self.token_to_seq = torch.arange(n, dtype=torch.int64, device=dev)  # [N]
        self.q_off = torch.zeros(n, dtype=torch.int64, device=dev)  # [N]
        self.max_model_len = max_model_len
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}  # size -> logits [size, V], written by each replay
        self.metas: dict[int, AttnMetadata] = {}

    def _meta(self, size: int) -> AttnMetadata:
        # max_seqlen_k = the context window: the split count is fixed per graph for the longest context; the
        # kernel derives each split's range from seq_lens on the device, so shorter contexts replay correctly.
        return AttnMetadata(
            cu_seqlens_q=self.cu_seqlens_q[:size + 1], seq_lens=self.seq_lens[:size],
            slot_mapping=self.slot_mapping[:size], block_tables=self.block_tables[:size], max_seqlen_q=1,
            max_seqlen_k=self.max_model_len, token_to_seq=self.token_to_seq[:size], token_q_offset=self.q_off[:size])

    def _forward(self, size: int) -> torch.Tensor:
        model = self.runner.model
        hidden = model(self.input_ids[:size], self.positions[:size], self.metas[size], self.runner.kv_caches)
        return model.compute_logits(hidden)  # [size, V]

    @torch.inference_mode()
    def capture(self) -> None:
        """Warm up (compiles kernels, allocates per-step scratch outside the graph) and capture every size,
        largest first so the smaller graphs share its memory pool."""
        pool = None
        for size in reversed(self.sizes):
            self.metas[size] = self._meta(size)
            self._forward(size)  # padding rows only: stores nothing, attends to nothing
            if self.eager:
                continue
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[size] = self._forward(size)
            pool = graph.pool()
            self.graphs[size] = graph
        if not self.eager:
            torch.cuda.synchronize()
        log.info("decode steps %s for batch sizes %s", "run padded (eager)" if self.eager else "captured as CUDA graphs",
                 self.sizes)

    def bucket(self, batch_size: int) -> int | None:
        return next((s for s in self.sizes if s >= batch_size), None)

    @torch.inference_mode()
    def run(self, input_ids, positions, meta: AttnMetadata) -> torch.Tensor | None:
        """Logits [B, V] of a decode-only step (every sequence brings one token), or None when this step is not
        one (prefill, mixed, or larger than the largest graph): the caller runs it eagerly then."""
        B = meta.num_seqs
        if meta.max_seqlen_q != 1 or input_ids.shape[0] != B:
            return None
        size = self.bucket(B)
        if size is None:
            return None
        w = meta.block_tables.shape[1]
        self.input_ids[:B].copy_(input_ids)
        self.input_ids[B:size].zero_()
        self.positions[:B].copy_(positions)
        self.positions[B:size].zero_()
        self.slot_mapping[:B].copy_(meta.slot_mapping)
        self.slot_mapping[B:size].fill_(-1)
        self.seq_lens[:B].copy_(meta.seq_lens)
        self.seq_lens[B:size].zero_()
        self.block_tables[:B, :w].copy_(meta.block_tables)
        if self.eager:
            self.metas[size].cache = None  # per-step scratch is rebuilt, as a fresh step would
            return self._forward(size)[:B]
        self.graphs[size].replay()
        return self.outputs[size][:B]
