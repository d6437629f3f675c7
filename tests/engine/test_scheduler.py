"""The scheduler against a fake model that reads its context through the block tables, and a slow reference.

FakeModel: the 'K/V' of position p is an exact id of (K/V of position p - 1 read back from the cache, token p),
and the sampled token is a function of the last K/V. A wrong block table, an overwritten shared block, a stale
prefix hit or a bad recompute after preemption changes the generated tokens, which `reference` computes
without any cache.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest

from glm_serve.engine.block_manager import BlockManager
from glm_serve.engine.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from glm_serve.engine.sequence import Sequence, SeqStatus

VOCAB = 50
EOS = 0


@dataclass
class Params:
    max_tokens: int | None = None


class FakeModel:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.bs = block_size
        self.kv: list[int | None] = [None] * (num_blocks * block_size)  # one 'K/V' id per slot
        self.ids: dict[tuple, int] = {}  # exact (previous K/V, token) -> id, shared with `reference`

    def node(self, prev, tok: int) -> int:
        return self.ids.setdefault((prev, tok), len(self.ids) + 1)

    @staticmethod
    def next_token(kv_id: int) -> int:
        return (kv_id * 2654435761 >> 7) % VOCAB

    def step(self, out: SchedulerOutput, feed: dict[int, int] | None = None) -> dict[int, int]:
        """feed: the previous step's sampled tokens, for tokens still in flight (overlap scheduling), as the
        runner reads them from the device."""
        sampled = {}
        for s in out.scheduled:
            seq, bs = s.seq, self.bs
            assert s.num_new_tokens >= 1 and len(seq.block_ids) * bs >= s.start + s.num_new_tokens
            p0 = s.start - 1
            prev = self.kv[seq.block_ids[p0 // bs] * bs + p0 % bs] if s.start else ("root", seq.extra_hash)
            assert prev is not None, "context slot never written"
            for p in range(s.start, s.start + s.num_new_tokens):
                prev = self.node(prev, seq.token_at(p) if p < seq.num_tokens else feed[seq.seq_id])
                self.kv[seq.block_ids[p // bs] * bs + p % bs] = prev
            if s.sample:
                sampled[seq.seq_id] = self.next_token(prev)
        return sampled

    def reference(self, prompt: list[int], extra, max_tokens: int | None, max_len: int) -> list[int]:
        prev = ("root", extra)
        for t in prompt:
            prev = self.node(prev, t)
        out: list[int] = []
        while True:
            out.append(self.next_token(prev))
            if out[-1] == EOS or len(out) == max_tokens or len(prompt) + len(out) >= max_len:
                return out
            prev = self.node(prev, out[-1])


def _make(caching=True, **kw):
    cfg = SchedulerConfig(**{"max_model_len": 1024, "num_blocks": 64, "block_size": 4, "max_num_seqs": 16, **kw},
                          enable_prefix_caching=caching)
    return Scheduler(cfg, BlockManager(cfg.num_blocks, cfg.block_size, caching))


def _seq(seq_id, prompt, max_tokens=None, extra=None, wait_for=None) -> Sequence:
    return Sequence(seq_id, f"r{seq_id}", list(prompt), Params(max_tokens), extra_hash=extra, wait_for=wait_for)


def _step(sched: Scheduler, model: FakeModel) -> SchedulerOutput:
    """One engine step: schedule, run, update, then finish on EOS or the length limit."""
    out = sched.schedule()
    _land(sched, out, model.step(out))
    return out


def _land(sched: Scheduler, out: SchedulerOutput, sampled: dict[int, int]) -> None:
    sched.update(out, sampled)
    for s in out.scheduled:
        if s.sample and not s.seq.is_finished and s.seq.seq_id in sampled:
            if s.seq.output_token_ids[-1] == EOS:
                sched.finish(s.seq, "stop")
            elif sched.hit_length_limit(s.seq):
                sched.finish(s.seq, "length")


class OverlapLoop:
    """The engine's overlap loop: step N+1 is scheduled and run before step N's tokens land; the fake device
    feeds an in-flight token from step N's samples, as the runner does from the device tensor."""

    def __init__(self, sched: Scheduler, model: FakeModel) -> None:
        self.sched, self.model = sched, model
        self.prev: tuple[SchedulerOutput, dict[int, int]] | None = None
        self.fed = 0  # tokens the fake device took from the previous step

    def step(self) -> SchedulerOutput:
        out = self.sched.schedule()
        feed = self.prev[1] if self.prev else {}
        self.fed += sum(s.start >= s.seq.num_tokens for s in out.scheduled)
        sampled = self.model.step(out, feed)
        self.drain()
        self.prev = (out, sampled) if out.scheduled else None
        return out

    def drain(self) -> None:
        if self.prev is not None:
            _land(self.sched, *self.prev)
            self.prev = None


def _rand_prompt(rng, n):
    return [rng.randrange(1, VOCAB) for _ in range(n)]


def test_config_validation():
    with pytest.raises(ValueError, match="num_blocks"):
        SchedulerConfig(max_model_len=64, num_blocks=0)
    with pytest.raises(ValueError, match="max_batch_tokens"):
        SchedulerConfig(max_model_len=64, num_blocks=8, max_batch_tokens=8, max_num_seqs=16)
    with pytest.raises(ValueError, match="block_size"):
        SchedulerConfig(max_model_len=64, num_blocks=8, block_size=True)
    cfg = SchedulerConfig(max_model_len=64, num_blocks=8, block_size=4)
    assert cfg.max_seq_len == 32
    with pytest.raises(ValueError, match="does not match"):
        Scheduler(cfg, BlockManager(9, 4))


def test_rejects_impossible_prompts():
    sched = _make(max_model_len=32, num_blocks=64)
    with pytest.raises(ValueError, match=r"prompt has 32 tokens.*max_model_len \(32\)"):
        sched.add(_seq(0, range(1, 33)))
    sched.add(_seq(1, range(1, 32)))
    sched = _make(max_model_len=100, num_blocks=4)  # the cache holds 16 tokens
    with pytest.raises(ValueError, match=r"prompt has 16 tokens.*needs 5 KV blocks.*only 4"):
        sched.add(_seq(0, range(1, 17)))
    s = _seq(1, range(1, 16))
    sched.add(s)
    with pytest.raises(ValueError, match="already scheduled"):
        sched.add(s)
    assert sched.num_waiting == 1


def test_budget_and_chunked_prefill_beside_decodes():
    sched, model = _make(max_batch_tokens=16, max_num_seqs=4, num_blocks=128), FakeModel(128, 4)
    rng = random.Random(0)
    for i in range(3):
        sched.add(_seq(i, _rand_prompt(rng, 5), max_tokens=100))
    out = _step(sched, model)
    assert [(s.seq.seq_id, s.start, s.num_new_tokens, s.sample) for s in out.scheduled] == [
        (0, 0, 5, True), (1, 0, 5, True), (2, 0, 5, True)]
    sched.add(_seq(3, _rand_prompt(rng, 30), max_tokens=100))
    sched.add(_seq(4, _rand_prompt(rng, 3), max_tokens=100))  # max_num_seqs=4: must wait
    chunks = []
    while sched.get(3).num_computed_tokens < 30:
        out = _step(sched, model)
        assert out.num_batched_tokens == sum(s.num_new_tokens for s in out.scheduled) <= 16
        decodes = [(s.seq.seq_id, s.num_new_tokens, s.sample) for s in out.scheduled[:3]]
        assert decodes == [(0, 1, True), (1, 1, True), (2, 1, True)]  # decodes never wait for the prompt
        assert out.scheduled[3].seq.seq_id == 3 and len(out.scheduled) == 4
        chunks.append((out.scheduled[3].num_new_tokens, out.scheduled[3].sample))
    assert chunks == [(13, False), (13, False), (4, True)]
    assert sched.num_waiting == 1 and sched.num_running == 4
    for i in range(4):
        sched.finish(sched.get(i), "stop")
    out = _step(sched, model)
    assert [s.seq.seq_id for s in out.scheduled] == [4]


def test_fcfs_and_head_of_line():
    sched, model = _make(num_blocks=10, max_batch_tokens=64), FakeModel(10, 4)
    rng = random.Random(1)
    sched.add(_seq(0, _rand_prompt(rng, 20), max_tokens=50))  # 5 blocks, then 6 after its first token
    out = _step(sched, model)
    sched.add(_seq(1, _rand_prompt(rng, 19), max_tokens=5))  # needs 5 blocks; only 4 free after seq 0 grows
    sched.add(_seq(2, _rand_prompt(rng, 3), max_tokens=5))  # would fit, but must not overtake seq 1
    out = _step(sched, model)
    assert [s.seq.seq_id for s in out.scheduled] == [0] and sched.num_waiting == 2
    sched.finish(sched.get(0), "stop")
    out = _step(sched, model)
    assert [s.seq.seq_id for s in out.scheduled] == [1, 2]


@pytest.mark.parametrize("caching", [True, False])
def test_preemption_picks_newest_and_resumes_exactly(caching):
    nb = 12
    sched, model = _make(caching, num_blocks=nb, max_batch_tokens=64), FakeModel(nb, 4)
    rng = random.Random(2)
    seqs = [_seq(i, _rand_prompt(rng, 7), max_tokens=12) for i in range(3)]
    refs = [model.reference(s.prompt_token_ids, None, 12, 1024) for s in seqs]
    for s in seqs:
        sched.add(s)
    preempted = []
    while sched.has_unfinished():
        out = _step(sched, model)
        preempted += [p.seq_id for p in out.preempted]
        if out.preempted and len(preempted) == 1:
            # The newest running sequence lost its blocks and went to the front of the queue.
            assert out.preempted[0] is seqs[2] and sched.waiting[0] is seqs[2]
            assert seqs[2].status is SeqStatus.WAITING and seqs[2].num_computed_tokens == 0
            assert seqs[2].block_ids == [] and seqs[2].num_preemptions == 1
        sched.block_manager.check_invariants(sched.running)
    assert preempted and preempted[0] == 2
    for s, ref in zip(seqs, refs):  # EOS may come early: outputs must match the uncached reference exactly
        assert s.output_token_ids == ref and s.finish_reason == ("stop" if ref[-1] == EOS else "length")
    assert sched.block_manager.num_free_blocks == nb


def test_newest_preempts_itself():
    sched, model = _make(num_blocks=4, max_batch_tokens=64), FakeModel(4, 4)
    a, b = _seq(0, [1, 2, 3, 4, 5, 6], max_tokens=20), _seq(1, [7, 8, 9, 1, 2, 3, 4], max_tokens=20)
    sched.add(a)
    sched.add(b)
    for _ in range(2):  # both hold 2 blocks (the whole cache) and grow inside them
        out = _step(sched, model)
        assert len(out.scheduled) == 2 and out.preempted == []
    # Now b, the newest, needs a third block for its 9th token while a still fits: b preempts itself.
    out = _step(sched, model)
    assert [s.seq for s in out.scheduled] == [a] and out.preempted == [b] and sched.waiting[0] is b
    assert b.num_preemptions == 1 and b.num_tokens == 9 and sched.block_manager.num_free_blocks == 2


def test_wait_for_siblings_share_the_prompt():
    sched, model = _make(max_batch_tokens=16), FakeModel(64, 4)
    prompt = _rand_prompt(random.Random(3), 37)
    parent = _seq(0, prompt, max_tokens=4)
    kids = [_seq(i, prompt, max_tokens=4, wait_for=parent) for i in (1, 2)]
    other = _seq(3, [5, 6, 7], max_tokens=4)
    for s in [parent, *kids, other]:
        sched.add(s)
    out = _step(sched, model)
    assert [s.seq.seq_id for s in out.scheduled] == [0]  # 16 tokens: parent's prompt is chunked
    out = _step(sched, model)
    assert [s.seq.seq_id for s in out.scheduled] == [0]
    out = _step(sched, model)  # parent finishes its prompt (5 tokens); kids skip, the later seq goes ahead
    assert [(s.seq.seq_id, s.num_new_tokens) for s in out.scheduled] == [(0, 5), (3, 3)]
    out = _step(sched, model)
    assert [(s.seq.seq_id, s.start, s.num_new_tokens, s.sample) for s in out.scheduled[2:]] == [
        (1, 36, 1, True), (2, 36, 1, True)]
    assert [k.num_cached_tokens for k in kids] == [36, 36] and out.num_cached_tokens == 72
    assert kids[0].block_ids[:9] == parent.block_ids[:9] == kids[1].block_ids[:9]
    while sched.has_unfinished():
        _step(sched, model)
    ref = model.reference(prompt, None, 4, 1024)
    assert parent.output_token_ids == kids[0].output_token_ids == kids[1].output_token_ids == ref
    # Without prefix caching, waiting would save nothing: siblings run at once.
    sched = _make(False, max_batch_tokens=128, max_num_seqs=8)
    parent = _seq(0, prompt)
    for s in [parent, _seq(1, prompt, wait_for=parent)]:
        sched.add(s)
    assert [s.seq.seq_id for s in sched.schedule().scheduled] == [0, 1]


def test_abort_finish_and_length_safety_net():
    sched, model = _make(max_model_len=12, num_blocks=16), FakeModel(16, 4)
    a, b, c = _seq(0, [1, 2, 3]), _seq(1, [4, 5, 6, 7, 8]), _seq(2, [9, 9])
    for s in (a, b, c):
        sched.add(s)
    assert sched.abort(2) is c and c.finish_reason == "abort" and sched.abort(2) is None
    out = sched.schedule()
    sampled = model.step(out)
    assert sched.abort(1) is b and b.block_ids == []  # aborted while the step ran: update() skips it
    sched.update(out, sampled)
    assert b.output_token_ids == [] and len(a.output_token_ids) == 1
    # The engine never finishes a: schedule() stops it at max_model_len itself.
    finished = []
    for _ in range(20):
        out = sched.schedule()
        finished += out.finished
        sched.update(out, model.step(out))
    assert finished == [a] and a.finish_reason == "length" and a.num_tokens == 12
    assert not sched.has_unfinished() and sched.block_manager.num_free_blocks == 16
    assert sched.get(0) is None and sched.abort(12345) is None


@pytest.mark.parametrize("caching", [True, False])
@pytest.mark.parametrize("overlap", [False, True])
def test_random_simulation_1000_sequences(caching, overlap):
    """1,000 sequences arriving over time (shared stems, n > 1 groups, image-like extra hashes), a cache small
    enough to preempt, random aborts. Every finished output equals the reference; every block ends free.
    overlap: each step is scheduled and run before the previous one's tokens land (the engine's default)."""
    rng = random.Random(10 + caching)
    nb, bs, max_len = 48, 4, 80
    sched = _make(caching, num_blocks=nb, block_size=bs, max_model_len=max_len, max_batch_tokens=40,
                  max_num_seqs=16)
    model = FakeModel(nb, bs)
    loop = OverlapLoop(sched, model)
    stems = [_rand_prompt(rng, rng.randrange(4, 30)) for _ in range(6)]
    all_seqs: list[Sequence] = []
    aborted: set[int] = set()
    steps = 0
    while len(all_seqs) < 1000 or sched.has_unfinished() or loop.prev:
        for _ in range(rng.choice([0, 0, 1, 2, 3])):
            if len(all_seqs) >= 1000:
                break
            prompt = rng.choice(stems)[: rng.randrange(1, 30)] + _rand_prompt(rng, rng.randrange(1, 12))
            extra, n = rng.choice([None, None, None, 7]), rng.choice([1, 1, 1, 3])
            first = None
            for _ in range(n):
                s = _seq(len(all_seqs), prompt, max_tokens=rng.randrange(1, 40), extra=extra, wait_for=first)
                first = first or s
                sched.add(s)
                all_seqs.append(s)
        if rng.random() < 0.05 and all_seqs:
            victim = rng.choice(all_seqs)
            if sched.abort(victim.seq_id) is not None:
                aborted.add(victim.seq_id)
        out = loop.step() if overlap else _step(sched, model)
        steps += 1
        assert out.num_batched_tokens == sum(s.num_new_tokens for s in out.scheduled) <= 40
        assert len(out.scheduled) <= 16 and sched.num_running <= 16
        assert not out.finished  # the engine loop finishes every sequence itself
        if steps % 25 == 0:
            sched.block_manager.check_invariants(sched.running)
        assert steps < 20000
    loop.drain()
    assert (loop.fed > 1000) == overlap  # the overlapped steps really decoded tokens still in flight
    bm = sched.block_manager
    bm.check_invariants([])
    assert bm.num_free_blocks == nb and bm.ref_counts == [0] * nb
    assert all(s.is_finished for s in all_seqs) and sched.num_waiting == sched.num_running == 0
    for s in all_seqs:
        ref = model.reference(s.prompt_token_ids, s.extra_hash, s.params.max_tokens, max_len)
        if s.seq_id in aborted:
            assert s.finish_reason == "abort" and s.output_token_ids == ref[: len(s.output_token_ids)]
        else:
            assert s.output_token_ids == ref, s.seq_id
    assert sched.num_preemptions > 0
    assert (bm.num_hit_tokens > 0) == caching
    assert any(s.num_cached_tokens > 0 for s in all_seqs) == caching


def test_overlap_registers_only_blocks_whose_step_landed():
    """With step 2 scheduled before step 1's token lands, landing step 1 registers only what step 1 computed:
    the block step 2 completes stays out of the prefix cache until step 2 lands (it might still fail)."""
    sched = _make(block_size=4)
    seq = _seq(0, [1, 2, 3, 4, 5, 6, 7])
    sched.add(seq)
    first = sched.schedule()  # the prompt: positions 0..6, samples position 7
    assert seq.num_inflight == 1
    second = sched.schedule()  # decodes position 7 (in flight), which fills block 1
    assert [(s.start, s.num_new_tokens) for s in second.scheduled] == [(7, 1)]
    assert seq.num_computed_tokens == 8 and seq.num_inflight == 2
    sched.update(first, {0: 9})
    assert seq.output_token_ids == [9] and seq.num_hashed_blocks == 1
    sched.update(second, {0: 10})
    assert seq.output_token_ids == [9, 10] and seq.num_hashed_blocks == 2 and seq.num_inflight == 0


def test_a_step_that_preempts_admits_nobody():
    """Blocks are short in a step that preempted: no waiting sequence is admitted in it, even one that would
    fit in what the victim left (here the victim, its token still in flight, is skipped and a short one waits
    behind it)."""
    sched = _make(num_blocks=4, block_size=4)
    a, c = _seq(0, [1, 2, 3, 4, 5, 6, 7], max_tokens=20), _seq(1, [8, 9, 1, 2, 3], max_tokens=20)
    sched.add(a)
    sched.add(c)
    first = sched.schedule()  # a: 2 blocks, c: 2 blocks, the whole cache
    second = sched.schedule()  # both decode their in-flight token inside their blocks
    assert [s.seq for s in second.scheduled] == [a, c] and sched.block_manager.num_free_blocks == 0
    d = _seq(2, [4, 5], max_tokens=20)
    sched.add(d)
    sched.update(first, {0: 11, 1: 12})
    third = sched.schedule()  # a's next token needs a third block: c, the newest, is preempted
    assert third.preempted == [c] and [s.seq for s in third.scheduled] == [a]
    assert list(sched.waiting) == [c, d] and d.status is SeqStatus.WAITING and d.block_ids == []
    assert sched.block_manager.num_free_blocks == 1


def test_overlap_leaves_out_a_sequence_whose_inflight_token_is_its_last():
    sched = _make()
    one, two = _seq(0, [1, 2, 3], max_tokens=1), _seq(1, [4, 5, 6], max_tokens=2)
    sched.add(one)
    sched.add(two)
    first = sched.schedule()
    assert [(s.seq.seq_id, s.sample) for s in first.scheduled] == [(0, True), (1, True)]
    second = sched.schedule()  # one's in-flight token is its only one: nothing more to compute for it
    assert [(s.seq.seq_id, s.start, s.num_new_tokens) for s in second.scheduled] == [(1, 3, 1)]
    assert one.num_computed_tokens == 3 and one.num_inflight == 1
    third = sched.schedule()  # two's second in-flight token is its last too
    assert third.scheduled == [] and two.num_inflight == 2
