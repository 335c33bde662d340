"""What Twilio is answered once an inbound message is journaled (docs/inbound.md).

Without `inbound.forward_url`: an empty `<Response/>`. With it, the app's TwiML when it is
usable, its `<Message>` replies journaled as sends (`direction: outbound-reply`, linked to
the message they answer) and given msgledger's status URL; else an empty `<Response/>`,
and `inbound_forward_failed` journaled and logged with the reason. The inbound message
itself is on disk before any of this starts, whatever the app does.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import trio

from ..events import Ack, Event, utc_now
from ..journal_client import JournalClient
from ..logs import get_logger
from ..metrics import Metrics
from ..sender import body_fields, media_fields, new_ref, status_callback_url
from . import twiml
from .forward import FirmApp, ForwardFailed

log = get_logger("msgledger.inbound")
# How long the app's replies (or the forward's failure) may take to be journaled before
# Twilio is answered: the replies are Twilio's to send and its list has them, so a crash
# in this window loses nothing the reconciler cannot import; Twilio's 15 s are not spent
# on them.
REPLIES_JOURNAL_WAIT = 1.0


class InboundAnswer:
    """Answers Twilio for the inbound messages one receiver journals."""

    def __init__(self, app: FirmApp | None, journal: JournalClient, *, keep_body: str,
                 keep_media: str, public_url: Callable[[], str], metrics: Metrics) -> None:
        self._app = app
        self._journal = journal
        self._keep_body = keep_body
        self._keep_media = keep_media
        self._public_url = public_url  # known once the listener is bound
        self._metrics = metrics

    async def answer(self, event: Event, pairs: Sequence[tuple[str, str]],
                     form: Mapping[str, str]) -> bytes:
        """The TwiML for the journaled inbound `event`."""
        if self._app is None:
            return twiml.EMPTY_TWIML
        try:
            status, document = await self._app.forward(pairs)
            if status == 204 or not document.strip():
                self._metrics.inbound_forwards.labels("empty").inc()
                return twiml.EMPTY_TWIML  # the app took it and replies nothing
            root = twiml.parse(document)
            replies = twiml.take_replies(root, form, new_ref, self._action_url)
            rendered = twiml.render(root)
        except (ForwardFailed, twiml.BadTwiml) as failure:
            await self._failed(event, str(failure))
            return twiml.EMPTY_TWIML
        except Exception as error:  # a fault no one foresaw: the message is journaled already
            log.exception("inbound_forward_error", sid=event.sid)
            await self._failed(event, f"{type(error).__name__}: {error}"[:300])
            return twiml.EMPTY_TWIML
        self._metrics.inbound_forwards.labels("twiml").inc()
        await self._journal_briefly(event, [self._reply_event(event, r) for r in replies])
        return rendered

    def _action_url(self, ref: str) -> str:
        return status_callback_url(self._public_url(), ref)

    async def _failed(self, event: Event, reason: str) -> None:
        self._metrics.inbound_forwards.labels("failed").inc()
        log.warning("inbound_forward_failed", sid=event.sid, reason=reason,
                    forward_url=self._app.shown_url if self._app else None)
        failed = Event("inbound_forward_failed", "inbound", utc_now(), sid=event.sid,
                       data={"reason": reason})
        await self._journal_briefly(event, [failed])

    async def _journal_briefly(self, inbound: Event, events: list[Event]) -> None:
        """Hand `events` to the journal and wait for them at most REPLIES_JOURNAL_WAIT."""
        acks: list[Ack] = []
        with trio.move_on_after(REPLIES_JOURNAL_WAIT):  # a full intake waits here too
            waits = [await self._journal.enqueue(e) for e in events]
            for wait in waits:
                acks.append(await wait.wait())
        if len(acks) < len(events) or not all(isinstance(ack, int) for ack in acks):
            log.warning("inbound_answer_not_durable_yet", sid=inbound.sid,
                        kinds=[e.kind for e in events], refs=[e.ref for e in events if e.ref])

    def _reply_event(self, event: Event, reply: twiml.OutboundReply) -> Event:
        """The send a `<Message>` is, as journaled before Twilio executes it."""
        data: dict[str, Any] = {
            "direction": "outbound-reply", "in_reply_to": event.sid, "to": reply.to,
            "from": reply.from_, **body_fields(reply.body, self._keep_body)}
        if reply.reports_here:
            data["status_callback"] = self._action_url(reply.ref)
        data.update(media_fields(reply.media_urls, self._keep_media))
        return Event("send_requested", "inbound", utc_now(), ref=reply.ref,
                     status="requested", data=data)
