"""The firm's app's TwiML: checked, and each `<Message>` reply made to report to msgledger.

The document comes from another program over the network, so it is parsed as hostile:
at most 64 kB (what Twilio itself accepts, error 11750), no DOCTYPE and no entities
(`defusedxml`: no billion laughs, no external entities), a `<Response>` root. Whatever else
it holds (`<Redirect>`, attributes msgledger does not know) passes through unchanged.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import defusedxml.ElementTree as SafeET
from defusedxml import DefusedXmlException

MAX_TWIML_BYTES = 64 * 1024
XML_DECLARATION = '<?xml version="1.0" encoding="UTF-8"?>'
EMPTY_TWIML = f"{XML_DECLARATION}<Response/>".encode()


class BadTwiml(Exception):
    """The app's answer cannot be given to Twilio; the message says why."""


@dataclass(frozen=True)
class OutboundReply:
    """One `<Message>` of the app's answer: what Twilio will send."""

    ref: str
    to: str | None
    from_: str | None
    body: str
    media_urls: tuple[str, ...]
    reports_here: bool  # its statuses come to msgledger (the app named no URL of its own)


def parse(document: bytes) -> ET.Element:
    """The app's answer as a `<Response>` element, or BadTwiml."""
    if len(document) > MAX_TWIML_BYTES:
        raise BadTwiml(f"answer over {MAX_TWIML_BYTES} bytes")
    try:
        root: ET.Element = SafeET.fromstring(document, forbid_dtd=True)
    except DefusedXmlException as refused:
        raise BadTwiml(f"TwiML with a DOCTYPE or entities ({type(refused).__name__})") from None
    except ET.ParseError as error:
        raise BadTwiml(f"not XML ({error})") from None
    if root.tag != "Response":
        raise BadTwiml(f"not a TwiML <Response> (root <{root.tag[:64]}>)")
    return root


def take_replies(root: ET.Element, inbound: Mapping[str, str], new_ref: Callable[[], str],
                 action_for: Callable[[str], str]) -> list[OutboundReply]:
    """Each `<Message>` as an OutboundReply with a new ref; one that names no `action` nor
    `statusCallback` of its own is given `action_for(ref)`, so its statuses reach the
    journal. Unaddressed, a reply goes back to the sender, from the number it wrote to."""
    replies = []
    for message in root.iter("Message"):
        ref = new_ref()
        reports_here = "action" not in message.attrib and "statusCallback" not in message.attrib
        if reports_here:
            message.set("action", action_for(ref))
            message.set("method", "POST")  # /twilio/status takes no GET (an app's `method`)
        body = message.find("Body")
        text = (body.text if body is not None else message.text) or ""
        replies.append(OutboundReply(ref, message.get("to") or inbound.get("From"),
                             message.get("from") or inbound.get("To"), text,
                             tuple(m.text.strip() for m in message.iter("Media") if m.text),
                             reports_here))
    return replies


def render(root: ET.Element) -> bytes:
    """The document as Twilio gets it, or BadTwiml if it no longer fits."""
    document = (XML_DECLARATION + ET.tostring(root, encoding="unicode")).encode()
    if len(document) > MAX_TWIML_BYTES:
        raise BadTwiml(f"answer over {MAX_TWIML_BYTES} bytes once its replies report back")
    return document
