"""The wiring: one place opens the nurseries, creates every channel with an explicit size,
hands each actor its channel ends, and reports readiness (log line, /healthz, systemd).

Start-up runs downstream first: the journal, then the poller and the reconciler (with
Twilio credentials), then the HTTP front. Shutdown is a close cascade: the first SIGTERM or
SIGINT (or `stop`) marks the daemon draining, ends the poller's pass and the reconciler's
run and stops the listener; hypercorn lets in-flight requests finish
(`http.graceful_timeout`); the producers' intake clones then close, the journal commits
what it holds and ends. A second signal cancels everything at
once.

With `http.workers` > 1 the HTTP front is N front processes instead (`workers/`): each
holds its own clone of the intake through its link, drains on the same stop, and the
journal ends after the last of them.
"""

from __future__ import annotations

import gc
from collections.abc import Coroutine
from dataclasses import dataclass
from functools import partial
from typing import Any

import trio

from . import systemd
from .checkpoints import log_checkpoint, run_checkpoints
from .deadlines import AckDeadlines
from .drain import drain_when, watch_signals
from .events import Submission
from .http.api import ApiDeps, create_app
from .http.server import Router, hypercorn_config, public_router, serve_admin, serve_http
from .http.state import ServerState
from .http.webhooks import webhook_receiver
from .inbound.media import Backlog, MediaConfig, MediaDeps, run_media_fetcher
from .journal import INTAKE_BUFFER, run_journal
from .journal_client import JournalClient
from .listeners import Listeners, hand_over, open_listeners, raise_descriptor_limit, url_of
from .logs import get_logger
from .metrics import Metrics
from .poller import PollerConfig, PollerDeps, run_poller, wall_clock
from .reconcile.run import RunDeps
from .reconciler import Reconciler, ReconcilerConfig
from .sender import Sender
from .settings import Settings
from .store import JournalWriter
from .store_reads import StoreReads
from .twilio_api import TwilioApi, TwilioConfig
from .twilio_exports import BulkExport
from .workers.supervisor import serve_by_fronts

log = get_logger("msgledger.main")


@dataclass(frozen=True)
class Running:
    """What `run` reports once it serves: where it listens and the URL it signs against."""

    url: str
    public_url: str
    admin_url: str | None = None  # where /v1 and /metrics are, if not at `url`


async def run(settings: Settings, *, stop: trio.Event | None = None, handle_signals: bool = True,
              task_status: trio.TaskStatus[Running] = trio.TASK_STATUS_IGNORED) -> None:
    """Run the daemon until `stop` is set (or a signal arrives), then drain and return."""
    stop = stop if stop is not None else trio.Event()
    writer = await trio.to_thread.run_sync(JournalWriter.open, settings.store_path)
    log.info("store_opened", path=settings.store_path, last_seq=writer.last_seq,
             upgraded_from=writer.upgraded_from)
    try:
        raise_descriptor_limit()
        listeners = open_listeners(settings)
        try:
            async with trio.open_nursery() as root:
                if handle_signals:
                    root.start_soon(watch_signals, stop, root.cancel_scope)
                root.start_soon(run_checkpoints, lambda: writer.tail,
                                settings.store_checkpoint_interval)
                await _run_services(settings, listeners, stop, writer, task_status)
                root.cancel_scope.cancel()  # everything drained: end the watchers
        finally:
            listeners.close()  # those not handed to hypercorn (which closes its own)
    finally:
        writer.close()
    log_checkpoint(writer.tail)  # the head as it stands at exit, whatever the interval
    log.info("daemon_stopped", last_seq=writer.last_seq)


async def _run_services(settings: Settings, listeners: Listeners, stop: trio.Event,
                        writer: JournalWriter, task_status: trio.TaskStatus[Running]) -> None:
    state, metrics = ServerState(public_url=settings.http_public_url), Metrics()
    intake, inbox = trio.open_memory_channel[Submission](INTAKE_BUFFER)
    deadlines = AckDeadlines(settings.http_ack_timeout)
    async with trio.open_nursery() as timers:
        timers.start_soon(deadlines.run)  # bounds every producer's wait for the journal
        async with trio.open_nursery() as services:
            await services.start(partial(run_journal, inbox, writer=writer, metrics=metrics,
                                         health=state.report_store))
            api = _twilio_api(settings)
            with JournalClient(intake, deadlines) as journal:
                reconciler = None
                if api is not None:
                    await services.start(_poller(settings, state, metrics, journal.clone(),
                                                 api, stop))
                    reconciler = _reconciler(settings, journal.clone(), api)
                    await services.start(reconciler.serve, stop)
                fetcher = _media_fetcher(settings, metrics, journal, api, stop,
                                         backlog=lambda: inbox.statistics().current_buffer_used)
                if fetcher is not None:
                    await services.start(fetcher)
                router = _router(settings, state, metrics, journal.clone(), api, reconciler)
                serve = (_serve_here if settings.http_workers == 1
                         else partial(serve_by_fronts, journal.clone()))
            admin_url = url_of(listeners.admin) if listeners.admin else None
            url = await services.start(serve, router, listeners, settings, state, metrics, stop)
            _ready(settings, state, url, admin_url)
            task_status.started(Running(url, state.public_url or url, admin_url))
        timers.cancel_scope.cancel()  # the journal has ended: every reply is answered


def _ready(settings: Settings, state: ServerState, url: str, admin_url: str | None) -> None:
    state.public_url = state.public_url or url
    # Everything built so far lives as long as the process: keep the cyclic GC's full
    # collections from rescanning it, which stalls the loop (bench/README.md, "Measured
    # once").
    gc.freeze()
    state.ready = True
    systemd.notify("READY=1")
    log.info("daemon_ready", url=url, public_url=state.public_url, admin_url=admin_url,
             workers=settings.http_workers)


def _poller(settings: Settings, state: ServerState, metrics: Metrics, journal: JournalClient,
            api: TwilioApi, stop: trio.Event) -> partial[Coroutine[Any, Any, None]]:
    """The poller, ready to start; it journals through `journal` and closes it at its end."""
    deps = PollerDeps(journal=journal, fetch=api.fetch_message, probe=api.check_credentials,
                      reads=StoreReads(settings.store_path), metrics=metrics.poller,
                      report=state.report_poller)
    return partial(run_poller, stop, config=PollerConfig.from_settings(settings), deps=deps)


def _media_fetcher(settings: Settings, metrics: Metrics, journal: JournalClient,
                   api: TwilioApi | None, stop: trio.Event, *, backlog: Backlog
                   ) -> partial[Coroutine[Any, Any, None]] | None:
    """The media fetcher, ready to start, when media are kept and an auth token can fetch
    them; it journals through a clone of `journal` and closes it at its end."""
    if settings.store_keep_media == "none" or not settings.twilio_auth_token:
        return None
    config = MediaConfig(settings.store_keep_media, settings.store_max_media_bytes,
                         settings.twilio_api_base_url)
    deps = MediaDeps(journal=journal.clone(), reads=StoreReads(settings.store_path),
                     auth_token=settings.twilio_auth_token, metrics=metrics, clock=wall_clock,
                     list_media=None if api is None else api.list_media, backlog=backlog)
    return partial(run_media_fetcher, stop, config=config, deps=deps)


def _reconciler(settings: Settings, journal: JournalClient, api: TwilioApi) -> Reconciler:
    """The reconciler, ready to serve; it journals through `journal` and closes it."""
    deps = RunDeps(journal=journal, reads=StoreReads(settings.store_path),
                   list_page=api.list_page, fetch=api.fetch_message, clock=wall_clock,
                   keep_body=settings.store_keep_body,
                   match_window=settings.reconciler_match_window)
    return Reconciler(ReconcilerConfig.from_settings(settings), deps, BulkExport(api))


def _router(settings: Settings, state: ServerState, metrics: Metrics,
            journal: JournalClient, api: TwilioApi | None,
            reconciler: Reconciler | None) -> Router:
    """The HTTP router and everything it feeds; all of it journals through `journal`."""
    receiver = webhook_receiver(settings, journal, state=state, metrics=metrics)
    sender = Sender(journal, api, keep_body=settings.store_keep_body,
                    keep_media=settings.store_keep_media,
                    public_url=lambda: str(state.public_url))
    app = create_app(ApiDeps(
        store_path=settings.store_path, api_token=settings.api_token, state=state,
        metrics=metrics, sender=sender, journal=journal,
        overdue_after=settings.poller_overdue_after, keep_body=settings.store_keep_body,
        reconciler=reconciler))
    return Router(receiver, app, journal)


def _twilio_api(settings: Settings) -> TwilioApi | None:
    if not (settings.twilio_account_sid and settings.twilio_auth_token):
        return None
    return TwilioApi(TwilioConfig(
        settings.twilio_account_sid, settings.twilio_auth_token, settings.twilio_api_base_url,
        bulkexports_base_url=settings.twilio_bulkexports_base_url,
        concurrency=settings.twilio_concurrency, timeout=settings.twilio_timeout,
        backoff=settings.twilio_retry_backoff))


async def _serve_here(router: Router, listeners: Listeners, settings: Settings,
                      state: ServerState, metrics: Metrics, stop: trio.Event, *,
                      task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve HTTP from this process, on the admin listener too if there is one; once the
    last request has finished, close the router's journal client."""
    url = url_of(listeners.public)
    config = hypercorn_config(hand_over(listeners.public), settings, metrics)
    with router.journal:
        async with trio.open_nursery() as nursery:
            await nursery.start(serve_http, public_router(router, settings), config,
                                partial(drain_when, stop, state))
            if listeners.admin is not None:
                await nursery.start(serve_admin, router.app, listeners.admin, settings,
                                    metrics, stop)
            task_status.started(url)
