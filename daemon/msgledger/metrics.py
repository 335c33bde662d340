"""Prometheus metrics, kept in a registry per daemon so tests can run several at once."""

from __future__ import annotations

from typing import Any

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

    def callback_totals(self) -> list[list[Any]]:
        """`[route, outcome, total]` for each webhook counter: what a front reports."""
        return [[sample.labels["route"], sample.labels["outcome"], sample.value]
                for metric in self.callbacks.collect() for sample in metric.samples
                if sample.name.endswith("_total")]

    def add_callbacks(self, totals: list[list[Any]], before: dict[tuple[str, str], float]) -> None:
        """Count what a front's `totals` add to what it reported `before` (kept up to date)."""
        for route, outcome, total in totals:
            key = (route, outcome)
            self.callbacks.labels(route, outcome).inc(max(0.0, total - before.get(key, 0.0)))
            before[key] = total

    def render(self) -> bytes:
        return generate_latest(self.registry)
