"""The Quart application: `/healthz`, `/metrics` and the bearer-protected `/v1` API."""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import wraps
from typing import Any, TypeVar

import trio
from quart import Response, jsonify, request
from quart_trio import QuartTrio

from .. import store
from ..metrics import Metrics
from .health import Health

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


@dataclass(frozen=True)
class ApiDeps:
    """What the routes read; the wiring builds it once."""

    store_path: str
    api_token: str | None
    health: Health
    metrics: Metrics


class StoreReader:
    """Read-only store access from worker threads, never blocking the journal writer."""

    def __init__(self, path: str) -> None:
        self._path = path
        self._limiter = trio.CapacityLimiter(4)  # concurrent API reads; SQLite WAL allows many

    async def record(self, key: str) -> store.Record | None:
        return await trio.to_thread.run_sync(self._record, key, limiter=self._limiter)

    def _record(self, key: str) -> store.Record | None:
        conn = store.connect(self._path, readonly=True)
        try:
            return store.find_record(conn, key)
        finally:
            conn.close()


def create_app(deps: ApiDeps) -> QuartTrio:
    app = QuartTrio("msgledger")
    reader = StoreReader(deps.store_path)
    require_token = _bearer(deps.api_token)

    @app.get("/healthz")
    async def healthz() -> tuple[Response, int]:
        code = 200 if deps.health.serving else 503
        return jsonify(status=deps.health.describe()), code

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(deps.metrics.render(), content_type="text/plain; version=0.0.4")

    @app.get("/v1/messages/<key>")
    @require_token
    async def get_message(key: str) -> tuple[Response, int]:
        record = await reader.record(key)
        if record is None:
            return jsonify(error=f"no message with SID or ref {key!r}"), 404
        return jsonify(record), 200

    return app


def _bearer(token: str | None) -> Callable[[F], F]:
    """A decorator answering 401 unless `Authorization: Bearer <token>` matches.

    Without a configured token every /v1 request is refused (DESIGN.md).
    """
    expected = f"Bearer {token}".encode() if token else None

    def decorate(view: F) -> F:
        @wraps(view)
        async def guarded(*args: Any, **kwargs: Any) -> Any:
            given = request.headers.get("Authorization", "").encode()
            if expected is None or not hmac.compare_digest(given, expected):
                return jsonify(error="missing or wrong bearer token"), 401
            return await view(*args, **kwargs)

        return guarded  # type: ignore[return-value]

    return decorate
