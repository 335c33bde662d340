"""Where msgledger listens (issue 19): systemd socket activation, so a restart refuses
nothing; the admin listener that keeps `/v1` and `/metrics` off the public one; and the
descriptor limit. Real `msgledger run` processes, and the in-process daemon, over real
HTTP."""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlencode

import httpx
import pytest
import trio

from msgledger import systemd

from .conftest import (
    API_TOKEN,
    ChildDaemon,
    callback_params,
    child_env,
    daemon_environ,
    new_sid,
    open_ledger,
    signed,
    start_child,
    wait_until,
)

BEARER = {"Authorization": f"Bearer {API_TOKEN}"}
# What systemd does between fork and exec for socket units: the listeners at descriptors 3
# and on, their names in LISTEN_FDNAMES, and LISTEN_PID naming the process that will run
# msgledger (exec keeps the pid). Arguments: names ("public:admin"), fds ("7,8"), command.
ACTIVATE = ("import fcntl, os, sys\n"
            "fds = [int(fd) for fd in sys.argv[2].split(',')]\n"
            "high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 100) for fd in fds]\n"
            "for fd in fds: os.close(fd)\n"
            "for i, fd in enumerate(high): os.dup2(fd, 3 + i); os.close(fd)\n"
            "os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS=str(len(fds)),"
            " LISTEN_FDNAMES=sys.argv[1])\n"
            "os.execv(sys.argv[3], sys.argv[3:])\n")
STREAMS = 4  # clients posting callbacks at once, each a new connection per callback
BEFORE, AFTER = 40, 40  # callbacks answered by the first process, then by the second


def held_listener() -> socket.socket:
    """A listening socket this test holds for the daemon's whole life, as systemd does."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(1024)
    return sock


async def start_activated(nursery: trio.Nursery, env: dict[str, str],
                          *listeners: socket.socket, names: str = "msgledger.socket"
                          ) -> ChildDaemon:
    fds = [listener.fileno() for listener in listeners]
    launcher = [sys.executable, "-c", ACTIVATE, names, ",".join(map(str, fds))]
    return await start_child(nursery, env, launcher=launcher, pass_fds=fds)


@dataclass
class Posted:
    sid: str
    connected_at: float
    answered_at: float
    status: int | str  # the HTTP status, or the error's name


async def post_callbacks(port: int, posted: list[Posted], done: trio.Event) -> None:
    """Signed callbacks, each on a new connection, until `done`."""
    while not done.is_set():
        sid, url = new_sid(), f"http://127.0.0.1:{port}/twilio/status"
        params = callback_params(sid, "delivered")
        body = urlencode(params).encode()
        head = "".join(f"{k}: {v}\r\n" for k, v in signed(url, params).items())
        request = (f"POST /twilio/status HTTP/1.1\r\nHost: x\r\n{head}"
                   f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body
        connected_at = trio.current_time()
        try:
            with trio.fail_after(30):
                stream = await trio.open_tcp_stream("127.0.0.1", port)
                async with stream:
                    await stream.send_all(request)
                    answer = b""
                    while b"\r\n" not in answer and (chunk := await stream.receive_some(4096)):
                        answer += chunk
            status: int | str = int(answer.split()[1]) if answer else "closed unanswered"
        except (OSError, trio.BrokenResourceError, trio.TooSlowError) as error:
            status = type(error).__name__
        posted.append(Posted(sid, connected_at, trio.current_time(), status))


async def stop_child(child: ChildDaemon) -> float:
    """SIGTERM, and the trio time it was gone at."""
    child.process.send_signal(signal.SIGTERM)
    assert await child.process.wait() == 0
    return trio.current_time()


async def test_a_restart_under_load_refuses_no_callback(tmp_path: Path, workers: str) -> None:
    """The test holds the listening socket, as systemd does for msgledger.socket, and
    restarts the daemon under a steady stream of signed callbacks on new connections. Not
    one connection is refused or dropped: those made while no process ran waited in the
    kernel's queue, and the second process answered them 200. With the sockets bound by
    the daemon instead, the second cannot even bind (the first's queue is this test's)."""
    listener = held_listener()
    port = listener.getsockname()[1]
    env = child_env(tmp_path / "restart.db", MSGLEDGER_HTTP_WORKERS=workers,
                    MSGLEDGER_HTTP_PUBLIC_URL=f"http://127.0.0.1:{port}")
    posted: list[Posted] = []
    with listener, trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            first = await start_activated(nursery, env, listener)
            assert first.url == f"http://127.0.0.1:{port}"
            done = trio.Event()
            async with trio.open_nursery() as streams:
                for _ in range(STREAMS):
                    streams.start_soon(post_callbacks, port, posted, done)
                await wait_until(lambda: len(posted) >= BEFORE)
                gone_at = await stop_child(first)
                second = await start_activated(nursery, env, listener)
                answered_then = len(posted)
                await wait_until(lambda: len(posted) >= answered_then + AFTER)
                done.set()  # each stream ends with its callback in flight answered
            await stop_child(second)
    assert [p for p in posted if p.status != 200] == []
    # Not vacuous: some connections waited out the time when no process ran at all.
    assert any(p.connected_at < gone_at < p.answered_at for p in posted)
    with sqlite3.connect(tmp_path / "restart.db") as db:
        stored = {sid for (sid,) in db.execute("SELECT sid FROM journal WHERE kind='callback'")}
    assert {p.sid for p in posted} <= stored


def test_sockets_passed_to_another_process_are_ignored() -> None:
    """LISTEN_PID not ours: the sockets are not ours (inherited through a process that
    did not take them); nothing is taken, and the variables are removed all the same."""
    environ = {"LISTEN_PID": str(os.getpid() + 1), "LISTEN_FDS": "1",
               "LISTEN_FDNAMES": "msgledger.socket", "OTHER": "kept"}
    assert systemd.listen_fds(environ) == []
    assert environ == {"OTHER": "kept"}


async def test_a_foreign_listen_pid_binds_as_usual(tmp_path: Path) -> None:
    """With LISTEN_FDS set for another process, `msgledger run` binds http.listen itself
    and serves: fd 3 (here, nothing) is never touched."""
    env = {**child_env(tmp_path / "foreign.db"), "LISTEN_PID": "1", "LISTEN_FDS": "1"}
    async with trio.open_nursery() as nursery:
        child = await start_child(nursery, env)
        listening = next(line for line in child.lines if line["event"] == "listening")
        assert listening["socket_activation"] is False
        async with httpx.AsyncClient(base_url=child.url) as client:
            assert (await client.get("/healthz")).status_code == 200
        await stop_child(child)


async def test_the_descriptor_limit_is_raised_and_logged(tmp_path: Path) -> None:
    """At start the soft limit on descriptors is raised to the hard limit, and logged."""
    env = child_env(tmp_path / "limit.db")
    async with trio.open_nursery() as nursery:
        child = await start_child(nursery, env, launcher=["prlimit", "--nofile=256:4096"])
        line = next(line for line in child.lines if line["event"] == "descriptor_limit")
        assert (line["soft"], line["hard"]) == (4096, 4096)
        assert open_files_limit(child.process.pid) == ["4096", "4096"]
        await stop_child(child)


def open_files_limit(pid: int) -> list[str]:
    """The soft and hard limits on open files of process `pid`, as the kernel has them."""
    rows = Path(f"/proc/{pid}/limits").read_text().splitlines()
    return next(row for row in rows if row.startswith("Max open files")).split()[3:5]


# ---------------------------------------------------------------- the admin listener


async def test_admin_routes_are_served_on_the_admin_listener_only(tmp_path: Path,
                                                                  workers: str) -> None:
    """With http.admin_listen, the public listener serves the webhooks and /healthz and
    answers 404 to `/v1`, `/metrics` and the contract; the admin listener serves those and
    answers 404 to the webhooks. One process and fronts alike."""
    environ = daemon_environ(tmp_path / "admin.db", MSGLEDGER_HTTP_WORKERS=workers,
                             MSGLEDGER_HTTP_ADMIN_LISTEN="127.0.0.1:0")
    sid = new_sid()
    async with open_ledger(environ) as ledger:
        assert ledger.admin_url is not None
        admin_url = ledger.admin_url
        assert (await ledger.post_status(callback_params(sid, "sent"))).status_code == 200
        public = ledger.client
        for path in ("/v1/messages", f"/v1/messages/{sid}", "/metrics", "/v1/openapi.json"):
            assert (await public.get(path, headers=BEARER)).status_code == 404, path
        assert (await public.get("/healthz")).status_code == 200
        async with httpx.AsyncClient(base_url=admin_url) as admin:
            assert (await admin.get(f"/v1/messages/{sid}", headers=BEARER)).status_code == 200
            assert "msgledger_callbacks_total" in (await admin.get("/metrics")).text
            assert (await admin.get("/v1/openapi.json")).status_code == 200
            assert (await admin.get("/healthz")).status_code == 200
            params = callback_params(new_sid(), "sent")
            refused = await admin.post("/twilio/status", content=urlencode(params),
                                       headers=signed(ledger.public_url + "/twilio/status",
                                                      params))
            assert refused.status_code == 404


async def test_admin_listener_on_a_unix_socket(tmp_path: Path) -> None:
    """http.admin_listen may be the path of a unix socket: `/v1` is served there, created
    under the process umask, and a stale socket file from an earlier run is replaced."""
    path = tmp_path / "admin.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()  # the file stays, as after a crash
    environ = daemon_environ(tmp_path / "unix.db", MSGLEDGER_HTTP_ADMIN_LISTEN=str(path))
    async with open_ledger(environ) as ledger:
        transport = httpx.AsyncHTTPTransport(uds=str(path))
        async with httpx.AsyncClient(transport=transport, base_url="http://admin") as admin:
            answer = await admin.get("/v1/messages", headers=BEARER)
            assert answer.status_code == 200
            assert (await admin.get("/v1/messages")).status_code == 401
        assert (await ledger.client.get("/v1/messages", headers=BEARER)).status_code == 404


@pytest.mark.parametrize(("env", "key"), [
    ({"MSGLEDGER_HTTP_ADMIN_LISTEN": "127.0.0.1:8080",
      "MSGLEDGER_HTTP_LISTEN": "127.0.0.1:8080"}, "http.admin_listen"),
    ({"MSGLEDGER_HTTP_ADMIN_LISTEN": "nowhere"}, "http.admin_listen"),
    ({"MSGLEDGER_HTTP_TRUSTED_PROXIES": "10.0.0.0/33"}, "http.trusted_proxies"),
    ({"MSGLEDGER_HTTP_TRUSTED_PROXIES": "10.0.0.0/8,proxy.internal"}, "http.trusted_proxies"),
    ({"MSGLEDGER_HTTP_PUBLIC_URL": "https://x.example/ledger?a=1"}, "http.public_url"),
    ({"MSGLEDGER_HTTP_PUBLIC_URL": "https://x.example/ledger#top"}, "http.public_url"),
    ({"MSGLEDGER_HTTP_PUBLIC_URL": "https://x.example/a/../b"}, "http.public_url"),
    ({"MSGLEDGER_HTTP_PUBLIC_URL": "https://x.example//ledger"}, "http.public_url"),
])
def test_bad_listener_settings_stop_start_up(tmp_path: Path, env: dict[str, str],
                                             key: str) -> None:
    """Each is exit 2 and one line on stderr naming the key, before anything is bound."""
    result = subprocess.run([sys.executable, "-m", "msgledger", "run"],
                            env={**child_env(tmp_path / "bad.db"), **env},
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and f"configuration error: {key}:" in lines[0], lines
    assert not (tmp_path / "bad.db").exists()


async def test_the_admin_listener_writes_access_lines(tmp_path: Path) -> None:
    """Each request on the admin listener gets its `http_access` line, a webhook path's
    404 too (the admin listener serves no webhook, so none logs its own line)."""
    env = child_env(tmp_path / "admin-log.db", MSGLEDGER_HTTP_ADMIN_LISTEN="127.0.0.1:0")
    async with trio.open_nursery() as nursery:
        child = await start_child(nursery, env)
        async with httpx.AsyncClient(base_url=str(child.ready["admin_url"])) as admin:
            assert (await admin.get("/v1/messages")).status_code == 401
            assert (await admin.post("/twilio/status")).status_code == 404
        await stop_child(child)
    access = [(line["path"], line["http_status"]) for line in child.lines
              if line["event"] == "http_access"]
    assert access == [("/v1/messages", 401), ("/twilio/status", 404)]


def test_a_listener_that_cannot_be_opened_is_named(tmp_path: Path) -> None:
    """An admin socket in a directory that does not exist: exit 4, one start_failed line
    naming the address that could not be listened on."""
    where = tmp_path / "nowhere" / "admin.sock"
    result = subprocess.run([sys.executable, "-m", "msgledger", "run"],
                            env={**child_env(tmp_path / "named.db"),
                                 "MSGLEDGER_HTTP_ADMIN_LISTEN": str(where)},
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 4, result.stderr
    failed = [line for line in map(json.loads, result.stdout.splitlines())
              if line["event"] == "start_failed"]
    assert len(failed) == 1 and f"cannot listen on {where}" in failed[0]["error"]


async def test_two_passed_sockets_serve_public_and_admin(tmp_path: Path, workers: str) -> None:
    """msgledger.socket and msgledger-admin.socket (FileDescriptorName=admin): the public
    one serves webhooks and answers 404 to /v1; the admin one serves /v1, and a forwarded
    header there names no client (no proxy fronts it), trusted proxies or not."""
    public, admin = held_listener(), held_listener()
    env = child_env(tmp_path / "two.db", MSGLEDGER_HTTP_WORKERS=workers,
                    MSGLEDGER_HTTP_ADMIN_LISTEN=f"127.0.0.1:{admin.getsockname()[1]}",
                    MSGLEDGER_HTTP_TRUSTED_PROXIES="127.0.0.1/32")
    forged = {**BEARER, "X-Forwarded-For": "198.51.100.66"}
    with public, admin:
        async with trio.open_nursery() as nursery:
            child = await start_activated(nursery, env, public, admin, names="public:admin")
            public_url = f"http://127.0.0.1:{public.getsockname()[1]}"
            admin_url = f"http://127.0.0.1:{admin.getsockname()[1]}"
            assert child.ready["admin_url"] == admin_url
            async with httpx.AsyncClient() as client:
                assert (await client.get(public_url + "/v1/messages", headers=BEARER)
                        ).status_code == 404
                assert (await client.get(admin_url + "/v1/messages", headers=forged)
                        ).status_code == 200
            await stop_child(child)
    [line] = [line for line in child.lines
              if line["event"] == "http_access" and line["path"] == "/v1/messages"
              and line["http_status"] == 200]
    assert line["client"] == "127.0.0.1"


@pytest.mark.parametrize(("names", "env", "key"), [
    ("admin", {"MSGLEDGER_HTTP_ADMIN_LISTEN": "127.0.0.1:9"}, "LISTEN_FDS"),  # no public one
    ("public:admin", {}, "http.admin_listen"),  # admin passed, admin_listen unset
    ("a:b", {}, "LISTEN_FDS"),  # two public sockets
])
async def test_passed_sockets_that_do_not_fit_stop_start_up(
        tmp_path: Path, names: str, env: dict[str, str], key: str) -> None:
    """Sockets systemd passes that the configuration cannot use: exit 2, one line naming
    what does not fit."""
    sockets = [held_listener() for _ in names.split(":")]
    fds = [sock.fileno() for sock in sockets]
    launcher = [sys.executable, "-c", ACTIVATE, names, ",".join(map(str, fds))]
    with trio.fail_after(60):
        result = await trio.run_process(
            [*launcher, sys.executable, "-m", "msgledger", "run"], pass_fds=fds,
            env={**child_env(tmp_path / "misfit.db"), **env}, capture_stdout=True,
            capture_stderr=True, check=False)
    for sock in sockets:
        sock.close()
    assert result.returncode == 2, result.stderr
    assert f"configuration error: {key}" in result.stderr.decode()


async def test_a_passed_socket_beyond_loopback_needs_a_public_url(tmp_path: Path) -> None:
    """As for http.listen: a passed socket on 0.0.0.0 without http.public_url would check
    every signature against the wrong URL; start-up refuses instead."""
    sock = socket.socket()
    sock.bind(("0.0.0.0", 0))
    sock.listen(16)
    launcher = [sys.executable, "-c", ACTIVATE, "public", str(sock.fileno())]
    with sock, trio.fail_after(60):
        result = await trio.run_process(
            [*launcher, sys.executable, "-m", "msgledger", "run"], pass_fds=[sock.fileno()],
            env=child_env(tmp_path / "wide.db"), capture_stderr=True, capture_stdout=True,
            check=False)
    assert result.returncode == 2
    assert "configuration error: http.public_url" in result.stderr.decode()
