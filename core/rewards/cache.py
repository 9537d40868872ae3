"""A small thread-safe LRU map with hit/miss counts, bounded by entries and optionally by bytes."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any

_MISSING = object()


class LRUCache:
    """Keeps the ``maxsize`` most recently used entries; ``hits``/``misses`` count lookups.

    With ``max_bytes`` and ``size_of`` (an entry's size in bytes), it also keeps the entries'
    total under ``max_bytes``: for values as different in size as images.
    """

    def __init__(
        self, maxsize: int = 10_000, max_bytes: int | None = None, size_of: Callable[[Any], int] | None = None
    ):
        if maxsize < 1:
            raise ValueError(f"cache size must be >= 1, got {maxsize}")
        if (max_bytes is None) != (size_of is None):
            raise ValueError("max_bytes and size_of go together")
        self.maxsize = maxsize
        self.max_bytes = max_bytes
        self._size_of = size_of or (lambda _value: 0)
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self._data: OrderedDict[Hashable, Any] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Hashable, default: Any = None) -> Any:
        """The value for ``key`` (marking it recently used), else ``default``."""
        with self._lock:
            value = self._data.get(key, _MISSING)
            if value is _MISSING:
                self.misses += 1
                return default
            self._data.move_to_end(key)
            self.hits += 1
            return value

    def put(self, key: Hashable, value: Any) -> None:
        """Store ``value``, evicting the least recently used entries while over either bound (a
        value larger than ``max_bytes`` alone is not kept)."""
        with self._lock:
            old = self._data.pop(key, _MISSING)
            if old is not _MISSING:
                self.bytes -= self._size_of(old)
            self._data[key] = value
            self.bytes += self._size_of(value)
            while self._data and (
                len(self._data) > self.maxsize or (self.max_bytes is not None and self.bytes > self.max_bytes)
            ):
                self.bytes -= self._size_of(self._data.popitem(last=False)[1])

    def __len__(self) -> int:
        return len(self._data)
