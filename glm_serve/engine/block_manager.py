"""Owns the paged KV-cache accounting: free blocks, reference counts and the prefix cache (pure Python, no torch).

A block holds the K/V of `block_size` consecutive tokens of one sequence (see glm_serve/model/attention.py:
token j of a sequence lives in block_ids[j // block_size] at offset j % block_size). Every physical block
is in exactly one of three states:

    held        ref_count > 0: in the block_ids of that many sequences (> 1 only for shared prefix blocks)
    evictable   ref_count == 0 but still registered in the prefix cache; an LRU pool, oldest first
    free        ref_count == 0 and holding nothing worth keeping

Prefix cache. Once a block is full and computed it is registered under the key

    (parent node id, extra_hash, the block's block_size token ids)

where the parent node id names the exact prefix before it: every registration gets a fresh integer id that
is never reused, and the first block's parent is 0. The dict compares keys by value, so two different
prefixes can never share K/V even when their Python hashes collide; and a key whose parent was evicted can
no longer be reached (the parent prefix, registered again, gets a new id). Sequences taking blocks from the
cache share them read-only: a sequence writes only at positions >= num_computed_tokens, past its hit.

New blocks come from the free list first, then from the evictable pool least-recently-freed first (which
drops that block's cache entry). A sequence's blocks are released tail first, so its last blocks (the least
likely to be shared) are evicted before its first ones.
"""

from __future__ import annotations

from collections import OrderedDict, deque

from glm_serve.engine.sequence import Sequence


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class BlockManager:
    """Paired verbs: `can_allocate` / `allocate` / `free`; prefix cache: `match_prefix` / `cache_full_blocks`."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        for name, value in (("num_blocks", num_blocks), ("block_size", block_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"BlockManager: {name} must be a positive int, got {value!r}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = bool(enable_prefix_caching)
        self.ref_counts = [0] * num_blocks  # [num_blocks] sequences holding each block
        self._free: deque[int] = deque(range(num_blocks))  # ref 0, not in the cache
        self._evictable: OrderedDict[int, None] = OrderedDict()  # ref 0, in the cache; oldest first
        self._cache: dict[tuple, int] = {}  # key -> block id (exact content key, see module docstring)
        self._block_key: list[tuple | None] = [None] * num_blocks  # [num_blocks] key, None = unregistered
        self._block_node: list[int] = [0] * num_blocks  # [num_blocks] node id of the prefix ending here
        self._next_node = 1  # node ids are never reused; 0 is the empty prefix
        # Metrics: tokens looked up in the prefix cache at first allocation, and tokens served from it.
        self.num_query_tokens = 0
        self.num_hit_tokens = 0

    # ---- state -------------------------------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        """Blocks a new allocation can take: free plus evictable (cached but unreferenced)."""
        return len(self._free) + len(self._evictable)

    @property
    def num_cached_blocks(self) -> int:
        """Blocks registered in the prefix cache (held or evictable)."""
        return len(self._cache)

    @property
    def usage(self) -> float:
        """Fraction of blocks held by sequences (0..1), for metrics."""
        return 1.0 - self.num_free_blocks / self.num_blocks

    @property
    def hit_rate(self) -> float:
        return self.num_hit_tokens / self.num_query_tokens if self.num_query_tokens else 0.0

    def reset_prefix_cache(self) -> int:
        """Drop every evictable cache entry (held blocks stay registered). Returns how many were dropped."""
        n = len(self._evictable)
        while self._evictable:
            b, _ = self._evictable.popitem(last=False)
            self._unregister(b)
            self._free.append(b)
        return n

    # ---- prefix cache ------------------------------------------------------------------------------------

    def _key(self, seq: Sequence, parent: int, i: int) -> tuple:
        bs = self.block_size
        return (parent, seq.extra_hash, tuple(seq.token_slice(i * bs, (i + 1) * bs)))

    def match_prefix(self, seq: Sequence) -> list[int]:
        """Cached blocks holding the longest prefix of seq's tokens, in order; no side effects.

        Only for a sequence without blocks. Always leaves at least one token uncached, so the step that
        computes the rest yields logits, and covers at most seq.max_prefix_hit tokens when that is set.
        Empty when prefix caching is off."""
        if not self.enable_prefix_caching or seq.block_ids:
            return []
        hit: list[int] = []
        parent = 0
        limit = (seq.num_tokens - 1) // self.block_size
        if seq.max_prefix_hit is not None:
            limit = min(limit, seq.max_prefix_hit // self.block_size)
        for i in range(limit):
            b = self._cache.get(self._key(seq, parent, i))
            if b is None:
                break
            hit.append(b)
            parent = self._block_node[b]
        return hit

    def cache_full_blocks(self, seq: Sequence, computed: int | None = None) -> None:
        """Register seq's full, computed blocks not registered yet, so later sequences can share them.
        computed: tokens known to have their K/V written (default num_computed_tokens, which also counts a
        step that may still fail).

        O(1) unless a block boundary was crossed. If an equal block is already cached (two sequences
        computed the same prefix at once), seq keeps its own copy unregistered and chains on the cached
        one, so its later blocks are still found under the canonical prefix."""
        if not self.enable_prefix_caching:
            return
        done = seq.num_computed_tokens if computed is None else min(computed, seq.num_computed_tokens)
        full = min(done // self.block_size, len(seq.block_ids))
        i = seq.num_hashed_blocks
        if i >= full:
            return
        parent = seq.prefix_node
        while i < full:
            key = self._key(seq, parent, i)
            existing = self._cache.get(key)
            if existing is None:
                b = seq.block_ids[i]
                self._cache[key] = b
                self._block_key[b] = key
                parent = self._block_node[b] = self._next_node
                self._next_node += 1
            else:
                parent = self._block_node[existing]
            i += 1
        seq.num_hashed_blocks = full
        seq.prefix_node = parent

    def _unregister(self, b: int) -> None:
        key = self._block_key[b]
        if key is not None:
            del self._cache[key]
            self._block_key[b] = None
            self._block_node[b] = 0

    # ---- allocation --------------------------------------------------------------------------------------

    def num_new_blocks(self, seq: Sequence, num_new_tokens: int, hit: list[int] | tuple = ()) -> int:
        """Blocks seq must take so that its first computed + num_new_tokens tokens have slots.

        With a `hit` from match_prefix, the computed count is the hit's tokens and evictable hit blocks
        count too (taking them uses up free capacity)."""
        if hit:
            reclaimed = sum(1 for b in hit if self.ref_counts[b] == 0)
            return cdiv(len(hit) * self.block_size + num_new_tokens, self.block_size) - len(hit) + reclaimed
        return max(0, cdiv(seq.num_computed_tokens + num_new_tokens, self.block_size) - len(seq.block_ids))

    def can_allocate(self, seq: Sequence, num_new_tokens: int, hit: list[int] | tuple = ()) -> bool:
        """Whether `allocate(seq, num_new_tokens, hit)` would succeed now."""
        return self.num_new_blocks(seq, num_new_tokens, hit) <= len(self._free) + len(self._evictable)

    def allocate(self, seq: Sequence, num_new_tokens: int, hit: list[int] | tuple = ()) -> None:
        """Give seq slots for its next num_new_tokens tokens (after num_computed_tokens).

        A sequence's first allocation (no blocks yet) may pass `hit`, the result of match_prefix(seq) taken
        just before: those blocks are shared into seq and num_computed_tokens starts at their end. The first
        allocation also feeds the hit/query counters and, unless seq was preempted before, num_cached_tokens.
        """
        if num_new_tokens < 1:
            raise ValueError(f"allocate: num_new_tokens must be >= 1, got {num_new_tokens}")
        first = not seq.block_ids
        if hit and not first:
            raise ValueError(f"allocate: seq {seq.seq_id} already holds blocks; a prefix hit needs a fresh one")
        if first and seq.num_computed_tokens:
            raise ValueError(
                f"allocate: seq {seq.seq_id} has num_computed_tokens={seq.num_computed_tokens} but no blocks"
            )
        need = self.num_new_blocks(seq, num_new_tokens, hit)
        if need > len(self._free) + len(self._evictable):
            raise ValueError(
                f"allocate: seq {seq.seq_id} needs {need} blocks, {self.num_free_blocks} free; "
                "call can_allocate first"
            )
        if hit:
            for b in hit:
                if self.ref_counts[b] == 0:
                    del self._evictable[b]
                self.ref_counts[b] += 1
            seq.block_ids.extend(hit)
            seq.num_computed_tokens = len(hit) * self.block_size
            seq.num_hashed_blocks = len(hit)
            seq.prefix_node = self._block_node[hit[-1]]
        if first and self.enable_prefix_caching:
            cached = len(hit) * self.block_size
            self.num_query_tokens += seq.num_tokens
            self.num_hit_tokens += cached
            if seq.num_preemptions == 0:
                seq.num_cached_tokens = cached
        for _ in range(cdiv(seq.num_computed_tokens + num_new_tokens, self.block_size) - len(seq.block_ids)):
            seq.block_ids.append(self._take())

    def _take(self) -> int:
        if self._free:
            b = self._free.popleft()
        else:
            b, _ = self._evictable.popitem(last=False)  # least recently freed cached block
            self._unregister(b)
        self.ref_counts[b] = 1
        return b

    def free(self, seq: Sequence) -> None:
        """Return seq's blocks (tail first). Registered blocks whose count drops to 0 become evictable."""
        refs = self.ref_counts
        for b in reversed(seq.block_ids):
            refs[b] -= 1
            if refs[b] == 0:
                if self._block_key[b] is not None:
                    self._evictable[b] = None
                else:
                    self._free.append(b)
            elif refs[b] < 0:
                raise ValueError(f"free: block {b} of seq {seq.seq_id} was already free (double free)")
        seq.block_ids = []
        seq.num_hashed_blocks = 0
        seq.prefix_node = 0

    def check_invariants(self, seqs: list[Sequence]) -> None:
        """Test helper: held/evictable/free partition the blocks, ref counts match `seqs`' block lists, and
        the cache maps each key to the block registered under it. Raises ValueError on the first mismatch."""
        refs = [0] * self.num_blocks
        for s in seqs:
            for b in s.block_ids:
                refs[b] += 1
        if refs != self.ref_counts:
            bad = next(b for b in range(self.num_blocks) if refs[b] != self.ref_counts[b])
            raise ValueError(f"block {bad}: ref_count {self.ref_counts[bad]}, held by {refs[bad]} sequences")
        free, evictable = set(self._free), set(self._evictable)
        if len(free) != len(self._free) or free & evictable:
            raise ValueError("a block is twice in the free list or in both free and evictable pools")
        for b in range(self.num_blocks):
            unheld = refs[b] == 0
            if unheld != (b in free or b in evictable):
                raise ValueError(f"block {b}: ref_count {refs[b]} but in_free={b in free} evictable={b in evictable}")
            if (b in evictable) != (unheld and self._block_key[b] is not None):
                raise ValueError(f"block {b}: evictable={b in evictable} but key={self._block_key[b]!r}")
        for key, b in self._cache.items():
            if self._block_key[b] != key:
                raise ValueError(f"cache key of block {b} does not match its registration")
