"""Counters of what the simulator did, for tests and benchmarks to assert on."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class SimStats:
    """Running totals; mutable on purpose, read them at any time."""

    requests: int = 0  # API requests received, whatever their outcome
    requests_429: int = 0  # answered 429 by the rate_limit_429 knob
    messages_created: int = 0  # through the API (add_message not counted)
    create_responses_lost: int = 0  # creates performed whose answer was dropped
    callbacks_sent: int = 0  # POST attempts, retries and duplicates included
    callbacks_delivered: int = 0  # callbacks (or duplicates) some attempt got a 2xx for
    callbacks_failed: int = 0  # callbacks (or duplicates) given up on without a 2xx
    callbacks_retried: int = 0  # extra attempts after a retryable failure
    callbacks_lost: int = 0  # never sent, by the callback_loss knob
    callbacks_duplicated: int = 0  # sent a second time, by the callback_duplication knob
