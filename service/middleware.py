"""ASGI middleware: the request body size limit.

A body larger than ``max_body_bytes`` is answered ``413`` with the usual JSON error body, before any route
or JSON parser sees it. ``Content-Length`` is checked first; a chunked body without one is counted as it
arrives and refused as soon as it passes the limit (it is never buffered beyond the limit).
"""

from __future__ import annotations

import json
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from distplan.service.errors import error_body

__all__ = ["BodySizeLimit"]


class BodySizeLimit:
    """Refuse request bodies over ``max_bytes`` with ``413``."""

    def __init__(self, app: ASGIApp, *, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def _reject(self, send: Send, size: str) -> None:
        body = json.dumps(
            error_body(
                "PayloadTooLarge",
                f"request body of {size} is larger than this server's limit of {self.max_bytes} bytes",
                limit_bytes=self.max_bytes,
            )
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared: int | None = None
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = None
        if declared is not None and declared > self.max_bytes:
            await self._reject(send, f"{declared} bytes")
            return
        # Read the body up to the limit (it is at most max_bytes), then replay it to the app.
        chunks: list[bytes] = []
        total = 0
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            total += len(chunk)
            if total > self.max_bytes:
                await self._reject(send, f"more than {self.max_bytes} bytes")
                return
            chunks.append(chunk)
            more = bool(message.get("more_body", False))
        replayed = False
        body = b"".join(chunks)

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            message: Any = await receive()
            return message  # http.disconnect once the client goes

        await self.app(scope, replay, send)
