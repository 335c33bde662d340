"""Configuration: built-in defaults, then a TOML file, then the environment.

Every key `[section] key` can be overridden by `MSGLEDGER_<SECTION>_<KEY>`; the twilio
library's own `TWILIO_ACCOUNT_SID` and `TWILIO_AUTH_TOKEN` override the file too, and the
MSGLEDGER_ form wins over them. Anything wrong stops start-up with a `ConfigError` naming
the key: a daemon that starts with a bad configuration refuses callbacks quietly, which is
worse than not starting.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import SplitResult, urlsplit

ENV_PREFIX = "MSGLEDGER_"


class ConfigError(Exception):
    """A configuration value is missing, unknown or malformed; the message names the key."""


@dataclass(frozen=True)
class Settings:
    """Everything the daemon reads from its configuration, parsed and checked. Each
    attribute is named `<section>_<key>` after its key, as its environment variable is
    (`MSGLEDGER_HTTP_ACK_TIMEOUT` is `http_ack_timeout`); `http.listen` is two of them."""

    http_listen_host: str
    http_listen_port: int
    http_public_url: str | None  # scheme://host[:port][/prefix]; None: http://<the address bound>
    http_max_body_bytes: int
    http_ack_timeout: float  # seconds
    http_graceful_timeout: float  # seconds
    http_webhooks: bool
    http_workers: int  # processes serving HTTP: 1 is the main one, more are that many fronts
    http_read_timeout: float  # seconds a request body may take to arrive in full
    http_admin_listen: str | None  # host:port or unix socket path for /v1 and /metrics
    http_trusted_proxies: tuple[str, ...]  # CIDRs whose X-Forwarded-For / Forwarded count
    store_path: str
    store_checkpoint_interval: float  # seconds between journal_checkpoint lines
    store_keep_body: str  # "full" | "hash" | "none"
    store_keep_media: str  # "full" | "hash" | "none"
    store_max_media_bytes: int  # a media file over this is hashed, flagged, not kept
    twilio_account_sid: str | None
    twilio_auth_token: str | None
    twilio_api_base_url: str
    twilio_bulkexports_base_url: str
    twilio_concurrency: int
    twilio_timeout: float
    twilio_retry_backoff: float
    api_token: str | None
    poller_overdue_after: float
    poller_interval: float
    poller_concurrency: int
    poller_give_up_after: float
    reconciler_daily_at: str  # UTC HH:MM
    reconciler_lookback_days: int
    reconciler_match_window: float  # seconds
    reconciler_source: str  # "auto" | "list" | "export"
    reconciler_export_over: int  # messages a day; with auto, more uses Bulk Export
    reconciler_export_poll_interval: float  # seconds
    inbound_forward_url: str | None  # the firm's app, given each inbound message once journaled
    inbound_forward_timeout: float  # seconds the app has to answer
    log_level: str
    log_access: bool  # one line per /v1, /metrics and /healthz request

    @property
    def public_prefix(self) -> str:
        """The path of `http_public_url` ("/ledger"), under which every route also
        answers; "" when it has none."""
        return urlsplit(self.http_public_url).path if self.http_public_url else ""


# --- value parsers: each takes the raw TOML or environment value and returns the parsed one.

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(raw: object) -> float:
    """`"12h"`, `"5m"`, `"2s"`, `"250ms"` or `"1h30m"` into seconds."""
    text = str(raw).strip()
    parts = _DURATION_PART.findall(text)
    if not text or "".join(n + u for n, u in parts) != text:
        raise ValueError(f"expected a duration such as '12h', '5m', '2s', got {raw!r}")
    return sum(float(n) * _UNIT_SECONDS[u] for n, u in parts)


def parse_positive_duration(raw: object) -> float:
    """A duration that must not be zero: a zero ack timeout refuses every callback."""
    seconds = parse_duration(raw)
    if seconds <= 0:
        raise ValueError(f"expected a duration above zero, got {raw!r}")
    return seconds


def parse_listen(raw: object) -> tuple[str, int]:
    host, sep, port = str(raw).rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"expected host:port, got {raw!r}")
    return host.strip("[]"), int(port)


# A path prefix: segments of URL-safe characters (percent-escapes too), no "." or "..".
_PREFIX = re.compile(r"(/(?!\.\.?(/|$))[A-Za-z0-9._~!$&'()*+,;=:@%-]+)*")


def parse_url(raw: object) -> str:
    """scheme://host[:port], without a trailing slash."""
    text = parse_public_url(raw)
    if urlsplit(text).path:
        raise ValueError(f"expected no path, got {raw!r}")
    return text


def parse_public_url(raw: object) -> str:
    """scheme://host[:port][/prefix], without a trailing slash: the URL Twilio is given."""
    text = str(raw).rstrip("/")
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"expected scheme://host[:port][/prefix], got {raw!r}")
    if parts.query or parts.fragment or "?" in text or "#" in text:
        raise ValueError(f"expected no query or fragment, got {raw!r}")
    if not _PREFIX.fullmatch(parts.path):
        raise ValueError(f"expected a path prefix such as /ledger, got {parts.path!r}")
    if parts.path.split("/")[1:2] in (["twilio"], ["v1"], ["metrics"], ["healthz"]):
        # Routes answer at the root too: a prefix spelled like one could not be told apart.
        raise ValueError(f"expected a prefix that does not begin like a route, got {parts.path!r}")
    _check_authority(parts, raw)  # Twilio signs without a user; it would land in every event
    return text


def _check_authority(parts: SplitResult, raw: object) -> None:
    """ValueError for a URL with user:password@, or a port outside 0 to 65535."""
    if "@" in parts.netloc:
        raise ValueError(f"expected no user:password@ in the URL, got {_redacted(parts)!r}")
    try:
        parts.port  # noqa: B018 -- urlsplit checks the port only when it is read
    except ValueError:
        raise ValueError(f"expected a port from 0 to 65535, got {raw!r}") from None


def _redacted(parts: SplitResult) -> str:
    host = parts.netloc.rpartition("@")[2]
    return parts._replace(netloc=f"***@{host}").geturl()


def parse_admin_listen(raw: object) -> str:
    """host:port, or the absolute path of a unix socket (hypercorn's `unix:` bind)."""
    text = _text(raw)
    if text.startswith("/"):
        if "\0" in text:
            raise ValueError("expected a socket path, got a NUL character")
        return text
    try:
        host, port = parse_listen(text)
    except ValueError:
        raise ValueError(f"expected host:port or the absolute path of a unix socket,"
                         f" got {raw!r}") from None
    return f"{host}:{port}"


def parse_cidrs(raw: object) -> tuple[str, ...]:
    """A list of CIDRs (a TOML array, or commas in the environment), each normalised."""
    items = [i for i in raw.split(",") if i.strip()] if isinstance(raw, str) else raw
    if not isinstance(items, list | tuple):
        raise ValueError(f"expected a list of CIDRs, got {raw!r}")
    networks = []
    for item in items:
        try:
            networks.append(str(ipaddress.ip_network(str(item).strip())))
        except ValueError as error:  # "has host bits set" says which address was meant
            raise ValueError(f"expected CIDRs such as 10.0.0.0/8 or ::1/128, got {item!r}"
                             f" ({error})") from None
    return tuple(networks)


def parse_bool(raw: object) -> bool:
    if isinstance(raw, bool):
        return raw
    text = str(raw).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true or false, got {raw!r}")


def parse_positive_int(raw: object) -> int:
    if isinstance(raw, bool) or not str(raw).strip().isdigit() or int(str(raw)) < 1:
        raise ValueError(f"expected a positive whole number, got {raw!r}")
    return int(str(raw))


def parse_non_negative_int(raw: object) -> int:
    if isinstance(raw, bool) or not str(raw).strip().isdigit():
        raise ValueError(f"expected a whole number, 0 or more, got {raw!r}")
    return int(str(raw))


MAX_WORKERS = 64  # front processes; far past any core count this daemon is sized for


def parse_workers(raw: object) -> int:
    workers = parse_positive_int(raw)
    if workers > MAX_WORKERS:
        raise ValueError(f"expected at most {MAX_WORKERS}, got {raw!r}")
    return workers


def parse_store_path(raw: object) -> str:
    """A file name, taken as a path and nothing else: SQLite reads `:memory:` (and, in a
    URI, `?mode=memory`) as "keep nothing on disk", which would acknowledge every callback
    and keep none."""
    path = _text(raw)
    if path == ":memory:" or path.startswith("file:"):
        raise ValueError(f"expected the path of a file, got {raw!r}")
    if "\0" in path:
        raise ValueError("expected the path of a file, got a NUL character")
    return path


def parse_forward_url(raw: object) -> str:
    """http(s)://host[:port][/path][?query]: the firm's app, as its own webhook URL reads."""
    text = _text(raw)
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"expected an http:// or https:// URL, got {raw!r}")
    if parts.fragment or "#" in text:
        raise ValueError(f"expected no #fragment, got {raw!r}")
    _check_authority(parts, raw)  # the request is signed instead; a user would land in logs
    return text


MAX_FORWARD_SECONDS = 14.0  # Twilio waits 15 s for the whole answer, connection included
TWILIO_WAITS = 15.0  # seconds Twilio waits for the answer to an inbound webhook
INBOUND_ANSWER_SLACK = 1.0  # the replies' journaling (inbound/answer.py), and the network


def parse_forward_timeout(raw: object) -> float:
    seconds = parse_positive_duration(raw)
    if seconds > MAX_FORWARD_SECONDS:
        raise ValueError(f"expected at most {MAX_FORWARD_SECONDS:g}s: Twilio gives up on the"
                         f" whole answer after 15 s, got {raw!r}")
    return seconds


def parse_daily_at(raw: object) -> str:
    text = str(raw)
    match = re.fullmatch(r"([01]\d|2[0-3]):([0-5]\d)", text)
    if not match:
        raise ValueError(f"expected UTC HH:MM, got {raw!r}")
    return text


def _one_of(*choices: str) -> Callable[[object], str]:
    def parse(raw: object) -> str:
        if str(raw) not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}, got {raw!r}")
        return str(raw)

    return parse


def _text(raw: object) -> str:
    if not isinstance(raw, str) or not raw:
        raise ValueError(f"expected a non-empty string, got {raw!r}")
    return raw


# section -> key -> (parser, default). None as a default means "not set".
SCHEMA: dict[str, dict[str, tuple[Callable[[object], Any], object]]] = {
    "http": {
        "listen": (parse_listen, "127.0.0.1:8080"),
        "public_url": (parse_public_url, None),  # default: http://<listen>
        "max_body_bytes": (parse_positive_int, 64 * 1024),
        "ack_timeout": (parse_positive_duration, "5s"),  # under Twilio's 15 s read timeout
        "graceful_timeout": (parse_duration, "10s"),
        "webhooks": (parse_bool, True),
        "workers": (parse_workers, 1),  # processes serving HTTP; the journal stays in one
        "read_timeout": (parse_positive_duration, "10s"),  # a body that stops arriving
        "admin_listen": (parse_admin_listen, None),  # None: /v1 and /metrics on listen
        "trusted_proxies": (parse_cidrs, []),
    },
    "store": {
        "path": (parse_store_path, "msgledger.db"),
        "checkpoint_interval": (parse_positive_duration, "1m"),
        "keep_body": (_one_of("full", "hash", "none"), "full"),
        "keep_media": (_one_of("full", "hash", "none"), "full"),
        "max_media_bytes": (parse_positive_int, 5 * 1024 * 1024),  # Twilio's MMS limit
    },
    "twilio": {
        "account_sid": (_text, None),
        "auth_token": (_text, None),
        "api_base_url": (parse_url, "https://api.twilio.com"),
        "bulkexports_base_url": (parse_url, "https://bulkexports.twilio.com"),
        "concurrency": (parse_positive_int, 10),  # API requests in flight
        "timeout": (parse_positive_duration, "15s"),  # per API request
        "retry_backoff": (parse_duration, "500ms"),  # first retry after a 429; doubles
    },
    "api": {"token": (_text, None)},
    "poller": {
        "overdue_after": (parse_positive_duration, "12h"),
        "interval": (parse_positive_duration, "5m"),
        "concurrency": (parse_positive_int, 4),  # fetches in flight at most
        "give_up_after": (parse_positive_duration, "7d"),
    },
    "reconciler": {
        "daily_at": (parse_daily_at, "03:30"),
        "lookback_days": (parse_positive_int, 2),
        "match_window": (parse_positive_duration, "10m"),
        "source": (_one_of("auto", "list", "export"), "auto"),
        "export_over": (parse_non_negative_int, 100_000),
        "export_poll_interval": (parse_positive_duration, "1m"),
    },
    "inbound": {
        "forward_url": (parse_forward_url, None),  # None: Twilio gets an empty <Response/>
        "forward_timeout": (parse_forward_timeout, "8s"),
    },
    "log": {"level": (_one_of("debug", "info", "warning", "error"), "info"),
            "access": (parse_bool, True)},
}

# The twilio library's own variables: above the file, below the MSGLEDGER_ form.
_TWILIO_ENV = {("twilio", "account_sid"): "TWILIO_ACCOUNT_SID",
               ("twilio", "auth_token"): "TWILIO_AUTH_TOKEN"}


def load(path: str | Path | None = None, environ: Mapping[str, str] | None = None,
         overrides: Mapping[str, Mapping[str, object]] | None = None, *,
         require_secrets: bool = True) -> Settings:
    """Read the file (if any), apply `overrides` then the environment, check, and freeze.

    `require_secrets=False` is for the offline commands (export, verify, status), which
    read the store and never take a webhook.
    """
    env = os.environ if environ is None else environ
    raw = _read_toml(path) if path is not None else {}
    _reject_unknown(raw)
    for section, values in (overrides or {}).items():
        raw.setdefault(section, {}).update(values)
    _apply_environment(raw, env)
    parsed = _parse_all(raw)
    return _build(parsed, require_secrets)


def _read_toml(path: str | Path) -> dict[str, dict[str, object]]:
    try:
        with open(path, "rb") as f:
            document = tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from e
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from e
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 (byte {e.start}): TOML files are UTF-8") from e
    for section, values in document.items():
        if not isinstance(values, dict):
            raise ConfigError(f"{section}: expected a [{section}] table")
    return document


def _reject_unknown(raw: Mapping[str, Mapping[str, object]]) -> None:
    for section, values in raw.items():
        if section not in SCHEMA:
            raise ConfigError(f"[{section}]: unknown section")
        for key in values:
            if key not in SCHEMA[section]:
                raise ConfigError(f"{section}.{key}: unknown key")


def _apply_environment(raw: dict[str, dict[str, object]], env: Mapping[str, str]) -> None:
    known = {f"{ENV_PREFIX}{s}_{k}".upper(): (s, k) for s, keys in SCHEMA.items() for k in keys}
    for name in env:
        if name.startswith(ENV_PREFIX) and name not in known:
            raise ConfigError(f"{name}: unknown setting (no such [section] key)")
    for (section, key), name in _TWILIO_ENV.items():
        if name in env:
            raw.setdefault(section, {})[key] = env[name]
    for name, (section, key) in known.items():
        if name in env:
            raw.setdefault(section, {})[key] = env[name]


def _parse_all(raw: Mapping[str, Mapping[str, object]]) -> dict[str, Any]:
    parsed: dict[str, Any] = {}
    for section, keys in SCHEMA.items():
        for key, (parse, default) in keys.items():
            value = raw.get(section, {}).get(key, default)
            try:
                parsed[f"{section}.{key}"] = None if value is None else parse(value)
            except ValueError as e:
                raise ConfigError(f"{section}.{key}: {e}") from e
    return parsed


def is_loopback(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.")


def _build(p: Mapping[str, Any], require_secrets: bool) -> Settings:
    host, port = p["http.listen"]
    if require_secrets and p["http.webhooks"] and not p["twilio.auth_token"]:
        raise ConfigError(
            "twilio.auth_token: required while http.webhooks is on (it checks signatures); "
            "set MSGLEDGER_TWILIO_AUTH_TOKEN or TWILIO_AUTH_TOKEN"
        )
    if p["http.webhooks"] and p["http.public_url"] is None and not is_loopback(host):
        raise ConfigError(
            "http.public_url: required when listening beyond loopback; signatures are checked"
            " against the URL Twilio calls, which the bound address does not tell")
    if p["http.workers"] > 1 and not hasattr(os, "pidfd_open"):
        raise ConfigError("http.workers: front processes need Linux 5.3 or later; set 1")
    if port != 0 and p["http.admin_listen"] == f"{host}:{port}":  # port 0: two ports
        raise ConfigError("http.admin_listen: must differ from http.listen (it exists to keep"
                          " /v1 and /metrics off the public listener)")
    if p["poller.give_up_after"] < p["poller.overdue_after"]:
        raise ConfigError("poller.give_up_after: must be at least poller.overdue_after (a"
                          " message is given up on only after it was polled)")
    inbound_s = p["http.ack_timeout"] + p["inbound.forward_timeout"] + INBOUND_ANSWER_SLACK
    if p["inbound.forward_url"] is not None and inbound_s > TWILIO_WAITS:
        most = TWILIO_WAITS - INBOUND_ANSWER_SLACK - p["http.ack_timeout"]
        raise ConfigError(
            f"inbound.forward_timeout: at most {max(most, 0):g}s with http.ack_timeout"
            f" {p['http.ack_timeout']:g}s: journaling, forwarding and the replies' second must"
            f" fit in the {TWILIO_WAITS:g} s Twilio waits for its answer")
    sid = p["twilio.account_sid"]
    if sid is not None and not re.fullmatch(r"AC[0-9a-fA-F]{32}", sid):
        raise ConfigError(f"twilio.account_sid: expected AC followed by 32 hex digits, got {sid!r}")
    fields = {key.replace(".", "_"): value for key, value in p.items() if key != "http.listen"}
    return Settings(http_listen_host=host, http_listen_port=port, **fields)
