"""The Quart application: `/healthz`, `/metrics` and the bearer-protected `/v1` API."""

from __future__ import annotations

import datetime as dt
import hmac
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import wraps
from typing import Any, TypeVar

from quart import Response, jsonify, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException, MethodNotAllowed

from .. import run_reports, store
from ..events import Event, JournalUnavailable, utc_now
from ..journal_client import JournalClient
from ..logs import get_logger
from ..metrics import Metrics
from ..reconciler import QueueFull, Reconciler, exportable_until
from ..sender import Sender, SendRequest, body_fields
from ..store_reads import StoreReads, StoreUnreadable
from . import openapi, payloads
from .state import ServerState

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])
ApiResponse = tuple[Response, int]  # what a route returns: the JSON body and its status

# What each send outcome answers (issue: 201 accepted, 422 rejected, 202 unknown).
SEND_STATUS = {"accepted": 201, "rejected": 422, "unknown": 202, "not_journaled": 503,
               "outcome_not_journaled": 503}
NO_RECONCILER = ("there is no reconciler: twilio.account_sid and twilio.auth_token are not"
                 " configured")
log = get_logger("msgledger.api")


@dataclass(frozen=True, kw_only=True)
class ApiDeps:
    """What the routes use; the wiring builds it once, by keyword."""

    store_path: str
    api_token: str | None
    state: ServerState
    metrics: Metrics
    sender: Sender
    journal: JournalClient  # register's; the sender holds its own
    overdue_after: float  # seconds
    keep_body: str
    reconciler: Reconciler | None = None  # None without Twilio credentials


def create_app(deps: ApiDeps) -> QuartTrio:
    app = QuartTrio("msgledger", static_folder=None)  # no files to serve: no /static route
    app.config["MAX_CONTENT_LENGTH"] = payloads.MAX_JSON_BYTES  # larger bodies: 413, unread
    reader = StoreReads(deps.store_path)
    guarded = _bearer(deps.api_token)
    contract = openapi.document()  # read once: it ships with the code it describes

    @app.get("/healthz")
    async def healthz() -> ApiResponse:
        # worker 0 is the main process; fronts (http.workers > 1) answer for themselves
        status, body = deps.state.health()
        return jsonify({**body, "worker": 0}), status

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(deps.metrics.render(), content_type="text/plain; version=0.0.4")

    @app.get(openapi.PATH)
    async def openapi_document() -> Response:
        return Response(contract, content_type="application/json")

    @app.errorhandler(payloads.Invalid)
    async def invalid(error: payloads.Invalid) -> ApiResponse:
        return jsonify(error=str(error), field=error.field), 400

    @app.errorhandler(StoreUnreadable)
    async def unreadable(error: StoreUnreadable) -> ApiResponse:
        log.warning("store_read_failed", error=str(error))
        return jsonify(error=f"the store cannot be read: {error}"), 503

    @app.errorhandler(HTTPException)
    async def refused(error: HTTPException) -> Response:
        return _refusal(error)

    @app.post("/v1/messages")
    @guarded
    async def send_message() -> ApiResponse:
        return await _send(deps, reader, payloads.send_request(await _json()))

    @app.post("/v1/messages/register")
    @guarded
    async def register_message() -> ApiResponse:
        return await _register(deps, reader, payloads.registration(await _json()))

    @app.get("/v1/messages/<key>")
    @guarded
    async def get_message(key: str) -> ApiResponse:
        record = await reader.record(key)
        if record is None:
            return jsonify(error=f"no message with SID or ref {key!r}"), 404
        return jsonify(record), 200

    @app.get("/v1/messages/<key>/media/<n>")
    @guarded
    async def get_media(key: str, n: str) -> Response | ApiResponse:
        return await _media(reader, key, payloads.media_index(n))

    @app.get("/v1/messages")
    @guarded
    async def list_messages() -> ApiResponse:
        return await _list(deps, reader, payloads.list_query(request.args.items(multi=True)))

    @app.post("/v1/reconcile")
    @guarded
    async def start_reconcile_run() -> ApiResponse:
        return await _reconcile(deps.reconciler, await _json())

    @app.get("/v1/reconcile/runs/<run_id>")
    @guarded
    async def get_reconcile_run(run_id: str) -> ApiResponse:
        report = await _run_report(deps.reconciler, reader, run_id)
        if report is None:
            return jsonify(error="no reconcile run has this run_id"), 404
        return jsonify(report), 200

    @app.get("/v1/reconcile/runs")
    @guarded
    async def list_reconcile_runs() -> ApiResponse:
        limit = payloads.runs_query(request.args.items(multi=True))
        return jsonify(runs=await _recent_runs(deps.reconciler, reader, limit)), 200

    return app


async def _media(reader: StoreReads, key: str, n: int) -> Response | ApiResponse:
    """A kept media file, as an attachment of its own content type: it came from a
    stranger's phone, so no browser may render it in the API's origin."""
    record = await reader.record(key)
    if record is None:
        return jsonify(error=f"no message with SID or ref {key!r}"), 404
    listed = [m for m in record["media"] if m["n"] == n]
    if not listed:
        return jsonify(error=f"the message has no media {n}"), 404
    found = await reader.run(store.media_file, str(record["sid"]), n)
    if found is None:
        return jsonify(error=f"media {n} is not kept (state: {listed[0]['state']},"
                       f" kept: {str(listed[0]['kept']).lower()})"), 404
    content_type, blob = found
    return Response(blob, content_type=content_type or "application/octet-stream", headers={
        "Content-Disposition": f'attachment; filename="{record["sid"]}-{n}"',
        "X-Content-Type-Options": "nosniff",
        "X-Media-SHA256": str(listed[0]["sha256"])})


def _refusal(error: HTTPException) -> Response:
    """Quart's own 404, 405 and 413 as the `{"error": ...}` JSON of every other refusal
    (werkzeug's are HTML pages); a 405 keeps its Allow header."""
    response = jsonify(error=error.name.lower())
    response.status_code = error.code or 500
    if isinstance(error, MethodNotAllowed) and error.valid_methods:
        response.headers["Allow"] = ", ".join(error.valid_methods)
    return response


async def _json() -> object:
    """The body as JSON, parsed here: Quart's own parser answers 500 for bytes that are not
    UTF-8 and lets a deeply nested body raise RecursionError."""
    raw = await request.get_data(cache=False, as_text=False, parse_form_data=False)
    return payloads.parse_json(raw)


async def _send(deps: ApiDeps, reader: StoreReads, wanted: SendRequest) -> ApiResponse:
    if not deps.sender.configured:
        return jsonify(error="twilio.account_sid and twilio.auth_token are not configured"), 503
    if not deps.sender.claim(wanted.ref):
        return jsonify(error=f"ref {wanted.ref!r} is being sent by another request"), 409
    try:
        existing = await reader.record(wanted.ref)
        if existing is not None:  # the caller retried: never send the same ref twice
            return jsonify({**existing, "error": f"ref {wanted.ref!r} was already used"}), 409
        result = await deps.sender.send(wanted)
    finally:
        deps.sender.release(wanted.ref)
    record = await reader.record(wanted.ref)
    if record is None:
        return jsonify(error="not journaled in time: nothing was sent, but the request may"
                       " still be recorded later; retry with a new ref", ref=wanted.ref), 503
    return jsonify(record), SEND_STATUS[result]


async def _register(deps: ApiDeps, reader: StoreReads, r: payloads.Registration) -> ApiResponse:
    existing = await reader.record(r.sid)
    if existing is not None:
        field = _contradicted(existing, r)
        if field is not None:  # the store would keep the first and drop this one silently
            return jsonify({**existing, "field": field,
                            "error": f"{r.sid} is already recorded with another {field}"}), 409
        if _registration_of(existing) is not None:
            return jsonify(existing), 200  # idempotent on the SID and its fields
    data: dict[str, Any] = {"to": r.to, "from": r.from_}
    if r.body is not None:
        data.update(body_fields(r.body, deps.keep_body))
    event = Event("register", "register", utc_now(), sid=r.sid, ref=r.ref, status=r.status,
                  data=data)
    ack = await deps.journal.journal(event)
    if isinstance(ack, JournalUnavailable):
        return jsonify(error=str(ack)), 503
    return jsonify(await reader.record(r.sid)), 201


def _registration_of(record: store.Record) -> dict[str, Any] | None:
    """The history entry of the record's first registration, if it was registered."""
    return next((h for h in record["history"] if h["kind"] == "register"), None)


def _contradicted(record: store.Record, r: payloads.Registration) -> str | None:
    """The first field of `r` that differs from what `record` already holds for its SID.

    A ref contradicts any other ref the record has (or, once registered, its lack of one).
    The rest is compared with the first registration only: callbacks move the record's own
    status on, and a message never registered has nothing else to contradict. An optional
    field left out (ref, body) contradicts nothing.
    """
    first = _registration_of(record)
    if r.ref is not None and r.ref != record["ref"] and (
            first is not None or record["ref"] is not None):
        return "ref"
    if first is None:
        return None
    data = first["data"]
    given = {"status": r.status, "to": r.to, "from": r.from_}
    held = {"status": first.get("status"), "to": data.get("to"), "from": data.get("from")}
    if r.body is not None:
        given["body"] = body_fields(r.body, "none")["body_sha256"]
        held["body"] = data.get("body_sha256")
    return next((name for name, value in given.items() if value != held[name]), None)


async def _list(deps: ApiDeps, reader: StoreReads, q: payloads.ListQuery) -> ApiResponse:
    overdue_before = store.overdue_cutoff(deps.overdue_after) if q.overdue else None
    records, cursor = await reader.run(
        store.list_records, status=q.status, overdue_before=overdue_before, since=q.since,
        until=q.until, after=q.after, limit=q.limit)
    return jsonify(messages=records, next_cursor=cursor), 200


async def _reconcile(reconciler: Reconciler | None, payload: object) -> ApiResponse:
    """Queue a run of the day asked for; the same day and source already queued or running
    is answered with that run. The day is checked by the reconciler's clock."""
    now = reconciler.clock() if reconciler is not None else dt.datetime.now(dt.UTC)
    asked = payloads.reconcile_request(payload, today=now.astimezone(dt.UTC).date(),
                                       exportable_until=exportable_until(now))
    if reconciler is None:
        return jsonify(error=NO_RECONCILER), 503
    try:
        run = await reconciler.request(asked.day, asked.source)
    except (JournalUnavailable, QueueFull) as refusal:
        return jsonify(error=f"the run was not started: {refusal}"), 503
    return jsonify(run_id=run.run_id, status=run.status), 202


async def _run_report(reconciler: Reconciler | None, reader: StoreReads,
                      run_id: str) -> run_reports.Report | None:
    """The run as it stands in this process, else its report in the journal."""
    if not run_reports.RUN_ID.fullmatch(run_id):
        return None
    run = reconciler.run(run_id) if reconciler is not None else None
    if run is not None:
        return run.report()
    return await reader.run(run_reports.finished_run, run_id)


async def _recent_runs(reconciler: Reconciler | None, reader: StoreReads,
                       limit: int) -> list[run_reports.Report]:
    """This process's runs, newest first, then the journal's reports of the others."""
    runs = reconciler.runs()[:limit] if reconciler is not None else []
    here = [run.report() for run in runs]
    if len(here) == limit:
        return here
    return here + await reader.run(run_reports.finished_runs, limit - len(here),
                                   [report["run_id"] for report in here])


def _bearer(token: str | None) -> Callable[[F], F]:
    """A decorator answering 401 unless `Authorization: Bearer <token>` matches.

    Without a configured token every /v1 request is refused (docs/design.md, "Routes").
    """
    expected = f"Bearer {token}".encode() if token else None

    def decorate(view: F) -> F:
        @wraps(view)
        async def guarded(*args: Any, **kwargs: Any) -> Any:
            given = request.headers.get("Authorization", "").encode()
            if expected is None or not hmac.compare_digest(given, expected):
                return jsonify(error="missing or wrong bearer token"), 401
            return await view(*args, **kwargs)

        return guarded  # type: ignore[return-value]

    return decorate
