"""Block accounting on its own: allocate/free, reference counts, prefix-cache hits, LRU eviction, no false sharing."""

from __future__ import annotations

import random

import pytest

from glm_serve.engine.block_manager import BlockManager
from glm_serve.engine.sequence import Sequence

BS = 4


def _seq(tokens, seq_id=0, extra=None) -> Sequence:
    return Sequence(seq_id, f"r{seq_id}", list(tokens), params=None, extra_hash=extra)


def _compute_all(bm: BlockManager, seq: Sequence) -> list[int]:
    """First allocation with the prefix hit, then 'compute' every token and register the full blocks."""
    hit = bm.match_prefix(seq)
    n = seq.num_tokens - len(hit) * bm.block_size
    assert bm.can_allocate(seq, n, hit)
    bm.allocate(seq, n, hit)
    seq.num_computed_tokens = seq.num_tokens
    bm.cache_full_blocks(seq)
    return hit


def test_allocate_free_and_ref_counts():
    bm = BlockManager(num_blocks=6, block_size=BS)
    a = _seq(range(100, 110))  # 10 tokens -> 3 blocks
    assert bm.num_new_blocks(a, 10) == 3 and bm.can_allocate(a, 10)
    bm.allocate(a, 5)  # chunk 1: 5 tokens -> 2 blocks
    assert len(a.block_ids) == 2 and bm.num_free_blocks == 4
    a.num_computed_tokens = 5
    bm.allocate(a, 3)  # tokens 5..7 fit the second block
    assert len(a.block_ids) == 2
    a.num_computed_tokens = 8
    bm.allocate(a, 2)
    assert len(a.block_ids) == 3 and len(set(a.block_ids)) == 3
    assert [bm.ref_counts[b] for b in a.block_ids] == [1, 1, 1]
    b = _seq(range(200, 215), seq_id=1)  # 15 tokens -> 4 blocks > 3 free
    assert not bm.can_allocate(b, 15)
    with pytest.raises(ValueError, match="needs 4 blocks"):
        bm.allocate(b, 15)
    assert bm.can_allocate(b, 12)
    bm.allocate(b, 12)
    assert bm.num_free_blocks == 0 and not set(a.block_ids) & set(b.block_ids)
    bm.check_invariants([a, b])
    bm.free(a)
    bm.free(b)
    assert a.block_ids == [] and bm.num_free_blocks == 6 and bm.ref_counts == [0] * 6
    bm.check_invariants([])


def test_bad_arguments():
    with pytest.raises(ValueError, match="block_size"):
        BlockManager(num_blocks=4, block_size=0)
    bm = BlockManager(num_blocks=4, block_size=BS)
    s = _seq(range(8))
    with pytest.raises(ValueError, match="num_new_tokens"):
        bm.allocate(s, 0)
    bm.allocate(s, 4)
    with pytest.raises(ValueError, match="already holds blocks"):
        bm.allocate(s, 4, [3])


def test_prefix_hits_exact_counts():
    bm = BlockManager(num_blocks=32, block_size=BS)
    rng = random.Random(0)
    base = [rng.randrange(1000) for _ in range(11)]  # 2 full blocks + 3 tokens
    a = _seq(base, 0)
    assert _compute_all(bm, a) == []
    assert bm.num_cached_blocks == 2 and (bm.num_query_tokens, bm.num_hit_tokens) == (11, 0)

    b = _seq(base[:9] + [5000, 5001], 1)  # shares 2 full blocks
    hit = _compute_all(bm, b)
    assert hit == a.block_ids[:2] and b.block_ids[:2] == a.block_ids[:2]
    assert b.num_cached_tokens == 8 and [bm.ref_counts[x] for x in hit] == [2, 2]
    c = _seq(base[:6] + [7000] * 5, 2)  # shares the first block only
    assert _compute_all(bm, c) == a.block_ids[:1] and c.num_cached_tokens == 4
    d = _seq(base[:8], 3)  # exactly two full cached blocks: the last token must still be computed
    assert bm.match_prefix(d) == a.block_ids[:1]
    _compute_all(bm, d)
    assert d.num_cached_tokens == 4 and d.num_computed_tokens == 8
    e = _seq(base[:9], 4)  # one token past two blocks: both served
    _compute_all(bm, e)
    assert e.num_cached_tokens == 8
    f = _seq([base[0] + 1] + base[1:], 5)  # first token differs: nothing, and the equal 2nd block isn't shared
    assert bm.match_prefix(f) == []
    assert bm.num_query_tokens == 11 + 11 + 11 + 8 + 9 and bm.num_hit_tokens == 8 + 4 + 4 + 8
    bm.check_invariants([a, b, c, d, e])
    a_blocks = list(a.block_ids)
    for s in (a, b, c, d, e):
        bm.free(s)
    assert bm.num_free_blocks == 32 and bm.ref_counts == [0] * 32
    bm.check_invariants([])
    # Freed cached blocks still serve hits.
    assert bm.match_prefix(_seq(base + [1, 2], 6)) == a_blocks[:2]


def test_extra_hash_separates_and_output_tokens_cache():
    bm = BlockManager(num_blocks=16, block_size=BS)
    toks = list(range(10, 19))
    a = _seq(toks, 0, extra=111)
    _compute_all(bm, a)
    assert bm.match_prefix(_seq(toks, 1, extra=222)) == []
    assert bm.match_prefix(_seq(toks, 2, extra=None)) == []
    assert bm.match_prefix(_seq(toks, 3, extra=111)) == a.block_ids[:2]
    # Generated tokens fill blocks too: a continuation's prompt reuses them.
    s = _seq([1, 2, 3], 4)
    _compute_all(bm, s)
    for t in (4, 5, 6, 7, 8):
        s.output_token_ids.append(t)
        bm.allocate(s, 1)
        s.num_computed_tokens += 1
        bm.cache_full_blocks(s)
    assert s.num_hashed_blocks == 2
    assert bm.match_prefix(_seq([1, 2, 3, 4, 5, 6, 7, 8, 9], 5)) == s.block_ids[:2]


def test_no_false_sharing_on_hash_collisions():
    # Python hashes ints modulo 2**61 - 1, so these two blocks have equal hashes but different tokens.
    m = 2**61 - 1
    assert hash((0, None, (0, 1, 2, 3))) == hash((0, None, (m, 1, 2, 3)))
    bm = BlockManager(num_blocks=12, block_size=BS)
    a = _seq([0, 1, 2, 3, 9], 0)
    _compute_all(bm, a)
    b = _seq([m, 1, 2, 3, 9], 1)
    assert bm.match_prefix(b) == []
    _compute_all(bm, b)
    assert b.block_ids[0] != a.block_ids[0] and bm.num_cached_blocks == 2
    # Equal second blocks after different first blocks: chained keys keep them apart.
    c = _seq([7, 7, 7, 7, 1, 1, 1, 1, 0], 2)
    d = _seq([8, 8, 8, 8, 1, 1, 1, 1, 0], 3)
    _compute_all(bm, c)
    assert _compute_all(bm, d) == []
    assert bm.num_cached_blocks == 6 and not set(c.block_ids) & set(d.block_ids)
    assert bm.match_prefix(_seq([8, 8, 8, 8, 1, 1, 1, 1, 5], 4)) == d.block_ids[:2]


def _register(bm: BlockManager, seq: Sequence) -> None:
    """Allocate and 'compute' a whole prompt without a lookup, registering all of its full blocks."""
    bm.allocate(seq, seq.num_tokens)
    seq.num_computed_tokens = seq.num_tokens
    bm.cache_full_blocks(seq)


def test_lru_eviction_order():
    bm = BlockManager(num_blocks=5, block_size=BS)
    seqs = [_seq([10 * i + j for j in range(BS)], i) for i in range(3)]  # one full block each
    for s in seqs:
        _register(bm, s)
    first = [s.block_ids[0] for s in seqs]
    for i in (2, 0, 1):  # release order: seq 2, seq 0, seq 1
        bm.free(seqs[i])
    assert bm.num_free_blocks == 5 and bm.num_cached_blocks == 3

    def cached(i: int) -> bool:
        return bm.match_prefix(_seq(seqs[i].prompt_token_ids + [0], 100 + i)) == [first[i]]

    x = _seq(range(500, 508), 10)  # 2 blocks: taken from the never-cached free list, no eviction
    bm.allocate(x, 8)
    assert bm.num_cached_blocks == 3 and not set(first) & set(x.block_ids)
    z = _seq(range(600, 604), 11)
    bm.allocate(z, 4)  # evicts the least recently freed cached block: seq 2's
    assert z.block_ids == [first[2]] and [cached(i) for i in range(3)] == [True, True, False]
    bm.free(x)
    # A hit refreshes recency: seq 1's block is taken and freed again, so seq 0's block goes next.
    y = _seq(seqs[1].prompt_token_ids + [7], 12)
    hit = bm.match_prefix(y)
    bm.allocate(y, 1, hit)
    assert y.block_ids[0] == first[1] and bm.ref_counts[first[1]] == 1
    bm.free(y)
    w = _seq(range(700, 712), 13)  # 3 blocks: 2 free ones, then one eviction
    bm.allocate(w, 12)
    assert first[0] in w.block_ids and [cached(i) for i in range(3)] == [False, True, False]
    bm.check_invariants([z, w])


def test_free_releases_tail_first():
    bm = BlockManager(num_blocks=3, block_size=BS)
    s = _seq(range(13), 0)  # 3 full blocks + 1 token: only 3 blocks fit the first 12
    bm.allocate(s, 12)
    s.num_computed_tokens = 12
    bm.cache_full_blocks(s)
    blocks = list(s.block_ids)
    bm.free(s)
    t = _seq(range(100, 104), 1)
    bm.allocate(t, 4)
    assert t.block_ids == [blocks[2]]  # the tail went first
    assert len(bm.match_prefix(_seq(list(range(12)) + [0], 2))) == 2


def test_no_prefix_caching():
    bm = BlockManager(num_blocks=8, block_size=BS, enable_prefix_caching=False)
    a = _seq(range(9), 0)
    _compute_all(bm, a)
    assert bm.num_cached_blocks == 0 and bm.match_prefix(_seq(range(9), 1)) == []
    assert bm.num_query_tokens == 0 and a.num_cached_tokens == 0
    bm.free(a)
    assert bm.num_free_blocks == 8


def test_reset_prefix_cache():
    bm = BlockManager(num_blocks=8, block_size=BS)
    a, b = _seq(range(9), 0), _seq(range(50, 59), 1)
    _compute_all(bm, a)
    _compute_all(bm, b)
    bm.free(a)
    assert bm.reset_prefix_cache() == 2 and bm.num_cached_blocks == 2  # b's blocks are held: kept
    bm.check_invariants([b])


@pytest.mark.parametrize("caching", [True, False])
def test_random_workload_returns_every_block(caching):
    """Random sequences from a few shared stems, allocated in chunks, grown by fake outputs, freed at random.
    A simulated KV store (each slot holds the exact prefix it was computed for) checks every shared block."""
    rng = random.Random(1234 + caching)
    nb = 40
    bm = BlockManager(num_blocks=nb, block_size=BS, enable_prefix_caching=caching)
    kv: list = [None] * (nb * BS)
    stems = [[rng.randrange(6) for _ in range(rng.randrange(1, 14))] for _ in range(4)]
    live: list[Sequence] = []
    hits = 0

    def check_context(s: Sequence) -> None:
        toks = s.all_token_ids
        for p in range(s.num_computed_tokens):
            assert kv[s.block_ids[p // BS] * BS + p % BS] == (s.extra_hash, tuple(toks[: p + 1]))

    for it in range(3000):
        r = rng.random()
        if r < 0.25 and len(live) < 12:
            prompt = rng.choice(stems) + [rng.randrange(6) for _ in range(rng.randrange(1, 8))]
            s = _seq(prompt, it, extra=rng.choice([None, None, 1]))
            hit = bm.match_prefix(s)
            n = rng.randrange(1, s.num_tokens - len(hit) * BS + 1)
            if bm.can_allocate(s, n, hit):
                bm.allocate(s, n, hit)
                hits += len(hit)
                check_context(s)  # prefix-cache blocks hold exactly this sequence's prefix
                live.append(s)
        elif r < 0.85 and live:
            s = rng.choice(live)
            if s.num_computed_tokens == s.num_tokens:
                s.output_token_ids.append(rng.randrange(6))
            start = s.num_computed_tokens
            n = rng.randrange(1, s.num_tokens - start + 1)
            if not bm.can_allocate(s, n):
                continue
            bm.allocate(s, n)
            toks = s.all_token_ids
            for p in range(start, start + n):  # "compute": write this sequence's K/V into its own slots
                b = s.block_ids[p // BS]
                assert bm.ref_counts[b] == 1, "a sequence writes only into blocks nobody shares"
                kv[b * BS + p % BS] = (s.extra_hash, tuple(toks[: p + 1]))
            s.num_computed_tokens = start + n
            bm.cache_full_blocks(s)
        elif live:
            s = live.pop(rng.randrange(len(live)))
            check_context(s)
            bm.free(s)
        if it % 50 == 0:
            bm.check_invariants(live)
    for s in live:
        check_context(s)
        bm.free(s)
    bm.check_invariants([])
    assert bm.num_free_blocks == nb and bm.ref_counts == [0] * nb
    assert (hits > 0) == caching
