"""Who sent a request: the client resolver (`http/clients.py`), the access lines
(`http/access.py`), and both end to end in the daemon's log and journal."""

from __future__ import annotations

import hashlib
import ipaddress
import signal
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import httpx
import pytest
import structlog
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from msgledger.http.access import AccessLog, token_id
from msgledger.http.clients import UNIX_PEER, ClientResolver, client_of, parse_node

from .conftest import (
    API_TOKEN,
    FORM,
    ChildDaemon,
    callback_params,
    child_env,
    new_sid,
    signed,
    start_child,
)

PROXY = "10.0.0.2"
TRUSTED = ("10.0.0.0/24", "2001:db8:1::/48")


def scope(peer: str | None = PROXY, *headers: tuple[str, str], path: str = "/v1/x",
          kind: str = "http") -> dict[str, Any]:
    return {"type": kind, "method": "GET", "path": path,
            "client": None if peer is None else (peer, 40000),
            "headers": [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers]}


def sha8(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()[:8]


# ------------------------------------------------------------------ the resolver


def test_the_peer_when_no_proxy_is_trusted() -> None:
    """The default: the TCP peer, whatever the headers say."""
    request = scope("192.0.2.9", ("X-Forwarded-For", "203.0.113.7"), ("Forwarded", "for=1.2.3.4"))
    assert client_of(request, ()) == "192.0.2.9"


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["x-forwarded-for", "forwarded", "x-real-ip"]),
                          st.text(alphabet=st.characters(max_codepoint=255)))))
def test_no_header_is_read_without_trusted_proxies(headers: list[tuple[str, str]]) -> None:
    """With nothing trusted, no header of any content changes the client (or raises)."""
    assert client_of(scope("192.0.2.9", *headers), ()) == "192.0.2.9"


def test_headers_from_an_untrusted_peer_are_ignored() -> None:
    request = scope("192.0.2.9", ("X-Forwarded-For", "203.0.113.7"), ("Forwarded", "for=1.2.3.4"))
    assert client_of(request, TRUSTED) == "192.0.2.9"


def test_a_unix_socket_peer() -> None:
    """hypercorn gives no address for a unix socket: "unix", headers unread."""
    assert client_of(scope(None, ("X-Forwarded-For", "203.0.113.7")), TRUSTED) == UNIX_PEER


@pytest.mark.parametrize(("xff", "client"), [
    (["203.0.113.7"], "203.0.113.7"),
    (["203.0.113.7, 10.0.0.3"], "203.0.113.7"),  # our other proxy is skipped
    (["198.51.100.1, 203.0.113.7"], "203.0.113.7"),  # left of the client: its own say
    (["203.0.113.7", "10.0.0.3"], "203.0.113.7"),  # two header lines are one list
    (["10.0.0.4, 10.0.0.3"], "10.0.0.4"),  # every hop trusted: the leftmost
    (["203.0.113.7, garbage, 10.0.0.3"], "10.0.0.3"),  # unreadable: the last good one
    (["unknown"], PROXY),  # nothing readable: the proxy itself
    (["203.0.113.7:5555"], "203.0.113.7"),
    (["2001:db8::7"], "2001:db8::7"),
    (["[2001:db8::7]:443"], "2001:db8::7"),
    (["2001:DB8:0::7"], "2001:db8::7"),  # one spelling per address
    (["::ffff:203.0.113.7"], "203.0.113.7"),
    (["203.0.113.7,, "], "203.0.113.7"),  # empty list elements are ignored
    ([""], PROXY),
])
def test_x_forwarded_for_rightmost_first(xff: list[str], client: str) -> None:
    headers = [("X-Forwarded-For", line) for line in xff]
    assert client_of(scope(PROXY, *headers), TRUSTED) == client


@pytest.mark.parametrize(("forwarded", "client"), [
    # RFC 7239 §4's and §7.1's examples
    (['for="_gazonk"'], PROXY),
    (['For="[2001:db8:cafe::17]:4711"'], "2001:db8:cafe::17"),
    (["for=192.0.2.60;proto=http;by=203.0.113.43"], "192.0.2.60"),
    (["for=192.0.2.43, for=198.51.100.17"], "198.51.100.17"),
    (["for=192.0.2.43", "for=198.51.100.17"], "198.51.100.17"),
    (["for=192.0.2.43, for=10.0.0.3;by=10.0.0.2"], "192.0.2.43"),
    (['for=192.0.2.43;by="x,y;z", for=unknown'], PROXY),  # quoted separators are data
    (['for="192.0.2.43:80"'], "192.0.2.43"),
    (['for="[2001:db8::1]:_port"'], "2001:db8::1"),
    (['for="\\1\\9\\2.0.2.43"'], "192.0.2.43"),  # a quoted-pair is its character
    (["proto=https"], PROXY),  # no for=: nothing to read
    (["for=192.0.2.43;for=192.0.2.44"], PROXY),  # two for= in one element
    (["for=192.0.2.43;;"], PROXY),  # malformed
    (['for="192.0.2.43'], PROXY),  # an unclosed quote
])
def test_forwarded_forms(forwarded: list[str], client: str) -> None:
    headers = [("Forwarded", line) for line in forwarded]
    assert client_of(scope(PROXY, *headers), TRUSTED) == client


def test_x_forwarded_for_wins_over_forwarded() -> None:
    """The header common proxies write is read; a client's own Forwarded, which such a
    proxy passes on untouched, is not (docs/clients.md)."""
    request = scope(PROXY, ("Forwarded", "for=198.51.100.66"), ("X-Forwarded-For", "203.0.113.7"))
    assert client_of(request, TRUSTED) == "203.0.113.7"


def test_a_mapped_ipv6_peer_matches_an_ipv4_network() -> None:
    """A dual-stack listener sees IPv4 peers as ::ffff:a.b.c.d."""
    request = scope(f"::ffff:{PROXY}", ("X-Forwarded-For", "203.0.113.7"))
    assert client_of(request, TRUSTED) == "203.0.113.7"


def test_an_ipv6_proxy() -> None:
    request = scope("2001:db8:1::5", ("X-Forwarded-For", "203.0.113.7, 2001:db8:1::6"))
    assert client_of(request, TRUSTED) == "203.0.113.7"


addresses = st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6)).map(
    lambda a: a.ipv4_mapped or a if isinstance(a, ipaddress.IPv6Address) else a)
trusted_v4 = st.integers(0, 255).map(lambda n: ipaddress.IPv4Address(f"10.0.0.{n}"))


def xff_entry(address: Any, port: int | None) -> str:
    if port is None:
        return str(address)
    return f"[{address}]:{port}" if address.version == 6 else f"{address}:{port}"


def forwarded_element(address: Any, port: int | None, extra: str) -> str:
    node = xff_entry(address, port)
    value = f'"{node}"' if address.version == 6 or port is not None else node
    return f"{extra}for={value}" if extra else f"for={value}"


def model(hops: list[Any], resolver: ClientResolver) -> str:
    """The client, walked the plain way: the first untrusted from the right."""
    for address in reversed(hops):
        if not resolver.trusted(address):
            return str(address)
    return str(hops[0]) if hops else PROXY


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.one_of(addresses, trusted_v4),
                          st.one_of(st.none(), st.integers(0, 65535)),
                          st.sampled_from(["", "proto=https;", "by=10.0.0.2;"])),
                min_size=1, max_size=8),
       st.booleans(), st.integers(1, 3))
def test_both_headers_agree_with_the_model(hops: list[tuple[Any, int | None, str]],
                                           forwarded: bool, lines: int) -> None:
    """Any chain of hops, in either header, split over header lines anywhere, in any of
    their spellings, names the rightmost untrusted hop (or the leftmost, all trusted)."""
    resolver = ClientResolver(TRUSTED)
    entries = [forwarded_element(a, p, x) if forwarded else xff_entry(a, p) for a, p, x in hops]
    cut = len(entries) * (lines - 1) // 3
    chunks = [entries[:cut], entries[cut:]] if cut else [entries]
    name = "Forwarded" if forwarded else "X-Forwarded-For"
    request = scope(PROXY, *[(name, ", ".join(chunk)) for chunk in chunks])
    assert resolver.client(request) == model([a for a, _, _ in hops], resolver)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["X-Forwarded-For", "Forwarded"]),
                          st.text(alphabet=st.characters(max_codepoint=255), max_size=80)),
                max_size=4))
def test_any_header_text_names_an_address(headers: list[tuple[str, str]]) -> None:
    """Garbage never raises, and the client is always an address."""
    assert parse_node(client_of(scope(PROXY, *headers), TRUSTED)) is not None


# ------------------------------------------------------------------ the access line


def test_token_id() -> None:
    """The first 8 hex digits of the presented token's SHA-256, however it is spaced."""
    assert token_id(b"Bearer s3cret") == sha8("s3cret")
    assert token_id(b"bearer   s3cret ") == sha8("s3cret")
    assert token_id(b"Basic dXNlcjpwYXNz") is None
    assert token_id(b"Bearer ") is None
    assert token_id(None) is None


def answering(status: int) -> Any:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": b""})
    return app


async def call(app: Any, request: Mapping[str, Any]) -> list[dict[str, Any]]:
    async def receive() -> Any:
        return {"type": "http.request", "body": b""}

    async def send(message: Any) -> None:
        pass

    with structlog.testing.capture_logs() as logged:
        await app(request, receive, send)
    return logged


@pytest.mark.parametrize(("path", "status", "level"), [
    ("/v1/messages", 200, "info"), ("/v1/messages", 401, "warning"),
    ("/metrics", 200, "info"), ("/nowhere", 404, "warning"), ("/v1/messages", 503, "error"),
    ("/healthz", 200, "info"), ("/healthz", 503, "warning"),
])
async def test_one_access_line(path: str, status: int, level: str) -> None:
    """Method, path, status, ms, client, user agent; the token's id on /v1 only."""
    app = AccessLog(answering(status), ClientResolver(()))
    request = scope("192.0.2.9", ("User-Agent", "curl/8" + "x" * 300),
                    ("Authorization", "Bearer tok"), path=path)
    [line] = await call(app, request)
    assert line["event"] == "http_access" and line["log_level"] == level
    assert (line["method"], line["path"], line["http_status"]) == ("GET", path, status)
    assert line["client"] == "192.0.2.9" and line["ms"] >= 0
    assert line["user_agent"] == ("curl/8" + "x" * 300)[:200]
    assert line.get("token") == (sha8("tok") if path.startswith("/v1") else None)


async def test_skipped_paths_and_other_scopes_pass_through() -> None:
    app = AccessLog(answering(200), ClientResolver(()), skip={"/twilio/status"})
    assert await call(app, scope(path="/twilio/status")) == []
    assert await call(app, scope(kind="websocket")) == []
    assert await call(app, {"type": "lifespan"}) == []


async def test_an_app_that_raises_is_logged_as_500() -> None:
    async def broken(scope: Any, receive: Any, send: Any) -> None:
        raise RuntimeError("bug")

    with structlog.testing.capture_logs() as logged, pytest.raises(RuntimeError):
        await AccessLog(broken, ClientResolver(()))(scope(), None, None)  # type: ignore[arg-type]
    assert [(line["event"], line["http_status"]) for line in logged] == [("http_access", 500)]


# ------------------------------------------------------------------ end to end

SPOOFED = "203.0.113.7"


@asynccontextmanager
async def child_daemon(tmp_path: Path, workers: str, **extra: str) -> AsyncIterator[ChildDaemon]:
    """`msgledger run`, stopped (and its every line read) on leaving."""
    env = child_env(tmp_path / "ledger.db", MSGLEDGER_HTTP_WORKERS=workers, **extra)
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            child = await start_child(nursery, env)
            try:
                yield child
            finally:
                child.process.send_signal(signal.SIGTERM)
                await child.process.wait()


def lines(child: ChildDaemon, event: str, **fields: object) -> list[dict[str, object]]:
    return [line for line in child.lines if line.get("event") == event
            and all(line.get(k) == v for k, v in fields.items())]


async def exchange(child: ChildDaemon, headers: Mapping[str, str]) -> tuple[str, str]:
    """A forged callback, an anonymous and a wrong-token /v1 request, a signed callback,
    and its record read back; the record's client and the signed one's SID."""
    sid, path = new_sid(), "/twilio/status"
    params = callback_params(sid, "sent")
    async with httpx.AsyncClient(base_url=child.url, headers=headers) as client:
        forged = await client.post(path, content=urlencode(params),
                                   headers=signed(child.url + path, params, token="forged"))
        anonymous = await client.get("/v1/messages/x")
        wrong = await client.get("/v1/messages/x", headers={"Authorization": "Bearer nope"})
        good = await client.post(path, content=urlencode(params),
                                 headers=signed(child.url + path, params))
        record = await client.get(f"/v1/messages/{sid}",
                                  headers={"Authorization": f"Bearer {API_TOKEN}"})
        health = await client.get("/healthz")
    codes = (forged.status_code, anonymous.status_code, wrong.status_code, good.status_code,
             record.status_code, health.status_code)
    assert codes == (403, 401, 401, 200, 200, 200)
    return record.json()["history"][0]["data"]["client"], sid


@pytest.mark.parametrize("trusted", [False, True], ids=["direct", "behind-a-proxy"])
async def test_every_line_names_the_client(tmp_path: Path, workers: str, trusted: bool) -> None:
    """A refused callback and a refused /v1 request each leave one line naming the client,
    the journaled event keeps it; behind a trusted proxy it is X-Forwarded-For's, and
    without one that header names nobody."""
    extra = {"MSGLEDGER_HTTP_TRUSTED_PROXIES": "127.0.0.1/32"} if trusted else {}
    client = SPOOFED if trusted else "127.0.0.1"
    async with child_daemon(tmp_path, workers, **extra) as child:
        stored, sid = await exchange(child, {"X-Forwarded-For": SPOOFED,
                                             "User-Agent": "probe/1.0"})
    assert stored == client
    [refused] = lines(child, "callback_refused")
    assert (refused["client"], refused["path"], refused["user_agent"], refused["http_status"]
            ) == (client, "/twilio/status", "probe/1.0", 403)
    [journaled] = lines(child, "callback_journaled")
    assert (journaled["client"], journaled["sid"]) == (client, sid)
    [anonymous] = lines(child, "http_access", http_status=401, token=None)
    assert (anonymous["client"], anonymous["path"], anonymous["method"], anonymous["user_agent"]
            ) == (client, "/v1/messages/x", "GET", "probe/1.0")
    [wrong] = lines(child, "http_access", http_status=401, token=sha8("nope"))
    [read] = lines(child, "http_access", http_status=200, token=sha8(API_TOKEN))
    [health] = lines(child, "http_access", path="/healthz")
    assert {wrong["client"], read["client"], health["client"]} == {client}
    assert lines(child, "http_access", path="/twilio/status") == []  # its own line only
    if not trusted:
        assert not [line for line in child.lines if line.get("client") == SPOOFED]


async def test_log_access_off_keeps_the_webhook_lines(tmp_path: Path, workers: str) -> None:
    """log.access = false: no http_access line at all, the callback lines as ever."""
    async with child_daemon(tmp_path, workers, MSGLEDGER_LOG_ACCESS="false") as child:
        await exchange(child, {})
    assert lines(child, "http_access") == []
    assert len(lines(child, "callback_refused", client="127.0.0.1")) == 1
    assert len(lines(child, "callback_journaled", client="127.0.0.1")) == 1


async def test_access_lines_name_root_paths_under_a_prefix(tmp_path: Path, workers: str) -> None:
    """Under http.public_url's prefix, the line names the route (the prefix is stripped
    first), and a 404 gets its line too."""
    prefixed = {"MSGLEDGER_HTTP_PUBLIC_URL": "https://ledger.example.com/ledger"}
    async with child_daemon(tmp_path, workers, **prefixed) as child, httpx.AsyncClient(
            base_url=child.url) as client:
        codes = [(await client.get(path)).status_code
                 for path in ("/ledger/healthz", "/ledger/v1/messages/x", "/ledger/nope")]
        form = await client.post("/ledger/twilio/status", content="a=b", headers=FORM)
    assert (codes, form.status_code) == ([200, 401, 404], 403)
    # sorted: with fronts, two processes write the lines
    assert sorted((line["path"], line["http_status"]) for line in lines(child, "http_access")
                  ) == [("/healthz", 200), ("/nope", 404), ("/v1/messages/x", 401)]
    [refused] = lines(child, "callback_refused")
    assert refused["path"] == "/twilio/status"
