"""API keys and admission: raw keys and the vendor SDKs' HS256 JWTs (exp in milliseconds), checked in constant
time; per-key in-flight limits (429 / 1302), per-key request rates (429 / 1303) and the server-wide queue limit
(429 / 1305).

A key is `id.secret` (the vendor's format) or any other string (raw use only: a JWT needs the secret). Keys and
tokens never reach a log line or an error message.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import math
import threading
import time
from dataclasses import dataclass

from glm_serve.api.errors import APIError

# An `exp` below this is in seconds (a stock JWT library's habit); the vendor SDKs write milliseconds.
_MS_THRESHOLD = 10**11


@dataclass(frozen=True)
class _Key:
    key_id: str  # the part before the dot; for a key without one, _raw_key_id(key)
    secret: str  # the part after the dot; "" when there is none
    raw: bytes  # the whole key, utf-8


class KeyStore:
    """Configured keys. `authenticate(header)` returns the caller's key id, or raises APIError 1000-1004."""

    def __init__(self, keys: list[str]):
        self._keys: list[_Key] = []
        for k in keys:
            if not isinstance(k, str) or not k.strip():
                raise ValueError("api keys must be non-empty strings")
            k = k.strip()
            kid, dot, secret = k.partition(".")
            key = _Key(kid if dot else _raw_key_id(k), secret if dot else "", k.encode())
            if any(other.key_id == key.key_id for other in self._keys):
                # One id, two secrets: JWTs would verify against one of them only, and both would share the
                # other's files, batches, tasks and concurrency limit.
                raise ValueError(f"two api keys have the id {kid!r} (the part before the dot): ids must differ"
                                 if dot else "the same api key is given twice")
            self._keys.append(key)
        self._by_id = {k.key_id: k for k in self._keys if k.secret}

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def authenticate(self, authorization: str | None) -> str:
        if not authorization or not authorization.strip():
            raise APIError("1001", "no Authorization header: send 'Authorization: Bearer <api key>'")
        scheme, _, token = authorization.strip().partition(" ")
        token = token.strip() if scheme.lower() == "bearer" else authorization.strip()
        if not token:
            raise APIError("1001", "the Authorization header carries no token")
        # Compare against every key, without stopping at a match, so timing says nothing about which key.
        token_bytes, match = token.encode(), None
        for k in self._keys:
            if hmac.compare_digest(token_bytes, k.raw):
                match = k
        if match is not None:
            return match.key_id
        if token.count(".") == 2:
            return self._verify_jwt(token)
        raise APIError("1000", "authentication failed: unknown api key")

    def _verify_jwt(self, token: str) -> str:
        head_b64, payload_b64, sig_b64 = token.split(".")
        try:
            header = json.loads(_b64decode(head_b64))
            payload = json.loads(_b64decode(payload_b64))
            signature = _b64decode(sig_b64)
        except (ValueError, binascii.Error, UnicodeDecodeError, RecursionError):
            # RecursionError: deeply nested JSON ("[[[[..."), which json.loads cannot read; before any key check,
            # so anyone could turn it into a 500 (that the SDKs retry) and a logged traceback
            raise APIError("1002", "invalid token: not a well-formed JWT") from None
        if not isinstance(header, dict) or not isinstance(payload, dict):
            raise APIError("1002", "invalid token: not a well-formed JWT")
        if header.get("alg") != "HS256":
            raise APIError("1002", "invalid token: only HS256 tokens are accepted")
        key = self._by_id.get(payload.get("api_key")) if isinstance(payload.get("api_key"), str) else None
        if key is None:
            raise APIError("1002", "invalid token: unknown api_key")
        expected = hmac.new(key.secret.encode(), f"{head_b64}.{payload_b64}".encode(), hashlib.sha256).digest()
        if not hmac.compare_digest(expected, signature):
            raise APIError("1004", "token verification failed: bad signature")
        exp = payload.get("exp")
        if isinstance(exp, bool) or not isinstance(exp, (int, float)) or not math.isfinite(exp):
            # NaN and infinity (Python's json reads both) would make a token that never expires
            raise APIError("1002", "invalid token: exp must be a number (milliseconds since the epoch)")
        exp_ms = exp if exp >= _MS_THRESHOLD else exp * 1000
        if exp_ms <= time.time() * 1000:
            raise APIError("1003", "token expired")
        return key.key_id


def _raw_key_id(key: str) -> str:
    """The id of a key without a dot, which is all secret. The id is what per-key limits count by and what
    files, batches and async tasks record as their owner (batch/store.py writes it to disk), so it is a digest,
    not the key; and it holds a dot, so it is never the id of an `id.secret` key (the part before its dot)."""
    return "raw." + hashlib.sha256(key.encode()).hexdigest()[:32]


def _b64decode(part: str) -> bytes:
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


class Slot:
    """One admitted request. `release()` is idempotent, so every exit path may call it."""

    def __init__(self, limits: Admission, key_id: str | None):
        self._limits, self.key_id, self._held = limits, key_id, True

    def release(self) -> None:
        if self._held:
            self._held = False
            self._limits._release(self.key_id)


class RateLimiter:
    """Requests per minute per key, as token buckets: a key may burst its whole minute at once, then gets one
    request every 60/rpm seconds. A refused request spends nothing; its error says (Retry-After) when the next
    one will pass, which the openai SDK's retries wait for. Not thread-safe on its own: Admission holds its lock."""

    def __init__(self, requests_per_minute: int, clock=time.monotonic):
        self.capacity = float(requests_per_minute)
        self.per_second = requests_per_minute / 60.0
        self._clock = clock
        # key id -> (tokens, when counted); keys are configured, so there are few
        self._buckets: dict[str, tuple[float, float]] = {}

    def take(self, key_id: str) -> float:
        """Spend one request of key_id's budget: 0.0, or, when none is left, the seconds until there is one."""
        now = self._clock()
        tokens, then = self._buckets.get(key_id, (self.capacity, now))
        tokens = min(self.capacity, tokens + (now - then) * self.per_second)
        if tokens >= 1.0:
            self._buckets[key_id] = (tokens - 1.0, now)
            return 0.0
        self._buckets[key_id] = (tokens, now)
        return (1.0 - tokens) / self.per_second


class Admission:
    """In-flight accounting at the API edge (not in the engine): a request holds a Slot from admission until
    its last byte (or its async task) is done.

    max_concurrency_per_key: in-flight requests one key may have (None = unlimited) -> 429 / 1302.
    max_in_flight: requests the server holds at once, running plus queued (None = unlimited) -> 429 / 1305.
    requests_per_minute_per_key: admitted requests per key and minute (None = unlimited) -> 429 / 1303, with
    Retry-After.
    """

    def __init__(self, max_concurrency_per_key: int | None, max_in_flight: int | None,
                 requests_per_minute_per_key: int | None = None, clock=time.monotonic):
        for name, v in (("max_concurrency_per_key", max_concurrency_per_key), ("max_in_flight", max_in_flight),
                        ("requests_per_minute_per_key", requests_per_minute_per_key)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"{name} must be a positive integer or None, got {v!r}")
        self.max_per_key = max_concurrency_per_key
        self.max_in_flight = max_in_flight
        self._rates = None if requests_per_minute_per_key is None else RateLimiter(requests_per_minute_per_key,
                                                                                   clock)
        self._lock = threading.Lock()
        self._per_key: dict[str | None, int] = {}
        self.in_flight = 0

    def acquire(self, key_id: str | None) -> Slot:
        with self._lock:
            if self.max_in_flight is not None and self.in_flight >= self.max_in_flight:
                raise APIError("1305", f"server overloaded: {self.in_flight} requests in flight and the queue is "
                                       "full; retry later")
            held = self._per_key.get(key_id, 0)
            if key_id is not None and self.max_per_key is not None and held >= self.max_per_key:
                raise APIError("1302", f"too many concurrent requests for this api key (limit "
                                       f"{self.max_per_key}); wait for one to finish")
            # Last: a request refused for the checks above has not spent any of its key's rate.
            wait = 0.0 if key_id is None or self._rates is None else self._rates.take(key_id)
            if wait > 0.0:
                seconds = max(1, math.ceil(wait))
                raise APIError("1303", f"request rate too high for this api key (limit "
                                       f"{self._rates.capacity:.0f} a minute); retry in {seconds} s",
                               headers={"Retry-After": str(seconds)})
            self._per_key[key_id] = held + 1
            self.in_flight += 1
        return Slot(self, key_id)

    def _release(self, key_id: str | None) -> None:
        with self._lock:
            self.in_flight -= 1
            left = self._per_key.get(key_id, 1) - 1
            if left:
                self._per_key[key_id] = left
            else:
                self._per_key.pop(key_id, None)
