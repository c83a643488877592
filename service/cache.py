"""A small thread-safe LRU of finished response bodies (bytes), keyed by resource path.

Plans, validations and their artifacts never change once done, so their serialised bodies can be kept and
served without touching the database or re-encoding JSON: this is what keeps cached plan reads fast under
many concurrent clients.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

__all__ = ["ResponseCache"]


class ResponseCache:
    """``get``/``put`` of immutable response bodies, evicting the least recently used past ``entries``."""

    def __init__(self, entries: int) -> None:
        self._entries = entries
        self._data: OrderedDict[str, bytes] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str) -> bytes | None:
        with self._lock:
            body = self._data.get(key)
            if body is not None:
                self._data.move_to_end(key)
            return body

    def put(self, key: str, body: bytes) -> None:
        if self._entries <= 0:
            return
        with self._lock:
            self._data[key] = body
            self._data.move_to_end(key)
            while len(self._data) > self._entries:
                self._data.popitem(last=False)

    def __len__(self) -> int:
        with self._lock:
            return len(self._data)
