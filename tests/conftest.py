"""Shared fixtures: a real daemon (in-process or as a child process) on 127.0.0.1:0 with a
real SQLite file, spoken to over real HTTP, and signed callbacks as Twilio makes them.

And one rule for every async test: its body runs inside `trio.fail_after(TEST_DEADLINE)`
(or the seconds of its `@pytest.mark.deadline(...)`), and the whole of it, fixtures
included, inside that plus FIXTURES_ALLOWANCE, so a test that hangs fails with TooSlowError
instead of hanging the suite (`pytest_runtest_call` and `pytest_collection_modifyitems`
below; tests/test_conftest.py proves it)."""

from __future__ import annotations

import inspect
import json
import logging
import os
import secrets
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial, wraps
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

# Seconds any async test's body may run: about ten times the slowest test's wall time on a
# loaded two-core machine. On a test's virtual clock (`autojump_clock`) the bound is virtual
# too. A test that needs longer says so, and why, with `@pytest.mark.deadline(seconds)`.
TEST_DEADLINE = 120.0
# And its fixtures' setup and teardown (a daemon that never reports ready) get this much
# more: the whole `trio.run` of a test is bounded by its deadline plus this.
FIXTURES_ALLOWANCE = 60.0


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "deadline(seconds): bound this async test's body by trio.fail_after(seconds) "
        "instead of conftest.TEST_DEADLINE")


def deadline_of(item: pytest.Item) -> float:
    """The bound of `item`'s body: its closest `deadline` marker's, else TEST_DEADLINE."""
    marker = item.get_closest_marker("deadline")
    if marker is None:
        return TEST_DEADLINE
    (seconds,) = marker.args
    return float(seconds)


def bounded(test: Callable[..., Awaitable[object]], seconds: float
            ) -> Callable[..., Awaitable[object]]:
    """`test`, its body inside `trio.fail_after(seconds)`. Same name and signature, so
    pytest-trio resolves the same fixtures and passes the same clock."""

    @wraps(test)
    async def run_bounded(**kwargs: object) -> object:
        try:
            with trio.fail_after(seconds) as scope:
                return await test(**kwargs)
        except trio.TooSlowError as too_slow:
            if scope.cancelled_caught:  # this bound fired, not a fail_after of the test's own
                too_slow.add_note(f"{test.__name__} ran past its deadline of {seconds:g} s "
                                  "(conftest.TEST_DEADLINE, or its @pytest.mark.deadline)")
            raise

    return run_bounded


def run_within(main_: Callable[[], Awaitable[object]], *, seconds: float,
               **trio_run: object) -> object:
    """`trio.run` for pytest-trio, everything it runs (the fixtures' setup, the bounded
    body, the fixtures' teardown) inside `trio.fail_after(seconds)`."""

    async def within() -> object:
        try:
            with trio.fail_after(seconds) as scope:
                return await main_()
        except trio.TooSlowError as too_slow:
            if scope.cancelled_caught:
                too_slow.add_note(f"the test and its fixtures ran past {seconds:g} s: its "
                                  "deadline plus conftest.FIXTURES_ALLOWANCE")
            raise

    return trio.run(within, **trio_run)  # type: ignore[arg-type]


@pytest.hookimpl(trylast=True)  # after pytest-trio's trio_mode has marked the async tests
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Run every async test (a `trio` marker) by `run_within`, with its fixtures' allowance:
    pytest-trio takes the first `trio` marker's `run`, so this one goes first."""
    for item in items:
        if item.get_closest_marker("trio") is not None:
            seconds = deadline_of(item) + FIXTURES_ALLOWANCE
            item.add_marker(pytest.mark.trio(run=partial(run_within, seconds=seconds)),
                            append=False)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, object, object]:
    """Bound every async test's body, parametrized or not, by its deadline. Runs before
    pytest-trio's own hook, which then runs the bounded function as it would the test: its
    fixtures, its clock. A Hypothesis test is bounded per example (its inner test, which
    pytest-trio runs by plain `trio.run`: no fixtures' bound there). The original is put
    back afterwards, for the next parametrization of the same function."""
    hypothesis = getattr(getattr(item, "obj", None), "hypothesis", None)
    holder, name = (hypothesis, "inner_test") if hypothesis is not None else (item, "obj")
    test = getattr(holder, name, None)
    if item.get_closest_marker("trio") is None or not inspect.iscoroutinefunction(test):
        return (yield)
    setattr(holder, name, bounded(test, deadline_of(item)))
    try:
        return (yield)
    finally:
        setattr(holder, name, test)


@pytest.fixture(autouse=True, scope="session")
def _json_logs() -> None:
    logs.configure("info")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request is noise


def new_sid() -> str:
    return "SM" + secrets.token_hex(16)


def callback_params(sid: str, status: str, **extra: str) -> dict[str, str]:
    """The form fields Twilio posts to a StatusCallback (docs/twilio.md, "Status callback
    parameters")."""
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
