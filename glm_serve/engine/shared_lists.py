"""Owns sending a blocked-strings list (engine/stop.py BlockedStrings: a server's content filter, the same object
on every request) across ProcessEngine's pipe once instead of with every request: 10,000 terms are about 50 KB
pickled, and unpickled, hashed and looked up again in the engine process, per request.

    server process (sender thread)                engine process (reader thread)
    first request with the list:  ("blocked", key, terms)  ──>  received[key] = BlockedStrings(terms), compiled once
    that request and later ones:  params.blocked_strings = ListRef(key)  ──>  unpickles as received[key]

Both ends run on the one thread that writes (reads) the pipe, in pipe order, so a reference never arrives before
its list. At most MAX_SHARED lists go by reference; more distinct lists than that (LLM users with a list of their
own per request) travel whole, as before.
"""

from __future__ import annotations

import copy
import dataclasses

from glm_serve.engine.stop import BlockedStrings

MAX_SHARED = 16


class ListRef:
    """A list sent earlier on this pipe, by its key: unpickles in the engine process as the list itself."""

    __slots__ = ("key",)

    def __init__(self, key: int):
        self.key = key

    def __reduce__(self):
        return _received, (self.key,)


_RECEIVED: dict[int, BlockedStrings] = {}  # engine process: key -> the list, compiled


def _received(key: int) -> BlockedStrings:
    return _RECEIVED[key]


def receive(key: int, terms) -> None:
    """Engine process: the ("blocked", key, terms) command."""
    _RECEIVED[key] = BlockedStrings(list(terms))


class ListSender:
    """Server process, the sender thread's: `outgoing(add, send)` -> the AddRequest to pickle, its list replaced by
    a ListRef, after sending the list itself with `send` the first time."""

    def __init__(self) -> None:
        # id(list) -> (the list, kept alive so that its id is not reused; its key)
        self._keys: dict[int, tuple[BlockedStrings, int]] = {}

    def outgoing(self, add, send):
        blocked = add.params.blocked_strings
        if not isinstance(blocked, BlockedStrings):
            return add
        entry = self._keys.get(id(blocked))
        if entry is None:
            if len(self._keys) >= MAX_SHARED:
                return add  # sent whole
            entry = self._keys[id(blocked)] = (blocked, len(self._keys))
            send(("blocked", entry[1], blocked.terms))
        params = copy.copy(add.params)  # (the caller's own is left as it is)
        params.blocked_strings = ListRef(entry[1])
        return dataclasses.replace(add, params=params)
