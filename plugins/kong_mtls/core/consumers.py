"""The in-process cache of Kong consumer rows shared by the authenticating plugins.

Kong offers no cache a plugin server can use (`kong.cache` needs `self`), and
`kong.client.load_consumer` reads the database on every call, so answers are kept for `ttl`
seconds. Misses are kept too, but for `negative_ttl` at most: over RPC a failed database read and
a missing consumer both arrive as nil (Kong 3.x forwards only a PDK function's first return value).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any, Optional

from kong_mtls.core.chain import LRU

#: Longest time a "no such consumer" answer is trusted.
NEGATIVE_TTL = 10.0

LoadConsumer = Callable[[str], Optional[Mapping[str, Any]]]


def is_consumer(row: object) -> bool:
    """A consumer row as Kong returns it: a table with a string id."""
    return isinstance(row, Mapping) and isinstance(row.get("id"), str) and bool(row["id"])


class ConsumerCache:
    """Consumer rows by reference (id or username); `ttl` 0 disables caching."""

    def __init__(self, ttl: float, *, negative_ttl: float = NEGATIVE_TTL, max_entries: int = 10_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl = ttl
        self.negative_ttl = min(ttl, negative_ttl)
        self.clock = clock
        self._lru: LRU[str, tuple[float, Mapping[str, Any] | None]] = LRU(max_entries if ttl > 0 else 0)

    def get(self, ref: str, load: LoadConsumer) -> Mapping[str, Any] | None:
        now = self.clock()
        entry = self._lru.get(ref)
        if entry is not None and entry[0] > now:
            return entry[1]
        row = load(ref)
        row = row if is_consumer(row) else None
        ttl = self.ttl if row is not None else self.negative_ttl
        if ttl > 0:
            self._lru.put(ref, (now + ttl, row))
        else:
            self._lru.pop(ref)
        return row

    def until(self, ref: str) -> float | None:
        """When (on `clock`) the cached row of `ref` stops being used; None when none is cached."""
        entry = self._lru.get(ref)
        return entry[0] if entry is not None else None

    def left(self, until: float | None) -> float:
        """Seconds from now to `until` (an `until` answer), 0 for None or the past: how long a
        verdict carrying that row may be kept elsewhere."""
        return max(0.0, until - self.clock()) if until is not None else 0.0
