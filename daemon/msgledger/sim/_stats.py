"""Counters of what the simulator did, for tests and benchmarks to assert on."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass


@dataclass
class SimStats:
    """Running totals; mutable on purpose, read them at any time."""

    requests: int = 0  # API requests received, whatever their outcome
    requests_429: int = 0  # answered 429 by the rate_limit_429 knob or a `throttle` burst
    fetches: int = 0  # fetch requests (GET /Messages/{Sid}) received, whatever their outcome
    fetches_not_found: int = 0  # fetches answered 404: no message has that SID
    in_flight: int = 0  # API requests being handled now, their latency included
    peak_in_flight: int = 0  # the most in_flight seen; a test may reset it to 0
    messages_created: int = 0  # through the API (add_message not counted)
    create_responses_lost: int = 0  # creates performed whose answer was dropped
    callbacks_sent: int = 0  # POST attempts, retries and duplicates included
    callbacks_delivered: int = 0  # callbacks (or duplicates) some attempt got a 2xx for
    callbacks_failed: int = 0  # callbacks (or duplicates) given up on without a 2xx
    callbacks_retried: int = 0  # extra attempts after a retryable failure
    callbacks_lost: int = 0  # never sent, by the callback_loss knob
    callbacks_duplicated: int = 0  # sent a second time, by the callback_duplication knob
    export_jobs_created: int = 0  # Bulk Export custom jobs accepted (answered 201)
    export_day_fetches: int = 0  # GET /v1/Exports/Messages/Days/{Day}, whatever their outcome
    export_downloads: int = 0  # day files served on a valid link, cut ones included
    export_downloads_failed: int = 0  # of those, cut short by `Simulator.fail_downloads`
    export_links_refused: int = 0  # downloads answered 403: a link used before or expired
    media_fetches: int = 0  # authenticated GET /Messages/{Sid}/Media/{MediaSid}: a 307 to the CDN
    cdn_downloads: int = 0  # media files served on a CDN link
    cdn_credentials_refused: int = 0  # CDN requests answered 403 for carrying an Authorization
    inbound_sent: int = 0  # inbound webhooks posted to inbound_url
    inbound_fallbacks: int = 0  # of those failed, posted again to inbound_fallback_url
    replies_created: int = 0  # outbound-reply messages made by TwiML <Message> verbs

    @contextmanager
    def handling(self) -> Iterator[None]:
        """Count one API request in flight while the block runs, however it ends."""
        self.in_flight += 1
        self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
        try:
            yield
        finally:
            self.in_flight -= 1
