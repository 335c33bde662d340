"""X-Twilio-Signature checks through twilio's own `RequestValidator` (TWILIO.md §3).

The validator accepts the URL with and without its port, as Twilio's back end signs both
ways. Repeated form fields are passed as a multi-dict so every value is signed.
"""

from __future__ import annotations

from collections.abc import Sequence

from twilio.request_validator import RequestValidator, get_signature_algorithm


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
        self._validator = RequestValidator(auth_token)

    def check(self, url: str, pairs: Sequence[tuple[str, str]], signature: str,
              settings_header: str | None = None) -> bool:
        """True when `signature` is Twilio's signature of `url` plus the form `pairs`."""
        algorithm = get_signature_algorithm(settings_header)
        return bool(self._validator.validate(url, _FormPairs(pairs), signature, algorithm))
