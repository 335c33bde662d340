"""X-Twilio-Signature checks with twilio's own `RequestValidator` (docs/twilio.md, "Signatures").

Like `RequestValidator.validate`, a signature is accepted over the URL without its port or
with it (Twilio's back end has signed both ways), but the two forms are tried in turn and
the second only when the first fails: one HMAC per genuine callback instead of two, on the
hottest path of the daemon. The signing itself is the library's `compute_signature`.
Repeated form fields are passed as a multi-dict so every value is signed.

Twilio signs the URL as it was typed in its console, host spelling included, so a host
typed `LEDGER.example.com` there fails against `ledger.example.com` in `http.public_url`.
`host_respelled` gives the URL to try next, with the Host header's spelling; only a host
that differs in letter case, which names the same server (RFC 3986 §3.2.2), is ever tried.
"""

from __future__ import annotations

import hmac
from collections.abc import Sequence
from urllib.parse import urlparse

from twilio.request_validator import (
    RequestValidator,
    add_port,
    get_signature_algorithm,
    remove_port,
)


class _FormPairs:
    """The `getall` view `RequestValidator.get_values` looks for first."""

    def __init__(self, pairs: Sequence[tuple[str, str]]) -> None:
        self._values: dict[str, list[str]] = {}
        for name, value in pairs:
            self._values.setdefault(name, []).append(value)

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self._values)

    def __bool__(self) -> bool:
        return bool(self._values)

    def getall(self, name: str) -> list[str]:
        return self._values[name]


class SignatureChecker:
    def __init__(self, auth_token: str) -> None:
        if not auth_token:  # an empty HMAC key would make every forged signature "valid"
            raise ValueError("a signature check needs the auth token")
        self._validator = RequestValidator(auth_token)

    def check(self, url: str, pairs: Sequence[tuple[str, str]], signature: str,
              settings_header: str | None = None) -> bool:
        """True when `signature` is Twilio's signature of `url` plus the form `pairs`."""
        algorithm = get_signature_algorithm(settings_header)
        params = _FormPairs(pairs)
        parsed = urlparse(url)
        for candidate in (remove_port(parsed), add_port(parsed)):
            try:
                expected = self._validator.compute_signature(candidate, params, algorithm)
            except ValueError:  # an algorithm this twilio library does not know
                return False
            if hmac.compare_digest(expected.encode(), signature.encode()):
                return True
        return False


    def sign(self, url: str, pairs: Sequence[tuple[str, str]]) -> str:
        """The X-Twilio-Signature Twilio would send for `pairs` posted to `url` (as the
        firm's app checks a forwarded inbound message)."""
        signature: str = self._validator.compute_signature(url, _FormPairs(pairs))
        return signature


def host_respelled(url: str, host: str | None) -> str | None:
    """`url` with its host spelled as in `host` (a Host header: host[:port], whose port is
    not used) when the two differ in ASCII letter case only; None otherwise."""
    if not host or not host.isascii():
        return None
    start = url.find("://") + 3
    ours = _host_part(url[start:])
    theirs = _host_part(host)
    if theirs == ours or theirs.lower() != ours.lower():
        return None
    return url[:start] + theirs + url[start + len(ours):]


def _host_part(netloc: str) -> str:
    """The host of "host[:port]..." or "[v6][:port]...", as spelled."""
    if netloc.startswith("["):
        return netloc[:netloc.find("]") + 1]
    end = len(netloc)
    for stop in ":/?#":
        found = netloc.find(stop)
        if found != -1:
            end = min(end, found)
    return netloc[:end]
