"""One `http_access` line per HTTP request that is not a webhook: `/v1`, `/metrics`,
`/healthz`, the OpenAPI document, and whatever finds no route. The webhook routes log their
own `callback_*` line and are skipped (one set lookup), so the hot path pays next to nothing.

Fields: method, path (a root path: `Prefixed` runs first), http_status (as in the callback
lines, where `status` is a message's), ms, client (`clients.py`), user_agent, and for `/v1`
with `Authorization: Bearer ...` the presented token's id: the first 8 hex digits of its
SHA-256, which tells the configured token from a wrong one without writing either down.
Levels: info below 400, warning for 4xx, error for 5xx; but /healthz's 503 is a warning:
it is the probe doing its job while the daemon starts or drains, and whatever made the
store fail has logged its own error.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Collection
from typing import Any

from hypercorn.typing import ASGIFramework, ASGIReceiveCallable, ASGISendCallable, Scope

from ..logs import get_logger
from . import openapi
from .clients import ClientResolver, user_agent_of

TOKEN_ID_HEX = 8  # 32 bits: tells a handful of tokens apart, and reveals none of them

log = get_logger("msgledger.access")


class AccessLog:
    """Log each HTTP request to `app` once it has been answered, but those to `skip`."""

    def __init__(self, app: ASGIFramework, clients: ClientResolver,
                 skip: Collection[str] = ()) -> None:
        self._app = app
        self._clients = clients
        self._skip = skip

    async def __call__(self, scope: Scope, receive: ASGIReceiveCallable,
                       send: ASGISendCallable) -> None:
        if scope["type"] != "http" or scope["path"] in self._skip:
            await self._app(scope, receive, send)
            return
        started = time.perf_counter()
        status: int | None = None  # None: no answer began (cancelled, or the client left)

        async def sending(message: Any) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self._app(scope, receive, sending)
        except Exception:
            status = status or 500  # what hypercorn answers for it
            raise
        finally:
            self._log(scope, status, time.perf_counter() - started)

    def _log(self, scope: Any, status: int | None, seconds: float) -> None:
        headers: list[tuple[bytes, bytes]] = scope["headers"]
        fields: dict[str, Any] = {
            "method": scope["method"], "path": scope["path"], "http_status": status,
            "ms": round(seconds * 1000, 3), "client": self._clients.client(scope),
            "user_agent": user_agent_of(_header(headers, b"user-agent"))}
        if openapi.is_api_path(scope["path"]):
            token = token_id(_header(headers, b"authorization"))
            if token is not None:
                fields["token"] = token
        _level(scope["path"], status)("http_access", **fields)


def token_id(authorization: bytes | None) -> str | None:
    """The id of the bearer token in an Authorization header: what follows the scheme,
    spaces around it dropped; None without a Bearer credential."""
    if authorization is None:
        return None
    scheme, _, credentials = authorization.strip().partition(b" ")
    credentials = credentials.strip()
    if scheme.lower() != b"bearer" or not credentials:
        return None
    return hashlib.sha256(credentials).hexdigest()[:TOKEN_ID_HEX]


def _header(headers: list[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    """The first `name` header, as the API reads Authorization."""
    return next((value for key, value in headers if key.lower() == name), None)


def _level(path: str, status: int | None) -> Any:
    if status is None or 400 <= status < 500 or (path == "/healthz" and status == 503):
        return log.warning
    return log.error if status >= 500 else log.info
