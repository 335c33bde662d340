"""The HTTP contract (`daemon/msgledger/http/openapi.json`, served at `GET /v1/openapi.json`)
held to the running daemon, and the running daemon fuzzed from it by schemathesis.

Kept by hand, not derived. Deriving it (quart-schema) would mean rewriting the routes as
pydantic- or attrs-typed handlers behind another framework layer, and still not cover the
two webhooks (a lean ASGI path, not Quart routes), the order of their checks, or which
status codes a handler answers: no type annotation says "422 when Twilio refuses". What
payloads.py enforces is a page of JSON Schema, so the document says it directly, and these
tests keep the two from drifting apart:

- routes: every route the app serves (Quart's `url_map` and the webhook `ROUTES`) is in the
  document with the same methods, and the document has nothing else; on the running
  daemon, every documented method answers and every other one gets 405;
- status codes: every status an operation is documented with has a witness, a request the
  running daemon (one process and two fronts) answers with exactly that status and a body
  matching the document; a status without a witness fails the test, as does a witness of
  an undocumented one;
- the fuzz: schemathesis, against a `msgledger run` child (one process, two fronts) whose
  `/v1/openapi.json` must be the document fuzzed, fails on any 5xx, any status the
  document does not list (`status_code_conformance`), any body or content type it does
  not describe, valid data refused or invalid data accepted (so the field rules are
  payloads.py's), a 405 without `Allow`, any answer slower than 5 s and any request that
  times out (10 s). Webhook cases that carry a signature header are signed as Twilio
  signs, so the fuzz reaches the journal, not only the 403; at the end the child must
  exit 0, its store verify and its log hold no error.

`make test` runs a bounded, deterministic pass (`MSGLEDGER_OPENAPI_EXAMPLES` per operation);
`make fuzz` runs the schemathesis CLI with the same checks for ten minutes, loading the
document from the daemon (`python -m tests.test_openapi 600`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode

import httpx
import pytest
import requests
import schemathesis
import trio
from hypothesis import HealthCheck, settings
from openapi_spec_validator import validate as validate_spec
from quart_trio import QuartTrio
from twilio.request_validator import RequestValidator

from msgledger import store
from msgledger.deadlines import AckDeadlines
from msgledger.http import api, openapi, webhooks
from msgledger.http.state import ServerState
from msgledger.journal_client import JournalClient
from msgledger.metrics import Metrics
from msgledger.sender import Sender
from msgledger.sim import NewInbound, OutcomeWeights, SimKnobs, Simulator, serve_sim

from .conftest import (
    ACCOUNT_SID,
    API_TOKEN,
    AUTH_TOKEN,
    FORM,
    Ledger,
    child_env,
    daemon_environ,
    error_lines,
    new_sid,
    open_ledger,
)

CONTRACT: dict[str, Any] = json.loads(openapi.document())
BEARER = {"Authorization": f"Bearer {API_TOKEN}"}
UNKNOWN_RUN = "RN" + "0" * 32  # of a run_id's shape, and no run's
METHODS = frozenset({"GET", "PUT", "POST", "DELETE", "PATCH"})  # HEAD, OPTIONS: every route's
EXAMPLES = int(os.environ.get("MSGLEDGER_OPENAPI_EXAMPLES", "80"))  # per operation, daemon: ~20 s
START_TIMEOUT = 20.0  # seconds for a child daemon to log daemon_ready
ROOT = str(Path(__file__).parent.parent)  # where `tests` imports from

# What schemathesis checks, for the pytest run and `make fuzz` alike (TOML: the CLI's form).
CONFIG = f"""
headers = {{ Authorization = "Bearer {API_TOKEN}" }}
request-timeout = 10.0
max-failures = 20

[cache]
enabled = false  # each run starts fresh, and leaves no .schemathesis/ in the work tree

[generation]
database = "none"

[checks]
enabled = false
not_a_server_error.enabled = true
status_code_conformance.enabled = true
content_type_conformance.enabled = true
response_schema_conformance.enabled = true
negative_data_rejection.enabled = true
positive_data_acceptance.enabled = true
# 409: a ref or SID used before; 422: Twilio refused (here it is unreachable). Both are
# answers to valid requests, not refusals of their data.
positive_data_acceptance.expected-statuses = ["2xx", "401", "403", "404", "409", "422"]
missing_required_header.enabled = true
unsupported_method.enabled = true
allow_header_conformance.enabled = true
max_response_time = 5.0

# GET /v1/messages/register is GET /v1/messages/{{key}} for the key "register" (a ref may be
# that word), so OPTIONS rightly allows GET there, which OpenAPI cannot say.
[[operations]]
include-path = "/v1/messages/register"
checks.allow_header_conformance.enabled = false

# A valid-looking day may still be refused: one after today, or `export` within Twilio's two
# days (400, naming the field), which no static schema can say; and the fuzz asks for more
# runs than wait at once against a Twilio that never answers, so the queue fills (503).
[[operations]]
include-operation-id = "startReconcileRun"
checks.positive_data_acceptance.expected-statuses = ["2xx", "400", "401", "503"]
checks.not_a_server_error.expected-statuses = ["2xx", "4xx", "503"]
"""


def documented_routes(contract: Mapping[str, Any]) -> set[tuple[str, str]]:
    return {(path, method.upper()) for path, item in contract["paths"].items()
            for method in item if method.upper() in METHODS}


def documented_statuses(contract: Mapping[str, Any]) -> set[tuple[str, str, int]]:
    return {(method.upper(), path, int(status)) for path, item in contract["paths"].items()
            for method, operation in item.items() if method.upper() in METHODS
            for status in operation["responses"]}


# ------------------------------------------------------------------ the document itself


def test_the_document_is_valid_openapi() -> None:
    """The packaged document validates as OpenAPI 3 and schemathesis loads it."""
    validate_spec(CONTRACT)
    schemathesis.openapi.from_dict(CONTRACT).validate()


# ------------------------------------------------------------------ routes


def the_app(store_path: str) -> QuartTrio:
    """The Quart app exactly as the daemon builds it (`main._router`); nothing is started."""
    intake, _ = trio.open_memory_channel[Any](0)
    journal = JournalClient(intake, AckDeadlines(1.0))
    sender = Sender(journal, None, keep_body="full", public_url=str)
    return api.create_app(api.ApiDeps(
        store_path=store_path, api_token=API_TOKEN, state=ServerState(), metrics=Metrics(),
        sender=sender, journal=journal, overdue_after=60.0, keep_body="full"))


def served_routes(app: QuartTrio) -> set[tuple[str, str]]:
    """(path, method) of every route the daemon serves, in OpenAPI's `{name}` form."""
    quart = {(re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", rule.rule), method)
             for rule in app.url_map.iter_rules() for method in rule.methods or ()
             if method in METHODS}
    return quart | {(path, "POST") for path in webhooks.ROUTES}


def test_every_route_served_is_documented_and_nothing_else(tmp_path: Path) -> None:
    """The app's routes and methods (Quart's url_map plus the webhooks) are the document's."""
    served, documented = served_routes(the_app(str(tmp_path / "x.db"))), documented_routes(CONTRACT)
    assert served - documented == set(), "served but not documented"
    assert documented - served == set(), "documented but not served"


async def test_the_running_daemon_routes_as_documented(ledger: Ledger) -> None:
    """On the running daemon (one process, two fronts), every documented path answers its
    documented methods with one of their documented statuses, and the other methods with
    405, `Allow` and the error body."""
    statuses = documented_statuses(CONTRACT)
    with trio.fail_after(20):
        served = json.loads((await ledger.client.get(openapi.PATH)).content)
        assert served == CONTRACT  # the packaged file, as served
        for path, methods in _by_path(documented_routes(served)).items():
            concrete = path.replace("{key}", "no-such-key").replace("{run_id}", UNKNOWN_RUN)
            for method in sorted(METHODS):
                response = await ledger.client.request(method, concrete, headers=BEARER)
                if method in methods:
                    assert (method, path, response.status_code) in statuses, response.text
                elif path != "/v1/messages/register" or method != "GET":  # its {key} twin
                    assert response.status_code == 405, (method, path, response.status_code)
                    assert response.headers["allow"] and response.json().keys() == {"error"}


def _by_path(routes: set[tuple[str, str]]) -> dict[str, set[str]]:
    paths: dict[str, set[str]] = {}
    for path, method in routes:
        paths.setdefault(path, set()).add(method)
    return paths


# ------------------------------------------------------------------ status codes


@dataclass
class Scene:
    """A running daemon sending through the simulator: what each witness talks to."""

    ledger: Ledger
    sim: Simulator
    sid: str = dataclasses.field(default_factory=new_sid)  # the SID registered by witnesses
    run_id: str = UNKNOWN_RUN  # the reconcile run a witness started
    mms: str = "MM" + "0" * 32  # the inbound message whose media a witness had kept

    async def send(self, *, token: bool = True, **fields: str) -> httpx.Response:
        body = {"to": "+15558675310", "from": "+15005550006", "body": "hello", **fields}
        return await self.ledger.client.post("/v1/messages", json=body,
                                             headers=BEARER if token else {})

    async def register(self, **fields: str) -> httpx.Response:
        body = {"sid": self.sid, "to": "+15558675310", "from": "+15005550006",
                "status": "sent", **fields}
        return await self.ledger.client.post("/v1/messages/register", json=body,
                                             headers=BEARER)

    async def get(self, path: str, *, token: bool = True, **params: str) -> httpx.Response:
        return await self.ledger.client.get(path, params=params, headers=BEARER if token else {})

    async def post_raw(self, path: str, content: bytes,
                       headers: Mapping[str, str]) -> httpx.Response:
        return await self.ledger.client.post(path, content=content, headers=dict(headers))

    async def webhook(self, path: str, form: Mapping[str, str], *,
                      sign: bool = True) -> httpx.Response:
        signature = RequestValidator(AUTH_TOKEN).compute_signature(
            self.ledger.public_url + path, dict(form))
        headers = {**FORM, **({"X-Twilio-Signature": signature} if sign else {})}
        return await self.post_raw(path, urlencode(form).encode(), headers)

    def knobs(self, **changes: Any) -> None:
        self.sim.knobs = dataclasses.replace(self.sim.knobs, **changes)

    async def reconcile(self, **fields: object) -> httpx.Response:
        return await self.ledger.client.post("/v1/reconcile", json=fields, headers=BEARER)


Call = Callable[[Scene], Awaitable[httpx.Response]]
TOO_BIG = b'{"to": "' + b"x" * (70 * 1024) + b'"}'  # over /v1's 64 KiB and http.max_body_bytes
STATUS_FORM = {"MessageSid": "SM" + "a" * 32, "MessageStatus": "sent"}
INBOUND_FORM = {"MessageSid": "SM" + "e" * 32, "From": "+15558675310", "To": "+15005550006",
                "Body": "hello", "NumMedia": "0"}
ALERT_FORM = {"Sid": "NO" + "a" * 32, "Payload": '{"resource_sid": "SM' + "a" * 32 + '"}'}


def _day(days_from_today: int) -> str:
    return (dt.datetime.now(dt.UTC).date() + dt.timedelta(days=days_from_today)).isoformat()


async def _reconcile_started(scene: Scene) -> httpx.Response:
    response = await scene.reconcile(date=_day(0), source="list")
    scene.run_id = response.json().get("run_id", UNKNOWN_RUN)
    return response


async def _media_kept(scene: Scene) -> httpx.Response:
    """A simulated MMS received, and its file once the fetcher has kept it."""
    scene.knobs(inbound_url=scene.ledger.public_url + "/twilio/inbound")
    report = await scene.sim.receive_inbound(NewInbound(
        "+15558675310", "+15005550006", "a picture", media=(("image/png", b"\x89PNG..."),)))
    scene.mms = report.sid
    while True:
        response = await scene.get(f"/v1/messages/{scene.mms}/media/0")
        if response.status_code == 200:
            return response
        await trio.sleep(0.05)


async def _unknown_outcome(scene: Scene) -> httpx.Response:
    scene.knobs(lose_create_response=1.0)
    try:
        return await scene.send(ref="w-unknown")
    finally:
        scene.knobs(lose_create_response=0.0)


def _webhook_witnesses(path: str, form: dict[str, str], required: str) -> dict[int, Call]:
    missing = {k: v for k, v in form.items() if k != required}
    return {
        200: lambda s: s.webhook(path, form),
        400: lambda s: s.webhook(path, missing),
        403: lambda s: s.webhook(path, form, sign=False),
        413: lambda s: s.post_raw(path, TOO_BIG, FORM),
        415: lambda s: s.post_raw(path, json.dumps(form).encode(),
                                  {"Content-Type": "application/json"}),
    }


# Each documented (method, path, status) and a request that gets it, in order: a 409 needs
# what a 201 made. The 503s come last, once the store is lost (`_lose_the_store`).
WITNESSES: dict[tuple[str, str], dict[int, Call]] = {
    ("POST", "/v1/messages"): {
        201: lambda s: s.send(ref="w-sent"),
        202: _unknown_outcome,
        422: lambda s: s.send(to="not-a-number", ref="w-refused"),
        409: lambda s: s.send(ref="w-sent"),
        400: lambda s: s.send(colour="red"),
        401: lambda s: s.send(token=False),
        413: lambda s: s.post_raw("/v1/messages", TOO_BIG, BEARER),
    },
    ("POST", "/v1/messages/register"): {
        201: lambda s: s.register(ref="w-registered"),
        200: lambda s: s.register(ref="w-registered"),
        409: lambda s: s.register(status="delivered"),
        400: lambda s: s.register(sid="SM-not-a-sid"),
        401: lambda s: s.post_raw("/v1/messages/register", b"{}", {}),
        413: lambda s: s.post_raw("/v1/messages/register", TOO_BIG, BEARER),
    },
    ("GET", "/v1/messages/{key}"): {
        200: lambda s: s.get("/v1/messages/w-sent"),
        401: lambda s: s.get("/v1/messages/w-sent", token=False),
        404: lambda s: s.get("/v1/messages/w-never"),
    },
    ("GET", "/v1/messages/{key}/media/{n}"): {
        200: _media_kept,
        400: lambda s: s.get(f"/v1/messages/{s.mms}/media/first"),
        401: lambda s: s.get(f"/v1/messages/{s.mms}/media/0", token=False),
        404: lambda s: s.get(f"/v1/messages/{s.mms}/media/1"),
    },
    ("GET", "/v1/messages"): {
        200: lambda s: s.get("/v1/messages", limit="2", overdue="false"),
        400: lambda s: s.get("/v1/messages", limit="0"),
        401: lambda s: s.get("/v1/messages", token=False),
    },
    ("POST", "/v1/reconcile"): {
        202: _reconcile_started,
        400: lambda s: s.reconcile(date=_day(1)),
        401: lambda s: s.post_raw("/v1/reconcile", b"{}", {}),
        413: lambda s: s.post_raw("/v1/reconcile", TOO_BIG, BEARER),
    },
    ("GET", "/v1/reconcile/runs/{run_id}"): {
        200: lambda s: s.get(f"/v1/reconcile/runs/{s.run_id}"),
        401: lambda s: s.get(f"/v1/reconcile/runs/{s.run_id}", token=False),
        404: lambda s: s.get(f"/v1/reconcile/runs/{UNKNOWN_RUN}"),
    },
    ("GET", "/v1/reconcile/runs"): {
        200: lambda s: s.get("/v1/reconcile/runs", limit="5"),
        400: lambda s: s.get("/v1/reconcile/runs", limit="101"),
        401: lambda s: s.get("/v1/reconcile/runs", token=False),
    },
    ("GET", "/v1/openapi.json"): {200: lambda s: s.get(openapi.PATH, token=False)},
    ("GET", "/healthz"): {200: lambda s: s.get("/healthz", token=False)},
    ("GET", "/metrics"): {200: lambda s: s.get("/metrics", token=False)},
    ("POST", "/twilio/status"): _webhook_witnesses("/twilio/status", STATUS_FORM,
                                                   "MessageStatus"),
    ("POST", "/twilio/inbound"): _webhook_witnesses("/twilio/inbound", INBOUND_FORM,
                                                    "MessageSid"),
    ("POST", "/twilio/debugger"): _webhook_witnesses("/twilio/debugger", ALERT_FORM, "Sid"),
}
WITNESSES_ONCE_LOST: dict[tuple[str, str], dict[int, Call]] = {
    ("POST", "/twilio/status"): {503: lambda s: s.webhook("/twilio/status", STATUS_FORM)},
    ("POST", "/twilio/debugger"): {503: lambda s: s.webhook("/twilio/debugger", ALERT_FORM)},
    ("POST", "/twilio/inbound"): {503: lambda s: s.webhook("/twilio/inbound", INBOUND_FORM)},
    ("POST", "/v1/messages"): {503: lambda s: s.send(ref="w-lost")},
    ("POST", "/v1/messages/register"): {503: lambda s: s.register(sid=new_sid())},
    ("GET", "/healthz"): {503: lambda s: _until_status(s, "/healthz", 503)},
    ("GET", "/v1/messages/{key}"): {503: lambda s: s.get("/v1/messages/w-sent")},
    ("GET", "/v1/messages"): {503: lambda s: s.get("/v1/messages")},
    ("GET", "/v1/messages/{key}/media/{n}"): {
        503: lambda s: s.get(f"/v1/messages/{s.mms}/media/0")},
    # Another day than the witness run's: asking for that one again would answer with it.
    ("POST", "/v1/reconcile"): {503: lambda s: s.reconcile(date=_day(-1), source="list")},
    ("GET", "/v1/reconcile/runs/{run_id}"): {
        503: lambda s: s.get(f"/v1/reconcile/runs/{UNKNOWN_RUN}")},
    ("GET", "/v1/reconcile/runs"): {503: lambda s: s.get("/v1/reconcile/runs")},
}


async def _until_status(scene: Scene, path: str, status: int) -> httpx.Response:
    """GET `path` until it answers `status`: fronts hear of the store's health a moment
    after the main process does."""
    while True:
        response = await scene.get(path, token=False)
        if response.status_code == status:
            return response
        await trio.sleep(0.05)


async def _lose_the_store(scene: Scene) -> None:
    """Delete the store under the running daemon, then wait until a commit has noticed:
    from then on every callback and send is 503, and so is /healthz. The witnesses' reconcile
    run ends first: what a run that loses its store does is another test's
    (tests/test_reconcile_api.py)."""
    while True:
        run = (await scene.get(f"/v1/reconcile/runs/{scene.run_id}")).json()
        if run["status"] not in ("running", "waiting_for_export"):
            break
        await trio.sleep(0.01)
    scene.ledger.store_path.unlink()
    while True:
        answer = await scene.webhook("/twilio/status", {**STATUS_FORM, "MessageSid": new_sid()})
        if answer.status_code == 503:
            return
        await trio.sleep(0.01)


def _witnessed() -> set[tuple[str, str, int]]:
    return {(method, path, status) for table in (WITNESSES, WITNESSES_ONCE_LOST)
            for (method, path), calls in table.items() for status in calls}


def test_every_documented_status_has_a_witness_and_no_other() -> None:
    """Each status the document lists for an operation has a witness below, and there is
    no witness of a status the document does not list."""
    assert documented_statuses(CONTRACT) - _witnessed() == set(), "documented, never produced"
    assert _witnessed() - documented_statuses(CONTRACT) == set(), "produced, not documented"


@asynccontextmanager
async def sim_and_ledger(tmp_path: Path, workers: str) -> AsyncIterator[Scene]:
    """The simulator playing Twilio (every message delivered), and a daemon sending to it."""
    knobs = SimKnobs(ACCOUNT_SID, AUTH_TOKEN, step_delay=(0.001, 0.005), seed=7,
                     outcome_weights=OutcomeWeights(delivered=1, undelivered=0, failed=0))
    async with trio.open_nursery() as nursery:
        sim = await nursery.start(partial(serve_sim, knobs))
        environ = daemon_environ(tmp_path / "witness.db", MSGLEDGER_HTTP_WORKERS=workers,
                                 MSGLEDGER_TWILIO_ACCOUNT_SID=ACCOUNT_SID,
                                 MSGLEDGER_TWILIO_API_BASE_URL=sim.base_url)
        async with open_ledger(environ) as ledger:
            yield Scene(ledger, sim)
        nursery.cancel_scope.cancel()


async def test_every_documented_status_is_produced(tmp_path: Path, workers: str) -> None:
    """Every witness gets its status from the running daemon (one process, two fronts),
    with a body that matches what the document says of that status."""
    with trio.fail_after(40):
        async with sim_and_ledger(tmp_path, workers) as scene:
            schema = schemathesis.openapi.from_dict((await scene.get(openapi.PATH)).json())
            answered = await _witness(scene, schema, WITNESSES)
            await _lose_the_store(scene)
            answered |= await _witness(scene, schema, WITNESSES_ONCE_LOST)
    assert answered == _witnessed()


async def _witness(scene: Scene, schema: Any, table: dict[tuple[str, str], dict[int, Call]]
                   ) -> set[tuple[str, str, int]]:
    answered: set[tuple[str, str, int]] = set()
    for (method, path), calls in table.items():
        for status, call in calls.items():
            response = await call(scene)
            assert response.status_code == status, (method, path, response.text[:300])
            schema[path][method].validate_response(response)  # raises if it does not match
            answered.add((method, path, response.status_code))
    return answered


# ------------------------------------------------------------------ the fuzz


@dataclass
class Child:
    """`msgledger run` as a child process, sending to a Twilio that refuses connections."""

    process: subprocess.Popen[bytes]
    url: str
    store_path: Path
    log_path: Path
    answered: Counter[tuple[str, int]] = dataclasses.field(default_factory=Counter)


@contextlib.contextmanager
def child_daemon(tmp: Path, workers: str) -> Iterator[Child]:
    """A child daemon on 127.0.0.1:0 for the duration; stopped with SIGTERM, which must end
    it cleanly (exit 0), its store verifying and its log free of errors."""
    with socket.socket() as twilio:  # bound, never listening: every send is refused (422)
        twilio.bind(("127.0.0.1", 0))
        env = child_env(tmp / "contract.db", MSGLEDGER_HTTP_WORKERS=workers,
                        MSGLEDGER_TWILIO_ACCOUNT_SID=ACCOUNT_SID,
                        MSGLEDGER_TWILIO_API_BASE_URL=f"http://127.0.0.1:{twilio.getsockname()[1]}",
                        MSGLEDGER_TWILIO_RETRY_BACKOFF="1ms")
        log_path = tmp / "daemon.log"
        with open(log_path, "wb") as log:  # a file, not a pipe a full buffer would block
            process = subprocess.Popen([sys.executable, "-m", "msgledger", "run"], env=env,
                                       stdout=log, stderr=subprocess.STDOUT)
        try:
            yield Child(process, _ready_url(log_path, process), tmp / "contract.db", log_path)
        finally:
            process.send_signal(signal.SIGTERM)
            code = process.wait(30)
    assert code == 0, error_lines(log_path)
    assert store.verify(str(tmp / "contract.db")).ok
    assert error_lines(log_path) == []


def _ready_url(log_path: Path, process: subprocess.Popen[bytes]) -> str:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        assert process.poll() is None, log_path.read_text(errors="replace")[-2000:]
        for raw in log_path.read_bytes().splitlines():
            if raw.startswith(b"{") and b'"daemon_ready"' in raw:
                return str(json.loads(raw)["url"])
        time.sleep(0.05)
    raise AssertionError("the daemon did not start in time")


@pytest.fixture(scope="module", params=["1", "2"], ids=["one-process", "two-fronts"])
def fuzzed(request: pytest.FixtureRequest,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[Child]:
    """A child daemon for the module's fuzz, serving exactly the document fuzzed: its own
    `/v1/openapi.json`, asked for without a token."""
    with child_daemon(tmp_path_factory.mktemp(f"contract-{request.param}"),
                      request.param) as child:
        served = schemathesis.openapi.from_url(child.url + openapi.PATH)
        assert served.raw_schema == CONTRACT
        yield child
        print(f"\nschemathesis (workers={request.param}):", sum(child.answered.values()),
              "cases;", dict(sorted(child.answered.items())))
        webhook_statuses = {status for label, status in child.answered if "twilio" in label}
        # signed cases reached the handler (200, 400), unsigned ones were refused (403)
        assert not webhook_statuses or webhook_statuses >= {200, 400, 403}


# The cases come from the packaged document, which `fuzzed` checks the daemon serves: the
# lazy loader (`schemathesis.pytest.from_fixture`) breaks on pytest 9.2 (no `_nodeid`).
contract = schemathesis.openapi.from_dict(CONTRACT, config=schemathesis.Config.from_str(CONFIG))


@contract.parametrize()
@settings(max_examples=EXAMPLES, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
def test_the_daemon_keeps_its_contract(case: schemathesis.Case[Any], fuzzed: Child) -> None:
    """Whatever schemathesis sends from the document, the daemon's answers are documented."""
    sign(case, fuzzed.url)
    response = case.call_and_validate(base_url=fuzzed.url)
    fuzzed.answered[case.operation.label, response.status_code] += 1


def sign(case: schemathesis.Case[Any], base_url: str) -> None:
    """Sign a webhook case that carries a signature header, over the URL and form exactly as
    they will be sent, so it gets past the check into the handler and the journal."""
    if case.operation.path not in webhooks.ROUTES or "X-Twilio-Signature" not in (
            case.headers or {}):
        return
    sent = requests.Request(**case.as_transport_kwargs(base_url=base_url)).prepare()
    body = sent.body.decode("latin-1") if isinstance(sent.body, bytes) else str(sent.body or "")
    case.headers["X-Twilio-Signature"] = RequestValidator(AUTH_TOKEN).compute_signature(
        str(sent.url), dict(parse_qsl(body, keep_blank_values=True)))


HOOKS = "tests.test_openapi"  # this module, as `st run` imports it for `make fuzz`
if os.environ.get("SCHEMATHESIS_HOOKS") == HOOKS:
    @schemathesis.hook
    def before_call(context: schemathesis.HookContext, case: schemathesis.Case[Any],
                    kwargs: dict[str, Any]) -> None:
        sign(case, case.operation.base_url)


# ------------------------------------------------------------------ make fuzz


def fuzz(seconds: int) -> int:
    """The schemathesis CLI against a fresh daemon, one process and then two fronts, for
    `seconds` in all; this module's hook signs webhooks. 0 only if both runs pass."""
    codes = []
    for workers in ("1", "2"):
        with tempfile.TemporaryDirectory() as tmp, child_daemon(Path(tmp), workers) as child:
            config = Path(tmp) / "schemathesis.toml"
            config.write_text(CONFIG)
            codes.append(subprocess.call(
                [str(Path(sys.executable).with_name("st")), "--config-file", str(config), "run",
                 child.url + openapi.PATH, "--max-time", str(seconds // 2), "--no-color"],
                cwd=ROOT, env={**os.environ, "SCHEMATHESIS_HOOKS": HOOKS, "PYTHONPATH": ROOT}))
    return max(codes)


if __name__ == "__main__":
    sys.exit(fuzz(int(sys.argv[1]) if len(sys.argv) > 1 else 600))
