"""The shipped proxy configurations (deploy/), run for real in front of the daemon.

nginx (deploy/nginx/msgledger.conf) and HAProxy (deploy/haproxy/msgledger.cfg) are started
with the file as shipped, only its placeholders substituted (the listen port, the
certificate, the daemon's address), a throwaway certificate from trustme, and everything
they write inside the test's directory, so the tests run as root or not. Twilio's side is
an httpx client speaking TLS to the proxy and signing for the https URL it calls.

A test skips only when the proxy's binary is absent (`.ci/run` installs Debian's
nginx-light and haproxy where it can).
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import ssl
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from urllib.parse import urlencode

import httpx
import pytest
import trio
import trustme

from .conftest import (
    API_TOKEN,
    FORM,
    callback_params,
    child_env,
    new_sid,
    signed,
    start_child,
    wait_until,
)
from .test_listeners import held_listener, start_activated

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
NGINX_CONF = DEPLOY / "nginx" / "msgledger.conf"
HAPROXY_CFG = DEPLOY / "haproxy" / "msgledger.cfg"
SBIN_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
PROXIES = ("nginx", "haproxy")
MAX_BODY = 64 * 1024  # http.max_body_bytes, the default both files are sized to
# Raw paths that normalise into /twilio/ or out of it: none may reach the daemon.
SNEAKY_PATHS = ("/twilio/../metrics", "/twilio/..%2fmetrics", "/twilio/%2e%2e/v1/messages",
                "//twilio/status", "/x/../twilio/status", "/v1/x/../../twilio/status")


def binary(name: str) -> str:
    """The proxy's binary, or skip: the only reason these tests may skip."""
    found = shutil.which(name, path=SBIN_PATH)
    if found is None:
        pytest.skip(f"{name} is not installed (apt-get install -y nginx-light haproxy; "
                    ".ci/run does it where it can)")
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def substitute(text: str, replacements: dict[str, str]) -> str:
    """Replace each placeholder, which must appear in a setting (not only in a comment)."""
    settings = [line.split("#", 1)[0] for line in text.splitlines()]
    for old, new in replacements.items():
        assert any(old in line for line in settings), f"placeholder {old!r} not in a setting"
        text = text.replace(old, new)
    return text


@dataclass(frozen=True)
class Certs:
    """A throwaway CA and a certificate for localhost signed by it, as files."""

    ca: trustme.CA
    chain: Path  # the certificate and its chain (nginx's ssl_certificate)
    key: Path  # its private key (nginx's ssl_certificate_key)
    bundle: Path  # key, certificate and chain in one file (HAProxy's crt)

    def client_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context()
        self.ca.configure_trust(context)
        return context


@pytest.fixture
def certs(tmp_path: Path) -> Certs:
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1")
    chain, key, bundle = tmp_path / "chain.pem", tmp_path / "key.pem", tmp_path / "bundle.pem"
    for blob in cert.cert_chain_pems:
        blob.write_to_path(str(chain), append=True)
    cert.private_key_pem.write_to_path(str(key))
    cert.private_key_and_cert_chain_pem.write_to_path(str(bundle))
    return Certs(ca, chain, key, bundle)


# ------------------------------------------------------------------------- the proxies


def nginx_files(workdir: Path, port: int, upstream: str, certs: Certs) -> Path:
    """The shipped file with its placeholders substituted, inside a minimal nginx.conf whose
    logs, pid and temporary files are all in `workdir`. Returns the nginx.conf."""
    workdir.mkdir(parents=True, exist_ok=True)
    site = substitute(NGINX_CONF.read_text(), {
        "listen 443 ssl;": f"listen 127.0.0.1:{port} ssl;",
        "/etc/ssl/msgledger/fullchain.pem": str(certs.chain),
        "/etc/ssl/msgledger/privkey.pem": str(certs.key),
        "server 127.0.0.1:8080;": f"server {upstream};",
    })
    (workdir / "msgledger.conf").write_text(site)
    temp = "\n".join(f"    {kind}_temp_path {workdir / kind};"
                     for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    main = workdir / "nginx.conf"
    main.write_text(
        "worker_processes 1;\n"  # one worker: one cache of idle upstream connections
        f"error_log {workdir / 'error.log'} notice;\n"
        "events { worker_connections 1024; }\n"
        "http {\n"
        f"    access_log {workdir / 'access.log'};\n"
        f"{temp}\n"
        f"    include {workdir / 'msgledger.conf'};\n"
        "}\n")
    return main


def nginx_command(workdir: Path, port: int, upstream: str, certs: Certs) -> list[str]:
    main = nginx_files(workdir, port, upstream, certs)
    return [binary("nginx"), "-p", str(workdir), "-e", str(workdir / "error.log"),
            "-c", str(main), "-g", f"daemon off; pid {workdir / 'nginx.pid'};"]


def haproxy_text(upstream: str, bind: str, crt: Path, *, keep_user: bool) -> str:
    text = substitute(HAPROXY_CFG.read_text(), {
        "bind :443 ": f"bind {bind} ",
        "/etc/haproxy/certs/msgledger.pem": str(crt),
        "server msgledger 127.0.0.1:8080 ": f"server msgledger {upstream} ",
    })
    dropped = ("chroot ",) if keep_user else ("chroot ", "user ", "group ")
    return "".join(line for line in text.splitlines(keepends=True)
                   if not line.strip().startswith(dropped))


def haproxy_command(workdir: Path, port: int, upstream: str, certs: Certs) -> list[str]:
    """The shipped file, substituted, without chroot/user/group (they need root and
    Debian's haproxy account): everything else as shipped."""
    workdir.mkdir(parents=True, exist_ok=True)
    cfg = workdir / "haproxy.cfg"
    cfg.write_text(haproxy_text(upstream, f"127.0.0.1:{port}", certs.bundle, keep_user=False))
    return [binary("haproxy"), "-db", "-f", str(cfg)]


COMMANDS: dict[str, Callable[[Path, int, str, Certs], list[str]]] = {
    "nginx": nginx_command, "haproxy": haproxy_command}


@dataclass
class Proxy:
    name: str
    port: int
    certs: Certs
    workdir: Path
    process: trio.Process = field(repr=False)

    @property
    def url(self) -> str:
        """What Twilio calls: http.public_url."""
        return f"https://localhost:{self.port}"

    def client(self, connections: int = 10) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.url, verify=self.certs.client_context(),
                                 timeout=20, limits=httpx.Limits(max_connections=connections))

    def log(self) -> str:
        return "".join(p.read_text(errors="replace") for p in sorted(self.workdir.glob("*.log")))


async def accepts(port: int) -> bool:
    try:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
    except OSError:
        return False
    await stream.aclose()
    return True


@asynccontextmanager
async def running_proxy(name: str, workdir: Path, port: int, upstream: str,
                        certs: Certs) -> AsyncIterator[Proxy]:
    """The proxy in the foreground on 127.0.0.1:`port` in front of `upstream`, until the
    block ends (SIGTERM, then wait)."""
    command = COMMANDS[name](workdir, port, upstream, certs)
    with (workdir / "stdout.log").open("wb") as out:
        process = await trio.lowlevel.open_process(command, stdout=out,
                                                   stderr=subprocess.STDOUT)
    proxy = Proxy(name, port, certs, workdir, process)
    try:
        with trio.fail_after(15):
            while not await accepts(port):
                assert process.poll() is None, f"{name} exited: {proxy.log()}"
                await trio.sleep(0.05)
        yield proxy
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        with trio.move_on_after(10) as waited:
            await process.wait()
        if waited.cancelled_caught:
            process.kill()
            await process.wait()


async def raw_https(proxy: Proxy, head: str) -> tuple[int, bytes]:
    """Send one request exactly as written (httpx would normalise the path); its status
    and body. The request must ask for `Connection: close`."""
    stream = await trio.open_ssl_over_tcp_stream("localhost", proxy.port, https_compatible=True,
                                                 ssl_context=proxy.certs.client_context())
    async with stream:
        await stream.send_all(head.encode("latin-1"))
        answer = b""
        while chunk := await stream.receive_some():
            answer += chunk
    status_line, _, rest = answer.partition(b"\r\n")
    return int(status_line.split()[1]), rest.partition(b"\r\n\r\n")[2]


# ------------------------------------------------------------ the daemon behind each


async def daemon_behind(name: str, tmp_path: Path, certs: Certs,
                        check: Callable[[Proxy, str], Awaitable[None]]) -> None:
    """The daemon as a child process behind proxy `name`, its http.public_url the proxy's
    https URL; `check(proxy, daemon_url)` runs while both are up."""
    port = free_port()
    env = child_env(tmp_path / "ledger.db", MSGLEDGER_HTTP_PUBLIC_URL=f"https://localhost:{port}")
    with trio.fail_after(90):
        async with trio.open_nursery() as nursery:
            child = await start_child(nursery, env)
            upstream = child.url.removeprefix("http://")
            try:
                async with running_proxy(name, tmp_path / name, port, upstream, certs) as proxy:
                    await check(proxy, child.url)
            finally:
                child.process.send_signal(signal.SIGTERM)
                exit_code = await child.process.wait()
    assert exit_code == 0


@pytest.mark.parametrize("name", PROXIES)
async def test_signed_callbacks_through_tls_are_journaled(tmp_path: Path, certs: Certs,
                                                          name: str) -> None:
    """Signed callbacks through the proxy's TLS front get 200, and each is in the store,
    with the query (a percent-encoded ref) passed on as signed."""
    binary(name)
    sids = [new_sid() for _ in range(40)]

    async def check(proxy: Proxy, daemon_url: str) -> None:
        statuses: dict[str, int] = {}
        async with proxy.client(connections=16) as client:
            async def post(i: int, sid: str) -> None:
                path = "/twilio/status?" + urlencode({"ref": f"order:{i}"})
                params = callback_params(sid, "delivered")
                response = await client.post(path, content=urlencode(params),
                                             headers=signed(proxy.url + path, params))
                statuses[sid] = response.status_code

            async with trio.open_nursery() as nursery:
                for i, sid in enumerate(sids):
                    nursery.start_soon(post, i, sid)
        assert set(statuses.values()) == {200}, statuses
        async with httpx.AsyncClient(base_url=daemon_url, timeout=10) as direct:
            for i, sid in enumerate(sids):
                response = await direct.get(f"/v1/messages/{sid}",
                                            headers={"Authorization": f"Bearer {API_TOKEN}"})
                assert response.status_code == 200, response.text
                record = response.json()
                assert record["status"] == "delivered" and record["ref"] == f"order:{i}"

    await daemon_behind(name, tmp_path, certs, check)


@pytest.mark.parametrize("name", PROXIES)
async def test_only_twilio_routes_are_published(tmp_path: Path, certs: Certs,
                                                name: str) -> None:
    """/metrics, /v1 (with the right token), /healthz and the OpenAPI document answer 404
    from the proxy, never the daemon's content, and so does any raw path that only
    normalises into /twilio/; an unsigned callback reaches the daemon and gets its 403; a
    body over http.max_body_bytes gets 413 from the proxy."""
    binary(name)
    bearer = {"Authorization": f"Bearer {API_TOKEN}"}

    async def check(proxy: Proxy, daemon_url: str) -> None:
        async with httpx.AsyncClient(base_url=daemon_url) as direct:  # the daemon has them
            assert (await direct.get("/v1/messages", headers=bearer)).status_code == 200
            assert "msgledger_" in (await direct.get("/metrics")).text
        async with proxy.client() as client:
            for path in ("/metrics", "/v1/messages", "/v1/openapi.json", "/healthz", "/"):
                response = await client.get(path, headers=bearer)
                assert response.status_code == 404, (path, response.text)
                assert "msgledger" not in response.text and "{" not in response.text, path
            response = await client.post("/v1/messages", json={"to": "+15558675310"},
                                         headers=bearer)
            assert response.status_code == 404 and "{" not in response.text

            params = callback_params(new_sid(), "delivered")
            unsigned = await client.post("/twilio/status", content=urlencode(params),
                                         headers=FORM)
            assert unsigned.status_code == 403, unsigned.text
            forged = await client.post("/twilio/status", content=urlencode(params),
                                       headers=signed("https://elsewhere.example/twilio/status",
                                                      params))
            assert forged.status_code == 403, forged.text
        for path in SNEAKY_PATHS:
            status, body = await raw_https(
                proxy, f"GET {path} HTTP/1.1\r\nHost: localhost:{proxy.port}\r\n"
                       f"Authorization: Bearer {API_TOKEN}\r\nConnection: close\r\n\r\n")
            assert status in (400, 404), (path, status, body)
            assert b"msgledger" not in body and b"{" not in body, (path, body)
        # Refused on its Content-Length, before the body is read (a proxy that answers and
        # closes while a body is still arriving may reset the connection under its answer).
        status, body = await raw_https(
            proxy, f"POST /twilio/status HTTP/1.1\r\nHost: localhost:{proxy.port}\r\n"
                   f"Content-Type: {FORM['Content-Type']}\r\n"
                   f"Content-Length: {MAX_BODY + 1}\r\nConnection: close\r\n\r\n")
        assert status == 413, body

    await daemon_behind(name, tmp_path, certs, check)


# ------------------------------------------- what the proxy sends upstream, observed


@dataclass
class Upstream:
    """A stand-in for the daemon that records every connection and request head."""

    connections: int = 0
    heads: list[str] = field(default_factory=list)

    async def serve(self, stream: trio.SocketStream) -> None:
        self.connections += 1
        buffer = b""
        async with stream:
            while True:
                while b"\r\n\r\n" not in buffer:
                    chunk = await stream.receive_some()
                    if not chunk:
                        return
                    buffer += chunk
                head, _, buffer = buffer.partition(b"\r\n\r\n")
                length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), 0)
                while len(buffer) < length:
                    buffer += await stream.receive_some()
                buffer = buffer[length:]
                self.heads.append(head.decode("latin-1"))
                await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")


def header(head: str, name: str) -> list[str]:
    return [line.split(":", 1)[1].strip() for line in head.split("\r\n")[1:]
            if line.split(":", 1)[0].lower() == name]


@pytest.mark.parametrize("name", PROXIES)
async def test_upstream_requests_are_kept_alive_and_say_who_sent_them(
        tmp_path: Path, certs: Certs, name: str) -> None:
    """HTTP/1.1 to the daemon with no Connection header, so 30 callbacks in a row use one
    upstream connection; Host as the client sent it, letter case included (Twilio signs
    the URL as typed in its console); X-Forwarded-For ends with the client's address."""
    binary(name)
    upstream = Upstream()
    port = free_port()
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            [listener] = await nursery.start(partial(trio.serve_tcp, upstream.serve, 0,
                                                     host="127.0.0.1"))
            upstream_port = listener.socket.getsockname()[1]
            async with running_proxy(name, tmp_path / name, port, f"127.0.0.1:{upstream_port}",
                                     certs) as proxy, proxy.client() as client:
                host = f"LocalHost:{port}"
                for i in range(30):
                    response = await client.post(
                        f"/twilio/status?n={i}", content=b"MessageSid=x",
                        headers={**FORM, "Host": host, "Connection": "keep-alive",
                                 "X-Forwarded-For": "203.0.113.7"})
                    assert response.status_code == 200 and response.text == "ok"
                await wait_until(lambda: len(upstream.heads) == 30)
            nursery.cancel_scope.cancel()
    assert upstream.connections == 1, upstream.connections
    for i, head in enumerate(upstream.heads):
        assert head.split("\r\n")[0] == f"POST /twilio/status?n={i} HTTP/1.1"
        assert header(head, "connection") in ([], ["keep-alive"]), head
        assert header(head, "host") == [host], head
        forwarded = ", ".join(header(head, "x-forwarded-for"))
        assert forwarded.startswith("203.0.113.7") and forwarded.endswith("127.0.0.1"), head


# -------------------------------------------------------------------- the files alone


def test_haproxy_accepts_the_shipped_file(tmp_path: Path, certs: Certs) -> None:
    """`haproxy -c` on the shipped file, only the certificate path substituted (and the
    user lines dropped where Debian's haproxy account does not exist)."""
    haproxy = binary("haproxy")
    try:
        pwd.getpwnam("haproxy")
        keep_user = True
    except KeyError:
        keep_user = False
    text = haproxy_text("127.0.0.1:8080", ":443", certs.bundle, keep_user=keep_user)
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(text)
    result = subprocess.run([haproxy, "-c", "-dW", "-f", str(cfg)], capture_output=True,
                            text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_nginx_accepts_the_shipped_file(tmp_path: Path, certs: Certs) -> None:
    """`nginx -t` on the shipped file inside a minimal http {} block."""
    command = nginx_command(tmp_path, free_port(), "127.0.0.1:8080", certs)
    result = subprocess.run([command[0], "-t", *command[1:]], capture_output=True, text=True,
                            check=False)
    assert result.returncode == 0, result.stdout + result.stderr


# ------------------------------------------------------------ a restart behind each


RESTART_CLIENTS = 16  # keep-alive clients through the proxy, as Twilio's bursts are
RESTART_EACH_SIDE = 300  # callbacks answered before the restart, and after it


@pytest.mark.parametrize("name", PROXIES)
async def test_a_restart_behind_the_proxy_loses_no_callback(tmp_path: Path, certs: Certs,
                                                            name: str, workers: str) -> None:
    """The daemon restarted under 16 keep-alive clients through the shipped proxy file,
    with its listener held as systemd holds msgledger.socket: every callback is answered
    200, none is a 502 or a dropped connection. The proxy's pooled connections to the old
    process are what a drain used to close under a request in flight to them."""
    listener = held_listener()
    port = free_port()
    env = child_env(tmp_path / "restart.db", MSGLEDGER_HTTP_WORKERS=workers,
                    MSGLEDGER_HTTP_PUBLIC_URL=f"https://localhost:{port}")
    outcomes: list[int | str] = []
    done = trio.Event()
    upstream = f"127.0.0.1:{listener.getsockname()[1]}"
    with listener, trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            first = await start_activated(nursery, env, listener)
            async with (running_proxy(name, tmp_path / name, port, upstream, certs) as proxy,
                        trio.open_nursery() as clients):
                for _ in range(RESTART_CLIENTS):
                    clients.start_soon(_post_until, proxy, done, outcomes)
                await wait_until(lambda: len(outcomes) >= RESTART_EACH_SIDE)
                first.process.send_signal(signal.SIGTERM)
                assert await first.process.wait() == 0
                second = await start_activated(nursery, env, listener)
                before = len(outcomes)
                await wait_until(lambda: len(outcomes) >= before + RESTART_EACH_SIDE)
                done.set()
            second.process.send_signal(signal.SIGTERM)
            assert await second.process.wait() == 0
    assert [o for o in outcomes if o != 200] == []


async def _post_until(proxy: Proxy, done: trio.Event, outcomes: list[int | str]) -> None:
    async with proxy.client(connections=1) as client:
        while not done.is_set():
            params = callback_params(new_sid(), "delivered")
            url = proxy.url + "/twilio/status"
            try:
                answer = await client.post("/twilio/status", content=urlencode(params),
                                           headers=signed(url, params))
                outcomes.append(answer.status_code)
            except httpx.HTTPError as error:
                outcomes.append(type(error).__name__)
