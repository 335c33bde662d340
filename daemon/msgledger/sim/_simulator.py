"""The simulator apart from HTTP: its messages, their lifecycles, its counters and test hooks.

`open_simulator` owns the nursery the lifecycle tasks run in and cancels what is left of them
on exit. It needs no sockets, so a test can run lifecycles on Trio's virtual clock by passing a
fake `deliver`. Bulk Export's jobs, files and links live in `exports` (`_exports.py`); media
files' CDN links in `cdn` (`_media.py`); texts received from customers, their webhook and
its TwiML answer, in `_inbound.py`.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import replace
from datetime import date, datetime

import trio

from ._callbacks import Deliver
from ._exports import BulkExports
from ._inbound import InboundReport, NewInbound, receive
from ._knobs import Dice, SimKnobs
from ._lifecycle import (
    CARRIER_ERRORS,
    SERVICE_SENDER,
    CallbackOutbox,
    Step,
    apply_step,
    plan_steps,
)
from ._listing import ListCache
from ._media import CdnLinks, media_for_urls
from ._stats import SimStats
from ._store import (
    DIRECTIONS,
    INBOUND,
    OUTBOUND_API,
    OUTBOUND_REPLY,
    MessageStore,
    NewMessage,
    SimMedia,
    SimMessage,
    count_segments,
    utcnow,
)
from ._wire import price_for

_SENT_STATUSES = frozenset({"sent", "delivered", "undelivered", "read", "received"})


class Simulator:
    """A running simulator: its address, messages, counters, and hooks for tests.

    Made by `serve_sim` (or `open_simulator`, which owns the lifecycles' nursery).
    `knobs` may be reassigned (e.g. with `dataclasses.replace`) to change behaviour mid-run;
    each request and each newly started lifecycle reads the current value. `exports` holds
    Bulk Export's jobs, files and links; tests shape it with `fail_downloads` and
    `add_export_line`.
    """

    def __init__(
        self, knobs: SimKnobs, *, base_url: str, nursery: trio.Nursery, deliver: Deliver
    ) -> None:
        self.knobs = knobs
        self.base_url = base_url
        self.stats = SimStats()
        self.dice = Dice(knobs.seed)  # API requests: faults and SIDs, in request order
        # Lifecycles roll their own dice: their timing must not shift the requests' rolls.
        self._lifecycle_dice = Dice(None if knobs.seed is None else f"{knobs.seed}:lifecycle")
        self._store = MessageStore()
        self.list_cache = ListCache()  # the list's order, while no message changes
        # Export SIDs and links roll their own dice too: exporting must not shift message SIDs.
        self.exports = BulkExports(Dice(None if knobs.seed is None else f"{knobs.seed}:exports"))
        self.cdn = CdnLinks(Dice(None if knobs.seed is None else f"{knobs.seed}:cdn"))
        self._lifecycles = nursery
        self._deliver = deliver
        self._running = 0
        self._idle = trio.Event()
        self._idle.set()
        self._throttled_requests = 0  # the next this many API requests are answered 429
        self._throttled_until = -math.inf  # and every one before this Trio time

    @property
    def version(self) -> int:
        """Bumped by every change to a message: when the list's cached order is stale."""
        return self._store.version

    @property
    def messages(self) -> Mapping[str, SimMessage]:
        """Every message by SID, unredacted; a live read-only view."""
        return self._store.view

    def create(self, new: NewMessage) -> SimMessage:
        """Store a message as the API's create does, and start its lifecycle."""
        message = self._send(new, OUTBOUND_API)
        self.stats.messages_created += 1
        return message

    def reply(self, new: NewMessage) -> SimMessage:
        """Store an `outbound-reply`, as a TwiML `<Message>` makes one, and start its
        lifecycle."""
        message = self._send(new, OUTBOUND_REPLY)
        self.stats.replies_created += 1
        return message

    def store_inbound(self, inbound: NewInbound) -> SimMessage:
        """Store a text received from a customer (status `received`), sending no webhook."""
        now = utcnow()
        return self._insert(
            to=inbound.to,
            from_=inbound.from_,
            body=inbound.body,
            status="received",
            messaging_service_sid=inbound.messaging_service_sid,
            status_callback=None,
            created=now,
            sent=now,
            error_code=None,
            direction=INBOUND,
            media=tuple(SimMedia("ME" + self.dice.hex32(), content_type, data)
                        for content_type, data in inbound.media),
        )

    async def receive_inbound(self, inbound: NewInbound) -> InboundReport:
        """A text reaches our number: store it, post the signed webhook to `inbound_url`
        (then to `inbound_fallback_url` if that fails), and send the replies its TwiML
        answer asks for. With `inbound.deliver` False no webhook is sent, as if it was lost.
        ValueError if it should be delivered and no `inbound_url` is set."""
        return await receive(self, inbound)

    def add_message(
        self,
        *,
        to: str,
        from_: str | None = SERVICE_SENDER,
        body: str = "",
        status: str = "delivered",
        error_code: int | None = None,
        messaging_service_sid: str | None = None,
        status_callback: str | None = None,
        date_created: datetime | None = None,
        date_sent: datetime | None = None,
        run_lifecycle: bool = False,
        sid: str | None = None,
        direction: str = OUTBOUND_API,
        media: tuple[SimMedia, ...] = (),
    ) -> SimMessage:
        """Inject a message created "outside" the API, e.g. for reconciliation tests.

        It stays at `status` unless `run_lifecycle`, in which case it lives on from `status`
        (which should then be "queued" or "accepted") like a created one. `date_sent` defaults
        to `date_created` for statuses past `sent`, and for `received`. `sid` gives it a SID
        of the test's choosing (one the client already knows of, say), instead of a new one.
        `direction` and `media` make it, say, a text received days ago (`inbound`, status
        `received`)."""
        if run_lifecycle and status not in ("queued", "accepted"):
            raise ValueError(f"a lifecycle starts at queued or accepted, not {status!r}")
        if direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {sorted(DIRECTIONS)}, not {direction!r}")
        created = date_created or utcnow()
        if date_sent is None and status in _SENT_STATUSES:
            date_sent = created
        message = self._insert(
            to=to,
            from_=from_,
            body=body,
            status=status,
            messaging_service_sid=messaging_service_sid,
            status_callback=status_callback,
            created=created,
            sent=date_sent,
            error_code=error_code,
            sid=sid,
            direction=direction,
            media=media,
        )
        if run_lifecycle:
            self._start_lifecycle(message)
        return message

    def set_status(self, sid: str, status: str, *, error_code: int | None = None) -> SimMessage:
        """Change a message's status silently (no callback), as if its callback was lost."""
        message = replace(
            self._store.view[sid],
            status=status,
            error_code=error_code,
            error_message=_error_message(error_code),
            date_updated=utcnow(),
        )
        return self._store.put(message)

    def throttle(self, *, requests: int | None = None, until: float | None = None) -> None:
        """Answer API requests 429 (code 20429, nothing done), past authentication like the
        rate_limit_429 knob: the next `requests` of them, and every one before Trio time
        `until` (`trio.current_time()`, so virtual time works).

        Each call replaces the burst before it; `throttle(requests=0)` ends it.
        """
        if requests is None and until is None:
            raise ValueError("throttle needs requests or until")
        if requests is not None and requests < 0:
            raise ValueError(f"requests must be >= 0, not {requests}")
        self._throttled_requests = requests or 0
        self._throttled_until = -math.inf if until is None else until

    def throttles_request(self) -> bool:
        """Whether the current burst takes this API request; it counts against `requests`."""
        if self._throttled_requests > 0:
            self._throttled_requests -= 1
            return True
        return trio.current_time() < self._throttled_until

    def fail_downloads(self, count: int) -> None:
        """Cut the next `count` export file downloads short: each sends its head (with the full
        Content-Length) and half the file, then drops the connection. The link is used up all
        the same, as a signed storage link is: a retry asks the day for a fresh one.

        Each call replaces the count before it; `fail_downloads(0)` ends it.
        """
        self.exports.fail_downloads(count)

    def add_export_line(self, day: str, raw: bytes) -> None:
        """Append `raw` (a newline is added if it lacks one) to every file made from now on
        for `day` (YYYY-MM-DD), e.g. a broken line such as b'{"sid": ', after the day's
        rows. A day with such a line gets a file even with no messages."""
        self.exports.add_line(date.fromisoformat(day), raw)

    async def wait_idle(self) -> None:
        """Return once no lifecycle is running: every planned step and callback is done."""
        await self._idle.wait()

    def _send(self, new: NewMessage, direction: str) -> SimMessage:
        via_service = new.messaging_service_sid is not None and new.from_ is None
        message = self._insert(
            to=new.to,
            from_=new.from_,
            body=new.body,
            status="accepted" if via_service else "queued",
            messaging_service_sid=new.messaging_service_sid,
            status_callback=new.status_callback,
            created=utcnow(),
            sent=None,
            error_code=None,
            direction=direction,
            media=media_for_urls(new.media_urls, self.dice),
        )
        self._start_lifecycle(message)
        return message

    def _insert(
        self,
        *,
        to: str,
        from_: str | None,
        body: str,
        status: str,
        messaging_service_sid: str | None,
        status_callback: str | None,
        created: datetime,
        sent: datetime | None,
        error_code: int | None,
        sid: str | None = None,
        direction: str = OUTBOUND_API,
        media: tuple[SimMedia, ...] = (),
    ) -> SimMessage:
        # Messaging Service sends count no segments until they are queued
        # (docs/twilio.md, "Create").
        segments = "0" if status == "accepted" else count_segments(body)
        return self._store.put(
            SimMessage(
                sid=sid or ("MM" if media else "SM") + self.dice.hex32(),
                account_sid=self.knobs.account_sid,
                to=to,
                from_=from_,
                body=body,
                status=status,
                error_code=error_code,
                error_message=_error_message(error_code),
                date_created=created,
                date_updated=max(created, sent or created),
                date_sent=sent,
                status_callback=status_callback,
                messaging_service_sid=messaging_service_sid,
                price=price_for(segments) if sent else None,
                num_segments=segments,
                seq=self._store.next_seq(),
                direction=direction,
                media=media,
            )
        )

    def _start_lifecycle(self, message: SimMessage) -> None:
        steps = plan_steps(message, self.knobs, self._lifecycle_dice)
        outbox = CallbackOutbox(self.knobs, self._lifecycle_dice, self._deliver, self.stats)
        if self._running == 0:
            self._idle = trio.Event()
        self._running += 1
        self._lifecycles.start_soon(self._live, message.sid, steps, outbox, name=message.sid)

    async def _live(self, sid: str, steps: tuple[Step, ...], outbox: CallbackOutbox) -> None:
        """Walk the planned steps; each status change is stored, then its callback posted."""
        try:
            for step in steps:
                await trio.sleep(step.delay)
                message = apply_step(self._store.view[sid], step, utcnow())
                self._store.put(message)
                if step.callback:
                    await outbox.post(message)
            await outbox.flush()
        finally:
            self._running -= 1
            if self._running == 0:
                self._idle.set()


def _error_message(code: int | None) -> str | None:
    return None if code is None else CARRIER_ERRORS.get(code, "Unknown error")


@asynccontextmanager
async def open_simulator(
    knobs: SimKnobs, *, base_url: str, deliver: Deliver
) -> AsyncIterator[Simulator]:
    """A simulator whose lifecycles run until they finish or the block exits."""
    async with trio.open_nursery() as lifecycles:
        yield Simulator(knobs, base_url=base_url, nursery=lifecycles, deliver=deliver)
        lifecycles.cancel_scope.cancel()  # lifecycles still running end with the simulator
