"""No descriptor outlives its client (issue 19): when the client closes, the daemon closes
its side at once, whatever the route, instead of waiting out hypercorn's 75 s keep-alive
timer. Real `msgledger run` processes (and their fronts), spoken to over raw sockets.

The cause and its fix: docs/hypercorn.md, "A connection outlives its client".
"""

from __future__ import annotations

import signal
from pathlib import Path
from urllib.parse import urlencode

import trio

from .conftest import ChildDaemon, callback_params, new_sid, signed, wait_until
from .test_durability import front_pids
from .test_early_answers import all_alive, connect, daemon, descriptors, read_head

CLIENTS = 200  # connections, each with one request, closed by the client after its answer
HEALTHZ = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"


def signed_callback(child: ChildDaemon) -> bytes:
    """One signed status callback as raw HTTP/1.1, keep-alive (the client decides to go)."""
    params = callback_params(new_sid(), "delivered")
    body = urlencode(params).encode()
    headers = signed(child.url + "/twilio/status", params)
    head = "POST /twilio/status HTTP/1.1\r\nHost: x\r\n" + "".join(
        f"{name}: {value}\r\n" for name, value in headers.items())
    return f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body


async def one_request_then_close(child: ChildDaemon, request: bytes) -> None:
    stream = await connect(child)
    await stream.send_all(request)
    assert (await read_head(stream)).startswith(b"HTTP/1.1 200")
    await stream.aclose()


async def test_descriptors_return_within_a_second_of_their_clients(tmp_path: Path,
                                                                   workers: str) -> None:
    """The issue's repro: 200 connections, each one signed callback closed right after its
    200 (the lean webhook path, where hypercorn's wait was near certain), then as many
    /healthz. Within one second of the last, the daemon holds no more descriptors than
    before: hypercorn's keep-alive timer alone would have taken 75 s."""
    async with daemon(tmp_path, workers) as child:
        pids = [child.process.pid, *front_pids(child)]
        before = descriptors(pids)
        for request in (signed_callback, lambda _: HEALTHZ):
            with trio.fail_after(30):
                for _ in range(CLIENTS):
                    await one_request_then_close(child, request(child))
            with trio.fail_after(1):
                await wait_until(lambda: descriptors(pids) <= before)
            assert all_alive(pids)


async def test_a_drain_answers_what_arrives_on_an_idle_connection(tmp_path: Path,
                                                                  workers: str) -> None:
    """A keep-alive connection idle when the drain starts (a proxy's pooled one) still
    gets its next request answered, with `Connection: close`, so the proxy stops reusing it:
    closing it at once raced that request, and the proxy answered Twilio 502."""
    async with daemon(tmp_path, workers) as child:
        stream = await connect(child)
        with trio.fail_after(10):
            await stream.send_all(signed_callback(child))
            assert (await read_head(stream)).startswith(b"HTTP/1.1 200")
        child.process.send_signal(signal.SIGTERM)
        with trio.fail_after(10):  # the drain has begun in every process holding the listener
            await wait_until(lambda: sum(line["event"] == "drain_started"
                                         for line in child.lines) >= 1 + len(front_pids(child)))
        with trio.fail_after(10):
            await stream.send_all(signed_callback(child))
            answer = await read_head(stream)
        assert answer.startswith(b"HTTP/1.1 200")
        assert b"connection: close" in answer.lower()
        await stream.aclose()
        assert await child.process.wait() == 0
