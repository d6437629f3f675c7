"""Tests the batched sampler and SamplingParams against plain per-row NumPy/Python references."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from glm_serve.engine import sampler as sampler_module
from glm_serve.engine.sampler import Sampler, SamplingBatch, SamplingRow, make_generator, unpack_bitmask
from glm_serve.sampling_params import SamplingParams

SHAPES = [(1, 7), (5, 100), (8, 1000), (3, 151552)]


def _sample(logits: torch.Tensor, rows: list[SamplingRow], bitmask: torch.Tensor | None = None):
    batch = SamplingBatch.build(rows, logits.shape[1], "cpu", token_bitmask=bitmask)
    return Sampler()(logits.clone(), batch)


def _rows(*params: SamplingParams) -> list[SamplingRow]:
    return [SamplingRow(p, generator=make_generator(p.seed, "cpu") if p.seed is not None else None)
            for p in params]


def _ref_allowed(logits: np.ndarray, p: SamplingParams, tol: float = 1e-4):
    """One row in float64: (allowed mask, unsure mask, renormalised probs).

    `unsure` marks tokens within `tol` of a cut (float32 rounding may decide either way): both are accepted.
    """
    z = logits.astype(np.float64) / p.temperature
    probs = np.exp(z - z.max())
    probs /= probs.sum()
    allowed = np.ones(len(z), dtype=bool)
    unsure = np.zeros(len(z), dtype=bool)
    order = np.argsort(-probs, kind="stable")
    if 0 < p.top_k < len(z):
        allowed[order[p.top_k:]] = False
        if z[order[p.top_k - 1]] - z[order[p.top_k]] < tol:
            unsure[order[p.top_k - 1:p.top_k + 1]] = True
    if p.top_p < 1.0:
        kept = np.where(allowed, probs, 0.0)
        kept = kept[order] / kept.sum()
        before = np.cumsum(kept) - kept  # mass of the more likely survivors
        survivor = allowed[order]
        unsure[order[survivor & (np.abs(before - p.top_p) < tol)]] = True
        allowed[order[survivor & (before >= p.top_p)]] = False
    if p.min_p > 0.0:
        kept = np.where(allowed, probs, 0.0)
        threshold = p.min_p * kept.max()
        unsure |= allowed & (np.abs(kept - threshold) < tol * kept.max())
        allowed &= kept >= threshold
    final = np.where(allowed, probs, 0.0)
    return allowed, unsure, final / final.sum()


def _random_params(gen: np.random.Generator, vocab: int) -> SamplingParams:
    return SamplingParams(temperature=float(gen.choice([0.5, 1.0, 1.3])),
                          top_k=int(gen.choice([0, 1, 5, min(vocab, 40), min(vocab, 2000)])),
                          top_p=float(gen.choice([1.0, 0.95, 0.6, 0.2])),
                          min_p=float(gen.choice([0.0, 0.0, 0.05, 0.3])))


@pytest.mark.parametrize("n,vocab", SHAPES)
def test_greedy_is_argmax(n, vocab):
    logits = torch.randn(n, vocab) * 3
    out = _sample(logits, _rows(*[SamplingParams(temperature=0.0)] * n))
    assert out.token_ids.dtype == torch.int64
    assert torch.equal(out.token_ids, logits.argmax(-1))
    assert out.logprobs is None and out.top_ids is None


def test_all_greedy_step_touches_nothing_but_argmax():
    batch = SamplingBatch.build(_rows(SamplingParams(temperature=0.0), SamplingParams(temperature=0.0)), 50, "cpu")
    assert batch.all_greedy and batch.temperature is None and batch.penalty_rows is None
    assert batch.token_bitmask is None and batch.min_tokens_block is None and batch.top_k is None


@pytest.mark.parametrize("n,vocab", SHAPES)
def test_filters_never_sample_outside_allowed_set(n, vocab):
    gen = np.random.default_rng(vocab + n)
    params = [_random_params(gen, vocab) for _ in range(n)]
    logits = torch.randn(n, vocab) * 2
    refs = [_ref_allowed(logits[i].numpy(), p) for i, p in enumerate(params)]
    rows = _rows(*params)
    batch = SamplingBatch.build(rows, vocab, "cpu")
    for _ in range(30 if vocab < 10000 else 5):
        tokens = Sampler()(logits.clone(), batch).token_ids
        for i in range(n):
            token = int(tokens[i])
            assert refs[i][0][token] or refs[i][1][token], f"row {i} ({params[i]}) sampled disallowed {token}"


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0.7),
    SamplingParams(top_k=3),
    SamplingParams(top_p=0.8),
    SamplingParams(min_p=0.15, temperature=1.5),
    SamplingParams(top_k=6, top_p=0.9, min_p=0.05, temperature=0.8),
    SamplingParams(top_k=5000, top_p=0.7),  # max_top_k above the topk() limit: the sort path
])
def test_empirical_frequencies_match_renormalised_distribution(params):
    vocab, draws = 12, 20000
    row_logits = torch.randn(vocab) * 1.5
    allowed, unsure, ref_probs = _ref_allowed(row_logits.numpy(), params)
    assert not unsure.any()
    tokens = _sample(row_logits.expand(draws, vocab).contiguous(), _rows(*[params] * draws)).token_ids
    freq = np.bincount(tokens.numpy(), minlength=vocab) / draws
    assert (freq[~allowed] == 0).all()
    bound = 5 * np.sqrt(ref_probs * (1 - ref_probs) / draws) + 1e-3
    assert (np.abs(freq - ref_probs) <= bound).all(), (freq, ref_probs)


def test_seeded_row_distribution_over_steps():
    # One seeded row drawing from its own generator step after step still samples the right distribution.
    vocab, steps = 6, 3000
    params = SamplingParams(seed=7, top_p=0.9)
    row_logits = torch.randn(1, vocab)
    _, _, ref_probs = _ref_allowed(row_logits[0].numpy(), params)
    rows = _rows(params)
    tokens = [int(_sample(row_logits, rows).token_ids[0]) for _ in range(steps)]
    freq = np.bincount(tokens, minlength=vocab) / steps
    assert (np.abs(freq - ref_probs) <= 5 * np.sqrt(ref_probs * (1 - ref_probs) / steps) + 1e-3).all()


def _ref_penalties(logits: np.ndarray, prompt: list[int], output: list[int], p: SamplingParams) -> np.ndarray:
    out = logits.astype(np.float64).copy()
    for t in set(prompt) | set(output):
        out[t] = out[t] / p.repetition_penalty if out[t] > 0 else out[t] * p.repetition_penalty
    for t in set(output):
        out[t] -= p.frequency_penalty * output.count(t) + p.presence_penalty
    return out


@pytest.mark.parametrize("vocab", [17, 300])
def test_penalties_match_per_row_reference(vocab):
    gen = np.random.default_rng(vocab)
    params = [SamplingParams(temperature=0.0),  # no penalties: left alone
              SamplingParams(repetition_penalty=1.3),
              SamplingParams(presence_penalty=0.7, frequency_penalty=0.4, temperature=0.0),
              SamplingParams(repetition_penalty=0.8, presence_penalty=-0.5, frequency_penalty=1.5),
              SamplingParams(frequency_penalty=-1.0)]
    rows = [SamplingRow(p, prompt_ids=gen.integers(0, vocab, gen.integers(1, 40)).tolist(),
                        output_ids=gen.integers(0, vocab, gen.integers(0, 30)).tolist()) for p in params]
    logits = torch.randn(len(rows), vocab) * 3
    batch = SamplingBatch.build(rows, vocab, "cpu")
    processed = Sampler().process(logits.clone(), batch)
    for i, row in enumerate(rows):
        ref = _ref_penalties(logits[i].numpy(), list(row.prompt_ids), list(row.output_ids), row.params)
        np.testing.assert_allclose(processed[i].numpy(), ref, rtol=1e-5, atol=1e-5)
    greedy = [i for i, p in enumerate(params) if p.greedy]
    tokens = Sampler()(logits.clone(), batch).token_ids
    assert torch.equal(tokens[greedy], processed[greedy].argmax(-1))


def test_penalties_reject_out_of_vocab_ids():
    with pytest.raises(ValueError, match="token ids"):
        SamplingBatch.build([SamplingRow(SamplingParams(presence_penalty=1.0), output_ids=[3, 10])], 10, "cpu")


def test_seeded_rows_reproduce_alone_and_in_other_batches():
    vocab, steps = 5000, 6
    target = SamplingParams(seed=1234, temperature=0.9, top_p=0.95)
    step_logits = [torch.randn(vocab) for _ in range(steps)]

    def run(position: int, others: list[SamplingParams]) -> list[int]:
        rows = _rows(*others)
        rows.insert(position, _rows(target)[0])  # a fresh generator from the same seed
        got = []
        for row_logits in step_logits:
            logits = torch.randn(len(rows), vocab)
            logits[position] = row_logits
            got.append(int(_sample(logits, rows).token_ids[position]))
        return got

    alone = run(0, [])
    assert run(2, [SamplingParams(), SamplingParams(temperature=0.0), SamplingParams(seed=99, top_k=5)]) == alone
    assert run(1, [SamplingParams(seed=1234, temperature=0.9, top_p=0.95), SamplingParams(min_p=0.1)]) == alone
    other_seed = [int(_sample(step_logits[0].unsqueeze(0), _rows(SamplingParams(seed=s))).token_ids[0])
                  for s in range(5)]
    assert len(set(other_seed)) > 1  # the seed matters


def test_seeded_row_needs_generator():
    with pytest.raises(ValueError, match="generator"):
        SamplingBatch.build([SamplingRow(SamplingParams(seed=3))], 10, "cpu")


def _ref_bitmask(bitmask: np.ndarray, vocab: int) -> np.ndarray:
    allowed = np.zeros((bitmask.shape[0], vocab), dtype=bool)
    for r in range(bitmask.shape[0]):
        for t in range(vocab):
            allowed[r, t] = (int(bitmask[r, t // 32]) >> (t % 32)) & 1 == 1
    return allowed


@pytest.mark.parametrize("n,vocab", [(1, 7), (4, 64), (5, 100), (3, 1000)])
def test_bitmask_masks_exactly(n, vocab):
    words = (vocab + 31) // 32
    bitmask = torch.randint(-2**31, 2**31, (n, words), dtype=torch.int64).to(torch.int32)
    bitmask[0] = -1  # an unconstrained row
    if n > 2:
        bitmask[2] = 0
        bitmask[2, 0] = 1 << 3  # exactly one allowed token
    allowed = _ref_bitmask(bitmask.numpy(), vocab)
    assert torch.equal(unpack_bitmask(bitmask, vocab), torch.from_numpy(allowed))
    logits = torch.randn(n, vocab)
    params = [SamplingParams(temperature=0.0 if i % 2 else 1.0) for i in range(n)]
    batch = SamplingBatch.build(_rows(*params), vocab, "cpu", token_bitmask=bitmask)
    processed = Sampler().process(logits.clone(), batch)
    expected = torch.where(torch.from_numpy(allowed), logits, torch.tensor(float("-inf")))
    assert torch.equal(processed, expected)
    xgr = pytest.importorskip("xgrammar")
    theirs = logits.clone()
    xgr.apply_token_bitmask_inplace(theirs, bitmask)
    assert torch.equal(processed, theirs)
    for _ in range(20):
        tokens = Sampler()(logits.clone(), batch).token_ids
        assert allowed[np.arange(n), tokens.numpy()].all()
    if n > 2:
        assert int(tokens[2]) == 3


def test_bitmask_shape_is_checked():
    with pytest.raises(ValueError, match="token_bitmask"):
        bitmask = torch.full((1, 3), -1, dtype=torch.int32)  # 100 tokens need 4 words
        SamplingBatch.build(_rows(SamplingParams()), 100, "cpu", token_bitmask=bitmask)


@pytest.mark.parametrize("n,vocab", SHAPES)
def test_logprobs_are_raw_log_softmax(n, vocab):
    logits = torch.randn(n, vocab) * 4
    params = [SamplingParams(logprobs=5, temperature=0.0, repetition_penalty=2.0),
              SamplingParams(logprobs=0, top_k=2, temperature=0.3), SamplingParams()]
    rows = [SamplingRow(params[i % 3], prompt_ids=[0, 1, 2]) for i in range(n)]
    out = _sample(logits, rows)
    ref = torch.log_softmax(logits.double(), -1)
    k = min(5, vocab)
    assert out.top_ids.shape == (n, k) and out.top_logprobs.shape == (n, k)
    torch.testing.assert_close(out.logprobs.double(), ref.gather(1, out.token_ids[:, None])[:, 0], rtol=1e-5, atol=1e-4)
    ref_top, ref_ids = ref.topk(k, -1)
    torch.testing.assert_close(out.top_logprobs.double(), ref_top, rtol=1e-5, atol=1e-4)
    assert torch.equal(out.top_ids, ref_ids)


def test_logprobs_zero_gives_only_sampled_token():
    out = _sample(torch.randn(2, 30), _rows(SamplingParams(logprobs=0), SamplingParams()))
    assert out.logprobs.shape == (2,) and out.top_ids.shape == (2, 0)


def test_min_tokens_blocks_stop_ids():
    vocab, stops = 40, [5, 17]
    logits = torch.randn(4, vocab)
    logits[:, stops] = 50.0  # the stop ids dominate unless masked
    params = SamplingParams(min_tokens=3, temperature=0.0)
    sampled = SamplingParams(min_tokens=3)
    rows = [SamplingRow(params, output_ids=[1, 2], stop_token_ids=stops),  # 2 < 3: blocked
            SamplingRow(params, output_ids=[1, 2, 3], stop_token_ids=stops),  # reached: free
            SamplingRow(sampled, output_ids=[], stop_token_ids=stops),
            SamplingRow(SamplingParams(temperature=0.0), stop_token_ids=stops)]  # no min_tokens
    for _ in range(20):
        tokens = _sample(logits, rows).token_ids.tolist()
        assert tokens[0] not in stops and tokens[2] not in stops
        assert tokens[0] == int(torch.where(torch.isin(torch.arange(vocab), torch.tensor(stops)),
                                            float("-inf"), logits[0]).argmax())
        assert tokens[1] in stops and tokens[3] in stops


def test_min_tokens_yields_to_a_constraint_that_can_only_stop():
    """A complete grammar allows only stop ids: min_tokens must not block them too (the row would have no token
    left and sample garbage); a constraint that still allows other tokens is blocked as usual."""
    vocab, stops = 64, [5, 17]
    bitmask = torch.zeros(4, 2, dtype=torch.int32)
    bitmask[:2, 0] = (1 << 5) | (1 << 17)  # rows 0, 1: nothing but the stop ids
    bitmask[2:, 0] = (1 << 5) | (1 << 9)  # rows 2, 3: a stop id or token 9
    params = [SamplingParams(min_tokens=4, temperature=0.0), SamplingParams(min_tokens=4, seed=3)] * 2
    rows = [SamplingRow(p, output_ids=[1], stop_token_ids=stops,
                        generator=make_generator(p.seed, "cpu") if p.seed is not None else None) for p in params]
    for _ in range(10):
        logits = torch.randn(4, vocab)
        tokens = _sample(logits, rows, bitmask).token_ids.tolist()
        assert tokens[0] in stops and tokens[1] in stops
        assert tokens[2] == 9 and tokens[3] == 9


def test_sampled_and_greedy_rows_mix():
    vocab = 500
    logits = torch.randn(6, vocab)
    params = [SamplingParams(temperature=0.0), SamplingParams(top_k=1), SamplingParams(temperature=0.0, top_k=3),
              SamplingParams(top_p=1e-6), SamplingParams(min_p=1.0), SamplingParams(temperature=1e-7)]
    out = _sample(logits, _rows(*params))
    # top_k=1, a tiny top_p and min_p=1 all leave only the argmax, as do the greedy rows.
    assert torch.equal(out.token_ids, logits.argmax(-1))


def test_logits_shape_is_checked():
    batch = SamplingBatch.build(_rows(SamplingParams()), 10, "cpu")
    with pytest.raises(ValueError, match="logits"):
        Sampler()(torch.randn(2, 10), batch)


@pytest.mark.parametrize("field,value", [
    ("n", 0), ("n", 1.5), ("temperature", -0.1), ("temperature", float("nan")), ("top_p", 0.0),
    ("top_p", 1.01), ("top_k", -2), ("min_p", 1.5), ("repetition_penalty", 0.0), ("presence_penalty", 2.5),
    ("frequency_penalty", -3.0), ("seed", "7"), ("stop", [""]), ("stop", [1]), ("stop_token_ids", [-1]),
    ("stop_token_ids", 5), ("max_tokens", -1), ("max_tokens", True), ("min_tokens", -1), ("logprobs", 21),
    ("logprobs", -1), ("ignore_eos", 1), ("skip_special_tokens", "yes"), ("include_stop_str", None),
])
def test_sampling_params_validation_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_sampling_params_normalises():
    p = SamplingParams(top_k=-1, stop="END", temperature=0, max_tokens=None)
    assert p.top_k == 0 and p.stop == ["END"] and p.greedy and isinstance(p.temperature, float)
    assert not SamplingParams().greedy and not SamplingParams().uses_penalties
    assert SamplingParams(frequency_penalty=0.1).uses_penalties
    with pytest.raises(ValueError, match="min_tokens"):
        SamplingParams(min_tokens=10, max_tokens=5)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_mixed_step_without_host_sync(device):
    """Every stage at once; on CUDA the step must not wait on the device (sync debug mode = error)."""
    vocab = 1000
    bitmask = torch.full((6, (vocab + 31) // 32), -1, dtype=torch.int32)
    bitmask[3, 1:] = 0  # row 3 may only use tokens 0..31
    seeded = SamplingParams(seed=5, top_p=0.9, logprobs=3)
    params = [SamplingParams(temperature=0.0, repetition_penalty=1.2), seeded,
              SamplingParams(top_k=50, min_p=0.05, frequency_penalty=0.5),
              SamplingParams(temperature=0.0, logit_bias={5: 50.0, 40: 100.0}),  # 40 is masked: the mask wins
              SamplingParams(min_tokens=3, temperature=0.0), SamplingParams(top_k=2000, top_p=0.5)]
    rows = [SamplingRow(p, prompt_ids=[1, 2, 3], output_ids=[4, 4], stop_token_ids=[7],
                        generator=make_generator(p.seed, device) if p.seed is not None else None) for p in params]
    logits = torch.randn(6, vocab)
    logits[4, 7] = 100.0
    on_device = logits.clone().to(device)  # the sampler consumes its logits; a pageable copy waits: not here
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
    try:
        batch = SamplingBatch.build(rows, vocab, device, token_bitmask=bitmask)
        out = Sampler()(on_device, batch)
    finally:
        if device == "cuda":
            torch.cuda.set_sync_debug_mode(0)
    tokens = out.token_ids.cpu()
    processed = Sampler().process(logits.clone(), SamplingBatch.build(rows, vocab, "cpu", token_bitmask=bitmask))
    assert tokens[[0, 3, 4]].tolist() == processed[[0, 3, 4]].argmax(-1).tolist()
    assert int(tokens[3]) == 5 and int(tokens[4]) != 7
    alone = _sample(logits[1:2].to(device), [SamplingRow(seeded, generator=make_generator(5, device))])
    assert int(alone.token_ids[0]) == int(tokens[1])
    torch.testing.assert_close(out.logprobs.cpu(), torch.log_softmax(logits, -1).gather(1, tokens[:, None])[:, 0])


def test_a_step_makes_no_tensor_from_host_values():
    """The CPU face of the test above: once the batch is built, a step turns no Python value into a tensor
    (aten.lift_fresh, e.g. `logits[rows, ids] = float("-inf")`). On CUDA each such tensor is made on the host and
    copied to the device with a blocking copy: the host waits for the step (overlap scheduling lost), and
    sync debug mode "error" refuses it."""
    from torch.utils._python_dispatch import TorchDispatchMode  # noqa: PLC0415

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    vocab = 1000
    params = [SamplingParams(min_tokens=3, temperature=0.0, repetition_penalty=1.2),
              SamplingParams(min_tokens=2, top_k=2000, top_p=0.5, min_p=0.05, seed=3, logprobs=2),
              SamplingParams(top_k=50, frequency_penalty=0.5, presence_penalty=0.1, logit_bias={11: 100.0})]
    rows = [SamplingRow(p, prompt_ids=[1, 2], output_ids=[4], stop_token_ids=[7, 9],
                        generator=make_generator(p.seed, "cpu") if p.seed is not None else None) for p in params]
    bitmask = torch.full((3, (vocab + 31) // 32), -1, dtype=torch.int32)
    batch = SamplingBatch.build(rows, vocab, "cpu", token_bitmask=bitmask)
    assert batch.min_tokens_block is not None  # the stage that wrote a Python -inf
    logits = torch.randn(3, vocab)
    with Ops() as ops:
        out = Sampler()(logits.clone(), batch)
    assert "index_put_" in ops.names or "index_fill_" in ops.names  # the min_tokens stage ran
    assert "lift_fresh" not in ops.names
    assert out.token_ids[0] not in (7, 9) and out.token_ids[1] not in (7, 9) and out.token_ids[2] == 11


def test_allows_more_than_matches_the_unpacked_mask():
    """The bit-level check min_tokens uses against a complete grammar, against unpacking the row."""
    import random

    from glm_serve.engine.sampler import _allows_more_than, unpack_bitmask

    rng = random.Random(0)
    for _ in range(500):
        vocab = rng.randint(4, 200)
        words = (vocab + 31) // 32
        if rng.random() < 0.5:  # anything, pad bits included
            row = torch.randint(-2**31, 2**31 - 1, (words,), dtype=torch.int32)
        else:  # a few tokens, as a near-complete grammar leaves
            allowed = torch.zeros(words * 32, dtype=torch.int64)
            allowed[rng.sample(range(vocab), rng.randint(0, 3))] = 1
            packed = (allowed.view(words, 32) << torch.arange(32)).sum(-1)
            row = torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)
        ids = rng.sample(range(vocab), rng.randint(1, 3))
        want = unpack_bitmask(row.unsqueeze(0), vocab)[0].clone()
        want[ids] = False
        assert _allows_more_than(row, ids, vocab) == bool(want.any())


def test_top_p_keeps_the_shortest_prefix_reaching_p_exactly():
    """The cut at an exact boundary: four equal logits (probabilities exactly 0.25 in float32) and top_p 0.5
    keep exactly two tokens, whose mass reaches 0.5 (vLLM's rule); a third would exceed the shortest prefix."""
    logits = torch.zeros(1, 4)
    rows = _rows(SamplingParams(temperature=1.0, top_p=0.5))
    batch = SamplingBatch.build(rows, 4, "cpu")
    sampler_module._apply_top_k_top_p(logits, batch.top_k, batch.max_top_k, batch.top_p)
    assert int(torch.isfinite(logits).sum()) == 2
    seen = {int(_sample(torch.zeros(1, 4), rows).token_ids[0]) for _ in range(200)}
    assert len(seen) == 2
