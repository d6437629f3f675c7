"""ModelRunner: owns the model, the paged KV cache and the step's device buffers; turns one SchedulerOutput into
one flat batch, runs the model and returns the logits of the rows to sample (and, only in a step holding prompt
positions of a request that asked for prompt logprobs, queues those: engine/prompt_logprobs.py).

Per-sequence block tables live in a persistent host array (one row per running sequence) that is only
appended to as sequences grow, mirrored on the device: a step uploads the entries written since the last one
(O(new blocks), about B / block_size per decode step) and gathers its rows on the device, so nothing the size
of the batch's contexts crosses to the GPU (256 sequences at 128K would be 8 MB a step); positions and slot
mapping are computed with vectorised numpy, never a Python loop over tokens.

    row r of block_table_host:  [b0 b1 b2 ... b_{n-1} 0 0 0 ...]   n = blocks known for the sequence in row r
    block_table_dev:            the same, on the device (entries past n are stale: never read)
    step batch (B sequences) :  block_tables = block_table_dev[rows_of_step, :width]   (a device gather)

Overlap scheduling: a decode whose input token was sampled by the previous step, still on the device
(Sequence.num_inflight), takes it from that step's token tensor with one device-side gather, so step N+1 is
queued before step N's tokens ever reach the host.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from glm_serve.engine import prompt_logprobs
from glm_serve.engine.prompt_logprobs import PromptRows
from glm_serve.engine.scheduler import SchedulerOutput
from glm_serve.engine.staging import StepUploader
from glm_serve.model.attention import AttnMetadata, LayerCache
from glm_serve.model.glm import GlmForCausalLM

log = logging.getLogger(__name__)


@dataclass
class StepBatch:
    """The flat batch of one step, as the model sees it (everything on the model's device)."""

    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    meta: AttnMetadata
    logits_indices: torch.Tensor  # [S] int64: flat rows whose logits are sampled (last new token of a seq)
    sample_seq_ids: list[int]  # [S]: which sequence each sampled row belongs to
    prompt_rows: PromptRows | None = None  # rows scoring prompt tokens (prompt logprobs); None for most steps


@dataclass
class InflightTokens:
    """The tokens one step sampled, on the device: the next step's in-flight inputs are read from here."""

    seq_ids: list[int]  # [S] the sequence each row belongs to
    token_ids: torch.Tensor  # [S] int64, on the model's device

    def rows(self, seq_ids: list[int]) -> np.ndarray:
        where = {sid: r for r, sid in enumerate(self.seq_ids)}
        return np.array([where[sid] for sid in seq_ids], dtype=np.int64)


class ModelRunner:
    def __init__(self, model: GlmForCausalLM, num_blocks: int, block_size: int, max_num_seqs: int,
                 max_model_len: int, device: torch.device, kv_dtype: torch.dtype, fp8_cache: bool = False):
        self.model, self.device = model, device
        self.block_size, self.num_blocks = block_size, num_blocks
        cfg = model.config
        # Per layer K and V: [num_blocks, block_size, num_kv_heads, head_dim], in kv_dtype or fp8 with scales
        self.kv_caches = [LayerCache.allocate(num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim, kv_dtype,
                                              device, fp8_cache) for _ in range(cfg.num_layers)]
        self.max_blocks_per_seq = (max_model_len + block_size - 1) // block_size
        # Rows are handed out to sequences while they hold blocks. [max_num_seqs, max_blocks_per_seq] int32
        self.block_table_host = np.zeros((max_num_seqs, self.max_blocks_per_seq), dtype=np.int32)
        self.block_table_dev = torch.zeros((max_num_seqs, self.max_blocks_per_seq), dtype=torch.int32, device=device)
        self._dirty: list[tuple[int, int, int]] = []  # (row, first, end) columns written since the last upload
        self.row_len = [0] * max_num_seqs  # blocks written into each row (a list: read per sequence per step)
        self.row_of: dict[int, int] = {}  # seq_id -> row
        self.free_rows = list(range(max_num_seqs - 1, -1, -1))
        self.pin = device.type == "cuda"
        self.uploader = StepUploader(device)  # a step's host arrays reach the device in one copy
        self.graphs = None  # DecodeGraphs, when the engine enables CUDA graphs (glm_serve/engine/cuda_graphs.py)
        self.num_fed_tokens = 0  # input tokens taken from the previous step on the device (overlap scheduling)
        self._steady_rows: _SteadyRows | None = None  # the table rows of the last steady decode step's sequences

    def release(self, seq_id: int) -> None:
        """The sequence gave its blocks back (finished, aborted or preempted): free its table row."""
        row = self.row_of.pop(seq_id, None)
        self._steady_rows = None
        if row is not None:
            self.row_len[row] = 0
            self.free_rows.append(row)

    def _row(self, seq) -> int:
        row = self.row_of.get(seq.seq_id)
        if row is None:
            row = self.row_of[seq.seq_id] = self.free_rows.pop()
            self.row_len[row] = 0
        n, have = len(seq.block_ids), self.row_len[row]
        if n < have:  # blocks were taken back (preemption reused the row): rewrite it
            have = 0
        if n > have:
            self.block_table_host[row, have:n] = seq.block_ids[have:n]
            self.row_len[row] = n
            self._dirty.append((row, have, n))
        return row

    def _upload_tables(self) -> None:
        """Bring block_table_dev up to date now (a step does it within its one upload: _batch)."""
        entries = self._table_entries()
        if entries is not None:
            self._apply_table_entries(*self.uploader.send([(entries[0], np.int64), (entries[1], np.int32)]))

    def _table_entries(self) -> tuple[np.ndarray, np.ndarray] | None:
        """The block-table entries written since the last upload: ([U] flat index, [U] int32 block id), or None."""
        if not self._dirty:
            return None
        d = np.array(self._dirty, dtype=np.int64)  # [U, 3] (row, first, end)
        self._dirty.clear()
        lens = d[:, 2] - d[:, 1]  # [U] entries per run (mostly 1: a decode's new block)
        ends = np.cumsum(lens)
        # [sum(lens)] flat index of every written entry: each run's start, counted up within the run
        flat = np.repeat(d[:, 0] * self.max_blocks_per_seq + d[:, 1] - ends + lens, lens) + np.arange(ends[-1])
        return flat, self.block_table_host.reshape(-1)[flat]

    def _apply_table_entries(self, flat: torch.Tensor, values: torch.Tensor) -> None:
        self.block_table_dev.view(-1).index_copy_(0, flat, values)  # one scatter of the new entries

    def prepare(self, out: SchedulerOutput, inflight: InflightTokens | None = None,
                prompt_wanted: dict[int, int] | None = None) -> StepBatch:
        """inflight: the previous step's tokens, when it may still be running (see the module docstring).
        prompt_wanted: seq id -> k of the sequences recording prompt logprobs (PromptLogprobRecorder.wanted);
        a steady decode step never holds prompt positions, so it skips them."""
        steady = self._steady_decode(out, inflight)
        if steady is not None:
            return steady
        sched = out.scheduled
        B = len(sched)
        starts_l, n_l, rows_l, ids, sample_l, sample_ids = [], [], [], [], [], []
        fed_at, fed_seqs = [], []  # flat rows whose token is in flight, and their sequences
        row_of, row_len = self.row_of, self.row_len
        for s in sched:  # the one pass over sequences; everything per token below is numpy
            seq, start, n = s.seq, s.start, s.num_new_tokens
            starts_l.append(start)
            n_l.append(n)
            row = row_of.get(seq.seq_id)
            rows_l.append(row if row is not None and row_len[row] == len(seq.block_ids) else self._row(seq))
            if n == 1:  # decode (or a one-token chunk): the token at `start`
                out_ids = seq.output_token_ids
                if start >= len(seq.prompt_token_ids) + len(out_ids):  # still on the device
                    fed_at.append(len(ids))
                    fed_seqs.append(seq.seq_id)
                    ids.append(0)
                else:
                    ids.append(out_ids[-1] if s.sample and out_ids else seq.token_at(start))
            else:
                ids.extend(seq.token_slice(start, start + n))
            sample_l.append(s.sample)
            if s.sample:
                sample_ids.append(seq.seq_id)
        starts = np.array(starts_l, dtype=np.int64)  # [B]
        n_new = np.array(n_l, dtype=np.int64)  # [B]
        rows = np.array(rows_l, dtype=np.int64)  # [B]
        cu = np.zeros(B + 1, dtype=np.int64)
        np.cumsum(n_new, out=cu[1:])
        T = int(cu[-1])
        token_to_seq = np.repeat(np.arange(B), n_new)  # [T]
        q_off = np.arange(T) - cu[:-1][token_to_seq]  # [T]
        index = starts[token_to_seq] + q_off  # [T] slot index of each token in its sequence
        logits_idx = cu[1:][np.array(sample_l, dtype=bool)] - 1  # [S]
        input_ids, fed = self._input_ids(ids, fed_at, fed_seqs, inflight)  # [T]
        self._steady_rows = None
        batch = self._batch(mm_spans(sched), starts, n_new, rows, cu, token_to_seq, q_off, index, input_ids,
                            logits_idx, sample_ids, fed)
        if prompt_wanted:
            # (rare: only steps scoring prompt tokens; its arrays go over apart, outside the step's one upload)
            batch.prompt_rows = prompt_logprobs.plan(sched, cu, prompt_wanted, self._to)
        return batch

    def _steady_decode(self, out: SchedulerOutput, inflight: InflightTokens | None) -> StepBatch | None:
        """The batch of a step that decodes exactly the sequences the step still in flight sampled, in the same
        order: the steady state of overlap scheduling. Every input is that step's token, already on the device,
        and every row is sampled, so only the starts and the table rows are read per sequence. None otherwise.
        """
        sched = out.scheduled
        B = len(sched)
        if inflight is None or out.num_batched_tokens != B or len(inflight.seq_ids) != B:
            return None
        seq_ids = [s.seq.seq_id for s in sched]
        if seq_ids != inflight.seq_ids:
            return None
        # Each sequence sampled in the step in flight, whose token has not landed: its one new token (the start)
        # is that token, so the inputs are inflight.token_ids as they are.
        rows = self._steady_rows
        if rows is None or rows.seq_ids != seq_ids:  # the same sequences keep the same rows until release()
            rows = self._steady_rows = _SteadyRows.of(sched, seq_ids, self.row_of, self.row_len)
        starts = np.array([s.start for s in sched], dtype=np.int64)  # [B]
        # Rows not covering the slot written this step: the sequence took a new block (1 step in block_size).
        for b in np.flatnonzero(rows.have <= starts // self.block_size).tolist():
            rows.have[b] = self.row_len[self._row(sched[b].seq)]
        self.num_fed_tokens += B
        ar = np.arange(B + 1, dtype=np.int64)
        return self._batch(rows.spans, starts, np.ones(B, dtype=np.int64), rows.rows, ar, ar[:B],
                           np.zeros(B, dtype=np.int64), starts, inflight.token_ids, ar[:B], seq_ids)

    def _batch(self, spans: list[tuple[int, tuple[int, int]]], starts: np.ndarray, n_new: np.ndarray,
               rows: np.ndarray, cu: np.ndarray, token_to_seq: np.ndarray, q_off: np.ndarray, index: np.ndarray,
               input_ids: np.ndarray | torch.Tensor, logits_idx: np.ndarray, sample_ids: list[int],
               fed: _Fed | None = None) -> StepBatch:
        """The StepBatch from the step's host arrays: [B] starts, n_new, rows; [B + 1] cu; [T] token_to_seq,
        q_off, index (slot index of each token in its sequence); [S] logits_idx. spans: mm_spans(sched).
        input_ids and fed: from _input_ids. Everything goes to the device in one upload (engine/staging.py)."""
        positions = self._positions(spans, starts.shape[0], index, token_to_seq)  # [T]
        seq_lens = starts + n_new  # [B]
        width = int((seq_lens.max() + self.block_size - 1) // self.block_size)
        blk = self.block_table_host[rows[token_to_seq], index // self.block_size].astype(np.int64)  # [T]
        slots = blk * self.block_size + index % self.block_size  # [T]
        arrays = [(rows, np.int64), (cu, np.int32), (seq_lens, np.int32), (slots, np.int64), (token_to_seq, np.int64),
                  (q_off, np.int64), (positions, np.int64), (logits_idx, np.int64)]
        host_ids = isinstance(input_ids, np.ndarray)
        if host_ids:
            arrays.append((input_ids, np.int64))
        if fed is not None:
            arrays += [(fed.at, np.int64), (fed.src, np.int64)]
        entries = self._table_entries()
        if entries is not None:
            arrays += [(entries[0], np.int64), (entries[1], np.int32)]
        dev = self.uploader.send(arrays)
        rows_d, cu_d, seq_lens_d, slots_d, token_to_seq_d, q_off_d, positions_d, logits_idx_d = dev[:8]
        k = 8
        if host_ids:
            input_ids, k = dev[k], k + 1
        if fed is not None:
            input_ids.index_copy_(0, dev[k], fed.token_ids[dev[k + 1]])  # the in-flight tokens, gathered
            k += 2
        if entries is not None:
            self._apply_table_entries(dev[k], dev[k + 1])
        tables = self.block_table_dev[:, :width].index_select(0, rows_d)  # [B, width] on the device
        meta = AttnMetadata(
            cu_seqlens_q=cu_d,
            seq_lens=seq_lens_d,
            slot_mapping=slots_d,
            block_tables=tables,
            max_seqlen_q=int(n_new.max()),
            max_seqlen_k=int(seq_lens.max()),
            token_to_seq=token_to_seq_d,
            token_q_offset=q_off_d,
            host_q_lens=n_new,
            host_seq_lens=seq_lens,
            host_cu_seqlens_q=cu,
        )
        return StepBatch(input_ids=input_ids, positions=positions_d, meta=meta, logits_indices=logits_idx_d,
                         sample_seq_ids=sample_ids)

    def _input_ids(self, ids: list[int], fed_at: list[int], fed_seqs: list[int],
                   inflight: InflightTokens | None) -> tuple[np.ndarray | torch.Tensor, _Fed | None]:
        """The step's [T] input ids: on the host (int64), with the positions of in-flight tokens to gather from
        `inflight` once on the device (_Fed); or, when every input is in flight in the same order (a steady
        decode), the previous step's token tensor itself."""
        if not fed_at:
            return np.array(ids, dtype=np.int64), None
        if inflight is None:
            raise RuntimeError("a scheduled token is still in flight but the previous step's tokens are gone")
        self.num_fed_tokens += len(fed_at)
        if len(fed_at) == len(ids) and fed_seqs == inflight.seq_ids:
            return inflight.token_ids, None  # steady decode: every input is last step's token, in the same order
        return np.array(ids, dtype=np.int64), _Fed(np.array(fed_at, dtype=np.int64), inflight.rows(fed_seqs),
                                                   inflight.token_ids)

    @staticmethod
    def _positions(spans, B: int, index: np.ndarray, token_to_seq: np.ndarray) -> np.ndarray:
        """RoPE positions: the slot index, except in GLM-4V prompts, whose image vectors all share one position
        and whose later tokens follow the un-expanded prompt (see Sequence.mm_span)."""
        if not spans:
            return index
        lo = np.full(B, np.iinfo(np.int64).max // 2, dtype=np.int64)
        hi = lo.copy()
        for b, (start, end) in spans:
            lo[b], hi[b] = start, end
        s, e = lo[token_to_seq], hi[token_to_seq]
        shift = e - s - 3  # n - 1 for n image vectors
        return np.where(index <= s, index, np.where(index < e - 1, s + 1, index - shift))

    def _to(self, a: np.ndarray) -> torch.Tensor:
        # Pinned, so the copy never makes the host wait for the step still running on the GPU.
        t = torch.from_numpy(a)
        if self.pin:
            t = t.pin_memory()
        return t.to(self.device, non_blocking=True)

    @torch.inference_mode()
    def execute(self, batch: StepBatch, mm: list[tuple[int, torch.Tensor]] | None = None) -> torch.Tensor:
        """-> logits [S, vocab] float32 for the rows to sample, in `batch.sample_seq_ids` order; with
        `batch.prompt_rows`, their logprobs are queued too (into prompt_rows.result).
        mm: GLM-4V image embeddings to put in place of token embeddings: (first flat row, [k, hidden])."""
        if self.graphs is not None and not mm and batch.prompt_rows is None:
            logits = self.graphs.run(batch.input_ids, batch.positions, batch.meta)  # [B, V] or None
            if logits is not None:  # a decode-only step: flat rows are sequences
                return logits[batch.logits_indices]
        embeds = None
        if mm:
            embeds = self.model.embed(batch.input_ids)  # [T, hidden]
            for row, vectors in mm:
                embeds[row:row + vectors.shape[0]] = vectors.to(embeds.dtype)
        hidden = self.model(batch.input_ids, batch.positions, batch.meta, self.kv_caches, embeds)  # [T, hidden]
        if batch.prompt_rows is not None:
            prompt_logprobs.compute(self.model, hidden, batch.prompt_rows)
        return self.model.compute_logits(hidden[batch.logits_indices])


def mm_spans(sched) -> list[tuple[int, tuple[int, int]]]:
    """(batch index, Sequence.mm_span) of the step's GLM-4V sequences."""
    return [(b, s.seq.mm_span) for b, s in enumerate(sched) if s.seq.mm_span is not None]


@dataclass
class _Fed:
    """Inputs of a step that are tokens the previous step sampled, still on the device (see _input_ids)."""

    at: np.ndarray  # [F] int64: flat rows of the step whose input is in flight
    src: np.ndarray  # [F] int64: the row of each in `token_ids`
    token_ids: torch.Tensor  # [S'] int64 on the device: the previous step's sampled tokens


@dataclass
class _SteadyRows:
    """What steady decode steps of one set of sequences share: their table rows (kept until a release)."""

    seq_ids: list[int]  # [B]
    rows: np.ndarray  # [B] int64 table row of each sequence
    have: np.ndarray  # [B] int64 blocks written into each row (as row_len, updated with it)
    spans: list  # mm_spans of the step

    @classmethod
    def of(cls, sched, seq_ids: list[int], row_of: dict[int, int], row_len: list[int]) -> _SteadyRows:
        rows = [row_of[sid] for sid in seq_ids]
        return cls(seq_ids, np.array(rows, dtype=np.int64), np.array([row_len[r] for r in rows], dtype=np.int64),
                   mm_spans(sched))
