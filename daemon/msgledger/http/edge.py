"""What every request passes first, in whichever process holds its connection (the main
process, or a front): the public URL's path prefix is taken off, so the routers below see
root paths whether the proxy stripped the prefix or passed it on; then each request but
a webhook gets its `http_access` line (`access.py`), unless `log.access = false`.

Relayed requests (a front's `/v1` and `/metrics`) reach the main process's router already
stripped and logged, so nothing here runs twice: the line is written where the client's
connection is, and names the status the client got.
"""

from __future__ import annotations

from typing import TypeVar, cast
from urllib.parse import unquote

from hypercorn.typing import ASGIFramework, ASGIReceiveCallable, ASGISendCallable, Scope

from ..settings import Settings
from .access import AccessLog
from .clients import ClientResolver
from .webhooks import ROUTES

Path = TypeVar("Path", str, bytes)


class Prefixed:
    """Serve `app` at the root and under `prefix` ("/ledger"): a request under the prefix
    goes on as if the proxy had stripped it. The prefix is matched on the decoded path and
    on the raw one (the form Twilio signs) alike; a request that spells it differently
    goes on as it came, and finds no route."""

    def __init__(self, app: ASGIFramework, prefix: str) -> None:
        self._app = app
        self._prefix = unquote(prefix)  # as hypercorn decodes the path
        self._raw_prefix = prefix.encode("latin-1")

    async def __call__(self, scope: Scope, receive: ASGIReceiveCallable,
                       send: ASGISendCallable) -> None:
        if scope["type"] in ("http", "websocket"):
            scope = cast(Scope, self._strip(dict(scope)))
        await self._app(scope, receive, send)

    def _strip(self, scope: dict[str, object]) -> dict[str, object]:
        path = cast(str, scope["path"])
        raw = cast(bytes, scope.get("raw_path") or path.encode("latin-1"))
        if _under(path, self._prefix) and _under(raw, self._raw_prefix):
            scope["path"] = path[len(self._prefix):] or "/"
            scope["raw_path"] = raw[len(self._raw_prefix):] or b"/"
        return scope


def _under(path: Path, prefix: Path) -> bool:
    """`path` is `prefix` or below it ("/ledgers" is not below "/ledger")."""
    return path == prefix or (path.startswith(prefix) and path[len(prefix):][:1] in ("/", b"/"))


def at_the_edge(router: ASGIFramework, settings: Settings, *,
                public: bool = True) -> ASGIFramework:
    """`router` as a listener serves it: `Prefixed` outermost, so lines name root paths.
    `public` is False for the admin listener: it serves no webhook, and no proxy fronts it,
    so no forwarded header may name its client (any local process could forge one)."""
    app = router
    if settings.log_access:  # the webhook routes log their own line, where they are served
        served = public and settings.http_webhooks
        trusted = settings.http_trusted_proxies if public else ()
        app = AccessLog(app, ClientResolver(trusted),
                        skip=frozenset(ROUTES) if served else frozenset())
    return Prefixed(app, settings.public_prefix) if settings.public_prefix else app
