"""A stand-in Twilio for answers the simulator never gives: any status and body, served
by hypercorn on 127.0.0.1, for the real `twilio` client to meet."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import trio
from hypercorn.config import Config
from hypercorn.trio import serve


async def lifespan(receive: Any, send: Any) -> None:
    """An ASGI app's lifespan, with nothing to start or stop."""
    while (await receive())["type"] == "lifespan.startup":
        await send({"type": "lifespan.startup.complete"})
    await send({"type": "lifespan.shutdown.complete"})


async def read_body(receive: Any) -> bytes:
    """An ASGI request's whole body."""
    body = b""
    while True:
        part = await receive()
        body += part.get("body", b"")
        if not part.get("more_body"):
            return body


def answering(status: int, body: str, content_type: str = "application/json") -> Any:
    """An ASGI Twilio that gives every request the same answer."""

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await lifespan(receive, send)
        if scope["type"] == "http":
            headers = [(b"content-type", content_type.encode())]
            await send({"type": "http.response.start", "status": status, "headers": headers})
            await send({"type": "http.response.body", "body": body.encode()})

    return app


async def serve_on_loopback(nursery: trio.Nursery, app: Any) -> str:
    """`app` served by hypercorn on 127.0.0.1:<a free port> until `nursery` is cancelled;
    its base URL."""
    config = Config()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None
    config.graceful_timeout = 0
    [bound] = await nursery.start(partial(serve, app, config,
                                          shutdown_trigger=trio.sleep_forever))
    return str(bound)


@asynccontextmanager
async def fake_twilio(app: Any) -> AsyncIterator[str]:
    """`app` served by hypercorn on 127.0.0.1; yields its base URL."""
    async with trio.open_nursery() as nursery:
        yield await serve_on_loopback(nursery, app)
        nursery.cancel_scope.cancel()
