"""Owns stop-string matching over streamed text: `StopChecker` turns text deltas into text safe to emit; and
`BlockedStrings`, terms that must never be emitted at all (an operator's content filter), matched the same way.

The stop point is where a stop string (or a blocked string) first ENDS in the whole generated text (ties: a
blocked string first, then the longest, i.e. the earliest start). That rule depends only on the text, never on
how the detokenizer split it into deltas:

    text so far:   ...emitted... | held | delta
                                 └──────┴─ searched: an unfinished match can only start in `held`

`held` is the shortest tail of the text that is still a proper prefix of some stop string (at most
max(len(stop)) - 1 characters): everything before it can never become part of a match, so it is emitted.
Each feed therefore costs O((len(held) + len(delta)) * number of stop strings), never a rescan. Blocked strings
are looked up by the character they end with, so a long list costs per delta character, not per term.

Blocked strings match ASCII letters in either case (`fold`: A-Z as a-z, every other character exact). The fold
keeps every character where it was, so a position in the folded text is the same position in the text.
"""

from __future__ import annotations

import functools
import string
from typing import Iterable, Sequence

_ASCII_LOWER = str.maketrans(string.ascii_uppercase, string.ascii_lowercase)


def fold(text: str) -> str:
    """`text` with ASCII letters lower-cased and every other character as it is (same length, same positions)."""
    return text.lower() if text.isascii() else text.translate(_ASCII_LOWER)


class BlockedStrings:
    """An immutable set of terms generation must never emit (SamplingParams.blocked_strings), compiled once:
    a server shares one among all its requests, so a long word list costs nothing per request to set up. Pickled
    (to an engine process) as its terms, and compiled there once per distinct list."""

    __slots__ = ("terms", "_folded", "by_last", "prefixes", "first_chars", "max_len")

    def __new__(cls, terms: Iterable[str]):
        if isinstance(terms, BlockedStrings):
            return terms
        if isinstance(terms, str) or not isinstance(terms, (list, tuple, set, frozenset)):
            raise ValueError(f"blocked_strings must be a list of strings, got {terms!r}")
        terms = tuple(dict.fromkeys(terms))
        if any(not isinstance(t, str) or t == "" for t in terms):
            raise ValueError(f"blocked_strings must be non-empty strings, got {list(terms)!r}")
        return _compiled(terms)

    def __reduce__(self):
        return _compiled, (self.terms,)

    def __len__(self) -> int:
        return len(self.terms)

    def __iter__(self):
        return iter(self.terms)

    def __eq__(self, other) -> bool:
        return isinstance(other, BlockedStrings) and other.terms == self.terms

    def __hash__(self) -> int:
        return hash(self.terms)

    def __repr__(self) -> str:
        return f"BlockedStrings({len(self.terms)} terms)"

    def search(self, folded: str, begin: int) -> tuple[int, str] | None:
        """(start, term as given) of the term ending first at or after index `begin` of `folded` (fold's
        output), ties to the longest; None if none ends there."""
        by_last = self.by_last
        for end in range(begin + 1, len(folded) + 1):
            for f in by_last.get(folded[end - 1], ()):  # longest first
                start = end - len(f)
                if start >= 0 and folded.startswith(f, start):
                    return start, self._folded[f]
        return None

    def find_in(self, text: str) -> str | None:
        """A term (as given) found anywhere in `text` (a whole text: a request's input), or None. Each term is
        looked for by str.find, and only when the text holds its first character."""
        folded = fold(text)
        chars = set(folded)
        for f, term in self._folded.items():
            if f[0] in chars and f in folded:
                return term
        return None


@functools.lru_cache(maxsize=8)
def _compiled(terms: tuple[str, ...]) -> BlockedStrings:
    b = object.__new__(BlockedStrings)
    b.terms = terms
    b._folded = {}  # folded term -> the first term given that folds to it
    for t in terms:
        b._folded.setdefault(fold(t), t)
    by_last: dict[str, list[str]] = {}
    for f in b._folded:
        by_last.setdefault(f[-1], []).append(f)
    b.by_last = {c: tuple(sorted(fs, key=len, reverse=True)) for c, fs in by_last.items()}
    b.prefixes = frozenset(f[:n] for f in b._folded for n in range(1, len(f)))
    # A term (or a partial one) starts at a character that folds to a term's first: both cases of an ASCII letter.
    b.first_chars = frozenset(c for f in b._folded for c in {f[0], f[0].upper() if f[0].isascii() else f[0]})
    b.max_len = max((len(f) for f in b._folded), default=0)
    return b


class StopChecker:
    """One request's stop strings (and blocked strings). Feed it text deltas; it returns what may be emitted and
    whether to stop; once stopped, `reason` says which kind ended it."""

    def __init__(self, stop_strings: Sequence[str], include_stop_str: bool = False, min_tokens: int = 0,
                 blocked: BlockedStrings | Sequence[str] | None = None) -> None:
        if isinstance(stop_strings, str):
            raise ValueError("stop_strings must be a list of strings, not a single string")
        if any(not isinstance(s, str) or s == "" for s in stop_strings):
            raise ValueError(f"stop_strings must be non-empty strings, got {list(stop_strings)!r}")
        self.stop_strings = list(dict.fromkeys(stop_strings))
        self.blocked = BlockedStrings(blocked) if blocked else None  # (a BlockedStrings: as it is)
        self.active = bool(self.stop_strings or self.blocked)  # False: feed passes text through (the hot path)
        self.include_stop_str = include_stop_str  # (never a blocked string: that is not emitted at all)
        # Proper prefixes of every stop string: a text tail in this set might still grow into a match.
        self._prefixes = {s[:n] for s in self.stop_strings for n in range(1, len(s))}
        # a match or a partial one starts here
        first = frozenset(s[0] for s in self.stop_strings)
        self._first_chars = first if self.blocked is None else (first | self.blocked.first_chars if first
                                                                else self.blocked.first_chars)
        self._max_held = max(max((len(s) for s in self.stop_strings), default=1),
                             self.blocked.max_len if self.blocked else 1) - 1
        self._held = ""  # text received but not emitted: a possible start of a stop string
        # min_tokens (vLLM's rule): a stop string can end generation from the min_tokens-th token on; before it,
        # matches are ignored (the held-back tail is still kept, so a match that ends later is still found).
        # Blocked strings are never ignored: they must not be emitted, whatever min_tokens asks for.
        self._unchecked = max(0, min_tokens - 1)
        self.stopped = False
        self.matched: str | None = None  # the stop string (or blocked string, as given) that ended generation
        self.reason = "stop"  # once stopped: "stop" (a stop string) or "content_filter" (a blocked string)

    def drop_stop_strings(self) -> None:
        """From now on only blocked strings apply (a grammar has taken hold of the text: outputs.ChoiceState)."""
        self.stop_strings, self._prefixes = [], set()
        self._first_chars = frozenset() if self.blocked is None else self.blocked.first_chars
        self._max_held = (self.blocked.max_len if self.blocked else 1) - 1
        self.active = self.blocked is not None or bool(self._held)  # (text held so far goes out with the next feed)

    @property
    def held_chars(self) -> int:
        """Characters taken but held back (a possible start of a match)."""
        return len(self._held)

    def feed(self, delta: str, token: bool = True) -> tuple[str, bool]:
        """Take the next text delta (one token's text; token=False for text that is no token of its own, such as
        the detokenizer's flush); return (text to emit now, stopped). After a stop, returns ("", True)."""
        if self.stopped:
            return "", True
        if not self.active:
            return delta, False
        if self._unchecked:
            self._unchecked -= token
            text = self._held + delta
            folded = None
            if self.blocked is not None:
                folded = fold(text)
                hit = self.blocked.search(folded, len(self._held))
                if hit is not None:
                    return self._stop(text, hit[0], hit[1], blocked=True)
            keep = self._partial_start(text, folded)
            self._held = text[keep:]
            return text[:keep], False
        if not self._held and self._first_chars.isdisjoint(delta):
            return delta, False  # fast path: no stop string can start (or end) in this delta
        text = self._held + delta
        folded = None if self.blocked is None else fold(text)
        hit = self._first_match(text, folded, len(self._held))
        if hit is not None:
            return self._stop(text, *hit)
        keep = self._partial_start(text, folded)
        self._held = text[keep:]
        return text[:keep], False

    def flush(self) -> str:
        """Generation ended for another reason (stop token, length): release the held-back text."""
        held, self._held = self._held, ""
        return "" if self.stopped else held

    def _stop(self, text: str, start: int, matched: str, blocked: bool) -> tuple[str, bool]:
        self.stopped, self.matched, self._held = True, matched, ""
        if blocked:
            self.reason = "content_filter"
            return text[:start], True
        # Whatever followed the stop string in this delta is dropped.
        return text[:start + len(matched) if self.include_stop_str else start], True

    def _first_match(self, text: str, folded: str | None, held: int) -> tuple[int, str, bool] | None:
        """(start, stop or blocked string, whether blocked) of the match ending first in `text`: at one end a
        blocked string wins (so a stop string kept in the text by include_stop_str can never carry one), then the
        longest; None if none.

        `text[:held]` holds no complete match (it would have stopped already), so every match ends in the
        new part and starts no earlier than `held - len(stop) + 1`.
        """
        best: tuple[int, int, str] | None = None  # (end, start, stop)
        for stop in self.stop_strings:
            start = text.find(stop, max(0, held - len(stop) + 1))
            if start >= 0 and (best is None or (start + len(stop), start) < best[:2]):
                best = (start + len(stop), start, stop)
        if folded is not None:
            hit = self.blocked.search(folded, held)
            if hit is not None and (best is None or hit[0] + len(hit[1]) <= best[0]):
                return hit[0], hit[1], True
        return None if best is None else (best[1], best[2], False)

    def _partial_start(self, text: str, folded: str | None) -> int:
        """Earliest index whose tail is a proper prefix of a stop string or (folded) of a blocked string
        (len(text) when none)."""
        first = self._first_chars
        blocked = None if folded is None else self.blocked.prefixes
        for i in range(max(0, len(text) - self._max_held), len(text)):
            if text[i] in first and (text[i:] in self._prefixes or (blocked is not None and folded[i:] in blocked)):
                return i
        return len(text)
