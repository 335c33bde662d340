"""A message's life after create: the planned status steps, and its callbacks' fate.

The whole plan is drawn when the message is created, so a seeded simulator replays the same
outcomes. Steps (docs/twilio.md, "Initial status and callbacks"): accepted -> queued
(Messaging Service only), sending (no callback), then failed, or sent -> delivered |
undelivered, or sent with no receipt ever; WhatsApp adds read after delivered. The initial
status never gets a callback.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from datetime import datetime

from ._callbacks import Callback, Deliver, build_callback
from ._knobs import Dice, SimKnobs
from ._stats import SimStats
from ._store import SimMessage, count_segments
from ._wire import price_for

SERVICE_SENDER = "+15005550006"  # the number a Messaging Service "picks"; a Twilio test number
CARRIER_ERRORS = {  # https://www.twilio.com/docs/api/errors
    30001: "Queue overflow",
    30003: "Unreachable destination handset",
    30005: "Unknown destination handset",
    30006: "Landline or unreachable carrier",
    30008: "Unknown error",
}
UNDELIVERED_CODES = (30003, 30005, 30006)
FAILED_CODES = (30001, 30008)


@dataclass(frozen=True)
class Step:
    """One planned status change, `delay` seconds after the previous one."""

    delay: float
    status: str
    error_code: int | None = None
    callback: bool = True


def plan_steps(message: SimMessage, knobs: SimKnobs, dice: Dice) -> tuple[Step, ...]:
    """Draw the message's remaining lifecycle from the knobs."""
    low, high = knobs.step_delay
    weights = asdict(knobs.outcome_weights)
    outcome = dice.pick({k: v for k, v in weights.items() if v > 0})
    plan: list[tuple[str, int | None, bool]] = []
    if message.status == "accepted":
        plan.append(("queued", None, True))
    plan.append(("sending", None, False))  # OMS lists no callback for `sending`
    if outcome == "failed":
        plan.append(("failed", dice.choice(FAILED_CODES), True))
    else:
        plan.append(("sent", None, True))
    if outcome == "undelivered":
        plan.append(("undelivered", dice.choice(UNDELIVERED_CODES), True))
    elif outcome == "delivered":
        plan.append(("delivered", None, True))
        if message.is_whatsapp:
            plan.append(("read", None, True))
    return tuple(Step(dice.uniform(low, high), s, code, cb) for s, code, cb in plan)


def apply_step(message: SimMessage, step: Step, now: datetime) -> SimMessage:
    """The message after the step; a Messaging Service picks its sender when it queues."""
    sender = message.from_ or (
        "whatsapp:" + SERVICE_SENDER if message.is_whatsapp else SERVICE_SENDER
    )
    sent = message.date_sent or (now if step.status == "sent" else None)
    segments = count_segments(message.body)
    return replace(
        message,
        status=step.status,
        error_code=step.error_code,
        error_message=CARRIER_ERRORS.get(step.error_code or 0),
        date_updated=now,
        date_sent=sent,
        from_=sender,
        num_segments=segments,
        price=message.price or (price_for(segments) if sent else None),
    )


class CallbackOutbox:
    """One message's callbacks after the loss, duplication and reordering knobs.

    A message picked for reordering holds its callbacks until its lifecycle ends, then sends
    them shuffled; otherwise each goes out as its status changes, in order.
    """

    def __init__(self, knobs: SimKnobs, dice: Dice, deliver: Deliver, stats: SimStats) -> None:
        self._knobs = knobs
        self._dice = dice
        self._deliver = deliver
        self._stats = stats
        self._held: list[Callback] | None = [] if dice.chance(knobs.callback_reordering) else None

    async def post(self, message: SimMessage) -> None:
        if message.status_callback is None:
            return
        if self._dice.chance(self._knobs.callback_loss):
            self._stats.callbacks_lost += 1
            return
        callback = build_callback(
            message, message.status_callback, self._knobs.auth_token, self._dice.token()
        )
        if self._held is None:
            await self._send(callback)
        else:
            self._held.append(callback)

    async def flush(self) -> None:
        held, self._held = self._held or [], None
        self._dice.shuffle(held)
        for callback in held:
            await self._send(callback)

    async def _send(self, callback: Callback) -> None:
        await self._send_once(callback)
        if self._dice.chance(self._knobs.callback_duplication):
            self._stats.callbacks_duplicated += 1
            await self._send_once(callback)

    async def _send_once(self, callback: Callback) -> None:
        report = await self._deliver(callback)
        self._stats.callbacks_sent += report.attempts
        self._stats.callbacks_retried += report.attempts - 1
        if report.delivered:
            self._stats.callbacks_delivered += 1
        else:
            self._stats.callbacks_failed += 1
