"""Shared fixtures: a real daemon (in-process or as a child process) on 127.0.0.1:0 with a
real SQLite file, spoken to over real HTTP, and signed callbacks as Twilio makes them."""

from __future__ import annotations

import json
import logging
import os
import secrets
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from urllib.parse import urlencode

import httpx
import pytest
import trio
from twilio.request_validator import RequestValidator

from msgledger import logs, main, settings

AUTH_TOKEN = "test-auth-token-" + "0" * 16
API_TOKEN = "test-api-token"
ACCOUNT_SID = "AC" + "1" * 32
FORM = {"Content-Type": "application/x-www-form-urlencoded"}


@pytest.fixture(autouse=True, scope="session")
def _json_logs() -> None:
    logs.configure("info")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request is noise


def new_sid() -> str:
    return "SM" + secrets.token_hex(16)


def callback_params(sid: str, status: str, **extra: str) -> dict[str, str]:
    """The form fields Twilio posts to a StatusCallback (TWILIO.md §2)."""
    return {"MessageSid": sid, "SmsSid": sid, "MessageStatus": status, "SmsStatus": status,
            "AccountSid": ACCOUNT_SID, "From": "+15005550006", "To": "+15558675310",
            "ApiVersion": "2010-04-01", **extra}


def signed(url: str, params: Mapping[str, str], token: str = AUTH_TOKEN) -> dict[str, str]:
    """Headers of a form POST signed the way Twilio signs it."""
    return {**FORM, "X-Twilio-Signature": RequestValidator(token).compute_signature(url, params)}


@dataclass
class Ledger:
    """A running daemon as its clients see it."""

    url: str
    public_url: str
    store_path: Path
    client: httpx.AsyncClient
    stop: trio.Event  # set it to start the graceful drain; leaving the context waits for it
    workers: int = 1  # http.workers: 1 serves from the main process, more from fronts
    admin_url: str | None = None  # http.admin_listen's URL, if /v1 is served apart

    async def post_status(self, params: Mapping[str, str], *, ref: str | None = None,
                          token: str = AUTH_TOKEN) -> httpx.Response:
        path = "/twilio/status" + (f"?{urlencode({'ref': ref})}" if ref else "")
        headers = signed(self.public_url + path, params, token)
        return await self.client.post(path, content=urlencode(params), headers=headers)

    async def metrics_showing(self, *lines: str) -> str:
        """/metrics once it shows every one of `lines`. Fronts report their webhook counters
        every second (`front.TALLY_EVERY`), so with fronts this waits for the next report."""
        while True:
            text = (await self.client.get("/metrics")).text
            if all(line in text for line in lines):
                return text
            await trio.sleep(0.05)

    async def record(self, key: str) -> httpx.Response:
        return await self.client.get(f"/v1/messages/{key}",
                                     headers={"Authorization": f"Bearer {API_TOKEN}"})


async def wait_until(done: Callable[[], bool], every: float = 0.02) -> None:
    """Poll `done`: for another process's state, which no trio.Event can signal. Callers
    bound the wait with `fail_after`."""
    while not done():  # noqa: ASYNC110 -- nothing in this process is told when it changes
        await trio.sleep(every)


def daemon_environ(store_path: Path, **extra: str) -> dict[str, str]:
    return {"MSGLEDGER_HTTP_LISTEN": "127.0.0.1:0", "MSGLEDGER_STORE_PATH": str(store_path),
            "MSGLEDGER_TWILIO_AUTH_TOKEN": AUTH_TOKEN, "MSGLEDGER_API_TOKEN": API_TOKEN,
            **extra}


@asynccontextmanager
async def open_ledger(environ: Mapping[str, str]) -> AsyncIterator[Ledger]:
    """The whole daemon, started in-process by `main.run` with these settings."""
    settings_ = settings.load(environ=environ)
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        running = await nursery.start(partial(main.run, settings_, stop=stop,
                                              handle_signals=False))
        async with httpx.AsyncClient(base_url=running.url, timeout=30) as client:
            yield Ledger(running.url, running.public_url, Path(settings_.store_path), client,
                         stop, settings_.http_workers, running.admin_url)
        stop.set()


@pytest.fixture(params=[1, 2], ids=["one-process", "two-fronts"])
def workers(request: pytest.FixtureRequest) -> str:
    """`http.workers`: the main process serving HTTP itself, or two front processes."""
    return str(request.param)


@pytest.fixture
async def ledger(tmp_path: Path, workers: str) -> AsyncIterator[Ledger]:
    """The whole daemon on default settings, a fresh store, port 0, each way of serving."""
    environ = daemon_environ(tmp_path / "ledger.db", MSGLEDGER_HTTP_WORKERS=workers)
    async with open_ledger(environ) as it:
        yield it


@dataclass
class ChildDaemon:
    """`msgledger run` as a separate process, for tests that kill it."""

    process: trio.Process
    url: str
    ready: dict[str, object]  # the log line waited for
    lines: list[dict[str, object]]  # every log line so far, parsed


def child_env(store_path: Path, **extra: str) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("MSGLEDGER_", "TWILIO_"))}
    return {**base, **daemon_environ(store_path, **extra)}


async def start_child(nursery: trio.Nursery, env: Mapping[str, str], *args: str,
                      ready_event: str = "daemon_ready", cwd: Path | None = None,
                      launcher: Sequence[str] = (), pass_fds: Sequence[int] = ()
                      ) -> ChildDaemon:
    """Start `msgledger run [args]` and wait for its `ready_event` log line. `launcher`
    is a command that ends by exec'ing its arguments (as systemd sets a process up)."""
    process = await trio.lowlevel.open_process(
        [*launcher, sys.executable, "-m", "msgledger", "run", *args], env=dict(env),
        stdout=subprocess.PIPE, cwd=cwd, pass_fds=tuple(pass_fds))
    lines: list[dict[str, object]] = []
    ready = trio.Event()
    nursery.start_soon(_read_logs, process, lines, ready_event, ready)
    with trio.fail_after(20):
        await ready.wait()
    url = next((str(line["url"]) for line in lines if line.get("event") == "daemon_ready"), "")
    ready_line = next(line for line in lines if line.get("event") == ready_event)
    return ChildDaemon(process, url, ready_line, lines)


async def _read_logs(process: trio.Process, lines: list[dict[str, object]], ready_event: str,
                     ready: trio.Event) -> None:
    assert process.stdout is not None
    buffer = b""
    async for chunk in process.stdout:
        buffer += chunk
        *complete, buffer = buffer.split(b"\n")
        for raw in complete:
            lines.append(json.loads(raw))
            if lines[-1].get("event") == ready_event:
                ready.set()


def error_lines(log_path: Path) -> list[str]:
    """A child daemon's log lines at error level or above, and anything that is not a JSON
    line (a traceback). Split on newlines alone: a line may hold U+2028, which splitlines()
    cuts."""
    lines = log_path.read_bytes().decode("utf-8", "replace").split("\n")
    return [line[:500] for line in lines if line and (
        not line.startswith("{") or json.loads(line).get("level") in ("error", "critical"))]
