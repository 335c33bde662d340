"""The Bulk Export API over HTTP, on the simulator's own base URL, and its files' storage.

Routes (docs/twilio.md, "Bulk Export"), behind the Messages API's Basic auth, latency and 429
knobs; only the Messages resource type is simulated (others answer 404):
POST /v1/Exports/Messages/Jobs (create a custom job), GET /v1/Exports/Messages/Jobs (the
custom jobs), GET /v1/Exports/Jobs/{JobSid} (one job), GET /v1/Exports/Messages/Days (the
days that have a file, paged by `meta.next_page_url`), GET /v1/Exports/Messages/Days/{Day}
(307 to a fresh one-time link). And, like a signed storage URL, with no auth:
GET /_export_files/{token} (the gzip file; 403 once used or expired).

Refusals use the Messages API's error JSON. Their codes are our stand-ins (20001 for a bad
parameter): Twilio does not document which codes Bulk Export answers.
"""

from __future__ import annotations

import bisect
import re
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from datetime import date, datetime, timedelta
from urllib.parse import urlencode

import trio

from ._exports import COMPLETED, DAYS_PER_UTC_DAY, DayFile, ExportJob, JobRequest
from ._http import Response
from ._listing import parse_int
from ._simulator import Simulator
from ._store import utcnow
from ._wire import ApiError, json_reply, not_found

EXPORTS_PREFIX = "/v1/Exports"
FILES_PREFIX = "/_export_files/"
RESOURCE_TYPE = "Messages"
DEFAULT_PAGE_SIZE = 50  # Twilio's, for the Days list (twilio-python's DayList.page)
MAX_PAGE_SIZE = 400  # Twilio's maximum for the Days list; larger requests are clamped
EXPORTABLE_AFTER = timedelta(days=2)  # EndDay "must be 2 days earlier than the current UTC day"
_DAY = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")
_ACCESS_DENIED = b"<Error><Code>AccessDenied</Code></Error>"  # as a storage service says it

Handler = Callable[[Simulator, re.Match[str], Mapping[str, str]], Response]


def is_download(target: str) -> bool:
    return target.startswith(FILES_PREFIX)


def is_export(path: str) -> bool:
    return path == EXPORTS_PREFIX or path.startswith(EXPORTS_PREFIX + "/")


def route_exports(sim: Simulator, method: str, path: str, params: Mapping[str, str]) -> Response:
    """Answer one authenticated export request; jobs due by now complete first."""
    sim.exports.settle(sim.messages.values(), sim.knobs)
    for pattern, handlers in _ROUTES:
        match = pattern.fullmatch(path)
        if match is None:
            continue
        if match.groupdict().get("resource", RESOURCE_TYPE) != RESOURCE_TYPE:
            break
        if method not in handlers:
            raise ApiError(405, 20004, "Method not allowed")
        return handlers[method](sim, match, params)
    raise not_found(path)


def download(sim: Simulator, method: str, target: str) -> Response:
    """GET a one-time link: the file, whole or (by `fail_downloads`) cut off half-way."""
    if method != "GET":
        return Response(405, b"", (("Allow", "GET"),))
    file = sim.exports.take(target.partition("?")[0].removeprefix(FILES_PREFIX))
    if file is None:
        sim.stats.export_links_refused += 1
        return Response(403, _ACCESS_DENIED, (("Content-Type", "application/xml"),))
    sim.stats.export_downloads += 1
    headers = (("Content-Type", "application/octet-stream"),)
    if sim.exports.cuts_download():
        sim.stats.export_downloads_failed += 1
        return Response(200, file.data, headers, cut_after=len(file.data) // 2)
    return Response(200, file.data, headers)


def _create_job(sim: Simulator, match: re.Match[str], form: Mapping[str, str]) -> Response:
    job = sim.exports.create(parse_job_request(form, utcnow().date()), sim.knobs)
    if job is None:
        raise ApiError(400, 20001, f"More than {DAYS_PER_UTC_DAY} days requested today")
    sim.stats.export_jobs_created += 1
    return json_reply(201, _job_json(sim, job, job.created_at))  # as it was just created


def _list_jobs(sim: Simulator, match: re.Match[str], params: Mapping[str, str]) -> Response:
    now = trio.current_time()
    keyed = [(f"{n:09d}", _job_json(sim, job, now)) for n, job in enumerate(sim.exports.jobs())]
    return json_reply(200, _page(sim, match.string, "jobs", keyed, params))


def _fetch_job(sim: Simulator, match: re.Match[str], params: Mapping[str, str]) -> Response:
    job = sim.exports.job(match["sid"])
    if job is None:
        raise not_found(match.string)
    return json_reply(200, _job_json(sim, job, trio.current_time()))


def _list_days(sim: Simulator, match: re.Match[str], params: Mapping[str, str]) -> Response:
    keyed = [(file.day.isoformat(), _day_json(file)) for file in sim.exports.files()]
    return json_reply(200, _page(sim, match.string, "days", keyed, params))


def _fetch_day(sim: Simulator, match: re.Match[str], params: Mapping[str, str]) -> Response:
    """307 to a fresh one-time link to the day's file (the client does not follow it)."""
    sim.stats.export_day_fetches += 1
    day = _day_or_none(match["day"])
    file = None if day is None else sim.exports.file(day)
    if file is None:
        raise not_found(match.string)
    url = sim.base_url + FILES_PREFIX + sim.exports.open_link(file, sim.knobs.export_link_ttl)
    return json_reply(307, {"redirect_to": url}, (("Location", url),))


_ROUTES: tuple[tuple[re.Pattern[str], Mapping[str, Handler]], ...] = (
    (re.compile(r"/v1/Exports/Jobs/(?P<sid>[^/]+)"), {"GET": _fetch_job}),
    (re.compile(r"/v1/Exports/(?P<resource>[^/]+)/Jobs"), {"POST": _create_job, "GET": _list_jobs}),
    (re.compile(r"/v1/Exports/(?P<resource>[^/]+)/Days"), {"GET": _list_days}),
    (re.compile(r"/v1/Exports/(?P<resource>[^/]+)/Days/(?P<day>[^/]+)"), {"GET": _fetch_day}),
)


def parse_job_request(form: Mapping[str, str], today: date) -> JobRequest:
    """Validate a custom job's form, refusing what Twilio refuses; other fields are ignored."""
    name = form.get("FriendlyName", "")
    start, end = _day_param(form, "StartDay"), _day_param(form, "EndDay")
    if not name:
        raise ApiError(400, 20001, "Missing required parameter FriendlyName in the post body")
    if start > end:
        raise ApiError(400, 20001, "StartDay must not be after EndDay")
    if end > today - EXPORTABLE_AFTER:
        raise ApiError(400, 20001, "EndDay must be 2 days earlier than the current UTC day")
    return JobRequest(name, start, end, form.get("WebhookUrl") or None,
                      form.get("WebhookMethod") or None, form.get("Email") or None)


def _day_param(form: Mapping[str, str], key: str) -> date:
    value = form.get(key, "")
    day = _day_or_none(value)
    if day is None:
        raise ApiError(400, 20001, f"Invalid {key}: {value!r}, expected YYYY-MM-DD")
    return day


def _day_or_none(text: str) -> date | None:
    if not _DAY.fullmatch(text):
        return None
    try:
        return date.fromisoformat(text)
    except ValueError:
        return None  # such as 2024-02-30


def _job_json(sim: Simulator, job: ExportJob, now: float) -> dict[str, object]:
    """A job as it stands at Trio time `now`, as create, fetch and the jobs list show it
    (the fields of twilio-python's ExportCustomJobInstance and JobInstance)."""
    request = job.request
    return {
        "resource_type": RESOURCE_TYPE,
        "friendly_name": request.friendly_name,
        "start_day": request.start_day.isoformat(),
        "end_day": request.end_day.isoformat(),
        "webhook_url": request.webhook_url,
        "webhook_method": request.webhook_method,
        "email": request.email,
        "job_sid": job.sid,
        "url": f"{sim.base_url}{EXPORTS_PREFIX}/Jobs/{job.sid}",
        "details": _details(job, now, upper=sim.knobs.export_status_upper),
        "job_queue_position": "1" if _status(job, now) == "Submitted" else "0",
        "estimated_completion_time": _iso(_completion(job, now)),
    }


def _details(job: ExportJob, now: float, *, upper: bool) -> list[dict[str, object]]:
    """The job's days grouped by status: [{status, count, days}]."""
    grouped: defaultdict[str, list[date]] = defaultdict(list)
    if job.outcomes is None:
        grouped[_status(job, now)] = list(job.request.days)
    else:
        for day, outcome in job.outcomes.items():
            grouped[outcome].append(day)
    return [{"status": status.upper() if upper else status, "count": len(days),
             "days": [day.isoformat() for day in days]} for status, days in grouped.items()]


def _status(job: ExportJob, now: float) -> str:
    """Before completion: Submitted for the first half of the delay (and when just created,
    even with no delay), then Running."""
    if job.outcomes is not None:
        return COMPLETED
    half_way = (job.created_at + job.due_at) / 2
    return "Running" if now >= half_way and now > job.created_at else "Submitted"


def _completion(job: ExportJob, now: float) -> datetime:
    if job.completed_on is not None:
        return job.completed_on
    return utcnow() + timedelta(seconds=max(job.due_at - now, 0.0))


def _day_json(file: DayFile) -> dict[str, object]:
    return {"day": file.day.isoformat(), "size": len(file.data),
            "create_date": file.create_date.isoformat(), "friendly_name": file.friendly_name,
            "resource_type": RESOURCE_TYPE}


def _page(sim: Simulator, path: str, key: str, keyed: Sequence[tuple[str, dict[str, object]]],
          params: Mapping[str, str]) -> dict[str, object]:
    """One page of `keyed` (sorted by key) in the v1 envelope: `meta` with absolute URLs."""
    size = min(parse_int(params, "PageSize", DEFAULT_PAGE_SIZE, minimum=1), MAX_PAGE_SIZE)
    page, token = parse_int(params, "Page", 0, minimum=0), params.get("PageToken")
    start, stop = _window([k for k, _ in keyed], size, token)
    items = keyed[start:stop]

    def url(number: int, cursor: str | None) -> str:
        query = [("PageSize", str(size)), ("Page", str(number))]
        query += [("PageToken", cursor)] if cursor else []
        return f"{sim.base_url}{path}?{urlencode(query)}"

    first, last = (items[0][0], items[-1][0]) if items else ("", "")
    before, beyond = bool(items) and start > 0, bool(items) and stop < len(keyed)
    return {key: [item for _, item in items], "meta": {
        "page": page,
        "page_size": size,
        "first_page_url": url(0, None),
        "previous_page_url": url(page - 1, "PB" + first.encode().hex()) if before else None,
        "url": url(page, token),
        "next_page_url": url(page + 1, "PA" + last.encode().hex()) if beyond else None,
        "key": key,
    }}


def _window(keys: Sequence[str], size: int, token: str | None) -> tuple[int, int]:
    """Keyset paging, like the Messages list: PageToken `PA` (or `PB`) + the hex of the key
    the page starts after (or ends before); `Page` is only the client's count."""
    if not token:
        return 0, size
    after, anchor = _parse_token(token)
    if after:
        start = bisect.bisect_right(keys, anchor)
        return start, start + size
    stop = bisect.bisect_left(keys, anchor)
    return max(0, stop - size), stop


def _parse_token(token: str) -> tuple[bool, str]:
    try:
        if token[:2] not in ("PA", "PB"):
            raise ValueError(token)
        return token[:2] == "PA", bytes.fromhex(token[2:]).decode()
    except ValueError:
        raise ApiError(400, 20001, f"Invalid PageToken: {token}") from None


def _iso(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")
