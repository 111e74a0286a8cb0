"""``by_identity``: a cache of a function of a call's spec and plan (or backend and spec), looked up by the
identity of those objects.

A repeated call passes the same spec and plan objects (``api``'s and ``kvcache``'s caches hand them out),
and a lookup by ``id`` costs a fraction of the dataclass hash of every field that ``functools.lru_cache``
would compute on each call -- a microsecond a call on the per-call path of small problems. Each entry
holds its two objects, so no other object can take their ids while it is cached.
"""

from __future__ import annotations

import functools

MAX_ENTRIES = 4096  # then the cache starts over: a model decoding meets a new spec every step


def by_identity(make):
    """``make(a, b, *rest)`` cached by ``(id(a), id(b), *rest)``; ``rest`` must be hashable values."""
    cache: dict[tuple, tuple] = {}

    @functools.wraps(make)
    def cached(a, b, *rest):
        key = (id(a), id(b), *rest)
        entry = cache.get(key)
        if entry is None:
            if len(cache) >= MAX_ENTRIES:
                cache.clear()
            entry = cache[key] = (a, b, make(a, b, *rest))
        return entry[2]

    cached.cache_clear = cache.clear
    return cached
