"""Prometheus metrics, kept in a registry per daemon so tests can run several at once."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics
from prometheus_client.exposition import generate_latest

# Commit latency buckets (seconds): a local fsync is ~0.1 ms, network storage several ms,
# and anything near the 5 s ack timeout is an incident.
_COMMIT_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class Metrics:
    """Every metric the daemon exports."""

    def __init__(self) -> None:
        disable_created_metrics()  # type: ignore[no-untyped-call]  # *_created doubles a scrape
        self.registry = CollectorRegistry()
        self.callbacks = Counter(
            "msgledger_callbacks", "Webhook requests by route and outcome",
            ["route", "outcome"], registry=self.registry)
        self.commit_seconds = Histogram(
            "msgledger_journal_commit_seconds", "Time to commit one batch, thread hop included",
            buckets=_COMMIT_BUCKETS, registry=self.registry)
        self.batch_size = Histogram(
            "msgledger_journal_batch_size", "Events per journal commit",
            buckets=_BATCH_BUCKETS, registry=self.registry)

    def render(self) -> bytes:
        return generate_latest(self.registry)
