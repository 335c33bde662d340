"""A stand-in for the firm's own app behind `inbound.forward_url`: a real HTTP server
(hypercorn) whose answer each test chooses, keeping every request it was sent."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl

import trio

from msgledger.http.server import answer_lifespan

from .fake_twilio import read_body, serve_on_loopback


@dataclass(frozen=True)
class AppRequest:
    path: str
    headers: dict[str, str]
    form: list[tuple[str, str]]


@dataclass(frozen=True)
class AppAnswer:
    status: int = 200
    body: bytes = b""
    content_type: str = "text/xml"


Answer = Callable[[AppRequest], Awaitable[AppAnswer]]


@dataclass
class App:
    url: str
    answer: Answer
    requests: list[AppRequest] = field(default_factory=list)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await answer_lifespan(receive, send)
            return
        body = await read_body(receive)
        request = AppRequest(scope["path"], {k.decode(): v.decode() for k, v in scope["headers"]},
                             parse_qsl(body.decode(), keep_blank_values=True))
        self.requests.append(request)
        answer = await self.answer(request)
        await send({"type": "http.response.start", "status": answer.status,
                    "headers": [(b"content-type", answer.content_type.encode()),
                                (b"content-length", str(len(answer.body)).encode())]})
        await send({"type": "http.response.body", "body": answer.body})


def answering(status: int = 200, body: bytes = b"", content_type: str = "text/xml") -> Answer:
    async def answer(_: AppRequest) -> AppAnswer:
        return AppAnswer(status, body, content_type)
    return answer


async def never_answering(_: AppRequest) -> AppAnswer:
    await trio.sleep_forever()
    raise AssertionError("unreachable")


async def start_app(nursery: trio.Nursery, answer: Answer, path: str = "/sms") -> App:
    """An app on 127.0.0.1:<free port>, served until `nursery` is cancelled."""
    app = App("", answer)
    app.url = await serve_on_loopback(nursery, app) + path
    return app
