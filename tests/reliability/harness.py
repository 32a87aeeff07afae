"""Machinery of the reliability suite: synthetic corpora, a CLI worker to kill, stage watching, invariants.

The worker is the command line in a child process (see `Worker`). Its database
sessions carry an application name, so a test can see in `pg_stat_activity`
which statement the worker runs and strike there, and a short
`client_connection_check_interval`, so a backend notices at once that its client
died (as it does when the worker's host goes away) instead of finishing the
statement first: a killed `CREATE INDEX CONCURRENTLY` then leaves an INVALID
index behind, as it would in production.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.context
import os
import random
import signal
import subprocess
import sys
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from psycopg import sql

from tasks.db import LOAD_LOCK, Connection, index_validity, verify_schema
from tasks.embed import hash_vector
from tasks.records import join_embed_text, sha256_bytes
from tasks.registry import EmbeddingModel, live_models
from tests.fake_openai import FakeEmbeddingsServer

REPO = Path(__file__).resolve().parents[2]
WORKER_TIMEOUT_SECONDS = 120.0
"""The longest any worker may run before the test gives up on it."""
POLL_SECONDS = 0.002
"""Interval between two looks at `pg_stat_activity`."""
CONNECTION_CHECK_MS = 10
"""How often a worker's backend checks that its client is still there."""

# Environment a worker must not inherit from the machine running the tests.
_INHERITED_PREFIXES = ("RAGINGEST_", "EMBEDDING_", "OPENAI_", "PG")
_INHERITED_NAMES = ("DATABASE_URL",)


# --- synthetic corpus --------------------------------------------------------------


@dataclass
class Corpus:
    """`files` pages of `sections` sections each; every page chunks to exactly `sections + 1` chunks.

    Every section names the page's revision, so bumping a page's revision changes
    all of its chunks: each becomes a cache miss, and the page is restaged.
    """

    root: Path
    files: int
    sections: int
    words: int = 40
    revisions: dict[str, int] = field(default_factory=dict)

    def paths(self) -> list[str]:
        return [f"part{i % 4}/page{i:04}.md" for i in range(self.files)]

    def write(self) -> Corpus:
        for number, path in enumerate(self.paths()):
            self.revisions.setdefault(path, 0)
            self._write_page(number, path)
        return self

    def bump(self, rng: random.Random, fraction: float) -> list[str]:
        """Give a random share of the pages a new revision; returns their paths."""
        paths = self.paths()
        chosen = sorted(rng.sample(paths, max(1, round(len(paths) * fraction))))
        for path in chosen:
            self.revisions[path] += 1
            self._write_page(paths.index(path), path)
        return chosen

    def expected_chunks(self) -> dict[str, int]:
        return {path: self.sections + 1 for path in self.paths()}

    def _write_page(self, number: int, path: str) -> None:
        target = self.root / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(self.page_text(number, self.revisions[path]), encoding="utf-8")

    def page_text(self, number: int, revision: int) -> str:
        parts = [f"# Page {number}\n\nIntroduction of page {number}, revision {revision}.\n"]
        for section in range(self.sections):
            words = " ".join(f"w{(number * 31 + section * 7 + i) % 1009}" for i in range(self.words))
            parts.append(
                f"## Section {section}\n\nPage {number} revision {revision}, section {section}: {words}.\n"
            )
        return "\n".join(parts)


# --- the worker ----------------------------------------------------------------------


def worker_env(database_url: str, app_name: str, **settings: str) -> dict[str, str]:
    """A clean environment for the CLI: the database, a session name to find it by, and settings."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(_INHERITED_PREFIXES) and key not in _INHERITED_NAMES
    }
    env.update(
        DATABASE_URL=database_url,
        PGAPPNAME=app_name,
        PGOPTIONS=f"-c client_connection_check_interval={CONNECTION_CHECK_MS}",
        RAGINGEST_LOCK_TIMEOUT_SECONDS="60",
    )
    env.update(settings)
    return env


class Worker(ABC):
    """The command line running in a child process, its output kept in a file.

    Two ways to start it: `exec_cli` runs `python -m cli.main ARGS` (the real entry
    point, with its interpreter start-up), and `fork_cli` forks a process from a
    fork server that has imported the project once, then calls `cli.main.main(ARGS)`.
    Both are separate processes with their own database sessions and HTTP
    connections that SIGKILL ends at once; forking saves the seconds an import of
    Prefect costs on a busy machine, which is what lets the suite run dozens of them.
    """

    def __init__(self, log_path: Path) -> None:
        self.log_path = log_path

    @property
    @abstractmethod
    def running(self) -> bool: ...

    @abstractmethod
    def kill(self) -> None:
        """SIGKILL the process (if it still runs) and reap it."""

    @abstractmethod
    def wait(self, timeout: float = WORKER_TIMEOUT_SECONDS) -> int:
        """The exit code (negative: the signal that ended it); fails after `timeout`."""

    def output(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def __enter__(self) -> Worker:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.running:
            self.kill()


class ExecWorker(Worker):
    def __init__(self, args: Sequence[str], env: Mapping[str, str], log_path: Path) -> None:
        super().__init__(log_path)
        with log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "cli.main", *args],
                cwd=REPO,
                env=dict(env),
                stdout=log,
                stderr=log,
                stdin=subprocess.DEVNULL,
            )

    @property
    def running(self) -> bool:
        return self.process.poll() is None

    def kill(self) -> None:
        if self.running:
            self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)

    def wait(self, timeout: float = WORKER_TIMEOUT_SECONDS) -> int:
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"worker ran past {timeout:g} s:\n{self.output()}") from None


_PRELOAD = [
    "tests.reliability.harness",
    "cli.main",
    "flows.ingest",
    "flows.backfill",
    "cli.backfill",
    "openai",
]


def _fork_context() -> multiprocessing.context.ForkServerContext:
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(_PRELOAD)
    return context


def _cli_child(args: Sequence[str], env: Mapping[str, str], log_path: str) -> None:
    """The forked worker: the environment it was given, output to its log, then the CLI."""
    os.environ.clear()
    os.environ.update(env)
    log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(log)
    from cli.main import main

    code = main(list(args))
    sys.stdout.flush()
    sys.stderr.flush()
    sys.exit(code)


class ForkedWorker(Worker):
    def __init__(self, args: Sequence[str], env: Mapping[str, str], log_path: Path) -> None:
        super().__init__(log_path)
        self.process = _fork_context().Process(
            target=_cli_child, args=(list(args), dict(env), str(log_path)), daemon=True
        )
        self.process.start()

    @property
    def running(self) -> bool:
        return self.process.is_alive()

    def kill(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join(30)

    def wait(self, timeout: float = WORKER_TIMEOUT_SECONDS) -> int:
        self.process.join(timeout)
        if self.process.exitcode is None:
            self.kill()
            raise AssertionError(f"worker ran past {timeout:g} s:\n{self.output()}")
        return self.process.exitcode


def exec_cli(args: Sequence[str], env: Mapping[str, str], log_path: Path) -> ExecWorker:
    return ExecWorker(args, env, log_path)


def fork_cli(args: Sequence[str], env: Mapping[str, str], log_path: Path) -> ForkedWorker:
    return ForkedWorker(args, env, log_path)


def run_cli(
    args: Sequence[str], env: Mapping[str, str], log_path: Path, *, fork: bool = True
) -> tuple[int, str]:
    """Run the CLI to its end; returns the exit code and everything it printed."""
    with (fork_cli if fork else exec_cli)(args, env, log_path) as worker:
        code = worker.wait()
    return code, worker.output()


# --- landing a kill in a stage ----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Stage:
    """A stage of a run, recognised by the statement its backend runs."""

    name: str
    pattern: str
    """ILIKE pattern of `pg_stat_activity.query`."""
    max_skip: int = 0
    """The statement runs several times per run: let a random number of them pass first."""
    max_offset: float = 0.0
    """Kill a random time into the statement, up to this many seconds (it may end sooner)."""


@dataclass(frozen=True, slots=True)
class Kill:
    stage: str
    statement: str
    """The statement the worker's backend was running at the kill."""
    seconds_into_run: float


def active_statements(monitor: Connection, app_name: str, pattern: str) -> list[tuple[int, Any, str]]:
    return monitor.execute(
        "SELECT pid, query_start, left(query, 120) FROM pg_stat_activity"
        " WHERE application_name = %s AND state = 'active' AND query ILIKE %s",
        (app_name, pattern),
    ).fetchall()


def wait_for_stage(
    worker: Worker,
    monitor: Connection,
    app_name: str,
    stage: Stage,
    rng: random.Random,
    *,
    timeout: float = WORKER_TIMEOUT_SECONDS,
) -> str | None:
    """Block until the worker's backend runs the stage's statement, at a point drawn from `rng`.

    Returns the statement, or None when the worker ended first. The point is how
    many runs of the statement to let pass, and how far into the chosen one to go.
    """
    started = time.monotonic()
    skip = rng.randint(0, stage.max_skip)
    offset = rng.uniform(0.0, stage.max_offset)
    sightings: dict[tuple[int, Any], float] = {}
    while worker.running:
        if time.monotonic() - started > timeout:
            worker.kill()
            raise AssertionError(f"worker never reached {stage.name} within {timeout:g} s")
        for pid, query_start, statement in active_statements(monitor, app_name, stage.pattern):
            first_seen = sightings.setdefault((pid, query_start), time.monotonic())
            if len(sightings) > skip and time.monotonic() - first_seen >= offset:
                return str(statement)
        time.sleep(POLL_SECONDS)
    return None


def kill_during(
    worker: Worker,
    monitor: Connection,
    app_name: str,
    stage: Stage,
    rng: random.Random,
    *,
    timeout: float = WORKER_TIMEOUT_SECONDS,
) -> Kill | None:
    """SIGKILL the worker while its backend runs the stage's statement; None if the run ended first."""
    started = time.monotonic()
    statement = wait_for_stage(worker, monitor, app_name, stage, rng, timeout=timeout)
    if statement is None:
        return None
    worker.kill()
    return Kill(stage.name, statement, time.monotonic() - started)


def terminate_sessions(monitor: Connection, app_name: str) -> int:
    """Drop every database connection of the worker, as a failover or a network cut would."""
    rows = monitor.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s", (app_name,)
    ).fetchall()
    return sum(1 for (done,) in rows if done)


def sessions_waiting_for_a_lock(monitor: Connection, app_name: str) -> int:
    row = monitor.execute(
        "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid"
        " WHERE a.application_name = %s AND NOT l.granted",
        (app_name,),
    ).fetchone()
    return int(row[0]) if row else 0


def holds_load_lock(monitor: Connection, app_name: str) -> bool:
    row = monitor.execute(
        "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid"
        " WHERE a.application_name = %s AND l.locktype = 'advisory' AND l.granted"
        " AND l.classid = 0 AND l.objid = %s",
        (app_name, LOAD_LOCK),
    ).fetchone()
    return bool(row and row[0])


def wait_until(condition: Callable[[], bool], what: str, *, timeout: float = 60.0) -> None:
    """Poll `condition` (bounded); fail naming `what` when it never holds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.005)


def error_line(output: str) -> str:
    """The CLI's one-line error; fails when the output holds a traceback or no such line."""
    assert "Traceback" not in output, output
    lines = [line for line in output.splitlines() if line.startswith("ragingest: error: ")]
    assert len(lines) == 1, output
    return lines[0]


def kill_after_requests(
    worker: Worker, server: FakeEmbeddingsServer, requests: int, *, timeout: float = WORKER_TIMEOUT_SECONDS
) -> Kill | None:
    """SIGKILL the worker once the embeddings server has answered `requests` requests."""
    started = time.monotonic()
    while worker.running and server.request_count < requests:
        if time.monotonic() - started > timeout:
            worker.kill()
            raise AssertionError(f"the worker sent fewer than {requests} requests in {timeout:g} s")
        server.wait_for_in_flight(0, 0.02)
    if not worker.running:
        return None
    worker.kill()
    return Kill("embed", f"after {server.request_count} embedding requests", time.monotonic() - started)


def wait_for_sessions_to_end(monitor: Connection, app_name: str, timeout: float = 30.0) -> None:
    """Wait until no backend of a killed worker is left (bounded)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        row = monitor.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s", (app_name,)
        ).fetchone()
        if row is not None and row[0] == 0:
            return
        time.sleep(0.01)
    raise AssertionError(f"sessions of {app_name} still open {timeout:g} s after the worker died")


# --- invariants -------------------------------------------------------------------------


@dataclass
class InvariantReport:
    problems: list[str] = field(default_factory=list)
    rows_expected: int = 0
    rows_lost: int = 0
    chunks: int = 0
    vectors_checked: int = 0


def check_invariants(
    conn: Connection,
    *,
    source: str | None = None,
    root: Path | None = None,
    expected_chunks: Mapping[str, int] | None = None,
    empty_documents: Collection[str] = (),
    vector_sample: int = 40,
) -> InvariantReport:
    """Everything that must hold after any run completes, whatever happened to the runs before it.

    With `expected_chunks` (path -> chunks its current file yields), each of those
    documents of `source` must be stored, hashed as its file under `root` is now, with
    that many chunks: a missing chunk counts as a row lost. No stored document may
    outlive its file. Active documents must have chunks, except the `empty_documents`
    (pages with no text to index).
    """
    report = InvariantReport()
    models = live_models(conn)
    report.problems += [f"schema: {problem}" for problem in verify_schema(conn)]
    _check_columns_and_indexes(conn, models, report)
    _check_orphans_and_duplicates(conn, empty_documents, report)
    _check_cache_dimensions(conn, report)
    if expected_chunks is not None:
        assert source is not None and root is not None
        _check_expected_documents(conn, source, root, expected_chunks, report)
    report.vectors_checked = _check_vectors(conn, models, vector_sample, report)
    row = conn.execute("SELECT count(*) FROM chunks").fetchone()
    report.chunks = int(row[0]) if row else 0
    return report


def _check_columns_and_indexes(
    conn: Connection, models: Sequence[EmbeddingModel], report: InvariantReport
) -> None:
    indexes = index_validity(conn)
    for model in models:
        row = conn.execute(
            sql.SQL("SELECT count(*) FROM chunks WHERE {} IS NULL").format(sql.Identifier(model.column_name))
        ).fetchone()
        if row is not None and row[0]:
            report.problems.append(f"{row[0]} chunks have no vector in {model.column_name}")
        state = indexes.get(model.index_name)
        if state is not True:
            report.problems.append(
                f"index {model.index_name} is {'INVALID' if state is False else 'missing'}"
            )


def _check_orphans_and_duplicates(conn: Connection, empty: Collection[str], report: InvariantReport) -> None:
    chunkless = conn.execute(
        "SELECT path FROM documents d WHERE d.status = 'active'"
        " AND NOT EXISTS (SELECT 1 FROM chunks c WHERE c.document_id = d.id)"
    ).fetchall()
    report.problems += [f"active document {path} has no chunks" for (path,) in chunkless if path not in empty]
    checks = {
        "chunks without their document": "SELECT count(*) FROM chunks c"
        " WHERE NOT EXISTS (SELECT 1 FROM documents d WHERE d.id = c.document_id)",
        "failures without their run": "SELECT count(*) FROM ingest_failures f"
        " WHERE NOT EXISTS (SELECT 1 FROM ingest_runs r WHERE r.id = f.run_id)",
        "duplicate chunk positions": "SELECT count(*) FROM (SELECT document_id, ordinal FROM chunks"
        " GROUP BY 1, 2 HAVING count(*) > 1) x",
        "duplicate documents": "SELECT count(*) FROM (SELECT source, path FROM documents"
        " GROUP BY 1, 2 HAVING count(*) > 1) x",
        "gaps in chunk ordinals": "SELECT count(*) FROM (SELECT document_id FROM chunks GROUP BY 1"
        " HAVING max(ordinal) + 1 <> count(*) OR min(ordinal) <> 0) x",
        "cache rows of no model key": "SELECT count(*) FROM embedding_cache"
        " WHERE model_key !~ '^[^:]+:.+:[0-9]+$'",
    }
    for name, query in checks.items():
        row = conn.execute(query).fetchone()
        if row is not None and row[0]:
            report.problems.append(f"{row[0]} {name}")


def _check_cache_dimensions(conn: Connection, report: InvariantReport) -> None:
    rows = conn.execute(
        "SELECT model_key, vector_dims(embedding), count(*) FROM embedding_cache GROUP BY 1, 2"
    ).fetchall()
    for model_key, dims, count in rows:
        declared = int(model_key.rsplit(":", 1)[1])
        if dims != declared:
            report.problems.append(f"{count} cache vectors of {model_key} have {dims} dimensions")


def _check_expected_documents(
    conn: Connection, source: str, root: Path, expected: Mapping[str, int], report: InvariantReport
) -> None:
    stored = {
        path: (bytes(digest), status, chunks)
        for path, digest, status, chunks in conn.execute(
            "SELECT d.path, d.content_hash, d.status, count(c.id) FROM documents d"
            " LEFT JOIN chunks c ON c.document_id = d.id WHERE d.source = %s GROUP BY 1, 2, 3",
            (source,),
        )
    }
    report.rows_expected += sum(expected.values())
    for path, chunks in expected.items():
        if path not in stored:
            report.problems.append(f"document {path} is missing")
            report.rows_lost += chunks
            continue
        digest, status, stored_chunks = stored[path]
        if digest != sha256_bytes((root / path).read_bytes()):
            report.problems.append(f"document {path} holds an old version of the file")
        if status != "active":
            report.problems.append(f"document {path} is {status}")
        if stored_chunks != chunks:
            report.problems.append(f"document {path} has {stored_chunks} chunks, expected {chunks}")
            report.rows_lost += max(0, chunks - stored_chunks)
    for path in sorted(set(stored) - set(expected)):
        if not (root / path).exists():
            report.problems.append(f"document {path} is stored but its file is gone")


def expected_vector(model: EmbeddingModel, text: str) -> np.ndarray[Any, Any]:
    if model.provider == "hash":
        return hash_vector(text, model.dimensions)
    if model.provider == "openai":
        return np.asarray(FakeEmbeddingsServer.vector_for(text, model.dimensions), dtype=np.float32)
    raise ValueError(f"no reference vectors for provider {model.provider}")


def _check_vectors(
    conn: Connection, models: Sequence[EmbeddingModel], sample: int, report: InvariantReport
) -> int:
    """A random sample of chunks: each stored vector is the one its embed text must get."""
    checked = 0
    for model in models:
        rows = conn.execute(
            sql.SQL(
                "SELECT metadata ->> 'embed_header', content, {}::vector FROM chunks"
                " WHERE {} IS NOT NULL ORDER BY random() LIMIT %s"
            ).format(sql.Identifier(model.column_name), sql.Identifier(model.column_name)),
            (sample,),
        ).fetchall()
        for header, content, stored in rows:
            text = join_embed_text(header or "", content)
            if not np.allclose(stored.to_numpy(), expected_vector(model, text), atol=1e-3):
                report.problems.append(f"a vector in {model.column_name} does not belong to its chunk")
                break
            checked += 1
    return checked


def table_snapshot(conn: Connection) -> dict[str, list[tuple[Any, ...]]]:
    """What a failed run must leave exactly as it was."""
    return {
        "documents": conn.execute(
            "SELECT source, path, content_hash, status, title FROM documents ORDER BY source, path"
        ).fetchall(),
        "chunks": conn.execute(
            "SELECT d.path, c.ordinal, c.embed_hash, c.content FROM chunks c"
            " JOIN documents d ON d.id = c.document_id ORDER BY d.path, c.ordinal"
        ).fetchall(),
        "models": conn.execute("SELECT slug, status FROM embedding_models ORDER BY slug").fetchall(),
        "runs": conn.execute("SELECT count(*) FROM ingest_runs").fetchall(),
    }
