"""An inbound message as it is journaled: Twilio's webhook, whole, and what msgledger
checked of it on receipt (docs/inbound.md, "What is journaled").

Every parameter is kept verbatim (Twilio adds parameters without notice), except a Body
that `store.keep_body` does not let the store keep: its SHA-256 (and length) stand in.
The media a message declares are checked here, once, so the fetcher never has to trust a
URL: a file is fetched, with the account's credentials, only from the message's own
path at Twilio, and only when the webhook's count of media agrees with its URLs.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from ..events import Event, utc_now
from ..sender import body_fields
from ..store import media_states

MEDIA_SID = re.compile(r"ME[0-9a-fA-F]{32}")
ACCOUNT_SID = re.compile(r"AC[0-9a-fA-F]{32}")
MESSAGE_SID = re.compile(r"(SM|MM)[0-9a-fA-F]{32}")
MEDIA_URL = re.compile(r"MediaUrl(0|[1-9][0-9]{0,2})")
MEDIA_MISMATCH = "media_mismatch"  # NumMedia disagrees with the MediaUrl{N} fields
MEDIA_URL_REFUSED = "media_url_refused"  # a MediaUrl that is not the message's own
VIA_FALLBACK = "via_fallback"  # first received on the fallback URL: the primary had failed


@dataclass(frozen=True)
class ReceiptRules:
    """What the store keeps of an inbound message, and where its media may come from."""

    keep_body: str  # store.keep_body
    keep_media: str  # store.keep_media
    api_base_url: str  # twilio.api_base_url: the only origin media is fetched from
    api_origin: str = field(init=False)  # the same, as `origin` spells it: made once

    def __post_init__(self) -> None:
        object.__setattr__(self, "api_origin", origin(self.api_base_url))


def inbound_event(pairs: Sequence[tuple[str, str]], form: Mapping[str, str],
                  rules: ReceiptRules, data: dict[str, Any]) -> Event:
    """The `inbound_received` event of a signed webhook (`data`: its URL, headers, client;
    `form`: the first value of each field)."""
    flags: set[str] = set()
    media = _declared_media(pairs, form, rules, flags)
    if form.get("ErrorCode"):
        flags.add(VIA_FALLBACK)
    data = {**data, "params": _kept_params(pairs, rules.keep_body), "media": media,
            **_body_fields(form.get("Body"), rules.keep_body)}
    replied = form.get("OriginalRepliedMessageSid", "")
    if MESSAGE_SID.fullmatch(replied):
        data["in_reply_to"] = replied
    if flags:
        data["flags"] = sorted(flags)
    return Event("inbound_received", "inbound", utc_now(), sid=form["MessageSid"],
                 status="received", data=data)


def _kept_params(pairs: Sequence[tuple[str, str]], keep_body: str) -> list[tuple[str, str]]:
    if keep_body == "full":
        return list(pairs)
    return [(name, value) for name, value in pairs if name != "Body"]


def _body_fields(body: str | None, keep_body: str) -> dict[str, Any]:
    """The send's rule (`sender.body_fields`), but a kept body stays in the params only."""
    if body is None:
        return {}
    fields = body_fields(body, keep_body)
    fields.pop("body", None)
    return fields


def _declared_media(pairs: Sequence[tuple[str, str]], form: Mapping[str, str],
                    rules: ReceiptRules, flags: set[str]) -> list[dict[str, Any]]:
    """Each `MediaUrl{N}` with its state: pending (to fetch), refused or unfetched."""
    urls = {int(m[1]): value for name, value in pairs
            if name.startswith("MediaUrl") and (m := MEDIA_URL.fullmatch(name))}
    count = form.get("NumMedia", "0")
    if not urls and count in ("", "0"):
        return []  # an SMS: nothing to check
    agreed = count.isdigit() and count.isascii() and sorted(urls) == list(range(int(count)))
    if not agreed and (urls or count not in ("", "0")):
        flags.add(MEDIA_MISMATCH)
    declared = []
    for n in sorted(urls):
        url = urls[n]
        allowed = agreed and is_own_media(url, rules.api_origin, form.get("AccountSid", ""),
                                          form.get("MessageSid", ""))
        if agreed and not allowed:
            flags.add(MEDIA_URL_REFUSED)
        state = (media_states.REFUSED if not allowed else
                 media_states.UNFETCHED if rules.keep_media == "none" else media_states.PENDING)
        declared.append({"n": n, "url": url, "state": state,
                         "content_type": form.get(f"MediaContentType{n}") or None})
    return declared


def is_own_media(url: str, api_origin: str, account: str, message: str) -> bool:
    """`url` is message `message`'s media at Twilio (`api_origin`, as `origin` spells it),
    account `account`, plus a media SID, and nothing more: no query, no `..`, no user, no
    other host, scheme or port. The credentials go with the request."""
    if not (ACCOUNT_SID.fullmatch(account) and MESSAGE_SID.fullmatch(message)):
        return False
    try:
        parts = urlsplit(url)
    except ValueError:  # "https://[::1/x": not a URL at all
        return False
    if parts.query or parts.fragment or "@" in parts.netloc:
        return False
    prefix = f"{api_origin}/2010-04-01/Accounts/{account}/Messages/{message}/Media/"
    base = f"{origin(f'{parts.scheme}://{parts.netloc}')}{parts.path}"
    return base.startswith(prefix) and MEDIA_SID.fullmatch(base[len(prefix):]) is not None


def origin(url: str) -> str:
    """scheme://host[:port], lower case, without a default port ("invalid" for a host or
    port that is no such thing)."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return "invalid://"
    scheme, host = parts.scheme.lower(), (parts.hostname or "").lower()
    default = {"http": 80, "https": 443}.get(scheme)
    return f"{scheme}://{host}" + (f":{port}" if port not in (None, default) else "")
