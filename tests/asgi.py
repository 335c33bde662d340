"""What the tests' own little ASGI apps share: reading a whole request body. (Their
lifespan is the daemon's `http.server.answer_lifespan`.)"""

from __future__ import annotations

from typing import Any


async def read_body(receive: Any) -> bytes:
    """The request's body, however many messages it came in."""
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            return body
