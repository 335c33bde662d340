"""The TwiML that answers an inbound message: a `<Response>` of `<Message>` verbs.

A `<Message>` sends a reply (https://www.twilio.com/docs/messaging/twiml/message): `to`
defaults to the inbound text's sender, `from` to the number it was sent to; its body is the
element's text or its `<Body>` child's, and each `<Media>` child names a file. `action` and
`statusCallback` both name where its status callbacks go (`statusCallback` first); `method`
is ignored (callbacks are always POSTed). Other verbs (`<Redirect>`) are not simulated.

Parsed with defusedxml, which refuses a DOCTYPE (so no entity can be declared, let alone
expanded): the answer of an app is untrusted input.
"""

from __future__ import annotations

from dataclasses import dataclass
from xml.etree.ElementTree import Element, ParseError

from defusedxml import DefusedXmlException
from defusedxml.ElementTree import fromstring

from ._store import is_valid_from, is_valid_to

MAX_REPLIES = 10  # <Message> verbs Twilio sends for one inbound text (warning 14109 past that)


class TwimlError(ValueError):
    """The answer is not a TwiML document: Twilio's 12100, document parse failure."""


@dataclass(frozen=True)
class Reply:
    """One `<Message>`, its defaults filled in."""

    to: str
    from_: str
    body: str
    media_urls: tuple[str, ...]
    status_callback: str | None


def parse_response(document: bytes) -> Element:
    """The `<Response>` root of a TwiML document; TwimlError for anything else."""
    try:
        root: Element = fromstring(document, forbid_dtd=True)
    except (ParseError, DefusedXmlException) as error:
        raise TwimlError(f"not TwiML: {type(error).__name__}: {error}") from None
    if root.tag != "Response":
        raise TwimlError(f"not TwiML: the root is <{root.tag}>, not <Response>")
    return root


def replies_of(root: Element, *, sender: str, number: str) -> tuple[list[Reply], list[str]]:
    """The replies a `<Response>` asks for, to the inbound text from `sender` to `number`,
    and why any verb was skipped."""
    replies: list[Reply] = []
    errors: list[str] = []
    for n, verb in enumerate(root, start=1):
        if verb.tag != "Message":
            errors.append(f"verb {n}: <{verb.tag}> is not simulated, ignored")
        elif len(replies) == MAX_REPLIES:
            errors.append(f"verb {n}: more than {MAX_REPLIES} <Message> verbs (14109), ignored")
        else:
            reply = _reply(verb, sender=sender, number=number)
            if isinstance(reply, str):
                errors.append(f"verb {n}: {reply}")
            else:
                replies.append(reply)
    return replies, errors


def _reply(verb: Element, *, sender: str, number: str) -> Reply | str:
    """The reply a `<Message>` makes, or why it makes none."""
    to, from_ = verb.get("to") or sender, verb.get("from") or number
    body_element = verb.find("Body")
    body = _text(verb if body_element is None else body_element)
    media = tuple(url for url in map(_text, verb.findall("Media")) if url)
    if not is_valid_to(to) or not is_valid_from(from_):
        return f"<Message> to {to!r} from {from_!r}: not valid numbers (21211), skipped"
    if not body and not media:
        return "<Message> with neither a body nor media (14103), skipped"
    callback = verb.get("statusCallback") or verb.get("action") or None
    return Reply(to, from_, body, media, callback)


def _text(element: Element) -> str:
    return (element.text or "").strip()
