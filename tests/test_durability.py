"""Durability: a 200 means the callback is on disk, whatever happens to the process after.

These tests run `msgledger run` as a child process so they can kill it for real.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import signal
import sqlite3
from collections.abc import Awaitable, Callable
from pathlib import Path
from urllib.parse import urlencode

import h11
import httpx
import trio

from msgledger import store

from .conftest import (
    API_TOKEN,
    AUTH_TOKEN,
    FORM,
    ChildDaemon,
    Ledger,
    callback_params,
    child_env,
    daemon_environ,
    new_sid,
    open_ledger,
    signed,
    start_child,
    wait_until,
)

SENDERS = 32  # concurrent callers, as a proxy's connection pool would have


def journaled_sids(path: Path) -> set[str]:
    conn = store.connect(str(path), readonly=True)
    try:
        return {sid for (sid,) in conn.execute("SELECT sid FROM journal")}
    finally:
        conn.close()


async def post(client: httpx.AsyncClient, child: ChildDaemon, sid: str,
               status: str = "delivered") -> int:
    params = callback_params(sid, status)
    response = await client.post(child.url + "/twilio/status", content=urlencode(params),
                                 headers=signed(child.url + "/twilio/status", params))
    return response.status_code


async def load_until_killed(child: ChildDaemon, kill_after: int,
                            signum: int = signal.SIGKILL,
                            on_ack: Callable[[int], Awaitable[None]] | None = None,
                            ) -> tuple[set[str], int]:
    """Post unique callbacks from many tasks; signal the daemon once `kill_after` are
    acknowledged (`on_ack` sees each count first). Returns the acknowledged SIDs and how
    many requests got no answer."""
    acked: set[str] = set()
    unanswered = 0
    signalled: list[int] = []

    async def sender(client: httpx.AsyncClient) -> None:
        nonlocal unanswered
        while True:
            sid = new_sid()
            try:
                code = await post(client, child, sid)
            except httpx.TransportError:
                unanswered += 1
                return
            if code == 200:
                acked.add(sid)
            if on_ack is not None:
                await on_ack(len(acked))
            if len(acked) >= kill_after and not signalled:
                signalled.append(signum)
                child.process.send_signal(signum)
                if signum == signal.SIGTERM:  # as systemd stops a service: every process
                    for pid in front_pids(child):
                        with contextlib.suppress(ProcessLookupError):  # a front killed before
                            os.kill(pid, signum)

    limits = httpx.Limits(max_connections=SENDERS)
    async with httpx.AsyncClient(limits=limits, timeout=10) as client, trio.open_nursery() as n:
        for _ in range(SENDERS):
            n.start_soon(sender, client)
    return acked, unanswered


def alive(pid: int) -> bool:
    """The process exists and is not a zombie waiting to be reaped."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def fronts(workers: str) -> int:
    """How many front processes `http.workers` starts: none for 1, else that many."""
    return 0 if workers == "1" else int(workers)


def front_pids(child: ChildDaemon) -> list[int]:
    return [int(str(line["pid"])) for line in child.lines if line["event"] == "front_started"]


async def test_sigkill_mid_load_loses_nothing_acknowledged(tmp_path: Path, workers: str) -> None:
    """Every callback answered 200 before a SIGKILL is in the journal afterwards, the chain
    verifies, and a restarted daemon carries on from the same store. Fronts die with the
    main process: none is left accepting connections it could never make durable."""
    db = tmp_path / "kill.db"
    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            child = await start_child(nursery, child_env(db, MSGLEDGER_HTTP_WORKERS=workers))
            acked, unanswered = await load_until_killed(child, kill_after=400)
            assert await child.process.wait() == -signal.SIGKILL
        assert len(front_pids(child)) == fronts(workers)
        await wait_until(lambda: not any(alive(pid) for pid in front_pids(child)))
        assert len(acked) >= 400 and unanswered > 0  # the kill really cut requests off
        assert acked <= journaled_sids(db)
        result = store.verify(str(db))
        assert result.ok, result
        async with trio.open_nursery() as nursery:
            child = await start_child(nursery, child_env(db))
            async with httpx.AsyncClient() as client:
                assert await post(client, child, new_sid()) == 200
            child.process.send_signal(signal.SIGTERM)
            assert await child.process.wait() == 0
    assert store.verify(str(db)).events == result.events + 1


async def test_sigterm_drains_and_exits_zero(tmp_path: Path, workers: str) -> None:
    """SIGTERM stops the daemon gracefully: exit 0, every acknowledged callback kept, fronts
    gone; and no secret (auth token, API token) ever reaches its log, refusals and /v1
    included."""
    db = tmp_path / "term.db"
    sids = [new_sid() for _ in range(50)]
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            child = await start_child(nursery, child_env(db, MSGLEDGER_HTTP_WORKERS=workers))
            async with httpx.AsyncClient() as client:
                codes = [await post(client, child, sid) for sid in sids]
                forged = await client.post(child.url + "/twilio/status", headers={
                    **FORM, "X-Twilio-Signature": "forged"}, content="MessageSid=SM1")
                api = await client.get(child.url + f"/v1/messages/{sids[0]}",
                                       headers={"Authorization": f"Bearer {API_TOKEN}"})
            child.process.send_signal(signal.SIGTERM)
            assert await child.process.wait() == 0
    assert codes == [200] * len(sids)
    assert (forged.status_code, api.status_code) == (403, 200)
    assert set(sids) <= journaled_sids(db)
    events = [line["event"] for line in child.lines]
    assert events.index("drain_started") < events.index("journal_closed")
    assert events.count("front_stopped") == len(front_pids(child)) == fronts(workers)
    assert events[-1] == "daemon_stopped"
    assert not any(alive(pid) for pid in front_pids(child))
    logged = json.dumps(child.lines)
    assert AUTH_TOKEN not in logged and API_TOKEN not in logged


async def test_sigterm_mid_load_keeps_every_acknowledged_callback(tmp_path: Path,
                                                                  workers: str) -> None:
    """SIGTERM under load, to every process of the service as systemd sends it: requests in
    flight are finished, new ones refused, the daemon exits 0 (no front gives up its
    drain), and every callback it answered 200 is in the journal."""
    db = tmp_path / "term-load.db"
    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            child = await start_child(nursery, child_env(db, MSGLEDGER_HTTP_WORKERS=workers))
            acked, _ = await load_until_killed(child, kill_after=300, signum=signal.SIGTERM)
            assert await child.process.wait() == 0
    events = [line["event"] for line in child.lines]
    assert events.count("front_stopped") == len(front_pids(child)) == fronts(workers)
    assert "drain_abandoned" not in events
    assert len(acked) >= 300
    assert acked <= journaled_sids(db)
    assert store.verify(str(db)).ok


async def test_a_front_killed_mid_load_loses_nothing_acknowledged(tmp_path: Path) -> None:
    """SIGKILL one front in the middle of a load: every callback answered 200 by any front
    is in the journal, its replacement serves, and the daemon still stops cleanly."""
    db = tmp_path / "front-kill.db"
    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            child = await start_child(nursery, child_env(db, MSGLEDGER_HTTP_WORKERS="2"))
            victim = front_pids(child)[0]
            killed = False

            async def kill_front_once(acked: int) -> None:
                nonlocal killed
                if acked >= 200 and not killed:
                    killed = True
                    os.kill(victim, signal.SIGKILL)

            acked, _ = await load_until_killed(child, kill_after=600, signum=signal.SIGTERM,
                                               on_ack=kill_front_once)
            assert await child.process.wait() == 0
    events = [line["event"] for line in child.lines]
    assert killed and "front_died" in events and len(front_pids(child)) == 3
    assert acked <= journaled_sids(db)
    assert store.verify(str(db)).ok


async def test_sigterm_while_fronts_start_exits_cleanly(tmp_path: Path) -> None:
    """A stop that arrives while the fronts are still starting (SIGTERM to every process,
    as systemd sends it) ends the daemon promptly with exit 0."""
    db = tmp_path / "early.db"
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            child = await start_child(nursery, child_env(db, MSGLEDGER_HTTP_WORKERS="2"),
                                      ready_event="front_started")
            child.process.send_signal(signal.SIGTERM)
            for pid in front_pids(child):
                os.kill(pid, signal.SIGTERM)
            assert await child.process.wait() == 0
    assert "daemon_stopped" in [line["event"] for line in child.lines]


async def test_full_disk_answers_503_then_recovers(tmp_path: Path) -> None:
    """When the store cannot grow (file-size limit, as on a full disk) callbacks get 503
    and a loud log, the daemon keeps serving, and it recovers once space is back."""
    db = tmp_path / "full.db"
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            child = await start_child(nursery, child_env(db))
            pid = child.process.pid
            async with httpx.AsyncClient(timeout=10) as client:
                assert await post(client, child, new_sid()) == 200
                sizes = [(await trio.Path(f).stat()).st_size for f in (db, f"{db}-wal")]
                limit = max(sizes)  # no file of the store may grow any more
                resource.prlimit(pid, resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
                refused = [await post(client, child, new_sid(), "x" * 3000) for _ in range(20)]
                resource.prlimit(pid, resource.RLIMIT_FSIZE,
                                 (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
                after = new_sid()
                assert await post(client, child, after) == 200
            child.process.send_signal(signal.SIGTERM)
            assert await child.process.wait() == 0
    assert 503 in refused and set(refused) <= {200, 503}
    assert any(line.get("event") == "journal_commit_failed" for line in child.lines)
    assert after in journaled_sids(db)
    assert store.verify(str(db)).ok


async def test_journal_too_slow_answers_503(tmp_path: Path) -> None:
    """A commit that cannot finish within http.ack_timeout is answered 503, never 200, and
    the daemon answers 200 again once the store is free."""
    db = tmp_path / "slow.db"
    environ = daemon_environ(db, MSGLEDGER_HTTP_ACK_TIMEOUT="300ms")
    async with open_ledger(environ) as ledger:
        with trio.fail_after(30):
            blocker = sqlite3.connect(db, isolation_level=None)
            blocker.execute("BEGIN IMMEDIATE")  # another writer holds the write lock
            slow = await ledger.post_status(callback_params(new_sid(), "sent"))
            blocker.execute("COMMIT")
            blocker.close()
            fine = await ledger.post_status(callback_params(new_sid(), "sent"))
    assert slow.status_code == 503
    assert fine.status_code == 200


NO_ANSWER = 0  # the connection ended with no final response


async def post_taken_in(ledger: Ledger, sid: str, taken_in: Callable[[], None]) -> int:
    """POST a signed callback over HTTP/1.1 with `Expect: 100-continue`, body and all, and
    call `taken_in` when the daemon answers 100 Continue: hypercorn answers it only once the
    request is a stream of its own, handed to the app, its connection no longer idle, so
    from then on a drain counts it as in flight. The final status, or NO_ANSWER."""
    params = callback_params(sid, "delivered")
    body = urlencode(params).encode()
    host, port = ledger.url.removeprefix("http://").rsplit(":", 1)
    headers = [("Host", f"{host}:{port}"), *signed(ledger.public_url + "/twilio/status",
                                                  params).items(),
               ("Content-Length", str(len(body))), ("Expect", "100-continue")]
    client = h11.Connection(h11.CLIENT)
    async with await trio.open_tcp_stream(host, int(port)) as stream:
        await stream.send_all(
            client.send(h11.Request(method="POST", target="/twilio/status", headers=headers))
            + client.send(h11.Data(data=body)) + client.send(h11.EndOfMessage()))
        while True:
            try:
                event = client.next_event()
                if event is h11.NEED_DATA:
                    client.receive_data(await stream.receive_some(65536))
                    continue
            except (h11.RemoteProtocolError, trio.BrokenResourceError):
                return NO_ANSWER
            if isinstance(event, h11.InformationalResponse) and event.status_code == 100:
                taken_in()
            elif isinstance(event, h11.Response):
                return event.status_code
            elif isinstance(event, h11.ConnectionClosed):
                return NO_ANSWER


async def until_refused(url: str) -> None:
    """Poll until a new connection to `url` is refused: the daemon's listener is closed,
    which hypercorn does as the drain starts. Callers bound the wait with `fail_after`."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    while True:
        try:
            stream = await trio.open_tcp_stream(host, int(port))
        except OSError:
            return
        await stream.aclose()
        await trio.sleep(0.01)


async def test_drain_finishes_in_flight_callbacks(tmp_path: Path) -> None:
    """Callbacks already in flight when the drain starts are still journaled and answered
    200 before the daemon stops; the journal closes only after them.

    Synchronised on what the daemon shows, not on the scheduler going quiet (which said
    nothing about whether the requests had reached the daemon, nor the drain begun): the
    drain starts once the daemon has answered 100 Continue to all ten (each is in flight);
    the store is released once the listener refuses connections (the drain is under way),
    with all ten still unanswered, waiting for the journal."""
    db = tmp_path / "drain.db"
    sids = [new_sid() for _ in range(10)]
    codes: list[int] = []
    taken_in: list[str] = []
    all_taken_in = trio.Event()
    with trio.fail_after(30):
        async with open_ledger(daemon_environ(db)) as ledger:

            async def post(sid: str) -> None:

                def in_flight() -> None:
                    taken_in.append(sid)
                    if len(taken_in) == len(sids):
                        all_taken_in.set()

                codes.append(await post_taken_in(ledger, sid, in_flight))

            blocker = sqlite3.connect(db, isolation_level=None)
            blocker.execute("BEGIN IMMEDIATE")  # commits wait: the callbacks stay in flight
            async with trio.open_nursery() as nursery:
                for sid in sids:
                    nursery.start_soon(post, sid)
                await all_taken_in.wait()
                ledger.stop.set()  # drain starts while all ten wait for the journal
                await until_refused(ledger.url)
                assert codes == []  # none answered yet: the journal still waits on the store
                blocker.execute("COMMIT")
                blocker.close()
    assert sorted(taken_in) == sorted(sids)
    assert codes == [200] * len(sids)
    assert set(sids) <= journaled_sids(db)
