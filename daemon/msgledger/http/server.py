"""The HTTP front: one ASGI app that sends the webhook routes down the lean path and
everything else to Quart, served by hypercorn's trio worker over msgledger's connection
layer (`connections.py`: HTTP/1.1 only, a deadline per request body, one connection's
failure kept to itself)."""

from __future__ import annotations

import logging
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import trio
from hypercorn.trio import serve
from hypercorn.typing import ASGIFramework, ASGIReceiveCallable, ASGISendCallable, Scope
from quart_trio import QuartTrio

from ..journal_client import JournalClient
from ..listeners import LISTEN_BACKLOG, hand_over
from ..metrics import Metrics
from ..settings import Settings
from . import connections
from .connections import ConnectionConfig
from .edge import at_the_edge
from .webhooks import ROUTES, WebhookReceiver, respond

KEEP_ALIVE_MAX_REQUESTS = 100_000  # a proxy's pooled connection should not churn every 1,000
KEEP_ALIVE_TIMEOUT = 75  # seconds; longer than common proxies' idle timeouts (60 s)
# What the public listener serves when /v1 and /metrics have their own (http.admin_listen).
PUBLIC_PATHS = frozenset({*ROUTES, "/healthz"})


# What an app serves, as (werkzeug rule, methods) pairs: how front processes learn the
# main process's routes, to answer 404 and 405 themselves before a body is read.
Routes = list[tuple[str, list[str]]]


def routes_of(app: QuartTrio) -> Routes:
    return [(rule.rule, sorted(rule.methods or ())) for rule in app.url_map.iter_rules()]


class Router:
    """The main process's HTTP router: `/twilio/*` to the webhook receiver, the rest to
    Quart. (A front process has its own, `workers/front.FrontRouter`.)

    Without a receiver (`http.webhooks = false`) the webhook paths fall through to Quart,
    which answers 404.
    """

    def __init__(self, webhooks: WebhookReceiver | None, app: QuartTrio,
                 journal: JournalClient) -> None:
        self._webhooks = webhooks
        self.app = app  # the rest; alone, the admin listener's router (http.admin_listen)
        self.journal = journal  # what it all journals through: closed once serving ends
        self.routes = routes_of(app)

    async def __call__(self, scope: Scope, receive: ASGIReceiveCallable,
                       send: ASGISendCallable) -> None:
        if self._webhooks is not None and scope["type"] == "http" and scope["path"] in ROUTES:
            await self._webhooks(scope, receive, send)
        else:
            await self.app(scope, receive, send)


class PublicOnly:
    """The public listener's router when `/v1` and `/metrics` are served on the admin
    listener: the webhooks and /healthz, and a 404 for everything else, before any body."""

    def __init__(self, app: ASGIFramework) -> None:
        self._app = app

    async def __call__(self, scope: Scope, receive: ASGIReceiveCallable,
                       send: ASGISendCallable) -> None:
        if scope["type"] == "http" and scope["path"] not in PUBLIC_PATHS:
            await respond(send, 404, "no such route")
        elif scope["type"] != "websocket":  # nothing here speaks websockets
            await self._app(scope, receive, send)


def public_router(router: ASGIFramework, settings: Settings) -> ASGIFramework:
    """What the public listener serves: `router`, less `/v1` and `/metrics` if they have a
    listener of their own."""
    return at_the_edge(router if settings.http_admin_listen is None else PublicOnly(router),
                       settings)


def hypercorn_config(bind: str, settings: Settings, metrics: Metrics) -> ConnectionConfig:
    config = ConnectionConfig(metrics, body_timeout=settings.http_read_timeout)
    config.bind = [bind]
    config.graceful_timeout = settings.http_graceful_timeout
    config.backlog = LISTEN_BACKLOG  # hypercorn listens again with it, fd:// sockets too
    config.keep_alive_max_requests = KEEP_ALIVE_MAX_REQUESTS
    config.keep_alive_timeout = KEEP_ALIVE_TIMEOUT
    config.accesslog = None  # webhooks log their own canonical line
    config.errorlog = logging.getLogger("hypercorn.error")
    # config.read_timeout stays None: it bounds every read, idle keep-alive included, and
    # restarts on each byte. The connection layer bounds each body instead.
    return config


async def serve_http(app: ASGIFramework, config: ConnectionConfig,
                     shutdown: Callable[[], Awaitable[Any]], *,
                     task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve until `shutdown` returns, then finish in-flight requests (graceful_timeout)."""
    connections.install()
    await serve(app, config, shutdown_trigger=shutdown, task_status=task_status)


async def serve_admin(app: QuartTrio, listener: socket.socket, settings: Settings,
                      metrics: Metrics, stop: trio.Event, *,
                      task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED
                      ) -> None:
    """Serve `/v1`, `/metrics` and `/healthz` on the admin listener, from the main process
    (which answers them in any case), until `stop`; then finish in-flight requests. The
    app's lifespan belongs to the public server (or the fronts' relay): it runs once."""
    config = hypercorn_config(hand_over(listener), settings, metrics)
    await serve_http(at_the_edge(WithoutLifespan(app), settings, public=False), config,
                     stop.wait, task_status=task_status)


class WithoutLifespan:
    """`app` with ASGI's lifespan answered here and not passed on: for a second server of
    an app whose startup and shutdown another server already runs."""

    def __init__(self, app: ASGIFramework) -> None:
        self._app = app

    async def __call__(self, scope: Scope, receive: ASGIReceiveCallable,
                       send: ASGISendCallable) -> None:
        if scope["type"] == "lifespan":
            await answer_lifespan(receive, send)
        else:
            await self._app(scope, receive, send)


async def answer_lifespan(receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
    """Complete ASGI's lifespan startup and shutdown with nothing to do for either."""
    while True:
        message: Any = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
