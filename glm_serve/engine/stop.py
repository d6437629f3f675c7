"""Owns stop-string matching over streamed text: `StopChecker` turns text deltas into text safe to emit.

The stop point is where a stop string first ENDS in the whole generated text (ties: the longest, i.e. the
earliest start). That rule depends only on the text, never on how the detokenizer split it into deltas:

    text so far:   ...emitted... | held | delta
                                 └──────┴─ searched: an unfinished match can only start in `held`

`held` is the shortest tail of the text that is still a proper prefix of some stop string (at most
max(len(stop)) - 1 characters): everything before it can never become part of a match, so it is emitted.
Each feed therefore costs O((len(held) + len(delta)) * number of stop strings), never a rescan.
"""

from __future__ import annotations

from typing import Sequence


class StopChecker:
    """One request's stop strings. Feed it text deltas; it returns what may be emitted and whether to stop."""

    def __init__(self, stop_strings: Sequence[str], include_stop_str: bool = False, min_tokens: int = 0) -> None:
        if isinstance(stop_strings, str):
            raise ValueError("stop_strings must be a list of strings, not a single string")
        if any(not isinstance(s, str) or s == "" for s in stop_strings):
            raise ValueError(f"stop_strings must be non-empty strings, got {list(stop_strings)!r}")
        self.stop_strings = list(dict.fromkeys(stop_strings))
        self.include_stop_str = include_stop_str
        # Proper prefixes of every stop string: a text tail in this set might still grow into a match.
        self._prefixes = {s[:n] for s in self.stop_strings for n in range(1, len(s))}
        self._first_chars = frozenset(s[0] for s in self.stop_strings)  # a match or a partial one starts here
        self._max_held = max((len(s) for s in self.stop_strings), default=1) - 1
        self._held = ""  # text received but not emitted: a possible start of a stop string
        # min_tokens (vLLM's rule): a stop string can end generation from the min_tokens-th token on; before it,
        # matches are ignored (the held-back tail is still kept, so a match that ends later is still found).
        self._unchecked = max(0, min_tokens - 1)
        self.stopped = False
        self.matched: str | None = None  # the stop string that ended generation, once stopped

    def feed(self, delta: str, token: bool = True) -> tuple[str, bool]:
        """Take the next text delta (one token's text; token=False for text that is no token of its own, such as
        the detokenizer's flush); return (text to emit now, stopped). After a stop, returns ("", True)."""
        if self.stopped:
            return "", True
        if not self.stop_strings:
            return delta, False
        if self._unchecked:
            self._unchecked -= token
            text = self._held + delta
            keep = self._partial_start(text)
            self._held = text[keep:]
            return text[:keep], False
        if not self._held and self._first_chars.isdisjoint(delta):
            return delta, False  # fast path: no stop string can start (or end) in this delta
        text = self._held + delta
        hit = self._first_match(text, len(self._held))
        if hit is not None:
            start, stop = hit
            self.stopped, self.matched, self._held = True, stop, ""
            # Whatever followed the stop string in this delta is dropped.
            return text[:start + len(stop) if self.include_stop_str else start], True
        keep = self._partial_start(text)
        self._held = text[keep:]
        return text[:keep], False

    def flush(self) -> str:
        """Generation ended for another reason (stop token, length): release the held-back text."""
        held, self._held = self._held, ""
        return "" if self.stopped else held

    def _first_match(self, text: str, held: int) -> tuple[int, str] | None:
        """(start, stop string) of the match ending first in `text`, ties to the longest; None if none.

        `text[:held]` holds no complete match (it would have stopped already), so every match ends in the
        new part and starts no earlier than `held - len(stop) + 1`.
        """
        best: tuple[int, int, str] | None = None  # (end, start, stop)
        for stop in self.stop_strings:
            start = text.find(stop, max(0, held - len(stop) + 1))
            if start >= 0 and (best is None or (start + len(stop), start) < best[:2]):
                best = (start + len(stop), start, stop)
        return None if best is None else (best[1], best[2])

    def _partial_start(self, text: str) -> int:
        """Earliest index whose tail is a proper prefix of a stop string (len(text) when none)."""
        first = self._first_chars
        for i in range(max(0, len(text) - self._max_held), len(text)):
            if text[i] in first and text[i:] in self._prefixes:
                return i
        return len(text)
