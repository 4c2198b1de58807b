"""A limit on failed authentication per client address, so wrong keys cannot be tried at full speed.

Each address has a token bucket: `auth_failure_burst` failures at once, then `auth_failure_per_second`. Only
failures take a token; past the limit the address is answered 429 with `Retry-After` *before* its key is looked
up, so a guesser gets neither an answer nor a database query. The buckets live in this process's memory (a
restart or another replica starts afresh), at most `MAX_ADDRESSES` of them, the least recently failing dropped
first.

A valid key is never slowed: successes cost nothing, and a key this process accepted recently (its sha256 is
remembered) is still looked up while its address is over the limit, so clients behind the same address as a
misbehaving one keep working. A key that was never accepted yet waits like any other until the bucket refills.

The address is the one uvicorn reports: behind a reverse proxy, list the proxy in FORWARDED_ALLOW_IPS so that
it is the client's and not the proxy's.
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from service.http.problems import Problem

MAX_ADDRESSES = 10_000  # buckets kept; past it the least recently failing address is forgotten
MAX_ACCEPTED_KEYS = 4096  # recently accepted key hashes remembered


@dataclass
class _Bucket:
    tokens: float
    updated: float


class FailedAuthLimit:
    """Token buckets of failed authentications, by client address. Thread-safe."""

    def __init__(self, burst: int, per_second: float, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.burst = burst
        self.per_second = per_second
        self.clock = clock
        self._lock = threading.Lock()
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()
        self._accepted: OrderedDict[str, None] = OrderedDict()

    def check(self, address: str, key_hash: str | None) -> None:
        """Raise a 429 when `address` is over its limit, unless `key_hash` is of a key accepted recently."""
        with self._lock:
            bucket = self._refilled(address)
            if bucket is None or bucket.tokens >= 1 or key_hash in self._accepted:
                return
            wait = math.ceil((1 - bucket.tokens) / self.per_second)
        raise Problem(
            429,
            f"too many failed authentications from this address; retry after {wait} s",
            headers={"Retry-After": str(wait)},
        )

    def failed(self, address: str, key_hash: str | None) -> None:
        """One failed authentication from `address`; the key it presented is no longer vouched for."""
        with self._lock:
            if key_hash is not None:
                self._accepted.pop(key_hash, None)
            bucket = self._refilled(address) or _Bucket(tokens=self.burst, updated=self.clock())
            bucket.tokens = max(0.0, bucket.tokens - 1)
            self._buckets[address] = bucket
            self._buckets.move_to_end(address)
            while len(self._buckets) > MAX_ADDRESSES:
                self._buckets.popitem(last=False)

    def accepted(self, key_hash: str) -> None:
        """A key that authenticated: it passes `check` from now on, even from an address over the limit."""
        with self._lock:
            self._accepted[key_hash] = None
            self._accepted.move_to_end(key_hash)
            while len(self._accepted) > MAX_ACCEPTED_KEYS:
                self._accepted.popitem(last=False)

    def _refilled(self, address: str) -> _Bucket | None:
        bucket = self._buckets.get(address)
        if bucket is not None:
            now = self.clock()
            bucket.tokens = min(self.burst, bucket.tokens + (now - bucket.updated) * self.per_second)
            bucket.updated = now
        return bucket
