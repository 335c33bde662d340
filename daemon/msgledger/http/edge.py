"""What every request passes first, in whichever process holds its connection (the main
process, or a front): the public URL's path prefix is taken off, so the routers below see
root paths whether the proxy stripped the prefix or passed it on.

Relayed requests (a front's `/v1` and `/metrics`) reach the main process's router already
stripped, so nothing here runs twice.
"""

from __future__ import annotations

from typing import TypeVar, cast

from hypercorn.typing import ASGIFramework, ASGIReceiveCallable, ASGISendCallable, Scope

from ..settings import Settings

Path = TypeVar("Path", str, bytes)


class Prefixed:
    """Serve `app` at the root and under `prefix` ("/ledger"): a request under the prefix
    goes on as if the proxy had stripped it. The prefix is matched on the decoded path and
    on the raw one (the form Twilio signs) alike; a request that spells it differently
    goes on as it came, and finds no route."""

    def __init__(self, app: ASGIFramework, prefix: str) -> None:
        self._app = app
        self._prefix = prefix
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


def at_the_edge(router: ASGIFramework, settings: Settings) -> ASGIFramework:
    """`router` as a listener serves it."""
    return Prefixed(router, settings.prefix) if settings.prefix else router
