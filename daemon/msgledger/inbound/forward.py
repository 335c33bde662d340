"""Giving a journaled inbound message to the firm's app (`inbound.forward_url`).

The app gets exactly what Twilio posted, signed for the app's URL with the account's auth
token as Twilio would sign it, so the app's own `RequestValidator` check passes unchanged.
The whole exchange is bounded by `inbound.forward_timeout` (8 s by default: msgledger has
then answered Twilio well within its 15 s), and the answer is read to 64 kB at most.
"""

from __future__ import annotations

from collections.abc import Sequence
from urllib.parse import urlencode

import httpx
import trio

from ..http.signature import SignatureChecker
from .twiml import MAX_TWIML_BYTES

USER_AGENT = "msgledger (forwarding an inbound message)"


class ForwardFailed(Exception):
    """The app gave no usable answer; the message says why."""


class FirmApp:
    """POSTs inbound messages to one URL. Its connection pool lives as long as it does."""

    def __init__(self, url: str, timeout: float, signer: SignatureChecker) -> None:
        self.url = url
        self.shown_url = url.split("?", 1)[0]  # as logged: a query may hold a key of the app's
        self.timeout = timeout
        self._signer = signer
        self._client: httpx.AsyncClient | None = None  # made in the first request's task

    async def forward(self, pairs: Sequence[tuple[str, str]]) -> tuple[int, bytes]:
        """The app's status and answer, or ForwardFailed (timeout, connection, non-2xx,
        over 64 kB)."""
        headers = {"content-type": "application/x-www-form-urlencoded",
                   "x-twilio-signature": self._signer.sign(self.url, pairs),
                   "user-agent": USER_AGENT, "accept": "text/xml, application/xml"}
        with trio.move_on_after(self.timeout) as scope:
            try:
                return await self._post(urlencode(pairs).encode(), headers)
            except httpx.HTTPError as error:
                raise ForwardFailed(f"{type(error).__name__}: {error}"[:300]) from None
        assert scope.cancelled_caught
        raise ForwardFailed(f"no answer within {self.timeout:g}s")

    async def _post(self, body: bytes, headers: dict[str, str]) -> tuple[int, bytes]:
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=self.timeout, follow_redirects=False)
        async with self._client.stream("POST", self.url, content=body,
                                       headers=headers) as response:
            if not 200 <= response.status_code < 300:
                raise ForwardFailed(f"the app answered {response.status_code}")
            return response.status_code, await _read_capped(response)

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()


async def _read_capped(response: httpx.Response) -> bytes:
    chunks, size = [], 0
    async for chunk in response.aiter_bytes():
        size += len(chunk)
        if size > MAX_TWIML_BYTES:
            raise ForwardFailed(f"answer over {MAX_TWIML_BYTES} bytes")
        chunks.append(chunk)
    return b"".join(chunks)
