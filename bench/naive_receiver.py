"""The receiver a small firm writes first: Flask, the signature check, one commit a callback.

Run under gunicorn with 2 sync workers (bench/targets.py does it):

    NAIVE_DB=/tmp/naive.db NAIVE_PUBLIC_URL=https://ledger.example.com \
    NAIVE_AUTH_TOKEN=... gunicorn -w 2 -b 127.0.0.1:8000 --pythonpath bench naive_receiver:app

Each worker holds one SQLite connection (WAL, synchronous=FULL) and commits every callback
on its own before answering 200, so the 200 is as durable as msgledger's. The two workers
share the database file and take turns at its write lock.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time

from flask import Flask, request
from twilio.request_validator import RequestValidator

DB_PATH = os.environ.get("NAIVE_DB", "naive.db")
PUBLIC_URL = os.environ.get("NAIVE_PUBLIC_URL", "http://127.0.0.1:8000")
AUTH_TOKEN = os.environ.get("NAIVE_AUTH_TOKEN", "")
BUSY_TIMEOUT_MS = 10_000  # the other worker holds the write lock for one commit at most

SCHEMA = """
CREATE TABLE IF NOT EXISTS callbacks (
    id INTEGER PRIMARY KEY,
    received_at REAL NOT NULL,
    message_sid TEXT,
    status TEXT,
    idempotency_token TEXT,
    url TEXT NOT NULL,
    params TEXT NOT NULL
)
"""

app = Flask(__name__)
validator = RequestValidator(AUTH_TOKEN)
_db: sqlite3.Connection | None = None  # one per worker, opened after gunicorn forks


def database() -> sqlite3.Connection:
    global _db
    if _db is None:
        db = sqlite3.connect(DB_PATH, isolation_level=None, timeout=BUSY_TIMEOUT_MS / 1000)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.execute(SCHEMA)
        _db = db
    return _db


def public_url() -> str:
    query = request.query_string.decode()
    return PUBLIC_URL + request.path + (f"?{query}" if query else "")


@app.post("/twilio/status")
def status_callback() -> tuple[str, int]:
    url = public_url()
    if not validator.validate(url, request.form, request.headers.get("X-Twilio-Signature", "")):
        return "", 403
    form = request.form
    database().execute(  # autocommit: this statement is one transaction, one fsync
        "INSERT INTO callbacks (received_at, message_sid, status, idempotency_token, url, params)"
        " VALUES (?, ?, ?, ?, ?, ?)",
        (time.time(), form.get("MessageSid"), form.get("MessageStatus"),
         request.headers.get("I-Twilio-Idempotency-Token"), url,
         json.dumps(form.to_dict(flat=False))),
    )
    return "", 200


@app.get("/healthz")
def healthz() -> tuple[str, int]:
    database()
    return "ok", 200
