"""X-Twilio-Signature checks: Twilio's published test vector and what must not pass."""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Sequence

import pytest

from msgledger.http.signature import SignatureChecker, host_respelled

# Twilio's published example (twilio.com/docs/usage/security#validating-requests).
TOKEN = "12345"
URL = "https://mycompany.com/myapp.php?foo=1&bar=2"
PARAMS = [("CallSid", "CA1234567890ABCDE"), ("Caller", "+12349013030"), ("Digits", "1234"),
          ("From", "+12349013030"), ("To", "+18005551212")]
SIGNATURE = "0/KCTR6DLpKmkAf8muzZqo1nDgQ="


def sign(url: str, pairs: Sequence[tuple[str, str]], token: str = TOKEN,
         digest: str = "sha1") -> str:
    """Twilio's algorithm, written out: HMAC of the URL plus every name+value, sorted."""
    text = url + "".join(name + value for name, value in sorted(pairs))
    mac = hmac.new(token.encode(), text.encode(), getattr(hashlib, digest))
    return base64.b64encode(mac.digest()).decode()


@pytest.fixture
def checker() -> SignatureChecker:
    return SignatureChecker(TOKEN)


def test_reference_signer_matches_twilio_vector() -> None:
    """The test's own signer reproduces Twilio's published signature (so the others mean it)."""
    assert sign(URL, PARAMS) == SIGNATURE


def test_published_vector_validates(checker: SignatureChecker) -> None:
    """Twilio's published request and signature pass the check."""
    assert checker.check(URL, PARAMS, SIGNATURE)


def test_published_vector_in_any_field_order(checker: SignatureChecker) -> None:
    """The form's field order does not matter: Twilio signs them sorted."""
    assert checker.check(URL, list(reversed(PARAMS)), SIGNATURE)


@pytest.mark.parametrize(("signed_url", "received_url"), [
    ("https://mycompany.com:443/myapp.php?foo=1&bar=2", URL),
    (URL, "https://mycompany.com:443/myapp.php?foo=1&bar=2"),
    ("http://mycompany.com:80/status?ref=r1", "http://mycompany.com/status?ref=r1"),
    ("http://mycompany.com/status?ref=r1", "http://mycompany.com:80/status?ref=r1"),
])
def test_default_port_either_way(checker: SignatureChecker, signed_url: str,
                                 received_url: str) -> None:
    """A URL signed with its default port validates without it, and the other way round."""
    assert checker.check(received_url, PARAMS, sign(signed_url, PARAMS))


def test_other_port_is_not_the_default(checker: SignatureChecker) -> None:
    """A signature over one explicit port does not validate for another port."""
    signature = sign("https://mycompany.com:8443/myapp.php?foo=1&bar=2", PARAMS)
    assert not checker.check(URL, PARAMS, signature)


@pytest.mark.parametrize("url", [
    "https://mycompany.com/myapp.php?foo=1&bar=3",
    "https://mycompany.com/myapp.php?foo=1",
    "https://mycompany.com/myapp.php",
    "https://mycompany.com/other.php?foo=1&bar=2",
    "http://mycompany.com/myapp.php?foo=1&bar=2",
    "https://evil.example/myapp.php?foo=1&bar=2",
])
def test_changed_url_fails(checker: SignatureChecker, url: str) -> None:
    """Any change to scheme, host, path or query string breaks the signature."""
    assert not checker.check(url, PARAMS, SIGNATURE)


def test_changed_value_fails(checker: SignatureChecker) -> None:
    """A changed parameter value breaks the signature."""
    changed = [(n, "5678" if n == "Digits" else v) for n, v in PARAMS]
    assert not checker.check(URL, changed, SIGNATURE)


def test_extra_param_fails(checker: SignatureChecker) -> None:
    """A parameter Twilio did not sign breaks the signature."""
    assert not checker.check(URL, [*PARAMS, ("MessageStatus", "delivered")], SIGNATURE)


def test_missing_param_fails(checker: SignatureChecker) -> None:
    """A parameter dropped from the form breaks the signature."""
    assert not checker.check(URL, PARAMS[1:], SIGNATURE)


def test_wrong_token_fails() -> None:
    """A checker holding another auth token refuses the published signature."""
    assert not SignatureChecker("54321").check(URL, PARAMS, SIGNATURE)


def test_garbage_signature_fails(checker: SignatureChecker) -> None:
    """An empty or malformed signature is refused, not an error."""
    assert not checker.check(URL, PARAMS, "")
    assert not checker.check(URL, PARAMS, "not base64 at all")


def test_repeated_fields_are_all_signed(checker: SignatureChecker) -> None:
    """Every value of a repeated form field is part of the signature, not just the first."""
    pairs = [*PARAMS, ("MediaUrl", "https://a.example/1"), ("MediaUrl", "https://a.example/2")]
    signature = sign(URL, pairs)
    assert checker.check(URL, pairs, signature)
    assert checker.check(URL, list(reversed(pairs)), signature)
    assert not checker.check(URL, pairs[:-1], signature)
    assert not checker.check(URL, [*PARAMS, ("MediaUrl", "https://a.example/1")], signature)


def test_empty_form(checker: SignatureChecker) -> None:
    """A request without a form is signed over the URL alone."""
    assert checker.check(URL, [], sign(URL, []))
    assert not checker.check(URL, [], SIGNATURE)


def test_hmac_sha256_from_settings_header(checker: SignatureChecker) -> None:
    """The settings header `algorithm=HMAC_SHA256` selects SHA-256, and only then is it used."""
    header = "key=webhooks_sharedkey_x,algorithm=HMAC_SHA256"
    signature = sign(URL, PARAMS, digest="sha256")
    assert checker.check(URL, PARAMS, signature, header)
    assert not checker.check(URL, PARAMS, signature)  # no header: HMAC-SHA1
    assert not checker.check(URL, PARAMS, SIGNATURE, header)  # a SHA-1 signature under SHA-256


def test_settings_header_without_algorithm_means_sha1(checker: SignatureChecker) -> None:
    """A settings header that names no algorithm leaves the legacy HMAC-SHA1."""
    assert checker.check(URL, PARAMS, SIGNATURE, "key=x")
    assert checker.check(URL, PARAMS, SIGNATURE, "")


def test_unsupported_algorithm_fails(checker: SignatureChecker) -> None:
    """An algorithm the validator does not know refuses the request instead of raising."""
    assert not checker.check(URL, PARAMS, SIGNATURE, "key=x,algorithm=HMAC_MD5")


@pytest.mark.parametrize(("url", "host", "respelled"), [
    ("https://ledger.example.com/twilio/status?ref=1", "LEDGER.example.com",
     "https://LEDGER.example.com/twilio/status?ref=1"),
    ("http://ledger.example.com:8443/p/twilio/status", "Ledger.Example.COM:8443",
     "http://Ledger.Example.COM:8443/p/twilio/status"),
    # the port, like the scheme and the prefix, stays the public URL's
    ("http://ledger.example.com:8443/twilio/status", "LEDGER.example.com:80",
     "http://LEDGER.example.com:8443/twilio/status"),
    ("https://ledger.example.com", "LEDGER.EXAMPLE.COM", "https://LEDGER.EXAMPLE.COM"),
    ("http://[2001:db8::ab]:80/twilio/status", "[2001:DB8::AB]:80",
     "http://[2001:DB8::AB]:80/twilio/status"),
    ("https://ledger.example.com/twilio/status", "ledger.example.com", None),  # the same
    ("https://ledger.example.com/twilio/status", "other.example.com", None),
    ("https://ledger.example.com/twilio/status", "ledger.example.com.evil", None),
    ("https://ledger.example.com/twilio/status", "ledger.example.co", None),
    ("https://ledger.example.com/twilio/status", "", None),
    ("https://ledger.example.com/twilio/status", None, None),
    ("https://ledger.example.com/twilio/status", "LEDGER.exämple.com", None),
    ("http://[2001:db8::ab]/twilio/status", "[2001:DB8::AB", None),
])
def test_host_respelled(url: str, host: str | None, respelled: str | None) -> None:
    """The public URL with the Host header's spelling of its host, only when the two hosts
    differ in letter case alone."""
    assert host_respelled(url, host) == respelled


def test_a_respelled_host_is_a_different_signature(checker: SignatureChecker) -> None:
    """Why the second spelling must be tried: the signature covers the host as typed."""
    typed = "https://MyCompany.com/myapp.php?foo=1&bar=2"
    signature = sign(typed, PARAMS)
    assert not checker.check(URL, PARAMS, signature)
    respelled = host_respelled(URL, "MyCompany.com")
    assert respelled == typed and checker.check(respelled, PARAMS, signature)
