"""X-Twilio-Signature checks through twilio's own `RequestValidator` (TWILIO.md §3).

Like `RequestValidator.validate`, a signature is accepted over the URL without its port or
with it (Twilio's back end has signed both ways), but the two forms are tried in turn and
the second only when the first fails: one HMAC per genuine callback instead of two, on the
hottest path of the daemon. The signing itself is the library's `compute_signature`.
Repeated form fields are passed as a multi-dict so every value is signed.
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
