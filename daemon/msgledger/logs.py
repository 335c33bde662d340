"""structlog configuration: JSON lines on stdout, ISO UTC timestamps, the Trio task name.

Configured once, before `trio.run`. The standard library's loggers (hypercorn's among
them) go through the same renderer so an admin tails one format.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

import orjson
import structlog
import trio

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "error": logging.ERROR}


def _add_task_name(_: Any, __: str, event: dict[str, Any]) -> dict[str, Any]:
    try:
        task = trio.lowlevel.current_task()
    except RuntimeError:  # outside trio: CLI commands, worker threads
        return event
    event.setdefault("task", task.name)
    return event


_SHARED: list[Any] = [
    structlog.contextvars.merge_contextvars,
    structlog.processors.add_log_level,
    structlog.processors.TimeStamper(fmt="iso", utc=True),
    _add_task_name,
]


def _dumps(line: dict[str, Any], **options: Any) -> bytes:
    """orjson, or the json module for what orjson refuses (a lone surrogate, from a file
    name that is not UTF-8): a log line must never raise."""
    try:
        return orjson.dumps(line, **options)
    except TypeError:
        return json.dumps(line, default=options.get("default")).encode()


def configure(level: str = "info") -> None:
    """Send every log line, ours and the standard library's, to stdout as JSON."""
    numeric = _LEVELS[level]
    sys.stdout.flush()  # our lines go to its byte buffer below; nothing may overtake them
    structlog.configure(
        # orjson renders a line faster than json (bench/README.md, "Measured once"): this
        # runs once per callback.
        processors=[*_SHARED, structlog.processors.format_exc_info,
                    structlog.processors.JSONRenderer(serializer=_dumps)],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.BytesLoggerFactory(file=sys.stdout.buffer),
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[structlog.stdlib.add_logger_name, *_SHARED],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                    structlog.processors.format_exc_info,
                    structlog.processors.JSONRenderer()],
    ))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(max(numeric, logging.INFO))  # third-party debug chatter stays out
    # twilio logs every request's headers at INFO; the sender logs one line per send.
    logging.getLogger("twilio.http_client").setLevel(logging.WARNING)
    # httpx (the media fetcher, the forward to the firm's app) one per request: ours say more.
    logging.getLogger("httpx").setLevel(logging.WARNING)


def get_logger(name: str) -> Any:
    return structlog.get_logger(name)
