"""A Twilio Messages API simulator for tests, benchmarks and local trials.

`serve_sim(knobs)` serves create, fetch and list on 127.0.0.1 for the real `twilio` client
(`client.api.base_url = sim.base_url`), walks each message through its statuses, and posts
signed status callbacks, with knobs for latency, 429s, lost create answers and lost,
duplicated or reordered callbacks, a list that lags behind, and phone-number redaction at
once or after a while.

It serves Bulk Export on the same base URL (`client.bulkexports.base_url = sim.base_url`):
custom jobs that complete after `export_job_delay` Trio seconds, each day's gzip file of JSON
lines behind a one-time link, and faults for downloads cut short (`Simulator.fail_downloads`),
inbound rows and broken lines (`Simulator.add_export_line`).

It plays the inbound side too (docs/simulator.md): `Simulator.receive_inbound(NewInbound(...))`
makes a customer text one of our numbers, posts the signed webhook to `inbound_url` (then to
`inbound_fallback_url` if that fails) and sends the replies the TwiML answer asks for, as
`outbound-reply` messages; each message's media is served behind Basic auth, by a 307 to a
CDN link that takes no credentials. POST /sim/inbound does the same for a human with curl.
"""

from __future__ import annotations

from ._callbacks import Callback, Deliver, DeliveryReport, build_callback, open_callback_sender
from ._inbound import InboundReport, NewInbound
from ._knobs import OutcomeWeights, SimKnobs
from ._serve import serve_sim
from ._simulator import Simulator, open_simulator
from ._stats import SimStats
from ._store import NewMessage, SimMedia, SimMessage

__all__ = [
    "Callback",
    "Deliver",
    "DeliveryReport",
    "InboundReport",
    "NewInbound",
    "NewMessage",
    "OutcomeWeights",
    "SimKnobs",
    "SimMedia",
    "SimMessage",
    "SimStats",
    "Simulator",
    "build_callback",
    "open_callback_sender",
    "open_simulator",
    "serve_sim",
]
