"""Prometheus metrics, kept in a registry per daemon so tests can run several at once."""

from __future__ import annotations

from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
)
from prometheus_client.exposition import generate_latest

# Commit latency buckets (seconds): a local fsync is well under a millisecond (bench/README.md),
# network storage several ms, and anything near the 5 s ack timeout is an incident.
_COMMIT_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
# Twilio fetch latency (seconds): tens of ms from a nearby region, a second is slow, and the
# client gives up at twilio.timeout (15 s by default).
_FETCH_BUCKETS = (0.01, 0.025, 0.04, 0.05, 0.06, 0.075, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 15)

TallyKey = tuple[str, tuple[tuple[str, str], ...]]  # a counter's name, its labels sorted


class TallyRefused(ValueError):
    """A front's tally names a counter, or labels, that this process does not keep."""


class Metrics:
    """Every metric the daemon exports."""

    def __init__(self) -> None:
        disable_created_metrics()  # type: ignore[no-untyped-call]  # *_created doubles a scrape
        self.registry = CollectorRegistry()
        self.callbacks = Counter(
            "msgledger_callbacks", "Webhook requests by route and outcome",
            ["route", "outcome"], registry=self.registry)
        self.connection_errors = Counter(
            "msgledger_connection_errors",
            "Connections ended early, by reason: http2_refused, body_timeout, failed",
            ["reason"], registry=self.registry)
        self.inbound_forwards = Counter(
            "msgledger_inbound_forwards",
            "Inbound messages given to inbound.forward_url, by outcome: twiml (its answer went"
            " to Twilio), empty (it answered nothing), failed (an empty <Response/> went)",
            ["outcome"], registry=self.registry)
        # The counters a front keeps and reports to the main process (`tally`), by name.
        self._tallied = {"callbacks": self.callbacks, "connection_errors": self.connection_errors,
                         "inbound_forwards": self.inbound_forwards}
        self.commit_seconds = Histogram(
            "msgledger_journal_commit_seconds", "Time to commit one batch, thread hop included",
            buckets=_COMMIT_BUCKETS, registry=self.registry)
        self.batch_size = Histogram(
            "msgledger_journal_batch_size", "Events per journal commit",
            buckets=_BATCH_BUCKETS, registry=self.registry)
        self.poller = PollerMetrics(self.registry)
        self.media_fetches = Counter(
            "msgledger_media_fetches",
            "Media files fetched, by outcome: archived, truncated, failed (tried again"
            " later), gave_up", ["outcome"], registry=self.registry)

    def tally(self) -> list[list[Any]]:
        """`[counter, {label: value}, total]` for each sample of the counters a front keeps:
        what it reports to the main process."""
        return [[name, sample.labels, sample.value]
                for name, counter in self._tallied.items()
                for metric in counter.collect() for sample in metric.samples
                if sample.name.endswith("_total")]

    def add_tally(self, tally: list[list[Any]], before: dict[TallyKey, float]) -> None:
        """Count what a front's `tally` adds to what it reported `before` (kept up to date);
        TallyRefused for a counter or labels not ours (the frame's shape is the link's to
        check)."""
        counted = [(self._child(name, labels), (name, tuple(sorted(labels.items()))), total)
                   for name, labels, total in tally]  # all checked before any is counted
        for child, key, total in counted:
            child.inc(max(0.0, total - before.get(key, 0.0)))
            before[key] = total

    def _child(self, name: str, labels: dict[str, str]) -> Any:
        counter = self._tallied.get(name)
        if counter is None:
            raise TallyRefused(f"no counter {name!r}")
        try:
            return counter.labels(**labels)
        except ValueError as error:  # prometheus_client: labels not the counter's
            raise TallyRefused(f"{name}: {error}") from None

    def render(self) -> bytes:
        return generate_latest(self.registry)


class PollerMetrics:
    """The overdue poller's metrics (docs/design.md, "The overdue poller")."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.overdue = Gauge(
            "msgledger_overdue_messages",
            "Messages past their first poll time, not final and not given up",
            registry=registry)
        self.oldest_age = Gauge(
            "msgledger_overdue_oldest_age_seconds",
            "Age of the oldest overdue message (0: none)", registry=registry)
        self.polls = Counter(
            "msgledger_polls", "Fetches by SID, by outcome: changed, unchanged, not_found,"
            " error, throttled, refused, not_journaled", ["outcome"], registry=registry)
        self.gave_up = Counter(
            "msgledger_poll_gave_up", "Messages flagged unconfirmed at poller.give_up_after",
            registry=registry)
        self.fetch_seconds = Histogram(
            "msgledger_twilio_fetch_seconds", "Time for one fetch by SID, thread hop included",
            buckets=_FETCH_BUCKETS, registry=registry)
        self.paused = Gauge(
            "msgledger_poller_paused", "1 while Twilio refuses the credentials (401/403)",
            registry=registry)
        self.concurrency = Gauge(
            "msgledger_poller_concurrency",
            "Fetches the poller lets in flight now: halved on 429/5xx, raised after successes",
            registry=registry)
