"""The `msgledger` command: run, export, verify, status.

Configuration errors end the command with exit code 2 and one line naming the key.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime as dt
import json
import secrets
import sys
from collections.abc import Iterable, Sequence
from typing import TextIO

import trio

from . import logs, store
from . import main as daemon
from . import settings as config

EXIT_CONFIG = 2
EXIT_BROKEN_CHAIN = 3
CSV_FIELDS = ("sid", "ref", "to", "from", "messaging_service_sid", "status", "error_code",
              "final", "flags", "created_at", "updated_at", "sent_at", "body_sha256", "body",
              "history")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return int(args.command(args))
    except config.ConfigError as e:
        print(f"msgledger: configuration error: {e}", file=sys.stderr)
        return EXIT_CONFIG


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="msgledger", description=__doc__)
    commands = parser.add_subparsers(required=True, metavar="COMMAND")
    run = commands.add_parser("run", help="run the daemon in the foreground")
    run.add_argument("--dev", action="store_true",
                     help="local trial: loopback only, throwaway tokens printed at start")
    run.set_defaults(command=cmd_run)
    export = commands.add_parser("export", help="write the whole record (safe while running)")
    export.add_argument("--since", type=_date, help="first UTC day (YYYY-MM-DD), inclusive")
    export.add_argument("--until", type=_date, help="last UTC day (YYYY-MM-DD), inclusive")
    export.add_argument("--format", choices=("jsonl", "csv"), default="jsonl")
    export.add_argument("--output", "-o", help="file to write (default: stdout)")
    export.set_defaults(command=cmd_export)
    verify = commands.add_parser("verify", help="check the hash chain and the projection")
    verify.set_defaults(command=cmd_verify)
    status = commands.add_parser("status", help="counts by status and journal size")
    status.set_defaults(command=cmd_status)
    for command in (run, export, verify, status):
        command.add_argument("--config", "-c", help="TOML configuration file")
    return parser


def _date(text: str) -> dt.date:
    try:
        return dt.date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected YYYY-MM-DD, got {text!r}") from None


def cmd_run(args: argparse.Namespace) -> int:
    overrides: dict[str, dict[str, object]] = {}
    if args.dev:
        overrides = _dev_overrides()
    settings = config.load(args.config, overrides=overrides)
    logs.configure(settings.log_level)
    if args.dev:
        logs.get_logger("msgledger.cli").info(
            "dev_mode", note="throwaway tokens; loopback only; not for production",
            api_token=overrides["api"]["token"])
    try:
        trio.run(daemon.run, settings)
    except store.ChainBroken as broken:
        logs.get_logger("msgledger.cli").error("journal_chain_broken", seq=broken.seq,
                                               why=broken.why)
        return EXIT_BROKEN_CHAIN
    return 0


def _dev_overrides() -> dict[str, dict[str, object]]:
    return {
        "http": {"listen": "127.0.0.1:8080"},
        "twilio": {"auth_token": secrets.token_hex(16),
                   "account_sid": "AC" + secrets.token_hex(16)},
        "api": {"token": secrets.token_urlsafe(24)},
    }


def cmd_export(args: argparse.Namespace) -> int:
    settings = config.load(args.config, require_secrets=False)
    since = args.since.isoformat() if args.since else None
    until = (args.until + dt.timedelta(days=1)).isoformat() if args.until else None
    with contextlib.ExitStack() as stack:
        out: TextIO = (stack.enter_context(open(args.output, "w", newline=""))
                       if args.output else sys.stdout)
        conn = store.connect(settings.store_path, readonly=True)
        stack.callback(conn.close)
        conn.execute("BEGIN")  # one snapshot for the whole export, however long it takes
        records = store.iter_records(conn, since, until)
        (_write_csv if args.format == "csv" else _write_jsonl)(records, out)
        conn.execute("COMMIT")
    return 0


def _write_jsonl(records: Iterable[store.Record], out: TextIO) -> None:
    for record in records:
        out.write(json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n")


def _write_csv(records: Iterable[store.Record], out: TextIO) -> None:
    writer = csv.DictWriter(out, fieldnames=CSV_FIELDS, extrasaction="ignore")
    writer.writeheader()
    for record in records:
        row = dict(record, flags=";".join(record["flags"]),
                   history=json.dumps(record["history"], ensure_ascii=False))
        writer.writerow(row)


def cmd_verify(args: argparse.Namespace) -> int:
    settings = config.load(args.config, require_secrets=False)
    result = store.verify(settings.store_path)
    print(json.dumps({"ok": result.ok, "events": result.events, "messages": result.messages,
                      "first_bad_seq": result.first_bad_seq, "reason": result.reason}))
    return 0 if result.ok else 1


def cmd_status(args: argparse.Namespace) -> int:
    settings = config.load(args.config, require_secrets=False)
    conn = store.connect(settings.store_path, readonly=True)
    try:
        conn.execute("BEGIN")
        report = {"events": store.journal_size(conn), "by_status": store.status_counts(conn)}
        conn.execute("COMMIT")
    finally:
        conn.close()
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
