"""The main process's ASGI app without an HTTP server of its own: its lifespan, and the
requests the fronts relay, run in memory."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import trio
from hypercorn.typing import ASGIFramework, ConnectionState, HTTPScope, LifespanScope

from ..logs import get_logger
from .link import Answer

log = get_logger("msgledger.relay")
SHUTDOWN_TIMEOUT = 10.0  # seconds for the app's own shutdown (Quart's background tasks)


@asynccontextmanager
async def open_app(app: ASGIFramework) -> AsyncIterator[None]:
    """Run `app`'s ASGI lifespan: started on entry, shut down on exit, as a server would."""
    started, stopping, stopped = trio.Event(), trio.Event(), trio.Event()
    asked = False

    async def receive() -> Any:
        nonlocal asked
        if not asked:
            asked = True
            return {"type": "lifespan.startup"}
        await stopping.wait()
        return {"type": "lifespan.shutdown"}

    async def send(message: Any) -> None:
        kind = message["type"]
        if kind.endswith(".failed"):
            raise RuntimeError(f"{kind}: {message.get('message', '')}")
        (started if kind == "lifespan.startup.complete" else stopped).set()

    scope: LifespanScope = {"type": "lifespan", "asgi": {"version": "3.0", "spec_version": "2.0"},
                            "state": ConnectionState({})}
    async with trio.open_nursery() as nursery:
        nursery.start_soon(app, scope, receive, send)
        await started.wait()
        try:
            yield
        finally:
            stopping.set()
            with trio.move_on_after(SHUTDOWN_TIMEOUT, shield=True):
                await stopped.wait()
            nursery.cancel_scope.cancel()  # an app that outstays its shutdown is cut off


async def call_asgi(app: ASGIFramework, scope: HTTPScope, body: bytes) -> Answer:
    """Run one whole request through `app`; its status, headers and whole body."""
    status, headers, chunks = 500, [], []
    answered = trio.Event()
    delivered = False

    async def receive() -> Any:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        await answered.wait()  # the client stays connected until the answer is complete
        return {"type": "http.disconnect"}

    async def send(message: Any) -> None:
        nonlocal status, headers
        if message["type"] == "http.response.start":
            status, headers = message["status"], list(message.get("headers", []))
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                answered.set()

    try:
        await app(scope, receive, send)
    except Exception:  # the app's own bug: answer 500 as a server would, keep the link
        log.exception("relayed_request_failed", path=scope["path"])
        return 500, [(b"content-type", b"application/json")], b'{"error": "internal error"}'
    return status, headers, b"".join(chunks)
