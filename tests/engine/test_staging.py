"""StepUploader: a step's host arrays reach the device in one copy, as aligned typed views, and each upload's
values survive the next one (overlap scheduling uses step N's inputs while step N+1 is prepared)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from glm_serve.sampling_params import SamplingParams
from glm_serve.engine.staging import StepUploader
from glm_serve.llm import LLM


def _arrays(rng, k):
    """k random (array, dtype) pairs: int64 or int32 targets, sizes from empty to past the first buffer."""
    out = []
    for _ in range(k):
        n = int(rng.choice([0, 1, 3, 16, 255, 1000, 20_000]))
        out.append((rng.integers(-2**31, 2**31 - 1, size=n, dtype=np.int64), rng.choice([np.int64, np.int32])))
    return out


def _check(got, arrays):
    assert len(got) == len(arrays)
    for t, (a, dtype) in zip(got, arrays):
        assert t.dtype == (torch.int64 if dtype is np.int64 else torch.int32)
        assert t.data_ptr() % 16 == 0  # as aligned as a fresh allocation (Triton specialises on it)
        assert t.cpu().numpy().tolist() == a.astype(dtype).tolist()


@pytest.mark.parametrize("seed", range(4))
def test_uploads_are_exact_aligned_and_survive_the_next_upload(seed):
    rng = np.random.default_rng(seed)
    up = StepUploader(torch.device("cpu"), staged=True)  # the GPU's path: packed, one copy
    previous = None
    for _ in range(12):
        arrays = _arrays(rng, int(rng.integers(1, 12)))
        got = up.send(arrays)
        _check(got, arrays)
        if previous is not None:  # the upload before is still intact (two slots in turn)
            _check(*previous)
        previous = (got, arrays)
    assert up.num_uploads == 12


@pytest.mark.parametrize("config", [dict(kv_cache_tokens=1024),
                                    # chunked prefill beside decodes fed from the device, and preemption
                                    dict(kv_cache_tokens=96, max_batch_tokens=16)])
def test_a_decode_step_uploads_once(tiny_hf, config):
    """Every host array of a step (positions, slots, lengths, rows, new block-table entries, host input ids)
    crosses in one upload, through prefill, decode, block growth, chunks and preemption; the output is unchanged."""
    llm = LLM(str(tiny_hf), max_num_seqs=8, block_size=4, **config)
    eng = llm.engine
    eng.runner.uploader = StepUploader(eng.device, staged=True)  # as on a GPU (the CPU hands arrays over as they are)
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    for i in range(5):
        eng.add_request(f"u{i}", [(11 * i + j) % 1500 + 3 for j in range(6 + 3 * i)], params)
    tokens: dict[str, list[int]] = {f"u{i}": [] for i in range(5)}
    while eng.has_unfinished():
        before = eng.runner.uploader.num_uploads
        for out in eng.step():
            tokens[out.request_id] += out.outputs[0].token_ids
        assert eng.runner.uploader.num_uploads - before <= 1
    assert eng.runner.uploader._slots  # it staged
    assert (eng.scheduler.num_preemptions > 0) == (config["kv_cache_tokens"] < 1024)
    eng.runner.uploader = StepUploader(eng.device)
    solo = llm.generate([[(11 * i + j) % 1500 + 3 for j in range(6 + 3 * i)] for i in range(5)], params)
    assert [tokens[f"u{i}"] for i in range(5)] == [r.choices[0].token_ids for r in solo]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_uploads_queued_behind_a_busy_stream_keep_their_values():
    """The host writes upload N+2 while the copies of N and N+1 still wait behind device work: the slot's event
    must hold that write back, or upload N's copy would carry N+2's values."""
    rng = np.random.default_rng(0)
    up = StepUploader(torch.device("cuda"))
    sent, snapshots = [], []
    for _ in range(16):
        torch.cuda._sleep(2_000_000)  # keep the stream busy, so copies run long after the host queued them
        arrays = _arrays(rng, 4)
        got = up.send(arrays)
        snapshots.append([t.clone() for t in got])  # queued right behind this upload's copy
        sent.append(arrays)
    torch.cuda.synchronize()
    for got, arrays in zip(snapshots, sent):
        _check(got, arrays)
