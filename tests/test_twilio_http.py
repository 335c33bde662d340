"""The urllib3 client under the `twilio` client (`twilio_http`): it sends what `requests`
sent, and takes from the environment what `requests` took (the proxy, the CA bundle)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import pytest
import trio
import urllib3
from requests.utils import DEFAULT_CA_BUNDLE_PATH
from twilio.base.exceptions import TwilioException

from msgledger.twilio_api import Fetched, TwilioApi, TwilioConfig
from msgledger.twilio_http import PooledHttpClient, proxy_for

from .fake_twilio import fake_twilio, lifespan, read_body

ACCOUNT_SID = "AC" + "1" * 32
SID = "SM" + "2" * 32

Seen = list[dict[str, Any]]


def recording(seen: Seen) -> Callable[..., Any]:
    """An ASGI Twilio that keeps each request and answers it with one delivered message."""

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await lifespan(receive, send)
            return
        body = await read_body(receive)
        seen.append({"method": scope["method"], "path": scope["path"],
                     "query": parse_qs(scope["query_string"].decode()),
                     "headers": {k.decode(): v.decode() for k, v in scope["headers"]},
                     "form": parse_qs(body.decode())})
        answer = b'{"sid": "%s", "status": "delivered", "account_sid": "%s"}' % (
            SID.encode(), ACCOUNT_SID.encode())
        await send({"type": "http.response.start", "status": 201,
                    "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": answer})

    return app


@pytest.fixture(autouse=True)
def no_proxy_from_outside(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test sets the proxy variables it means; none leak in from the machine."""
    for name in ("http_proxy", "https_proxy", "all_proxy", "no_proxy", "REQUESTS_CA_BUNDLE",
                 "CURL_CA_BUNDLE"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)


def api_for(base_url: str) -> TwilioApi:
    return TwilioApi(TwilioConfig(ACCOUNT_SID, "token", base_url=base_url, timeout=5.0))


async def test_a_create_sends_the_form_requests_sent() -> None:
    """Basic auth, a form body, a list as repeated keys, twilio's own headers."""
    seen: Seen = []
    async with fake_twilio(recording(seen)) as base_url:
        outcome = await api_for(base_url).create_message(
            {"to": "+15550001111", "from_": "+15550002222", "body": "héllo & bye",
             "media_url": ["https://a.example/1.png", "https://a.example/2.png"]})
    assert getattr(outcome, "sid", None) == SID
    [request] = seen
    assert request["method"] == "POST"
    assert request["path"] == f"/2010-04-01/Accounts/{ACCOUNT_SID}/Messages.json"
    assert request["headers"]["authorization"] == urllib3.make_headers(
        basic_auth=f"{ACCOUNT_SID}:token")["authorization"]
    assert request["headers"]["content-type"] == "application/x-www-form-urlencoded"
    assert request["headers"]["user-agent"].startswith("twilio-python/")
    assert request["form"] == {"To": ["+15550001111"], "From": ["+15550002222"],
                               "Body": ["héllo & bye"],
                               "MediaUrl": ["https://a.example/1.png", "https://a.example/2.png"]}


async def test_a_list_sends_its_query() -> None:
    """A list's filters travel as the query string, as requests sent them."""
    seen: Seen = []
    async with fake_twilio(recording(seen)) as base_url:
        api = api_for(base_url)
        with pytest.raises(TwilioException):  # the answer is no page: only the request counts
            await api.call(lambda c: c.messages.page(to="+15550001111", page_size=50))
    [request] = seen
    assert request["method"] == "GET"
    assert request["query"] == {"To": ["+15550001111"], "PageSize": ["50"]}
    assert request["form"] == {}


async def test_requests_go_through_the_environment_s_proxy(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """With http_proxy set, the request goes to the proxy, naming the whole URL, with the
    proxy URL's credentials as Proxy-Authorization; no DNS for Twilio's host is needed."""
    seen: Seen = []
    async with fake_twilio(recording(seen)) as proxy_url:
        host, port = proxy_url.removeprefix("http://").split(":")
        monkeypatch.setenv("http_proxy", f"http://me:secret@{host}:{port}")
        answer = await api_for("http://api.twilio.invalid").fetch_message(SID)
    assert isinstance(answer, Fetched) and answer.status == "delivered"
    [request] = seen
    # The absolute form, as a proxy is asked (hypercorn keeps the target as the path).
    assert request["path"] == (
        f"http://api.twilio.invalid/2010-04-01/Accounts/{ACCOUNT_SID}/Messages/{SID}.json")
    assert request["headers"]["host"] == "api.twilio.invalid"
    assert request["headers"]["proxy-authorization"] == urllib3.make_headers(
        proxy_basic_auth="me:secret")["proxy-authorization"]


def test_the_proxy_is_chosen_as_requests_chooses_it(monkeypatch: pytest.MonkeyPatch) -> None:
    assert proxy_for("https://api.twilio.com") is None
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.corp:3128")
    assert proxy_for("https://api.twilio.com") == "http://proxy.corp:3128"
    assert proxy_for("http://127.0.0.1:8080") is None  # only https_proxy is set
    monkeypatch.setenv("NO_PROXY", ".twilio.com,localhost")
    assert proxy_for("https://api.twilio.com") is None
    monkeypatch.setenv("ALL_PROXY", "http://all.corp:3128")
    assert proxy_for("http://127.0.0.1:8080") == "http://all.corp:3128"
    client = PooledHttpClient("https://api.twilio.com", timeout=3.0, connections=4)
    assert isinstance(client.pool_for("http://127.0.0.1:8080/x"), urllib3.ProxyManager)
    assert not isinstance(client.pool_for("https://api.twilio.com/y"), urllib3.ProxyManager)
    # One client, each host its own route: the export's storage host may go direct.
    monkeypatch.setenv("NO_PROXY", ".twilio.com,storage.example")
    routed = PooledHttpClient("http://api.example", timeout=3.0, connections=4)
    assert isinstance(routed.pool_for("http://api.example/a"), urllib3.ProxyManager)
    assert not isinstance(routed.pool_for("http://storage.example/f.gz"), urllib3.ProxyManager)
    monkeypatch.setenv("ALL_PROXY", "all.corp:3128")  # no scheme: requests takes http://
    assert proxy_for("http://127.0.0.1:8080") == "http://all.corp:3128"


def test_tls_is_verified_against_the_bundle_requests_uses(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def verified_by(pool: urllib3.PoolManager) -> tuple[Any, Any]:
        return pool.connection_pool_kw.get("ca_certs"), pool.connection_pool_kw.get("ca_cert_dir")

    def pool_for(url: str, connections: int) -> urllib3.PoolManager:
        return PooledHttpClient(url, timeout=3.0, connections=connections).pool_for(url)

    assert verified_by(pool_for("https://api.twilio.com", connections=2)) == (
        DEFAULT_CA_BUNDLE_PATH, None)
    bundle = tmp_path / "corp.pem"
    bundle.write_text("")
    monkeypatch.setenv("CURL_CA_BUNDLE", str(bundle))
    assert verified_by(pool_for("https://api.twilio.com", connections=2)) == (str(bundle), None)
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(tmp_path))
    assert verified_by(pool_for("https://api.twilio.com", connections=2)) == (
        None, str(tmp_path))


def test_the_pool_keeps_a_connection_a_thread() -> None:
    client = PooledHttpClient("https://api.twilio.com", timeout=3.0, connections=12)
    assert client.pool_for("https://api.twilio.com").connection_pool_kw["maxsize"] == 12
    assert client.timeout == 3.0


async def test_an_answer_cut_short_is_a_connection_lost(nursery: trio.Nursery) -> None:
    """A server that closes without answering: the create may have happened (Unknown)."""
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]

    async def hang_up(stream: trio.SocketStream) -> None:
        await stream.receive_some(65536)
        await stream.aclose()

    nursery.start_soon(trio.serve_listeners, hang_up, [listener])
    port = listener.socket.getsockname()[1]
    outcome = await api_for(f"http://127.0.0.1:{port}").create_message(
        {"to": "+15550001111", "from_": "+15550002222", "body": "x"})
    assert type(outcome).__name__ == "Unknown"
    assert "connection lost" in getattr(outcome, "reason", "")
