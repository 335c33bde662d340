"""An answer sent before the body arrives never wedges the connection (issue 14): after any
early answer the connection serves its next request or is closed, and no descriptor
outlives its client. Real `msgledger run` processes, spoken to over raw sockets, so each
client sends headers and body in separate writes, as Python `requests` and most proxies do.

The cause and its fix: docs/hypercorn.md, "An early answer wedges the connection".
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from .conftest import ChildDaemon, child_env, start_child, wait_until
from .test_durability import alive, front_pids

# Long enough that only the fix, not the body deadline, can release a descriptor in time.
READ_TIMEOUT = "60s"
# Answered before the body: 401 (no token), 404 (no such route), 405 (wrong method).
EARLY = {
    401: b"POST /v1/messages HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n",
    404: b"POST /nowhere HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n",
    405: b"PUT /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n",
}
CLIENTS = 200  # early-answered requests in the descriptor test
# Whether a connection wedged was a race (trio runs ready tasks in a shuffled order): a few
# tries per status make meeting it near certain without the fix.
TRIES = 8
NEXT_REQUEST = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"


@asynccontextmanager
async def daemon(tmp_path: Path, workers: str) -> AsyncIterator[ChildDaemon]:
    env = child_env(tmp_path / "early.db", MSGLEDGER_HTTP_WORKERS=workers,
                    MSGLEDGER_HTTP_READ_TIMEOUT=READ_TIMEOUT)
    async with trio.open_nursery() as nursery:
        child = await start_child(nursery, env)
        try:
            yield child
        finally:
            child.process.send_signal(signal.SIGTERM)
            code = await child.process.wait()
    assert code == 0  # stopped cleanly: no process crashed along the way


def all_alive(pids: list[int]) -> bool:
    """Every one of `pids` still runs: a front that died and was replaced takes its
    descriptors with it, which would pass a count for the wrong reason."""
    return all(alive(pid) for pid in pids)


async def connect(child: ChildDaemon) -> trio.SocketStream:
    host, port = child.url.removeprefix("http://").rsplit(":", 1)
    return await trio.open_tcp_stream(host, int(port))


async def read_head(stream: trio.SocketStream) -> bytes:
    """One answer's headers and its Content-Length of body; b"" if the server closed."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = await stream.receive_some(65536)
        if not chunk:
            return data
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                   if line.lower().startswith(b"content-length:")), 0)
    while len(rest) < length and (chunk := await stream.receive_some(65536)):
        rest += chunk
    return head + b"\r\n\r\n" + rest[:length]


@pytest.mark.parametrize("status", sorted(EARLY))
async def test_the_next_request_is_answered_or_the_connection_closed(
        tmp_path: Path, workers: str, status: int) -> None:
    """The issue's repro: headers, the early answer, then the body together with the next
    request on the same connection. Within a second the next request is answered, or the
    connection is closed: never a hang."""
    body = b"{} "
    async with daemon(tmp_path, workers) as child:
        for _ in range(TRIES):
            with trio.fail_after(10):
                stream = await connect(child)
                await stream.send_all(EARLY[status] % len(body))
                assert (await read_head(stream)).startswith(b"HTTP/1.1 %d" % status)
            with trio.fail_after(1), contextlib.suppress(trio.BrokenResourceError):
                await stream.send_all(body + NEXT_REQUEST)
                rest = await read_head(stream)
                assert rest == b"" or b"HTTP/1.1 200" in rest
            await stream.aclose()


def descriptors(pids: list[int]) -> int:
    return sum(len(os.listdir(f"/proc/{pid}/fd")) for pid in pids if alive(pid))


async def test_no_descriptor_outlives_an_early_answered_client(tmp_path: Path,
                                                               workers: str) -> None:
    """200 clients each get an early answer while half their body is still to come, then
    hang up: the daemon's open descriptors (main process and fronts) return to where they
    were, long before the body deadline could have closed anything."""
    async with daemon(tmp_path, workers) as child:
        pids = [child.process.pid, *front_pids(child)]
        before = descriptors(pids)
        with trio.fail_after(30):
            for n in range(CLIENTS):
                stream = await connect(child)
                await stream.send_all(EARLY[(401, 404, 405)[n % 3]] % 100 + b"x" * 50)
                assert (await read_head(stream)).startswith(b"HTTP/1.1 4")
                # The rest of the body and a next request: a wedged connection took them
                # and then never read again, so it never saw the client hang up either.
                with contextlib.suppress(trio.BrokenResourceError):
                    await stream.send_all(b"x" * 50 + NEXT_REQUEST)
                await stream.aclose()
        with trio.fail_after(10):  # READ_TIMEOUT is 60 s: only a prompt close gets here
            await wait_until(lambda: descriptors(pids) <= before)
        assert all_alive(pids)
