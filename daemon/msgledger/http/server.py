"""The HTTP front: one ASGI app that sends the webhook routes down the lean path and
everything else to Quart, served by hypercorn's trio worker."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import trio
from hypercorn.config import Config
from hypercorn.trio import serve
from hypercorn.typing import ASGIFramework, ASGIReceiveCallable, ASGISendCallable, Scope

from ..events import JournalIntake
from .webhooks import ROUTES, WebhookReceiver

KEEP_ALIVE_MAX_REQUESTS = 100_000  # a proxy's pooled connection should not churn every 1,000
KEEP_ALIVE_TIMEOUT = 75  # seconds; longer than common proxies' idle timeouts (60 s)
LISTEN_BACKLOG = 1024  # connections waiting for accept; a proxy opens its pool at once


class Front:
    """Route `/twilio/*` to the webhook receiver and the rest to Quart.

    Without a receiver (`http.webhooks = false`) the webhook paths fall through to Quart,
    which answers 404.
    """

    def __init__(self, webhooks: WebhookReceiver | None, app: ASGIFramework,
                 intake: JournalIntake) -> None:
        self._webhooks = webhooks
        self._app = app
        self.intake = intake  # the front's clone: closed once the server has stopped

    async def __call__(self, scope: Scope, receive: ASGIReceiveCallable,
                       send: ASGISendCallable) -> None:
        if self._webhooks is not None and scope["type"] == "http" and scope["path"] in ROUTES:
            await self._webhooks(scope, receive, send)
        else:
            await self._app(scope, receive, send)


def address_bind(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def fd_bind(fd: int) -> str:
    """A listener made by someone else (the main process, for its fronts)."""
    return f"fd://{fd}"


def hypercorn_config(bind: str, graceful_timeout: float) -> Config:
    config = Config()
    config.bind = [bind]
    config.graceful_timeout = graceful_timeout
    config.backlog = LISTEN_BACKLOG  # hypercorn listens again with it, fd:// sockets too
    config.keep_alive_max_requests = KEEP_ALIVE_MAX_REQUESTS
    config.keep_alive_timeout = KEEP_ALIVE_TIMEOUT
    config.accesslog = None  # webhooks log their own canonical line
    config.errorlog = logging.getLogger("hypercorn.error")
    return config


async def serve_http(app: ASGIFramework, config: Config,
                     shutdown: Callable[[], Awaitable[Any]], *,
                     task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve until `shutdown` returns, then finish in-flight requests (graceful_timeout)."""
    await serve(app, config, shutdown_trigger=shutdown, task_status=task_status)
