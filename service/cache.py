"""A small thread-safe LRU of finished response bodies, keyed by request path, and the ASGI middleware
that serves them.

A finished plan and its artifacts never change, so their serialised bodies can be kept and served without
touching the database or re-encoding JSON. The routes fill the cache (``GET /v1/plans/{id}`` once done,
``/timeline``, ``/report``); :class:`CachedReads` answers a ``GET`` of a cached path before routing, which
on this 2-core machine roughly halves the server's CPU time per cached read (FastAPI's routing and
dependency resolution cost more than sending the bytes).
"""

from __future__ import annotations

import threading
from collections import OrderedDict

from starlette.types import ASGIApp, Receive, Scope, Send

__all__ = ["CachedReads", "ResponseCache"]


class ResponseCache:
    """``get``/``put`` of immutable response bodies, evicting the least recently used past ``entries``."""

    def __init__(self, entries: int) -> None:
        self._entries = entries
        self._data: OrderedDict[str, tuple[bytes, str]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str) -> tuple[bytes, str] | None:
        """``(body, media type)`` of a cached path, or ``None``."""
        with self._lock:
            body = self._data.get(key)
            if body is not None:
                self._data.move_to_end(key)
            return body

    def put(self, key: str, body: bytes, media_type: str = "application/json") -> None:
        if self._entries <= 0:
            return
        with self._lock:
            self._data[key] = (body, media_type)
            self._data.move_to_end(key)
            while len(self._data) > self._entries:
                self._data.popitem(last=False)

    def __len__(self) -> int:
        with self._lock:
            return len(self._data)


class CachedReads:
    """Answer ``GET`` requests for cached paths straight from the :class:`ResponseCache`."""

    def __init__(self, app: ASGIApp, *, cache: ResponseCache) -> None:
        self.app = app
        self.cache = cache

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "GET" and not scope.get("query_string"):
            hit = self.cache.get(scope["path"])
            if hit is not None:
                body, media_type = hit
                await send(
                    {
                        "type": "http.response.start",
                        "status": 200,
                        "headers": [
                            (b"content-type", media_type.encode()),
                            (b"content-length", str(len(body)).encode()),
                        ],
                    }
                )
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)
