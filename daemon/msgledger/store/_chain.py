"""The journal's hash chain: each row's hash covers the previous hash and the row itself.

The hash is computed over the stored column values (with `data` as its stored text), so
`verify` never depends on re-serialising JSON the same way twice.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

# Built once: `json.dumps` with options builds a new encoder on every call.
_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False)
_ROW = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)


def canonical_json(data: Mapping[str, Any]) -> str:
    """The one text form of an event's data: sorted keys, no spaces, UTF-8 kept."""
    return _CANONICAL.encode(data)


def row_hash(prev_hash: str, seq: int, at: str, kind: str, source: str,
             sid: str | None, ref: str | None, status: str | None, data: str) -> str:
    """SHA-256 over the previous hash and the row's canonical bytes, hex."""
    row = _ROW.encode([seq, at, kind, source, sid, ref, status, data])
    return hashlib.sha256(f"{prev_hash}\n{row}".encode()).hexdigest()
