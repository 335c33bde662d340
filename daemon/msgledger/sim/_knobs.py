"""The knobs that shape the simulator (timing, faults, outcomes) and the seeded dice that roll them.

Every random choice the simulator makes goes through one `Dice`, so a fixed `seed` replays the
same SIDs, outcomes and faults for the same sequence of requests.
"""

from __future__ import annotations

import random
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import TypeVar

T = TypeVar("T")

_ACCOUNT_SID = re.compile(r"AC[0-9a-fA-F]{32}")
_PROBABILITIES = (
    "callback_loss",
    "callback_duplication",
    "callback_reordering",
    "rate_limit_429",
    "lose_create_response",
)
_DURATIONS = ("latency", "fetch_latency", "list_lag", "export_job_delay", "export_link_ttl")


@dataclass(frozen=True)
class OutcomeWeights:
    """Relative weights of how a message's lifecycle ends (they need not sum to 1)."""

    delivered: float = 0.94
    undelivered: float = 0.04
    failed: float = 0.02
    sent: float = 0.0  # no delivery receipt ever arrives: the message stays `sent`

    def __post_init__(self) -> None:
        weights = [getattr(self, f.name) for f in fields(self)]
        if min(weights) < 0 or sum(weights) <= 0:
            raise ValueError(f"outcome weights must be >= 0 and not all 0: {self}")


@dataclass(frozen=True)
class SimKnobs:
    """How the simulator behaves; see the field comments for what each knob does.

    Message ages (`redact_to_after`, `list_lag`) count on the UTC wall clock that message dates
    use, so a test injects past dates rather than waiting; the Bulk Export timers count on
    Trio's clock (`trio.current_time()`), so a test on virtual time skips them.
    """

    account_sid: str  # "AC" + 32 hex
    auth_token: str  # HTTP Basic password and the callback signing key
    latency: float = 0.0  # seconds added before answering each API request
    fetch_latency: float = 0.0  # seconds more before answering a fetch (GET /Messages/{Sid})
    step_delay: tuple[float, float] = (0.005, 0.05)  # min/max seconds between lifecycle steps
    callback_loss: float = 0.0  # probability a status callback is never sent
    callback_duplication: float = 0.0  # probability a callback is sent twice
    callback_reordering: float = 0.0  # probability a message's callbacks go out shuffled
    rate_limit_429: float = 0.0  # probability an API request is answered 429 (never processed)
    lose_create_response: float = 0.0  # probability a create is done but its answer is dropped
    redact_to: bool = False  # fetch, list and export files end `to` in XXXX, at once
    redact_to_after: float | None = None  # they do so once `date_created` is this many seconds old
    list_lag: float = 0.0  # seconds past `listed_at` before the list (not fetch) shows a message
    export_job_delay: float = 60.0  # Trio seconds from creating a Bulk Export job to its completion
    export_link_ttl: float = 240.0  # Trio seconds a day file's one-time download link is valid
    export_status_upper: bool = False  # job statuses in upper case, as the API reference's examples
    export_inbound_per_day: int = 0  # inbound rows (texts from customers) mixed into each day file
    outcome_weights: OutcomeWeights = OutcomeWeights()
    seed: int | None = None  # for reproducible randomness
    inbound_url: str | None = None  # our number's webhook: `receive_inbound` posts texts there
    inbound_fallback_url: str | None = None  # posted to when the webhook fails
    inbound_timeout: float = 15.0  # seconds each of those two may take, answer included

    def __post_init__(self) -> None:
        if not _ACCOUNT_SID.fullmatch(self.account_sid):
            raise ValueError(f"account_sid must be AC + 32 hex digits: {self.account_sid!r}")
        for name in _PROBABILITIES:
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1]")
        low, high = self.step_delay
        if not 0.0 <= low <= high or min(getattr(self, name) for name in _DURATIONS) < 0:
            raise ValueError("delays must be >= 0 and step_delay must be (min, max)")
        if (self.redact_to_after or 0.0) < 0 or self.export_inbound_per_day < 0:
            raise ValueError("redact_to_after and export_inbound_per_day must be >= 0")
        if not self.inbound_timeout > 0:
            raise ValueError("inbound_timeout must be > 0")
        for url in (self.inbound_url, self.inbound_fallback_url):
            if url is not None and not url.startswith(("http://", "https://")):
                raise ValueError(f"inbound URLs must be http:// or https://: {url!r}")


class Dice:
    """The simulator's single source of randomness."""

    def __init__(self, seed: int | str | None) -> None:
        self._rng = random.Random(seed)

    def chance(self, probability: float) -> bool:
        """True with that probability; a zero knob draws nothing, so seeded runs stay stable."""
        return probability > 0 and self._rng.random() < probability

    def uniform(self, low: float, high: float) -> float:
        return self._rng.uniform(low, high)

    def below(self, limit: int) -> int:
        """A whole number in [0, limit)."""
        return self._rng.randrange(limit)

    def hex32(self) -> str:
        return f"{self._rng.getrandbits(128):032x}"

    def token(self) -> str:
        return str(uuid.UUID(int=self._rng.getrandbits(128), version=4))

    def choice(self, options: Sequence[T]) -> T:
        return self._rng.choice(options)

    def pick(self, weights: dict[str, float]) -> str:
        return self._rng.choices(list(weights), weights=list(weights.values()))[0]

    def shuffle(self, items: list[T]) -> None:
        self._rng.shuffle(items)
