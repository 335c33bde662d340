"""A path prefix in http.public_url (issue 19): the routes answer under it and at the root,
so a proxy may strip it or pass it on, and signatures are checked against the public URL
with the prefix either way. The StatusCallback URLs msgledger sets carry it."""

from __future__ import annotations

import socket
from pathlib import Path
from urllib.parse import urlencode

import pytest
import trio

from .conftest import (
    API_TOKEN,
    Ledger,
    callback_params,
    daemon_environ,
    new_sid,
    open_ledger,
    signed,
)
from .test_outbound import send, sim_and_ledger

PUBLIC = "https://ledger.example.com/ledger"  # what the firm typed into Twilio's console
BEARER = {"Authorization": f"Bearer {API_TOKEN}"}


async def post(ledger: Ledger, path: str, signed_for: str, ref: str | None = None) -> int:
    """A callback posted to `path` (as the proxy passes it on), signed for `signed_for`."""
    query = f"?{urlencode({'ref': ref})}" if ref else ""
    params = callback_params(new_sid(), "delivered")
    answer = await ledger.client.post(path + query, content=urlencode(params),
                                      headers=signed(signed_for + query, params))
    return answer.status_code


async def test_callbacks_under_a_prefix_pass_stripped_or_not(tmp_path: Path,
                                                             workers: str) -> None:
    """Signed for the public URL with its prefix: 200 whether the proxy passed the prefix
    on or stripped it, a query too. Signed for the URL without it: 403."""
    environ = daemon_environ(tmp_path / "prefix.db", MSGLEDGER_HTTP_WORKERS=workers,
                             MSGLEDGER_HTTP_PUBLIC_URL=PUBLIC)
    async with open_ledger(environ) as ledger:
        url = f"{PUBLIC}/twilio/status"
        assert await post(ledger, "/ledger/twilio/status", url) == 200  # passed on
        assert await post(ledger, "/twilio/status", url) == 200  # stripped
        assert await post(ledger, "/ledger/twilio/status", url, ref="r-1") == 200
        assert await post(ledger, "/twilio/status", url, ref="r-2") == 200
        bare = "https://ledger.example.com/twilio/status"
        assert await post(ledger, "/ledger/twilio/status", bare) == 403
        assert await post(ledger, "/twilio/status", bare) == 403


async def test_every_route_answers_under_the_prefix(tmp_path: Path, workers: str) -> None:
    """/healthz, /metrics and /v1 answer under the prefix as at the root; a path that only
    starts with the same letters is not under it."""
    environ = daemon_environ(tmp_path / "routes.db", MSGLEDGER_HTTP_WORKERS=workers,
                             MSGLEDGER_HTTP_PUBLIC_URL=PUBLIC)
    async with open_ledger(environ) as ledger:
        client = ledger.client
        for path in ("/healthz", "/metrics", "/v1/messages", "/v1/openapi.json"):
            assert (await client.get(f"/ledger{path}", headers=BEARER)).status_code == 200
            assert (await client.get(path, headers=BEARER)).status_code == 200
        assert (await client.get("/ledgerx/healthz")).status_code == 404
        assert (await client.get("/ledger/ledger/healthz")).status_code == 404


@pytest.mark.parametrize("prefix", ["/my%20ledger", "/a/b"])
async def test_a_prefix_is_matched_as_twilio_signs_it(tmp_path: Path, prefix: str) -> None:
    """A prefix with a percent-escape, or of two segments, passes as Twilio signs it."""
    public = f"https://ledger.example.com{prefix}"
    environ = daemon_environ(tmp_path / "escape.db", MSGLEDGER_HTTP_PUBLIC_URL=public)
    async with open_ledger(environ) as ledger:
        assert await post(ledger, f"{prefix}/twilio/status", f"{public}/twilio/status") == 200


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def test_status_callbacks_carry_the_prefix(tmp_path: Path) -> None:
    """A message sent through `/v1` is given a StatusCallback under the prefix; the
    simulator's signed callbacks to it are taken, up to `delivered`."""
    port = free_port()
    public = f"http://127.0.0.1:{port}/ledger"
    env = {"MSGLEDGER_HTTP_LISTEN": f"127.0.0.1:{port}", "MSGLEDGER_HTTP_PUBLIC_URL": public}
    async with sim_and_ledger(tmp_path, env=env) as (_, ledger):
        assert (await send(ledger, ref="prefixed")).status_code == 201
        record = (await ledger.record("prefixed")).json()
        assert record["history"][0]["data"]["status_callback"].startswith(
            f"{public}/twilio/status?ref=prefixed")
        with trio.fail_after(20):
            while True:  # the simulator's callbacks come in their own time
                if (await ledger.record("prefixed")).json()["status"] == "delivered":
                    break
                await trio.sleep(0.02)
